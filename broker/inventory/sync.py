"""Inventory sync: make the database's picture of a provider match what its driver reports.

One sync of one provider runs in three steps, each its own unit of work, so that no transaction is
open during a remote call and none holds more than one agency's quota locks:

1. read everything from the driver (bulk calls only; nothing is written yet);
2. apply it in one transaction: upsert servers, then hosts, storage and networks, mark what
   vanished as gone, recompute drift — plain row writes, no quota locks, the server rows locked
   in id order first (the order every writer locks in: jobs, servers, quota rows, hosts);
3. settle the quota ledger server by server: give back what gone servers held, and adopt servers
   whose provider-side owner names a tenant (when the provider allows it and the quota fits).

Step 3 picks its work from the table, not from step 2's memory, so a crash between the steps is
repaired by the next sync, and running a sync twice changes nothing the second time.

What changes billing is metered as lifecycle events written with the rows that show it: step 2
records servers that appear unowned (`discovered`), change outside govbroker or come back
(`changed`, or `discovered` when nobody owns them) and unbooked servers that vanish (`gone`);
step 3 records adoptions and the `gone` of booked servers as it gives their quota back. Servers
whose request tag belongs to a running job are the job's to record.
"""

from __future__ import annotations

import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import bindparam, exists, insert, update
from sqlalchemy import select as sa_select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select

from billing import contracts, events
from billing.models import LifecycleEvent, LifecycleKind
from broker.audit import service as audit
from broker.core import clock
from broker.core.authz import Principal
from broker.core.db import SessionSource
from broker.core.errors import (
    Conflict,
    GovbrokerError,
    Invalid,
    NotFound,
    OverLimit,
    QuotaExceeded,
    describe,
)
from broker.inventory import providers
from broker.inventory.models import (
    InventoryHost,
    InventoryNetwork,
    InventoryStorage,
    Provider,
    Server,
    SyncRun,
    SyncStatus,
)
from broker.tenancy.authz import ancestor_ids
from broker.tenancy.models import Tenant, TenantKind, TenantStatus
from drivers import base as drv
from quotas import ledger

log = structlog.get_logger(__name__)

# stage name, items done, items in all (0 when unknown)
Progress = Callable[[str, int, int], None]
DriverFactory = Callable[[Provider], drv.Driver]

STALE_RUN = timedelta(hours=1)
LAST_SEEN_PRECISION = timedelta(hours=1)
# a listing that suddenly lacks this share of the live servers (and more than MASS_GONE_MIN)
# is taken for a provider-side fault, not a mass deletion: the run fails and nothing is released
MASS_GONE_SHARE = 0.5
MASS_GONE_MIN = 10
_SERVERS = Server.__table__  # type: ignore[attr-defined]
_HOSTS = InventoryHost.__table__  # type: ignore[attr-defined]
_STORAGE = InventoryStorage.__table__  # type: ignore[attr-defined]
_NETWORKS = InventoryNetwork.__table__  # type: ignore[attr-defined]
_EVENTS = LifecycleEvent.__table__  # type: ignore[attr-defined]
ACTOR = "inventory-sync"


NOT_SIZE = frozenset({"instances", "public_ip", "bandwidth_mbps"})


# request tags that a running provisioning job will book itself: sync must not adopt those
ClaimedTags = Callable[[Session, set[str]], set[str]]
_claimed_tags: list[ClaimedTags] = []


def register_claimed_tags(check: ClaimedTags) -> None:
    """Provisioning names the tags of servers it is still building; sync leaves them alone."""
    _claimed_tags.append(check)


def _claimed(session: Session, tags: set[str]) -> set[str]:
    out: set[str] = set()
    for check in _claimed_tags:
        out |= check(session, tags)
    return out


def owner_ref(server_id: uuid.UUID) -> str:
    """How the quota ledger names a server's allocations."""
    return f"server:{server_id}"


def tenant_code_of(owner_tag: str | None) -> str | None:
    """A provider-side owner is a tenant code, or a path of codes whose last one is the owner."""
    if not owner_tag:
        return None
    return owner_tag.rstrip("/").rsplit("/", 1)[-1] or None


def resolve_owner(
    owner_tag: str | None,
    by_code: Mapping[str, TenantRef],
    by_id: Mapping[uuid.UUID, TenantRef],
) -> TenantRef | None:
    """The tenant a provider-side owner names, or None. A path ("agency/system") must be the
    tenant's real ancestry, so that "b/a1" adopts nothing rather than a's a1."""
    code = tenant_code_of(owner_tag)
    ref = by_code.get(code or "")
    if ref is None or ref.kind == TenantKind.center:
        return None
    assert owner_tag is not None
    parts = [p for p in owner_tag.strip("/").split("/") if p]
    node: TenantRef | None = ref
    for expected in reversed(parts[:-1]):
        node = by_id.get(node.parent_id) if node and node.parent_id else None
        if node is None or node.code != expected:
            return None
    return ref


def size_of(
    vcpu: int, memory_mb: int, disks: Iterable[Mapping[str, Any]], classes: Iterable[str]
) -> dict[str, int]:
    """What a server of this size holds in the ledger: one instance, its CPUs, memory and disk
    per tier. A tier with no resource class is left out (see `unknown_tiers`)."""
    known = set(classes)
    size = {"vcpu": vcpu, "memory_mb": memory_mb, "instances": 1}
    for disk in disks:
        code = f"storage_gb.{disk['tier']}"
        if code in known:
            size[code] = size.get(code, 0) + int(disk["size_gb"])
    return {k: v for k, v in size.items() if k in known and v}


