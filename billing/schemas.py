"""Request and response models of billing: price catalogs, contracts, statements, adjustments."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from billing import rating
from broker.core.schemas import Input

ClassCode = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)?$")]
Fen = Annotated[int, Field(ge=0, le=10**15)]
Month = Annotated[str, StringConstraints(pattern=r"^[0-9]{4}-(0[1-9]|1[0-2])$")]
Text200 = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
# billing's calendar (contract periods, price lists)
Day = Annotated[date, Field(ge=rating.FIRST_DAY, le=rating.LAST_DAY)]


class PriceItemIn(Input):
    resource_class: ClassCode
    # fen per unit-hour (memory: per GiB-hour); a string keeps it exact through JSON
    unit_price: Annotated[Decimal, Field(ge=0, le=10**9, max_digits=18, decimal_places=6)]
    monthly_cap_amount: Fen | None = None
    monthly_min_amount: Fen | None = None


class PriceCatalogCreate(Input):
    name: Text200
    # the first calendar day (billing time zone) the prices apply
    effective_from: Day
    bill_compute_when_off: bool = False
    items: list[PriceItemIn] = Field(min_length=1, max_length=64)

    @field_validator("items")
    @classmethod
    def _one_price_per_class(cls, items: list[PriceItemIn]) -> list[PriceItemIn]:
        seen: set[str] = set()
        for item in items:
            if item.resource_class in seen:
                raise ValueError(f"{item.resource_class} is priced twice")
            seen.add(item.resource_class)
        return items


class PriceItemPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    resource_class: str
    unit_price: Decimal
    monthly_cap_amount: int | None
    monthly_min_amount: int | None


class PriceCatalogPublic(BaseModel):
    id: uuid.UUID
    service_company_id: uuid.UUID
    version: int
    name: str
    currency: str
    effective_from: datetime
    effective_until: datetime | None
    bill_compute_when_off: bool
    items: list[PriceItemPublic]
    created_at: datetime
    created_by: str


class ContractCreate(Input):
    number: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
    title: Text200
    agency_id: uuid.UUID
    service_company_id: uuid.UUID
    signed_on: Day
    starts_on: Day
    ends_on: Day
    budget_amount: Fen
    discount_pct: Annotated[Decimal, Field(ge=0, lt=100, max_digits=5, decimal_places=2)] = Decimal(
        0
    )
    billing_contact: Text200 | None = None


class ContractUpdate(Input):
    not_null = frozenset({"title", "ends_on", "budget_amount", "status", "discount_pct"})
    title: Text200 | None = None
    ends_on: Day | None = None
    budget_amount: Fen | None = None
    discount_pct: Annotated[Decimal, Field(ge=0, lt=100, max_digits=5, decimal_places=2)] | None = (
        None
    )
    billing_contact: Text200 | None = None
    status: Literal["active", "suspended", "terminated"] | None = None


class ContractPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    number: str
    title: str
    agency_id: uuid.UUID
    service_company_id: uuid.UUID
    signed_on: date
    starts_on: date
    ends_on: date
    budget_amount: int
    currency: str
    discount_pct: Decimal
    billing_contact: str | None
    status: str
    created_at: datetime
    updated_at: datetime


class StatementGenerate(Input):
    month: Month
    agency_id: uuid.UUID | None = None
    contract_id: uuid.UUID | None = None


class StatementLinePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    position: int
    kind: str
    server_id: uuid.UUID
    server_name: str
    tenant_id: uuid.UUID | None
    resource_class: str
    quantity: int
    seconds: int
    unit_price: Decimal
    amount: int


class AdjustmentCreate(Input):
    kind: Literal["credit", "debit"]
    amount: Annotated[int, Field(gt=0, le=10**15)]
    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=4, max_length=2000)]


class AdjustmentPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    statement_id: uuid.UUID
    kind: str
    amount: int
    reason: str
    state: str
    requested_by: str
    requested_at: datetime
    decided_by: str | None
    decided_at: datetime | None


class StatementPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    agency_id: uuid.UUID
    contract_id: uuid.UUID
    service_company_id: uuid.UUID
    month: str
    state: str
    currency: str
    subtotal_amount: int
    discount_pct: Decimal
    discount_amount: int
    total_amount: int
    line_count: int
    content_hash: str | None
    generated_at: datetime
    generated_by: str
    finalized_at: datetime | None
    finalized_by: str | None


class StatementDetail(StatementPublic):
    lines: list[StatementLinePublic]
    adjustments: list[AdjustmentPublic]
    # total plus approved debits minus approved credits
    adjusted_total_amount: int


class BurndownMonth(BaseModel):
    month: str
    state: str
    amount: int
    cumulative_amount: int


class BudgetAlertPublic(BaseModel):
    threshold_pct: int
    spent_amount: int
    at: datetime


class BurndownPublic(BaseModel):
    contract_id: uuid.UUID
    number: str
    budget_amount: int
    spent_amount: int
    remaining_amount: int
    spent_pct: str | None
    months: list[BurndownMonth]
    alerts: list[BudgetAlertPublic]


class SpendRow(BaseModel):
    agency_id: uuid.UUID
    service_company_id: uuid.UUID
    month: str
    statements: int
    total_amount: int


class UnassignedRow(BaseModel):
    server_id: uuid.UUID
    server_name: str
    provider_id: uuid.UUID
    service_company_id: uuid.UUID
    agency_id: uuid.UUID | None
    resource_class: str
    quantity: int
    seconds: int
    unit_price: Decimal
    amount: int
