"""The quota ledger: reserve, commit, release — never more than any limit allows.

Every operation runs inside the caller's transaction and starts by locking the quota rows it will
read or change, always in the same order (depth, then resource class): PostgreSQL takes
`SELECT … FOR UPDATE` row locks; SQLite's writing sessions already hold the database's write lock
from `BEGIN IMMEDIATE`. Under those locks the subtree counters (`quota.committed`,
`quota.reserved`) are exact, less the reservations that have expired but not been swept yet,
which are subtracted so that an expired reservation is never counted.

Which rows are locked: the tenant's own row and its agency's row. The center's row is not locked
on the hot path: every agency must hold an explicit limit to reserve at all, and the sum of the
agencies' limits never exceeds the center's (enforced, under the center row's lock, by every
limit change), so the center's usage cannot pass its limit while each agency stays within its
own. Reservations for different agencies therefore never wait for one another.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import bindparam, func, insert, text, update
from sqlalchemy import select as sa_select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select

from broker.core import clock
from broker.core.errors import Conflict, FieldError, Invalid, NotFound, OverLimit, QuotaExceeded
from broker.core.settings import get_settings
from broker.tenancy.models import Tenant, TenantKind, TenantStatus
from quotas.models import Allocation, Quota, Reservation, ResourceClass

DEPTH = {TenantKind.center.value: 0, TenantKind.agency.value: 1, TenantKind.system.value: 2}
RESERVED, COMMITTED, RELEASED = "reserved", "committed", "released"


# --- pure arithmetic ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LimitState:
    """One (tenant, class) as a reservation sees it, under lock."""

    tenant_id: str
    tenant_code: str
    level: str
    resource_class: str
    limit: int | None  # None: no limit of its own at this level
    usage: int  # committed + unexpired reserved, whole subtree
    window: str = "valid"  # valid | expired | not_yet_valid | no_quota


def compute_shortfalls(states: Iterable[LimitState], deltas: Mapping[str, int]) -> list[OverLimit]:
    """Every level and class where the positive deltas do not fit; shrinks always fit."""
    over: list[OverLimit] = []
    for s in states:
        delta = deltas.get(s.resource_class, 0)
        if delta <= 0:
            continue
        if s.window != "valid":
            over.append(
                OverLimit(
                    s.resource_class,
                    s.tenant_id,
                    s.tenant_code,
                    s.level,
                    s.limit or 0,
                    s.usage,
                    delta,
                    s.window,
                )
            )
        elif s.limit is not None and s.usage + delta > s.limit:
            over.append(
                OverLimit(
                    s.resource_class, s.tenant_id, s.tenant_code, s.level, s.limit, s.usage, delta
                )
            )
    return over


class Windowed(Protocol):
    hard_limit: int | None
    valid_from: datetime
    valid_until: datetime | None


def window_state(q: Windowed | None, now: datetime, *, required: bool) -> str:
    if q is None or q.hard_limit is None:
        return "no_quota" if required else "valid"
    if q.valid_from > now:
        return "not_yet_valid"
    if q.valid_until is not None and q.valid_until <= now:
        return "expired"
    return "valid"


def counter_changes(amount: int, transition: str) -> tuple[int, int]:
    """(Δcommitted, Δreserved) of one allocation's state transition.

    A negative (shrink) allocation holds nothing while reserved: capacity is freed only once the
    shrink is committed.
    """
    held = max(amount, 0)
    return {
        "reserve": (0, held),
        "commit": (amount, -held),
        "release_reserved": (0, -held),
        "release_committed": (-amount, 0),
    }[transition]


# --- loading and locking -----------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    id: uuid.UUID
    code: str
    kind: str
    status: str


@dataclass(frozen=True)
class Path:
    """The levels a reservation touches: the agency, and the system when it is one."""

    tenant: Level
    agency: Level
    levels: tuple[Level, ...]


# Hot statements are built once: constructing SQLAlchemy statements per call costs more Python
# time than executing them.
_TENANT = Tenant.__table__  # type: ignore[attr-defined]
_PARENT = _TENANT.alias("parent")
# the tenant's and its parent's (id, code, kind, status): what `_path_of` reads
_PATH_COLUMNS = (
    _TENANT.c.id,
    _TENANT.c.code,
    _TENANT.c.kind,
    _TENANT.c.status,
    _PARENT.c.id,
    _PARENT.c.code,
    _PARENT.c.kind,
    _PARENT.c.status,
)
_PATH_STMT = (
    sa_select(*_PATH_COLUMNS)
    .select_from(_TENANT.outerjoin(_PARENT, _PARENT.c.id == _TENANT.c.parent_id))
    .where(_TENANT.c.id == bindparam("tid"))
)


def _path(session: Session, tenant_id: uuid.UUID) -> Path:
    found = session.connection().execute(_PATH_STMT, {"tid": tenant_id}).first()
    if found is None:
        raise NotFound(f"tenant {tenant_id} not found")
    return _path_of(found)


def _path_of(found: Any) -> Path:
    """The path from a row of the tenant's and its parent's (id, code, kind, status)."""
    tenant = Level(*found[:4])
    if tenant.kind == TenantKind.center:
        raise Invalid.field(
            "tenant_id", "quota is consumed by agencies and systems, not the center"
        )
    if tenant.kind == TenantKind.system:
        agency = Level(*found[4:8])
        return Path(tenant, agency, (agency, tenant))
    return Path(tenant, tenant, (tenant,))


_CLASS_CACHE_SECONDS = 30.0
_class_cache: dict[str, tuple[float, dict[str, ResourceClass]]] = {}


def resource_classes(session: Session) -> dict[str, ResourceClass]:
    """The configured classes; cached for a few seconds per database, being read on every call."""
    key = str(session.get_bind().engine.url)
    hit = _class_cache.get(key)
    if hit is not None and time.monotonic() - hit[0] < _CLASS_CACHE_SECONDS:
        return hit[1]
    rows = session.execute(select(ResourceClass).order_by(col(ResourceClass.sort_order)))
    classes = {rc.code: ResourceClass(**rc.model_dump()) for rc in rows.scalars()}
    _class_cache[key] = (time.monotonic(), classes)
    return classes


def validate_deltas(
    session: Session, deltas: Mapping[str, int], *, field: str = "deltas"
) -> dict[str, int]:
    """Known classes, integer amounts within the class's bounds; zero entries dropped."""
    known = resource_classes(session)
    errors: list[FieldError] = []
    clean: dict[str, int] = {}
    for code, amount in deltas.items():
        where = f"{field}.{code}"
        if code not in known:
            errors.append(FieldError(where, f"unknown resource class {code!r}", "unknown_class"))
        elif isinstance(amount, bool) or not isinstance(amount, int):
            errors.append(FieldError(where, "must be an integer", "int_type"))
        elif abs(amount) > known[code].max_amount:
            errors.append(
                FieldError(where, f"must be within ±{known[code].max_amount}", "out_of_range")
            )
        elif amount != 0:
            clean[code] = amount
    if errors:
        raise Invalid("; ".join(f"{e.field}: {e.message}" for e in errors), errors)
    if not clean:
        raise Invalid.field(field, "ask for at least one non-zero amount", "empty")
    return clean