def billable_size(
    vcpu: int,
    memory_mb: int,
    disks: Iterable[Mapping[str, Any]],
    public_ips: Sequence[str],
    classes: Iterable[str],
) -> dict[str, int]:
    """What a server holds as sync sees it, for metering: its size and its public addresses."""
    size = size_of(vcpu, memory_mb, disks, classes)
    if public_ips:
        size["public_ip"] = len(public_ips)
    return size


def metered_size(booked: Mapping[str, int], seen: Mapping[str, int]) -> dict[str, int]:
    """What a managed server is billed for once sync saw it change: what the provider shows of
    every class sync can see (drift is billed as it really is), and what the ledger holds of the
    rest. Bandwidth is the egress of a public address, so it goes with the last one."""
    out = dict(seen)
    for rc, amount in booked.items():
        visible = rc in ("vcpu", "memory_mb", "instances", "public_ip") or rc.startswith(
            "storage_gb."
        )
        if visible or (rc == "bandwidth_mbps" and not seen.get("public_ip")):
            continue
        out[rc] = amount
    return out


def unknown_tiers(disks: Iterable[Mapping[str, Any]], classes: Iterable[str]) -> list[str]:
    known = set(classes)
    return sorted({d["tier"] for d in disks if f"storage_gb.{d['tier']}" not in known})


# --- step 1: read -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    hosts: list[drv.Host]
    storage: list[drv.StoragePool]
    networks: list[drv.Network]
    servers: list[drv.Server]
    # when the listing began: a server row written after it (a provisioning job finished while
    # the provider was being read) is newer than what the listing says of it
    at: datetime | None = None


def observe(driver: drv.Driver, progress: Progress | None = None) -> Observed:
    def step(name: str, fetch: Callable[[], list[Any]]) -> list[Any]:
        items = fetch()
        if progress:
            progress(name, len(items), len(items))
        return items

    started = clock.now()
    return Observed(
        at=started,
        hosts=step("hosts", driver.list_hosts),
        storage=step("storage", driver.list_storage),
        networks=step("networks", driver.list_networks),
        servers=step("servers", driver.list_servers),
    )


# --- step 2: apply ------------------------------------------------------------------------------


class MassVanish(Conflict):
    """Too many servers missing at once to be believed."""


_SERVER_FIELDS = (
    "name",
    "vcpu",
    "memory_mb",
    "disks",
    "ips",
    "public_ips",
    "power_state",
    "host",
    "owner_tag",
    "request_tag",
    "created_at",
)


def _clip(value: str | None) -> str | None:
    # the columns hold 255 characters; a longer folder path must not fail the whole sync
    return value if value is None or len(value) <= 255 else value[:255]


def server_values(s: drv.Server) -> dict[str, Any]:
    """A provider's server as the inventory row's columns."""
    return {
        "name": _clip(s.name),
        "vcpu": s.vcpu,
        "memory_mb": s.memory_mb,
        "disks": [
            {"size_gb": d.size_gb, "tier": d.tier, "external_id": d.external_id} for d in s.disks
        ],
        # the order a provider lists addresses in is not a change
        "ips": sorted(s.ips),
        "public_ips": sorted(s.public_ips),
        "power_state": str(s.power_state),
        "host": _clip(s.host),
        "owner_tag": _clip(s.owner_tag),
        "request_tag": _clip(s.request_tag),
        "created_at": s.created_at,
    }


@dataclass(frozen=True)
class TenantRef:
    id: uuid.UUID
    code: str
    kind: str
    status: str
    parent_id: uuid.UUID | None
    path: str = ""

    @property
    def agency_id(self) -> uuid.UUID:
        return agency_id_of(self.id, self.path)


def agency_id_of(tenant_id: uuid.UUID, path: str) -> uuid.UUID:
    """The agency on a tenant's path (center → agency → system): whose contract bills it."""
    ids = ancestor_ids(path)
    return ids[1] if len(ids) > 1 else tenant_id


def _tenants(session: Session) -> tuple[dict[str, TenantRef], dict[uuid.UUID, TenantRef]]:
    rows = session.execute(
        sa_select(
            col(Tenant.id),
            col(Tenant.code),
            col(Tenant.kind),
            col(Tenant.status),
            col(Tenant.parent_id),
            col(Tenant.path),
        )
    ).all()
    refs = [TenantRef(*r) for r in rows]
    return {t.code: t for t in refs}, {t.id: t for t in refs}


def _drift(
    tenant: TenantRef | None,
    booked: Mapping[str, int],
    observed_size: Mapping[str, int],
    mapped: TenantRef | None,
    owner_tag: str | None,
) -> dict[str, Any] | None:
    """Differences between what govbroker holds for a managed server and what the provider says."""
    if tenant is None:
        return None
    out: dict[str, Any] = {}
    # public IPs and bandwidth are held by the ledger but not seen in a server's size
    held = {k: v for k, v in booked.items() if k not in NOT_SIZE}
    seen = {k: v for k, v in observed_size.items() if k not in NOT_SIZE}
    if booked and held != seen:
        out["size"] = {"before": held, "after": seen}
    # a tag naming no tenant (none, or a foreign one) is common on servers adopted by hand:
    # only a provider-side owner naming another tenant is a change of hands
    if mapped is not None and mapped.id != tenant.id:
        out["owner"] = {"before": tenant.code, "after": owner_tag}
    return out or None


