"""Request and response models of provisioning: server requests, actions, jobs, the catalog."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from broker.core.schemas import Input

ServerName = Annotated[str, StringConstraints(min_length=1, max_length=255)]
ItemCode = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
TierCode = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,24}$")]
Vcpu = Annotated[int, Field(ge=1, le=1024)]
MemoryMb = Annotated[int, Field(ge=256, le=16 * 1024 * 1024)]
DiskGb = Annotated[int, Field(ge=1, le=64 * 1024)]
Mbps = Annotated[int, Field(ge=1, le=100_000)]


class DiskRequest(Input):
    size_gb: DiskGb
    tier: TierCode


class ServerCreate(Input):
    """A flavor, or a custom size (vcpu and memory_mb) within the bounds the center offers."""

    name: ServerName
    system_id: uuid.UUID
    image: ItemCode
    flavor: ItemCode | None = None
    vcpu: Vcpu | None = None
    memory_mb: MemoryMb | None = None
    network: ItemCode | None = None
    disks: list[DiskRequest] = Field(default_factory=list, max_length=16)
    public_ip: bool = False
    bandwidth_mbps: Mbps | None = None
    provider: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = None
    region: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    # the agency's contract (分签) to bill the server under; by default its active contract with
    # the service company of the provider the server lands on
    contract_id: uuid.UUID | None = None


ActionName = Literal[
    "start",
    "stop",
    "reboot",
    "resize",
    "attach_disk",
    "detach_disk",
    "add_public_ip",
    "release_public_ip",
]


class ServerAction(Input):
    """One lifecycle action; each action reads only the parameters it needs (see `action`)."""

    action: ActionName
    flavor: ItemCode | None = None
    vcpu: Vcpu | None = None
    memory_mb: MemoryMb | None = None
    size_gb: DiskGb | None = None
    tier: TierCode | None = None
    disk_id: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = None
    bandwidth_mbps: Mbps | None = None
    ip: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None


class JobDecision(Input):
    reason: Annotated[str, StringConstraints(strip_whitespace=True, max_length=1000)] | None = None


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    kind: str
    state: str
    tenant_id: uuid.UUID
    agency_id: uuid.UUID
    server_id: uuid.UUID
    provider_id: uuid.UUID
    request_tag: str
    params: dict[str, Any]
    placement: dict[str, Any] | None
    grow: dict[str, int]
    shrink: dict[str, int]
    attempts: int
    error: str | None
    error_type: str | None
    result: dict[str, Any] | None
    log: list[dict[str, Any]]
    created_by: str
    decided_by: str | None
    deadline: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


# --- catalog ------------------------------------------------------------------------------------

CatalogKindIn = Literal["flavor", "size", "image", "network", "tier"]


class SizeBounds(Input):
    min_vcpu: Vcpu = 1
    max_vcpu: Vcpu
    min_memory_mb: MemoryMb = 512
    max_memory_mb: MemoryMb


class TierBounds(Input):
    min_gb: DiskGb = 1
    max_gb: DiskGb
    root: bool = False


class CatalogItemCreate(Input):
    """Items the provider lists are imported; custom-size bounds and tier bounds are set here."""

    kind: Literal["size", "tier"]
    code: ItemCode
    name_zh: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    size: SizeBounds | None = None
    tier: TierBounds | None = None
    agency_ids: list[uuid.UUID] = Field(default_factory=list, max_length=1000)
    enabled: bool = True


class CatalogItemUpdate(Input):
    not_null = frozenset({"enabled", "agency_ids"})

    name_zh: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    enabled: bool | None = None
    agency_ids: list[uuid.UUID] | None = Field(default=None, max_length=1000)
    size: SizeBounds | None = None
    tier: TierBounds | None = None


class CatalogItemPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    provider_id: uuid.UUID
    kind: str
    code: str
    external_id: str
    name_zh: str | None
    spec: dict[str, Any]
    agency_ids: list[str]
    enabled: bool


class CatalogImport(BaseModel):
    created: int
    updated: int
    items: list[CatalogItemPublic]


class OfferedProvider(BaseModel):
    provider_id: uuid.UUID
    provider: str
    region: str | None
    items: list[CatalogItemPublic]


class PolicyUpdate(Input):
    service_company_id: uuid.UUID | None = None
    provider_id: uuid.UUID | None = None
    approval_vcpu: Vcpu | None = None
    approval_memory_mb: MemoryMb | None = None
    approval_hours: Annotated[int, Field(ge=1, le=24 * 30)] = 72


class PolicyPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    agency_id: uuid.UUID
    service_company_id: uuid.UUID | None
    provider_id: uuid.UUID | None
    approval_vcpu: int | None
    approval_memory_mb: int | None
    approval_hours: int
    updated_at: datetime
    updated_by: str