@dataclass
class QuotaRow:
    """A locked quota row, read with Core (the hot path keeps ORM bookkeeping out)."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    resource_class: str
    hard_limit: int | None
    valid_from: datetime
    valid_until: datetime | None
    committed: int
    reserved: int


_QUOTA = Quota.__table__  # type: ignore[attr-defined]
_ALLOCATION = Allocation.__table__  # type: ignore[attr-defined]
_RESERVATION = Reservation.__table__  # type: ignore[attr-defined]
_ROW_COLUMNS = [_QUOTA.c[name] for name in QuotaRow.__dataclass_fields__]
_LOCK_STMT = (
    sa_select(*_ROW_COLUMNS)
    .where(
        _QUOTA.c.tenant_id.in_(bindparam("tids", expanding=True)),
        _QUOTA.c.resource_class.in_(bindparam("classes", expanding=True)),
    )
    # one total order for every locker, also those spanning several agencies (sweeps)
    .order_by(_QUOTA.c.depth, _QUOTA.c.resource_class, _QUOTA.c.tenant_id)
    .with_for_update()
)
# the same lock, also telling whether the reservation's ref is taken: one round trip for both
_LOCK_WITH_REF_STMT = (
    sa_select(
        *_ROW_COLUMNS,
        sa_select(_RESERVATION.c.id)
        .where(_RESERVATION.c.ref == bindparam("ref"))
        .scalar_subquery()
        .label("existing"),
    )
    .where(
        _QUOTA.c.tenant_id.in_(bindparam("tids", expanding=True)),
        _QUOTA.c.resource_class.in_(bindparam("classes", expanding=True)),
    )
    .order_by(_QUOTA.c.depth, _QUOTA.c.resource_class, _QUOTA.c.tenant_id)
    .with_for_update(of=_QUOTA)
)
_BY_REF_STMT = select(Reservation).where(Reservation.ref == bindparam("ref"))
_REF_TAKEN = sa_select(_RESERVATION.c.id).where(_RESERVATION.c.ref == bindparam("ref"))
_INSERT_RESERVATION = insert(_RESERVATION)
# PostgreSQL: the reservation, its allocations and the counters in one statement; if the ref
# was taken meanwhile (a concurrent retry), the insert yields no row and nothing else is written
_PG_WRITE_RESERVATION = text(
    "WITH r AS ("
    " INSERT INTO reservation (id, ref, tenant_id, agency_id, owner_ref, state, expires_at,"
    " created_at, created_by)"
    " VALUES (:id, :ref, :tenant_id, :agency_id, :owner_ref, 'reserved', :expires_at,"
    " :created_at, :created_by)"
    " ON CONFLICT (ref) DO NOTHING RETURNING id),"
    " a AS ("
    " INSERT INTO allocation (id, reservation_id, tenant_id, agency_id, resource_class, amount,"
    " state, owner_ref, expires_at, created_at)"
    " SELECT x.id, r.id, :tenant_id, :agency_id, x.rc, x.amount, 'reserved', :owner_ref,"
    " :expires_at, :created_at"
    " FROM r, unnest(CAST(:alloc_ids AS uuid[]), CAST(:rcs AS varchar[]),"
    " CAST(:amounts AS bigint[])) AS x(id, rc, amount)),"
    " u AS ("
    " UPDATE quota SET committed = quota.committed + d.dc, reserved = quota.reserved + d.dr,"
    " updated_at = :created_at"
    " FROM r, unnest(CAST(:qids AS uuid[]), CAST(:dcs AS bigint[]), CAST(:drs AS bigint[]))"
    " AS d(id, dc, dr) WHERE quota.id = d.id)"
    " SELECT id FROM r"
)
Rows = dict[tuple[uuid.UUID, str], QuotaRow]


def insert_quota_rows(session: Session, keys: list[tuple[uuid.UUID, str, int]]) -> None:
    """Create (tenant, class, depth) quota rows without a limit, keeping any that exist."""
    now = clock.now()
    dialect = session.get_bind().dialect.name
    insert_for = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = (
        insert_for(_QUOTA)
        .values(
            [
                {
                    "id": uuid.uuid4(),
                    "tenant_id": tid,
                    "resource_class": rc,
                    "depth": depth,
                    "hard_limit": None,
                    "valid_from": now,
                    "committed": 0,
                    "reserved": 0,
                    "created_at": now,
                    "updated_at": now,
                }
                for tid, rc, depth in keys
            ]
        )
        .on_conflict_do_nothing(index_elements=["tenant_id", "resource_class"])
    )
    session.connection().execute(stmt)


def _locked(session: Session, tenant_ids: Iterable[uuid.UUID], classes: Iterable[str]) -> Rows:
    """Lock the tenants' quota rows for `classes` in the global order (depth, class, tenant)."""
    result = session.connection().execute(
        _LOCK_STMT, {"tids": sorted(set(tenant_ids), key=str), "classes": sorted(set(classes))}
    )
    return {(r[1], r[2]): QuotaRow(*r) for r in result}


