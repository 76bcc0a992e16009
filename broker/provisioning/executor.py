"""Running jobs: the provider call between two short transactions, and the reconciler.

A job is claimed (queued → running, a fresh claim token) in one transaction, the provider is
called with no transaction open, and the outcome is written in a second transaction that checks
the claim is still ours. Whatever dies in between, a process kill included, leaves a running job
whose heartbeat ages; the reconciler then asks the provider what really happened (the server
found by its request tag, or the server's current state) and finishes or releases accordingly.

Quota follows the provider: growth was reserved when the job was made and is committed once the
provider confirms; shrinks are booked only after the provider confirms; a failure gives back the
reservation. Whatever the provider reports the server to hold after the call is what the ledger
ends up holding (a root disk larger than predicted is booked, forced, since it exists).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog
from sqlalchemy import bindparam, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from billing import events
from billing.models import LifecycleKind
from broker.audit import service as audit
from broker.core import clock
from broker.core.authz import Principal
from broker.core.db import SessionSource
from broker.core.errors import Conflict, GovbrokerError
from broker.core.settings import get_settings
from broker.inventory import providers
from broker.inventory import sync as inventory_sync
from broker.inventory.models import Provider, Server
from broker.inventory.sync import INSERT_NEW_SERVER, owner_ref, server_values, size_of
from broker.provisioning.models import ACTIVE_STATES, Job, JobKind, JobState
from broker.tenancy.models import Tenant
from drivers import base as drv
from quotas import ledger

log = structlog.get_logger(__name__)

DriverFactory = Callable[[Provider], drv.Driver]
ACTOR = "provisioning"

_EVENT_OF: Mapping[str, LifecycleKind] = {
    JobKind.create: LifecycleKind.created,
    JobKind.start: LifecycleKind.started,
    JobKind.stop: LifecycleKind.stopped,
    JobKind.reboot: LifecycleKind.rebooted,
    JobKind.resize: LifecycleKind.resized,
    JobKind.attach_disk: LifecycleKind.disk_attached,
    JobKind.detach_disk: LifecycleKind.disk_detached,
    JobKind.add_public_ip: LifecycleKind.ip_added,
    JobKind.release_public_ip: LifecycleKind.ip_released,
    JobKind.delete: LifecycleKind.deleted,
}


@dataclass(frozen=True)
class Claimed:
    """A running job, the provider it runs on, and the claim that makes it ours."""

    job: Job
    provider: Provider
    claim: uuid.UUID


def _append_log(job: Job, **entry: Any) -> None:
    job.log = [*job.log, {"at": clock.now().isoformat(), **entry}][-50:]


def start(job: Job) -> None:
    """Claim a job in the transaction that holds it: running, attempt counted, heartbeat set."""
    now = clock.now()
    job.claim = uuid.uuid4()
    job.attempts += 1
    if job.state != JobState.running:
        job.state = JobState.running.value
        job.started_at = job.started_at or now
        _append_log(job, state=job.state, attempt=job.attempts)
    else:
        _append_log(job, state="resumed", attempt=job.attempts)
    job.heartbeat_at = now


def handover(session: Session, job: Job) -> Claimed | None:
    """What a worker needs to run a job its creator claimed (None when it waits, e.g. for an
    approval); to be used after the creating transaction commits."""
    if job.state != JobState.running or job.claim is None:
        return None
    provider = session.get(Provider, job.provider_id)
    assert provider is not None
    return Claimed(job, provider, job.claim)


def _claim(
    db: SessionSource,
    job_id: uuid.UUID,
    *,
    states: tuple[JobState, ...],
    stale_before: datetime | None = None,
) -> Claimed | None:
    """Take a job; a running one only while its heartbeat is still older than `stale_before`
    (read again under the lock: it may have beaten since the reconciler listed it)."""
    with db.unit_of_work() as session:
        job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
        if job is None or job.state not in states:
            return None
        if stale_before is not None and (job.heartbeat_at or stale_before) > stale_before:
            return None
        provider = session.get(Provider, job.provider_id)
        assert provider is not None
        start(job)
        session.add(job)
        session.flush()
        session.expunge(job)
        session.expunge(provider)
        assert job.claim is not None
        return Claimed(job, provider, job.claim)


# --- the provider side ---------------------------------------------------------------------------


def _spec(job: Job, scope: str | None) -> drv.ServerSpec:
    p = job.params
    pools = p.get("storage_hint") or {}
    disks = tuple(drv.Disk(int(d["size_gb"]), str(d["tier"])) for d in p.get("disks", []))
    # one hint is all the spec carries: the pool of the data disks' tier (or the only one)
    hint = next(iter(pools.values())) if len(pools) == 1 else None
    return drv.ServerSpec(
        name=p["name"],
        image=p["image"],
        network=p.get("network"),
        owner_tag=p["owner_tag"],
        request_tag=job.request_tag,
        flavor=p.get("flavor"),
        vcpu=None if p.get("flavor") else int(p["vcpu"]),
        memory_mb=None if p.get("flavor") else int(p["memory_mb"]),
        disks=disks,
        public_ip=bool(p.get("public_ip")),
        host_hint=p.get("host_hint"),
        storage_hint=hint,
        scope=scope,
        bandwidth_mbps=p.get("bandwidth_mbps"),
    )


def _done_already(job: Job, s: drv.Server) -> bool:
    """Whether the provider shows the job's change made (a resumed job must not do it twice)."""
    p = job.params
    kind = job.kind
    if kind in (JobKind.start, JobKind.reboot):
        return kind == JobKind.start and s.power_state == drv.PowerState.running
    if kind == JobKind.stop:
        return s.power_state == drv.PowerState.stopped
    if kind == JobKind.resize:
        return (s.vcpu, s.memory_mb) == (p["vcpu"], p["memory_mb"])
    if kind == JobKind.attach_disk:
        return len(s.disks) > int(p["disks_before"])
    if kind == JobKind.detach_disk:
        return all(d.external_id != p["disk_id"] for d in s.disks)
    if kind == JobKind.add_public_ip:
        return bool(set(s.public_ips) - set(p.get("public_ips_before") or []))
    if kind == JobKind.release_public_ip:
        return p["ip"] not in s.public_ips
    return False


