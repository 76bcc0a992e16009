"""The metering job killed (SIGKILL) at random points and run again bills exactly what one
uninterrupted run bills, on SQLite and on PostgreSQL.

Two databases get the same estate, prices, contracts, 240 servers and their lifecycle events.
In one, the real entry point (`billing.metering.run(Database(url), until=..., batch=...)`) runs in
a subprocess to the end: the reference. In the other, the same subprocess is killed after a
random delay (seeded) several times, then run to the end. Rated seconds per server, class, month
and side of the contract, and every statement, must be the same in both.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func
from sqlmodel import col
from sqlmodel import select as sql_select

from billing import statements
from billing.models import (
    Contract,
    LifecycleEvent,
    LifecycleKind,
    Statement,
    UsageInterval,
)
from broker import migrations
from broker.core.db import Database
from broker.inventory.models import Server
from tests.fixtures.auth import build_estate
from tests.fixtures.billing import SYSTEM, BillingWorld, local, make_world
from tests.fixtures.db import fresh_database

ROOT = Path(__file__).resolve().parents[2]
UNTIL = local(2026, 11, 1)  # rate everything up to the end of October (Shanghai)
SERVERS = 240
BATCH = 15
KILLS = 5

RUNNER = """
import sys, time
from datetime import datetime
from billing import metering
from broker.core.db import Database
from broker.migrations import all_metadata

all_metadata()  # every table mapped, as in the scheduler process

url, until, batch = sys.argv[1], datetime.fromisoformat(sys.argv[2]), int(sys.argv[3])
db = Database(url)
with db.engine.connect():
    pass