def lock_rows(session: Session, path: Path, classes: Iterable[str]) -> Rows:
    """Lock the quota rows of the path's levels for `classes`."""
    return _locked(session, [t.id for t in path.levels], classes)


def expired_reserved(
    session: Session, agency_id: uuid.UUID, classes: Iterable[str], now: datetime
) -> dict[tuple[uuid.UUID, str], int]:
    """Amounts still counted in `reserved` although their reservation has expired, per tenant."""
    stmt = (
        select(Allocation.tenant_id, Allocation.resource_class, func.sum(Allocation.amount))
        .where(
            Allocation.agency_id == agency_id,
            Allocation.state == RESERVED,
            col(Allocation.resource_class).in_(sorted(set(classes))),
            col(Allocation.expires_at) <= now,
            col(Allocation.amount) > 0,
        )
        .group_by(col(Allocation.tenant_id), col(Allocation.resource_class))
    )
    return {(t, c): int(s) for t, c, s in session.execute(stmt).all()}


def limit_states(
    path: Path,
    rows: Mapping[tuple[uuid.UUID, str], QuotaRow | Quota],
    expired: Mapping[tuple[uuid.UUID, str], int],
    classes: Iterable[str],
    now: datetime,
) -> list[LimitState]:
    """What each level looks like to a reservation (pure, given the locked rows)."""
    states: list[LimitState] = []
    for rc in sorted(set(classes)):
        for level in path.levels:
            q = rows.get((level.id, rc))
            if level.kind == TenantKind.system:
                lapsed = expired.get((level.id, rc), 0)
            else:
                lapsed = sum(v for (_, c), v in expired.items() if c == rc)
            usage = (q.committed + q.reserved - lapsed) if q is not None else 0
            states.append(
                LimitState(
                    tenant_id=str(level.id),
                    tenant_code=level.code,
                    level=level.kind,
                    resource_class=rc,
                    limit=q.hard_limit if q is not None else None,
                    usage=usage,
                    window=window_state(q, now, required=level.kind == TenantKind.agency),
                )
            )
    return states


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


_MOVE_COUNTERS = (
    update(_QUOTA)
    .where(_QUOTA.c.id == bindparam("qid"))
    .values(
        committed=_QUOTA.c.committed + bindparam("dc"),
        reserved=_QUOTA.c.reserved + bindparam("dr"),
        updated_at=bindparam("now"),
    )
)
_PG_MOVE_COUNTERS = text(
    "UPDATE quota SET committed = quota.committed + d.dc, reserved = quota.reserved + d.dr, "
    "updated_at = :now "
    "FROM unnest(CAST(:ids AS uuid[]), CAST(:dcs AS bigint[]), CAST(:drs AS bigint[])) "
    "AS d(id, dc, dr) WHERE quota.id = d.id"
)
_INSERT_ALLOCATION = insert(_ALLOCATION)
_PG_INSERT_ALLOCATIONS = text(
    "INSERT INTO allocation (id, reservation_id, tenant_id, agency_id, resource_class, amount, "
    "state, owner_ref, expires_at, created_at) "
    "SELECT a.id, :rid, :tid, :aid, a.rc, a.amount, 'reserved', :owner, :expires, :now "
    "FROM unnest(CAST(:ids AS uuid[]), CAST(:rcs AS varchar[]), CAST(:amounts AS bigint[])) "
    "AS a(id, rc, amount)"
)


