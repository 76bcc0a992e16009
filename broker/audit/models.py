"""The append-only, hash-chained audit log."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, String, Uuid
from sqlmodel import Field, SQLModel

from broker.core.db import UTCDateTime

GENESIS_HASH = "0" * 64


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_event"
    __table_args__ = (
        Index("ix_audit_event_occurred_at", "occurred_at"),
        Index("ix_audit_event_tenant_path_seq", "tenant_path", "seq"),
        Index("ix_audit_event_actor_id_seq", "actor_id", "seq"),
        Index("ix_audit_event_action_seq", "action", "seq"),
    )

    # position in the chain: contiguous, assigned under the chain-head lock at commit time
    seq: int = Field(sa_column=Column(BigInteger(), primary_key=True, autoincrement=False))
    occurred_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    actor_id: uuid.UUID | None = Field(default=None, sa_column=Column(Uuid(), nullable=True))
    actor_name: str = Field(sa_column=Column(String(64), nullable=False))
    # no foreign keys: the trail outlives what it describes
    tenant_id: uuid.UUID | None = Field(default=None, sa_column=Column(Uuid(), nullable=True))
    tenant_path: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    action: str = Field(sa_column=Column(String(64), nullable=False))
    target_type: str = Field(sa_column=Column(String(64), nullable=False))
    target_id: str = Field(sa_column=Column(String(64), nullable=False))
    before: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON(), nullable=True))
    after: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON(), nullable=True))
    request_id: str = Field(sa_column=Column(String(64), nullable=False))
    client_ip: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    prev_hash: str = Field(sa_column=Column(String(64), nullable=False))
    hash: str = Field(sa_column=Column(String(64), nullable=False, unique=True))


class AuditChainHead(SQLModel, table=True):
    """One row: the last link. Locking it serialises appends; it also exposes a deleted tail."""

    __tablename__ = "audit_chain_head"

    id: int = Field(default=1, primary_key=True)
    last_seq: int = Field(default=0, sa_column=Column(BigInteger(), nullable=False))
    last_hash: str = Field(default=GENESIS_HASH, sa_column=Column(String(64), nullable=False))
