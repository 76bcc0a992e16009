"""Statements as documents finance downloads: the database side of billing.exports."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from decimal import Decimal

from sqlalchemy import String, column, table
from sqlalchemy import select as sa_select
from sqlmodel import Session

from billing import exports, statements
from billing.models import Contract, ServiceCompany, Statement
from broker.core.authz import Principal
from broker.core.errors import NotFound
from broker.tenancy.authz import authorize
from broker.tenancy.models import Tenant

FORMATS = {
    "csv": ("text/csv; charset=utf-8", exports.to_csv),
    "xlsx": (
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        exports.to_xlsx,
    ),
    "pdf": ("application/pdf", exports.to_pdf),
}
# the quota domain's resource classes, read by name for their Chinese display names
_RESOURCE_CLASS = table("resource_class", column("code", String), column("name_zh", String))


def class_names(session: Session) -> dict[str, str]:
    rows = session.execute(sa_select(_RESOURCE_CLASS.c.code, _RESOURCE_CLASS.c.name_zh)).all()
    return {code: name for code, name in rows}


def document(session: Session, statement: Statement) -> exports.ExportStatement:
    agency = session.get(Tenant, statement.agency_id)
    contract = session.get(Contract, statement.contract_id)
    company = session.get(ServiceCompany, statement.service_company_id)
    assert agency is not None and contract is not None and company is not None
    notes = statements.adjustments_of(session, [statement.id])
    return exports.ExportStatement(
        agency_code=agency.code,
        agency_name=agency.name_zh,
        contract_number=contract.number,
        contract_title=contract.title,
        service_company_name=company.name_zh,
        month=statement.month,
        state=statement.state,
        currency=statement.currency,
        lines=tuple(
            exports.ExportLine(
                server_name=ln.server_name,
                resource_class=ln.resource_class,
                quantity=ln.quantity,
                seconds=ln.seconds,
                unit_price=Decimal(ln.unit_price),
                amount=ln.amount,
                kind=ln.kind,
            )
            for ln in statements.lines_of(session, statement.id)
        ),
        subtotal_amount=statement.subtotal_amount,
        discount_pct=Decimal(statement.discount_pct),
        discount_amount=statement.discount_amount,
        total_amount=statement.total_amount,
        adjustments=tuple(
            exports.ExportAdjustment(n.kind, n.amount, n.reason, n.decided_by)
            for n in notes
            if n.state == "approved"
        ),
        content_hash=statement.content_hash,
        generated_at=statement.generated_at,
    )


def for_export(
    session: Session,
    principal: Principal,
    *,
    statement_id: uuid.UUID | None = None,
    month: str | None = None,
    agency_id: uuid.UUID | None = None,
) -> list[exports.ExportStatement]:
    """One statement, or every statement of a month (optionally one agency's) the caller may
    export."""
    chosen: Sequence[Statement]
    if statement_id is not None:
        statement = statements.get_statement(session, principal, statement_id)
        chosen = [statement]
    else:
        chosen = statements.list_statements(session, principal, month=month, agency_id=agency_id)
    for s in chosen:
        agency = session.get(Tenant, s.agency_id)
        assert agency is not None
        authorize(principal, statements.EXPORT, agency, subject=f"statement {s.id}")
    if statement_id is None and not chosen:
        raise NotFound(
            f"no statements for {month}" + (f" of agency {agency_id}" if agency_id else "")
        )
    return [document(session, s) for s in chosen]


def render(
    session: Session, docs: Sequence[exports.ExportStatement], fmt: str
) -> tuple[str, bytes]:
    """(media type, bytes) of the documents in `fmt` (csv, xlsx or pdf)."""
    media, make = FORMATS[fmt]
    return media, make(docs, class_names(session))