def _insert_allocations(
    session: Session, reservation: Mapping[str, Any], amounts: list[tuple[str, int]]
) -> None:
    ids = [uuid.uuid4() for _ in amounts]
    if _is_postgres(session):
        session.connection().execute(
            _PG_INSERT_ALLOCATIONS,
            {
                "rid": reservation["id"],
                "tid": reservation["tenant_id"],
                "aid": reservation["agency_id"],
                "owner": reservation["owner_ref"],
                "expires": reservation["expires_at"],
                "now": reservation["created_at"],
                "ids": ids,
                "rcs": [c for c, _ in amounts],
                "amounts": [a for _, a in amounts],
            },
        )
        return
    session.connection().execute(
        _INSERT_ALLOCATION,
        [
            {
                "id": aid,
                "reservation_id": reservation["id"],
                "tenant_id": reservation["tenant_id"],
                "agency_id": reservation["agency_id"],
                "resource_class": code,
                "amount": amount,
                "state": RESERVED,
                "owner_ref": reservation["owner_ref"],
                "expires_at": reservation["expires_at"],
                "created_at": reservation["created_at"],
            }
            for aid, (code, amount) in zip(ids, amounts, strict=True)
        ],
    )


def _move_counters(
    session: Session, rows: Rows, path: Path, changes: Iterable[tuple[str, int]], transition: str
) -> None:
    """Apply allocations' (class, amount) transitions to every level's counters, in one UPDATE."""
    _write_counters(session, _plan_counters(rows, path, changes, transition))


def _plan_counters(
    rows: Rows, path: Path, changes: Iterable[tuple[str, int]], transition: str
) -> dict[uuid.UUID, list[int]]:
    """Per quota row, (Δcommitted, Δreserved); refuses any counter that would drop below zero."""
    changes = list(changes)
    delta: dict[uuid.UUID, list[int]] = {}
    for level in path.levels:
        for rc, amount in changes:
            q = rows[(level.id, rc)]
            d_committed, d_reserved = counter_changes(amount, transition)
            entry = delta.setdefault(q.id, [0, 0])
            entry[0] += d_committed
            entry[1] += d_reserved
            q.committed += d_committed
            q.reserved += d_reserved
            if q.committed < 0 or q.reserved < 0:
                raise Conflict(
                    f"{rc} at {level.code} would drop below zero: "
                    "more is being released than was committed"
                )
    return delta


def _write_counters(session: Session, delta: dict[uuid.UUID, list[int]]) -> None:
    if not delta:
        return
    now = clock.now()
    if _is_postgres(session):
        # one round trip for every row, as arrays
        ids = list(delta)
        session.connection().execute(
            _PG_MOVE_COUNTERS,
            {
                "ids": ids,
                "dcs": [delta[i][0] for i in ids],
                "drs": [delta[i][1] for i in ids],
                "now": now,
            },
        )
    else:
        # SQLite runs in-process: a prepared executemany costs no round trips
        session.connection().execute(
            _MOVE_COUNTERS,
            [{"qid": qid, "dc": dc, "dr": dr, "now": now} for qid, (dc, dr) in delta.items()],
        )


# --- operations --------------------------------------------------------------------------------


def check(session: Session, tenant_id: uuid.UUID, deltas: Mapping[str, int]) -> list[OverLimit]:
    """What-if: where and by how much `deltas` would not fit now; reserves and locks nothing."""
    path = _path(session, tenant_id)
    clean = validate_deltas(session, deltas)
    now = clock.now()
    stmt = select(Quota).where(
        col(Quota.tenant_id).in_([t.id for t in path.levels]),
        col(Quota.resource_class).in_(sorted(clean)),
    )
    rows = {
        (q.tenant_id, q.resource_class): q
        for q in session.execute(stmt.execution_options(populate_existing=True)).scalars()
    }
    expired = expired_reserved(session, path.agency.id, clean, now)
    return compute_shortfalls(limit_states(path, rows, expired, clean, now), clean)


def _shortfalls_locked(
    session: Session, path: Path, rows: Rows, clean: Mapping[str, int], now: datetime
) -> list[OverLimit]:
    # the counters include expired reservations: if it fits even so, no need to look for them
    over = compute_shortfalls(limit_states(path, rows, {}, clean, now), clean)
    if over:
        expired = expired_reserved(session, path.agency.id, clean, now)
        over = compute_shortfalls(limit_states(path, rows, expired, clean, now), clean)
    return over