@dataclass(frozen=True)
class _Metered:
    """A lifecycle event step 2 writes, unless the server is a running job's to record."""

    server_id: uuid.UUID
    kind: LifecycleKind
    power_state: str
    sizes: dict[str, int]
    tenant_id: uuid.UUID | None = None
    agency_id: uuid.UUID | None = None
    contract_id: uuid.UUID | None = None
    # the server's request tag while nobody owns it: a running create job may claim it
    request_tag: str | None = None
    detail: dict[str, Any] | None = None

    def row(self, provider: Provider, at: datetime) -> dict[str, Any]:
        return {
            "id": uuid.uuid4(),
            "server_id": self.server_id,
            "tenant_id": self.tenant_id,
            "agency_id": self.agency_id,
            "provider_id": provider.id,
            "service_company_id": provider.service_company_id,
            "contract_id": self.contract_id,
            "kind": self.kind.value,
            "power_state": self.power_state,
            "sizes": self.sizes,
            "detail": self.detail or {},
            "job_id": None,
            "actor": ACTOR,
            "at": at,
            "metered_at": None,
        }


def _seen_change(
    old: Any,
    owner: TenantRef | None,
    power_state: str,
    seen: dict[str, int],
    classes: Iterable[str],
) -> _Metered | None:
    """The event for a stored server the listing shows again, when billing must hear of it: it
    came back, it was never metered, or its power or size changed outside govbroker."""
    was = billable_size(old.vcpu, old.memory_mb, old.disks, old.public_ips, classes)
    back = old.gone_at is not None
    if not back and old.metered and (old.power_state, was) == (power_state, seen):
        return None
    detail: dict[str, Any] = (
        {"back": True} if back else {"before": {"power_state": old.power_state, "sizes": was}}
    )
    if old.tenant_id is None:
        # a server nobody owns is billed as it is, to the unassigned bucket
        kind = LifecycleKind.discovered if back or not old.metered else LifecycleKind.changed
        return _Metered(old.id, kind, power_state, seen, request_tag=old.request_tag, detail=detail)
    return _Metered(
        old.id,
        LifecycleKind.changed,
        power_state,
        metered_size(old.booked or {}, seen),
        tenant_id=old.tenant_id,
        agency_id=owner.agency_id if owner is not None else old.tenant_id,
        contract_id=old.contract_id,
        detail=detail,
    )


def _write_events(
    session: Session, provider: Provider, metered: Sequence[_Metered], now: datetime
) -> int:
    """Insert the events in one statement, leaving out servers a running job is building."""
    tags = {m.request_tag for m in metered if m.request_tag}
    claimed = _claimed(session, tags) if tags else set()
    rows = [m.row(provider, now) for m in metered if m.request_tag not in claimed]
    if rows:
        session.connection().execute(insert(_EVENTS), rows)
    return len(rows)


