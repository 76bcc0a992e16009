#!/usr/bin/env python
"""Benchmark of the quota ledger's reservations on PostgreSQL, against a raw-SQL baseline.

    .venv/bin/python bench/quota_reserve.py [--seconds N] [--clients 1,8,32,64] [--profile N]

Prints exactly one JSON line on stdout (progress goes to stderr). What it does:

* creates its own uniquely named PostgreSQL database, migrates it, and seeds a center with
  8 agencies of 2 systems each through the services (`create_center`, `create_tenant`,
  `set_quota`); the first system of every agency has limits of its own, the second shares its
  agency's pool; the database is dropped at the end, also on error;
* for every client level, runs two phases from the same empty ledger, one after the other:
  "ours" — every operation is one unit of work around `quotas.ledger.reserve` (or
  `ledger.release` of one of the client's earlier reservations) — and "baseline" — the same
  operation mix as a minimal psycopg transaction without ORM or SQLAlchemy that takes the same
  row locks (the tenant's and its agency's quota rows, in (depth, class) order), checks the
  limits, inserts the reservation and its allocations and moves the counters;
* clients are threads spread over up to 4 worker processes ('spawn'), each with its own
  `Database(url, pool_size=threads+2, max_overflow=0)` (ours) or one psycopg connection per
  thread (baseline); throughput and latency are counted over a fixed window after a warm-up;
* overshoot: during every phase (about once a second, in one REPEATABLE READ snapshot) and after
  it, every quota row with a limit is checked — committed + unexpired reserved of its subtree,
  recounted from the allocation table, must be within the limit — and the agency and system
  counters must equal that recount.

targets_met is true only when, at 32 clients, reservations/s ≥ 1000, the ratio ours/baseline is
≥ 0.5 at every measured level (see "ratio_rule"), there is no overshoot and no operation failed
with an unexpected error (QuotaExceeded is a refusal, not an error). Nothing is
hard-coded: every figure is measured in the run that prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import queue
import random
import resource
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ADMIN_DSN = os.environ.get("GOVBROKER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
MAX_PROCESSES = 4
CLASSES = ("instances", "memory_mb", "vcpu")
AGENCIES = 8
# limits: tight enough that the 32- and 64-client phases run into them
CENTER_LIMITS = {"vcpu": 1_000, "memory_mb": 2_097_152, "instances": 400}
AGENCY_LIMITS = {"vcpu": 48, "memory_mb": 131_072, "instances": 20}
OWN_SYSTEM_LIMITS = {"vcpu": 16, "memory_mb": 40_960, "instances": 8}
RELEASE_P = 0.4  # chance that a client holding something releases its oldest reservation
HOLD_CAP = 4  # a client holding this many reservations releases before reserving again
TTL_SECONDS = 900  # the ledger's default (reservation_ttl_seconds)
TARGETS = {"min_per_s_at_32": 1000, "min_ratio": 0.5, "max_overshoot": 0}
RATIO_RULE = "every_level"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pg_dsn(dbname: str) -> str:
    return ADMIN_DSN.rsplit("/", 1)[0] + "/" + dbname


def pg_url(dbname: str) -> str:
    return pg_dsn(dbname).replace("postgresql://", "postgresql+psycopg://", 1)


# --- the operations ----------------------------------------------------------------------------


class Refused(Exception):
    """The baseline's QuotaExceeded."""


def make_deltas(rng: random.Random) -> dict[str, int]:
    vcpu = rng.randint(1, 4)
    return {"vcpu": vcpu, "memory_mb": vcpu * rng.choice((1024, 2048, 4096)), "instances": 1}


class OursOps:
    """One unit of work per operation, through quotas.ledger."""

    def __init__(self, url: str, threads: int) -> None:
        from broker.core.db import Database
        from broker.core.errors import QuotaExceeded
        from quotas import ledger

        self.db = Database(url, pool_size=threads + 2, max_overflow=0)
        self.ledger = ledger
        self.QuotaExceeded = QuotaExceeded

    def thread_state(self) -> None:
        return None

    def reserve(self, _st: None, target: dict[str, Any], deltas: dict[str, int], ref: str) -> Any:
        try:
            with self.db.unit_of_work() as s:
                r = self.ledger.reserve(s, target["id"], deltas, ref=ref, actor="bench")
                rid = r.id
        except self.QuotaExceeded:
            return None
        return rid

    def release(self, _st: None, target: dict[str, Any], deltas: dict[str, int], rid: Any) -> None:
        with self.db.unit_of_work() as s:
            self.ledger.release(s, rid)

    def close_thread(self, _st: None) -> None:
        return None

    def close(self) -> None:
        self.db.dispose()