def reserve(
    session: Session,
    tenant_id: uuid.UUID,
    deltas: Mapping[str, int],
    *,
    ref: str,
    actor: str,
    ttl: timedelta | None = None,
    owner_ref: str | None = None,
    force: bool = False,
) -> Reservation:
    """Hold `deltas` for `tenant_id` until committed, released or expired; idempotent on `ref`.

    `force` books past the limits (never past a missing or lapsed quota): only for counting what
    already exists (adopting a server found on a provider), never for creating anything. Usage
    then shows above the limit, and nothing new fits until it is back under."""
    settings = get_settings()
    if not ref or len(ref) > 128:
        raise Invalid.field("ref", "must be 1 to 128 characters")
    ttl = ttl if ttl is not None else timedelta(seconds=settings.reservation_ttl_seconds)
    if not timedelta(seconds=1) <= ttl <= timedelta(seconds=settings.reservation_max_ttl_seconds):
        raise Invalid.field(
            "ttl", f"must be between 1 and {settings.reservation_max_ttl_seconds} seconds"
        )
    clean = validate_deltas(session, deltas)
    path = _path(session, tenant_id)
    if TenantStatus.archived in (path.tenant.status, path.agency.status):
        raise Conflict(f"{path.tenant.kind} {path.tenant.code} is archived")
    rows, taken = _lock_for_reserve(session, path, clean, ref)
    if taken is not None:
        return _replayed(session, ref, tenant_id, clean)

    now = clock.now()
    over = _shortfalls_locked(session, path, rows, clean, now)
    # force goes past a limit, never past a level with no quota or one outside its window
    if over and (not force or any(o.reason != "limit" for o in over)):
        raise QuotaExceeded(over)
    for code, amount in clean.items():
        own = rows.get((tenant_id, code))
        if amount < 0 and (own is None or own.committed + amount < 0):
            held = own.committed if own else 0
            raise Invalid.field(
                f"deltas.{code}",
                f"cannot shrink by {-amount}: only {held} is committed here",
                "below_zero",
            )
    if owner_ref is not None and any(a < 0 for a in clean.values()):
        _check_owner_shrink(session, owner_ref, clean)

    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "ref": ref,
        "tenant_id": tenant_id,
        "agency_id": path.agency.id,
        "owner_ref": owner_ref,
        "state": RESERVED,
        "expires_at": now + ttl,
        "created_at": now,
        "settled_at": None,
        "created_by": actor,
    }
    amounts_in_order = sorted(clean.items())
    counters = _plan_counters(rows, path, amounts_in_order, "reserve")
    if _is_postgres(session):
        qids = list(counters)
        written = (
            session.connection()
            .execute(
                _PG_WRITE_RESERVATION,
                {
                    **values,
                    "alloc_ids": [uuid.uuid4() for _ in amounts_in_order],
                    "rcs": [c for c, _ in amounts_in_order],
                    "amounts": [a for _, a in amounts_in_order],
                    "qids": qids,
                    "dcs": [counters[q][0] for q in qids],
                    "drs": [counters[q][1] for q in qids],
                },
            )
            .first()
        )
        if written is None:  # the same ref, inserted since our lock statement began
            return _replayed(session, ref, tenant_id, clean)
    else:
        # SQLite's write lock (BEGIN IMMEDIATE) already keeps the ref ours; statements are local
        session.connection().execute(_INSERT_RESERVATION, values)
        _insert_allocations(session, values, amounts_in_order)
        _write_counters(session, counters)
    return Reservation(**values)


def _lock_for_reserve(
    session: Session, path: Path, classes: Mapping[str, int], ref: str
) -> tuple[Rows, uuid.UUID | None]:
    """The path's rows, locked, and the id of a reservation already holding `ref` if any."""
    ordered = sorted(classes)
    result = (
        session.connection()
        .execute(
            _LOCK_WITH_REF_STMT,
            {"tids": [t.id for t in path.levels], "classes": ordered, "ref": ref},
        )
        .all()
    )
    rows = {(r[1], r[2]): QuotaRow(*r[:8]) for r in result}
    taken = result[0].existing if result else None
    if not result:
        taken = session.connection().execute(_REF_TAKEN, {"ref": ref}).scalar()
    if taken is None and path.tenant.kind == TenantKind.system:
        missing = [c for c in ordered if (path.tenant.id, c) not in rows]
        if missing:
            # a system's rows are created under its agency's lock, taken just above
            depth = DEPTH[path.tenant.kind]
            insert_quota_rows(session, [(path.tenant.id, c, depth) for c in missing])
            rows.update(_locked(session, [path.tenant.id], ordered))
    return rows, taken


def _replayed(
    session: Session, ref: str, tenant_id: uuid.UUID, clean: Mapping[str, int]
) -> Reservation:
    existing = session.execute(_BY_REF_STMT, {"ref": ref}).scalars().one()
    if existing.tenant_id != tenant_id or amounts(session, existing.id) != clean:
        raise Conflict.field("ref", f"reservation {ref!r} exists with other amounts", "reused")
    return existing


_OWNER_NET = (
    sa_select(_ALLOCATION.c.resource_class, func.sum(_ALLOCATION.c.amount))
    .where(
        _ALLOCATION.c.owner_ref == bindparam("owner"),
        (_ALLOCATION.c.state == COMMITTED)
        | ((_ALLOCATION.c.state == RESERVED) & (_ALLOCATION.c.amount < 0)),
    )
    .group_by(_ALLOCATION.c.resource_class)
)