def _call(driver: drv.Driver, job: Job, resumed: bool) -> drv.Server | None:
    """The provider call of one job; returns the server as the provider reports it after."""
    p = job.params
    if job.kind == JobKind.create:
        scope = None
        if drv.Capability.tenant_scope in driver.capabilities:
            scope = driver.ensure_tenant_scope(p["scope_code"])
        return driver.create_server(_spec(job, scope))
    ext = p["external_id"]
    if job.kind == JobKind.delete:
        with contextlib.suppress(drv.NotFound):  # gone already: what delete wanted
            driver.delete(ext)
        return None
    if resumed:
        current = driver.get_server(ext)
        if _done_already(job, current):
            return current
    try:
        if job.kind == JobKind.start:
            return driver.start(ext)
        if job.kind == JobKind.stop:
            return driver.stop(ext)
        if job.kind == JobKind.reboot:
            return driver.reboot(ext)
        if job.kind == JobKind.resize:
            return driver.resize(ext, vcpu=int(p["vcpu"]), memory_mb=int(p["memory_mb"]))
        if job.kind == JobKind.attach_disk:
            return driver.attach_disk(ext, drv.Disk(int(p["size_gb"]), str(p["tier"])))
        if job.kind == JobKind.detach_disk:
            return driver.detach_disk(ext, str(p["disk_id"]))
        if job.kind == JobKind.add_public_ip:
            return driver.add_public_ip(ext, bandwidth_mbps=p.get("bandwidth_mbps"))
        if job.kind == JobKind.release_public_ip:
            return driver.release_public_ip(ext, str(p["ip"]))
    except drv.Conflict:
        # "already running" and the like: the state asked for may be there already
        current = driver.get_server(ext)
        if _done_already(job, current):
            return current
        raise
    raise AssertionError(f"no provider call for job kind {job.kind}")


# --- the database side ---------------------------------------------------------------------------


# Finishing a job runs once per job, inside the serialised section of the database: its job and
# server statements are Core, built once; the job is read into an object the session does not
# track, and what changes is written back by `_save`.
_JOB = Job.__table__  # type: ignore[attr-defined]
_SERVER = Server.__table__  # type: ignore[attr-defined]
_TENANT = Tenant.__table__  # type: ignore[attr-defined]
# a job with its tenant's path (for its audit event), the job's row locked
_JOB_AND_TENANT = (
    sa_select(_JOB, _TENANT.c.path.label("tenant_path"))
    .join(_TENANT, _TENANT.c.id == _JOB.c.tenant_id)
    .with_for_update(of=_JOB)
)
_LOCK_JOB = _JOB_AND_TENANT.where(_JOB.c.id == bindparam("jid"))
_BEAT = (
    update(_JOB)
    .where(
        _JOB.c.id == bindparam("jid"),
        _JOB.c.state == JobState.running.value,
        _JOB.c.claim == bindparam("b_claim"),
    )
    .values(heartbeat_at=bindparam("now"))
)
_JOB_FIELDS = tuple(c.key for c in _JOB.columns)
_SERVER_FIELDS = tuple(c.key for c in _SERVER.columns)
_SERVER_BY_EXTERNAL_ID = (
    sa_select(_SERVER.c.id, _SERVER.c.booked)
    .where(_SERVER.c.provider_id == bindparam("pid"), _SERVER.c.external_id == bindparam("ext"))
    .with_for_update()
)


@dataclass(frozen=True)
class _TenantRef:
    """What the audit event of a job names of its tenant."""

    id: uuid.UUID
    path: str


