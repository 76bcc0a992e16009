"""Request and response models of the quota domain."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from broker.core.schemas import Input

ClassCode = Annotated[str, StringConstraints(min_length=1, max_length=32)]
Deltas = Annotated[dict[ClassCode, int], Field(min_length=1, max_length=32)]


class ResourceClassPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    code: str
    unit: str
    name_zh: str
    name_en: str
    max_amount: int


class QuotaSet(Input):
    limit: int | None = Field(
        description="the hard limit; null removes a system's own limit (it then shares the "
        "agency's pool)"
    )
    valid_from: AwareDatetime | None = None
    valid_until: AwareDatetime | None = None
    force: bool = Field(
        default=False,
        description="center administrators only: lower the limit below current usage; the "
        "tenant is then over quota and gets no new reservations until usage falls",
    )


class QuotaPublic(BaseModel):
    id: uuid.UUID
    tenant_id: uuid.UUID
    tenant_code: str
    resource_class: str
    limit: int | None
    valid_from: datetime
    valid_until: datetime | None
    days_remaining: int | None
    status: str
    committed: int
    reserved: int


class CheckRequest(Input):
    tenant_id: uuid.UUID
    deltas: Deltas


class Shortfall(BaseModel):
    resource_class: str
    tenant_id: str
    tenant_code: str
    level: str
    limit: int
    usage: int
    requested: int
    shortfall: int
    reason: str


class CheckResult(BaseModel):
    fits: bool
    shortfalls: list[Shortfall]


class UsageLine(BaseModel):
    resource_class: str
    unit: str
    limit: int | None
    committed: int
    reserved: int
    available: int | None
    utilization_percent: Decimal | None
    valid_from: datetime | None
    valid_until: datetime | None
    days_remaining: int | None
    status: str = Field(description="valid, expired, not_yet_valid, unlimited or over_quota")


class TenantUsage(BaseModel):
    tenant_id: uuid.UUID
    tenant_code: str
    tenant_name: str
    kind: str
    lines: list[UsageLine]


class UsageReport(BaseModel):
    tenant: TenantUsage
    children: list[TenantUsage]


class QuotaRequestCreate(Input):
    tenant_id: uuid.UUID
    changes: Deltas = Field(description="signed change of the limit per resource class")
    justification: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=5, max_length=2000)
    ]


class QuotaRequestDecision(Input):
    approved: Deltas | None = Field(
        default=None, description="amended amounts for a partial approval; omit to approve all"
    )
    reason: Annotated[str, StringConstraints(strip_whitespace=True, max_length=2000)] | None = None


class QuotaRequestReject(Input):
    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=2, max_length=2000)]


class QuotaRequestPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    tenant_id: uuid.UUID
    state: str
    requested: dict[str, int]
    approved: dict[str, int] | None
    justification: str
    decision_reason: str | None
    requested_by: uuid.UUID | None
    decided_by: uuid.UUID | None
    created_at: datetime
    decided_at: datetime | None
    attachment_name: str | None
    attachment_type: str | None
    attachment_size: int | None
    attachment_sha256: str | None