def _apply_servers(
    session: Session,
    provider: Provider,
    servers: Sequence[drv.Server],
    now: datetime,
    counts: Counter[str],
    progress: Progress | None,
    listed_at: datetime | None = None,
) -> None:
    by_code, by_id = _tenants(session)
    classes = ledger.resource_classes(session)
    rows = session.connection().execute(
        sa_select(
            _SERVERS.c.id,
            _SERVERS.c.external_id,
            *[_SERVERS.c[f] for f in _SERVER_FIELDS],
            _SERVERS.c.tenant_id,
            _SERVERS.c.booked,
            _SERVERS.c.contract_id,
            _SERVERS.c.drift,
            _SERVERS.c.drift_at,
            _SERVERS.c.gone_at,
            _SERVERS.c.last_seen,
            # whether billing ever heard of the server (rows older than metering, or skipped
            # while a job was building them, are recorded the first time sync sees them)
            exists(sa_select(_EVENTS.c.id).where(_EVENTS.c.server_id == _SERVERS.c.id)).label(
                "metered"
            ),
        ).where(_SERVERS.c.provider_id == provider.id)
    )
    stored = {}
    newer: set[str] = set()
    for r in rows:
        if listed_at is not None and r.last_seen > listed_at:
            # written since the listing began (a job built, changed or deleted it): the listing
            # is older than the row, so it neither marks it gone, nor brings it back, nor edits it
            newer.add(r.external_id)
            continue
        stored[r.external_id] = r
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    metered: list[_Metered] = []
    drift_events: list[tuple[uuid.UUID, TenantRef, Any, Any]] = []
    update_kind: dict[uuid.UUID, str] = {}
    seen: set[str] = set()
    total = len(servers)
    for n, s in enumerate(servers, 1):
        if s.external_id in seen or s.external_id in newer:
            continue  # listed twice (paging over a moving list), or newer in the database
        seen.add(s.external_id)
        values = server_values(s)
        mapped = resolve_owner(s.owner_tag, by_code, by_id)
        billable = billable_size(
            s.vcpu, s.memory_mb, values["disks"], values["public_ips"], classes
        )
        old = stored.get(s.external_id)
        if old is None:
            server_id = uuid.uuid4()
            inserts.append(
                {
                    "id": server_id,
                    "provider_id": provider.id,
                    "external_id": s.external_id,
                    **values,
                    "tenant_id": None,
                    "booked": {},
                    "drift": None,
                    "drift_at": None,
                    "adopt_error": None,
                    "first_seen": now,
                    "last_seen": now,
                    "gone_at": None,
                    "adopted_at": None,
                }
            )
            metered.append(
                _Metered(
                    server_id,
                    LifecycleKind.discovered,
                    values["power_state"],
                    billable,
                    request_tag=values["request_tag"],
                )
            )
            continue
        tenant = by_id.get(old.tenant_id) if old.tenant_id else None
        drift = _drift(
            tenant,
            old.booked or {},
            size_of(s.vcpu, s.memory_mb, values["disks"], classes),
            mapped,
            s.owner_tag,
        )
        event = _seen_change(old, tenant, values["power_state"], billable, classes)
        if event is not None:
            metered.append(event)
        changed = any(values[f] != getattr(old, f) for f in _SERVER_FIELDS)
        if changed or drift != old.drift or old.gone_at is not None:
            if old.gone_at is not None:
                update_kind[old.id] = "servers_back"
            elif changed:
                update_kind[old.id] = "servers_updated"
            drift_at = None if drift is None else old.drift_at if drift == old.drift else now
            updates.append(
                {
                    "_id": old.id,
                    **values,
                    "drift": drift,
                    "drift_at": drift_at,
                    "gone_at": None,
                    "last_seen": now,
                }
            )
            if drift != old.drift and tenant is not None:
                drift_events.append((old.id, tenant, old.drift, drift))
        if progress and n % 1000 == 0:
            progress("apply", n, total)

    gone = [r for ext, r in stored.items() if ext not in seen and r.gone_at is None]
    live = sum(1 for r in stored.values() if r.gone_at is None)
    believable = len(gone) <= MASS_GONE_MIN or len(gone) <= live * MASS_GONE_SHARE
    if not believable and not provider.options.get("allow_mass_gone"):
        raise MassVanish(
            f"{len(gone)} of {live} servers vanished from one listing; refusing to mark them "
            "gone (a provider fault is likelier; set the provider option allow_mass_gone to "
            "accept it)"
        )
    for r in gone:
        if r.booked:
            continue  # its `gone` is written when step 3 gives its quota back (_release_one)
        owner = by_id.get(r.tenant_id) if r.tenant_id else None
        metered.append(
            _Metered(
                r.id,
                LifecycleKind.gone,
                r.power_state,
                {},
                tenant_id=r.tenant_id,
                agency_id=owner.agency_id if owner is not None else r.tenant_id,
                contract_id=r.contract_id,
                request_tag=r.request_tag if r.tenant_id is None else None,
            )
        )
    # everything else still there was seen now, at most hourly per row, so that a sync of an
    # unchanged provider rewrites nothing
    updated = {u["_id"] for u in updates}
    refresh = [
        r.id
        for ext, r in stored.items()
        if ext in seen
        and r.gone_at is None
        and r.id not in updated
        and r.last_seen < now - LAST_SEEN_PRECISION
    ]
    conn = session.connection()
    read = {r.id: r for r in stored.values()}
    touched = (
        updated | {r.id for r in gone} | set(refresh) | {m.server_id for m in metered}
    ) & read.keys()
    # every stored row this writes (or writes an event of), locked in id order as job finishes
    # lock theirs, so that the two never wait on each other in a circle; a row someone wrote
    # since it was read above is theirs, as a row newer than the listing is
    moved = _lock_servers(conn, {i: read[i] for i in touched})
    if moved:
        updates = [u for u in updates if u["_id"] not in moved]
        gone = [r for r in gone if r.id not in moved]
        refresh = [i for i in refresh if i not in moved]
        metered = [m for m in metered if m.server_id not in moved]
        drift_events = [d for d in drift_events if d[0] not in moved]
    # a server a running job is building is the job's to write, row and events: inserting it
    # here would race the job's insert of the same key (a deadlock, with the order they come in)
    tags = {r["request_tag"] for r in inserts if r["request_tag"]}
    building = _claimed(session, tags) if tags else set()
    # a job may still have written a row for a server this listing shows as new: that row stands
    inserted = _insert_servers(conn, [r for r in inserts if r["request_tag"] not in building])
    metered = [m for m in metered if m.server_id in read or m.server_id in inserted]
    counts["servers_new"] += len(inserted)
    if updates:
        columns = (*_SERVER_FIELDS, "drift", "drift_at", "gone_at", "last_seen")
        stmt = (
            update(_SERVERS)
            .where(_SERVERS.c.id == bindparam("_id"))
            .values({c: bindparam(c) for c in columns})
        )
        conn.execute(stmt, updates)
        counts.update(update_kind[u["_id"]] for u in updates if u["_id"] in update_kind)
    if gone:
        conn.execute(
            update(_SERVERS).where(_SERVERS.c.id == bindparam("_id")).values(gone_at=now),
            [{"_id": r.id} for r in gone],
        )
    if refresh:
        conn.execute(
            update(_SERVERS).where(_SERVERS.c.id == bindparam("_id")).values(last_seen=now),
            [{"_id": i} for i in refresh],
        )
    counts["lifecycle_events"] += _write_events(session, provider, metered, now)
    counts["servers_gone"] += len(gone)
    counts["servers_seen"] += len(seen)
    for server_id, tenant, before, after in drift_events:
        audit.record(
            session,
            Principal.system(ACTOR),
            "server.drift",
            tenant=session.get(Tenant, tenant.id),
            target_type="server",
            target_id=server_id,
            before={"drift": before},
            after={"drift": after},
        )
        counts["drift_changed"] += 1
    if progress:
        progress("apply", total, total)


