"""One scheduler leads the periodic jobs: contenders on real threads, background schedulers as
`serve` runs them, and real `govbroker scheduler` processes killed by PID, on SQLite (the lease
row) and PostgreSQL (the advisory lock)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import time_machine
from sqlalchemy import Engine, text
from typer.testing import CliRunner

from broker.cli import app
from broker.core import clock
from broker.core.db import Database, SessionSource
from broker.core.settings import get_settings
from broker.jobs import registry
from broker.jobs import scheduler as jobs_scheduler
from broker.jobs.leader import Leadership, advisory_key, leadership_for

LEASE = 3  # seconds: the shortest the settings allow, so a lapsed lease is quick to wait out
GOVBROKER = Path(sys.executable).parent / "govbroker"
STATUS = re.compile(r"^scheduler (\S+): (leading|not leading)$", re.MULTILINE)

T = TypeVar("T")


def eventually(condition: Callable[[], T], what: str, within: float = 30.0) -> T:
    """Poll until `condition` answers something truthy; the deadline only guards against a hang."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def elect(committed_db: Database) -> Iterator[Callable[..., Leadership]]:
    """Makes contenders on the test's database, each released afterwards."""
    made: list[Leadership] = []

    def make(**kwargs: Any) -> Leadership:
        leadership = leadership_for(committed_db.engine, lease_seconds=LEASE, **kwargs)
        made.append(leadership)
        return leadership

    yield make
    for leadership in made:
        leadership.release()


def _advisory_lock_pid(engine: Engine, key: int) -> int | None:
    """The backend holding the advisory lock `key` in this database (pg_locks splits the bigint
    key into two unsigned 32-bit halves)."""
    with engine.connect() as connection:
        return connection.execute(
            text(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND classid::bigint = :hi AND objid::bigint = :lo AND objsubid = 1"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF},
        ).scalar_one_or_none()


def test_exactly_one_of_concurrent_contenders_leads(elect):
    contenders = [elect() for _ in range(6)]
    start = threading.Barrier(len(contenders))
    results: dict[int, bool] = {}

    def contend(i: int) -> None:
        start.wait()
        results[i] = contenders[i].acquire()

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(contenders))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    leaders = [i for i, leading in results.items() if leading]
    assert len(leaders) == 1
    assert [c.is_leader for c in contenders].count(True) == 1
    # asking again changes nothing: the leader keeps it, the others still cannot have it
    assert [c.acquire() for c in contenders] == [i in leaders for i in range(len(contenders))]


def test_released_leadership_passes_to_a_follower(elect):
    first_changes: list[bool] = []
    first = elect(on_change=first_changes.append)
    second = elect()
    assert first.acquire()
    assert not second.acquire()

    first.release()

    assert not first.is_leader
    assert second.acquire()
    assert not first.acquire()
    assert first_changes == [True, False]


def test_a_renewing_leader_keeps_leadership_past_its_lease(elect):
    leader, follower = elect(), elect()
    with time_machine.travel(clock.now(), tick=False) as traveller:
        assert leader.acquire()
        for _ in range(4):
            # two thirds of a lease between renewals, four times: well past one lease in all
            traveller.shift(LEASE * 2 / 3)
            assert leader.acquire()
            assert not follower.acquire()


def test_a_leader_that_vanishes_without_releasing_is_replaced(committed_db, elect):
    changes: list[bool] = []
    leader, follower = elect(on_change=changes.append), elect()
    with time_machine.travel(clock.now(), tick=False) as traveller:
        assert leader.acquire()
        traveller.shift(LEASE - 1)
        assert not follower.acquire()

        if committed_db.engine.dialect.name == "sqlite":
            # the leader stops renewing: its lease lapses
            traveller.shift(2)
        else:
            # a lock does not lapse with time, only with the session that holds it
            traveller.shift(LEASE * 10)
            assert not follower.acquire()
            pid = _advisory_lock_pid(committed_db.engine, advisory_key(leader.name))
            assert pid is not None
            with committed_db.engine.connect() as admin:
                assert admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()

        # a terminated backend lets go of its locks as it exits, a moment after the signal
        eventually(follower.acquire, "the follower to take over")
        # the old leader finds out at its next tick and does not take it back
        assert not leader.acquire()
        assert changes == [True, False]


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_leader_whose_connection_dies_is_replaced_and_reconnects_as_follower(
    backend, committed_db, elect
):
    # PostgreSQL only: SQLite leadership holds no connection; its analogue is the lapsed lease
    leader, follower = elect(), elect()
    assert leader.acquire()
    pid = _advisory_lock_pid(committed_db.engine, advisory_key(leader.name))
    with committed_db.engine.connect() as admin:
        admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    eventually(follower.acquire, "the follower to take over")

    assert not leader.acquire()
    # the old leader has reconnected and waits its turn: it leads once the new leader goes
    follower.release()
    assert leader.acquire()
    assert _advisory_lock_pid(committed_db.engine, advisory_key(leader.name)) not in (pid, None)