def _check_owner_shrink(session: Session, owner_ref: str, clean: Mapping[str, int]) -> None:
    """A server cannot shrink below nothing, counting shrinks still pending: otherwise giving its
    allocations back together could raise usage."""
    net: dict[str, int] = dict(session.connection().execute(_OWNER_NET, {"owner": owner_ref}).all())
    for code, amount in clean.items():
        if amount < 0 and int(net.get(code) or 0) + amount < 0:
            raise Invalid.field(
                f"deltas.{code}",
                f"cannot shrink {owner_ref} by {-amount}: it holds {int(net.get(code) or 0)}",
                "below_zero",
            )


def amounts(session: Session, reservation_id: uuid.UUID) -> dict[str, int]:
    stmt = select(Allocation.resource_class, Allocation.amount).where(
        Allocation.reservation_id == reservation_id
    )
    return {c: int(a) for c, a in session.execute(stmt).all()}


_RESERVATION_FIELDS = (
    "id",
    "ref",
    "tenant_id",
    "agency_id",
    "owner_ref",
    "state",
    "expires_at",
    "created_at",
    "settled_at",
    "created_by",
)
_JOINED = _RESERVATION.outerjoin(_ALLOCATION, _ALLOCATION.c.reservation_id == _RESERVATION.c.id)
# what a settlement reads before taking its locks (what never changes: tenant, classes), with
# the tenant's path, in one statement; by id or by ref
_PRE_READ = sa_select(
    *_PATH_COLUMNS, _RESERVATION.c.id.label("rid"), _ALLOCATION.c.resource_class
).select_from(
    _JOINED.join(_TENANT, _TENANT.c.id == _RESERVATION.c.tenant_id).outerjoin(
        _PARENT, _PARENT.c.id == _TENANT.c.parent_id
    )
)
_PRE_READ_BY_ID = _PRE_READ.where(_RESERVATION.c.id == bindparam("key"))
_PRE_READ_BY_REF = _PRE_READ.where(_RESERVATION.c.ref == bindparam("key"))
_HELD = (
    sa_select(
        *[_RESERVATION.c[f] for f in _RESERVATION_FIELDS],
        _ALLOCATION.c.id.label("a_id"),
        _ALLOCATION.c.resource_class.label("a_class"),
        _ALLOCATION.c.amount.label("a_amount"),
        _ALLOCATION.c.state.label("a_state"),
    )
    .select_from(_JOINED)
    .where(_RESERVATION.c.id == bindparam("rid"))
    .order_by(_ALLOCATION.c.resource_class)
)
_PG_SETTLE = text(
    "WITH u AS ("
    " UPDATE quota SET committed = quota.committed + d.dc, reserved = quota.reserved + d.dr,"
    " updated_at = :now"
    " FROM unnest(CAST(:qids AS uuid[]), CAST(:dcs AS bigint[]), CAST(:drs AS bigint[]))"
    " AS d(id, dc, dr) WHERE quota.id = d.id),"
    " a AS ("
    " UPDATE allocation SET state = CAST(:astate AS varchar),"
    " committed_at = CASE WHEN CAST(:astate AS varchar) = 'committed' THEN :now"
    " ELSE committed_at END,"
    " released_at = CASE WHEN CAST(:astate AS varchar) = 'released' THEN :now"
    " ELSE released_at END,"
    " owner_ref = COALESCE(CAST(:owner AS varchar), owner_ref)"
    " WHERE id = ANY(CAST(:aids AS uuid[])))"
    " UPDATE reservation SET state = CAST(:rstate AS varchar),"
    " settled_at = COALESCE(settled_at, :now),"
    " owner_ref = COALESCE(CAST(:owner AS varchar), owner_ref) WHERE id = :rid"
)


@dataclass(frozen=True)
class _Held:
    id: uuid.UUID
    resource_class: str
    amount: int
    state: str


def _lock_reservation(
    session: Session, reservation: uuid.UUID | str
) -> tuple[Reservation, Path, Rows, list[_Held]]:
    """Quota rows first, then the reservation and its allocations, freshly read under the locks.

    What is read before the locks (tenant, classes) never changes; states are read after them.
    """
    conn = session.connection()
    by = _PRE_READ_BY_ID if isinstance(reservation, uuid.UUID) else _PRE_READ_BY_REF
    pre = conn.execute(by, {"key": reservation}).all()
    if not pre:
        raise NotFound(f"reservation {reservation} not found")
    rid = pre[0].rid
    path = _path_of(pre[0])
    classes = sorted({r.resource_class for r in pre if r.resource_class is not None})
    rows = lock_rows(session, path, classes) if classes else {}
    result = conn.execute(_HELD, {"rid": rid}).all()
    res = Reservation(**{f: getattr(result[0], f) for f in _RESERVATION_FIELDS})
    held = [_Held(r.a_id, r.a_class, r.a_amount, r.a_state) for r in result if r.a_id is not None]
    return res, path, rows, held


