"""Request and response models of the inventory domain. Credentials go in, never out."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from broker.core.schemas import Input
from broker.tenancy.schemas import Code, NameEn, NameZh

ProviderKindIn = Literal["openstack", "vmware", "libvirt", "simulator"]
ProviderName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", min_length=1, max_length=100)
]
Region = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
Endpoint = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]
CreditCode = Annotated[str, StringConstraints(pattern=r"^[0-9A-HJ-NPQRTUWXY]{18}$")]
Contact = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
SecretValue = Annotated[str, StringConstraints(min_length=1, max_length=4096)]
CredentialKey = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
# an overcommit ratio: 1.00 (none) to 64.00; decimals so that capacity arithmetic stays exact
Ratio = Annotated[Decimal, Field(ge=Decimal(1), le=Decimal(64), max_digits=6, decimal_places=2)]
RatioKey = Annotated[str, StringConstraints(pattern=r"^[a-z_]+(\.[a-z0-9_]+)?$", max_length=32)]

_URL_KINDS = {"openstack", "vmware"}


def check_endpoint(kind: str, endpoint: str) -> None:
    """Raise ValueError unless `endpoint` has the shape the kind's driver connects to."""
    if kind in _URL_KINDS:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"a {kind} endpoint is an http(s) URL")
        if parts.username or parts.password:
            # the endpoint is shown and logged; secrets belong in credentials, which are not
            raise ValueError("put the user and password in credentials, not in the URL")
    elif kind == "libvirt":
        uris = endpoint.replace(",", " ").split()
        if not uris or not all(":/" in u for u in uris):
            raise ValueError("a libvirt endpoint is one or more libvirt URIs")
    elif kind == "simulator" and not endpoint.startswith("sim://"):
        raise ValueError("a simulator endpoint looks like sim://<name>")


class ServiceCompanyCreate(Input):
    code: Code
    name_zh: NameZh
    name_en: NameEn | None = None
    credit_code: CreditCode | None = None
    contact: Contact | None = None


class ServiceCompanyUpdate(Input):
    not_null = frozenset({"name_zh"})

    name_zh: NameZh | None = None
    name_en: NameEn | None = None
    credit_code: CreditCode | None = None
    contact: Contact | None = None


class ServiceCompanyPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    code: str
    name_zh: str
    name_en: str | None
    credit_code: str | None
    contact: str | None
    created_at: datetime
    updated_at: datetime


class ProviderCreate(Input):
    kind: ProviderKindIn
    name: ProviderName
    region: Region | None = None
    endpoint: Endpoint
    credentials: dict[CredentialKey, SecretValue] = Field(default_factory=dict, max_length=16)
    service_company_id: uuid.UUID | None = None
    overcommit: dict[RatioKey, Ratio] = Field(default_factory=dict, max_length=16)
    options: dict[CredentialKey, Any] = Field(default_factory=dict, max_length=32)
    enabled: bool = True
    sync_interval_s: int = Field(default=600, ge=60, le=86400)
    adopt_by_owner: bool = True


class ProviderUpdate(Input):
    not_null = frozenset(
        {"name", "endpoint", "credentials", "overcommit", "options", "enabled", "sync_interval_s"}
    )

    name: ProviderName | None = None
    region: Region | None = None
    endpoint: Endpoint | None = None
    # replaces every stored credential when given; leave out to keep them
    credentials: dict[CredentialKey, SecretValue] | None = Field(default=None, max_length=16)
    service_company_id: uuid.UUID | None = None
    overcommit: dict[RatioKey, Ratio] | None = Field(default=None, max_length=16)
    options: dict[CredentialKey, Any] | None = Field(default=None, max_length=32)
    enabled: bool | None = None
    sync_interval_s: int | None = Field(default=None, ge=60, le=86400)
    adopt_by_owner: bool | None = None


class ProviderPublic(BaseModel):
    """What anyone may see of a provider: which credential fields are set, never their values."""

    id: uuid.UUID
    kind: str
    name: str
    region: str | None
    endpoint: str
    credential_fields: list[str]
    service_company_id: uuid.UUID | None
    overcommit: dict[str, Decimal]
    options: dict[str, Any]
    enabled: bool
    sync_interval_s: int
    adopt_by_owner: bool
    last_sync_at: datetime | None
    last_sync_status: str | None
    last_sync_error: str | None
    created_at: datetime
    updated_at: datetime


class ConnectionCheck(BaseModel):
    ok: bool
    latency_ms: int
    error: str | None = None
    error_type: str | None = None


class SyncRunPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    provider_id: uuid.UUID
    trigger: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    duration_ms: int | None
    counts: dict[str, int]
    error: str | None


class HostPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    provider_id: uuid.UUID
    external_id: str
    name: str
    cluster: str | None
    state: str
    capacity: dict[str, int]
    allocated: dict[str, int]
    overcommit: dict[str, Decimal]
    last_seen: datetime
    gone_at: datetime | None


class StoragePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    provider_id: uuid.UUID
    external_id: str
    name: str
    tier: str
    capacity_gb: int
    free_gb: int
    last_seen: datetime
    gone_at: datetime | None


class NetworkPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    provider_id: uuid.UUID
    external_id: str
    name: str
    cidr: str | None
    last_seen: datetime
    gone_at: datetime | None


class ServerPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    provider_id: uuid.UUID
    external_id: str
    name: str
    vcpu: int
    memory_mb: int
    disks: list[dict[str, Any]]
    ips: list[str]
    public_ips: list[str]
    power_state: str
    host: str | None
    owner_tag: str | None
    tenant_id: uuid.UUID | None
    managed: bool
    booked: dict[str, int]
    drift: dict[str, Any] | None
    drift_at: datetime | None
    adopt_error: str | None
    created_at: datetime | None
    first_seen: datetime
    last_seen: datetime
    gone_at: datetime | None
    adopted_at: datetime | None


class Adopt(Input):
    tenant_id: uuid.UUID
    # count it even if it does not fit: the server exists whatever the quota says
    force: bool = False
    reason: Annotated[str, StringConstraints(strip_whitespace=True, max_length=1000)] | None = None

    @field_validator("reason")
    @classmethod
    def _reason_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("must not be blank")
        return value


class CapacityLine(BaseModel):
    resource_class: str
    physical: int
    allocated: int
    # physical × overcommit, rounded down: what may be handed out
    effective: int
    overcommit: Decimal


class ProviderCapacity(BaseModel):
    provider_id: uuid.UUID | None
    provider_name: str | None
    hosts: int
    lines: list[CapacityLine]
