"""The scheduler's lease: on SQLite, which has no advisory locks, the leader is whoever holds
an unexpired row here (PostgreSQL uses pg_try_advisory_lock instead)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, String
from sqlmodel import Field, SQLModel

from broker.core.db import utc_column


class SchedulerLease(SQLModel, table=True):
    __tablename__ = "scheduler_lease"

    name: str = Field(sa_column=Column(String(64), primary_key=True))
    holder: str = Field(sa_column=Column(String(128), nullable=False))
    acquired_at: datetime = Field(sa_column=utc_column())
    expires_at: datetime = Field(sa_column=utc_column())