# what tells that someone else wrote a server row since sync read it
_WRITTEN_BY_OTHERS = ("last_seen", "tenant_id", "booked", "gone_at")
_LOCK_CHUNK = 5000  # ids per statement, well below any driver's bound-parameter limit


def _lock_servers(conn: Any, read: Mapping[uuid.UUID, Any]) -> set[uuid.UUID]:
    """Lock these server rows (id → the row as read before) in id order, a chunk at a time;
    the ones another writer changed since they were read, or deleted."""
    ids = sorted(read, key=str)
    moved = set(ids)
    for start in range(0, len(ids), _LOCK_CHUNK):
        stmt = (
            sa_select(_SERVERS.c.id, *[_SERVERS.c[f] for f in _WRITTEN_BY_OTHERS])
            .where(_SERVERS.c.id.in_(ids[start : start + _LOCK_CHUNK]))
            .order_by(_SERVERS.c.id)
            .with_for_update()
        )
        for row in conn.execute(stmt):
            before = read[row.id]
            if all(getattr(row, f) == getattr(before, f) for f in _WRITTEN_BY_OTHERS):
                moved.discard(row.id)
    return moved


# a new server's row, unless one for (provider, external id) is there already (a job's or sync's)
INSERT_NEW_SERVER = {
    dialect: insert_for(_SERVERS)
    .on_conflict_do_nothing(index_elements=["provider_id", "external_id"])
    .returning(_SERVERS.c.id)
    for dialect, insert_for in (("postgresql", pg_insert), ("sqlite", sqlite_insert))
}


def _insert_servers(conn: Any, rows: list[dict[str, Any]]) -> set[uuid.UUID]:
    """Insert new server rows, leaving any a job wrote meanwhile; the ids inserted."""
    if not rows:
        return set()
    return set(conn.execute(INSERT_NEW_SERVER[conn.dialect.name], rows).scalars())


def _upsert_simple(
    session: Session,
    table: Any,
    provider_id: uuid.UUID,
    rows: Mapping[str, dict[str, Any]],
    now: datetime,
) -> tuple[int, int]:
    """Hosts, storage and networks: few rows, compared and written as a whole. (new, gone)"""
    conn = session.connection()
    fields = sorted({k for values in rows.values() for k in values})
    # locked in id order, as placement locks them: the two never wait on each other in a circle
    stored = {
        r.external_id: r
        for r in conn.execute(
            sa_select(
                table.c.id, table.c.external_id, table.c.gone_at, *[table.c[f] for f in fields]
            )
            .where(table.c.provider_id == provider_id)
            .order_by(table.c.id)
            .with_for_update()
        )
    }
    new = [
        {
            "id": uuid.uuid4(),
            "provider_id": provider_id,
            "external_id": ext,
            **values,
            "last_seen": now,
            "gone_at": None,
        }
        for ext, values in rows.items()
        if ext not in stored
    ]
    if new:
        conn.execute(insert(table), new)
    seen = [
        {"_id": stored[ext].id, **values}
        for ext, values in rows.items()
        if ext in stored
        and (
            stored[ext].gone_at is not None
            or any(getattr(stored[ext], f) != v for f, v in values.items())
        )
    ]
    if seen:
        conn.execute(
            update(table)
            .where(table.c.id == bindparam("_id"))
            .values({**{f: bindparam(f) for f in fields}, "last_seen": now, "gone_at": None}),
            seen,
        )
    gone = [{"_id": r.id} for ext, r in stored.items() if ext not in rows and r.gone_at is None]
    if gone:
        conn.execute(update(table).where(table.c.id == bindparam("_id")).values(gone_at=now), gone)
    return len(new), len(gone)


def _ratio_map(values: Mapping[str, float]) -> dict[str, str]:
    # a driver reports floats; keep them as short decimal strings, never as binary floats
    return {k: format(v, "g") for k, v in sorted(values.items())}