def _locked_job(
    session: Session, job_id: uuid.UUID, claim: uuid.UUID
) -> tuple[Job, _TenantRef] | None:
    """The job, its row locked, while the claim is still ours (a copy the session does not
    track: write changes with `_save`); and its tenant."""
    return _ours(session.connection().execute(_LOCK_JOB, {"jid": job_id}).first(), claim)


def _ours(row: Any, claim: uuid.UUID) -> tuple[Job, _TenantRef] | None:
    if row is None or row.state != JobState.running or row.claim != claim:
        return None  # someone else (the reconciler) finished or took it
    job = Job(**{k: getattr(row, k) for k in _JOB_FIELDS})
    return job, _TenantRef(job.tenant_id, row.tenant_path)


_LOCK_JOBS = _JOB_AND_TENANT.where(_JOB.c.id.in_(bindparam("jids", expanding=True))).order_by(
    _JOB.c.id
)


# the servers of a batch's change jobs, in one order (see finish_batch)
_LOCK_SERVERS = (
    sa_select(_SERVER.c.id)
    .where(_SERVER.c.id.in_(bindparam("sids", expanding=True)))
    .order_by(_SERVER.c.id)
    .with_for_update()
)


@functools.cache
def _save_stmt(fields: tuple[str, ...]) -> Any:
    return (
        update(_JOB)
        .where(_JOB.c.id == bindparam("jid"))
        .values({k: bindparam(f"v_{k}") for k in fields})
    )


def _save(session: Session, job: Job, *fields: str) -> None:
    """Write `fields` of a job read by `_locked_job` (its row is locked)."""
    params = {f"v_{k}": getattr(job, k) for k in fields}
    session.connection().execute(_save_stmt(fields), {"jid": job.id, **params})


def _audit(
    session: Session, job: Job, tenant: audit.TenantLike | None, outcome: str, after: dict[str, Any]
) -> None:
    """The audit event of a job's end (`job.<kind>.<outcome>`, or `job.<outcome>`)."""
    audit.record(
        session,
        Principal.system(ACTOR),
        f"job.{outcome}",
        tenant=tenant,
        target_type="job",
        target_id=job.id,
        after=after,
    )


def _beat(session: Session, c: Claimed) -> bool:
    """Refresh the heartbeat while the claim is ours; False when it is not any more."""
    done = session.connection().execute(
        _BEAT, {"jid": c.job.id, "b_claim": c.claim, "now": clock.now()}
    )
    return bool(done.rowcount)


def _book(
    session: Session,
    job: Job,
    ref: str,
    amounts: Mapping[str, int],
    tag: str,
    *,
    force: bool = False,
) -> None:
    """Book `amounts` (negative: a shrink) for the server `ref` at once: reserved and committed
    in one go, because the provider has already made the change."""
    r = ledger.reserve(
        session,
        job.tenant_id,
        amounts,
        ref=f"job:{job.id}:{tag}",
        actor=ACTOR,
        owner_ref=ref,
        force=force,
    )
    ledger.commit(session, r.id, owner_ref=ref)


def _book_difference(
    session: Session, job: Job, ref: str, held: Mapping[str, int], actual: Mapping[str, int]
) -> dict[str, int]:
    """Make the ledger hold `actual` for the server when it holds `held`: the provider made
    the server as it is, so a difference is booked (forced: it exists) and noted on the job."""
    delta = {k: actual.get(k, 0) - held.get(k, 0) for k in set(held) | set(actual)}
    delta = {k: v for k, v in delta.items() if v}
    if not delta:
        return dict(actual)
    grow = {k: v for k, v in delta.items() if v > 0}
    shrink = {k: v for k, v in delta.items() if v < 0}
    for part, force in ((grow, True), (shrink, False)):
        if part:
            _book(session, job, ref, part, f"true-up:{uuid.uuid4().hex[:8]}", force=force)
    _append_log(job, note="the provider's server differs from the request", booked_delta=delta)
    return {k: v for k, v in actual.items() if v}


def _commit_growth(session: Session, job: Job, server_ref: str) -> bool:
    """Commit what the job reserved; False when the reservation lapsed meanwhile."""
    if job.reservation_id is None:
        return True
    try:
        ledger.commit(session, job.reservation_id, owner_ref=server_ref)
    except Conflict:
        return False
    return True


def _emit(
    session: Session, job: Job, server: Server, kind: LifecycleKind, provider: Provider
) -> None:
    events.emit(
        session,
        kind,
        server_id=server.id,
        tenant_id=job.tenant_id,
        agency_id=job.agency_id,
        provider_id=server.provider_id,
        service_company_id=provider.service_company_id,
        power_state=server.power_state,
        sizes=server.booked if server.gone_at is None else {},
        contract_id=server.contract_id,
        actor=job.created_by,
        job_id=job.id,
    )


class _NotBatched(Exception):
    """A job whose booking a batch leaves to be done on its own (see finish_batch)."""