def test_background_schedulers_run_a_job_on_the_leader_only(committed_db, monkeypatch):
    runs: list[int] = []
    replicas = [Database(committed_db.url), Database(committed_db.url)]

    def probe(db: SessionSource) -> int:
        runs.append(next(i for i, replica in enumerate(replicas) if replica is db))
        return 0

    # the probe alone, every second, so the test sees several ticks without waiting for real jobs
    only_probe = {"probe": registry.Job("probe", probe, 1, "records which replica ran it")}
    monkeypatch.setattr(registry, "JOBS", only_probe)
    monkeypatch.setattr(jobs_scheduler, "JOBS", only_probe)

    schedulers = []
    try:
        for replica in replicas:
            schedulers.append(jobs_scheduler.start_background(replica, lease_seconds=LEASE))
        eventually(lambda: len(runs) >= 3, "three runs of the probe")
        assert len(set(runs)) == 1
        leader = runs[0]

        schedulers[leader].shutdown(wait=True)
        ran_before = len(runs)
        eventually(lambda: 1 - leader in runs, "the other replica to run the probe")
        assert set(runs[ran_before:]) == {1 - leader}
    finally:
        for running in schedulers:
            if running.running:
                running.shutdown(wait=True)
        for replica in replicas:
            replica.dispose()


@pytest.fixture
def cli_database(committed_db, monkeypatch, tmp_path) -> Iterator[Database]:
    monkeypatch.setenv("GOVBROKER_DATABASE_URL", committed_db.url)
    monkeypatch.setenv("GOVBROKER_VAR_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    yield committed_db
    get_settings.cache_clear()


def test_scheduler_once_runs_the_jobs_only_when_no_other_scheduler_leads(cli_database, elect):
    other = elect()
    assert other.acquire()
    runner = CliRunner()

    following = runner.invoke(app, ["scheduler", "--once"])
    assert following.exit_code == 0, following.output
    assert STATUS.findall(following.output)[-1][1] == "not leading"
    assert "processed" not in following.output

    other.release()
    leading = runner.invoke(app, ["scheduler", "--once"])
    assert leading.exit_code == 0, leading.output
    assert STATUS.findall(leading.output)[0][1] == "leading"
    assert "reservation-sweep: 0 processed" in leading.output
    # it stepped down when done, so the other scheduler leads again at once
    assert other.acquire()


class SchedulerProcess:
    """A `govbroker scheduler` subprocess whose output goes to a file we can poll."""

    def __init__(self, log: Path, env: dict[str, str]) -> None:
        self.log = log
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                [str(GOVBROKER), "scheduler"], stdout=out, stderr=subprocess.STDOUT, env=env
            )

    @property
    def output(self) -> str:
        return self.log.read_text()

    @property
    def status(self) -> str | None:
        """What it said last about leading: 'leading', 'not leading', or None before a word."""
        said = STATUS.findall(self.output)
        return said[-1][1] if said else None

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=30)


@contextmanager
def scheduler_processes(
    db: Database, tmp_path: Path, count: int, lease_seconds: int
) -> Iterator[list[SchedulerProcess]]:
    env = {
        **os.environ,
        "GOVBROKER_DATABASE_URL": db.url,
        "GOVBROKER_VAR_DIR": str(tmp_path / "var"),
        "GOVBROKER_SCHEDULER_LEASE_SECONDS": str(lease_seconds),
        "GOVBROKER_LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    processes: list[SchedulerProcess] = []
    try:
        for i in range(count):
            processes.append(SchedulerProcess(tmp_path / f"scheduler-{i}.log", env))
        yield processes
    finally:
        for process in processes:
            process.kill()


def test_two_scheduler_processes_elect_one_leader_and_fail_over_when_it_is_killed(
    committed_db, tmp_path
):
    with scheduler_processes(committed_db, tmp_path, 2, LEASE) as processes:
        eventually(
            lambda: all(p.status for p in processes), "both schedulers to say whether they lead"
        )
        leaders = [p for p in processes if p.status == "leading"]
        assert len(leaders) == 1, [p.output for p in processes]
        (leader,) = leaders
        (follower,) = [p for p in processes if p is not leader]

        os.kill(leader.popen.pid, signal.SIGKILL)
        leader.popen.wait(timeout=30)

        # PostgreSQL frees the lock with the dead session; SQLite waits for the lease to lapse
        eventually(lambda: follower.status == "leading", "the follower to take over")
        assert follower.popen.poll() is None


def test_a_scheduler_stopped_with_sigterm_hands_leadership_over_at_once(
    committed_db, tmp_path, elect
):
    # a lease far longer than the test: the successor can only win because it was released
    with scheduler_processes(committed_db, tmp_path, 1, 600) as (process,):
        eventually(lambda: process.status == "leading", "the scheduler to lead")
        successor = elect()
        assert not successor.acquire()

        process.popen.send_signal(signal.SIGTERM)

        assert process.popen.wait(timeout=30) == 0, process.output
        assert "stopped" in process.output
        assert successor.acquire()