def apply(
    session: Session,
    provider: Provider,
    observed: Observed,
    *,
    progress: Progress | None = None,
) -> dict[str, int]:
    """Step 2: write one observation of `provider` into the inventory; returns counts."""
    now = clock.now()
    counts: Counter[str] = Counter()
    hosts = {
        h.external_id: {
            "name": h.name[:255],
            "cluster": h.cluster,
            "state": h.state,
            "capacity": dict(h.capacity.total),
            "allocated": dict(h.capacity.allocated),
            "overcommit": _ratio_map(h.overcommit),
        }
        for h in observed.hosts
    }
    storage = {
        p.external_id: {
            "name": p.name[:255],
            "tier": p.tier,
            "capacity_gb": p.capacity_gb,
            "free_gb": p.free_gb,
        }
        for p in observed.storage
    }
    networks = {n.external_id: {"name": n.name[:255], "cidr": n.cidr} for n in observed.networks}
    # servers before hosts: writers lock jobs, servers, quota rows, then hosts (placement), in
    # that order, and so does this
    _apply_servers(session, provider, observed.servers, now, counts, progress, observed.at)
    for name, table, rows in (
        ("hosts", _HOSTS, hosts),
        ("storage", _STORAGE, storage),
        ("networks", _NETWORKS, networks),
    ):
        new, gone = _upsert_simple(session, table, provider.id, rows, now)
        counts[name] += len(rows)
        counts[f"{name}_new"] += new
        counts[f"{name}_gone"] += gone
    return dict(counts)


# --- step 3: settle the ledger ------------------------------------------------------------------


def book(
    session: Session,
    server: Server,
    tenant: Tenant,
    *,
    actor: Principal,
    force: bool = False,
    reason: str | None = None,
) -> dict[str, int]:
    """Count a present, unmanaged server against `tenant`'s quota and make it the owner.

    Refused with QuotaExceeded when it does not fit, unless `force`: the server exists whatever
    the quota says, and forcing records it over the limit (audited with the shortfall)."""
    if server.gone_at is not None:
        raise Conflict(f"server {server.name} is gone from its provider")
    if server.booked:
        raise Conflict(f"server {server.name} is already managed")
    if tenant.kind == TenantKind.center or tenant.status != TenantStatus.active:
        raise Conflict.field(
            "tenant_id", f"{tenant.kind} {tenant.code} cannot own servers", "not_allowed"
        )
    classes = ledger.resource_classes(session)
    missing = unknown_tiers(server.disks, classes)
    if missing:
        raise Conflict(f"no resource class for storage tier(s) {', '.join(missing)}")
    size = size_of(server.vcpu, server.memory_mb, server.disks, classes)
    ref = owner_ref(server.id)

    def reserve(past_limits: bool) -> Any:
        return ledger.reserve(
            session,
            tenant.id,
            size,
            ref=f"adopt:{server.id}:{uuid.uuid4().hex[:12]}",
            actor=actor.username,
            owner_ref=ref,
            force=past_limits,
        )

    over: list[OverLimit] = []
    try:
        reservation = reserve(False)
    except QuotaExceeded as exc:
        if not force:
            raise
        # the shortfalls found under the locks are what the audit event records
        over = exc.over
        reservation = reserve(True)
    ledger.commit(session, reservation.id, owner_ref=ref)
    server.tenant_id = tenant.id
    server.booked = size
    server.adopted_at = clock.now()
    server.contract_id = _adoption_contract(session, server, tenant)
    _emit(session, server, tenant, LifecycleKind.adopted, actor.username)
    server.adopt_error = None
    server.drift = None
    server.drift_at = None
    session.add(server)
    session.flush()
    audit.record(
        session,
        actor,
        "server.adopt",
        tenant=tenant,
        target_type="server",
        target_id=server.id,
        before={"tenant": None, "owner_tag": server.owner_tag},
        after={
            "tenant": tenant.code,
            "booked": size,
            "forced": bool(over),
            "over_limit": [describe(o) for o in over],
            "reason": reason,
            "contract_id": str(server.contract_id) if server.contract_id else None,
        },
    )
    return size


def _company_of(session: Session, server: Server) -> uuid.UUID | None:
    provider = session.get(Provider, server.provider_id)
    return provider.service_company_id if provider is not None else None


def _adoption_contract(session: Session, server: Server, tenant: Tenant) -> uuid.UUID | None:
    """The contract an adopted server is billed under: the one it had (a server back after being
    gone) while that still takes servers, else the agency's with the provider's company. A
    refusal binds none (billed unassigned until the center binds one): billing must never stop
    a server from counting against the quota it uses."""
    agency_id = agency_id_of(tenant.id, tenant.path)
    company = _company_of(session, server)
    if server.contract_id is not None:
        try:
            kept = contracts.contract_for_server(
                session,
                agency_id=agency_id,
                service_company_id=company,
                contract_id=server.contract_id,
            )
        except (Invalid, Conflict):
            pass  # ended, suspended, or another agency's: the agency's current one applies
        else:
            return kept.id if kept is not None else None
    try:
        contract = contracts.contract_for_server(
            session, agency_id=agency_id, service_company_id=company
        )
    except (Invalid, Conflict) as exc:
        log.warning("server adopted without a contract", server=str(server.id), reason=exc.detail)
        return None
    return contract.id if contract is not None else None


def _emit(
    session: Session, server: Server, tenant: Tenant, kind: LifecycleKind, actor: str
) -> None:
    """A state change sync saw (adopted, gone outside govbroker) is metered like any other."""
    events.emit(
        session,
        kind,
        server_id=server.id,
        tenant_id=tenant.id,
        agency_id=agency_id_of(tenant.id, tenant.path),
        provider_id=server.provider_id,
        service_company_id=_company_of(session, server),
        contract_id=server.contract_id,
        power_state=server.power_state,
        sizes=server.booked,
        actor=actor,
    )


