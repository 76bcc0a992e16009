"""Monthly statements per agency and contract: generated from rated usage, finalized once
(immutable, with a content hash), corrected only by credit and debit notes.

`compute_lines` and `compute_totals` are the pure part; everything else reads and writes around
them. The rounding rule is billing.rating's: exact until the line, half up to the fen there.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import defaultdict
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from decimal import Decimal
from itertools import groupby
from operator import ge, le
from typing import Any

from sqlalchemy import String, Uuid, case, column, delete, func, insert, or_, table
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from billing import metering, rating
from billing.contracts import in_scope
from billing.models import (
    Adjustment,
    AdjustmentState,
    BudgetAlert,
    Contract,
    PriceItem,
    RatedUsage,
    Statement,
    StatementLine,
    StatementState,
)
from billing.prices import require_center
from billing.schemas import AdjustmentCreate
from broker.audit import service as audit
from broker.core import clock
from broker.core.authz import Principal
from broker.core.errors import Conflict, Forbidden, Invalid, NotFound
from broker.tenancy import service as tenancy
from broker.tenancy.authz import authorize
from broker.tenancy.models import Tenant

READ = "billing.read"
EXPORT = "billing.export"
MANAGE = "statement.manage"
BUDGET_THRESHOLDS = (80, 100)
# server names for statement lines, read by name: billing sits below the inventory
_SERVER = table("server", column("id", Uuid()), column("name", String()))
_KIND_ORDER = {"usage": 0, "cap": 1, "minimum": 2}


@dataclass(frozen=True)
class Usage:
    """Rated seconds of one server and class at one quantity and price, summed over a month."""

    server_id: uuid.UUID
    server_name: str
    tenant_id: uuid.UUID | None
    resource_class: str
    quantity: int
    unit_price: Decimal
    price_item_id: uuid.UUID
    seconds: int


@dataclass(frozen=True)
class Line:
    kind: str
    server_id: uuid.UUID
    server_name: str
    tenant_id: uuid.UUID | None
    resource_class: str
    quantity: int
    seconds: int
    unit_price: Decimal
    amount: int


def compute_lines(
    usage: Iterable[Usage], limits: Mapping[uuid.UUID, tuple[int | None, int | None]]
) -> list[Line]:
    """One line per usage row, then per server and class a cap line (negative) bringing the
    month down to the monthly cap, or a minimum line topping it up to the monthly minimum: once
    per server-month, with the cap or minimum of the price list that billed most of it (a
    price change mid-month does not make two). Ordered by server, class, price, kind,
    quantity, then the rest: the order is part of the content hash."""
    lines: list[Line] = []
    per_class: dict[tuple[uuid.UUID, str], list[tuple[Usage, Line]]] = defaultdict(list)
    for u in usage:
        line = Line(
            "usage",
            u.server_id,
            u.server_name,
            u.tenant_id,
            u.resource_class,
            u.quantity,
            u.seconds,
            u.unit_price,
            rating.line_amount(u.unit_price, u.quantity, u.seconds, u.resource_class),
        )
        lines.append(line)
        per_class[(u.server_id, u.resource_class)].append((u, line))
    for group in per_class.values():
        billed: dict[uuid.UUID, int] = defaultdict(int)
        held: dict[uuid.UUID | None, int] = defaultdict(int)
        for u, ln in group:
            billed[u.price_item_id] += ln.seconds
            held[ln.tenant_id] += ln.seconds
        item = max(billed, key=lambda i: (billed[i], str(i)))
        cap, minimum = limits.get(item, (None, None))
        month_amount = sum(ln.amount for _, ln in group)
        # a server that moved between systems during the month: the cap or minimum goes to the
        # system it spent most of the month in, whatever order the query returned the rows in
        tenant = max(held, key=lambda t: (held[t], str(t)))
        first = next(u for u, _ in group if u.price_item_id == item)
        extra: tuple[str, int] | None = None
        if cap is not None and month_amount > cap:
            extra = ("cap", cap - month_amount)
        elif minimum is not None and month_amount < minimum:
            extra = ("minimum", minimum - month_amount)
        if extra is not None:
            lines.append(
                Line(
                    extra[0],
                    first.server_id,
                    first.server_name,
                    tenant,
                    first.resource_class,
                    0,
                    sum(billed.values()),
                    first.unit_price,
                    extra[1],
                )
            )
    # every field takes part, so lines alike on the first ones (the same price in two versions
    # of the price list, a server moved between systems) keep one order whatever order the
    # query returned them in
    lines.sort(
        key=lambda ln: (
            ln.server_name,
            str(ln.server_id),
            ln.resource_class,
            ln.unit_price,
            _KIND_ORDER[ln.kind],
            ln.quantity,
            str(ln.tenant_id),
            ln.seconds,
            ln.amount,
        )
    )
    return lines


_LINE_FIELDS = tuple(f.name for f in fields(Line))
_HASHED_FIELDS = tuple(f for f in _LINE_FIELDS if f != "server_name")


def compute_totals(lines: Sequence[Line], discount_pct: Decimal) -> tuple[int, int, int]:
    """(subtotal, discount, total) in fen: the discount is rounded once, on the subtotal."""
    subtotal = sum(ln.amount for ln in lines)
    discount = rating.percent_of(subtotal, discount_pct)
    return subtotal, discount, subtotal - discount


def content_hash(header: Mapping[str, Any], lines: Sequence[Line]) -> str:
    """SHA-256 of the statement's canonical JSON: what a finalized statement promises."""

    def plain(v: Any) -> Any:
        if isinstance(v, Decimal):
            return format(v.normalize(), "f")
        if isinstance(v, uuid.UUID):
            return str(v)
        return v

    # what cannot change once billed: not the server's name (sync follows renames), and in an
    # order that does not depend on it
    facts = sorted(
        ([plain(getattr(ln, f)) for f in _HASHED_FIELDS] for ln in lines),
        key=lambda row: json.dumps(row),
    )
    body = {"header": {k: plain(v) for k, v in sorted(header.items())}, "lines": facts}
    blob = json.dumps(body, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _header(
    contract: Contract, month: str, totals: tuple[int, int, int], discount_pct: Decimal
) -> dict[str, Any]:
    """The statement's own facts; the discount is the statement's (fixed when it was drafted),
    not whatever the contract says later."""
    return {
        "agency_id": contract.agency_id,
        "contract_id": contract.id,
        "contract_number": contract.number,
        "service_company_id": contract.service_company_id,
        "month": month,
        "currency": contract.currency,
        "discount_pct": discount_pct,
        "subtotal_amount": totals[0],
        "discount_amount": totals[1],
        "total_amount": totals[2],
    }


def _month(month: str, now: datetime) -> tuple[datetime, datetime]:
    try:
        start, end = rating.month_bounds(month)
    except ValueError as exc:
        raise Invalid.field("month", str(exc)) from exc
    if start > now:
        raise Invalid.field("month", f"{month} has not begun", "future")
    return start, end


def _usage_stream(
    session: Session, month: str, contract_ids: Sequence[uuid.UUID]
) -> Generator[tuple[uuid.UUID, list[Usage]]]:
    """(contract id, its usage) in contract id order, read through a server-side cursor: one
    scan for the whole month, one contract's rows in memory at a time."""
    seconds = func.sum(RatedUsage.seconds)
    keys = (
        col(RatedUsage.contract_id),
        col(RatedUsage.server_id),
        _SERVER.c.name,
        col(RatedUsage.tenant_id),
        col(RatedUsage.resource_class),
        col(RatedUsage.quantity),
        col(RatedUsage.unit_price),
        col(RatedUsage.price_item_id),
    )
    result = session.connection().execute(
        sa_select(*keys, seconds)
        .join(_SERVER, _SERVER.c.id == col(RatedUsage.server_id))
        .where(
            col(RatedUsage.month) == month,
            col(RatedUsage.in_contract).is_(True),
            col(RatedUsage.contract_id).in_(contract_ids),
        )
        .group_by(*keys)
        .order_by(col(RatedUsage.contract_id)),
        execution_options={"stream_results": True, "yield_per": 5000},
    )
    with result:
        for cid, rows in groupby(result, key=lambda r: r[0]):
            yield (
                cid,
                [
                    Usage(sid, name, tid, cls, int(qty), Decimal(price), item, int(secs))
                    for _, sid, name, tid, cls, qty, price, item, secs in rows
                ],
            )


def _limits(session: Session) -> dict[uuid.UUID, tuple[int | None, int | None]]:
    rows = session.execute(
        sa_select(
            col(PriceItem.id), col(PriceItem.monthly_cap_amount), col(PriceItem.monthly_min_amount)
        ).where(
            or_(
                col(PriceItem.monthly_cap_amount).is_not(None),
                col(PriceItem.monthly_min_amount).is_not(None),
            )
        )
    ).all()
    return {i: (cap, mn) for i, cap, mn in rows}


def _contracts_in(
    session: Session,
    month: str,
    agency_id: uuid.UUID | None,
    contract_id: uuid.UUID | None,
) -> list[Contract]:
    start, end = rating.month_bounds(month)
    first_day = start.astimezone(rating.zone()).date()
    last_day = (end.astimezone(rating.zone())).date()
    # in force that month, or paying for some of its usage (whatever its period says now)
    billed = (
        sa_select(col(RatedUsage.contract_id))
        .where(col(RatedUsage.month) == month, col(RatedUsage.in_contract).is_(True))
        .distinct()
    )
    stmt = (
        select(Contract)
        .where(
            or_(
                (col(Contract.starts_on) < last_day) & (col(Contract.ends_on) >= first_day),
                col(Contract.id).in_(billed),
            )
        )
        .order_by(col(Contract.number))
    )
    if agency_id is not None:
        if session.get(Tenant, agency_id) is None:
            raise Invalid.field("agency_id", "no such agency", "not_found")
        stmt = stmt.where(Contract.agency_id == agency_id)
    if contract_id is not None:
        if session.get(Contract, contract_id) is None:
            raise Invalid.field("contract_id", "no such contract", "not_found")
        stmt = stmt.where(Contract.id == contract_id)
    return list(session.execute(stmt).scalars())


_LINE_COLUMNS = ("id", "statement_id", "position", *_LINE_FIELDS)
_COPY_LINES = f"COPY statement_line ({', '.join(_LINE_COLUMNS)}) FROM STDIN"


def _insert_lines(session: Session, statement_id: uuid.UUID, lines: Sequence[Line]) -> None:
    """One statement's lines, as they are computed (never the whole month in memory): COPY on
    PostgreSQL, a Core executemany elsewhere."""
    if not lines:
        return
    rows = (
        (uuid.uuid4(), statement_id, i, *(getattr(ln, f) for f in _LINE_FIELDS))
        for i, ln in enumerate(lines, 1)
    )
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        raw = conn.connection.driver_connection
        assert raw is not None
        with raw.cursor() as cur, cur.copy(_COPY_LINES) as copy:
            for row in rows:
                copy.write_row(row)
    else:
        conn.execute(
            insert(StatementLine.__table__),  # type: ignore[attr-defined]
            [dict(zip(_LINE_COLUMNS, row, strict=True)) for row in rows],
        )


def generate(
    session: Session,
    principal: Principal,
    *,
    month: str,
    agency_id: uuid.UUID | None = None,
    contract_id: uuid.UUID | None = None,
) -> list[Statement]:
    """Draft (or redraft) the month's statements of every contract in force that month, after
    metering and rating everything up to the month's end. Finalized statements are left as
    they are; regenerating one only checks that its content still hashes the same."""
    require_center(session, principal, MANAGE)
    now = clock.now()
    _, end = _month(month, now)
    metering.billing_lock(session)
    metering.catch_up(session, until=min(end, now))
    contracts = _contracts_in(session, month, agency_id, contract_id)
    ids = [c.id for c in contracts]
    _drop_stale_drafts(session, month, ids, agency_id, contract_id)
    if not contracts:
        return []
    limits = _limits(session)
    existing = {
        s.contract_id: s
        for s in session.execute(
            select(Statement)
            .where(Statement.month == month, col(Statement.contract_id).in_(ids))
            .with_for_update()
        ).scalars()
    }
    redrafted = [s.id for s in existing.values() if s.state == StatementState.draft]
    if redrafted:
        session.execute(delete(StatementLine).where(col(StatementLine.statement_id).in_(redrafted)))
    out: list[Statement] = []
    by_id = {c.id: c for c in contracts}
    usage = _usage_stream(session, month, ids)
    pending = next(usage, None)
    for cid in sorted(by_id):
        contract = by_id[cid]
        mine: list[Usage] = []
        if pending is not None and pending[0] == cid:
            mine = pending[1]
            pending = next(usage, None)
        lines = compute_lines(mine, limits)
        statement = existing.get(contract.id)
        if statement is not None and statement.state == StatementState.final:
            digest = _fresh_hash(contract, statement, lines)
            if digest != statement.content_hash:
                audit.record(
                    session,
                    principal,
                    "statement.mismatch",
                    tenant=session.get(Tenant, contract.agency_id),
                    target_type="statement",
                    target_id=statement.id,
                    before={"content_hash": statement.content_hash},
                    after={"content_hash": digest},
                )
            out.append(statement)
            continue
        totals = compute_totals(lines, contract.discount_pct)
        if statement is None:
            statement = Statement(
                agency_id=contract.agency_id,
                contract_id=contract.id,
                service_company_id=contract.service_company_id,
                month=month,
                currency=contract.currency,
                subtotal_amount=0,
                discount_pct=contract.discount_pct,
                discount_amount=0,
                total_amount=0,
                line_count=0,
                generated_by=principal.username[:64],
            )
        statement.subtotal_amount, statement.discount_amount, statement.total_amount = totals
        statement.discount_pct = contract.discount_pct
        statement.line_count = len(lines)
        statement.generated_at = now
        statement.generated_by = principal.username[:64]
        session.add(statement)
        session.flush()
        _insert_lines(session, statement.id, lines)
        out.append(statement)
    usage.close()
    out.sort(key=lambda st: by_id[st.contract_id].number)
    audit.record(
        session,
        principal,
        "statement.generate",
        tenant=tenancy.get_center(session),
        target_type="statement_month",
        target_id=month,
        after={
            "statements": len(out),
            "agency_id": agency_id,
            "contract_id": contract_id,
            "total_amount": sum(s.total_amount for s in out),
        },
    )
    for contract in contracts:
        check_budget(session, contract)
    return out


def _drop_stale_drafts(
    session: Session,
    month: str,
    keep: Sequence[uuid.UUID],
    agency_id: uuid.UUID | None,
    contract_id: uuid.UUID | None,
) -> None:
    """A draft whose contract no longer covers the month (its period was corrected) would
    still count towards spend and could be finalized with stale lines: it goes."""
    stmt = select(col(Statement.id)).where(
        Statement.month == month,
        Statement.state == StatementState.draft.value,
        col(Statement.contract_id).not_in(keep),
    )
    if agency_id is not None:
        stmt = stmt.where(Statement.agency_id == agency_id)
    if contract_id is not None:
        stmt = stmt.where(Statement.contract_id == contract_id)
    stale = list(session.execute(stmt).scalars())
    if stale:
        session.execute(delete(StatementLine).where(col(StatementLine.statement_id).in_(stale)))
        session.execute(delete(Statement).where(col(Statement.id).in_(stale)))


def lines_of(session: Session, statement_id: uuid.UUID) -> list[StatementLine]:
    return list(
        session.execute(
            select(StatementLine)
            .where(StatementLine.statement_id == statement_id)
            .order_by(col(StatementLine.position))
        ).scalars()
    )


def _as_line(row: StatementLine) -> Line:
    return Line(
        row.kind,
        row.server_id,
        row.server_name,
        row.tenant_id,
        row.resource_class,
        row.quantity,
        row.seconds,
        Decimal(row.unit_price),
        row.amount,
    )


def _load(
    session: Session,
    principal: Principal,
    statement_id: uuid.UUID,
    action: str,
    *,
    lock: bool = False,
    subject: str | None = None,
) -> Statement:
    """`subject` names what the caller asked for in a not-found answer (a note on another
    agency's statement must look missing, not reveal the statement's id)."""
    subject = subject or f"statement {statement_id}"
    statement = session.get(Statement, statement_id, with_for_update=lock or None)
    if statement is None:
        raise NotFound(f"{subject} not found")
    agency = session.get(Tenant, statement.agency_id)
    assert agency is not None
    authorize(principal, action, agency, subject=subject)
    return statement


def get_statement(session: Session, principal: Principal, statement_id: uuid.UUID) -> Statement:
    return _load(session, principal, statement_id, READ)


def finalize(session: Session, principal: Principal, statement_id: uuid.UUID) -> Statement:
    """Redraft from the complete month, then freeze: state final, content hash stored."""
    metering.billing_lock(session)
    statement = _load(session, principal, statement_id, READ, lock=True)
    require_center(session, principal, MANAGE)
    if statement.state == StatementState.final:
        raise Conflict(f"statement {statement.id} is already finalized")
    _, end = rating.month_bounds(statement.month)
    if end > clock.now():
        raise Conflict(
            f"{statement.month} is not over yet: a statement is finalized after its month"
        )
    generate(session, principal, month=statement.month, contract_id=statement.contract_id)
    session.refresh(statement)
    contract = session.get(Contract, statement.contract_id)
    assert contract is not None
    lines = [_as_line(r) for r in lines_of(session, statement.id)]
    totals = (statement.subtotal_amount, statement.discount_amount, statement.total_amount)
    statement.content_hash = content_hash(
        _header(contract, statement.month, totals, Decimal(statement.discount_pct)), lines
    )
    statement.state = StatementState.final.value
    statement.finalized_at = clock.now()
    statement.finalized_by = principal.username[:64]
    session.add(statement)
    session.flush()
    audit.record(
        session,
        principal,
        "statement.finalize",
        tenant=session.get(Tenant, statement.agency_id),
        target_type="statement",
        target_id=statement.id,
        after={
            "month": statement.month,
            "contract": contract.number,
            "total_amount": statement.total_amount,
            "content_hash": statement.content_hash,
        },
    )
    return statement


def recompute_hash(session: Session, statement: Statement) -> str:
    """What the statement's hash is when recomputed from fresh rating (finalized or not)."""
    contract = session.get(Contract, statement.contract_id)
    assert contract is not None
    usage = dict(_usage_stream(session, statement.month, [contract.id]))
    return _fresh_hash(
        contract, statement, compute_lines(usage.get(contract.id, []), _limits(session))
    )


def _fresh_hash(contract: Contract, statement: Statement, lines: Sequence[Line]) -> str:
    """The hash `lines` give the statement, totalled at the statement's own discount."""
    pct = Decimal(statement.discount_pct)
    return content_hash(_header(contract, statement.month, compute_totals(lines, pct), pct), lines)


def propose_adjustment(
    session: Session, principal: Principal, statement_id: uuid.UUID, data: AdjustmentCreate
) -> Adjustment:
    metering.billing_lock(session)
    statement = _load(session, principal, statement_id, READ, lock=True)
    require_center(session, principal, MANAGE)
    if statement.state != StatementState.final:
        raise Conflict(
            "adjustments apply to finalized statements; a draft is corrected by regenerating it"
        )
    if data.kind == "credit":
        left = _still_billed(session, statement)
        if data.amount > left:
            raise Invalid.field(
                "amount", f"a credit cannot exceed what the statement still bills ({left} fen)"
            )
    note = Adjustment(
        statement_id=statement.id,
        kind=data.kind,
        amount=data.amount,
        reason=data.reason,
        requested_by=principal.username[:64],
    )
    session.add(note)
    session.flush()
    audit.record(
        session,
        principal,
        "adjustment.propose",
        tenant=session.get(Tenant, statement.agency_id),
        target_type="adjustment",
        target_id=note.id,
        after={"statement": str(statement.id), "kind": note.kind, "amount": note.amount},
    )
    return note


def decide_adjustment(
    session: Session, principal: Principal, adjustment_id: uuid.UUID, *, approve: bool
) -> Adjustment:
    metering.billing_lock(session)
    note = session.get(Adjustment, adjustment_id, with_for_update=True)
    if note is None:
        raise NotFound(f"adjustment {adjustment_id} not found")
    statement = _load(
        session, principal, note.statement_id, READ, subject=f"adjustment {adjustment_id}"
    )
    require_center(session, principal, MANAGE)
    if note.state != AdjustmentState.proposed:
        raise Conflict(f"adjustment {note.id} is already {note.state}")
    if note.requested_by == principal.username:
        raise Forbidden("a credit or debit note needs a second person: you proposed this one")
    if approve and note.kind == "credit":
        left = _still_billed(session, statement)
        if note.amount > left:
            raise Conflict(f"approving it would credit more than the statement bills ({left} fen)")
    note.state = (AdjustmentState.approved if approve else AdjustmentState.rejected).value
    note.decided_by = principal.username[:64]
    note.decided_at = clock.now()
    session.add(note)
    session.flush()
    audit.record(
        session,
        principal,
        "adjustment.approve" if approve else "adjustment.reject",
        tenant=session.get(Tenant, statement.agency_id),
        target_type="adjustment",
        target_id=note.id,
        before={"state": AdjustmentState.proposed.value},
        after={"state": note.state, "kind": note.kind, "amount": note.amount},
    )
    contract = session.get(Contract, statement.contract_id)
    if contract is not None:
        check_budget(session, contract)
    return note


def adjustments_of(session: Session, statement_ids: Sequence[uuid.UUID]) -> list[Adjustment]:
    return list(
        session.execute(
            select(Adjustment)
            .where(col(Adjustment.statement_id).in_(statement_ids))
            .order_by(col(Adjustment.requested_at), col(Adjustment.id))
        ).scalars()
    )


def _still_billed(session: Session, statement: Statement) -> int:
    """What the statement bills after its approved notes: the most a new credit may take off."""
    return adjusted_total(statement, adjustments_of(session, [statement.id]))


def adjusted_total(statement: Statement, notes: Iterable[Adjustment]) -> int:
    total = statement.total_amount
    for n in notes:
        if n.statement_id == statement.id and n.state == AdjustmentState.approved:
            total += n.amount if n.kind == "debit" else -n.amount
    return total


def list_statements(
    session: Session,
    principal: Principal,
    *,
    month: str | None = None,
    agency_id: uuid.UUID | None = None,
    contract_id: uuid.UUID | None = None,
    state: str | None = None,
) -> list[Statement]:
    stmt = in_scope(select(Statement), principal, col(Statement.agency_id)).order_by(
        col(Statement.month).desc(), col(Tenant.code), col(Statement.contract_id)
    )
    for column_, value in (
        (Statement.month, month),
        (Statement.agency_id, agency_id),
        (Statement.contract_id, contract_id),
        (Statement.state, state),
    ):
        if value is not None:
            stmt = stmt.where(column_ == value)
    return list(session.execute(stmt).scalars())


def contract_spend(session: Session, contract_id: uuid.UUID) -> int:
    """Everything billed under a contract: statements (drafts included, so the burn-down moves
    during the month) plus approved debit notes minus approved credit notes."""
    statements = list(
        session.execute(select(Statement).where(Statement.contract_id == contract_id)).scalars()
    )
    notes = adjustments_of(session, [s.id for s in statements]) if statements else []
    return sum(adjusted_total(s, notes) for s in statements)


def check_budget(session: Session, contract: Contract) -> list[BudgetAlert]:
    """Record (once each) that spend crossed 80 % and 100 % of the contract's budget."""
    if contract.budget_amount <= 0:
        return []
    spent = contract_spend(session, contract.id)
    have = set(
        session.execute(
            select(BudgetAlert.threshold_pct).where(BudgetAlert.contract_id == contract.id)
        ).scalars()
    )
    raised: list[BudgetAlert] = []
    for pct in BUDGET_THRESHOLDS:
        if pct in have or spent * 100 < contract.budget_amount * pct:
            continue
        alert = BudgetAlert(
            contract_id=contract.id,
            threshold_pct=pct,
            spent_amount=spent,
            budget_amount=contract.budget_amount,
        )
        session.add(alert)
        raised.append(alert)
        audit.record(
            session,
            Principal.system("billing"),
            f"contract.budget_{pct}",
            tenant=session.get(Tenant, contract.agency_id),
            target_type="contract",
            target_id=contract.id,
            after={"spent_amount": spent, "budget_amount": contract.budget_amount},
        )
    if raised:
        session.flush()
    return raised


def burndown(session: Session, principal: Principal, contract: Contract) -> dict[str, Any]:
    """The contract's budget against what has been billed, month by month."""
    statements = list(
        session.execute(
            select(Statement)
            .where(Statement.contract_id == contract.id)
            .order_by(col(Statement.month))
        ).scalars()
    )
    notes = adjustments_of(session, [s.id for s in statements]) if statements else []
    months = []
    running = 0
    for s in statements:
        billed = adjusted_total(s, notes)
        running += billed
        months.append(
            {"month": s.month, "state": s.state, "amount": billed, "cumulative_amount": running}
        )
    alerts = session.execute(
        select(BudgetAlert)
        .where(BudgetAlert.contract_id == contract.id)
        .order_by(col(BudgetAlert.threshold_pct))
    ).scalars()
    budget = contract.budget_amount
    return {
        "contract_id": contract.id,
        "number": contract.number,
        "budget_amount": budget,
        "spent_amount": running,
        "remaining_amount": budget - running,
        "spent_pct": (
            str((Decimal(running) * 100 / Decimal(budget)).quantize(Decimal("0.01")))
            if budget
            else None
        ),
        "months": months,
        "alerts": [
            {"threshold_pct": a.threshold_pct, "spent_amount": a.spent_amount, "at": a.at}
            for a in alerts
        ],
    }


def spend(
    session: Session, principal: Principal, *, month_from: str | None, month_to: str | None
) -> list[dict[str, Any]]:
    """The center's view: billed amounts by agency × service company × month, statements'
    totals with their approved credit and debit notes (as the burn-down counts them)."""
    require_center(session, principal, READ)
    bounds = []
    for name, bound, op in (("month_from", month_from, ge), ("month_to", month_to, le)):
        if bound is not None:
            try:
                rating.parse_month(bound)
            except ValueError as exc:
                raise Invalid.field(name, str(exc)) from exc
            bounds.append(op(col(Statement.month), bound))
    signed = case(
        (col(Adjustment.kind) == "debit", col(Adjustment.amount)), else_=-col(Adjustment.amount)
    )
    # one net amount per statement, so joining it keeps one row per statement for the count
    notes = (
        sa_select(col(Adjustment.statement_id), func.sum(signed).label("amount"))
        .where(col(Adjustment.state) == AdjustmentState.approved.value)
        .group_by(col(Adjustment.statement_id))
        .subquery()
    )
    keys = (col(Statement.agency_id), col(Statement.service_company_id), col(Statement.month))
    rows = session.execute(
        sa_select(*keys, func.count(), func.sum(Statement.total_amount), func.sum(notes.c.amount))
        .outerjoin(notes, notes.c.statement_id == col(Statement.id))
        .where(*bounds)
        .group_by(*keys)
        .order_by(col(Statement.month), col(Statement.agency_id))
    ).all()
    return [
        {
            "agency_id": a,
            "service_company_id": c,
            "month": m,
            "statements": int(n),
            "total_amount": int(t or 0) + int(d or 0),
        }
        for a, c, m, n, t, d in rows
    ]


def unassigned(session: Session, principal: Principal, *, month: str) -> list[dict[str, Any]]:
    """Usage billed to no contract (servers nobody owns, time outside a contract's period),
    rated at the provider's company's prices: the center's to chase."""
    require_center(session, principal, READ)
    try:
        rating.parse_month(month)
    except ValueError as exc:
        raise Invalid.field("month", str(exc)) from exc
    seconds = func.sum(RatedUsage.seconds)
    rows = session.execute(
        sa_select(
            col(RatedUsage.server_id),
            _SERVER.c.name,
            col(RatedUsage.provider_id),
            col(RatedUsage.service_company_id),
            col(RatedUsage.agency_id),
            col(RatedUsage.resource_class),
            col(RatedUsage.quantity),
            col(RatedUsage.unit_price),
            seconds,
        )
        .join(_SERVER, _SERVER.c.id == col(RatedUsage.server_id))
        .where(col(RatedUsage.month) == month, col(RatedUsage.in_contract).is_(False))
        .group_by(
            col(RatedUsage.server_id),
            _SERVER.c.name,
            col(RatedUsage.provider_id),
            col(RatedUsage.service_company_id),
            col(RatedUsage.agency_id),
            col(RatedUsage.resource_class),
            col(RatedUsage.quantity),
            col(RatedUsage.unit_price),
        )
        .order_by(_SERVER.c.name, RatedUsage.resource_class)
    ).all()
    return [
        {
            "server_id": sid,
            "server_name": name,
            "provider_id": pid,
            "service_company_id": cid,
            "agency_id": aid,
            "resource_class": cls,
            "quantity": int(qty),
            "seconds": int(secs),
            "unit_price": Decimal(price),
            "amount": rating.line_amount(Decimal(price), int(qty), int(secs), cls),
        }
        for sid, name, pid, cid, aid, cls, qty, price, secs in rows
    ]


def generate_due(session: Session) -> int:
    """The scheduler's monthly run: draft last month's statements for contracts that have
    none yet (on the 1st, or the first run after downtime)."""
    now = clock.now()
    this_start, _ = rating.month_bounds(rating.month_of(now))
    previous = rating.month_of(this_start - timedelta(seconds=1))
    contracts = _contracts_in(session, previous, None, None)
    have = set(
        session.execute(select(Statement.contract_id).where(Statement.month == previous)).scalars()
    )
    missing = [c.id for c in contracts if c.id not in have]
    done = 0
    for cid in missing:
        done += len(
            generate(session, Principal.system("statements"), month=previous, contract_id=cid)
        )
    return done
