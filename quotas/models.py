"""Tables of the quota domain.

`quota` rows hold, per tenant and resource class, the limit with its validity window and two
counters of the tenant's whole subtree: committed and reserved. The counters are kept in step with
the `allocation` ledger in the same transaction (and checked against an independent recount by the
tests); they let a reservation check its limits by reading a few locked rows instead of summing
the ledger.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    UniqueConstraint,
    Uuid,
)
from sqlmodel import Field, SQLModel

from broker.core.clock import now
from broker.core.db import utc_column
from broker.core.ids import new_id


def _tenant_fk(nullable: bool = False, index: bool = False) -> Any:
    return Column(Uuid(), ForeignKey("tenant.id"), nullable=nullable, index=index)


class ResourceClass(SQLModel, table=True):
    """What can be limited: configured rows, not constants in the code."""

    __tablename__ = "resource_class"

    code: str = Field(sa_column=Column(String(32), primary_key=True))
    unit: str = Field(sa_column=Column(String(16), nullable=False))
    name_zh: str = Field(sa_column=Column(String(64), nullable=False))
    name_en: str = Field(sa_column=Column(String(64), nullable=False))
    sort_order: int = Field(default=0, sa_column=Column(Integer(), nullable=False))
    # the largest limit or delta accepted, to refuse typos such as an extra six zeros
    max_amount: int = Field(sa_column=Column(BigInteger(), nullable=False))


class Quota(SQLModel, table=True):
    __tablename__ = "quota"
    __table_args__ = (
        UniqueConstraint("tenant_id", "resource_class"),
        CheckConstraint("hard_limit IS NULL OR hard_limit >= 0", name="limit_not_negative"),
        CheckConstraint("committed >= 0 AND reserved >= 0", name="usage_not_negative"),
        CheckConstraint("valid_until IS NULL OR valid_until > valid_from", name="window"),
        Index("ix_quota_depth_resource_class", "depth", "resource_class"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    tenant_id: uuid.UUID = Field(sa_column=_tenant_fk())
    resource_class: str = Field(
        sa_column=Column(String(32), ForeignKey("resource_class.code"), nullable=False)
    )
    # 0 center, 1 agency, 2 system: locks are always taken in (depth, class) order
    depth: int = Field(sa_column=Column(SmallInteger(), nullable=False))
    # NULL: no limit of its own at this level (a system sharing its agency's pool)
    hard_limit: int | None = Field(default=None, sa_column=Column(BigInteger(), nullable=True))
    valid_from: datetime = Field(default_factory=now, sa_column=utc_column())
    valid_until: datetime | None = Field(default=None, sa_column=utc_column(True))
    committed: int = Field(default=0, sa_column=Column(BigInteger(), nullable=False))
    reserved: int = Field(default=0, sa_column=Column(BigInteger(), nullable=False))
    created_at: datetime = Field(default_factory=now, sa_column=utc_column())
    updated_at: datetime = Field(default_factory=now, sa_column=utc_column())


class Reservation(SQLModel, table=True):
    """One reserve() call: idempotent on `ref`; its per-class amounts are allocation rows."""

    __tablename__ = "reservation"
    __table_args__ = (
        CheckConstraint("state IN ('reserved','committed','released')", name="state"),
        Index("ix_reservation_state_expires_at", "state", "expires_at"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    ref: str = Field(sa_column=Column(String(128), nullable=False, unique=True))
    tenant_id: uuid.UUID = Field(sa_column=_tenant_fk(index=True))
    agency_id: uuid.UUID = Field(sa_column=_tenant_fk())
    owner_ref: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))
    state: str = Field(default="reserved", sa_column=Column(String(16), nullable=False))
    expires_at: datetime = Field(sa_column=utc_column())
    created_at: datetime = Field(default_factory=now, sa_column=utc_column())
    settled_at: datetime | None = Field(default=None, sa_column=utc_column(True))
    created_by: str = Field(sa_column=Column(String(64), nullable=False))


class Allocation(SQLModel, table=True):
    """A ledger row: only its state changes (reserved → committed → released); history stays."""

    __tablename__ = "allocation"
    __table_args__ = (
        CheckConstraint("state IN ('reserved','committed','released')", name="state"),
        Index(
            "ix_allocation_agency_id_state_resource_class", "agency_id", "state", "resource_class"
        ),
        Index("ix_allocation_owner_ref_state", "owner_ref", "state"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    reservation_id: uuid.UUID = Field(
        sa_column=Column(Uuid(), ForeignKey("reservation.id"), nullable=False, index=True)
    )
    tenant_id: uuid.UUID = Field(sa_column=_tenant_fk())
    agency_id: uuid.UUID = Field(sa_column=_tenant_fk())
    resource_class: str = Field(
        sa_column=Column(String(32), ForeignKey("resource_class.code"), nullable=False)
    )
    # signed: a shrink is a negative allocation that lowers committed usage when committed
    amount: int = Field(sa_column=Column(BigInteger(), nullable=False))
    state: str = Field(default="reserved", sa_column=Column(String(16), nullable=False))
    owner_ref: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))
    expires_at: datetime = Field(sa_column=utc_column())
    created_at: datetime = Field(default_factory=now, sa_column=utc_column())
    committed_at: datetime | None = Field(default=None, sa_column=utc_column(True))
    released_at: datetime | None = Field(default=None, sa_column=utc_column(True))


class QuotaNotice(SQLModel, table=True):
    """An expiry warning waiting for the alerts issue to deliver it."""

    __tablename__ = "quota_notice"
    __table_args__ = (UniqueConstraint("quota_id", "kind", "valid_until"),)

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    quota_id: uuid.UUID = Field(
        sa_column=Column(Uuid(), ForeignKey("quota.id", ondelete="CASCADE"), nullable=False)
    )
    tenant_id: uuid.UUID = Field(sa_column=_tenant_fk(index=True))
    resource_class: str = Field(sa_column=Column(String(32), nullable=False))
    kind: str = Field(sa_column=Column(String(16), nullable=False))
    valid_until: datetime = Field(sa_column=utc_column())
    created_at: datetime = Field(default_factory=now, sa_column=utc_column())
    delivered_at: datetime | None = Field(default=None, sa_column=utc_column(True))


class QuotaRequest(SQLModel, table=True):
    __tablename__ = "quota_request"
    __table_args__ = (
        CheckConstraint(
            "state IN ('pending','approved','partially_approved','rejected','withdrawn')",
            name="state",
        ),
        Index("ix_quota_request_state_created_at", "state", "created_at"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    tenant_id: uuid.UUID = Field(sa_column=_tenant_fk(index=True))
    state: str = Field(default="pending", sa_column=Column(String(24), nullable=False))
    # requested changes {class: signed delta}; approved {class: signed delta} once decided
    requested: dict[str, int] = Field(sa_column=Column(JSON(), nullable=False))
    approved: dict[str, int] | None = Field(default=None, sa_column=Column(JSON(), nullable=True))
    justification: str = Field(sa_column=Column(String(2000), nullable=False))
    decision_reason: str | None = Field(default=None, sa_column=Column(String(2000), nullable=True))
    requested_by: uuid.UUID | None = Field(default=None, sa_column=Column(Uuid(), nullable=True))
    decided_by: uuid.UUID | None = Field(default=None, sa_column=Column(Uuid(), nullable=True))
    created_at: datetime = Field(default_factory=now, sa_column=utc_column())
    decided_at: datetime | None = Field(default=None, sa_column=utc_column(True))
    attachment_name: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    attachment_type: str | None = Field(default=None, sa_column=Column(String(100), nullable=True))
    attachment_size: int | None = Field(default=None, sa_column=Column(Integer(), nullable=True))
    attachment_sha256: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))


class QuotaRequestAttachment(SQLModel, table=True):
    """The attachment's bytes, apart from the request so that listing requests never loads them."""

    __tablename__ = "quota_request_attachment"

    request_id: uuid.UUID = Field(
        sa_column=Column(
            Uuid(), ForeignKey("quota_request.id", ondelete="CASCADE"), primary_key=True
        )
    )
    content: bytes = Field(sa_column=Column(LargeBinary(), nullable=False))