def _release_gone(db: SessionSource, provider_id: uuid.UUID, counts: Counter[str]) -> None:
    with db.unit_of_work(write=False) as session:
        ids = [
            sid
            for sid, booked in session.execute(
                sa_select(col(Server.id), col(Server.booked)).where(
                    col(Server.provider_id) == provider_id,
                    col(Server.gone_at).is_not(None),
                )
            ).all()
            if booked
        ]
    for server_id in ids:
        try:
            _release_one(db, server_id)
        except GovbrokerError as exc:  # one server's trouble must not starve the rest
            log.warning("release of a gone server failed", server=str(server_id), error=exc.detail)
            counts["release_failed"] += 1
            continue
        counts["released"] += 1


def _release_one(db: SessionSource, server_id: uuid.UUID) -> None:
    with db.unit_of_work() as session:
        server = session.get(Server, server_id, with_for_update=True)
        if server is None or server.gone_at is None or not server.booked:
            return
        ledger.release_owner(session, owner_ref(server.id))
        before = dict(server.booked)
        server.booked = {}
        server.drift = None
        server.drift_at = None
        session.add(server)
        owner = session.get(Tenant, server.tenant_id) if server.tenant_id else None
        if owner is not None:
            _emit(session, server, owner, LifecycleKind.gone, ACTOR)
        audit.record(
            session,
            Principal.system(ACTOR),
            "server.gone",
            tenant=session.get(Tenant, server.tenant_id) if server.tenant_id else None,
            target_type="server",
            target_id=server.id,
            before={"booked": before},
            after={"booked": {}, "gone_at": server.gone_at},
        )


def _adopt_by_owner(db: SessionSource, provider_id: uuid.UUID, counts: Counter[str]) -> None:
    """Book servers that should count and do not: those whose provider-side owner names a
    tenant (adopted when they fit), and owned servers that came back after being gone (booked
    again for their owner, forced: they exist whatever the quota says)."""
    with db.unit_of_work(write=False) as session:
        by_code, by_id = _tenants(session)
        rows = session.execute(
            sa_select(
                col(Server.id),
                col(Server.owner_tag),
                col(Server.tenant_id),
                col(Server.booked),
                col(Server.adopt_error),
                col(Server.request_tag),
            ).where(col(Server.provider_id) == provider_id, col(Server.gone_at).is_(None))
        ).all()
        claimed = _claimed(session, {r.request_tag for r in rows if r.request_tag and not r.booked})
    work: list[tuple[uuid.UUID, TenantRef, bool, str | None]] = []
    for sid, tag, tenant_id, booked, adopt_error, request in rows:
        if booked or request in claimed:
            continue
        if tenant_id is not None and tenant_id in by_id:
            work.append((sid, by_id[tenant_id], True, adopt_error))
        elif (ref := resolve_owner(tag, by_code, by_id)) is not None:
            work.append((sid, ref, False, adopt_error))
    actor = Principal.system(ACTOR)
    for server_id, ref, returning, previous_error in work:
        try:
            with db.unit_of_work() as session:
                server = session.get(Server, server_id, with_for_update=True)
                tenant = session.get(Tenant, ref.id)
                if server is None or tenant is None or server.booked or server.gone_at:
                    continue
                reason = "back at its provider after being gone" if returning else None
                book(session, server, tenant, actor=actor, force=returning, reason=reason)
            counts["rebooked" if returning else "adopted"] += 1
        except GovbrokerError as exc:
            error = f"{ref.code}: {exc.detail}"[:1000]
            counts["adopt_failed"] += 1
            if error == previous_error:
                continue  # already recorded: no write, no log line per sync
            log.info("adoption refused", error=exc.detail, server=str(server_id))
            with db.unit_of_work() as session:
                server = session.get(Server, server_id, with_for_update=True)
                # someone may have booked it meanwhile: then it is not ours to touch
                if server is not None and not server.booked and server.gone_at is None:
                    server.adopt_error = error
                    if not returning:
                        server.tenant_id = None
                    session.add(server)


# --- one provider, all providers ----------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    provider_id: uuid.UUID
    provider_name: str
    run_id: uuid.UUID
    status: str
    duration_ms: int
    counts: dict[str, int]
    error: str | None


def _start_run(
    db: SessionSource, provider_id: uuid.UUID, trigger: str
) -> tuple[uuid.UUID, Provider]:
    with db.unit_of_work() as session:
        provider = session.get(Provider, provider_id, with_for_update=True)
        if provider is None:
            raise NotFound(f"provider {provider_id} not found")
        if not provider.enabled:
            raise Conflict(f"provider {provider.name} is disabled", extra={"enabled": False})
        now = clock.now()
        running = session.execute(
            select(SyncRun).where(
                SyncRun.provider_id == provider_id, SyncRun.status == SyncStatus.running.value
            )
        ).scalars()
        for run in running:
            if run.started_at > now - STALE_RUN:
                raise Conflict(
                    f"provider {provider.name} is being synced (run {run.id} since "
                    f"{run.started_at.isoformat()})"
                )
            run.status = SyncStatus.failed.value
            run.error = "abandoned: the process running it stopped"
            run.finished_at = now
        run = SyncRun(provider_id=provider_id, trigger=trigger, started_at=now)
        session.add(run)
        session.flush()
        session.expunge(provider)
        return run.id, provider


