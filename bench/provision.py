#!/usr/bin/env python
"""Benchmark of self-service provisioning through the HTTP API, against the bare simulator driver.

    .venv/bin/python bench/provision.py [--count 1000] [--rate 60] [--capacity N] [--clients 24]
                      [--warmup 16]
                      [--backend sqlite|postgresql] [--sim-state shared|file] [--job-workers N]
                      [--profile N] [--keep]

Prints exactly one JSON line on stdout (progress goes to stderr). What it does:

* a fresh database — SQLite in a temp dir, or (`--backend postgresql`) its own uniquely named
  database on 127.0.0.1:5432, dropped at the end, also on error — migrated, with a center of
  `AGENCIES` agencies of `SYSTEMS` systems each, quota on every class a server holds at the center
  and at every agency (each agency could take all `--count` servers; systems share the agency's
  pool), per agency one member user (role at the agency) with an API token, and a center admin
  with a token (for the sync at the end);
* a simulator provider with zero latency, hosts, storage and addresses for every server, synced
  and its catalog imported. Its state is `shared:` by default: the servers then live in the API
  process only (hosts, pools and catalog ids derive from the options, so this process's sync sees
  the same ones). `--sim-state file` shares them through a file instead, which the simulator
  rewrites whole after every change: O(n) per create, so it measures mostly the simulator;
* baseline: the same `--count` creates (s1.small, centos-7.9) called directly on
  `SimulatorDriver.create_server` in this process, one after the other, with the same options
  and state kind: no API, no database, no ledger;
* ours: `govbroker serve` (the `api.app:create_app` factory, ThreadRunner jobs) as a subprocess on
  a free 127.0.0.1 port, with GOVBROKER_EMBEDDED_SCHEDULER=false (no periodic sync or reconciler
  competing with the jobs); first `--warmup` POSTs one at a time (two per system by default;
  their servers are verified with the rest, no figure includes them), so that what a freshly
  started process does once (connections, statements compiled, memories filled) is not timed;
  then `--clients` threads, each on its own keep-alive connection, send the `--count`
  POST /api/v1/servers (each with its own Idempotency-Key), spread over the systems.
  The load is open loop by default: request i is due at start + i / `--rate` (60/s: the
  throughput target and a fifth more), whatever became of the ones before, and its latency runs
  from when it was due (a request that had to wait for a free connection counts that wait too).
  `--rate 0` is a closed loop instead: each connection sends as soon as it has its answer, the
  server's saturated throughput; its latencies then measure the queue the connections make
  (latency ≈ connections / throughput, by Little's law), not the server. The end is the last
  job's `finished_at` (the database is polled until every job is final), so VMs/s = count /
  (last finished_at − first POST sent). POST latency is measured at the client; the server's CPU
  time over the run comes from /proc, the clients' (this process) too;
* capacity: after an open-loop run, `--capacity` more POSTs (default: `--count`) on the same
  server, closed loop over the same connections, once the first run's jobs have all ended. An
  open-loop run's VMs/s can be no more than the rate offered; this one says how far above it the
  server goes (`capacity.vms_per_s`, and `capacity_ratio` against the baseline);
* afterwards everything is checked: a provider sync through the API sees exactly the inventoried
  servers at the simulator (none new, none gone; with file state the file's request tags must
  equal the succeeded jobs' too), one inventory row per server, `count` succeeded jobs (also as
  `GET /api/v1/jobs?state=succeeded` lists them), every agency and system ledger row's committed
  usage equals the sum of what its subtree's servers book, nothing is left reserved, and the
  audit chain verifies. Failed jobs' errors are listed;
* `--profile N`: afterwards, N more VMs in this process, one at a time, through the functions the
  API calls (the token check of `current_principal`, `service.request_server`, `executor.run`;
  no HTTP): wall and CPU time and statements per phase, unprofiled; then N more under cProfile.

targets_met is true only when end-to-end VMs/s ≥ 50 (in the open-loop run and in the capacity
run), POST p99 < 100 ms (the open-loop run: the latency of a server offered more than the target),
every POST answered 202, every job succeeded and the verification passed. Every figure is
measured in the run that prints it; the machine is shared, so its load average is printed too.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ADMIN_DSN = os.environ.get("GOVBROKER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
TARGETS = {"min_vms_per_s": 50.0, "max_post_p99_ms": 100.0}
AGENCIES = 4
SYSTEMS = 2
FLAVOR, IMAGE = "s1.small", "centos-7.9"  # 1 vCPU, 2 GiB, 20 GB root disk on the first tier
HOSTS = 8
SERVER_CLASSES = ("instances", "vcpu", "memory_mb", "storage_gb.ssd", "storage_gb.hdd")
POLL_S = 0.2
# the load offered by default: the throughput target and a fifth more, open loop (see fire)
RATE = 60.0
STALL_S = 120.0  # no job finishing for this long ends the wait


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_mb_of(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def cpu_s_of(pid: int) -> float:
    """User + system CPU seconds of a process (and its finished threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]  # nearest rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def simulator_options(count: int, state: str) -> dict[str, Any]:
    """Room for `count` s1.small servers with a quarter to spare: memory is not overcommitted."""
    memory_mb = -(-count * 2048 * 5 // 4 // HOSTS)
    return {
        "state": state,
        "retry_max_wait": 0,
        "hosts": [
            {"name": f"bench-host-{i:02d}", "vcpu": 64, "memory_mb": memory_mb, "cluster": "c"}
            for i in range(1, HOSTS + 1)
        ],
        "storage": {"ssd": count * 40, "hdd": count * 40},
    }


# --- set-up -------------------------------------------------------------------------------------


def seed(db: Any, count: int, sim_state: str) -> dict[str, Any]:
    """The estate, the provider (synced, catalog imported) and a token per agency member."""
    from broker.core.authz import Principal
    from broker.inventory import providers, sync
    from broker.inventory.schemas import ProviderCreate
    from broker.provisioning import catalog
    from broker.tenancy import auth, users
    from broker.tenancy import service as tenancy
    from broker.tenancy.schemas import RoleBindingCreate, TenantCreate, UserCreate
    from quotas import service as quotas

    admin = Principal.system("bench")
    per_agency = {
        "instances": count,
        "vcpu": count * 2,
        "memory_mb": count * 4096,
        "storage_gb.ssd": count * 40,
        "storage_gb.hdd": count * 40,
    }
    systems: list[dict[str, str]] = []
    tokens: list[str] = []
    with db.unit_of_work() as s:
        center = tenancy.create_center(s, admin, code="center", name_zh="基准测试中心")
        root = users.create_user(
            s, admin, UserCreate(username="bench-admin", display_name="admin", tenant_id=center.id)
        )
        users.create_binding(
            s, admin, RoleBindingCreate(user_id=root.id, role="center_admin", tenant_id=center.id)
        )
        _, admin_token = auth.create_token(
            s, auth.load_principal(s, root, method="session"), name="bench", expires_in_days=1
        )
        for rc in SERVER_CLASSES:
            quotas.set_quota(s, admin, center.id, rc, limit=per_agency[rc] * AGENCIES)
        for a in range(AGENCIES):
            agency = tenancy.create_tenant(
                s,
                admin,
                TenantCreate(parent_id=center.id, kind="agency", code=f"ag{a}", name_zh=f"局{a}"),
            )
            for rc in SERVER_CLASSES:
                quotas.set_quota(s, admin, agency.id, rc, limit=per_agency[rc])
            user = users.create_user(
                s,
                admin,
                UserCreate(username=f"ag{a}-ops", display_name=f"ag{a} ops", tenant_id=agency.id),
            )
            users.create_binding(
                s, admin, RoleBindingCreate(user_id=user.id, role="member", tenant_id=agency.id)
            )
            principal = auth.load_principal(s, user, method="session")
            _, raw = auth.create_token(s, principal, name="bench", expires_in_days=1)
            for n in range(SYSTEMS):
                system = tenancy.create_tenant(
                    s,
                    admin,
                    TenantCreate(
                        parent_id=agency.id, kind="system", code=f"ag{a}-s{n}", name_zh=f"系统{n}"
                    ),
                )
                systems.append({"id": str(system.id), "token": raw})
            tokens.append(raw)
        provider_id = providers.create_provider(
            s,
            admin,
            ProviderCreate(
                kind="simulator",
                name="sim-bench",
                endpoint="sim://bench",
                credentials={"username": "bench", "password": uuid.uuid4().hex},
                options=simulator_options(count, sim_state),
            ),
        ).id
    outcome = sync.sync_provider(db, provider_id, trigger="bench")
    if outcome.status != "ok":
        raise RuntimeError(f"sync failed: {outcome.error}")
    catalog.import_items(db, admin, provider_id)
    return {
        "provider_id": provider_id,
        "systems": systems,
        "tokens": tokens,
        "admin_token": admin_token,
    }


def run_baseline(count: int, state: str) -> float:
    """`count` creates on the bare driver, as the executor specifies them; seconds taken."""
    from drivers.base import ServerSpec
    from drivers.simulator import SimulatorDriver

    driver = SimulatorDriver("sim://baseline", {}, simulator_options(count, state))
    flavor = next(f for f in driver.list_flavors() if f.name == FLAVOR).external_id
    image = next(i for i in driver.list_images() if i.name == IMAGE).external_id
    network = driver.list_networks()[0].external_id
    started = time.perf_counter()
    for i in range(count):
        driver.create_server(
            ServerSpec(
                name=f"base-{i:05d}",
                image=image,
                network=network,
                owner_tag="ag0/ag0-s0",
                request_tag=f"gb-{uuid.uuid4()}",
                flavor=flavor,
            )
        )
    took = time.perf_counter() - started
    SimulatorDriver.ex_reset_shared(state)
    return took


# --- the server ---------------------------------------------------------------------------------


def start_server(env: dict[str, str], port: int, logfile: Path) -> subprocess.Popen[bytes]:
    script = Path(sys.executable).parent / "govbroker"
    cmd = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "from broker.cli import app; app()"]
    )
    out = logfile.open("wb")
    proc = subprocess.Popen(
        [*cmd, "serve", "--bind", f"127.0.0.1:{port}"],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=logfile.parent,
    )
    out.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the server exited ({proc.returncode}): {logfile.read_text()[-2000:]}"
            )
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return proc
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not answer /healthz within 60 s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the load -----------------------------------------------------------------------------------


