"""Tables of the inventory domain: providers, the companies behind them, and what each reports.

Inventory rows are a cache of the providers' truth, refreshed by sync: they are never deleted when
an object disappears, only marked gone (`gone_at`), so history and billing keep their references.
A server's `tenant_id` is its owner inside govbroker; NULL means unmanaged (nobody's quota counts
it). `booked` is what the quota ledger holds for it; `drift` records the difference between the
booked size or owner and what the provider reports.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlmodel import Field, SQLModel

# the service company (服务商) belongs to billing, with its contracts; a provider names its owner
from billing.models import ServiceCompany  # noqa: F401
from broker.core.clock import now
from broker.core.db import utc_column
from broker.core.ids import new_id


class ProviderKind(StrEnum):
    openstack = "openstack"
    vmware = "vmware"
    libvirt = "libvirt"
    simulator = "simulator"


class SyncStatus(StrEnum):
    running = "running"
    ok = "ok"
    failed = "failed"


def _provider_fk() -> Any:
    return Column(Uuid(), ForeignKey("provider.id"), nullable=False)


class Provider(SQLModel, table=True):
    __tablename__ = "provider"
    __table_args__ = (
        CheckConstraint("kind IN ('openstack','vmware','libvirt','simulator')", name="kind"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    kind: str = Field(sa_column=Column(String(16), nullable=False))
    name: str = Field(sa_column=Column(String(100), nullable=False, unique=True))
    region: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    endpoint: str = Field(sa_column=Column(String(2000), nullable=False))
    # Fernet ciphertext of a JSON object; the plaintext never leaves broker.inventory.providers
    credentials_enc: str = Field(sa_column=Column(Text(), nullable=False))
    service_company_id: uuid.UUID | None = Field(
        default=None,
        sa_column=Column(Uuid(), ForeignKey("service_company.id"), nullable=True, index=True),
    )
    # {resource class: ratio as a decimal string}: how far allocation may exceed physical capacity
    overcommit: dict[str, str] = Field(
        default_factory=dict, sa_column=Column(JSON(), nullable=False)
    )
    options: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON(), nullable=False))
    enabled: bool = Field(default=True, sa_column=Column(Boolean(), nullable=False))
    sync_interval_s: int = Field(default=600, sa_column=Column(Integer(), nullable=False))
    # adopt servers whose provider-side owner maps to a tenant, when they fit its quota
    adopt_by_owner: bool = Field(default=True, sa_column=Column(Boolean(), nullable=False))
    # WaitForUpdatesEx version (VMware) or similar cursor for incremental sync
    sync_cursor: str | None = Field(default=None, sa_column=Column(Text(), nullable=True))
    last_sync_at: datetime | None = Field(default=None, sa_column=utc_column(True))
    last_sync_status: str | None = Field(default=None, sa_column=Column(String(16), nullable=True))
    last_sync_error: str | None = Field(default=None, sa_column=Column(Text(), nullable=True))
    created_at: datetime = Field(default_factory=now, sa_column=utc_column())
    updated_at: datetime = Field(default_factory=now, sa_column=utc_column())


class SyncRun(SQLModel, table=True):
    __tablename__ = "sync_run"
    __table_args__ = (
        CheckConstraint("status IN ('running','ok','failed')", name="status"),
        Index("ix_sync_run_provider_id_started_at", "provider_id", "started_at"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    provider_id: uuid.UUID = Field(sa_column=_provider_fk())
    trigger: str = Field(sa_column=Column(String(16), nullable=False))
    status: str = Field(
        default=SyncStatus.running.value, sa_column=Column(String(16), nullable=False)
    )
    started_at: datetime = Field(default_factory=now, sa_column=utc_column())
    finished_at: datetime | None = Field(default=None, sa_column=utc_column(True))
    duration_ms: int | None = Field(default=None, sa_column=Column(Integer(), nullable=True))
    counts: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON(), nullable=False))
    error: str | None = Field(default=None, sa_column=Column(Text(), nullable=True))


class InventoryHost(SQLModel, table=True):
    __tablename__ = "inventory_host"
    __table_args__ = (UniqueConstraint("provider_id", "external_id"),)

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    provider_id: uuid.UUID = Field(sa_column=_provider_fk())
    external_id: str = Field(sa_column=Column(String(255), nullable=False))
    name: str = Field(sa_column=Column(String(255), nullable=False))
    cluster: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    state: str = Field(default="up", sa_column=Column(String(32), nullable=False))
    capacity: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON(), nullable=False))
    allocated: dict[str, int] = Field(
        default_factory=dict, sa_column=Column(JSON(), nullable=False)
    )
    # ratios the provider itself reports (decimal strings); the provider row's setting wins
    overcommit: dict[str, str] = Field(
        default_factory=dict, sa_column=Column(JSON(), nullable=False)
    )
    last_seen: datetime = Field(default_factory=now, sa_column=utc_column())
    gone_at: datetime | None = Field(default=None, sa_column=utc_column(True))


class InventoryStorage(SQLModel, table=True):
    __tablename__ = "inventory_storage"
    __table_args__ = (UniqueConstraint("provider_id", "external_id"),)

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    provider_id: uuid.UUID = Field(sa_column=_provider_fk())
    external_id: str = Field(sa_column=Column(String(255), nullable=False))
    name: str = Field(sa_column=Column(String(255), nullable=False))
    tier: str = Field(sa_column=Column(String(32), nullable=False))
    capacity_gb: int = Field(sa_column=Column(BigInteger(), nullable=False))
    free_gb: int = Field(sa_column=Column(BigInteger(), nullable=False))
    last_seen: datetime = Field(default_factory=now, sa_column=utc_column())
    gone_at: datetime | None = Field(default=None, sa_column=utc_column(True))


class InventoryNetwork(SQLModel, table=True):
    __tablename__ = "inventory_network"
    __table_args__ = (UniqueConstraint("provider_id", "external_id"),)

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    provider_id: uuid.UUID = Field(sa_column=_provider_fk())
    external_id: str = Field(sa_column=Column(String(255), nullable=False))
    name: str = Field(sa_column=Column(String(255), nullable=False))
    cidr: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    last_seen: datetime = Field(default_factory=now, sa_column=utc_column())
    gone_at: datetime | None = Field(default=None, sa_column=utc_column(True))


class Server(SQLModel, table=True):
    __tablename__ = "server"
    __table_args__ = (
        UniqueConstraint("provider_id", "external_id"),
        Index("ix_server_tenant_id_gone_at", "tenant_id", "gone_at"),
        Index("ix_server_provider_id_gone_at", "provider_id", "gone_at"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    provider_id: uuid.UUID = Field(sa_column=_provider_fk())
    external_id: str = Field(sa_column=Column(String(255), nullable=False))
    name: str = Field(sa_column=Column(String(255), nullable=False))
    vcpu: int = Field(sa_column=Column(Integer(), nullable=False))
    memory_mb: int = Field(sa_column=Column(BigInteger(), nullable=False))
    # [{"size_gb": int, "tier": str, "external_id": str | None}], root disk first
    disks: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON(), nullable=False)
    )
    ips: list[str] = Field(default_factory=list, sa_column=Column(JSON(), nullable=False))
    public_ips: list[str] = Field(default_factory=list, sa_column=Column(JSON(), nullable=False))
    power_state: str = Field(sa_column=Column(String(16), nullable=False))
    host: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    # the owner as the provider reports it (tag, folder, project, metadata), mapped or not
    owner_tag: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    request_tag: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    tenant_id: uuid.UUID | None = Field(
        default=None, sa_column=Column(Uuid(), ForeignKey("tenant.id"), nullable=True)
    )
    # what the ledger holds for this server ({resource class: amount}); empty when unmanaged
    booked: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON(), nullable=False))
    # the contract (分签) the server is billed under; null: unmanaged, or no contract yet
    contract_id: uuid.UUID | None = Field(
        default=None, sa_column=Column(Uuid(), ForeignKey("contract.id"), nullable=True)
    )
    # {"size": {"before": {...}, "after": {...}}, "owner": {"before": .., "after": ..}} or NULL
    drift: dict[str, Any] | None = Field(
        default=None, sa_column=Column(JSON(none_as_null=True), nullable=True)
    )
    drift_at: datetime | None = Field(default=None, sa_column=utc_column(True))
    # why sync could not adopt a server whose provider-side owner names a tenant
    adopt_error: str | None = Field(default=None, sa_column=Column(String(1000), nullable=True))
    created_at: datetime | None = Field(default=None, sa_column=utc_column(True))
    first_seen: datetime = Field(default_factory=now, sa_column=utc_column())
    last_seen: datetime = Field(default_factory=now, sa_column=utc_column())
    gone_at: datetime | None = Field(default=None, sa_column=utc_column(True))
    adopted_at: datetime | None = Field(default=None, sa_column=utc_column(True))