def _finish_create(
    session: Session,
    job: Job,
    observed: drv.Server,
    provider: Provider,
    deferred: list[tuple[uuid.UUID, str]] | None = None,
) -> Server:
    """The server's row and its booking. With `deferred` (a batch), the commit of the job's
    reservation is left to the caller, listed there."""
    classes = ledger.resource_classes(session)
    values = server_values(observed)
    actual = size_of(observed.vcpu, observed.memory_mb, values["disks"], classes)
    if observed.public_ips or job.grow.get("public_ip"):
        actual["public_ip"] = max(len(observed.public_ips), int(job.grow.get("public_ip", 0)))
        if job.grow.get("bandwidth_mbps"):
            actual["bandwidth_mbps"] = int(job.grow["bandwidth_mbps"])
    contract = job.params.get("contract_id")
    owned = {
        **values,
        "tenant_id": job.tenant_id,
        # resolved when the request was accepted (see service._billable)
        "contract_id": uuid.UUID(contract) if contract else None,
        # what the ledger ends up holding, whatever was reserved (see _book_difference)
        "booked": dict(actual),
        "last_seen": clock.now(),
        "drift": None,
        "drift_at": None,
        "adopt_error": None,
        "gone_at": None,
    }
    server = Server(
        id=job.server_id, provider_id=job.provider_id, external_id=observed.external_id, **owned
    )
    conn = session.connection()
    insert_new = INSERT_NEW_SERVER[conn.dialect.name]
    if conn.execute(insert_new, {k: getattr(server, k) for k in _SERVER_FIELDS}).first() is None:
        # a row is there already: sync listed the server while the job ran, or someone adopted it
        if deferred is not None:
            raise _NotBatched(f"server {observed.external_id} has a row already")
        return _take_over(session, job, observed, owned)
    ref = owner_ref(job.server_id)
    held = {k: v for k, v in job.grow.items() if v}
    if deferred is not None:
        if job.reservation_id is None or held != actual:
            raise _NotBatched("the server differs from the request")
        deferred.append((job.reservation_id, ref))
        return server
    if not _commit_growth(session, job, ref):
        held = {}  # lapsed: the server exists, so what it holds is booked, forced
    _book_difference(session, job, ref, held, actual)
    return server


def _take_over(session: Session, job: Job, observed: drv.Server, owned: dict[str, Any]) -> Server:
    """Finish a create whose server already has a row."""
    found = (
        session.connection()
        .execute(_SERVER_BY_EXTERNAL_ID, {"pid": job.provider_id, "ext": observed.external_id})
        .first()
    )
    assert found is not None
    if found.booked:
        # booked by someone else (a center admin adopted it by hand): that booking stands
        if job.reservation_id is not None:
            ledger.release(session, job.reservation_id)
        _append_log(job, note="the server was already booked; the job's reservation was returned")
        server = session.get(Server, found.id)
        assert server is not None
        return server
    # a row sync wrote meanwhile (it leaves servers of running jobs unbooked) is taken over
    job.server_id = found.id
    ref = owner_ref(job.server_id)
    held = dict(job.grow)
    if not _commit_growth(session, job, ref):
        held = {}  # lapsed: the server exists, so what it holds is booked below, forced
    owned = {**owned, "booked": _book_difference(session, job, ref, held, owned["booked"])}
    existing = session.get(Server, found.id, populate_existing=True)
    assert existing is not None
    for k, v in owned.items():
        setattr(existing, k, v)
    session.add(existing)
    return existing


def _finish_change(
    session: Session, job: Job, observed: drv.Server | None, provider: Provider
) -> Server | None:
    server = session.get(Server, job.server_id, with_for_update=True, populate_existing=True)
    if server is None:
        return None
    ref = owner_ref(server.id)
    now = clock.now()
    if job.kind == JobKind.delete:
        ledger.release_owner(session, ref)
        server.booked = {}
        server.gone_at = server.gone_at or now
        server.last_seen = now  # newer than any listing a running sync holds
        server.drift = None
        server.drift_at = None
        session.add(server)
        return server
    assert observed is not None
    booked = dict(server.booked)
    if job.grow:
        if not _commit_growth(session, job, ref):
            # lapsed while the provider worked: the change exists, so it is booked anyway
            _book(session, job, ref, job.grow, "late", force=True)
        for k, v in job.grow.items():
            booked[k] = booked.get(k, 0) + v
    if job.shrink:
        _book(session, job, ref, {k: -v for k, v in job.shrink.items()}, "shrink")
        for k, v in job.shrink.items():
            booked[k] = booked.get(k, 0) - v
    for k, v in server_values(observed).items():
        setattr(server, k, v)
    server.booked = {k: v for k, v in booked.items() if v}
    server.last_seen = now
    server.drift = None
    server.drift_at = None
    session.add(server)
    return server


