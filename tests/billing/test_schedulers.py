"""Two schedulers on one database: one leads and meters; even two metering runs at once (a
leader cut off from the database finishing after its successor began) rate every second once."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from billing.models import LifecycleEvent, LifecycleKind, RatedUsage, UsageInterval
from broker.core.db import Database
from broker.inventory.models import Provider
from tests.fixtures.auth import build_estate
from tests.fixtures.billing import BillingWorld, local, make_world

GOVBROKER = Path(sys.executable).parent / "govbroker"
SIZES = {"vcpu": 2, "memory_mb": 4096, "storage_gb.ssd": 40, "public_ip": 1}


def _world(db: Database, servers: int) -> BillingWorld:
    with db.unit_of_work() as s:
        estate = build_estate(s)
    w = make_world(db, estate)
    with db.unit_of_work() as s:
        # the scheduler's sync job must leave this hand-made provider alone
        s.execute(update(Provider).where(Provider.id == w.provider_id).values(enabled=False))
    w.catalog(
        date(2026, 10, 1),
        {"vcpu": "10", "memory_mb": "5", "storage_gb.ssd": "0.1", "public_ip": "2"},
    )
    c = w.contract("HT-SCHED-1", starts_on=date(2026, 10, 1), ends_on=date(2027, 12, 31))
    rnd = random.Random(6)
    for i in range(servers):
        name = f"s-{i:03d}"
        w.server(name)
        t = local(2026, 10, 1, 0) + timedelta(minutes=rnd.randrange(0, 20 * 24 * 60))
        w.event(name, LifecycleKind.created, t, SIZES, contract=c)
        if i % 3 == 0:
            w.event(
                name,
                LifecycleKind.stopped,
                t + timedelta(hours=5),
                SIZES,
                power="stopped",
                contract=c,
            )
        if i % 4 == 0:
            w.event(name, LifecycleKind.deleted, t + timedelta(days=2, minutes=7), {}, contract=c)
    return w


def _env(db: Database) -> dict[str, str]:
    return {**os.environ, "GOVBROKER_DATABASE_URL": db.url, "GOVBROKER_LOG_LEVEL": "WARNING"}


def _assert_rated_exactly_once(db: Database) -> int:
    """Every interval's rated seconds add up to the time it has been rated over, once: all
    classes are priced, and powered-off compute is simply not rated (so it adds nothing)."""
    with db.unit_of_work(write=False) as s:
        assert (
            s.execute(select(func.count()).where(LifecycleEvent.metered_at.is_(None))).scalar_one()
            == 0
        )
        rated = dict(
            s.execute(
                select(RatedUsage.interval_id, func.sum(RatedUsage.seconds)).group_by(
                    RatedUsage.interval_id
                )
            ).all()
        )
        checked = 0
        for iv in s.execute(select(UsageInterval)).scalars():
            span = int((iv.rated_until - iv.started_at).total_seconds())
            if iv.resource_class in {"vcpu", "memory_mb"} and not iv.powered:
                assert rated.get(iv.id, 0) == 0
            else:
                assert rated.get(iv.id, 0) == span, iv
            checked += 1
    return checked


@pytest.mark.slow
def test_two_scheduler_processes_elect_one_leader_that_meters_once(committed_db, tmp_path):
    _world(committed_db, 40)
    env = _env(committed_db)
    procs = [
        subprocess.Popen(
            [str(GOVBROKER), "scheduler", "--once"],
            stdout=(tmp_path / f"s{i}.log").open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        for i in range(2)
    ]
    try:
        for p in procs:
            assert p.wait(timeout=300) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    said = [(tmp_path / f"s{i}.log").read_text() for i in range(2)]
    # the second either found the first leading (and ran nothing) or led after it stepped down
    # and found nothing left to meter: the work was done by one of them, once
    metered = [m for out in said for m in re.findall(r"^metering: (\d+) processed", out, re.M)]
    assert [n for n in metered if n != "0"] and len([n for n in metered if n != "0"]) == 1, said
    assert _assert_rated_exactly_once(committed_db) > 40


@pytest.mark.slow
def test_two_metering_runs_at_once_never_rate_a_second_twice(committed_db):
    _world(committed_db, 60)
    code = (
        # every domain's tables, as the scheduler process has them (foreign keys cross domains)
        "from broker.migrations import all_metadata; all_metadata(); "
        "from broker.core.db import Database; from billing import metering; import os; "
        "metering.run(Database(os.environ['GOVBROKER_DATABASE_URL']), batch=7)"
    )
    env = _env(committed_db)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(2)]
    try:
        for p in procs:
            assert p.wait(timeout=300) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert _assert_rated_exactly_once(committed_db) > 60
