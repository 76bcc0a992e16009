"""Tables of provisioning: the catalog, per-agency policy, jobs and idempotency keys.

A job is the unit of work between a request and the provider: it holds the validated request,
the placement and why it was chosen, the quota reservation, and how it ended. Its `request_tag`
is written onto the server at the provider, so after a crash the reconciler can find what a job
did by asking the provider, not by trusting a half-finished transaction.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
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

from broker.core.clock import now
from broker.core.db import utc_column
from broker.core.ids import new_id


class CatalogKind(StrEnum):
    flavor = "flavor"
    size = "size"  # bounds for custom sizes
    image = "image"
    network = "network"
    tier = "tier"


class JobKind(StrEnum):
    create = "create"
    start = "start"
    stop = "stop"
    reboot = "reboot"
    resize = "resize"
    attach_disk = "attach_disk"
    detach_disk = "detach_disk"
    add_public_ip = "add_public_ip"
    release_public_ip = "release_public_ip"
    delete = "delete"


class JobState(StrEnum):
    pending_approval = "pending_approval"
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    rejected = "rejected"
    expired = "expired"


ACTIVE_STATES = (JobState.pending_approval, JobState.queued, JobState.running)
FINAL_STATES = (JobState.succeeded, JobState.failed, JobState.rejected, JobState.expired)


def _fk(table: str, *, nullable: bool = False) -> Any:
    return Column(Uuid(), ForeignKey(f"{table}.id"), nullable=nullable)


class CatalogItem(SQLModel, table=True):
    """One offering of one provider, curated by the center: what agencies may ask for."""

    __tablename__ = "catalog_item"
    __table_args__ = (
        UniqueConstraint("provider_id", "kind", "code"),
        CheckConstraint("kind IN ('flavor','size','image','network','tier')", name="kind"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    provider_id: uuid.UUID = Field(sa_column=_fk("provider"))
    kind: str = Field(sa_column=Column(String(16), nullable=False))
    # what requests name it by (a flavor's or image's name, a tier); unique per provider and kind
    code: str = Field(sa_column=Column(String(100), nullable=False))
    external_id: str = Field(sa_column=Column(String(255), nullable=False))
    name_zh: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    # flavor {vcpu, memory_mb, disk_gb}; size {min_vcpu, max_vcpu, min_memory_mb, max_memory_mb};
    # image {os, min_disk_gb}; network {cidr}; tier {min_gb, max_gb, root}
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON(), nullable=False))
    # agencies it is offered to; empty: every agency
    agency_ids: list[str] = Field(default_factory=list, sa_column=Column(JSON(), nullable=False))
    enabled: bool = Field(default=True, sa_column=Column(Boolean(), nullable=False))
    created_at: datetime = Field(default_factory=now, sa_column=utc_column())
    updated_at: datetime = Field(default_factory=now, sa_column=utc_column())


class AgencyPolicy(SQLModel, table=True):
    """How an agency provisions: its service company (统采分签: the company its contract is
    with), default provider, and when a request needs an agency admin's approval."""

    __tablename__ = "agency_policy"

    agency_id: uuid.UUID = Field(
        sa_column=Column(Uuid(), ForeignKey("tenant.id"), primary_key=True)
    )
    service_company_id: uuid.UUID | None = Field(
        default=None, sa_column=_fk("service_company", nullable=True)
    )
    provider_id: uuid.UUID | None = Field(default=None, sa_column=_fk("provider", nullable=True))
    # a request above either size waits for approval; NULL: never
    approval_vcpu: int | None = Field(default=None, sa_column=Column(Integer(), nullable=True))
    approval_memory_mb: int | None = Field(default=None, sa_column=Column(Integer(), nullable=True))
    approval_hours: int = Field(default=72, sa_column=Column(Integer(), nullable=False))
    updated_at: datetime = Field(default_factory=now, sa_column=utc_column())
    updated_by: str = Field(default="", sa_column=Column(String(64), nullable=False))


class Job(SQLModel, table=True):
    __tablename__ = "job"
    __table_args__ = (
        Index("ix_job_tenant_id_created_at", "tenant_id", "created_at"),
        Index("ix_job_state_heartbeat_at", "state", "heartbeat_at"),
        Index("ix_job_server_id_state", "server_id", "state"),
        CheckConstraint(
            "state IN ('pending_approval','queued','running','succeeded','failed','rejected',"
            "'expired')",
            name="state",
        ),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    kind: str = Field(sa_column=Column(String(24), nullable=False))
    state: str = Field(sa_column=Column(String(24), nullable=False))
    tenant_id: uuid.UUID = Field(sa_column=_fk("tenant"))
    agency_id: uuid.UUID = Field(sa_column=_fk("tenant"))
    # decided when the job is made, so the ledger can name the owner before the row exists
    server_id: uuid.UUID = Field(sa_column=Column(Uuid(), nullable=False))
    provider_id: uuid.UUID = Field(sa_column=_fk("provider"))
    request_tag: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON(), nullable=False))
    placement: dict[str, Any] | None = Field(
        default=None, sa_column=Column(JSON(none_as_null=True), nullable=True)
    )
    # what to hold now (reserved up front) and what to give back after success (shrinks)
    grow: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON(), nullable=False))
    shrink: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON(), nullable=False))
    reservation_id: uuid.UUID | None = Field(default=None, sa_column=Column(Uuid(), nullable=True))
    attempts: int = Field(default=0, sa_column=Column(Integer(), nullable=False))
    # who runs it now: a claim taken under the row lock, checked again when finishing
    claim: uuid.UUID | None = Field(default=None, sa_column=Column(Uuid(), nullable=True))
    error: str | None = Field(default=None, sa_column=Column(Text(), nullable=True))
    error_type: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    result: dict[str, Any] | None = Field(
        default=None, sa_column=Column(JSON(none_as_null=True), nullable=True)
    )
    log: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON(), nullable=False)
    )
    created_by: str = Field(sa_column=Column(String(64), nullable=False))
    decided_by: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    deadline: datetime | None = Field(default=None, sa_column=utc_column(True))
    created_at: datetime = Field(default_factory=now, sa_column=utc_column())
    started_at: datetime | None = Field(default=None, sa_column=utc_column(True))
    heartbeat_at: datetime | None = Field(default=None, sa_column=utc_column(True))
    finished_at: datetime | None = Field(default=None, sa_column=utc_column(True))


class IdempotencyKey(SQLModel, table=True):
    """A client's Idempotency-Key: the same key and body get the first answer again."""

    __tablename__ = "idempotency_key"
    __table_args__ = (
        UniqueConstraint("principal", "key"),
        Index("ix_idempotency_key_expires_at", "expires_at"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    principal: str = Field(sa_column=Column(String(64), nullable=False))
    key: str = Field(sa_column=Column(String(255), nullable=False))
    request_hash: str = Field(sa_column=Column(String(64), nullable=False))
    job_id: uuid.UUID = Field(sa_column=_fk("job"))
    response: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON(), nullable=False))
    created_at: datetime = Field(default_factory=now, sa_column=utc_column())
    expires_at: datetime = Field(sa_column=utc_column())