def _settle_reservation(
    session: Session,
    res: Reservation,
    counters: dict[uuid.UUID, list[int]],
    allocation_ids: list[uuid.UUID],
    state: str,
    owner_ref: str | None = None,
) -> Reservation:
    """Write the counters, the allocations' and the reservation's new state: one statement on
    PostgreSQL. Returns the reservation as it now is."""
    now = clock.now()
    if _is_postgres(session):
        qids = list(counters)
        session.connection().execute(
            _PG_SETTLE,
            {
                "qids": qids,
                "dcs": [counters[q][0] for q in qids],
                "drs": [counters[q][1] for q in qids],
                "now": now,
                "astate": state,
                "owner": owner_ref,
                "aids": allocation_ids,
                "rstate": state,
                "rid": res.id,
            },
        )
    else:
        _write_counters(session, counters)
        _settle(session, allocation_ids, state, now, owner_ref)
        session.connection().execute(
            _SETTLE_RESERVATION,
            {"rid": res.id, "s": state, "at": res.settled_at or now, "owner": owner_ref},
        )
    _forget_loaded(session, [res.id])
    res.state, res.settled_at = state, res.settled_at or now
    if owner_ref is not None:
        res.owner_ref = owner_ref
    return res


def _forget_loaded(session: Session, reservation_ids: Iterable[uuid.UUID]) -> None:
    """Objects this session loaded before a Core update must not show the old state."""
    for rid in reservation_ids:
        loaded = session.identity_map.get(session.identity_key(Reservation, rid))
        if loaded is not None:
            session.expire(loaded)


# statements of the settlement, built once (see _settle); a NULL owner keeps the one there
_SETTLE_RESERVATION = (
    update(_RESERVATION)
    .where(_RESERVATION.c.id == bindparam("rid"))
    .values(
        state=bindparam("s"),
        settled_at=bindparam("at"),
        owner_ref=func.coalesce(
            bindparam("owner", type_=_RESERVATION.c.owner_ref.type), _RESERVATION.c.owner_ref
        ),
    )
)
_SETTLE_ALLOCATIONS = {
    stamp: update(_ALLOCATION)
    .where(_ALLOCATION.c.id == bindparam("aid"))
    .values(
        {
            "state": bindparam("s"),
            stamp: bindparam("at"),
            "owner_ref": func.coalesce(
                bindparam("owner", type_=_ALLOCATION.c.owner_ref.type), _ALLOCATION.c.owner_ref
            ),
        }
    )
    for stamp in ("committed_at", "released_at")
}


def _settle(
    session: Session, ids: list[uuid.UUID], state: str, now: datetime, owner_ref: str | None = None
) -> None:
    if not ids:
        return
    stamp = {COMMITTED: "committed_at", RELEASED: "released_at"}[state]
    if _is_postgres(session):
        values: dict[str, object] = {"state": state, stamp: now}
        if owner_ref is not None:
            values["owner_ref"] = owner_ref
        session.connection().execute(
            update(_ALLOCATION).where(_ALLOCATION.c.id.in_(ids)).values(**values)
        )
        return
    # SQLite runs in-process: one prepared statement executed per allocation costs less than
    # rendering an IN list each time
    session.connection().execute(
        _SETTLE_ALLOCATIONS[stamp],
        [{"aid": aid, "s": state, "at": now, "owner": owner_ref} for aid in ids],
    )


def _merge(*plans: dict[uuid.UUID, list[int]]) -> dict[uuid.UUID, list[int]]:
    out: dict[uuid.UUID, list[int]] = {}
    for plan in plans:
        for qid, (dc, dr) in plan.items():
            entry = out.setdefault(qid, [0, 0])
            entry[0] += dc
            entry[1] += dr
    return out


def commit(
    session: Session, reservation: uuid.UUID | str, *, owner_ref: str | None = None
) -> Reservation:
    """reserved → committed; committing twice is a no-op; an expired or released one is refused."""
    res, path, rows, held = _lock_reservation(session, reservation)
    if res.state == COMMITTED:
        return res
    if res.state == RELEASED:
        raise Conflict(f"reservation {res.ref} was released and cannot be committed")
    if res.expires_at <= clock.now():
        raise Conflict(f"reservation {res.ref} expired at {res.expires_at.isoformat()}")
    pending = [h for h in held if h.state == RESERVED]
    counters = _plan_counters(rows, path, [(h.resource_class, h.amount) for h in pending], "commit")
    return _settle_reservation(
        session, res, counters, [h.id for h in pending], COMMITTED, owner_ref
    )


def release(session: Session, reservation: uuid.UUID | str) -> Reservation:
    """Give back everything a reservation still holds, reserved or committed; idempotent.

    A committed shrink cannot be given back on its own: that would raise usage without a check.
    It goes with the rest of its owner's allocations (release_owner).
    """
    res, path, rows, held = _lock_reservation(session, reservation)
    reserved = [h for h in held if h.state == RESERVED]
    committed = [h for h in held if h.state == COMMITTED]
    if any(h.amount < 0 for h in committed):
        raise Conflict(
            f"reservation {res.ref} is a committed shrink; release its owner's allocations "
            "together instead"
        )
    if res.state == RELEASED and not reserved and not committed:
        return res
    counters = _merge(
        _plan_counters(
            rows, path, [(h.resource_class, h.amount) for h in reserved], "release_reserved"
        ),
        _plan_counters(
            rows, path, [(h.resource_class, h.amount) for h in committed], "release_committed"
        ),
    )
    return _settle_reservation(
        session, res, counters, [h.id for h in reserved + committed], RELEASED
    )