class Client:
    """One keep-alive connection; reconnects after a transport error."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def call(self, method: str, path: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = None if body is None else json.dumps(body).encode()
        hdrs = {**headers, "Content-Type": "application/json"} if data else headers
        try:
            self.conn.request(method, path, body=data, headers=hdrs)
            resp = self.conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            raise
        return resp.status, json.loads(payload) if payload else None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def server_post(
    system: dict[str, str], name: str, key_prefix: str
) -> tuple[dict[str, str], dict[str, str]]:
    """Body and headers of one POST /api/v1/servers into `system` (its id and its token)."""
    body = {"name": name, "system_id": system["id"], "image": IMAGE, "flavor": FLAVOR}
    headers = {
        "Authorization": f"Bearer {system['token']}",
        "Idempotency-Key": f"{key_prefix}-{uuid.uuid4()}",
    }
    return body, headers


def fire(
    port: int,
    systems: list[dict[str, str]],
    count: int,
    clients: int,
    rate: float,
    prefix: str = "bench",
) -> dict[str, Any]:
    """Send `count` POST /api/v1/servers over `clients` keep-alive connections (one thread
    each); latencies and outcomes.

    rate > 0, open loop: request i is due at start + i / rate, whatever the answers before it;
    its latency runs from when it was due, so a request that waited for a free connection (or
    was sent late because this process was starved) counts that wait too. rate 0, closed loop:
    every connection sends its next request as soon as the previous one is answered, and the
    latency runs from the send (with N connections, latency ≈ N / throughput, by Little's law).
    """
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    next_index = iter(range(count))
    t0 = 0.0

    def worker() -> None:
        client = Client(port)
        mine: list[float] = []
        seen: Counter[str] = Counter()
        start.wait()
        try:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    break
                body, headers = server_post(systems[i % len(systems)], f"{prefix}-{i:05d}", prefix)
                if rate > 0:
                    due = t0 + i / rate
                    wait = due - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                else:
                    due = time.perf_counter()
                try:
                    status, payload = client.call("POST", "/api/v1/servers", body, headers)
                except (OSError, http.client.HTTPException) as exc:
                    seen["transport_error"] += 1
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    continue
                mine.append(time.perf_counter() - due)
                seen[str(status)] += 1
                if status != 202:
                    with lock:
                        errors.append(f"{status}: {json.dumps(payload)[:300]}")
        finally:
            client.close()
            with lock:
                latencies.extend(mine)
                statuses.update(seen)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    first_post = datetime.now(UTC)
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    return {
        "first_post": first_post,
        "posts_s": time.perf_counter() - t0,
        "latencies": latencies,
        "statuses": dict(statuses),
        "errors": errors,
    }


def warm_up(port: int, systems: list[dict[str, str]], n: int) -> tuple[int, list[str]]:
    """`n` POSTs, one after the other, over the systems in turn, before the measured run: a
    server just started does its first-time work (database connections, statements compiled
    once, the catalog and token memories) on these instead of on the first measured requests.
    Their servers count in the verification; no figure includes them. (accepted, errors)"""
    client = Client(port)
    accepted, errors = 0, []
    try:
        for i in range(n):
            body, headers = server_post(systems[i % len(systems)], f"warm-{i:04d}", "warm")
            status, payload = client.call("POST", "/api/v1/servers", body, headers)
            if status == 202:
                accepted += 1
            else:
                errors.append(f"warm-up {status}: {json.dumps(payload)[:300]}")
    finally:
        client.close()
    return accepted, errors


def wait_for_jobs(db: Any, expected: int) -> dict[str, int]:
    """Poll the job table until every job is final (or nothing finishes for STALL_S)."""
    from sqlalchemy import func, select

    from broker.provisioning.models import Job

    last_change, last_final = time.monotonic(), -1
    while True:
        with db.unit_of_work(write=False) as s:
            counts = {
                state: n
                for state, n in s.execute(select(Job.state, func.count()).group_by(Job.state)).all()
            }
        final = sum(n for st, n in counts.items() if st not in ("queued", "running"))
        if final >= expected and final == sum(counts.values()):
            return counts
        if final != last_final:
            last_final, last_change = final, time.monotonic()
        elif time.monotonic() - last_change > STALL_S:
            log(f"no job finished for {STALL_S:.0f} s; giving up waiting: {counts}")
            return counts
        time.sleep(POLL_S)


def last_finished(db: Any) -> datetime | None:
    """When the latest job finished (the run's end, once every job is final)."""
    from sqlalchemy import func, select

    from broker.provisioning.models import Job

    with db.unit_of_work(write=False) as s:
        return s.execute(select(func.max(Job.finished_at))).scalar_one()  # type: ignore[no-any-return]


def api_sync(port: int, provider_id: uuid.UUID, token: str) -> dict[str, int]:
    """A provider sync through the API: what the simulator in the server process holds, as the
    inventory compares it (every server seen, none new, none gone)."""
    client = Client(port)
    try:
        status, run = client.call(
            "POST",
            f"/api/v1/providers/{provider_id}/sync",
            None,
            {"Authorization": f"Bearer {token}"},
        )
    finally:
        client.close()
    if status != 200 or run.get("status") != "ok":
        raise RuntimeError(f"sync answered {status}: {run}")
    return {k: int(v) for k, v in run["counts"].items() if k.startswith("servers_")}


def api_succeeded(port: int, tokens: list[str]) -> int:
    """How many succeeded jobs the API lists, summed over the agencies' members."""
    client = Client(port)
    total = 0
    try:
        for token in tokens:
            cursor = None
            while True:
                path = "/api/v1/jobs?state=succeeded&limit=500"
                if cursor:
                    path += f"&cursor={cursor}"
                status, page = client.call("GET", path, None, {"Authorization": f"Bearer {token}"})
                if status != 200:
                    raise RuntimeError(f"GET /api/v1/jobs answered {status}: {page}")
                total += int(page["count"])
                cursor = page.get("next_cursor")
                if not cursor:
                    break
    finally:
        client.close()
    return total


# --- verification -------------------------------------------------------------------------------


def verify(
    db: Any, provider_id: uuid.UUID, count: int, sim_tags: set[str] | None, synced: dict[str, int]
) -> dict[str, Any]:
    """Everything adds up: the simulator (its state file when there is one, and a sync through
    the API either way), the inventory, the jobs, the ledger and the audit chain."""
    from sqlalchemy import func, select

    from broker.audit.service import verify_chain
    from broker.inventory.models import Server
    from broker.provisioning.models import Job
    from broker.tenancy.models import Tenant
    from quotas.models import Quota

    with db.unit_of_work(write=False) as s:
        jobs = s.execute(
            select(Job.request_tag, Job.state, Job.finished_at, Job.error_type, Job.error)
        ).all()
        succeeded = [j for j in jobs if j.state == "succeeded"]
        servers = list(
            s.execute(
                select(Server).where(Server.provider_id == provider_id, Server.gone_at.is_(None))  # type: ignore[union-attr]
            ).scalars()
        )
        paths = dict(s.execute(select(Tenant.id, Tenant.path)).all())
        quota_rows = list(s.execute(select(Quota)).scalars())
        chain = verify_chain(s)
        reservations_open = s.execute(
            select(func.count()).select_from(Quota).where(Quota.reserved != 0)
        ).scalar_one()
    # what every ledger row (agency and system levels; the center's usage is a roll-up of its
    # agencies) should have committed: the sum of what the servers of its subtree book
    expected: Counter[tuple[uuid.UUID, str]] = Counter()
    by_path = {path: tid for tid, path in paths.items()}
    for srv in servers:
        if srv.tenant_id is None:
            continue
        parts = [p for p in paths[srv.tenant_id].split("/") if p]
        for depth in range(1, len(parts) + 1):
            tid = by_path["/" + "/".join(parts[:depth]) + "/"]
            for rc, amount in srv.booked.items():
                expected[(tid, rc)] += amount
    mismatches = [
        {"tenant": str(q.tenant_id), "class": q.resource_class, "committed": q.committed,
         "expected": expected.get((q.tenant_id, q.resource_class), 0)}
        for q in quota_rows
        if q.depth > 0 and q.committed != expected.get((q.tenant_id, q.resource_class), 0)
    ]  # fmt: skip
    instances_committed = sum(
        q.committed for q in quota_rows if q.resource_class == "instances" and q.depth == 1
    )
    job_tags = {j.request_tag for j in succeeded}
    checks = {
        "simulator_servers": synced.get("servers_seen", 0),
        "sync_servers_new": synced.get("servers_new", 0),
        "sync_servers_gone": synced.get("servers_gone", 0),
        "inventory_rows": len(servers),
        "succeeded_jobs": len(succeeded),
        "agencies_instances_committed": instances_committed,
        "quota_mismatches": len(mismatches),
        "quota_rows_with_reserved": int(reservations_open),
        "audit_chain_ok": chain.ok,
        "audit_events": chain.checked,
    }
    if sim_tags is not None:
        checks["simulator_file_servers"] = len(sim_tags)
    ok = (
        synced.get("servers_seen") == count
        and not synced.get("servers_new")
        and not synced.get("servers_gone")
        and (sim_tags is None or sim_tags == job_tags)
        and len(servers) == count
        and all(srv.booked for srv in servers)
        and len(succeeded) == count
        and instances_committed == count
        and not mismatches
        and reservations_open == 0
        and chain.ok
    )
    failures = Counter(f"{j.error_type}: {(j.error or '')[:200]}" for j in jobs if j.error_type)
    return {
        "ok": ok,
        "checks": checks,
        "job_errors": [[why, k] for why, k in failures.most_common(5)],
        "mismatches": mismatches[:5],
    }


# --- profile ------------------------------------------------------------------------------------


def profile_in_process(db: Any, seeded: dict[str, Any], sim_state: str, n: int) -> dict[str, Any]:
    """N requests and their jobs, one after the other, through the functions the router and the
    ThreadRunner call (no HTTP), after 20 to warm up: first unprofiled — wall and CPU time,
    statements (SQLAlchemy cursor events) and the time inside them — then N more under cProfile
    (CPU time of this thread), for where the CPU goes."""
    import cProfile
    import pstats

    from sqlalchemy import event, select

    from broker.provisioning import executor, service
    from broker.provisioning.schemas import ServerCreate
    from broker.tenancy import auth
    from broker.tenancy.models import User
    from drivers.simulator import SimulatorDriver

    SimulatorDriver.ex_reset_shared(sim_state)  # what the server made stays in its process
    cur: dict[str, Any] = {"stmts": Counter(), "db_s": 0.0}
    started: dict[int, float] = {}

    def before(conn: Any, _c: Any, statement: str, *_a: Any) -> None:
        started[id(conn)] = time.perf_counter()
        cur["stmts"][" ".join(statement.split())[:90]] += 1

    def after(conn: Any, *_a: Any) -> None:
        cur["db_s"] += time.perf_counter() - started.pop(id(conn), time.perf_counter())

    with db.unit_of_work(write=False) as s:
        user = s.execute(select(User).where(User.username == "ag0-ops")).scalar_one()
        principal = auth.load_principal(s, user, method="token")
    systems = [uuid.UUID(t["id"]) for t in seeded["systems"][:SYSTEMS]]  # ag0's

    token = seeded["systems"][0]["token"]
    memory = str(db.url)  # the key api.deps gives auth's memory of checked tokens

    def one(i: int, phase: str, job_id: Any) -> Any:
        if phase == "auth":  # what api.deps.current_principal does for every request
            if auth.remembered(memory, token) is None:
                with db.unit_of_work(write=False) as s:
                    auth.authenticate_remembering(s, memory, token)
            return None
        if phase == "request":
            data = ServerCreate(
                name=f"prof-{i:05d}", system_id=systems[i % SYSTEMS], image=IMAGE, flavor=FLAVOR
            )
            return service.request_server(db, principal, data, key=f"prof-{uuid.uuid4()}").claimed
        assert job_id is not None
        executor.run(db, job_id)
        return None

    for i in range(20):
        one(i, "job", one(i, "request", None))
    phases = {
        k: {"wall": 0.0, "cpu": 0.0, "db_s": 0.0, "stmts": Counter()}
        for k in ("auth", "request", "job")
    }
    event.listen(db.engine, "before_cursor_execute", before)
    event.listen(db.engine, "after_cursor_execute", after)
    try:
        for i in range(20, 20 + n):
            job_id: uuid.UUID | None = None
            for phase, ph in phases.items():
                cur.update(stmts=Counter(), db_s=0.0)
                t0, c0 = time.perf_counter(), time.thread_time()
                job_id = one(i, phase, job_id) or job_id
                ph["wall"] += time.perf_counter() - t0
                ph["cpu"] += time.thread_time() - c0
                ph["db_s"] += cur["db_s"]
                ph["stmts"].update(cur["stmts"])
    finally:
        event.remove(db.engine, "before_cursor_execute", before)
        event.remove(db.engine, "after_cursor_execute", after)
    out: dict[str, Any] = {"vms": n, "order": "auth, request, job, one VM at a time"}
    for phase, ph in phases.items():
        out[phase] = {
            "wall_ms": round(ph["wall"] / n * 1000, 2),
            "cpu_ms": round(ph["cpu"] / n * 1000, 2),
            "in_statements_ms": round(ph["db_s"] / n * 1000, 2),
            "statements": round(sum(ph["stmts"].values()) / n, 1),
            "top_statements": [[stmt, round(k / n, 2)] for stmt, k in ph["stmts"].most_common(12)],
        }
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    for i in range(20 + n, 20 + 2 * n):
        one(i, "auth", None)
        one(i, "job", one(i, "request", None))
    profiler.disable()
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in pstats.Stats(profiler).stats.items():  # type: ignore[attr-defined]
        where = file.replace(str(ROOT) + "/", "")
        if "site-packages/" in where:
            where = where.split("site-packages/", 1)[1]
        rows.append((ct, tt, nc, f"{where}:{line}({func})"))
    total = sum(tt for _, tt, _, _ in rows)

    def ms(x: float) -> float:
        return round(x / n * 1000, 2)

    ours = [r for r in rows if r[3].split("/", 1)[0] in ("broker", "quotas", "billing", "drivers")]
    out["profiled_cpu_ms_per_vm"] = ms(total)
    out["project_cumulative"] = [
        [name, ms(ct), ms(tt), round(nc / n, 1)]
        for ct, tt, nc, name in sorted(ours, reverse=True)[:30]
    ]
    out["self_top"] = [
        [name, ms(tt), round(nc / n, 1)]
        for _ct, tt, nc, name in sorted(rows, key=lambda r: r[1], reverse=True)[:20]
    ]
    out["columns"] = (
        "per VM (auth + request + job); profiled figures are CPU time under cProfile, inflated"
        " by its overhead: project_cumulative [function, cumulative ms, self ms, calls],"
        " self_top [function, self ms, calls]"
    )
    return out


# --- main ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument(
        "--clients", type=int, default=24, help="keep-alive connections (one thread each)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=RATE,
        help="POSTs per second offered, open loop (0: closed loop, each connection sending"
        " as soon as it has its answer)",
    )
    parser.add_argument(
        "--capacity",
        type=int,
        default=None,
        help="POSTs of a second, closed-loop run after the first (the saturated throughput);"
        " default: --count when --rate is set, 0: none",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=AGENCIES * SYSTEMS * 2,
        help="POSTs sent one at a time before the measured run (see warm_up); 0: none",
    )
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    # shared: the simulator's state lives in the server process only (the bench syncs before the
    # server starts; ids derive from the options, so both see the same hosts and catalog). file:
    # shared through a file, which the simulator rewrites whole after every change (O(n) each)
    parser.add_argument("--sim-state", choices=("shared", "file"), default="shared")
    parser.add_argument("--job-workers", type=int, default=None, help="default: the settings'")
    parser.add_argument("--profile", type=int, default=0, help="profile N requests in-process")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (server log)")
    args = parser.parse_args()
    if args.capacity is None:
        args.capacity = args.count if args.rate > 0 else 0
    # keys of this run only: the bench must not write key files into the working tree
    from cryptography.fernet import Fernet

    os.environ["GOVBROKER_FERNET_KEY"] = Fernet.generate_key().decode()
    os.environ["GOVBROKER_SECRET_KEY"] = uuid.uuid4().hex * 2
    os.environ.setdefault("GOVBROKER_LOG_LEVEL", "WARNING")
    import structlog

    from broker.core.logging import configure_logging

    configure_logging()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout: JSON

    import psycopg
    import sqlalchemy

    from broker import migrations
    from broker.core.db import Database
    from broker.core.settings import get_settings

    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="gb-provision-"))
    os.environ["GOVBROKER_VAR_DIR"] = str(work / "var")
    get_settings.cache_clear()
    dbname = None
    if args.backend == "sqlite":
        url = f"sqlite:///{work / 'bench.db'}"
    else:
        dbname = f"gb_bench_prov_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{dbname}"')
        url = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        url = f"{url}/{dbname}"
    db: Database | None = None
    proc: subprocess.Popen[bytes] | None = None
    try:
        migrations.upgrade(url)
        db = Database(url)
        if args.backend == "sqlite":
            backend_version = f"sqlite {sqlite_version()}"
        else:
            with db.engine.connect() as conn:
                backend_version = (
                    f"postgresql {conn.exec_driver_sql('SHOW server_version').scalar()}"
                )

        sim_file = work / "simulator.json"
        sim_state = f"file:{sim_file}" if args.sim_state == "file" else "shared:bench"
        seeded = seed(
            db, args.count + args.capacity + args.warmup + 2 * args.profile + 20, sim_state
        )  # room for the capacity run's, the warm-up's and the profile's too
        log(f"estate, provider and catalog ready ({args.backend}, simulator {sim_state})")

        base_state = f"file:{work / 'baseline.json'}" if args.sim_state == "file" else "shared:base"
        base_s = run_baseline(args.count, base_state)
        log(f"baseline: {args.count} creates in {base_s:.2f} s ({args.sim_state} state)")

        port = free_port()
        env = {
            **os.environ,
            "GOVBROKER_DATABASE_URL": url,
            "GOVBROKER_EMBEDDED_SCHEDULER": "false",
        }
        if args.job_workers:
            env["GOVBROKER_JOB_WORKERS"] = str(args.job_workers)
        proc = start_server(env, port, work / "server.log")
        job_workers = args.job_workers or get_settings().job_workers
        load = f"at {args.rate:g}/s" if args.rate > 0 else "closed loop"
        log(
            f"server pid {proc.pid} on 127.0.0.1:{port}; {args.count} POSTs {load}"
            f" over {args.clients} connections"
        )
        warmed, warm_errors = warm_up(port, seeded["systems"], args.warmup)
        wait_for_jobs(db, warmed)  # the warm-up's jobs end before the measured run
        cpu_before, bench_cpu_before = cpu_s_of(proc.pid), time.process_time()
        fired = fire(port, seeded["systems"], args.count, args.clients, args.rate)
        fired["errors"] = warm_errors + fired["errors"]
        accepted = fired["statuses"].get("202", 0) + warmed
        total = args.count + args.warmup
        log(f"POSTs done in {fired['posts_s']:.2f} s: {fired['statuses']}; waiting for the jobs")
        states = wait_for_jobs(db, accepted)
        server_cpu = cpu_s_of(proc.pid) - cpu_before
        bench_cpu = time.process_time() - bench_cpu_before  # the clients (and the polling)
        last = last_finished(db)
        measured_ok = states.get("succeeded") == total and not fired["errors"]
        capacity = None
        if args.capacity:
            log(f"capacity: {args.capacity} POSTs, closed loop over {args.clients} connections")
            cpu_before = cpu_s_of(proc.pid)
            cap = fire(port, seeded["systems"], args.capacity, args.clients, 0, prefix="cap")
            accepted += cap["statuses"].get("202", 0)
            total += args.capacity
            cap_states = wait_for_jobs(db, accepted)
            cap_cpu = cpu_s_of(proc.pid) - cpu_before
            cap_last = last_finished(db)
            cap_ok = cap_states.get("succeeded") == total and not cap["errors"]
            cap_s = (cap_last - cap["first_post"]).total_seconds() if cap_last else float("nan")
            capacity = {
                "count": args.capacity,
                "load": f"closed loop over {args.clients} connections",
                "vms_per_s": round(args.capacity / cap_s, 1) if cap_ok else 0.0,
                "end_to_end_s": round(cap_s, 3),
                "post_latency_ms": {  # the queue the connections make, see fire
                    "p50": round(percentile(cap["latencies"], 50) * 1000, 1),
                    "p99": round(percentile(cap["latencies"], 99) * 1000, 1),
                },
                "server_cpu_ms_per_vm": round(cap_cpu / args.capacity * 1000, 1),
                "statuses": cap["statuses"],
            }
            fired["errors"] += cap["errors"]
            states = cap_states
        listed = api_succeeded(port, seeded["tokens"])
        server_rss = rss_mb_of(proc.pid)  # before the sync below, which reads every server
        synced = api_sync(port, seeded["provider_id"], seeded["admin_token"])
        stop_server(proc)
        proc = None
        sim_tags = None
        if args.sim_state == "file":
            state = json.loads(sim_file.read_text("utf-8"))
            sim_tags = {s["request_tag"] for s in state["servers"] if s.get("request_tag")}
        checked = verify(db, seeded["provider_id"], total, sim_tags, synced)
        checked["checks"]["api_listed_succeeded"] = listed
        checked["ok"] = checked["ok"] and listed == total
        log(f"verification: {checked}")
        elapsed = (last - fired["first_post"]).total_seconds() if last else float("nan")
        lat = fired["latencies"]
        vms_per_s = args.count / elapsed if last and measured_ok else 0.0
        base_per_s = args.count / base_s
        profile = None
        if args.profile:
            log(f"profiling {args.profile} requests and jobs in-process")
            profile = profile_in_process(db, seeded, sim_state, args.profile)
    finally:
        if proc is not None:
            stop_server(proc)
        if db is not None:
            db.dispose()
        if dbname is not None:
            with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            log(f"database {dbname} dropped")
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    errors = len(fired["errors"]) + sum(n for st, n in states.items() if st != "succeeded")
    post_p99_ms = percentile(lat, 99) * 1000
    met = (
        vms_per_s >= TARGETS["min_vms_per_s"]
        and (capacity is None or capacity["vms_per_s"] >= TARGETS["min_vms_per_s"])
        and post_p99_ms < TARGETS["max_post_p99_ms"]
        and errors == 0
        and checked["ok"]
    )
    result: dict[str, Any] = {
        "bench": "provision",
        "backend": args.backend,
        "count": args.count,
        "warmup_posts": args.warmup,
        "clients": args.clients,
        "load": f"open loop at {args.rate:g} POST/s" if args.rate > 0 else "closed loop",
        "offered_posts_per_s": args.rate if args.rate > 0 else None,
        "job_workers": job_workers,
        "vms_per_s": round(vms_per_s, 1),
        "end_to_end_s": round(elapsed, 3),
        "posts_s": round(fired["posts_s"], 3),
        "posts_per_s": round(len(lat) / fired["posts_s"], 1),
        "post_latency_ms": {
            "p50": round(percentile(lat, 50) * 1000, 1),
            "p90": round(percentile(lat, 90) * 1000, 1),
            "p99": round(post_p99_ms, 1),
            "max": round(max(lat, default=float("nan")) * 1000, 1),
        },
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_ms_per_vm": round(server_cpu / args.count * 1000, 1),
        "client_cpu_s": round(bench_cpu, 2),
        "capacity": capacity,
        "baseline_vms_per_s": round(base_per_s, 1),
        "baseline_s": round(base_s, 3),
        "ratio": round(vms_per_s / base_per_s, 4),
        "capacity_ratio": round(capacity["vms_per_s"] / base_per_s, 4) if capacity else None,
        "statuses": fired["statuses"],
        "job_states": states,
        "errors": errors,
        "error_samples": fired["errors"][:5],
        "job_errors": checked["job_errors"],
        "verified": checked["ok"],
        "verification": checked["checks"],
        "targets": TARGETS,
        "targets_met": bool(met),
        "peak_rss_mb": {
            "server": server_rss,
            "bench": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        },
        "config": {
            "agencies": AGENCIES,
            "systems_per_agency": SYSTEMS,
            "request": f"{FLAVOR} ({IMAGE}), systems round-robin, one token per agency member",
            "simulator": f"latency 0, {args.sim_state} state, {HOSTS} hosts",
            "server": "govbroker serve (uvicorn, 1 process), embedded scheduler off",
            "baseline": "SimulatorDriver.create_server in-process, sequential, same state kind",
            "vms_per_s": "count / (last job finished_at - first POST sent)",
        },
        "machine": {
            "cpus": os.cpu_count(),
            # the machine is shared: other work running alongside lowers every figure
            "loadavg_at_start": [round(x, 2) for x in load_start],
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "backend": backend_version,
            "sqlalchemy": sqlalchemy.__version__,
        },
    }
    if profile is not None:
        # what the server spends per VM beyond auth and the service functions: uvicorn, FastAPI,
        # validation, serialization, thread hand-offs
        profile["server_cpu_ms_per_vm_outside_services"] = round(
            server_cpu / args.count * 1000
            - sum(profile[k]["cpu_ms"] for k in ("auth", "request", "job")),
            1,
        )
        result["profile"] = profile
    print(json.dumps(result, ensure_ascii=False, separators=(", ", ": ")))
    return 0


def sqlite_version() -> str:
    import sqlite3

    return sqlite3.sqlite_version


if __name__ == "__main__":
    sys.exit(main())
