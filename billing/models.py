"""Tables of the billing domain. For now: the lifecycle events that metering reads.

Every state change of a managed server (created, resized, powered off or on, a disk or public IP
added or taken away, deleted, adopted, gone) is one row here, written in the same transaction as
the change itself, by whichever part of govbroker saw it (provisioning, sync, adoption). The row
carries the server's booked sizes and power state *after* the change, so metering can cut usage
intervals from consecutive events of one server without asking anything else.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, ForeignKey, Index, String, Uuid
from sqlmodel import Field, SQLModel

from broker.core.clock import now
from broker.core.db import utc_column
from broker.core.ids import new_id


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


class LifecycleEvent(SQLModel, table=True):
    __tablename__ = "lifecycle_event"
    __table_args__ = (
        Index("ix_lifecycle_event_server_id_at", "server_id", "at"),
        Index("ix_lifecycle_event_at", "at"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    server_id: uuid.UUID = Field(sa_column=Column(Uuid(), ForeignKey("server.id"), nullable=False))
    tenant_id: uuid.UUID = Field(sa_column=Column(Uuid(), ForeignKey("tenant.id"), nullable=False))
    agency_id: uuid.UUID = Field(sa_column=Column(Uuid(), ForeignKey("tenant.id"), nullable=False))
    provider_id: uuid.UUID = Field(
        sa_column=Column(Uuid(), ForeignKey("provider.id"), nullable=False)
    )
    service_company_id: uuid.UUID | None = Field(
        default=None, sa_column=Column(Uuid(), ForeignKey("service_company.id"), nullable=True)
    )
    # the contract the server is billed under; bound by the billing domain once contracts exist
    contract_id: uuid.UUID | None = Field(default=None, sa_column=Column(Uuid(), nullable=True))
    kind: str = Field(sa_column=Column(String(24), nullable=False))
    power_state: str = Field(sa_column=Column(String(16), nullable=False))
    # what the server holds after the event ({resource class: amount}); empty once deleted
    sizes: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON(), nullable=False))
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON(), nullable=False))
    job_id: uuid.UUID | None = Field(default=None, sa_column=Column(Uuid(), nullable=True))
    actor: str = Field(sa_column=Column(String(64), nullable=False))
    at: datetime = Field(default_factory=now, sa_column=utc_column())