def _lock_paths(
    session: Session, tenant_ids: Iterable[uuid.UUID], classes: Iterable[str]
) -> tuple[dict[uuid.UUID, Path], Rows]:
    """Several tenants' rows in one statement, so the total lock order holds across agencies."""
    paths = {tid: _path(session, tid) for tid in sorted(set(tenant_ids), key=str)}
    levels = {level.id for p in paths.values() for level in p.levels}
    return paths, _locked(session, levels, classes)


_KINDS_STMT = sa_select(_TENANT.c.id, _TENANT.c.kind, _TENANT.c.parent_id).where(
    _TENANT.c.id.in_(bindparam("tids", expanding=True))
)


def lock_tenants(session: Session, tenant_ids: Iterable[uuid.UUID], classes: Iterable[str]) -> None:
    """Take, in one statement and in the global order, the locks that operations for several
    tenants (of several agencies) in one unit of work will take: each operation then finds its
    rows locked already, instead of locking agency after agency out of the global order (and
    deadlocking with a sweep that takes them in order). A no-op on SQLite, whose writing
    sessions hold the whole database."""
    if not _is_postgres(session):
        return
    ids = sorted(set(tenant_ids), key=str)
    if not ids:
        return
    levels: set[uuid.UUID] = set()
    for tid, kind, parent in session.connection().execute(_KINDS_STMT, {"tids": ids}):
        if kind == TenantKind.center:
            continue  # the center's row is never locked by these operations
        levels.add(tid)
        if kind == TenantKind.system and parent is not None:
            levels.add(parent)
    if levels:
        _locked(session, levels, classes)


_OWNER_HELD = sa_select(
    _ALLOCATION.c.id, _ALLOCATION.c.tenant_id, _ALLOCATION.c.resource_class, _ALLOCATION.c.amount
).where(_ALLOCATION.c.owner_ref == bindparam("owner"), _ALLOCATION.c.state == COMMITTED)


def release_owner(session: Session, owner_ref: str) -> int:
    """Release every committed allocation held for `owner_ref` (a deleted server); returns count.

    Together they never raise usage: an owner's shrinks never exceed what it grew by.
    """
    before = session.connection().execute(_OWNER_HELD, {"owner": owner_ref}).all()
    if not before:
        return 0
    paths, rows = _lock_paths(
        session, {a.tenant_id for a in before}, {a.resource_class for a in before}
    )
    # read again under the locks: a concurrent release may have taken some already
    held = session.connection().execute(_OWNER_HELD, {"owner": owner_ref}).all()
    now = clock.now()
    for tenant_id, path in paths.items():
        mine = sorted((a for a in held if a.tenant_id == tenant_id), key=lambda a: a.amount)
        _move_counters(
            session, rows, path, [(a.resource_class, a.amount) for a in mine], "release_committed"
        )
    _settle(session, [a.id for a in held], RELEASED, now)
    return len(held)


_DUE = sa_select(_RESERVATION.c.id, _RESERVATION.c.tenant_id)
_ALLOCATIONS_OF = sa_select(
    _ALLOCATION.c.id,
    _ALLOCATION.c.reservation_id,
    _ALLOCATION.c.resource_class,
    _ALLOCATION.c.amount,
    _ALLOCATION.c.state,
).where(_ALLOCATION.c.reservation_id.in_(bindparam("rids", expanding=True)))


def sweep_expired(session: Session, *, batch: int = 200) -> int:
    """Release reservations past their expiry; returns how many. Safe to run concurrently.

    All the batch's quota rows are locked in one statement, in the global order: locking them
    reservation by reservation would take them out of order and deadlock with reservations.
    """
    now = clock.now()
    conn = session.connection()
    due = conn.execute(
        _DUE.where(_RESERVATION.c.state == RESERVED, _RESERVATION.c.expires_at <= now)
        .order_by(_RESERVATION.c.expires_at)
        .limit(batch)
    ).all()
    if not due:
        return 0
    tenant_of = {r.id: r.tenant_id for r in due}
    classes = {a.resource_class for a in conn.execute(_ALLOCATIONS_OF, {"rids": list(tenant_of)})}
    paths, rows = _lock_paths(session, tenant_of.values(), classes)
    # under the locks: which are still reserved (a commit or release may have won the race)
    still = {
        r.id
        for r in conn.execute(
            _DUE.where(
                _RESERVATION.c.id.in_(list(tenant_of)),
                _RESERVATION.c.state == RESERVED,
                _RESERVATION.c.expires_at <= now,
            )
        )
    }
    if not still:
        return 0
    pending = [
        a for a in conn.execute(_ALLOCATIONS_OF, {"rids": list(still)}) if a.state == RESERVED
    ]
    for rid in still:
        mine = [(a.resource_class, a.amount) for a in pending if a.reservation_id == rid]
        _move_counters(session, rows, paths[tenant_of[rid]], mine, "release_reserved")
    _settle(session, [a.id for a in pending], RELEASED, now)
    conn.execute(
        update(_RESERVATION)
        .where(_RESERVATION.c.id.in_(list(still)))
        .values(state=RELEASED, settled_at=now)
    )
    _forget_loaded(session, still)
    return len(still)
