"""Tables of the tenancy domain: the tenant tree, users, role bindings and API tokens."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import CheckConstraint, Column, ForeignKey, Index, String, UniqueConstraint, Uuid
from sqlmodel import Field, SQLModel

from broker.core.clock import now
from broker.core.db import utc_column
from broker.core.ids import new_id


class TenantKind(StrEnum):
    center = "center"  # type: ignore[assignment]  # shadows str.center, harmlessly
    agency = "agency"
    system = "system"


class TenantStatus(StrEnum):
    active = "active"
    suspended = "suspended"
    archived = "archived"


class UserStatus(StrEnum):
    active = "active"
    disabled = "disabled"


class Tenant(SQLModel, table=True):
    __tablename__ = "tenant"
    __table_args__ = (
        CheckConstraint("kind IN ('center','agency','system')", name="kind"),
        CheckConstraint("status IN ('active','suspended','archived')", name="status"),
        CheckConstraint(
            "(kind = 'center' AND parent_id IS NULL) "
            "OR (kind <> 'center' AND parent_id IS NOT NULL)",
            name="root_has_no_parent",
        ),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    parent_id: uuid.UUID | None = Field(
        default=None, sa_column=Column(Uuid(), ForeignKey("tenant.id"), index=True, nullable=True)
    )
    kind: str = Field(sa_column=Column(String(16), nullable=False))
    code: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    name_zh: str = Field(sa_column=Column(String(200), nullable=False))
    name_en: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    status: str = Field(
        default=TenantStatus.active.value, sa_column=Column(String(16), nullable=False)
    )
    # "/<center id>/<agency id>/<system id>/" (hex ids): subtree = prefix match
    path: str = Field(sa_column=Column(String(200), nullable=False, unique=True))
    contact_name: str | None = Field(default=None, sa_column=Column(String(100), nullable=True))
    contact_email: str | None = Field(default=None, sa_column=Column(String(254), nullable=True))
    contact_phone: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
    description: str | None = Field(default=None, sa_column=Column(String(1000), nullable=True))
    created_at: datetime = Field(default_factory=now, sa_column=utc_column())
    updated_at: datetime = Field(default_factory=now, sa_column=utc_column())


class User(SQLModel, table=True):
    __tablename__ = "user_account"  # "user" is reserved in PostgreSQL
    __table_args__ = (CheckConstraint("status IN ('active','disabled')", name="status"),)

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    username: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    display_name: str = Field(sa_column=Column(String(100), nullable=False))
    email: str | None = Field(default=None, sa_column=Column(String(254), nullable=True))
    phone: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
    status: str = Field(
        default=UserStatus.active.value, sa_column=Column(String(16), nullable=False)
    )
    # the tenant the user belongs to; whoever administers that tenant administers the user
    tenant_id: uuid.UUID = Field(
        sa_column=Column(Uuid(), ForeignKey("tenant.id"), nullable=False, index=True)
    )
    password_hash: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    password_changed_at: datetime | None = Field(default=None, sa_column=utc_column(True))
    failed_logins: int = Field(default=0)
    locked_until: datetime | None = Field(default=None, sa_column=utc_column(True))
    last_login_at: datetime | None = Field(default=None, sa_column=utc_column(True))
    created_at: datetime = Field(default_factory=now, sa_column=utc_column())
    updated_at: datetime = Field(default_factory=now, sa_column=utc_column())


class RoleBinding(SQLModel, table=True):
    __tablename__ = "role_binding"
    __table_args__ = (
        UniqueConstraint("user_id", "role", "tenant_id"),
        CheckConstraint(
            "role IN ('center_admin','agency_admin','member','finance','auditor')", name="role"
        ),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    user_id: uuid.UUID = Field(
        sa_column=Column(
            Uuid(), ForeignKey("user_account.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    role: str = Field(sa_column=Column(String(32), nullable=False))
    tenant_id: uuid.UUID = Field(
        sa_column=Column(Uuid(), ForeignKey("tenant.id"), nullable=False, index=True)
    )
    created_at: datetime = Field(default_factory=now, sa_column=utc_column())


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_token"
    __table_args__ = (Index("ix_api_token_user_id_created_at", "user_id", "created_at"),)

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    user_id: uuid.UUID = Field(
        sa_column=Column(Uuid(), ForeignKey("user_account.id", ondelete="CASCADE"), nullable=False)
    )
    name: str = Field(sa_column=Column(String(100), nullable=False))
    # SHA-256 of the secret: the secret is 256 random bits, so a slow hash adds nothing
    token_hash: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    # the first characters, so a user can tell tokens apart; not enough to use one
    prefix: str = Field(sa_column=Column(String(16), nullable=False))
    created_at: datetime = Field(default_factory=now, sa_column=utc_column())
    expires_at: datetime = Field(sa_column=utc_column())
    last_used_at: datetime | None = Field(default=None, sa_column=utc_column(True))
    revoked_at: datetime | None = Field(default=None, sa_column=utc_column(True))