def _finish(
    db: SessionSource, c: Claimed, observed: drv.Server | None, *, note: str | None = None
) -> bool:
    with db.unit_of_work() as session:
        return _finish_in(session, c, observed, note, _locked_job(session, c.job.id, c.claim))


def _finish_in(
    session: Session,
    c: Claimed,
    observed: drv.Server | None,
    note: str | None,
    locked: tuple[Job, _TenantRef] | None,
    deferred: list[tuple[uuid.UUID, str]] | None = None,
) -> bool:
    """Book a job's outcome in `session`, given the job as read under its row lock."""
    if locked is None:
        return False
    job, tenant = locked
    if job.kind == JobKind.create:
        assert observed is not None
        server: Server | None = _finish_create(session, job, observed, c.provider, deferred)
    else:
        server = _finish_change(session, job, observed, c.provider)
    now = clock.now()
    job.state = JobState.succeeded.value
    job.finished_at = now
    job.error = None
    job.error_type = None
    if server is not None:
        session.flush()  # the server row before the lifecycle event naming it
        _emit(session, job, server, _EVENT_OF[job.kind], c.provider)
        job.result = {
            "server_id": str(server.id),
            "external_id": server.external_id,
            "name": server.name,
            "power_state": server.power_state,
            "ips": server.ips,
            "booked": server.booked,
        }
    _append_log(job, state=job.state, **({"note": note} if note else {}))
    _save(session, job, "state", "finished_at", "error", "error_type", "result", "log", "server_id")
    _audit(
        session,
        job,
        tenant,
        f"{job.kind}.succeeded",
        {
            "server_id": str(job.server_id),
            "booked": job.result.get("booked") if job.result else None,
        },
    )
    return True


Outcome = tuple[Claimed, drv.Server | None, str | None]  # the job, what the provider shows, a note


def finish_batch(db: SessionSource, outcomes: Sequence[Outcome]) -> list[bool] | None:
    """Book several jobs' outcomes in one unit of work: one commit (and one turn at the audit
    chain's lock) instead of one each. Returns, per job, whether it was booked (False: the
    claim was lost, as `_finish`); or None when the batch could not be booked as a whole (a
    ledger refusal, a server that differs from its request, a database error): nothing of it is
    kept, and each job is to be finished on its own, where whatever went wrong is handled for
    that job alone.

    Locks follow the order every other writer takes them in: jobs, then servers (as sync and
    the one-by-one finish lock a server before its quota), then every quota row the batch may
    book, all at once in the global order, so that no booking locks a row out of that order.
    A batch of creates only books nothing before its reservations' commits: it takes the quota
    rows last, so that requests (which lock their agency's rows) wait for it as briefly as
    possible."""
    try:
        with db.unit_of_work() as session:
            found = {
                row.id: row
                for row in session.connection().execute(
                    _LOCK_JOBS, {"jids": sorted({c.job.id for c, _, _ in outcomes}, key=str)}
                )
            }
            locked = [_ours(found.get(c.job.id), c.claim) for c, _, _ in outcomes]
            jobs = [mine[0] for mine in locked if mine is not None]
            tenants = {job.tenant_id for job in jobs}
            classes = ledger.resource_classes(session)
            changed = sorted(
                {j.server_id for j in jobs if j.kind != JobKind.create and j.server_id},
                key=str,
            )
            if changed:
                session.connection().execute(_LOCK_SERVERS, {"sids": changed})
                ledger.lock_tenants(session, tenants, classes)  # before their inline bookings
            deferred: list[tuple[uuid.UUID, str]] = []
            booked = [
                _finish_in(session, c, observed, note, mine, deferred)
                for (c, observed, note), mine in zip(outcomes, locked, strict=True)
            ]
            if not changed:
                ledger.lock_tenants(session, tenants, classes)
            for reservation_id, ref in deferred:
                ledger.commit(session, reservation_id, owner_ref=ref)
            return booked
    except Exception:
        log.info("a batch of finished jobs is booked one by one", exc_info=True)
        return None


def _fail(db: SessionSource, c: Claimed, error: str, error_type: str) -> bool:
    with db.unit_of_work() as session:
        locked = _locked_job(session, c.job.id, c.claim)
        if locked is None:
            return False
        job, tenant = locked
        if job.reservation_id is not None:
            ledger.release(session, job.reservation_id)
        job.state = JobState.failed.value
        job.finished_at = clock.now()
        job.error = error[:4000]
        job.error_type = error_type
        _append_log(job, state=job.state, error=job.error[:500])
        _save(session, job, "state", "finished_at", "error", "error_type", "log")
        _audit(
            session,
            job,
            tenant,
            f"{job.kind}.failed",
            {"error": job.error, "error_type": error_type},
        )
    return True


