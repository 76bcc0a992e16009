"""Metering: lifecycle events become usage intervals; elapsed time in intervals becomes rated
usage. Both steps are idempotent and safe to interrupt at any point.

- `apply_events` takes events not yet metered in time order, closes the server's open intervals
  that the event changes and opens their successors, and marks the events metered, all in the
  caller's transaction. A crash before the commit leaves everything as it was.
- `rate` moves each interval's `rated_until` forward by compare-and-set and adds the seconds it
  covered to `rated_usage` in the same transaction. Whoever loses the compare-and-set (a second
  scheduler, a rerun after a crash that did commit) adds nothing, so no second is rated twice.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import case, func, or_, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select

from billing import rating
from billing.models import (
    UNASSIGNED,
    Contract,
    ContractStatus,
    LifecycleEvent,
    LifecycleKind,
    PriceCatalog,
    PriceItem,
    RatedUsage,
    UsageInterval,
)
from broker.core import clock
from broker.core.db import SessionSource

log = structlog.get_logger(__name__)

_ENDING = frozenset({LifecycleKind.deleted.value, LifecycleKind.gone.value})
# events of one instant apply in the order things happen to a server: it is seen, then owned,
# then changed, then it ends (event ids are random and order nothing)
_KIND_RANK = case(
    {
        LifecycleKind.discovered.value: 0,
        LifecycleKind.created.value: 1,
        LifecycleKind.adopted.value: 2,
        LifecycleKind.deleted.value: 4,
        LifecycleKind.gone.value: 4,
    },
    value=col(LifecycleEvent.kind),
    else_=3,
)
# one key for every billing writer on PostgreSQL (metering batches, statements): they take
# turns, so they cannot deadlock on each other's row locks or race to create one statement
_BILLING_LOCK = text("SELECT pg_advisory_xact_lock(7023615490417245)")


def billing_lock(session: Session) -> None:
    """Serialize billing writers until the caller's transaction ends (SQLite's writers are
    serialized already)."""
    if session.get_bind().dialect.name == "postgresql":
        session.connection().execute(_BILLING_LOCK)


def _wanted(event: LifecycleEvent) -> dict[str, int]:
    if event.kind in _ENDING:
        return {}
    return {
        cls: int(q)
        for cls, q in (event.sizes or {}).items()
        if int(q) > 0 and cls not in rating.UNBILLED_CLASSES
    }


def apply_events(session: Session, *, limit: int | None = 5000) -> int:
    """Turn up to `limit` unmetered events into intervals; returns how many were applied."""
    billing_lock(session)
    postgres = session.get_bind().dialect.name == "postgresql"
    stmt = (
        select(LifecycleEvent)
        .where(col(LifecycleEvent.metered_at).is_(None))
        .order_by(col(LifecycleEvent.at), _KIND_RANK, col(LifecycleEvent.id))
        .limit(limit)
    )
    if postgres:
        # a second metering run waits here, then finds these rows metered and skips them
        stmt = stmt.with_for_update()
    events = list(session.execute(stmt).scalars())
    if not events:
        return 0
    servers = {e.server_id for e in events}
    open_by_server: dict[uuid.UUID, dict[str, UsageInterval]] = defaultdict(dict)
    open_stmt = select(UsageInterval).where(
        col(UsageInterval.server_id).in_(servers), col(UsageInterval.ended_at).is_(None)
    )
    if postgres:
        # read rated_until fresh and hold it: a concurrent `rate` waits, then loses its
        # compare-and-set on ended_at instead of rating past the end written here. Locked in id
        # order, as `rate` updates them, so the two never wait for each other in a circle.
        open_stmt = open_stmt.order_by(col(UsageInterval.id)).with_for_update()
    for iv in session.execute(open_stmt.execution_options(populate_existing=True)).scalars():
        open_by_server[iv.server_id][iv.resource_class] = iv
    latest = _latest_applied(session, servers)
    metered = clock.now()
    for event in events:
        # an event older than one already applied to its server describes a state that has
        # been overtaken (a late commit): applying it would reopen a deleted server or bill the
        # same time at two sizes, so it is marked metered and changes nothing
        seen = latest.get(event.server_id)
        if seen is None or event.at >= seen:
            _apply(session, event, open_by_server[event.server_id])
            latest[event.server_id] = event.at
        else:
            log.warning(
                "lifecycle event older than its server's last: skipped",
                event_id=str(event.id),
                server=str(event.server_id),
                kind=event.kind,
            )
        event.metered_at = metered
        session.add(event)
    session.flush()
    return len(events)


def _latest_applied(session: Session, servers: set[uuid.UUID]) -> dict[uuid.UUID, datetime]:
    """Per server, the time of the last event metering applied: the latest start or end of
    its intervals (every applied event that changed anything opened or closed one)."""
    rows = session.execute(
        select(
            col(UsageInterval.server_id),
            func.max(col(UsageInterval.started_at)),
            func.max(col(UsageInterval.ended_at)),
        )
        .where(col(UsageInterval.server_id).in_(servers))
        .group_by(col(UsageInterval.server_id))
    ).all()
    return {sid: max(t for t in (started, ended) if t is not None) for sid, started, ended in rows}


def _apply(session: Session, event: LifecycleEvent, current: dict[str, UsageInterval]) -> None:
    wanted = _wanted(event)
    on = rating.powered(event.power_state)
    for cls in sorted(set(current) | set(wanted)):
        old = current.get(cls)
        quantity = wanted.get(cls)
        if (
            old is not None
            and quantity is not None
            and (old.quantity, old.powered, old.contract_id, old.tenant_id)
            == (quantity, on, event.contract_id, event.tenant_id)
        ):
            continue
        start = event.at
        if old is not None:
            # an event committed late (older than time already rated, or than the interval it
            # would close) takes effect where rating stopped, rather than reaching back into
            # time already rated: those seconds would be rated again for the successor
            old.ended_at = max(event.at, old.rated_until)
            start = old.ended_at
            session.add(old)
            del current[cls]
        if quantity is not None:
            new = UsageInterval(
                server_id=event.server_id,
                tenant_id=event.tenant_id,
                agency_id=event.agency_id,
                contract_id=event.contract_id,
                provider_id=event.provider_id,
                service_company_id=event.service_company_id,
                resource_class=cls,
                quantity=quantity,
                powered=on,
                started_at=start,
                rated_until=start,
                opened_by=event.id,
            )
            session.add(new)
            current[cls] = new


@dataclass
class _Prices:
    """Every price list, by service company and resource class, read once per rating pass."""

    windows: dict[tuple[uuid.UUID, str], list[rating.PriceWindow]] = field(default_factory=dict)

    @classmethod
    def load(cls, session: Session) -> _Prices:
        out: dict[tuple[uuid.UUID, str], list[rating.PriceWindow]] = defaultdict(list)
        rows = session.execute(
            select(PriceCatalog, PriceItem).join(
                PriceItem, col(PriceItem.catalog_id) == col(PriceCatalog.id)
            )
        ).all()
        for catalog, item in rows:
            out[(catalog.service_company_id, item.resource_class)].append(
                rating.PriceWindow(
                    item_id=item.id,
                    unit_price=item.unit_price,
                    start=catalog.effective_from,
                    end=catalog.effective_until,
                    bill_compute_when_off=catalog.bill_compute_when_off,
                )
            )
        return cls(dict(out))

    def of(self, company: uuid.UUID | None, resource_class: str) -> list[rating.PriceWindow]:
        if company is None:
            return []
        return self.windows.get((company, resource_class), [])


def _upsert(session: Session, rows: list[dict[str, Any]]) -> None:
    """Add seconds to rated rows, creating them on first use: one statement per row batch."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    make = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = make(RatedUsage.__table__)  # type: ignore[attr-defined]
    stmt = stmt.on_conflict_do_update(
        index_elements=["interval_id", "month", "price_item_id", "billed_to"],
        set_={
            "seconds": stmt.table.c.seconds + stmt.excluded.seconds,
            "last_at": stmt.excluded.last_at,
        },
    )
    session.connection().execute(stmt, rows)


