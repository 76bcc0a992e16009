"""Many kinds of writers at once on one real database: server requests (placed first or held
first, with and without a public IP, both agencies, some with an Idempotency-Key), their jobs
booked in batches by a ThreadRunner, lifecycle actions on the servers that exist, inventory sync,
the reconciler, the reservation sweep and quota holds that lapse under it.

test_lock_order.py pins each lock-order deadlock found so far, one scene at a time; this is the
broad net. No writer may fail with a database error (PostgreSQL deadlock, serialization failure
or lock timeout; SQLite "database is locked"), including where the broker swallows it (a batch
booked one by one, a crashed job, a failed sync). The refusals a caller is meant to see (Conflict,
busy or NoPlacement included, QuotaExceeded, Invalid) are counted. Once the load is over and the
jobs are settled, the books balance:
- per tenant and class, the ledger's committed allocations == the `booked` of its live managed
  servers, and every agency's and system's quota counters agree; nothing is reserved any more;
- every server at a provider has an inventory row, managed, booked at the size the provider shows;
- the audit chain verifies.

The load is a fixed number of operations, never a duration: 4 requesters x 50 requests and
2 actors x 75 actions in the foreground; in the background, spread over those 350 operations by
count (see Pace), 70 syncs (the two providers in turn), 70 rounds of the reconciler and the sweep,
and 50 holds. Randomness is seeded; what the threads' interleaving decides is only counted.
"""

from __future__ import annotations

import random
import sqlite3
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import time_machine
from sqlalchemy import func
from sqlalchemy.exc import DBAPIError
from sqlmodel import col, select

from broker.audit.service import verify_chain
from broker.core.authz import Principal
from broker.core.db import Database
from broker.core.errors import Conflict, Invalid, QuotaExceeded
from broker.core.settings import get_settings
from broker.inventory import sync
from broker.inventory.models import Server
from broker.jobs import registry
from broker.provisioning import executor, service
from broker.provisioning.models import ACTIVE_STATES, Job
from broker.provisioning.schemas import ServerAction, ServerCreate
from broker.tenancy import auth
from broker.tenancy.models import Tenant, User
from drivers.simulator import SimulatorDriver
from quotas import ledger
from quotas import service as quotas
from quotas.models import Quota, Reservation
from tests.fixtures.auth import Estate, build_estate
from tests.fixtures.inventory import register_simulator
from tests.fixtures.provisioning import (
    ADMIN,
    assert_booked_as_seen,
    committed_and_booked,
    give_room,
    offer,
)
from tests.fixtures.quota import set_limits

pytestmark = pytest.mark.slow

SEED = 20261102
START = datetime(2026, 11, 2, 1, 0, tzinfo=UTC)

# who asks for servers (username, system), N_REQUESTS each; who acts on them (username, systems)
REQUESTERS = [("a-member", "a1"), ("b-member", "b1"), ("a-admin", "a2"), ("b-admin", "b1")]
ACTORS = [("a-admin", ("a1", "a2")), ("b-admin", ("b1",))]
N_REQUESTS = 50
N_ACTIONS = 75
FOREGROUND = len(REQUESTERS) * N_REQUESTS + len(ACTORS) * N_ACTIONS
# background rounds: one every so many foreground operations
SYNC_EVERY = 5
RECONCILE_EVERY = 5
HOLD_EVERY = 7

# twice the simulator's default memory: the load fills the first host (placement packs servers
# onto the fullest one that fits) without the provider refusing most of what comes after
HOSTS = [
    {"name": "sim-host-01", "vcpu": 64, "memory_mb": 524288, "cluster": "sim-cluster"},
    {"name": "sim-host-02", "vcpu": 64, "memory_mb": 524288, "cluster": "sim-cluster"},
]
LIMITS = [
    ("a", "vcpu", 150),
    ("a1", "vcpu", 60),
    ("b", "vcpu", 100),
    ("a", "memory_mb", 500_000),
    ("b", "memory_mb", 500_000),
]

