"""Billing (统采分签): price catalogs, contracts, statements, adjustments, exports, views."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Query, Response
from sqlmodel import Session

from api.deps import PrincipalDep, SessionDep
from api.schemas import Page
from billing import contracts, documents, prices, statements
from billing.models import Statement
from billing.schemas import (
    AdjustmentCreate,
    AdjustmentPublic,
    BurndownPublic,
    ContractCreate,
    ContractPublic,
    ContractUpdate,
    Month,
    PriceCatalogCreate,
    PriceCatalogPublic,
    SpendRow,
    StatementDetail,
    StatementGenerate,
    StatementLinePublic,
    StatementPublic,
    UnassignedRow,
)

router = APIRouter(tags=["billing"])
Format = Literal["csv", "xlsx", "pdf"]


@router.get(
    "/api/v1/service-companies/{company_id}/price-catalogs",
    response_model=Page[PriceCatalogPublic],
)
def list_catalogs(
    company_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> Page[PriceCatalogPublic]:
    """Every version of the company's price list; readable by anyone signed in."""
    rows = [prices.public(session, c) for c in prices.list_catalogs(session, company_id)]
    return Page(data=rows, count=len(rows))


@router.post(
    "/api/v1/service-companies/{company_id}/price-catalogs",
    status_code=201,
    response_model=PriceCatalogPublic,
)
def create_catalog(
    company_id: uuid.UUID, body: PriceCatalogCreate, session: SessionDep, principal: PrincipalDep
) -> PriceCatalogPublic:
    """A new version of the price list, in force from `effective_from` (a day in the billing
    zone) until the next version; it closes the version before it."""
    catalog = prices.create_catalog(session, principal, company_id, body)
    out = prices.public(session, catalog)
    session.commit()
    return out


