"""Concurrency proof of the quota ledger, on SQLite and on PostgreSQL.

32 workers or more, each on its own connection (threads in one test, threads spread over four
spawned processes in another), race random reserve / commit / release / shrink / release_owner
operations against agency a and its systems a1 and a2, whose limits are tight. One worker per
process sweeps expired reservations now and then; short-lived reservations are abandoned on
purpose so that expiry happens during the run. A third test races limit changes (set_quota, never
forced) against the same reservation traffic.

While they run, a sampler thread takes consistent snapshots (PostgreSQL: one REPEATABLE READ
transaction; SQLite: one read transaction over WAL) and checks in every one of them:

- no quota row with a limit has committed + unexpired reserved (recounted from the ledger, at a
  time taken after the snapshot began) above that limit;
- every agency's and system's counters equal an independent recount of the allocation ledger
  (agency: allocations whose agency_id is it; system: allocations whose tenant_id is it);
- the children's limits sum to at most their parent's, per resource class.

After the run the same checks run after a final sweep, and again an hour later (time-machine)
once every reservation has expired and been swept, when nothing may be left reserved anywhere.

Refusals (QuotaExceeded, Conflict, Invalid) are expected outcomes and are counted; anything else
(a deadlock surfacing as OperationalError, an IntegrityError, a counter going out of step) is a
failure. The runs are bounded by operation counts, never by time.

What the workers do not do, on purpose: release a committed shrink on its own, or release a grow
of a server that has committed shrinks. Both give capacity back to the server without asking the
limits (see test_ledger_states.py, test_releasing_a_committed_shrink_never_passes_the_limit);
servers with shrinks are given back whole, through release_owner.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
import time_machine
from sqlalchemy import select

from broker.core import clock
from broker.core.authz import Principal
from broker.core.db import Database
from broker.core.errors import Conflict, GovbrokerError, Invalid, QuotaExceeded
from broker.tenancy.models import Tenant
from quotas import ledger
from quotas import service as quotas
from quotas.models import Allocation, Quota

pytestmark = pytest.mark.slow

SYSTEM = Principal.system("test-concurrency")
CLASSES = ("instances", "memory_mb", "vcpu")
CENTER_LIMITS = {"vcpu": 1000, "memory_mb": 1_000_000, "instances": 100}
AGENCY_A_LIMITS = {"vcpu": 60, "memory_mb": 120_000, "instances": 12}
SYSTEM_A1_LIMITS = {"vcpu": 25, "memory_mb": 50_000, "instances": 5}
AGENCY_B_LIMITS = {"vcpu": 10}  # a's siblings hold something, so the center's sum is not trivial
# a2 has no limit of its own: it shares a's pool

N_WORKERS = 32
# operations per worker (SQLite serialises every writer, so it gets fewer); the process test's
# workers also pay for spawning and importing, so they do fewer
OPS = {"postgresql": 40, "sqlite": 30}
PROCESS_OPS = {"postgresql": 30, "sqlite": 24}
PROCESSES = 4

_QUOTA = Quota.__table__  # type: ignore[attr-defined]
_ALLOCATION = Allocation.__table__  # type: ignore[attr-defined]
_TENANT = Tenant.__table__  # type: ignore[attr-defined]


# --- the estate --------------------------------------------------------------------------------


def build_tight_estate(db: Database) -> dict[str, str]:
    """center → a (a1, a2), b (b1) with tight limits on a; returns code → tenant id (str)."""
    from tests.fixtures.auth import build_estate  # the web app's imports stay out of the workers

    with db.unit_of_work() as s:
        estate = build_estate(s)
        tid = estate.tid
        for rc, limit in CENTER_LIMITS.items():
            quotas.set_quota(s, SYSTEM, tid("center"), rc, limit=limit)
        for rc, limit in AGENCY_A_LIMITS.items():
            quotas.set_quota(s, SYSTEM, tid("a"), rc, limit=limit)
        for rc, limit in AGENCY_B_LIMITS.items():
            quotas.set_quota(s, SYSTEM, tid("b"), rc, limit=limit)
        for rc, limit in SYSTEM_A1_LIMITS.items():
            quotas.set_quota(s, SYSTEM, tid("a1"), rc, limit=limit)
    return {code: str(t.id) for code, t in estate.tenants.items()}


def worker_database(url: str, connections: int) -> Database:
    """One connection per worker thread, plus a few for the sampler and the checks."""
    return Database(url, pool_size=connections + 4, max_overflow=4, pool_timeout=120)


# --- consistent snapshots and the invariants they must satisfy --------------------------------


@dataclass(frozen=True)
class Snapshot:
    at: datetime  # taken after the snapshot began: no transaction it sees has a later "now"
    tenants: dict[str, tuple[str, str | None, str]]  # id → (code, parent id, kind)
    quota: list[tuple[str, str, int, int | None, int, int]]  # tenant, class, depth, limit, c, r
    allocations: list[tuple[str, str, str, int, str, datetime]]  # tenant, agency, class, ...


def take_snapshot(db: Database) -> Snapshot:
    """Everything the checks need, read in one transaction that sees one consistent state."""
    with db.engine.connect() as base:
        conn = (
            base.execution_options(isolation_level="REPEATABLE READ")
            if db.engine.dialect.name == "postgresql"
            else base
        )
        with conn.begin():
            quota = [
                (str(r.tenant_id), r.resource_class, r.depth, r.hard_limit, r.committed, r.reserved)
                for r in conn.execute(
                    select(
                        _QUOTA.c.tenant_id,
                        _QUOTA.c.resource_class,
                        _QUOTA.c.depth,
                        _QUOTA.c.hard_limit,
                        _QUOTA.c.committed,
                        _QUOTA.c.reserved,
                    )
                )
            ]
            at = clock.now()
            allocations = [
                (
                    str(r.tenant_id),
                    str(r.agency_id),
                    r.resource_class,
                    r.amount,
                    r.state,
                    r.expires_at,
                )
                for r in conn.execute(
                    select(
                        _ALLOCATION.c.tenant_id,
                        _ALLOCATION.c.agency_id,
                        _ALLOCATION.c.resource_class,
                        _ALLOCATION.c.amount,
                        _ALLOCATION.c.state,
                        _ALLOCATION.c.expires_at,
                    )
                )
            ]
            tenants = {
                str(r.id): (r.code, str(r.parent_id) if r.parent_id else None, r.kind)
                for r in conn.execute(
                    select(_TENANT.c.id, _TENANT.c.code, _TENANT.c.parent_id, _TENANT.c.kind)
                )
            }
    return Snapshot(at, tenants, quota, allocations)


@dataclass(frozen=True)
class Recount:
    committed: int
    reserved: int  # every reserved allocation still in state reserved, expired or not
    live_reserved: int  # only those not expired at the snapshot's time


def recount(snap: Snapshot, tenant_id: str, depth: int, rc: str) -> Recount:
    committed = reserved = live = 0
    for tenant, agency, cls, amount, state, expires_at in snap.allocations:
        if cls != rc:
            continue
        if depth == 1 and agency != tenant_id:
            continue
        if depth == 2 and tenant != tenant_id:
            continue
        if state == ledger.COMMITTED:
            committed += amount
        elif state == ledger.RESERVED:
            reserved += max(amount, 0)
            if expires_at > snap.at:
                live += max(amount, 0)
    return Recount(committed, reserved, live)


def violations(snap: Snapshot, *, nothing_reserved: bool = False) -> list[str]:
    """Every broken invariant in one snapshot, described; empty when all hold."""
    found: list[str] = []
    limits: dict[tuple[str, str], int | None] = {}
    for tenant_id, rc, depth, limit, committed, reserved in snap.quota:
        code = snap.tenants[tenant_id][0]
        limits[(tenant_id, rc)] = limit
        count = recount(snap, tenant_id, depth, rc)
        # the center keeps no counters of its own (its usage is its agencies' sum)
        if depth > 0 and (committed, reserved) != (count.committed, count.reserved):
            found.append(
                f"{code}/{rc}: counters committed={committed} reserved={reserved}, "
                f"ledger recount committed={count.committed} reserved={count.reserved}"
            )
        if limit is not None and count.committed + count.live_reserved > limit:
            found.append(
                f"{code}/{rc}: committed {count.committed} + unexpired reserved "
                f"{count.live_reserved} > limit {limit} at {snap.at.isoformat()}"
            )
        if count.committed < 0:
            found.append(f"{code}/{rc}: committed recount {count.committed} is negative")
        if nothing_reserved and (reserved or count.reserved):
            found.append(f"{code}/{rc}: {reserved} still reserved after every expiry was swept")
    for parent_id, (code, _, _) in snap.tenants.items():
        for rc in CLASSES:
            parent_limit = limits.get((parent_id, rc))
            if parent_limit is None:
                continue
            children = sum(
                limits.get((child_id, rc)) or 0
                for child_id, (_, up, _) in snap.tenants.items()
                if up == parent_id
            )
            if children > parent_limit:
                found.append(f"{code}/{rc}: children's limits {children} > limit {parent_limit}")
    return found


def ledger_size(snap: Snapshot) -> tuple[int, int]:
    """(allocations in the ledger, live reserved allocations) — how busy a sample was."""
    live = sum(
        1
        for *_, state, expires_at in snap.allocations
        if state == "reserved" and expires_at > snap.at
    )
    return len(snap.allocations), live


class Sampler(threading.Thread):
    """Takes consistent snapshots until stopped and checks every one of them."""

    def __init__(self, db: Database) -> None:
        super().__init__(name="sampler", daemon=True)
        self.db = db
        self.stop = threading.Event()
        self.samples = 0
        self.busy_samples = 0  # samples that saw live reservations
        self.max_ledger = 0
        self.broken: list[str] = []
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                snap = take_snapshot(self.db)
            except Exception:  # a failing read must fail the test, not hang it
                self.errors.append(traceback.format_exc(limit=4))
                if len(self.errors) > 5:
                    return
                continue
            self.samples += 1
            size, live = ledger_size(snap)
            self.max_ledger = max(self.max_ledger, size)
            self.busy_samples += live > 0
            for v in violations(snap):
                self.broken.append(f"sample {self.samples}: {v}")
            self.stop.wait(0.05)


# --- the workers -------------------------------------------------------------------------------

SIZES: dict[str, Callable[[random.Random], int]] = {
    "vcpu": lambda rng: rng.randint(1, 8),
    "memory_mb": lambda rng: 1024 * rng.randint(1, 16),
    "instances": lambda rng: rng.randint(1, 2),
}


@dataclass
class Held:
    ref: str
    tenant: str
    deltas: dict[str, int]
    owner: str | None
    expires_at: datetime
    kind: str = "grow"  # grow | shrink
    state: str = "reserved"  # reserved | committed | released | lapsed
    abandoned: bool = False  # left to expire and be swept


@dataclass
class Server:
    """What one owner_ref (a server) holds committed, tracked by the worker that owns it."""

    owner: str
    tenant: str
    committed: dict[str, int] = field(default_factory=dict)
    rows: int = 0  # committed allocation rows: what release_owner must report
    shrunk: bool = False


class Worker:
    """Random ledger operations, each in its own unit of work, on its own connection."""

    def __init__(
        self, db: Database, name: str, seed: int, tenants: dict[str, str], *, sweeper: bool
    ) -> None:
        self.db = db
        self.name = name
        self.rng = random.Random(seed)
        self.seed = seed
        self.tenants = tenants
        self.sweeper = sweeper
        self.tally: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.held: list[Held] = []
        self.servers: dict[str, Server] = {}
        self.serial = 0
        self.step = 0

    # bookkeeping -------------------------------------------------------------------------

    def next_ref(self, kind: str) -> str:
        self.serial += 1
        return f"{self.name}-{kind}{self.serial}"

    def attempt(self, op: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """Run one operation; refusals are counted as outcomes, anything else is a failure."""
        try:
            result = fn()
        except QuotaExceeded as e:
            self.tally[f"{op}:QuotaExceeded"] += 1
            return False, e
        except Conflict as e:
            self.tally[f"{op}:Conflict"] += 1
            return False, e
        except Invalid as e:
            self.tally[f"{op}:Invalid"] += 1
            return False, e
        except Exception as e:  # reported, and fails the test
            self.tally[f"{op}:UNEXPECTED"] += 1
            self.unexpected.append(
                f"{self.name} (seed {self.seed}) step {self.step} {op}: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}\n{traceback.format_exc(limit=6)}"
            )
            return False, e
        self.tally[f"{op}:ok"] += 1
        return True, result

    def wrong(self, message: str, error: object = None) -> None:
        """A refusal that should not have happened (unexpected errors are reported already)."""
        if error is not None and not isinstance(error, GovbrokerError):
            return
        self.tally["wrong"] += 1
        self.unexpected.append(f"{self.name} (seed {self.seed}) step {self.step}: {message}")

    # operations --------------------------------------------------------------------------

    def reserve(self) -> None:
        rng = self.rng
        code = rng.choice(["a1", "a1", "a2", "a2", "a"])
        classes = rng.sample(CLASSES, rng.randint(1, 3))
        deltas = {rc: SIZES[rc](rng) for rc in classes}
        short = rng.random() < 0.35
        ttl = timedelta(seconds=rng.randint(1, 3) if short else 120)
        owner: str | None = None
        if rng.random() < 0.7:  # for a server: a new one, or growing one of ours
            mine = [s for s in self.servers.values() if s.tenant == code]
            if mine and rng.random() < 0.3:
                owner = rng.choice(mine).owner
            else:
                owner = f"{self.name}-srv{self.serial + 1}"
        ref = self.next_ref("r")

        def run() -> datetime:
            with self.db.unit_of_work() as s:
                r = ledger.reserve(
                    s,
                    uuid.UUID(self.tenants[code]),
                    deltas,
                    ref=ref,
                    actor=self.name,
                    ttl=ttl,
                    owner_ref=owner,
                )
                return r.expires_at

        ok, expires_at = self.attempt("reserve", run)
        if ok:
            if owner is not None and owner not in self.servers:
                self.servers[owner] = Server(owner, code)
            self.held.append(
                Held(ref, code, deltas, owner, expires_at, abandoned=short and rng.random() < 0.6)
            )
        elif isinstance(expires_at, Invalid):
            self.wrong(f"reserve {deltas} on {code} refused as invalid: {expires_at}")

    def commit(self) -> None:
        pending = [h for h in self.held if h.state == "reserved" and not h.abandoned]
        if not pending:
            return self.reserve()
        h = self.rng.choice(pending)

        def run() -> None:
            with self.db.unit_of_work() as s:
                ledger.commit(s, h.ref)

        ok, error = self.attempt("commit", run)
        if ok:
            h.state = "committed"
            if h.owner is not None:
                server = self.servers[h.owner]
                for rc, amount in h.deltas.items():
                    server.committed[rc] = server.committed.get(rc, 0) + amount
                server.rows += len(h.deltas)
        elif isinstance(error, Conflict) and clock.now() >= h.expires_at:
            h.state = "lapsed"  # expired: refused, and perhaps swept already
        else:
            self.wrong(f"commit of {h.ref} ({h.deltas} on {h.tenant}) refused: {error!r}", error)

    def releasable(self, h: Held) -> bool:
        if h.state == "reserved":
            return not h.abandoned
        if h.state != "committed" or h.kind == "shrink":
            return False
        # a grow of a server with committed shrinks is given back with the whole server
        return h.owner is None or not self.servers[h.owner].shrunk

    def release(self) -> None:
        candidates = [h for h in self.held if self.releasable(h)]
        if not candidates:
            return self.reserve()
        h = self.rng.choice(candidates)

        def run() -> None:
            with self.db.unit_of_work() as s:
                ledger.release(s, h.ref)

        ok, error = self.attempt("release", run)
        if not ok:
            self.wrong(f"release of {h.state} {h.ref} ({h.deltas} on {h.tenant}): {error!r}", error)
            return
        if h.state == "committed" and h.owner is not None:
            server = self.servers[h.owner]
            for rc, amount in h.deltas.items():
                server.committed[rc] -= amount
            server.rows -= len(h.deltas)
        h.state = "released"

    def shrink(self) -> None:
        """A server gives part of what it holds back: a negative reservation, then its commit."""
        rng = self.rng
        # one shrink at a time per server, so that what it gives back never exceeds what it holds
        busy = {h.owner for h in self.held if h.kind == "shrink" and h.state == "reserved"}
        candidates = [
            s
            for s in self.servers.values()
            if s.owner not in busy and any(v > 0 for v in s.committed.values())
        ]
        if not candidates:
            return self.commit()
        server = rng.choice(candidates)
        held = [rc for rc, v in server.committed.items() if v > 0]
        classes = rng.sample(held, rng.randint(1, len(held)))
        deltas = {rc: -rng.randint(1, server.committed[rc]) for rc in classes}
        ref = self.next_ref("s")

        def reserve() -> datetime:
            with self.db.unit_of_work() as s:
                r = ledger.reserve(
                    s,
                    uuid.UUID(self.tenants[server.tenant]),
                    deltas,
                    ref=ref,
                    actor=self.name,
                    ttl=timedelta(seconds=120),
                    owner_ref=server.owner,
                )
                return r.expires_at

        ok, result = self.attempt("shrink_reserve", reserve)
        if not ok:
            self.wrong(f"shrink {deltas} of {server.owner} refused: {result!r}", result)
            return
        h = Held(ref, server.tenant, deltas, server.owner, result, kind="shrink")
        self.held.append(h)
        server.shrunk = True  # from now on the server is given back whole

        def commit() -> None:
            with self.db.unit_of_work() as s:
                ledger.commit(s, ref)

        ok, error = self.attempt("shrink_commit", commit)
        if not ok:
            self.wrong(f"commit of shrink {ref} {deltas} refused: {error!r}", error)
            return
        h.state = "committed"
        for rc, amount in deltas.items():
            server.committed[rc] += amount
        server.rows += len(deltas)

    def release_owner(self) -> None:
        if not self.servers:
            return self.reserve()
        server = self.servers[self.rng.choice(sorted(self.servers))]
        # what the server still has pending is given back first (as deleting a server would)
        for h in self.held:
            if h.owner == server.owner and h.state == "reserved" and not h.abandoned:

                def give_back(ref: str = h.ref) -> None:
                    with self.db.unit_of_work() as s:
                        ledger.release(s, ref)

                ok, error = self.attempt("release", give_back)
                if not ok:
                    self.wrong(f"release of pending {h.ref}: {error!r}", error)
                h.state = "released"

        def run() -> int:
            with self.db.unit_of_work() as s:
                return ledger.release_owner(s, server.owner)

        ok, count = self.attempt("release_owner", run)
        if not ok:
            self.wrong(f"release_owner {server.owner}: {count!r}", count)
            return
        if count != server.rows:
            self.wrong(f"release_owner {server.owner} released {count} rows, held {server.rows}")
        for h in self.held:
            if h.owner == server.owner and h.state == "committed":
                h.state = "released"
        del self.servers[server.owner]

    def sweep(self) -> None:
        def run() -> int:
            with self.db.unit_of_work() as s:
                return ledger.sweep_expired(s)

        ok, swept = self.attempt("sweep", run)
        if ok:
            self.tally["swept"] += swept
        else:
            self.wrong(f"sweep refused: {swept!r}", swept)

    # the loop ----------------------------------------------------------------------------

    def run(self, n_ops: int) -> None:
        ops = [self.reserve, self.commit, self.release, self.shrink, self.release_owner]
        weights = [37, 22, 14, 14, 13]
        for self.step in range(n_ops):
            if self.sweeper and self.step % 4 == 3:
                self.sweep()
                continue
            self.rng.choices(ops, weights)[0]()
            self.tally["ops"] += 1


class LimitSetter(Worker):
    """Changes limits of a, a1 and a2 at random, never forcing: some are meant to be refused."""

    RANGES: ClassVar[dict[str, dict[str, tuple[int, int]]]] = {
        "a": {"vcpu": (20, 90), "memory_mb": (30_000, 200_000), "instances": (3, 20)},
        "a1": {"vcpu": (0, 50), "memory_mb": (0, 100_000), "instances": (0, 10)},
        "a2": {"vcpu": (0, 50), "memory_mb": (0, 100_000), "instances": (0, 10)},
    }

    def run(self, n_ops: int) -> None:
        rng = self.rng
        for self.step in range(n_ops):
            code = rng.choice(["a", "a1", "a2"])
            rc = rng.choice(CLASSES)
            low, high = self.RANGES[code][rc]
            limit = None if code != "a" and rng.random() < 0.15 else rng.randint(low, high)

            def run(code: str = code, rc: str = rc, limit: int | None = limit) -> None:
                with self.db.unit_of_work() as s:
                    quotas.set_quota(s, SYSTEM, uuid.UUID(self.tenants[code]), rc, limit=limit)

            _, error = self.attempt("set_quota", run)
            self.tally["ops"] += 1
            if isinstance(error, GovbrokerError) and error.errors:
                # why it was refused: below_usage, exceeds_parent, below_children, ...
                self.tally[f"set_quota:{type(error).__name__}:{error.errors[0].code}"] += 1
            threading.Event().wait(rng.uniform(0, 0.02))  # limit changes are rarer than use


def run_workers(
    db: Database,
    tenants: dict[str, str],
    *,
    prefix: str,
    seeds: list[int],
    n_ops: int,
    sweepers: int,
    setters: int = 0,
    start: Callable[[], None] | None = None,
) -> tuple[Counter[str], list[str]]:
    """Run one worker per seed on its own thread; returns their summed tallies and failures."""
    workers: list[Worker] = []
    for i, seed in enumerate(seeds):
        cls = LimitSetter if i < setters else Worker
        workers.append(
            cls(db, f"{prefix}w{i}", seed, tenants, sweeper=setters <= i < setters + sweepers)
        )
    barrier = threading.Barrier(len(workers))

    def body(w: Worker) -> None:
        try:
            barrier.wait(timeout=120)
            w.run(n_ops)
        except Exception:  # reported, and fails the test
            w.unexpected.append(f"{w.name} crashed:\n{traceback.format_exc()}")

    if start is not None:
        start()
    threads = [threading.Thread(target=body, args=(w,), name=w.name) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    tally: Counter[str] = Counter()
    unexpected: list[str] = []
    for w, t in zip(workers, threads, strict=True):
        if t.is_alive():
            unexpected.append(f"{w.name} did not finish")
        tally.update(w.tally)
        unexpected.extend(w.unexpected)
    return tally, unexpected


def process_main(
    url: str, proc: int, seeds: list[int], n_ops: int, tenants: dict[str, str], ready: Any, go: Any
) -> tuple[dict[str, int], list[str]]:
    """One spawned process: its own Database, one thread per seed, one of them sweeping."""
    db = worker_database(url, len(seeds))
    try:
        ready.put(proc)
        if not go.wait(120):
            return {}, [f"process {proc} was never started"]
        tally, unexpected = run_workers(
            db, tenants, prefix=f"p{proc}", seeds=seeds, n_ops=n_ops, sweepers=1
        )
        return dict(tally), unexpected
    finally:
        db.dispose()


# --- after the run -----------------------------------------------------------------------------


def sweep_all(db: Database) -> int:
    swept = 0
    while True:
        with db.unit_of_work() as s:
            n = ledger.sweep_expired(s)
        swept += n
        if n == 0:
            return swept


def check_after_run(db: Database) -> dict[str, int]:
    """Final checks: now, after a sweep; then an hour later, when every reservation has lapsed."""
    swept_now = sweep_all(db)
    snap = take_snapshot(db)
    assert violations(snap) == []
    size, _ = ledger_size(snap)
    later = datetime.now(UTC) + timedelta(hours=1)
    with time_machine.travel(later, tick=False):
        swept_later = sweep_all(db)
        snap = take_snapshot(db)
    assert violations(snap, nothing_reserved=True) == []
    return {"final_swept": swept_now, "swept_an_hour_later": swept_later, "ledger_rows": size}


def assert_meaningful(tally: Counter[str], sampler: Sampler, report: dict[str, Any]) -> None:
    """The run must have exercised what it claims to prove, not passed by doing nothing."""
    assert sampler.errors == [], sampler.errors
    assert sampler.broken == [], sampler.broken[:20]
    assert tally["reserve:ok"] >= 50, report
    assert tally["commit:ok"] >= 10, report
    assert tally["release:ok"] >= 5, report
    assert tally["shrink_commit:ok"] >= 3, report
    assert tally["release_owner:ok"] >= 3, report
    # the limits were really hit: reservations were refused
    assert tally["reserve:QuotaExceeded"] >= 5, report
    assert sampler.samples >= 5, report
    assert sampler.busy_samples >= 1, report


def failures(tally: Counter[str], unexpected: list[str]) -> str:
    """Which operations failed unexpectedly, how often, then the first few in full."""
    counts = {k: v for k, v in sorted(tally.items()) if k.endswith(":UNEXPECTED") or k == "wrong"}
    firsts: dict[str, str] = {}
    for u in unexpected:  # one example of every (operation, error) seen
        head = u.split("\n", 1)[0]
        key = " ".join(head.split(": ", 2)[:2]).split(" step ")[-1].split(" ", 1)[-1]
        firsts.setdefault(key, u)
    return f"{counts}\n" + "\n".join(firsts.values())


def report_of(backend: str, tally: Counter[str], sampler: Sampler, extra: dict[str, int]) -> dict:
    return {
        "backend": backend,
        **dict(sorted(tally.items())),
        "samples": sampler.samples,
        "busy_samples": sampler.busy_samples,
        "max_ledger_rows_sampled": sampler.max_ledger,
        **extra,
    }


# --- the tests ---------------------------------------------------------------------------------


def test_32_threads_never_overallocate_and_the_counters_match_the_ledger(
    backend: str, committed_db: Database
) -> None:
    db = worker_database(committed_db.url, N_WORKERS)
    try:
        tenants = build_tight_estate(db)
        sampler = Sampler(db)
        seeds = [1000 + i for i in range(N_WORKERS)]
        try:
            tally, unexpected = run_workers(
                db,
                tenants,
                prefix="t",
                seeds=seeds,
                n_ops=OPS[backend],
                sweepers=1,
                start=sampler.start,
            )
        finally:
            sampler.stop.set()
            sampler.join(timeout=60)
        extra = check_after_run(db)
        report = report_of(backend, tally, sampler, extra)
        print(report)
        assert sampler.broken == [], sampler.broken[:20]
        assert unexpected == [], failures(tally, unexpected)
        assert_meaningful(tally, sampler, report)
    finally:
        db.dispose()


def test_32_workers_in_4_processes_never_overallocate_and_the_counters_match_the_ledger(
    backend: str, committed_db: Database
) -> None:
    db = worker_database(committed_db.url, 2)
    try:
        tenants = build_tight_estate(db)
        per_process = N_WORKERS // PROCESSES
        ctx = multiprocessing.get_context("spawn")
        sampler = Sampler(db)
        tally: Counter[str] = Counter()
        unexpected: list[str] = []
        with ctx.Manager() as manager, ProcessPoolExecutor(PROCESSES, mp_context=ctx) as pool:
            ready, go = manager.Queue(), manager.Event()
            futures = [
                pool.submit(
                    process_main,
                    committed_db.url,
                    p,
                    [2000 + p * 100 + i for i in range(per_process)],
                    PROCESS_OPS[backend],
                    tenants,
                    ready,
                    go,
                )
                for p in range(PROCESSES)
            ]
            try:
                for _ in range(PROCESSES):
                    ready.get(timeout=120)
                sampler.start()
                go.set()
                for f in futures:
                    t, u = f.result(timeout=300)
                    tally.update(t)
                    unexpected.extend(u)
            finally:
                go.set()
                sampler.stop.set()
                if sampler.is_alive():
                    sampler.join(timeout=60)
        extra = check_after_run(db)
        report = report_of(backend, tally, sampler, {**extra, "processes": PROCESSES})
        print(report)
        assert sampler.broken == [], sampler.broken[:20]
        assert unexpected == [], failures(tally, unexpected)
        assert_meaningful(tally, sampler, report)
    finally:
        db.dispose()


def test_limit_changes_racing_reservations_keep_every_invariant(
    backend: str, committed_db: Database
) -> None:
    """8 threads change limits (never forced) while 24 reserve: no change lets usage pass a
    limit or the children's limits pass their parent's, and lowering below usage is refused."""
    setters = 8
    db = worker_database(committed_db.url, N_WORKERS)
    try:
        tenants = build_tight_estate(db)
        sampler = Sampler(db)
        seeds = [3000 + i for i in range(N_WORKERS)]
        try:
            tally, unexpected = run_workers(
                db,
                tenants,
                prefix="q",
                seeds=seeds,
                n_ops=OPS[backend],
                sweepers=1,
                setters=setters,
                start=sampler.start,
            )
        finally:
            sampler.stop.set()
            sampler.join(timeout=60)
        extra = check_after_run(db)
        report = report_of(backend, tally, sampler, extra)
        print(report)
        assert sampler.broken == [], sampler.broken[:20]
        assert unexpected == [], failures(tally, unexpected)
        assert sampler.errors == [], sampler.errors
        assert tally["set_quota:ok"] >= 10, report
        # some changes were refused for going below usage: the race was real
        assert tally["set_quota:Conflict:below_usage"] >= 1, report
        assert tally["reserve:ok"] >= 30, report
        assert tally["reserve:QuotaExceeded"] >= 5, report
        assert sampler.samples >= 5, report
    finally:
        db.dispose()