def _park(db: SessionSource, c: Claimed, error: str) -> None:
    """Leave the job running for the reconciler, due after a backoff that grows per attempt."""
    settings = get_settings()
    with db.unit_of_work() as session:
        locked = _locked_job(session, c.job.id, c.claim)
        if locked is None:
            return
        job = locked[0]
        backoff = min(settings.job_stale_seconds, 30 * 2 ** min(job.attempts, 10))
        # the reconciler takes running jobs whose heartbeat is older than job_stale_seconds
        job.heartbeat_at = clock.now() - timedelta(seconds=settings.job_stale_seconds - backoff)
        job.error = error[:4000]
        job.error_type = "Unavailable"
        _append_log(job, note="provider unavailable; the reconciler retries", error=error[:500])
        _save(session, job, "heartbeat_at", "error", "error_type", "log")


def _message(exc: drv.DriverError, provider: Provider) -> str:
    return providers.scrub(exc.provider_message, providers.credentials_of(provider)) or exc.message


# books a job's outcome together with others' (see ThreadRunner); None: not booked, on its own
Finisher = Callable[[Claimed, drv.Server | None, str | None], bool | None]


def run(
    db: SessionSource,
    job: uuid.UUID | Claimed,
    *,
    driver_factory: DriverFactory | None = None,
    finisher: Finisher | None = None,
) -> str | None:
    """Run a job to its end: one claimed already by its creator, or a queued one by id (claimed
    here); returns the state it reached (None: not ours to run)."""
    c = job if isinstance(job, Claimed) else _claim(db, job, states=(JobState.queued,))
    if c is None or not _still_ours(db, c):
        return None
    return _execute(db, c, driver_factory or providers.driver_for, resumed=False, finisher=finisher)


def _still_ours(db: SessionSource, c: Claimed) -> bool:
    """A job that waited for a worker long enough to look stale may have been taken by the
    reconciler meanwhile: check the claim (and beat) before asking the provider anything."""
    if c.job.heartbeat_at is None or clock.now() - c.job.heartbeat_at < timedelta(
        seconds=beat_interval()
    ):
        return True  # fresh: no reconciler takes a job before it is stale
    with db.unit_of_work() as session:
        if not _beat(session, c):
            log.info("job taken over while it waited for a worker", job=str(c.job.id))
            return False
    return True


def beat_interval() -> float:
    return max(1.0, get_settings().job_stale_seconds / 3)