@router.get("/api/v1/price-catalogs/{catalog_id}", response_model=PriceCatalogPublic)
def get_catalog(
    catalog_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> PriceCatalogPublic:
    return prices.public(session, prices.get_catalog(session, catalog_id))


@router.get("/api/v1/contracts", response_model=Page[ContractPublic])
def list_contracts(
    session: SessionDep,
    principal: PrincipalDep,
    agency_id: uuid.UUID | None = None,
    status: Literal["active", "suspended", "terminated"] | None = None,
) -> Page[ContractPublic]:
    rows = contracts.list_contracts(session, principal, agency_id=agency_id, status=status)
    return Page(data=[ContractPublic.model_validate(c) for c in rows], count=len(rows))


@router.post("/api/v1/contracts", status_code=201, response_model=ContractPublic)
def create_contract(
    body: ContractCreate, session: SessionDep, principal: PrincipalDep
) -> ContractPublic:
    out = ContractPublic.model_validate(contracts.create_contract(session, principal, body))
    session.commit()
    return out


@router.get("/api/v1/contracts/{contract_id}", response_model=ContractPublic)
def get_contract(
    contract_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> ContractPublic:
    return ContractPublic.model_validate(contracts.get_contract(session, principal, contract_id))


@router.patch("/api/v1/contracts/{contract_id}", response_model=ContractPublic)
def update_contract(
    contract_id: uuid.UUID, body: ContractUpdate, session: SessionDep, principal: PrincipalDep
) -> ContractPublic:
    contract = contracts.update_contract(session, principal, contract_id, body)
    out = ContractPublic.model_validate(contract)
    session.commit()
    return out


@router.get("/api/v1/contracts/{contract_id}/burndown", response_model=BurndownPublic)
def contract_burndown(
    contract_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> BurndownPublic:
    """The budget (合同金额) against what has been billed, month by month, with the 80 % and
    100 % alerts."""
    contract = contracts.get_contract(session, principal, contract_id)
    return BurndownPublic.model_validate(statements.burndown(session, principal, contract))


@router.post("/api/v1/statements/generate", response_model=Page[StatementPublic])
def generate_statements(
    body: StatementGenerate, session: SessionDep, principal: PrincipalDep
) -> Page[StatementPublic]:
    """Draft (or redraft) the month's statements; finalized ones are returned unchanged."""
    rows = statements.generate(
        session, principal, month=body.month, agency_id=body.agency_id, contract_id=body.contract_id
    )
    out = [StatementPublic.model_validate(s) for s in rows]
    session.commit()
    return Page(data=out, count=len(out))


@router.get("/api/v1/statements", response_model=Page[StatementPublic])
def list_statements(
    session: SessionDep,
    principal: PrincipalDep,
    month: Month | None = None,
    agency_id: uuid.UUID | None = None,
    contract_id: uuid.UUID | None = None,
    state: Literal["draft", "final"] | None = None,
) -> Page[StatementPublic]:
    rows = statements.list_statements(
        session, principal, month=month, agency_id=agency_id, contract_id=contract_id, state=state
    )
    return Page(data=[StatementPublic.model_validate(s) for s in rows], count=len(rows))


def _ascii_file_name(name: str) -> str:
    """The plain `filename=` fallback: printable ASCII only, and nothing that would end the
    quoted string or the header line (contract numbers are free text: quotes, tabs, 甲)."""
    return "".join(ch if " " <= ch <= "~" and ch not in '"\\/' else "_" for ch in name)


def _download(session: Session, docs: list, fmt: str, stem: str) -> Response:  # type: ignore[type-arg]
    media, body = documents.render(session, docs, fmt)
    name = f"{stem}.{fmt}"
    disposition = f'attachment; filename="{_ascii_file_name(name)}"; ' + (
        f"filename*=UTF-8''{quote(name, safe='')}"
    )
    return Response(body, media_type=media, headers={"Content-Disposition": disposition})


@router.get("/api/v1/statements/export", response_class=Response)
def export_month(
    session: SessionDep,
    principal: PrincipalDep,
    month: Annotated[Month, Query()],
    agency_id: uuid.UUID | None = None,
    format: Format = "xlsx",
) -> Response:
    """Every statement of a month (optionally one agency's) in one file: CSV (UTF-8 with BOM),
    XLSX (one sheet per contract) or PDF."""
    docs = documents.for_export(session, principal, month=month, agency_id=agency_id)
    return _download(session, docs, format, f"statements-{month}")


def _detail(session: Session, statement: Statement) -> StatementDetail:
    notes = statements.adjustments_of(session, [statement.id])
    return StatementDetail(
        **StatementPublic.model_validate(statement).model_dump(),
        lines=[
            StatementLinePublic.model_validate(ln)
            for ln in statements.lines_of(session, statement.id)
        ],
        adjustments=[AdjustmentPublic.model_validate(n) for n in notes],
        adjusted_total_amount=statements.adjusted_total(statement, notes),
    )


@router.get("/api/v1/statements/{statement_id}", response_model=StatementDetail)
def get_statement(
    statement_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> StatementDetail:
    return _detail(session, statements.get_statement(session, principal, statement_id))


@router.get("/api/v1/statements/{statement_id}/export", response_class=Response)
def export_statement(
    statement_id: uuid.UUID,
    session: SessionDep,
    principal: PrincipalDep,
    format: Format = "pdf",
) -> Response:
    docs = documents.for_export(session, principal, statement_id=statement_id)
    doc = docs[0]
    return _download(session, docs, format, f"{doc.contract_number}-{doc.month}")


@router.post("/api/v1/statements/{statement_id}/finalize", response_model=StatementDetail)
def finalize_statement(
    statement_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> StatementDetail:
    """Redraft from the complete month and freeze it: immutable from now on, with its content
    hash; corrections go through credit and debit notes."""
    statement = statements.finalize(session, principal, statement_id)
    out = _detail(session, statement)
    session.commit()
    return out


@router.post(
    "/api/v1/statements/{statement_id}/adjustments",
    status_code=201,
    response_model=AdjustmentPublic,
)
def propose_adjustment(
    statement_id: uuid.UUID, body: AdjustmentCreate, session: SessionDep, principal: PrincipalDep
) -> AdjustmentPublic:
    """A credit or debit note on a finalized statement; a second person approves it."""
    note = statements.propose_adjustment(session, principal, statement_id, body)
    out = AdjustmentPublic.model_validate(note)
    session.commit()
    return out


@router.post("/api/v1/adjustments/{adjustment_id}/{decision}", response_model=AdjustmentPublic)
def decide_adjustment(
    adjustment_id: uuid.UUID,
    decision: Literal["approve", "reject"],
    session: SessionDep,
    principal: PrincipalDep,
) -> AdjustmentPublic:
    note = statements.decide_adjustment(
        session, principal, adjustment_id, approve=decision == "approve"
    )
    out = AdjustmentPublic.model_validate(note)
    session.commit()
    return out


@router.get("/api/v1/billing/spend", response_model=Page[SpendRow])
def spend(
    session: SessionDep,
    principal: PrincipalDep,
    month_from: Month | None = None,
    month_to: Month | None = None,
) -> Page[SpendRow]:
    """The center's view: billed amounts by agency × service company × month."""
    rows = statements.spend(session, principal, month_from=month_from, month_to=month_to)
    return Page(data=[SpendRow.model_validate(r) for r in rows], count=len(rows))


@router.get("/api/v1/billing/unassigned", response_model=Page[UnassignedRow])
def unassigned(
    session: SessionDep, principal: PrincipalDep, month: Annotated[Month, Query()]
) -> Page[UnassignedRow]:
    """Usage no contract pays for (servers nobody owns; time outside a contract's period)."""
    rows = statements.unassigned(session, principal, month=month)
    return Page(data=[UnassignedRow.model_validate(r) for r in rows], count=len(rows))