print("ready", flush=True)
started = time.monotonic()
metering.run(db, until=until, batch=batch)
print(f"done {time.monotonic() - started:.3f}", flush=True)
"""


@dataclass(frozen=True)
class PlannedEvent:
    server: str
    kind: LifecycleKind
    at: datetime
    sizes: dict[str, int]
    power: str


@dataclass(frozen=True)
class Plan:
    tenants: dict[str, str | None]  # server → system code (None: unmanaged)
    events: list[PlannedEvent]


def make_plan(rng: random.Random) -> Plan:
    """240 servers of agencies a and b (and some nobody owns), each created between 25 Sep and
    25 Oct and then resized, stopped, started or deleted two to four times, to the second."""
    tenants: dict[str, str | None] = {}
    events: list[PlannedEvent] = []
    start = local(2026, 9, 25)
    for i in range(SERVERS):
        name = f"crash-{i:03d}"
        tenants[name] = rng.choice(["a1", "a2", "b1", "b1", None])
        at = start + timedelta(seconds=rng.randrange(30 * 86400))

        def sizes() -> dict[str, int]:
            return {
                "vcpu": rng.randint(1, 16),
                "memory_mb": rng.choice([1024, 1536, 2048, 4096, 8192]),
                "storage_gb.ssd": rng.randint(20, 400),
                "public_ip": rng.randint(0, 1),
                "instances": 1,
            }

        current, power = sizes(), "running"
        events.append(PlannedEvent(name, LifecycleKind.created, at, current, power))
        for _ in range(rng.randint(2, 4)):
            at += timedelta(seconds=rng.randrange(3600, 6 * 86400))
            kind = rng.choice(
                [LifecycleKind.resized, LifecycleKind.stopped, LifecycleKind.started]
                + [LifecycleKind.deleted] * (1 if rng.random() < 0.3 else 0)
            )
            if kind == LifecycleKind.deleted:
                events.append(PlannedEvent(name, kind, at, {}, power))
                break
            if kind == LifecycleKind.resized:
                current = sizes()
            power = {"stopped": "stopped", "started": "running"}.get(kind.value, power)
            events.append(PlannedEvent(name, kind, at, current, power))
    return Plan(tenants, events)


def seed(db: Database, plan: Plan) -> BillingWorld:
    """The estate, one service company with two price-list versions (the second from 15 Oct),
    a contract per agency (a's from 10 Oct), the servers and their events."""
    with db.unit_of_work() as s:
        estate = build_estate(s)
    w = make_world(db, estate)
    w.catalog(
        date(2026, 9, 1),
        {"vcpu": "10", "memory_mb": "5", "storage_gb.ssd": "0.13", "public_ip": "2"},
    )
    w.catalog(
        date(2026, 10, 15),
        {"vcpu": "12", "memory_mb": "5.5", "storage_gb.ssd": "0.1", "public_ip": "2.5"},
        caps={"vcpu": 40_000},
    )
    contracts = {
        "a": w.contract(
            "HT-CRASH-A", agency="a", starts_on=date(2026, 10, 10), ends_on=date(2026, 12, 31)
        ),
        "b": w.contract(
            "HT-CRASH-B",
            agency="b",
            starts_on=date(2026, 9, 1),
            ends_on=date(2026, 12, 31),
            discount_pct="5",
        ),
    }
    with db.unit_of_work() as s:
        for name in plan.tenants:
            tenant = plan.tenants[name]
            row = Server(
                provider_id=w.provider_id,
                external_id=f"ext-{name}",
                name=name,
                vcpu=1,
                memory_mb=1024,
                power_state="running",
                tenant_id=estate.tid(tenant) if tenant else None,
            )
            s.add(row)
            s.flush()
            w.servers[name] = row.id
        for e in plan.events:
            tenant = plan.tenants[e.server]
            agency = tenant[0] if tenant else None
            s.add(
                LifecycleEvent(
                    server_id=w.servers[e.server],
                    tenant_id=estate.tid(tenant) if tenant else None,
                    agency_id=estate.tid(agency) if agency else None,
                    provider_id=w.provider_id,
                    service_company_id=w.company_id,
                    contract_id=contracts[agency].id if agency else None,
                    kind=e.kind.value,
                    power_state=e.power,
                    sizes=e.sizes,
                    actor="test",
                    at=e.at,
                )
            )
    return w


@contextmanager
def seeded_database(backend: str, tmp: Path, plan: Plan) -> Iterator[tuple[Database, BillingWorld]]:
    with fresh_database(backend, tmp) as url:
        migrations.upgrade(url)
        db = Database(url)
        try:
            yield db, seed(db, plan)
        finally:
            db.dispose()


class Runner:
    """Starts the metering entry point in subprocesses and always reaps them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, db: Database) -> subprocess.Popen[str]:
        env = dict(os.environ)
        env["GOVBROKER_DATABASE_URL"] = db.url
        err = (self.tmp / f"meter-{len(self.procs)}.err").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, db.url, UNTIL.isoformat(), str(BATCH)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        err.close()
        self.procs.append(proc)
        self.expect(proc, "ready", timeout=60)
        return proc

    def expect(self, proc: subprocess.Popen[str], word: str, *, timeout: float) -> str:
        """The first stdout line starting with `word` (other output, e.g. logs, is skipped)."""
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"metering subprocess did not say {word!r} in time")
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if not ready:
                continue
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"metering subprocess ended before {word!r}: {self.errors()}")
            if line.startswith(word):
                return line

    def run_to_end(self, db: Database) -> float:
        proc = self.start(db)
        seconds = float(self.expect(proc, "done", timeout=600).split()[1])
        assert proc.wait(timeout=60) == 0, self.errors()
        return seconds

    def errors(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(self.tmp.glob("meter-*.err")))

    def reap(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            if proc.stdout is not None:
                proc.stdout.close()


def progress(db: Database) -> tuple[int, int, int, int]:
    """(events metered, events, intervals rated to their end, intervals)."""
    with db.unit_of_work(write=False) as s:
        metered, total = s.execute(
            sql_select(func.count(col(LifecycleEvent.metered_at)), func.count())
        ).one()
        intervals = s.execute(sql_select(UsageInterval.rated_until, UsageInterval.ended_at)).all()
    done = sum(
        1
        for rated_until, ended_at in intervals
        if rated_until >= (UNTIL if ended_at is None else min(UNTIL, ended_at))
    )
    return int(metered), int(total), done, len(intervals)


def statement_totals(w: BillingWorld) -> dict[tuple[str, str], Any]:
    """Every statement of September and October by contract number (totals and lines), and
    October's unassigned usage."""
    made: dict[tuple[str, str], Statement] = {}
    with w.db.unit_of_work() as s:
        numbers = {c.id: c.number for c in s.execute(sql_select(Contract)).scalars()}
        for month in ("2026-09", "2026-10"):
            for st in statements.generate(s, SYSTEM, month=month):
                made[(numbers[st.contract_id], month)] = st
        unassigned = statements.unassigned(s, SYSTEM, month="2026-10")
    out: dict[tuple[str, str], Any] = {
        key: (
            st.subtotal_amount,
            st.discount_amount,
            st.total_amount,
            st.line_count,
            w.line_rows(st),
        )
        for key, st in made.items()
    }
    out[("unassigned", "2026-10")] = sorted(
        (r["server_name"], r["resource_class"], r["quantity"], r["seconds"], r["amount"])
        for r in unassigned
    )
    return out


@pytest.mark.slow
def test_metering_killed_at_random_points_bills_what_one_uninterrupted_run_bills(
    backend: str, tmp_path: Path, clock
):
    rng = random.Random(f"govbroker-crash-{backend}")
    plan = make_plan(rng)
    runner = Runner(tmp_path)
    observed: list[tuple[float, tuple[int, int, int, int]]] = []
    try:
        with ExitStack() as stack:
            ref_db, ref = stack.enter_context(seeded_database(backend, tmp_path / "ref", plan))
            db, world = stack.enter_context(seeded_database(backend, tmp_path / "kill", plan))

            work = runner.run_to_end(ref_db)  # the reference: one uninterrupted run
            ref_progress = progress(ref_db)
            assert ref_progress[0] == ref_progress[1] and ref_progress[2] == ref_progress[3]

            for _ in range(KILLS):
                proc = runner.start(db)
                delay = rng.uniform(0.03, 0.3) * work
                time.sleep(delay)
                os.kill(proc.pid, signal.SIGKILL)
                assert proc.wait(timeout=30) in (-signal.SIGKILL, 0)
                observed.append((round(delay, 3), progress(db)))
            runner.run_to_end(db)
            final = progress(db)

            # some kill landed mid-run: part of the events metered, or all of them and part of
            # the intervals rated
            interrupted = [
                p for _, p in observed if 0 < p[0] < p[1] or (p[0] == p[1] and 0 < p[2] < p[3])
            ]
            assert interrupted, observed
            assert final == ref_progress, (final, ref_progress)

            expected = ref.rated()
            assert len(expected) > 1000
            assert world.rated() == expected

            clock.move_to(local(2026, 11, 2, 9))
            ref_statements = statement_totals(ref)
            assert ref_statements[("HT-CRASH-A", "2026-10")][2] > 0
            assert ref_statements[("HT-CRASH-B", "2026-09")][2] > 0
            assert statement_totals(world) == ref_statements
            print(f"{backend}: uninterrupted run {work:.2f} s; kills (delay, progress): {observed}")
    finally:
        runner.reap()
