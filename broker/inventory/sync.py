"""Inventory sync: make the database's picture of a provider match what its driver reports.

One sync of one provider runs in three steps, each its own unit of work, so that no transaction is
open during a remote call and none holds more than one agency's quota locks:

1. read everything from the driver (bulk calls only; nothing is written yet);
2. apply it in one transaction: upsert hosts, storage, networks and servers, mark what vanished
   as gone, recompute drift — plain row writes, no quota locks;
3. settle the quota ledger server by server: give back what gone servers held, and adopt servers
   whose provider-side owner names a tenant (when the provider allows it and the quota fits).

Step 3 picks its work from the table, not from step 2's memory, so a crash between the steps is
repaired by the next sync, and running a sync twice changes nothing the second time.
"""

from __future__ import annotations

import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import bindparam, insert, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from broker.audit import service as audit
from broker.core import clock
from broker.core.authz import Principal
from broker.core.db import SessionSource
from broker.core.errors import Conflict, GovbrokerError, QuotaExceeded, describe
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
from broker.tenancy.models import Tenant, TenantKind, TenantStatus
from drivers import base as drv
from quotas import ledger
from quotas.models import ResourceClass

log = structlog.get_logger(__name__)

# stage name, items done, items in all (0 when unknown)
Progress = Callable[[str, int, int], None]
DriverFactory = Callable[[Provider], drv.Driver]

STALE_RUN = timedelta(hours=1)
_SERVERS = Server.__table__  # type: ignore[attr-defined]
_HOSTS = InventoryHost.__table__  # type: ignore[attr-defined]
_STORAGE = InventoryStorage.__table__  # type: ignore[attr-defined]
_NETWORKS = InventoryNetwork.__table__  # type: ignore[attr-defined]


def owner_ref(server_id: uuid.UUID) -> str:
    """How the quota ledger names a server's allocations."""
    return f"server:{server_id}"


def tenant_code_of(owner_tag: str | None) -> str | None:
    """A provider-side owner is a tenant code, or a path of codes whose last one is the owner."""
    if not owner_tag:
        return None
    return owner_tag.rstrip("/").rsplit("/", 1)[-1] or None


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


def observe(driver: drv.Driver, progress: Progress | None = None) -> Observed:
    def step(name: str, fetch: Callable[[], list[Any]]) -> list[Any]:
        items = fetch()
        if progress:
            progress(name, len(items), len(items))
        return items

    return Observed(
        hosts=step("hosts", driver.list_hosts),
        storage=step("storage", driver.list_storage),
        networks=step("networks", driver.list_networks),
        servers=step("servers", driver.list_servers),
    )


# --- step 2: apply ------------------------------------------------------------------------------


@dataclass
class Counts:
    values: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, n: int = 1) -> None:
        self.values[key] = self.values.get(key, 0) + n


_SERVER_FIELDS = (
    "name",
    "vcpu",
    "memory_mb",
    "disks",
    "ips",
    "power_state",
    "host",
    "owner_tag",
    "request_tag",
    "created_at",
)


def _server_values(s: drv.Server) -> dict[str, Any]:
    return {
        "name": s.name[:255],
        "vcpu": s.vcpu,
        "memory_mb": s.memory_mb,
        "disks": [{"size_gb": d.size_gb, "tier": d.tier} for d in s.disks],
        "ips": list(s.ips),
        "power_state": str(s.power_state),
        "host": s.host,
        "owner_tag": s.owner_tag,
        "request_tag": s.request_tag,
        "created_at": s.created_at,
    }


@dataclass(frozen=True)
class TenantRef:
    id: uuid.UUID
    code: str
    kind: str
    status: str


