"""Tables of the billing domain (统采分签): lifecycle events, price catalogs, contracts, usage
intervals, rated usage, statements and their adjustments.

The flow, each step idempotent:
- every state change of a server is one `lifecycle_event`, written in the same transaction as the
  change by whichever part of govbroker saw it (provisioning, sync, adoption). It carries the
  server's sizes and power state *after* the change;
- metering turns events into `usage_interval`s, one per server × resource class × stretch of
  unchanged quantity, power and contract;
- rating cuts each interval at month boundaries (Asia/Shanghai), price-list versions and the
  contract's period, and adds the rated seconds to one `rated_usage` row per cut. An interval's
  `rated_until` moves forward only by compare-and-set in the transaction that adds the seconds, so
  every second of every (server, class, hour) is rated once, whatever crashes or runs twice;
- statements aggregate rated usage per contract and month.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlmodel import Field, SQLModel

from broker.core.clock import now
from broker.core.db import utc_column
from broker.core.ids import new_id

# unit prices are fen per unit-hour with sub-fen precision; amounts are integer fen
PRICE = Numeric(18, 6)
# who pays for rated usage outside every contract
UNASSIGNED = uuid.UUID(int=0)


class LifecycleKind(StrEnum):
    created = "created"
    adopted = "adopted"
    resized = "resized"
    started = "started"
    stopped = "stopped"
    rebooted = "rebooted"
    disk_attached = "disk_attached"
    disk_detached = "disk_detached"
    ip_added = "ip_added"
    ip_released = "ip_released"
    deleted = "deleted"
    gone = "gone"
    # seen by sync: a server nobody booked appeared, or a server changed outside govbroker
    discovered = "discovered"
    changed = "changed"


def _fk(target: str, nullable: bool = False, **kw: Any) -> Any:
    return Column(Uuid(), ForeignKey(target), nullable=nullable, **kw)


class LifecycleEvent(SQLModel, table=True):
    __tablename__ = "lifecycle_event"
    __table_args__ = (
        Index("ix_lifecycle_event_server_id_at", "server_id", "at"),
        Index("ix_lifecycle_event_at", "at"),
        Index("ix_lifecycle_event_metered_at", "metered_at", "at"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    server_id: uuid.UUID = Field(sa_column=_fk("server.id"))
    # null for servers no tenant owns: metered to the unassigned bucket
    tenant_id: uuid.UUID | None = Field(default=None, sa_column=_fk("tenant.id", True))
    agency_id: uuid.UUID | None = Field(default=None, sa_column=_fk("tenant.id", True))
    provider_id: uuid.UUID = Field(sa_column=_fk("provider.id"))
    service_company_id: uuid.UUID | None = Field(
        default=None, sa_column=_fk("service_company.id", True)
    )
    contract_id: uuid.UUID | None = Field(default=None, sa_column=_fk("contract.id", True))
    kind: str = Field(sa_column=Column(String(24), nullable=False))
    power_state: str = Field(sa_column=Column(String(16), nullable=False))
    # what the server holds after the event ({resource class: amount}); empty once deleted
    sizes: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON(), nullable=False))
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON(), nullable=False))
    job_id: uuid.UUID | None = Field(default=None, sa_column=Column(Uuid(), nullable=True))
    actor: str = Field(sa_column=Column(String(64), nullable=False))
    at: datetime = Field(default_factory=now, sa_column=utc_column())
    # set once metering has turned the event into usage intervals
    metered_at: datetime | None = Field(default=None, sa_column=utc_column(True))


class ServiceCompany(SQLModel, table=True):
    """服务商: a company selected centrally to run providers and bill agencies under contract."""

    __tablename__ = "service_company"

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    code: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    name_zh: str = Field(sa_column=Column(String(200), nullable=False))
    name_en: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    # 统一社会信用代码: 18 characters
    credit_code: str | None = Field(default=None, sa_column=Column(String(18), nullable=True))
    contact: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    created_at: datetime = Field(default_factory=now, sa_column=utc_column())
    updated_at: datetime = Field(default_factory=now, sa_column=utc_column())


class PriceCatalog(SQLModel, table=True):
    """One version of a service company's price list (统一采购), in force [effective_from,
    effective_until). Versions of one company never overlap."""

    __tablename__ = "price_catalog"
    __table_args__ = (
        UniqueConstraint("service_company_id", "version"),
        UniqueConstraint("service_company_id", "effective_from"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    service_company_id: uuid.UUID = Field(sa_column=_fk("service_company.id"))
    version: int = Field(sa_column=Column(Integer(), nullable=False))
    name: str = Field(sa_column=Column(String(200), nullable=False))
    currency: str = Field(default="CNY", sa_column=Column(String(3), nullable=False))
    effective_from: datetime = Field(sa_column=utc_column())
    effective_until: datetime | None = Field(default=None, sa_column=utc_column(True))
    # whether vCPU and memory keep billing while a server is powered off
    bill_compute_when_off: bool = Field(default=False, sa_column=Column(Boolean(), nullable=False))
    created_at: datetime = Field(default_factory=now, sa_column=utc_column())
    created_by: str = Field(sa_column=Column(String(64), nullable=False))


class PriceItem(SQLModel, table=True):
    __tablename__ = "price_item"
    __table_args__ = (UniqueConstraint("catalog_id", "resource_class"),)

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    catalog_id: uuid.UUID = Field(sa_column=_fk("price_catalog.id", index=True))
    resource_class: str = Field(sa_column=Column(String(64), nullable=False))
    # fen per unit-hour (memory: per GiB-hour)
    unit_price: Decimal = Field(sa_column=Column(PRICE, nullable=False))
    # per server and month, in fen
    monthly_cap_amount: int | None = Field(default=None, sa_column=Column(BigInteger()))
    monthly_min_amount: int | None = Field(default=None, sa_column=Column(BigInteger()))


class ContractStatus(StrEnum):
    active = "active"
    suspended = "suspended"
    terminated = "terminated"


class Contract(SQLModel, table=True):
    """分签: one agency's contract with one centrally selected service company."""

    __tablename__ = "contract"
    __table_args__ = (
        CheckConstraint("status IN ('active','suspended','terminated')", name="status"),
        CheckConstraint("starts_on <= ends_on", name="period"),
        CheckConstraint("budget_amount >= 0", name="budget"),
        CheckConstraint("discount_pct >= 0 AND discount_pct < 100", name="discount"),
        Index("ix_contract_agency_id_service_company_id", "agency_id", "service_company_id"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    number: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    title: str = Field(sa_column=Column(String(200), nullable=False))
    agency_id: uuid.UUID = Field(sa_column=_fk("tenant.id"))
    service_company_id: uuid.UUID = Field(sa_column=_fk("service_company.id"))
    signed_on: date = Field(sa_column=Column(Date(), nullable=False))
    # the period, in calendar days of the billing time zone, both ends included
    starts_on: date = Field(sa_column=Column(Date(), nullable=False))
    ends_on: date = Field(sa_column=Column(Date(), nullable=False))
    budget_amount: int = Field(sa_column=Column(BigInteger(), nullable=False))
    currency: str = Field(default="CNY", sa_column=Column(String(3), nullable=False))
    discount_pct: Decimal = Field(
        default=Decimal(0), sa_column=Column(Numeric(5, 2), nullable=False)
    )
    billing_contact: str | None = Field(default=None, sa_column=Column(String(200)))
    status: str = Field(
        default=ContractStatus.active.value, sa_column=Column(String(16), nullable=False)
    )
    created_at: datetime = Field(default_factory=now, sa_column=utc_column())
    updated_at: datetime = Field(default_factory=now, sa_column=utc_column())


class UsageInterval(SQLModel, table=True):
    """A stretch of time one server held `quantity` of one resource class, unchanged."""

    __tablename__ = "usage_interval"
    __table_args__ = (
        Index("ix_usage_interval_server_id_ended_at", "server_id", "ended_at"),
        Index("ix_usage_interval_rated_until", "rated_until"),
        UniqueConstraint("opened_by", "resource_class"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    server_id: uuid.UUID = Field(sa_column=_fk("server.id"))
    tenant_id: uuid.UUID | None = Field(default=None, sa_column=Column(Uuid(), nullable=True))
    agency_id: uuid.UUID | None = Field(default=None, sa_column=Column(Uuid(), nullable=True))
    contract_id: uuid.UUID | None = Field(default=None, sa_column=Column(Uuid(), nullable=True))
    provider_id: uuid.UUID = Field(sa_column=Column(Uuid(), nullable=False))
    service_company_id: uuid.UUID | None = Field(
        default=None, sa_column=Column(Uuid(), nullable=True)
    )
    resource_class: str = Field(sa_column=Column(String(64), nullable=False))
    quantity: int = Field(sa_column=Column(BigInteger(), nullable=False))
    powered: bool = Field(sa_column=Column(Boolean(), nullable=False))
    started_at: datetime = Field(sa_column=utc_column())
    ended_at: datetime | None = Field(default=None, sa_column=utc_column(True))
    # rating has counted [started_at, rated_until)
    rated_until: datetime = Field(sa_column=utc_column())
    opened_by: uuid.UUID = Field(sa_column=Column(Uuid(), nullable=False))


class RatedUsage(SQLModel, table=True):
    """Rated seconds of one interval within one month, price-list item and side of the
    contract's period. Money is worked out from these exact seconds on the statement line."""

    __tablename__ = "rated_usage"
    __table_args__ = (
        UniqueConstraint("interval_id", "month", "price_item_id", "billed_to"),
        Index("ix_rated_usage_month_contract_id", "month", "contract_id"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    interval_id: uuid.UUID = Field(sa_column=_fk("usage_interval.id"))
    server_id: uuid.UUID = Field(sa_column=Column(Uuid(), nullable=False))
    tenant_id: uuid.UUID | None = Field(default=None, sa_column=Column(Uuid(), nullable=True))
    agency_id: uuid.UUID | None = Field(default=None, sa_column=Column(Uuid(), nullable=True))
    # null: outside any contract (unmanaged servers, time outside the contract's period)
    contract_id: uuid.UUID | None = Field(default=None, sa_column=Column(Uuid(), nullable=True))
    in_contract: bool = Field(sa_column=Column(Boolean(), nullable=False))
    # the contract, or UNASSIGNED: a key column cannot be NULL and still tell rows apart
    billed_to: uuid.UUID = Field(sa_column=Column(Uuid(), nullable=False))
    service_company_id: uuid.UUID = Field(sa_column=Column(Uuid(), nullable=False))
    provider_id: uuid.UUID = Field(sa_column=Column(Uuid(), nullable=False))
    price_item_id: uuid.UUID = Field(sa_column=_fk("price_item.id"))
    resource_class: str = Field(sa_column=Column(String(64), nullable=False))
    quantity: int = Field(sa_column=Column(BigInteger(), nullable=False))
    unit_price: Decimal = Field(sa_column=Column(PRICE, nullable=False))
    month: str = Field(sa_column=Column(String(7), nullable=False))
    seconds: int = Field(sa_column=Column(BigInteger(), nullable=False))
    first_at: datetime = Field(sa_column=utc_column())
    last_at: datetime = Field(sa_column=utc_column())


class StatementState(StrEnum):
    draft = "draft"
    final = "final"


class Statement(SQLModel, table=True):
    __tablename__ = "statement"
    __table_args__ = (
        UniqueConstraint("contract_id", "month"),
        CheckConstraint("state IN ('draft','final')", name="state"),
        Index("ix_statement_month_agency_id", "month", "agency_id"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    agency_id: uuid.UUID = Field(sa_column=_fk("tenant.id"))
    contract_id: uuid.UUID = Field(sa_column=_fk("contract.id"))
    service_company_id: uuid.UUID = Field(sa_column=_fk("service_company.id"))
    month: str = Field(sa_column=Column(String(7), nullable=False))
    state: str = Field(
        default=StatementState.draft.value, sa_column=Column(String(8), nullable=False)
    )
    currency: str = Field(default="CNY", sa_column=Column(String(3), nullable=False))
    subtotal_amount: int = Field(sa_column=Column(BigInteger(), nullable=False))
    discount_pct: Decimal = Field(sa_column=Column(Numeric(5, 2), nullable=False))
    discount_amount: int = Field(sa_column=Column(BigInteger(), nullable=False))
    total_amount: int = Field(sa_column=Column(BigInteger(), nullable=False))
    line_count: int = Field(sa_column=Column(Integer(), nullable=False))
    content_hash: str | None = Field(default=None, sa_column=Column(String(64)))
    generated_at: datetime = Field(default_factory=now, sa_column=utc_column())
    generated_by: str = Field(sa_column=Column(String(64), nullable=False))
    finalized_at: datetime | None = Field(default=None, sa_column=utc_column(True))
    finalized_by: str | None = Field(default=None, sa_column=Column(String(64)))


class StatementLine(SQLModel, table=True):
    __tablename__ = "statement_line"
    __table_args__ = (UniqueConstraint("statement_id", "position"),)

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    statement_id: uuid.UUID = Field(sa_column=_fk("statement.id"))
    position: int = Field(sa_column=Column(Integer(), nullable=False))
    # usage | cap (a negative line bringing a server's month down to the cap) | minimum
    kind: str = Field(default="usage", sa_column=Column(String(8), nullable=False))
    server_id: uuid.UUID = Field(sa_column=Column(Uuid(), nullable=False))
    server_name: str = Field(sa_column=Column(String(255), nullable=False))
    tenant_id: uuid.UUID | None = Field(default=None, sa_column=Column(Uuid(), nullable=True))
    resource_class: str = Field(sa_column=Column(String(64), nullable=False))
    quantity: int = Field(sa_column=Column(BigInteger(), nullable=False))
    seconds: int = Field(sa_column=Column(BigInteger(), nullable=False))
    unit_price: Decimal = Field(sa_column=Column(PRICE, nullable=False))
    amount: int = Field(sa_column=Column(BigInteger(), nullable=False))


class AdjustmentState(StrEnum):
    proposed = "proposed"
    approved = "approved"
    rejected = "rejected"


class Adjustment(SQLModel, table=True):
    """A credit or debit note on a finalized statement: proposed by one person, approved by
    another; the statement itself never changes."""

    __tablename__ = "adjustment"
    __table_args__ = (
        CheckConstraint("kind IN ('credit','debit')", name="kind"),
        CheckConstraint("amount > 0", name="amount"),
        CheckConstraint("state IN ('proposed','approved','rejected')", name="state"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    statement_id: uuid.UUID = Field(sa_column=_fk("statement.id", index=True))
    kind: str = Field(sa_column=Column(String(8), nullable=False))
    amount: int = Field(sa_column=Column(BigInteger(), nullable=False))
    reason: str = Field(sa_column=Column(Text(), nullable=False))
    state: str = Field(
        default=AdjustmentState.proposed.value, sa_column=Column(String(10), nullable=False)
    )
    requested_by: str = Field(sa_column=Column(String(64), nullable=False))
    requested_at: datetime = Field(default_factory=now, sa_column=utc_column())
    decided_by: str | None = Field(default=None, sa_column=Column(String(64)))
    decided_at: datetime | None = Field(default=None, sa_column=utc_column(True))


class BudgetAlert(SQLModel, table=True):
    """A contract's spend crossed 80 % or 100 % of its budget; recorded once per threshold."""

    __tablename__ = "budget_alert"
    __table_args__ = (UniqueConstraint("contract_id", "threshold_pct"),)

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    contract_id: uuid.UUID = Field(sa_column=_fk("contract.id"))
    threshold_pct: int = Field(sa_column=Column(Integer(), nullable=False))
    spent_amount: int = Field(sa_column=Column(BigInteger(), nullable=False))
    budget_amount: int = Field(sa_column=Column(BigInteger(), nullable=False))
    at: datetime = Field(default_factory=now, sa_column=utc_column())
