"""Request and response models of the tenancy domain (never the tables themselves)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from broker.core.schemas import Input

Code = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", min_length=1, max_length=64),
]
Username = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]*$", min_length=3, max_length=64)
]
NameZh = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
NameEn = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
PersonName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
Email = Annotated[str, StringConstraints(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$", max_length=254)]
Phone = Annotated[str, StringConstraints(pattern=r"^\+?[0-9][0-9 ()-]{2,31}$", max_length=32)]
Description = Annotated[str, StringConstraints(max_length=1000)]
Password = Annotated[str, StringConstraints(min_length=1, max_length=256)]
TenantStatusIn = Literal["active", "suspended", "archived"]
RoleIn = Literal["center_admin", "agency_admin", "member", "finance", "auditor"]


class Output(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class TenantBase(Input):
    name_zh: NameZh
    name_en: NameEn | None = None
    contact_name: PersonName | None = None
    contact_email: Email | None = None
    contact_phone: Phone | None = None
    description: Description | None = None


class TenantCreate(TenantBase):
    parent_id: uuid.UUID
    kind: Literal["agency", "system"]
    code: Code


class TenantUpdate(Input):
    not_null = frozenset({"name_zh", "parent_id", "status"})

    name_zh: NameZh | None = None
    name_en: NameEn | None = None
    contact_name: PersonName | None = None
    contact_email: Email | None = None
    contact_phone: Phone | None = None
    description: Description | None = None
    parent_id: uuid.UUID | None = None
    status: TenantStatusIn | None = None


class TenantPublic(Output):
    id: uuid.UUID
    parent_id: uuid.UUID | None
    kind: str
    code: str
    name_zh: str
    name_en: str | None
    status: str
    contact_name: str | None
    contact_email: str | None
    contact_phone: str | None
    description: str | None
    created_at: datetime
    updated_at: datetime


class UserCreate(Input):
    username: Username
    display_name: PersonName
    email: Email | None = None
    phone: Phone | None = None
    tenant_id: uuid.UUID
    password: Password | None = None


class UserUpdate(Input):
    not_null = frozenset({"display_name", "status", "tenant_id"})

    display_name: PersonName | None = None
    email: Email | None = None
    phone: Phone | None = None
    status: Literal["active", "disabled"] | None = None
    tenant_id: uuid.UUID | None = None


class UserPublic(Output):
    id: uuid.UUID
    username: str
    display_name: str
    email: str | None
    phone: str | None
    status: str
    tenant_id: uuid.UUID
    locked_until: datetime | None
    last_login_at: datetime | None
    created_at: datetime
    updated_at: datetime


class PasswordSet(Input):
    password: Password


class PasswordChange(Input):
    current_password: Password
    new_password: Password


class RoleBindingCreate(Input):
    user_id: uuid.UUID
    role: RoleIn
    tenant_id: uuid.UUID


class RoleBindingPublic(Output):
    id: uuid.UUID
    user_id: uuid.UUID
    role: str
    tenant_id: uuid.UUID
    created_at: datetime


class TokenCreate(Input):
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
    expires_in_days: int = Field(default=90, ge=1, le=3650)


class TokenPublic(Output):
    id: uuid.UUID
    name: str
    prefix: str
    created_at: datetime
    expires_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(TokenPublic):
    token: str = Field(description="The secret; shown this once and never again")


class LoginRequest(Input):
    username: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    password: Password


class LoginResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105
    expires_at: datetime


class BindingView(BaseModel):
    id: uuid.UUID
    role: str
    tenant_id: uuid.UUID
    tenant_code: str
    tenant_name: str
    tenant_kind: str


class MePublic(BaseModel):
    user: UserPublic
    auth_method: str
    bindings: list[BindingView]