class _Heart:
    """One thread per process that beats for every job whose provider call is in flight: a
    thread started per job costs more than the job itself when the provider answers at once."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        # claim -> (database, job, interval, next beat due, as time.monotonic())
        self._jobs: dict[uuid.UUID, tuple[SessionSource, Claimed, float, float]] = {}
        self._beating: set[uuid.UUID] = set()
        self._thread: threading.Thread | None = None

    def add(self, db: SessionSource, c: Claimed, interval: float) -> None:
        with self._cond:
            self._jobs[c.claim] = (db, c, interval, time.monotonic() + interval)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def remove(self, c: Claimed) -> None:
        """Stop beating for `c`; returns once no beat for it is under way (a late beat would
        overwrite a heartbeat the caller is about to set, e.g. when parking the job)."""
        with self._cond:
            self._jobs.pop(c.claim, None)
            while c.claim in self._beating:
                self._cond.wait()

    def _due(self) -> list[tuple[SessionSource, Claimed]]:
        with self._cond:
            while True:
                now = time.monotonic()
                due = [(k, v) for k, v in self._jobs.items() if v[3] <= now]
                if due:
                    for claim, (db, c, interval, _) in due:
                        self._jobs[claim] = (db, c, interval, now + interval)
                        self._beating.add(claim)
                    return [(v[0], v[1]) for _, v in due]
                nxt = min((v[3] for v in self._jobs.values()), default=None)
                self._cond.wait(None if nxt is None else nxt - now)

    def _run(self) -> None:
        while True:
            for db, c in self._due():
                try:
                    with db.unit_of_work() as session:
                        if not _beat(session, c):
                            with self._cond:
                                self._jobs.pop(c.claim, None)
                except Exception:  # a missed beat is not worth a crashed job
                    log.warning("job heartbeat failed", job=str(c.job.id), exc_info=True)
                finally:
                    with self._cond:
                        self._beating.discard(c.claim)
                        self._cond.notify_all()


_heart = _Heart()


@contextlib.contextmanager
def _heartbeat(db: SessionSource, c: Claimed) -> Iterator[None]:
    """Keep the job's heartbeat fresh while the provider works (a clone can take longer than
    the stale threshold), so that the reconciler does not take over a job that is alive."""
    _heart.add(db, c, beat_interval())
    try:
        yield
    finally:
        _heart.remove(c)


def _execute(
    db: SessionSource,
    c: Claimed,
    factory: DriverFactory,
    *,
    resumed: bool,
    finisher: Finisher | None = None,
) -> str:
    driver: drv.Driver | None = None
    try:
        driver = factory(c.provider)
        with _heartbeat(db, c):
            observed = _call(driver, c.job, resumed)
    except drv.DriverError as exc:
        message = _message(exc, c.provider)
        if exc.retryable:
            return _unsure(db, c, driver, message, finisher)
        _fail(db, c, message, type(exc).__name__)
        return JobState.failed.value
    finally:
        if driver is not None:
            driver.close()
    return _conclude(db, c, observed, finisher=finisher)


def _unsure(
    db: SessionSource,
    c: Claimed,
    driver: drv.Driver | None,
    message: str,
    finisher: Finisher | None = None,
) -> str:
    """The provider failed in a way that may hide success (a lost answer, a timeout): look.
    Found done: finish. Found not done: fail and release. Cannot look: park for the reconciler,
    until the attempts run out."""
    try:
        if driver is None:
            raise drv.Unavailable(message)
        outcome = _look(driver, c.job)
    except drv.DriverError as exc:
        if c.job.attempts >= get_settings().job_max_attempts:
            _fail(db, c, f"{message} (gave up after {c.job.attempts} attempts)", "Unavailable")
            return JobState.failed.value
        _park(db, c, _message(exc, c.provider) if exc.provider_message else message)
        return JobState.running.value
    if outcome is _NOT_DONE:
        _fail(db, c, message, "Unavailable")
        return JobState.failed.value
    return _conclude(
        db,
        c,
        outcome if isinstance(outcome, drv.Server) else None,
        note="the provider's answer was lost; its state shows the change made",
        finisher=finisher,
    )


def _conclude(
    db: SessionSource,
    c: Claimed,
    observed: drv.Server | None,
    *,
    note: str | None = None,
    finisher: Finisher | None = None,
) -> str:
    """Book what the provider did. Should the ledger refuse (a shrink of something the server
    never booked, a quota that lapsed during the job), the job ends failed with why, instead of
    staying running for ever; the next sync flags any difference as drift for the center."""
    try:
        done = finisher(c, observed, note) if finisher is not None else None
        if done is None:
            done = _finish(db, c, observed, note=note)
    except GovbrokerError as exc:
        _fail(
            db,
            c,
            f"the provider made the change, but it could not be booked: {exc.detail}",
            type(exc).__name__,
        )
        return JobState.failed.value
    return JobState.succeeded.value if done else JobState.failed.value


_NOT_DONE = object()
_GONE = object()


def _look(driver: drv.Driver, job: Job) -> Any:
    """What the provider shows of the job's change: the server if made, _GONE for a finished
    delete, _NOT_DONE otherwise."""
    if job.kind == JobKind.create:
        found = driver.find_server_by_tag(job.request_tag)
        return found if found is not None else _NOT_DONE
    try:
        current = driver.get_server(job.params["external_id"])
    except drv.NotFound:
        return _GONE if job.kind == JobKind.delete else _NOT_DONE
    if job.kind == JobKind.delete:
        return _NOT_DONE
    if job.kind == JobKind.reboot:
        # a reboot leaves no trace; a running server is as good as rebooted
        return current if current.power_state == drv.PowerState.running else _NOT_DONE
    return current if _done_already(job, current) else _NOT_DONE


# --- the reconciler ------------------------------------------------------------------------------


def reconcile(db: SessionSource, *, driver_factory: DriverFactory | None = None) -> dict[str, int]:
    """Resolve what a crash or a lost provider left behind: expired approvals, queued jobs no
    worker took, and running jobs whose heartbeat stopped."""
    settings = get_settings()
    factory = driver_factory or providers.driver_for
    now = clock.now()
    counts = {"expired": 0, "started": 0, "resolved": 0}
    with db.unit_of_work(write=False) as session:
        due_approval = list(
            session.execute(
                select(Job.id).where(
                    Job.state == JobState.pending_approval, col(Job.deadline) <= now
                )
            ).scalars()
        )
        queued = list(
            session.execute(
                select(Job.id).where(
                    Job.state == JobState.queued,
                    col(Job.heartbeat_at)
                    <= now - timedelta(seconds=settings.job_queued_grace_seconds),
                )
            ).scalars()
        )
        stale = list(
            session.execute(
                select(Job.id).where(
                    Job.state == JobState.running,
                    col(Job.heartbeat_at) <= now - timedelta(seconds=settings.job_stale_seconds),
                )
            ).scalars()
        )
    for job_id in due_approval:
        counts["expired"] += _expire(db, job_id)
    for job_id in queued:
        try:
            if run(db, job_id, driver_factory=factory) is not None:
                counts["started"] += 1
        except Exception:  # one job's trouble must not starve the rest
            log.exception("a queued job failed to run", job=str(job_id))
    stale_before = now - timedelta(seconds=settings.job_stale_seconds)
    for job_id in stale:
        c = _claim(db, job_id, states=(JobState.running,), stale_before=stale_before)
        if c is None:
            continue
        try:
            _resolve(db, c, factory)
        except Exception:  # one job's trouble must not starve the rest
            log.exception("reconciling a job failed", job=str(job_id))
            continue
        counts["resolved"] += 1
    return counts


def _resolve(db: SessionSource, c: Claimed, factory: DriverFactory) -> None:
    driver: drv.Driver | None = None
    try:
        driver = factory(c.provider)
        _unsure(db, c, driver, c.job.error or "interrupted (the process running it stopped)")
    except drv.DriverError as exc:
        _unsure(db, c, None, _message(exc, c.provider))
    finally:
        if driver is not None:
            driver.close()


def _expire(db: SessionSource, job_id: uuid.UUID) -> int:
    with db.unit_of_work() as session:
        job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
        if job is None or job.state != JobState.pending_approval:
            return 0
        if job.reservation_id is not None:
            ledger.release(session, job.reservation_id)
        job.state = JobState.expired.value
        job.finished_at = clock.now()
        job.error = "nobody approved the request before its deadline"
        _append_log(job, state=job.state)
        session.add(job)
        _audit(session, job, session.get(Tenant, job.tenant_id), "expired", {"state": job.state})
    return 1


def _claimed_tags(session: Session, tags: set[str]) -> set[str]:
    if not tags:
        return set()
    stmt = select(Job.request_tag).where(
        col(Job.request_tag).in_(list(tags)),
        col(Job.state).in_([s.value for s in ACTIVE_STATES]),
    )
    return set(session.execute(stmt).scalars())


inventory_sync.register_claimed_tags(_claimed_tags)


# --- runners -------------------------------------------------------------------------------------


class JobRunner(Protocol):
    def submit(self, job: uuid.UUID | Claimed) -> None: ...


class InlineRunner:
    """Runs each job at once, in the caller's thread: for tests and the CLI."""

    def __init__(self, db: SessionSource, driver_factory: DriverFactory | None = None) -> None:
        self.db = db
        self.driver_factory = driver_factory

    def submit(self, job: uuid.UUID | Claimed) -> None:
        run(self.db, job, driver_factory=self.driver_factory)