LOCK_SQL = (
    "SELECT id, tenant_id, resource_class, hard_limit, valid_from, valid_until, committed, reserved"
    " FROM quota WHERE tenant_id = ANY(%s) AND resource_class = ANY(%s)"
    " ORDER BY depth, resource_class FOR UPDATE"
)
MOVE_SQL = (
    "UPDATE quota SET reserved = quota.reserved + d.dr, updated_at = %s"
    " FROM unnest(%s::uuid[], %s::bigint[]) AS d(qid, dr) WHERE quota.id = d.qid"
)


class BaselineOps:
    """The same operation as a minimal psycopg 3 transaction: no ORM, no SQLAlchemy."""

    def __init__(self, dsn: str, threads: int) -> None:
        import psycopg

        self.psycopg = psycopg
        self.dsn = dsn

    def thread_state(self) -> Any:
        return self.psycopg.connect(self.dsn)

    @staticmethod
    def _levels(target: dict[str, Any]) -> list[uuid.UUID]:
        if target["kind"] == "system":
            return [target["agency_id"], target["id"]]
        return [target["id"]]

    def reserve(self, conn: Any, target: dict[str, Any], deltas: dict[str, int], ref: str) -> Any:
        levels = self._levels(target)
        classes = sorted(deltas)
        try:
            with conn.transaction():
                rows = conn.execute(LOCK_SQL, (levels, classes)).fetchall()
                now = datetime.now(UTC)
                found = {(r[1], r[2]): r for r in rows}
                qids: list[uuid.UUID] = []
                amounts: list[int] = []
                for rc in classes:
                    for level in levels:
                        row = found.get((level, rc))
                        if row is None:  # seeding created every row; an agency needs its limit
                            raise Refused(rc)
                        _, _, _, limit, vfrom, vuntil, committed, reserved = row
                        if level == target["agency_id"] and limit is None:
                            raise Refused(rc)
                        if limit is not None:
                            if vfrom > now or (vuntil is not None and vuntil <= now):
                                raise Refused(rc)
                            if committed + reserved + deltas[rc] > limit:
                                raise Refused(rc)
                        qids.append(row[0])
                        amounts.append(deltas[rc])
                rid = uuid.uuid4()
                expires = now + timedelta(seconds=TTL_SECONDS)
                conn.execute(
                    "INSERT INTO reservation (id, ref, tenant_id, agency_id, state, expires_at,"
                    " created_at, created_by) VALUES (%s, %s, %s, %s, 'reserved', %s, %s, 'bench')",
                    (rid, ref, target["id"], target["agency_id"], expires, now),
                )
                values = ", ".join(["(%s, %s, %s, %s, %s, %s, 'reserved', %s, %s)"] * len(classes))
                params: list[Any] = []
                for rc in classes:
                    params += [
                        uuid.uuid4(), rid, target["id"], target["agency_id"], rc, deltas[rc],
                        expires, now,
                    ]  # fmt: skip
                conn.execute(
                    "INSERT INTO allocation (id, reservation_id, tenant_id, agency_id,"
                    " resource_class, amount, state, expires_at, created_at) VALUES " + values,
                    params,
                )
                conn.execute(MOVE_SQL, (now, qids, amounts))
        except Refused:
            return None
        return rid

    def release(self, conn: Any, target: dict[str, Any], deltas: dict[str, int], rid: Any) -> None:
        levels = self._levels(target)
        with conn.transaction():
            rows = conn.execute(LOCK_SQL, (levels, sorted(deltas))).fetchall()
            qid = {(r[1], r[2]): r[0] for r in rows}
            conn.execute("SELECT state FROM reservation WHERE id = %s FOR UPDATE", (rid,))
            now = datetime.now(UTC)
            held = conn.execute(
                "UPDATE allocation SET state = 'released', released_at = %s"
                " WHERE reservation_id = %s AND state = 'reserved'"
                " RETURNING resource_class, amount",
                (now, rid),
            ).fetchall()
            qids = [qid[(level, rc)] for rc, amount in held for level in levels]
            amounts = [-max(amount, 0) for rc, amount in held for level in levels]
            if qids:
                conn.execute(MOVE_SQL, (now, qids, amounts))
            conn.execute(
                "UPDATE reservation SET state = 'released', settled_at = %s WHERE id = %s",
                (now, rid),
            )

    def close_thread(self, conn: Any) -> None:
        conn.close()

    def close(self) -> None:
        return None