def _tenants(session: Session) -> tuple[dict[str, TenantRef], dict[uuid.UUID, TenantRef]]:
    rows = session.execute(
        sa_select(col(Tenant.id), col(Tenant.code), col(Tenant.kind), col(Tenant.status))
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
    held = {k: v for k, v in booked.items() if k != "instances"}
    seen = {k: v for k, v in observed_size.items() if k != "instances"}
    if booked and held != seen:
        out["size"] = {"before": held, "after": seen}
    if mapped is None or mapped.id != tenant.id:
        out["owner"] = {"before": tenant.code, "after": owner_tag}
    return out or None


def _apply_servers(
    session: Session,
    provider: Provider,
    servers: Sequence[drv.Server],
    now: datetime,
    counts: Counts,
    progress: Progress | None,
) -> None:
    by_code, by_id = _tenants(session)
    classes = list(session.execute(sa_select(col(ResourceClass.code))).scalars())
    stored = {
        r.external_id: r
        for r in session.connection().execute(
            sa_select(
                _SERVERS.c.id,
                _SERVERS.c.external_id,
                *[_SERVERS.c[f] for f in _SERVER_FIELDS],
                _SERVERS.c.tenant_id,
                _SERVERS.c.booked,
                _SERVERS.c.drift,
                _SERVERS.c.drift_at,
                _SERVERS.c.gone_at,
            ).where(_SERVERS.c.provider_id == provider.id)
        )
    }
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    drift_events: list[tuple[uuid.UUID, TenantRef, Any, Any]] = []
    seen: set[str] = set()
    total = len(servers)
    for n, s in enumerate(servers, 1):
        if s.external_id in seen:
            continue  # a provider listing the same object twice (paging over a moving list)
        seen.add(s.external_id)
        values = _server_values(s)
        mapped = by_code.get(tenant_code_of(s.owner_tag) or "")
        old = stored.get(s.external_id)
        if old is None:
            counts.add("servers_new")
            inserts.append(
                {
                    "id": uuid.uuid4(),
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
            continue
        tenant = by_id.get(old.tenant_id) if old.tenant_id else None
        drift = _drift(
            tenant,
            old.booked or {},
            size_of(s.vcpu, s.memory_mb, values["disks"], classes),
            mapped,
            s.owner_tag,
        )
        changed = any(values[f] != getattr(old, f) for f in _SERVER_FIELDS)
        if changed or drift != old.drift or old.gone_at is not None:
            if old.gone_at is not None:
                counts.add("servers_back")
            elif changed:
                counts.add("servers_updated")
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

    conn = session.connection()
    if inserts:
        conn.execute(insert(_SERVERS), inserts)
    if updates:
        columns = (*_SERVER_FIELDS, "drift", "drift_at", "gone_at", "last_seen")
        stmt = (
            update(_SERVERS)
            .where(_SERVERS.c.id == bindparam("_id"))
            .values({c: bindparam(c) for c in columns})
        )
        conn.execute(stmt, updates)
    gone = [r for ext, r in stored.items() if ext not in seen and r.gone_at is None]
    if gone:
        conn.execute(
            update(_SERVERS).where(_SERVERS.c.id == bindparam("_id")).values(gone_at=now),
            [{"_id": r.id} for r in gone],
        )
    # everything still there was seen now: one statement, not one per server
    conn.execute(
        update(_SERVERS)
        .where(_SERVERS.c.provider_id == provider.id, _SERVERS.c.gone_at.is_(None))
        .values(last_seen=now)
    )
    counts.add("servers_gone", len(gone))
    counts.add("servers_seen", len(seen))
    for server_id, tenant, before, after in drift_events:
        audit.record(
            session,
            Principal.system("inventory-sync"),
            "server.drift",
            tenant=_tenant_row(session, tenant.id),
            target_type="server",
            target_id=server_id,
            before={"drift": before},
            after={"drift": after},
        )
        counts.add("drift_changed")
    if progress:
        progress("apply", total, total)


def _tenant_row(session: Session, tenant_id: uuid.UUID) -> Tenant | None:
    return session.get(Tenant, tenant_id)


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
    stored = {
        r.external_id: r
        for r in conn.execute(
            sa_select(
                table.c.id, table.c.external_id, table.c.gone_at, *[table.c[f] for f in fields]
            ).where(table.c.provider_id == provider_id)
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
    seen = [{"_id": stored[ext].id, **values} for ext, values in rows.items() if ext in stored]
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
    counts = Counts()
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
    for name, table, rows in (
        ("hosts", _HOSTS, hosts),
        ("storage", _STORAGE, storage),
        ("networks", _NETWORKS, networks),
    ):
        new, gone = _upsert_simple(session, table, provider.id, rows, now)
        counts.add(name, len(rows))
        counts.add(f"{name}_new", new)
        counts.add(f"{name}_gone", gone)
    _apply_servers(session, provider, observed.servers, now, counts, progress)
    return counts.values


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
    if server.tenant_id is not None and server.booked:
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
    over = ledger.check(session, tenant.id, size)
    if over and not force:
        raise QuotaExceeded(over)
    ref = owner_ref(server.id)
    reservation = ledger.reserve(
        session,
        tenant.id,
        size,
        ref=f"adopt:{server.id}:{uuid.uuid4().hex[:12]}",
        actor=actor.username,
        owner_ref=ref,
        force=force,
    )
    ledger.commit(session, reservation.id, owner_ref=ref)
    server.tenant_id = tenant.id
    server.booked = size
    server.adopted_at = clock.now()
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
            "forced": bool(over) and force,
            "over_limit": [describe(o) for o in over],
            "reason": reason,
        },
    )
    return size


def _release_gone(db: SessionSource, provider_id: uuid.UUID, counts: Counts) -> None:
    with db.unit_of_work(write=False) as session:
        ids = [
            sid
            for sid, booked in session.execute(
                sa_select(col(Server.id), col(Server.booked)).where(
                    col(Server.provider_id) == provider_id,
                    col(Server.gone_at).is_not(None),
                    col(Server.tenant_id).is_not(None),
                )
            ).all()
            if booked
        ]
    for server_id in ids:
        with db.unit_of_work() as session:
            server = session.get(Server, server_id, with_for_update=True)
            if server is None or server.gone_at is None or not server.booked:
                continue
            ledger.release_owner(session, owner_ref(server.id))
            before = dict(server.booked)
            server.booked = {}
            server.drift = None
            server.drift_at = None
            session.add(server)
            audit.record(
                session,
                Principal.system("inventory-sync"),
                "server.gone",
                tenant=_tenant_row(session, server.tenant_id) if server.tenant_id else None,
                target_type="server",
                target_id=server.id,
                before={"booked": before},
                after={"booked": {}, "gone_at": server.gone_at},
            )
        counts.add("released")


def _adopt_by_owner(db: SessionSource, provider_id: uuid.UUID, counts: Counts) -> None:
    with db.unit_of_work(write=False) as session:
        by_code, _ = _tenants(session)
        candidates = [
            (sid, by_code[code])
            for sid, tag, tenant_id, booked in session.execute(
                sa_select(
                    col(Server.id), col(Server.owner_tag), col(Server.tenant_id), col(Server.booked)
                ).where(
                    col(Server.provider_id) == provider_id,
                    col(Server.gone_at).is_(None),
                    col(Server.owner_tag).is_not(None),
                )
            ).all()
            if not booked
            and (code := tenant_code_of(tag)) in by_code
            and tenant_id in (None, by_code[code].id)
            and by_code[code].kind != TenantKind.center
        ]
    actor = Principal.system("inventory-sync")
    for server_id, ref in candidates:
        try:
            with db.unit_of_work() as session:
                server = session.get(Server, server_id, with_for_update=True)
                tenant = session.get(Tenant, ref.id)
                if server is None or tenant is None or server.booked:
                    continue
                book(session, server, tenant, actor=actor)
            counts.add("adopted")
        except GovbrokerError as exc:
            log.warning("adopt failed", error=exc.detail, server=str(server_id))
            with db.unit_of_work() as session:
                server = session.get(Server, server_id, with_for_update=True)
                if server is not None:
                    server.tenant_id = None
                    server.adopt_error = f"{ref.code}: {exc.detail}"[:1000]
                    session.add(server)
            counts.add("adopt_failed")


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
            raise Conflict(f"provider {provider_id} is gone")
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
            Principal.system("inventory-sync"),
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
    creds = providers.credentials_of(provider)
    counts = Counts()
    try:
        driver = (driver_factory or providers.driver_for)(provider)
        try:
            observed = observe(driver, progress)
        finally:
            driver.close()
        with db.unit_of_work() as session:
            counts.values.update(apply(session, provider, observed, progress=progress))
        _release_gone(db, provider.id, counts)
        if provider.adopt_by_owner:
            _adopt_by_owner(db, provider.id, counts)
    except drv.DriverError as exc:
        message = providers.scrub(f"{type(exc).__name__}: {exc.provider_message}", creds)
        log.warning("provider sync failed", provider=provider.name, error=message)
        return _finish_run(db, run_id, provider.id, started, counts.values, message)
    except Exception as exc:
        message = providers.scrub(f"{type(exc).__name__}: {exc}", creds)
        # the traceback may quote the credentials (a driver's locals, an URL): scrub it too
        trace = providers.scrub("".join(traceback.format_exception(exc)), creds)
        log.error("provider sync crashed", provider=provider.name, error=message, trace=trace)
        return _finish_run(db, run_id, provider.id, started, counts.values, message)
    outcome = _finish_run(db, run_id, provider.id, started, counts.values, None)
    log.info(
        "provider synced",
        provider=provider.name,
        duration_ms=outcome.duration_ms,
        **{k: v for k, v in counts.values.items() if v},
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
        except Conflict as exc:  # being synced by someone else, or disabled meanwhile
            log.info("provider sync skipped", provider_id=str(pid), reason=exc.detail)
            return None

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(provider_ids)))) as pool:
        results = list(pool.map(one, provider_ids))
    return [r for r in results if r is not None]