_ADVANCE_PG = text(
    """
    UPDATE usage_interval AS u SET rated_until = v.new_until
    FROM unnest(CAST(:ids AS uuid[]), CAST(:old_until AS timestamptz[]),
                CAST(:old_end AS timestamptz[]), CAST(:new_until AS timestamptz[]))
         AS v(id, old_until, old_end, new_until)
    WHERE u.id = v.id AND u.rated_until = v.old_until
      AND u.ended_at IS NOT DISTINCT FROM v.old_end
    RETURNING u.id
    """
)
_LOCK_PG = text(
    "SELECT id FROM usage_interval WHERE id = ANY(CAST(:ids AS uuid[])) ORDER BY id FOR UPDATE"
)


def _advance(
    session: Session, intervals: list[UsageInterval], ends: dict[uuid.UUID, datetime]
) -> set[uuid.UUID]:
    """Compare-and-set each interval's rated_until from what was read to its new end, only if
    neither it nor the interval's end moved meanwhile; returns the ids this pass won. The end
    must still hold too: an event closing the interval meanwhile makes this pass lose, and the
    next one rates up to the new end."""
    conn = session.connection()
    ordered = sorted(intervals, key=lambda i: i.id)
    if conn.dialect.name == "postgresql":
        ids = [iv.id for iv in ordered]
        # row locks in id order, as apply_events and any other rating pass take them: one
        # statement for the batch, and still no deadlock
        conn.execute(_LOCK_PG, {"ids": ids})
        result = conn.execute(
            _ADVANCE_PG,
            {
                "ids": ids,
                "old_until": [iv.rated_until for iv in ordered],
                "old_end": [iv.ended_at for iv in ordered],
                "new_until": [ends[iv.id] for iv in ordered],
            },
        )
        return {row[0] for row in result}
    won: set[uuid.UUID] = set()
    for iv in ordered:
        same_end = (
            col(UsageInterval.ended_at).is_(None)
            if iv.ended_at is None
            else col(UsageInterval.ended_at) == iv.ended_at
        )
        moved = conn.execute(
            update(UsageInterval)
            .where(
                col(UsageInterval.id) == iv.id,
                col(UsageInterval.rated_until) == iv.rated_until,
                same_end,
            )
            .values(rated_until=ends[iv.id])
        ).rowcount
        if moved == 1:
            won.add(iv.id)
    return won