class _Batcher:
    """Books finished jobs in batches, in a thread of its own: each worker hands over what the
    provider did and waits for the booking; whatever arrives while a batch is being booked goes
    into the next one. Nothing waits on purpose, so a lone job is booked at once."""

    def __init__(self, db: SessionSource, most: int) -> None:
        self.db = db
        self.most = most
        self._cond = threading.Condition()
        self._queue: list[_Slot] = []
        self._thread: threading.Thread | None = None
        self._stopping = False

    def __call__(self, c: Claimed, observed: drv.Server | None, note: str | None) -> bool | None:
        slot = _Slot((c, observed, note))
        with self._cond:
            if self._stopping:
                return None
            self._queue.append(slot)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="job-batcher", daemon=True)
                self._thread.start()
            self._cond.notify()
        slot.done.wait()
        return slot.booked

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue[: self.most], self._queue[self.most :]
            booked = finish_batch(self.db, [slot.outcome for slot in batch])
            for n, slot in enumerate(batch):
                slot.booked = booked[n] if booked is not None else None
                slot.done.set()

    def stop(self) -> None:
        """Book what is queued, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()


@dataclass
class _Slot:
    outcome: Outcome
    booked: bool | None = None
    done: threading.Event = field(default_factory=threading.Event)


class ThreadRunner:
    """A bounded pool of worker threads in the API process. A job lost with the process is
    found by the reconciler, so nothing here needs to survive a restart. The workers call the
    providers; what they did is booked in batches (see `finish_batch`)."""

    BATCH = 16

    def __init__(
        self,
        db: SessionSource,
        workers: int | None = None,
        driver_factory: DriverFactory | None = None,
    ) -> None:
        self.db = db
        self.driver_factory = driver_factory
        self._pool = ThreadPoolExecutor(
            max_workers=workers or get_settings().job_workers, thread_name_prefix="job"
        )
        self._batcher = _Batcher(db, self.BATCH)
        self._pending: set[Future[Any]] = set()
        self._lock = threading.Lock()

    def _run(self, job: uuid.UUID | Claimed) -> None:
        try:
            run(self.db, job, driver_factory=self.driver_factory, finisher=self._batcher)
        except Exception:
            job_id = job.job.id if isinstance(job, Claimed) else job
            log.exception("job crashed; the reconciler will pick it up", job=str(job_id))

    def submit(self, job: uuid.UUID | Claimed) -> None:
        try:
            future = self._pool.submit(self._run, job)
        except RuntimeError:
            # shut down (the process is stopping): the job is written and claimed, and the
            # reconciler of whichever process runs next resolves it once it looks stale
            job_id = job.job.id if isinstance(job, Claimed) else job
            log.warning("job left for the reconciler: the runner is shut down", job=str(job_id))
            return
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def drain(self, timeout: float | None = None) -> None:
        """Wait for every submitted job (tests, benchmarks, shutdown)."""
        with self._lock:
            pending = list(self._pending)
        for f in pending:
            f.result(timeout=timeout)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
        self._batcher.stop()