# what a caller is meant to be told (NoPlacement and "busy" are Conflicts)
REFUSALS = (Conflict, QuotaExceeded, Invalid)
DB_ERRORS = (DBAPIError, sqlite3.Error, psycopg.Error)
ACTIVE = [a.value for a in ACTIVE_STATES]
PROVIDER_REFUSALS = {"ProviderQuotaExceeded"}
OWN_OUTCOME = {"provider sync failed", "provider sync crashed"}
DB_WORDS = ("OperationalError", "DBAPIError", "deadlock", "database is locked", "could not serial")


def _is_db_error(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, DB_ERRORS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass
class Findings:
    """What the load did (counted) and what went wrong (listed), from every thread."""

    counts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.counts[what] += n

    def fail(self, where: str, exc: BaseException | None = None, detail: str = "") -> None:
        text = f"{where}: {detail}"
        if exc is not None:
            text += "\n" + "".join(traceback.format_exception(exc))
        cause = f"{type(exc).__name__}: {exc}" if exc is not None else detail
        with self._lock:
            self.failures.append(text)
            self.kinds[f"{where}: {cause.splitlines()[0][:200] if cause else ''}"] += 1

    def report(self, full: int = 1) -> str:
        """Each kind of failure with how often it happened, then the first `full` in full."""
        kinds = "\n".join(f"{n:3d} x {kind}" for kind, n in self.kinds.most_common())
        shown = "\n\n".join(self.failures[:full])
        return f"{len(self.failures)} failures:\n{kinds}\n\nin full:\n{shown}"

    def attempt(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one operation: a refusal is counted, anything else is a failure."""
        try:
            result = fn(*args, **kwargs)
        except REFUSALS as exc:
            self.count(f"{what}:{type(exc).__name__}")
            return None
        except Exception as exc:
            self.fail(what, exc)
            return None
        self.count(f"{what}:ok")
        return result


class LogWatch:
    """Stands in for a broker module's logger, to see the errors the broker swallows and logs: a
    batch of finished jobs booked one by one, a crashed job, a failed sync or reconciler round."""

    def __init__(self, module: str, findings: Findings) -> None:
        self.module = module
        self.findings = findings

    def _seen(self, level: str, event: str, kw: dict[str, Any]) -> None:
        if event in OWN_OUTCOME:
            return  # the sync's outcome says it (see syncer): once is enough
        exc = sys.exc_info()[1] if kw.get("exc_info") or level == "exception" else None
        where = f"{self.module} logged {event!r}"
        text = " ".join(str(v) for v in kw.values())
        broken = _is_db_error(exc) or any(w in text for w in DB_WORDS)
        if broken or level in ("error", "exception"):
            self.findings.fail(where, exc, text)
        elif exc is not None or level == "warning":
            # e.g. a batch with a job whose server differs from its request: booked alone
            self.findings.count(f"log:{event}:{type(exc).__name__ if exc else level}")

    def info(self, event: str, **kw: Any) -> None:
        if kw.get("exc_info"):
            self._seen("info", event, kw)

    def debug(self, event: str, **kw: Any) -> None:
        pass

    def warning(self, event: str, **kw: Any) -> None:
        self._seen("warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._seen("error", event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        self._seen("exception", event, kw)


class Pace:
    """Counts the foreground operations, so that each background writer runs its fixed number of
    rounds spread over the load instead of by the clock; and the jobs, so that an actor finding
    every server busy waits for one to be done instead of spending its operation."""

    def __init__(self, requesters: int) -> None:
        self._cond = threading.Condition()
        self.done = 0
        self.requesters = requesters  # still asking for servers
        self.jobs_submitted = 0
        self.jobs_done = 0

    def step(self) -> None:
        with self._cond:
            self.done += 1
            self._cond.notify_all()

    def reach(self, n: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.done >= n)

    def job(self, delta: int) -> None:
        with self._cond:
            if delta > 0:
                self.jobs_submitted += delta
            else:
                self.jobs_done -= delta
            self._cond.notify_all()

    def requester_over(self) -> None:
        with self._cond:
            self.requesters -= 1
            self._cond.notify_all()

    def another_job_done(self, seen: int) -> bool:
        """Wait until more than `seen` jobs are done; False once none is left to run or to come."""

        def over() -> bool:
            return self.jobs_done > seen or (
                self.requesters == 0 and self.jobs_done >= self.jobs_submitted
            )

        with self._cond:
            # bounded only so that a runner that stopped fails the test instead of hanging it
            self._cond.wait_for(over, timeout=120)
            return self.jobs_done > seen


class Runner(executor.ThreadRunner):
    """The API's job runner (the API makes it with the same defaults), counting its jobs."""

    def __init__(self, db: Database, pace: Pace) -> None:
        super().__init__(db)
        self.pace = pace

    def submit(self, job: uuid.UUID | executor.Claimed) -> None:
        self.pace.job(+1)
        super().submit(job)

    def _run(self, job: uuid.UUID | executor.Claimed) -> None:
        try:
            super()._run(job)
        finally:
            self.pace.job(-1)


@dataclass
class World:
    db: Database
    estate: Estate
    providers: dict[str, uuid.UUID]  # name -> id
    sims: list[SimulatorDriver]
    principals: dict[str, Principal]


@pytest.fixture
def ticking() -> Iterator[time_machine.Traveller]:
    """The broker's clock, running from a fixed instant (a frozen one would give racing writers
    equal timestamps, which a real clock never does), and movable for settling."""
    with time_machine.travel(START, tick=True) as traveller:
        yield traveller


@pytest.fixture
def world(committed_db: Database, ticking: time_machine.Traveller) -> Iterator[World]:
    with committed_db.unit_of_work() as s:
        estate = build_estate(s)
        set_limits(s, estate)
    give_room(committed_db, estate, "a", "b")  # type: ignore[arg-type]
    with committed_db.unit_of_work() as s:
        # room for most of what is asked, not all: some requests and resizes are refused
        for code, rc, limit in LIMITS:
            quotas.set_quota(s, ADMIN, estate.tid(code), rc, limit=limit)
    names: dict[str, uuid.UUID] = {}
    sims: list[SimulatorDriver] = []
    # the second puts root disks on hdd: a request naming no provider then needs quota that
    # depends on where it lands, and is placed before it is held ("place first")
    suffix = uuid.uuid4().hex[:8]  # the simulator's shared state is per process and name
    for root, storage in (
        ("ssd", {"ssd": 10240, "hdd": 51200}),
        ("hdd", {"hdd": 51200, "ssd": 10240}),
    ):
        name = f"mixed-{root}-{suffix}"
        opts = {"state": f"shared:{name}", "retry_max_wait": 0, "latency_ms": 0}
        pid = register_simulator(committed_db, name, {**opts, "hosts": HOSTS, "storage": storage})
        offer(committed_db, pid)  # type: ignore[arg-type]
        names[name] = pid
        sims.append(SimulatorDriver(f"sim://{name}", {}, opts))
    with committed_db.unit_of_work(write=False) as s:
        users = {u for u, _ in REQUESTERS} | {u for u, _ in ACTORS}
        loaded = {u: s.get(User, estate.uid(u)) for u in users}
        principals = {
            u: auth.load_principal(s, user, method="session")
            for u, user in loaded.items()
            if user is not None
        }
    try:
        yield World(committed_db, estate, names, sims, principals)
    finally:
        for name in names:
            SimulatorDriver.ex_reset_shared(name)


# --- the writers ---------------------------------------------------------------------------------


def _request_body(w: World, rng: random.Random, system: str, n: int) -> ServerCreate:
    size: dict[str, Any] = rng.choice(
        [{"flavor": "s1.small"}] * 3 + [{"flavor": "s1.medium"}, {"vcpu": 2, "memory_mb": 4096}]
    )
    ip = rng.random()
    return ServerCreate(
        name=f"load-{system}-{n:03d}-{rng.randrange(16**4):04x}",
        system_id=w.estate.tid(system),
        image="centos-7.9",
        # naming a provider: held first; naming none: placed first (the tiers differ)
        provider=rng.choice([None, None, *w.providers]),
        public_ip=ip < 0.4,
        bandwidth_mbps=rng.choice([5, 10]) if ip < 0.3 else None,
        **size,
    )


def requester(w: World, runner: executor.ThreadRunner, pace: Pace, found: Findings, n: int) -> None:
    username, system = REQUESTERS[n]
    principal = w.principals[username]
    rng = random.Random(SEED + n)
    keys: list[tuple[str, ServerCreate]] = []
    key: str | None
    try:
        for i in range(N_REQUESTS):
            try:
                if keys and rng.random() < 0.1:
                    key, data = rng.choice(keys)  # a client retrying: the first answer again
                else:
                    data = _request_body(w, rng, system, i)
                    key = f"load-{n}-{i}" if rng.random() < 0.25 else None
                    if key is not None:
                        keys.append((key, data))
                # what was asked (seeded, the same every run): held first or placed first
                found.count("asked:" + ("held-first" if data.provider else "placed-first"))
                found.count("asked:public-ip" if data.public_ip else "asked:no-public-ip")
                submitted = found.attempt(
                    "request", service.request_server, w.db, principal, data, key=key
                )
                if submitted is not None:
                    if submitted.replayed:
                        found.count("request:replayed")
                    if submitted.claimed is not None:
                        runner.submit(submitted.claimed)
            except Exception as exc:
                found.fail("requester", exc)
            finally:
                pace.step()
    finally:
        pace.requester_over()


def _act_once(
    w: World, runner: executor.ThreadRunner, principal: Principal, server: Server, action: str
) -> None:
    """As the API's action and delete routes do: one unit of work, then the job to a worker."""
    with w.db.unit_of_work() as s:
        if action == "delete":
            job = service.delete(s, principal, server.id)
        else:
            params: dict[str, Any] = {}
            if action == "resize_up":
                vcpu = min(server.vcpu + 1, 4)
                params = {"action": "resize", "vcpu": vcpu, "memory_mb": vcpu * 2048}
            elif action == "resize_down":
                params = {"action": "resize", "vcpu": 1, "memory_mb": 2048}
            elif action == "power":
                params = {"action": "stop" if server.power_state == "running" else "start"}
            else:
                params = {"action": "add_public_ip", "bandwidth_mbps": 5}
            job = service.act(s, principal, server.id, ServerAction(**params))
        claimed = executor.handover(s, job)
    if claimed is not None:
        runner.submit(claimed)


ACTIONS = ["resize_up"] * 3 + ["resize_down"] * 2 + ["power"] * 3 + ["add_ip"] * 2 + ["delete"] * 2


def _idle_servers(w: World, tenants: list[uuid.UUID]) -> list[Server]:
    """The tenants' live servers with no job under way, by name."""
    with w.db.unit_of_work(write=False) as s:
        rows = list(
            s.execute(
                select(Server)
                .where(
                    col(Server.tenant_id).in_(tenants),
                    col(Server.gone_at).is_(None),
                    col(Server.id).not_in(select(Job.server_id).where(col(Job.state).in_(ACTIVE))),
                )
                .order_by(Server.name)
            ).scalars()
        )
        for row in rows:
            s.expunge(row)
    return rows


def actor(w: World, runner: executor.ThreadRunner, pace: Pace, found: Findings, n: int) -> None:
    username, systems = ACTORS[n]
    principal = w.principals[username]
    rng = random.Random(SEED + 100 + n)
    tenants = [w.estate.tid(code) for code in systems]
    for _ in range(N_ACTIONS):
        try:
            while True:
                seen = pace.jobs_done
                idle = _idle_servers(w, tenants)
                if idle or not pace.another_job_done(seen):
                    break
            if not idle:
                found.count("act:nothing-to-act-on")
                continue
            action = rng.choice(ACTIONS)
            server = rng.choice(idle)
            found.attempt(f"act:{action}", _act_once, w, runner, principal, server, action)
        except Exception as exc:
            found.fail("actor", exc)
        finally:
            pace.step()


def syncer(w: World, pace: Pace, found: Findings) -> None:
    ids = list(w.providers.values())
    for r in range(FOREGROUND // SYNC_EVERY):
        pace.reach(r * SYNC_EVERY)
        try:
            outcome = sync.sync_provider(w.db, ids[r % len(ids)])
        except Exception as exc:  # it answers a provider's failure with its outcome
            found.fail("sync", exc)
            continue
        found.count(f"sync:{outcome.status}")
        if outcome.status != "ok":
            # the simulator fails nothing here: the failure is the broker's own
            found.fail("sync", detail=f"{outcome.status}: {outcome.error}")


def reconciler(w: World, pace: Pace, found: Findings) -> None:
    """The scheduler's periodic jobs, as the leader runs them."""
    for r in range(FOREGROUND // RECONCILE_EVERY):
        pace.reach(r * RECONCILE_EVERY)
        found.attempt("reconcile", registry.run_job, w.db, "provisioning-reconciler")
        swept = found.attempt("sweep", registry.run_job, w.db, "reservation-sweep")
        found.count("swept", swept or 0)


def holder(w: World, pace: Pace, found: Findings) -> None:
    """Quota held and never used, that lapses within a second: the sweep's work during the load
    (job reservations outlive it), on rows every other writer locks too."""
    rng = random.Random(SEED + 200)
    tenants = [w.estate.tid(code) for code in ("a1", "a2", "b1", "a", "b")]

    def hold(i: int) -> None:
        with w.db.unit_of_work() as s:
            ledger.reserve(
                s,
                rng.choice(tenants),
                rng.choice(
                    [
                        {"vcpu": 1, "instances": 1},
                        {"bandwidth_mbps": 5, "public_ip": 1, "storage_gb.ssd": 10},
                        {"memory_mb": 1024, "storage_gb.hdd": 20, "vcpu": 1},
                    ]
                ),
                ref=f"lapsing-{i}",
                actor="test-holder",
                ttl=timedelta(seconds=1),
            )

    for i in range(FOREGROUND // HOLD_EVERY):
        pace.reach(i * HOLD_EVERY)
        found.attempt("hold", hold, i)


# --- settling and the books ----------------------------------------------------------------------


def _active_jobs(db: Database) -> int:
    with db.unit_of_work(write=False) as s:
        return int(
            s.execute(
                select(func.count(col(Job.id))).where(col(Job.state).in_(ACTIVE))
            ).scalar_one()
        )


def settle(w: World, traveller: time_machine.Traveller, found: Findings) -> None:
    """Finish what a job left active (moving the clock past the stale threshold for the
    reconciler), then sweep every lapsed hold."""
    settings = get_settings()
    for _ in range(settings.job_max_attempts + 2):
        active = _active_jobs(w.db)
        if not active:
            break
        found.count("settle:active-jobs", active)
        traveller.shift(timedelta(seconds=settings.job_stale_seconds + 1))
        counts = executor.reconcile(w.db)
        found.count("settle:reconciled", counts["resolved"] + counts["started"])
    else:
        raise AssertionError(f"{_active_jobs(w.db)} jobs still active after settling")
    traveller.shift(timedelta(minutes=1))  # past every hold's expiry
    while swept := registry.run_job(w.db, "reservation-sweep"):
        found.count("swept", swept)


def assert_books_balance(w: World) -> None:
    with w.db.unit_of_work(write=False) as s:
        rows = list(s.execute(select(Server)).scalars())
        held, expected = committed_and_booked(s)
        assert held == expected, ("ledger vs servers", held, expected)

        paths = {t.id: t.path for t in s.execute(select(Tenant)).scalars()}
        kinds = {t.id: t.kind for t in s.execute(select(Tenant)).scalars()}
        for q in s.execute(select(Quota)).scalars():
            assert q.reserved == 0, ("reserved left with no job active", q)
            if kinds[q.tenant_id] == "center":
                continue  # reservations move the agency's and the system's counters only
            subtree = sum(
                amount
                for (tid, rc), amount in expected.items()
                if rc == q.resource_class and paths[tid].startswith(paths[q.tenant_id])
            )
            assert q.committed == subtree, ("quota counter vs servers", q, subtree)
        reserved = s.execute(
            select(func.count(col(Reservation.id))).where(Reservation.state == ledger.RESERVED)
        ).scalar_one()
        assert reserved == 0, f"{reserved} reservations still held"

        classes = ledger.resource_classes(s)
        by_external = {(r.provider_id, r.external_id): r for r in rows if r.gone_at is None}
        at_providers: set[tuple[uuid.UUID, str]] = set()
        for (name, pid), sim in zip(w.providers.items(), w.sims, strict=True):
            for x in sim.list_servers():
                at_providers.add((pid, x.external_id))
                row = by_external.get((pid, x.external_id))
                assert row is not None, f"{name}: {x.name} is at the provider, not inventoried"
                assert_booked_as_seen(row, x, classes)
        managed = {key for key, r in by_external.items() if r.tenant_id is not None}
        assert managed <= at_providers, ("live rows the providers no longer have", managed)
        chain = verify_chain(s)
        assert chain.ok, chain


# --- the test ------------------------------------------------------------------------------------


def test_mixed_concurrent_load_never_fails_on_the_database_and_the_books_balance(
    world: World, ticking: time_machine.Traveller, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = Findings()
    monkeypatch.setattr(executor, "log", LogWatch("executor", found))
    monkeypatch.setattr(sync, "log", LogWatch("sync", found))
    monkeypatch.setattr(registry, "log", LogWatch("registry", found))
    pace = Pace(len(REQUESTERS))
    runner = Runner(world.db, pace)
    threads = [
        *(
            threading.Thread(target=requester, args=(world, runner, pace, found, n))
            for n in range(len(REQUESTERS))
        ),
        *(
            threading.Thread(target=actor, args=(world, runner, pace, found, n))
            for n in range(len(ACTORS))
        ),
        threading.Thread(target=syncer, args=(world, pace, found)),
        threading.Thread(target=reconciler, args=(world, pace, found)),
        threading.Thread(target=holder, args=(world, pace, found)),
    ]
    for t in threads:
        t.daemon = True  # a hung writer must fail the test, not hang the run
        t.start()
    # a guard against a hang, not a measure: what happens is counted, never timed
    deadline = time.monotonic() + 300
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, (hung, found.failures)
    runner.drain(timeout=300)
    runner.shutdown()
    settle(world, ticking, found)

    with world.db.unit_of_work(write=False) as s:
        jobs = list(s.execute(select(Job.kind, Job.state, Job.error_type, Job.error)).all())
    for kind, state, error_type, error in jobs:
        found.count(f"job:{kind}:{state}")
        if state != "failed":
            continue
        # the provider's refusal (a host placed on, or grown, past the room it really has: the
        # broker knows the room only as of the last sync) fails the job and gives its quota back
        found.count(f"job-failed:{kind}:{error_type}")
        if error_type not in PROVIDER_REFUSALS or any(w in str(error) for w in DB_WORDS):
            found.fail(f"job {kind} failed", detail=f"{error_type}: {error}")
    counts = dict(sorted(found.counts.items()))
    print(counts)
    try:
        assert_books_balance(world)
    except AssertionError as exc:
        found.fail("the books", exc)
    if found.failures:
        print(found.report(full=len(found.failures)))  # pytest shows it with the failure
    assert not found.failures, f"{found.report()}\n\n{counts}"

    # enough happened for the above to mean something (a run makes ~130-150 servers, runs ~100
    # actions, ~20 of them deletes, and ~40 holds; the bounds leave room for other schedules)
    c = found.counts
    assert c["job:create:succeeded"] >= 80, counts
    assert c["request:ok"] - c["request:replayed"] == sum(
        n for k, n in c.items() if k.startswith("job:create:")
    ), counts
    actions_done = sum(
        n
        for k, n in c.items()
        if k.startswith("job:") and k.endswith(":succeeded") and k != "job:create:succeeded"
    )
    assert actions_done >= 40, counts
    assert c["job:delete:succeeded"] >= 5, counts
    assert c["sync:ok"] == FOREGROUND // SYNC_EVERY, counts
    assert c["reconcile:ok"] == c["sweep:ok"] == FOREGROUND // RECONCILE_EVERY, counts
    assert c["hold:ok"] >= 10 and c["swept"] == c["hold:ok"], counts