# --- worker processes --------------------------------------------------------------------------


def client_thread(
    ops: Any,
    targets: list[dict[str, Any]],
    seed: int,
    t_measure: float,
    t_end: float,
    out: dict[str, Any],
) -> None:
    rng = random.Random(seed)
    held: list[tuple[dict[str, Any], dict[str, int], Any]] = []
    ok_lat: list[float] = []
    refused_lat: list[float] = []
    release_lat: list[float] = []
    errors: Counter[str] = Counter()
    st = None
    try:
        st = ops.thread_state()
        while True:
            if time.monotonic() >= t_end:
                break
            if held and (len(held) >= HOLD_CAP or rng.random() < RELEASE_P):
                target, deltas, rid = held.pop(0)
                t0 = time.perf_counter()
                try:
                    ops.release(st, target, deltas, rid)
                except Exception as e:
                    errors[f"release: {type(e).__name__}: {e}"[:200]] += 1
                    continue
                lat = time.perf_counter() - t0
                if t_measure <= time.monotonic() <= t_end:
                    release_lat.append(lat)
                continue
            target = rng.choice(targets)
            deltas = make_deltas(rng)
            ref = f"bench-{uuid.uuid4().hex}"
            t0 = time.perf_counter()
            try:
                rid = ops.reserve(st, target, deltas, ref)
            except Exception as e:
                errors[f"reserve: {type(e).__name__}: {e}"[:200]] += 1
                continue
            lat = time.perf_counter() - t0
            if rid is not None:
                held.append((target, deltas, rid))
            if t_measure <= time.monotonic() <= t_end:
                (ok_lat if rid is not None else refused_lat).append(lat)
    except Exception as e:
        errors[f"thread: {type(e).__name__}: {e}"[:200]] += 1
    finally:
        if st is not None:
            with contextlib.suppress(Exception):
                ops.close_thread(st)
    out.update(ok=ok_lat, refused=refused_lat, release=release_lat, errors=errors)