def rate(
    session: Session,
    *,
    until: datetime | None = None,
    limit: int | None = 5000,
    exact: bool = False,
) -> int:
    """Rate elapsed time, up to the last whole hour before `until` (default now), or up to
    `until` itself when `exact` (a month's end, which is not a whole UTC hour in every zone);
    returns the number of intervals that moved forward."""
    billing_lock(session)
    target = (until or clock.now()) if exact else rating.floor_hour(until or clock.now())
    stmt = (
        select(UsageInterval)
        .where(
            col(UsageInterval.rated_until) < target,
            or_(
                col(UsageInterval.ended_at).is_(None),
                col(UsageInterval.rated_until) < col(UsageInterval.ended_at),
            ),
        )
        .order_by(col(UsageInterval.rated_until), col(UsageInterval.id))
        .limit(limit)
    )
    intervals = list(session.execute(stmt).scalars())
    if not intervals:
        return 0
    prices = _Prices.load(session)
    # the batch's own contracts, and every contract of its agencies (renewals pay outside them)
    bound = {iv.contract_id for iv in intervals if iv.contract_id is not None}
    agencies = {iv.agency_id for iv in intervals if iv.agency_id is not None}
    contracts = {
        c.id: c
        for c in session.execute(
            select(Contract).where(
                or_(col(Contract.id).in_(bound), col(Contract.agency_id).in_(agencies))
            )
        ).scalars()
    }
    # periods turned into instants once per batch, not once per interval that may use them
    window = {
        c.id: rating.contract_window(c.id, c.starts_on, c.ends_on) for c in contracts.values()
    }
    signed: dict[tuple[uuid.UUID, uuid.UUID], list[rating.ContractWindow]] = defaultdict(list)
    for c in sorted(contracts.values(), key=lambda c: (c.starts_on, c.number)):
        if c.status != ContractStatus.terminated:
            signed[(c.agency_id, c.service_company_id)].append(window[c.id])
    moved = 0
    rows: list[dict[str, Any]] = []
    ends = {
        iv.id: min(target, iv.ended_at) if iv.ended_at is not None else target for iv in intervals
    }
    won = _advance(session, intervals, ends)
    for iv in sorted(intervals, key=lambda i: i.id):
        if iv.id not in won:
            continue
        end = ends[iv.id]
        moved += 1
        contract = contracts.get(iv.contract_id) if iv.contract_id is not None else None
        company = contract.service_company_id if contract is not None else iv.service_company_id
        # the server's own contract pays where it runs; outside it, the agency's other contracts
        # with the same company (a renewal, or one signed after the server was built)
        payers = [window[contract.id]] if contract is not None else []
        if iv.agency_id is not None and company is not None:
            own = payers[0].contract_id if payers else None
            payers += [w for w in signed[(iv.agency_id, company)] if w.contract_id != own]
        for piece in rating.cut(
            iv.rated_until,
            end,
            resource_class=iv.resource_class,
            is_powered=iv.powered,
            prices=prices.of(company, iv.resource_class),
            contracts=payers,
        ):
            rows.append(
                {
                    "id": uuid.uuid4(),
                    "interval_id": iv.id,
                    "server_id": iv.server_id,
                    "tenant_id": iv.tenant_id,
                    "agency_id": iv.agency_id,
                    "contract_id": piece.contract_id,
                    "in_contract": piece.in_contract,
                    "billed_to": piece.contract_id or UNASSIGNED,
                    "service_company_id": company,
                    "provider_id": iv.provider_id,
                    "price_item_id": piece.price.item_id,
                    "resource_class": iv.resource_class,
                    "quantity": iv.quantity,
                    "unit_price": piece.price.unit_price,
                    "month": piece.month,
                    "seconds": piece.seconds,
                    "first_at": piece.start,
                    "last_at": piece.end,
                }
            )
    # rows of one interval never collide within a batch: its pieces differ in month, price or payer
    _upsert(session, rows)
    session.expire_all()
    return moved