def _finish_run(
    db: SessionSource,
    run_id: uuid.UUID,
    provider_id: uuid.UUID,
    started: float,
    counts: dict[str, int],
    error: str | None,
) -> Outcome:
    duration_ms = int((time.monotonic() - started) * 1000)
    status = SyncStatus.failed if error else SyncStatus.ok
    with db.unit_of_work() as session:
        run = session.get(SyncRun, run_id, with_for_update=True)
        provider = session.get(Provider, provider_id, with_for_update=True)
        assert run is not None and provider is not None
        if run.status != SyncStatus.running.value:
            # declared abandoned meanwhile: its verdict stands and a newer run owns the provider
            error = error or f"finished after being declared {run.status}"
            status = SyncStatus.failed
        now = clock.now()
        run.status = status.value
        run.finished_at = now
        run.duration_ms = duration_ms
        run.counts = counts
        run.error = error
        provider.last_sync_at = now
        provider.last_sync_status = status.value
        provider.last_sync_error = error
        session.add_all([run, provider])
        audit.record(
            session,
            Principal.system(ACTOR),
            "provider.sync",
            tenant=None,
            target_type="provider",
            target_id=provider.id,
            after={"run": str(run.id), "status": status.value, "counts": counts, "error": error},
        )
        name = provider.name
    return Outcome(provider_id, name, run_id, status.value, duration_ms, counts, error)


def sync_provider(
    db: SessionSource,
    provider_id: uuid.UUID,
    *,
    trigger: str = "manual",
    progress: Progress | None = None,
    driver_factory: DriverFactory | None = None,
) -> Outcome:
    """Sync one provider now. A provider's failure is its outcome (status failed, with the
    provider's message, credentials scrubbed), never an exception: the others go on."""
    started = time.monotonic()
    run_id, provider = _start_run(db, provider_id, trigger)
    counts: Counter[str] = Counter()
    creds: dict[str, str] = {}
    try:
        creds = providers.credentials_of(provider)
        driver = (driver_factory or providers.driver_for)(provider)
        try:
            observed = observe(driver, progress)
        finally:
            driver.close()
        with db.unit_of_work() as session:
            counts.update(apply(session, provider, observed, progress=progress))
        _release_gone(db, provider.id, counts)
        if provider.adopt_by_owner:
            _adopt_by_owner(db, provider.id, counts)
    except GovbrokerError as exc:  # e.g. credentials the configured keys cannot decrypt
        message = providers.scrub(f"{type(exc).__name__}: {exc.detail}", creds)
        log.warning("provider sync failed", provider=provider.name, error=message)
        return _finish_run(db, run_id, provider.id, started, dict(counts), message)
    except drv.DriverError as exc:
        message = providers.scrub(f"{type(exc).__name__}: {exc.provider_message}", creds)
        log.warning("provider sync failed", provider=provider.name, error=message)
        return _finish_run(db, run_id, provider.id, started, dict(counts), message)
    except Exception as exc:
        message = providers.scrub(f"{type(exc).__name__}: {exc}", creds)
        # the traceback may quote the credentials (a driver's locals, an URL): scrub it too
        trace = providers.scrub("".join(traceback.format_exception(exc)), creds)
        log.error("provider sync crashed", provider=provider.name, error=message, trace=trace)
        return _finish_run(db, run_id, provider.id, started, dict(counts), message)
    outcome = _finish_run(db, run_id, provider.id, started, dict(counts), None)
    log.info(
        "provider synced",
        provider=provider.name,
        duration_ms=outcome.duration_ms,
        **{k: v for k, v in counts.items() if v},
    )
    return outcome


def due_providers(session: Session, now: datetime) -> list[uuid.UUID]:
    rows = session.execute(
        sa_select(
            col(Provider.id), col(Provider.last_sync_at), col(Provider.sync_interval_s)
        ).where(col(Provider.enabled).is_(True))
    ).all()
    return [
        pid
        for pid, last, interval in rows
        if last is None or last + timedelta(seconds=interval) <= now
    ]


def sync_all(
    db: SessionSource,
    *,
    trigger: str = "schedule",
    only_due: bool = True,
    provider_ids: Sequence[uuid.UUID] | None = None,
    driver_factory: DriverFactory | None = None,
    workers: int = 4,
) -> list[Outcome]:
    """Sync several providers side by side; one slow or failing provider delays nobody else."""
    if provider_ids is None:
        with db.unit_of_work(write=False) as session:
            if only_due:
                provider_ids = due_providers(session, clock.now())
            else:
                provider_ids = list(
                    session.execute(
                        sa_select(col(Provider.id)).where(col(Provider.enabled).is_(True))
                    ).scalars()
                )
    if not provider_ids:
        return []

    def one(pid: uuid.UUID) -> Outcome | None:
        try:
            return sync_provider(db, pid, trigger=trigger, driver_factory=driver_factory)
        except (Conflict, NotFound) as exc:  # being synced elsewhere, disabled or gone meanwhile
            log.info("provider sync skipped", provider_id=str(pid), reason=exc.detail)
            return None
        except Exception:  # one provider's bookkeeping failing must not lose the others
            log.exception("provider sync could not run", provider_id=str(pid))
            return None

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(provider_ids)))) as pool:
        results = list(pool.map(one, provider_ids))
    return [r for r in results if r is not None]