def run_phase(url: str, dsn: str, cmd: dict[str, Any], cmd_q: Any, res_q: Any) -> dict[str, Any]:
    """Set up, report ready, wait for the common start times, run the client threads."""
    threads = cmd["threads"]
    targets = [
        {"id": uuid.UUID(t["id"]), "agency_id": uuid.UUID(t["agency_id"]), "kind": t["kind"]}
        for t in cmd["targets"]
    ]
    ops = OursOps(url, threads) if cmd["mode"] == "ours" else BaselineOps(dsn, threads)
    res_q.put({"ready": os.getpid()})
    go = cmd_q.get()
    outs: list[dict[str, Any]] = [{} for _ in range(threads)]
    workers = [
        threading.Thread(
            target=client_thread,
            args=(ops, targets, cmd["seed"] * 1000 + i, go["t_measure"], go["t_end"], outs[i]),
            daemon=True,
        )
        for i in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    ops.close()
    errors: Counter[str] = Counter()
    for o in outs:
        errors.update(o.get("errors", {}))
    return {
        "ok": [x for o in outs for x in o.get("ok", [])],
        "refused": [x for o in outs for x in o.get("refused", [])],
        "release": [x for o in outs for x in o.get("release", [])],
        "errors": dict(errors),
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "pid": os.getpid(),
    }


def worker_main(url: str, dsn: str, cmd_q: Any, res_q: Any) -> None:
    sys.stdout = sys.stderr  # stdout carries the one JSON line, from the parent only
    from sqlalchemy.orm import configure_mappers

    import quotas.ledger  # noqa: F401  (import the product once, before any phase)
    from broker.migrations import all_metadata

    all_metadata()
    configure_mappers()
    res_q.put({"started": os.getpid()})
    while True:
        cmd = cmd_q.get()
        if cmd is None:
            return
        try:
            res_q.put(run_phase(url, dsn, cmd, cmd_q, res_q))
        except BaseException:
            res_q.put({"fatal": traceback.format_exc()})


# --- database set-up and checks ----------------------------------------------------------------


def seed(url: str) -> list[dict[str, str]]:
    from broker.core.authz import Principal
    from broker.core.db import Database
    from broker.tenancy import service as tenancy
    from broker.tenancy.schemas import TenantCreate
    from quotas import service as quotas

    system = Principal.system("bench")
    db = Database(url)
    targets: list[dict[str, str]] = []
    try:
        with db.unit_of_work() as s:
            center = tenancy.create_center(s, system, code="center", name_zh="基准测试云中心")
            for rc, limit in CENTER_LIMITS.items():
                quotas.set_quota(s, system, center.id, rc, limit=limit)
            for a in range(1, AGENCIES + 1):
                agency = tenancy.create_tenant(
                    s,
                    system,
                    TenantCreate(
                        parent_id=center.id, kind="agency", code=f"ag{a}", name_zh=f"局{a}"
                    ),
                )
                for rc, limit in AGENCY_LIMITS.items():
                    quotas.set_quota(s, system, agency.id, rc, limit=limit)
                targets.append(
                    {"id": str(agency.id), "agency_id": str(agency.id), "kind": "agency"}
                )
                for n in (1, 2):
                    sysx = tenancy.create_tenant(
                        s,
                        system,
                        TenantCreate(
                            parent_id=agency.id, kind="system", code=f"ag{a}-s{n}",
                            name_zh=f"局{a}系统{n}",
                        ),
                    )  # fmt: skip
                    for rc in CLASSES:
                        # s1: a limit of its own; s2: shares the agency's pool (no limit)
                        own = OWN_SYSTEM_LIMITS[rc] if n == 1 else None
                        quotas.set_quota(s, system, sysx.id, rc, limit=own)
                    targets.append(
                        {"id": str(sysx.id), "agency_id": str(agency.id), "kind": "system"}
                    )
    finally:
        db.dispose()
    return targets


def reset(dsn: str) -> None:
    """An empty ledger: every phase starts from the same state."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE allocation, reservation")
        conn.execute("UPDATE quota SET committed = 0, reserved = 0")
        conn.execute("VACUUM ANALYZE quota")
        conn.execute("ANALYZE allocation")
        conn.execute("ANALYZE reservation")


def check_ledger(dsn: str) -> dict[str, Any]:
    """Every quota row against an independent recount from the allocation table, in one snapshot.

    Limit rows: committed + unexpired reserved of the row's subtree ≤ limit (the center's subtree
    is every agency). Agency and system rows: committed and reserved equal the recount (the
    ledger keeps no counters on the center row: its usage is the agencies' sum).
    """
    import psycopg

    with psycopg.connect(dsn) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        quota_rows = conn.execute(
            "SELECT tenant_id, resource_class, depth, hard_limit, committed, reserved FROM quota"
        ).fetchall()
        sums = conn.execute(
            "SELECT tenant_id, agency_id, resource_class, state, expires_at <= now(),"
            " sum(amount), sum(greatest(amount, 0)) FROM allocation"
            " WHERE state IN ('reserved', 'committed') GROUP BY 1, 2, 3, 4, 5"
        ).fetchall()
        conn.rollback()
    # recount[(key kind, id, class)] = [committed, reserved incl. expired, live reserved]
    recount: dict[tuple[str, Any, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for tenant_id, agency_id, rc, state, expired, amount, held in sums:
        for key in (("t", tenant_id, rc), ("a", agency_id, rc), ("c", None, rc)):
            r = recount[key]
            if state == "committed":
                r[0] += int(amount)
            else:
                r[1] += int(held)
                if not expired:
                    r[2] += int(held)
    over = mismatch = with_limit = 0
    fill = 0.0
    for tenant_id, rc, depth, limit, committed, reserved in quota_rows:
        key = ("c", None, rc) if depth == 0 else ("a" if depth == 1 else "t", tenant_id, rc)
        c, held_all, live = recount.get(key, [0, 0, 0])
        if depth > 0 and (committed, reserved) != (c, held_all):
            mismatch += 1
        if limit is not None:
            with_limit += 1
            if c + live > limit:
                over += 1
            if limit:
                fill = max(fill, (c + live) / limit)
    return {
        "rows": len(quota_rows),
        "with_limit": with_limit,
        "over_limit": over,
        "counter_mismatch": mismatch,
        "max_fill": round(fill, 3),
    }


class Checker:
    """Checks the ledger about once a second while a phase runs."""

    def __init__(self, dsn: str, interval: float = 1.0) -> None:
        self.dsn, self.interval = dsn, interval
        self.results: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.results.append(check_ledger(self.dsn))
            except Exception as e:
                log(f"checker: {e}")

    def __enter__(self) -> Checker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- the run -----------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return round(s[k] * 1000, 3)


class Pool:
    """Persistent spawned worker processes, each told per phase how many client threads to run."""

    def __init__(self, n: int, url: str, dsn: str) -> None:
        ctx = mp.get_context("spawn")
        self.res_q = ctx.Queue()
        self.cmd_qs = [ctx.Queue() for _ in range(n)]
        self.procs = [
            ctx.Process(target=worker_main, args=(url, dsn, q, self.res_q), daemon=True)
            for q in self.cmd_qs
        ]
        for p in self.procs:
            p.start()
        self._collect(n, "started", 120)

    def _collect(self, n: int, key: str, timeout: float) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(results) < n:
            try:
                res = self.res_q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"worker processes did not report {key!r} in time") from None
            if "fatal" in res:
                raise RuntimeError("worker failed:\n" + res["fatal"])
            if key not in res:
                raise RuntimeError(f"unexpected worker message {sorted(res)} waiting for {key!r}")
            results.append(res)
        return results

    def run(
        self, cmds: list[dict[str, Any]], warmup: float, seconds: float
    ) -> list[dict[str, Any]]:
        busy = [q for q, cmd in zip(self.cmd_qs, cmds, strict=False) if cmd["threads"] > 0]
        for q, cmd in zip(self.cmd_qs, cmds, strict=False):
            if cmd["threads"] > 0:
                q.put(cmd)
        self._collect(len(busy), "ready", 60)
        start = time.monotonic() + 0.05  # every worker runs its warm-up and window at once
        go = {"t_measure": start + warmup, "t_end": start + warmup + seconds}
        for q in busy:
            q.put(go)
        return self._collect(len(busy), "ok", warmup + seconds + 120)

    def close(self) -> None:
        for q in self.cmd_qs:
            with contextlib.suppress(Exception):
                q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


def phase(
    pool: Pool,
    dsn: str,
    mode: str,
    clients: int,
    targets: list[dict[str, str]],
    seconds: float,
    warmup: float,
    seed_base: int,
) -> dict[str, Any]:
    reset(dsn)
    procs = min(clients, MAX_PROCESSES)
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    per += [0] * (MAX_PROCESSES - procs)
    cmds = [
        {"mode": mode, "threads": n, "targets": targets, "seed": seed_base + i}
        for i, n in enumerate(per)
    ]
    with Checker(dsn) as checker:
        results = pool.run(cmds, warmup, seconds)
    final = check_ledger(dsn)
    checks = [*checker.results, final]
    ok = [x for r in results for x in r["ok"]]
    refused = [x for r in results for x in r["refused"]]
    release = [x for r in results for x in r["release"]]
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    attempts = ok + refused
    return {
        "reservations_per_s": round(len(attempts) / seconds, 1),
        "ops_per_s": round((len(attempts) + len(release)) / seconds, 1),
        "accepted": len(ok),
        "refused": len(refused),
        "releases": len(release),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(3)),
        "p50_ms": pct(attempts, 50),
        "p99_ms": pct(attempts, 99),
        "accepted_p50_ms": pct(ok, 50),
        "accepted_p99_ms": pct(ok, 99),
        "release_p50_ms": pct(release, 50),
        "release_p99_ms": pct(release, 99),
        "processes": procs,
        "threads_per_process": per[:procs],
        "checks": len(checks),
        "overshoot": sum(c["over_limit"] + c["counter_mismatch"] for c in checks),
        "max_fill": max(c["max_fill"] for c in checks),
        "maxrss_kb": max(r["maxrss_kb"] for r in results),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
    }


def profile_one_client(url: str, dsn: str, targets: list[dict[str, str]], n: int) -> dict[str, Any]:
    """Where one client's time goes, ours and baseline, in this process, with the same operation
    mix: statements per operation (SQLAlchemy cursor events; pool pre-pings counted apart),
    psycopg waits (`Connection.wait`, which every query, BEGIN and COMMIT goes through: each is
    at most one round trip; an executemany in pipeline mode takes several) and the time spent in
    them, the rest being Python; then a cProfile of ours."""
    import cProfile
    import io
    import pstats

    import psycopg
    from sqlalchemy import event

    tgts = [
        {"id": uuid.UUID(t["id"]), "agency_id": uuid.UUID(t["agency_id"]), "kind": t["kind"]}
        for t in targets
    ]
    current: dict[str, Any] = {"stmts": [], "db": 0.0, "waits": 0, "wait_s": 0.0, "pings": 0}
    real_wait = psycopg.Connection.wait

    def timed_wait(self: Any, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return real_wait(self, *a, **kw)
        finally:
            current["waits"] += 1
            current["wait_s"] += time.perf_counter() - t0

    def measure(ops: Any, st: Any, count: int, per_kind: dict[str, list[dict[str, Any]]]) -> None:
        rng = random.Random(7)
        held: list[tuple[dict[str, Any], dict[str, int], Any]] = []
        for i in range(count + 200):  # the first 200 warm the caches
            current.update(stmts=[], db=0.0, waits=0, wait_s=0.0, pings=0)
            t0 = time.perf_counter()
            if held and (len(held) >= HOLD_CAP or rng.random() < RELEASE_P):
                target, deltas, rid = held.pop(0)
                ops.release(st, target, deltas, rid)
                kind = "release"
            else:
                target = rng.choice(tgts)
                deltas = make_deltas(rng)
                rid = ops.reserve(st, target, deltas, f"bench-{uuid.uuid4().hex}")
                kind = "refused" if rid is None else "reserve"
                if rid is not None:
                    held.append((target, deltas, rid))
            if i >= 200:
                per_kind[kind].append(dict(current, wall=time.perf_counter() - t0))

    def summarize(per_kind: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind, rows in sorted(per_kind.items()):
            k = len(rows)
            wall = sum(r["wall"] for r in rows)
            waited = sum(r["wait_s"] for r in rows)
            out[kind] = {
                "count": k,
                "mean_ms": round(wall / k * 1000, 3),
                "psycopg_waits_per_op": round(sum(r["waits"] for r in rows) / k, 2),
                "waiting_for_server_ms": round(waited / k * 1000, 3),
                "python_ms": round((wall - waited) / k * 1000, 3),
            }
            if rows[0]["stmts"] or rows[0]["pings"]:
                out[kind]["sqlalchemy_statements_per_op"] = round(
                    sum(len(r["stmts"]) for r in rows) / k, 2
                )
                out[kind]["pool_pre_pings_per_op"] = round(sum(r["pings"] for r in rows) / k, 2)
                shapes: Counter[str] = Counter()
                for r in rows[:50]:
                    shapes.update(r["stmts"])
                out[kind]["statements"] = [
                    f"{v / min(k, 50):.2g}× {sql}" for sql, v in shapes.most_common()
                ]
        return out

    psycopg.Connection.wait = timed_wait  # type: ignore[method-assign]
    try:
        reset(dsn)
        ours = OursOps(url, 1)
        engine = ours.db.engine
        real_ping = engine.dialect.do_ping

        def counting_ping(dbapi_conn: Any) -> bool:
            current["pings"] += 1
            return real_ping(dbapi_conn)

        def before(conn: Any, cursor: Any, stmt: str, params: Any, ctx: Any, many: bool) -> None:
            words = " ".join(stmt.split())
            current["stmts"].append(("executemany " if many else "") + words[:90])

        engine.dialect.do_ping = counting_ping  # type: ignore[method-assign,assignment]
        event.listen(engine, "before_cursor_execute", before)
        ours_kinds: dict[str, list[dict[str, Any]]] = defaultdict(list)
        measure(ours, None, n, ours_kinds)
        event.remove(engine, "before_cursor_execute", before)

        reset(dsn)
        base = BaselineOps(dsn, 1)
        conn = base.thread_state()
        base_kinds: dict[str, list[dict[str, Any]]] = defaultdict(list)
        measure(base, conn, n, base_kinds)
        conn.close()
    finally:
        psycopg.Connection.wait = real_wait  # type: ignore[method-assign]
    summary: dict[str, Any] = {
        "ops": n,
        "ours": summarize(ours_kinds),
        "baseline": summarize(base_kinds),
    }
    reset(dsn)
    rng = random.Random(11)
    held: list[tuple[dict[str, Any], dict[str, int], Any]] = []

    def one() -> None:
        if held and (len(held) >= HOLD_CAP or rng.random() < RELEASE_P):
            target, deltas, rid = held.pop(0)
            ours.release(None, target, deltas, rid)
        else:
            target = rng.choice(tgts)
            deltas = make_deltas(rng)
            rid = ours.reserve(None, target, deltas, f"bench-{uuid.uuid4().hex}")
            if rid is not None:
                held.append((target, deltas, rid))

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        one()
    prof.disable()
    ours.close()
    for sort in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(sort).print_stats(30)
        log(f"cProfile of one client, {n} operations, sorted by {sort}:\n{buf.getvalue()}")
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    by_area: Counter[str] = Counter()
    for (filename, _, fn), v in stats.stats.items():  # type: ignore[attr-defined]
        f = filename.replace("\\", "/")
        if "/sqlalchemy/orm/" in f:
            area = "sqlalchemy.orm"
        elif "/sqlalchemy/" in f:
            area = "sqlalchemy.core/engine/sql"
        elif "/sqlmodel/" in f:
            area = "sqlmodel"
        elif ("/psycopg" in f and fn.startswith("wait")) or fn in ("wait_c", "wait_conn"):
            area = "waiting for PostgreSQL (psycopg wait)"
        elif "/psycopg" in f:
            area = "psycopg"
        elif "/pydantic" in f:
            area = "pydantic"
        elif "/quotas/" in f or "/broker/" in f:
            area = "govbroker"
        elif f.startswith("~") or "{" in f:
            area = "builtins"
        else:
            area = "other python"
        by_area[area] += v[2]
    summary["cprofile_own_time_share_ours"] = {
        k: round(v / total, 3) for k, v in by_area.most_common()
    }
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="measured seconds per phase")
    ap.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per phase")
    ap.add_argument("--clients", default="1,8,32,64", help="client levels, comma-separated")
    ap.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="also profile N operations of one in-process client (summary in the JSON, "
        "cProfile tables on stderr)",
    )  # fmt: skip
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",") if x.strip()]
    real_stdout = sys.stdout
    report: dict[str, Any] = {"bench": "quota_reserve", "backend": "postgresql"}
    code = 0
    with contextlib.redirect_stdout(sys.stderr):
        try:
            report.update(run(args, levels))
        except Exception as e:
            log(traceback.format_exc())
            report.update({"error": f"{type(e).__name__}: {e}", "targets_met": False})
            code = 1
    print(json.dumps(report, ensure_ascii=False), file=real_stdout, flush=True)
    return code


def run(args: argparse.Namespace, levels: list[int]) -> dict[str, Any]:
    import psycopg
    import sqlalchemy

    from broker import migrations

    load_start = os.getloadavg()
    name = f"gbbench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    dsn, url = pg_dsn(name), pg_url(name)
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        server_version = admin.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    pool: Pool | None = None
    try:
        log(f"database {name}: migrating and seeding")
        migrations.upgrade(url)
        targets = seed(url)
        log(f"seeded 1 center, {AGENCIES} agencies, {AGENCIES * 2} systems")
        pool = Pool(min(max(levels), MAX_PROCESSES), url, dsn)
        out_levels = []
        for i, n in enumerate(levels):
            row: dict[str, Any] = {"clients": n}
            for mode in ("ours", "baseline"):
                log(f"{n} clients, {mode}: {args.warmup:g}s warm-up + {args.seconds:g}s")
                r = phase(pool, dsn, mode, n, targets, args.seconds, args.warmup, 100 * i)
                log(
                    f"  {r['reservations_per_s']}/s accepted={r['accepted']} "
                    f"refused={r['refused']} releases={r['releases']} errors={r['errors']} "
                    f"p50={r['p50_ms']}ms p99={r['p99_ms']}ms overshoot={r['overshoot']} "
                    f"max_fill={r['max_fill']}"
                )
                if mode == "ours":
                    row.update(r)
                else:
                    row["baseline"] = r
            b = row["baseline"]
            row["baseline_per_s"] = b["reservations_per_s"]
            row["ratio"] = (
                round(row["reservations_per_s"] / b["reservations_per_s"], 3)
                if b["reservations_per_s"]
                else None
            )
            total = row["accepted"] + row["refused"] + row["releases"]
            row["mix"] = {
                "reserve_share": round((row["accepted"] + row["refused"]) / total, 3)
                if total
                else 0,
                "release_share": round(row["releases"] / total, 3) if total else 0,
                "refused_share_of_reserves": round(
                    row["refused"] / max(1, row["accepted"] + row["refused"]), 3
                ),
            }
            out_levels.append(row)
        profile = None
        if args.profile:
            log(f"profiling one in-process client over {args.profile} operations")
            profile = profile_one_client(url, dsn, targets, args.profile)
    finally:
        if pool is not None:
            pool.close()
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        log(f"database {name} dropped")

    overshoot = sum(r["overshoot"] for r in out_levels)
    errors = sum(r["errors"] for r in out_levels)
    at32 = next((r for r in out_levels if r["clients"] == 32), None)
    ratios = [r["ratio"] for r in out_levels]
    met = (
        at32 is not None
        and at32["reservations_per_s"] >= TARGETS["min_per_s_at_32"]
        and all(x is not None and x >= TARGETS["min_ratio"] for x in ratios)
        and overshoot <= TARGETS["max_overshoot"]
        and errors == 0
    )
    result: dict[str, Any] = {
        "levels": out_levels,
        "overshoot": overshoot,
        "baseline_overshoot": sum(r["baseline"]["overshoot"] for r in out_levels),
        "errors": errors,
        "targets": TARGETS,
        "ratio_rule": RATIO_RULE,
        "targets_met": bool(met),
        "config": {
            "seconds_per_phase": args.seconds,
            "warmup_s": args.warmup,
            "agencies": AGENCIES,
            "systems_per_agency": 2,
            "targets": "uniform over agencies and systems",
            "limits": {
                "center": CENTER_LIMITS,
                "agency": AGENCY_LIMITS,
                "system_s1": OWN_SYSTEM_LIMITS,
                "system_s2": "shares the agency pool",
            },
            "request": "vcpu 1-4, memory_mb vcpu×{1,2,4}GiB, instances 1",
            "release_p": RELEASE_P,
            "hold_cap_per_client": HOLD_CAP,
            "reservations_per_s": "reserve calls completed (accepted + refused) per second; "
            "releases are extra (ops_per_s)",
        },
        "peak_rss_mb": {
            "worker_max": round(max(r["maxrss_kb"] for r in out_levels) / 1024, 1),
            "parent": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        },
        "machine": {
            "cpus": os.cpu_count(),
            # the machine is shared: other work running alongside lowers every figure
            "loadavg_at_start": [round(x, 2) for x in load_start],
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "postgresql": server_version,
            "sqlalchemy": sqlalchemy.__version__,
            "psycopg": psycopg.__version__,
            "psycopg_impl": psycopg.pq.__impl__,
        },
    }
    if profile is not None:
        result["profile"] = profile
    return result


if __name__ == "__main__":
    sys.exit(main())