@dataclass
class MeterReport:
    events: int = 0
    intervals_rated: int = 0

    def total(self) -> int:
        return self.events + self.intervals_rated


def run(db: SessionSource, *, until: datetime | None = None, batch: int = 2000) -> MeterReport:
    """The hourly job: meter every pending event, then rate up to the last whole hour. Each
    batch is its own transaction, so a crash loses at most the batch in flight, and a rerun
    picks up where the last commit left off."""
    report = MeterReport()
    while True:
        with db.unit_of_work() as session:
            n = apply_events(session, limit=batch)
        report.events += n
        if n < batch:
            break
    while True:
        with db.unit_of_work() as session:
            n = rate(session, until=until, limit=batch)
        report.intervals_rated += n
        if n < batch:
            break
    log.info("metering pass", events=report.events, intervals=report.intervals_rated)
    return report


def catch_up(session: Session, *, until: datetime) -> None:
    """Meter and rate everything up to `until` in the caller's transaction (statements do this
    so a month is complete before it is summed)."""
    while apply_events(session, limit=5000):
        pass
    while rate(session, until=until, limit=5000, exact=True):
        pass


def rated_seconds(session: Session, ids: Iterable[uuid.UUID]) -> int:
    """Seconds rated for the given intervals (tests and diagnostics)."""
    total = session.execute(
        select(func.coalesce(func.sum(RatedUsage.seconds), 0)).where(
            col(RatedUsage.interval_id).in_(list(ids))
        )
    ).scalar_one()
    return int(total)
