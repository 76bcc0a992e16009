"""APScheduler 3 wiring: the periodic jobs of registry.py, run by whichever scheduler leads.

Two ways to host them: `start_background(db)` inside `serve` (the embedded deployment) and
`run_until_stopped(db, leadership)` for the `govbroker scheduler` process. Both elect a leader on
the database (leader.py), so any mix of serve replicas and scheduler processes runs each tick of
a job once. Every scheduler keeps all jobs scheduled; a follower's ticks only try to take over.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from types import FrameType

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from broker.core.db import Database, SessionSource
from broker.core.settings import get_settings
from broker.jobs.leader import Leadership, leadership_for
from broker.jobs.registry import JOBS, run_job

log = structlog.get_logger(__name__)

HEARTBEAT_JOB = "leadership-heartbeat"


def heartbeat_seconds(lease_seconds: int) -> int:
    """How often a scheduler confirms or tries to take leadership: three times per lease, so a
    leader survives two missed heartbeats (SQLite) and a follower takes over within a third of
    a lease of the leader's lock going (PostgreSQL)."""
    return max(1, lease_seconds // 3)


def _tick(db: SessionSource, leadership: Leadership, name: str) -> None:
    try:
        # asked again right before the run, not taken from the last heartbeat: a leader whose
        # connection died since then must not run the job its successor is about to run
        if not leadership.acquire():
            return
        run_job(db, name)
    except Exception:  # a failed run is logged and retried at the next tick
        log.exception("job failed", job=name)


def _heartbeat(leadership: Leadership) -> None:
    leadership.acquire()


class LeaderScheduler(BackgroundScheduler):
    """A BackgroundScheduler whose jobs run only while `leadership` is held, and which gives
    leadership up when shut down, so a follower takes over without waiting for a lease."""

    def __init__(self, db: SessionSource, leadership: Leadership, lease_seconds: int) -> None:
        super().__init__(timezone="UTC")
        # the executor narrates every run at INFO, and the heartbeat runs every few seconds;
        # job outcomes are logged by run_job and _tick, failures of the executor still show
        logging.getLogger("apscheduler.executors.default").setLevel(logging.WARNING)
        self.leadership = leadership
        for job in JOBS.values():
            self.add_job(
                _tick,
                "interval",
                seconds=job.every_seconds,
                args=(db, leadership, job.name),
                id=job.name,
                max_instances=1,
                coalesce=True,
                # soon after start rather than one whole interval later: an hourly job (metering)
                # must catch up on the downtime before it
                next_run_time=datetime.now(UTC) + timedelta(seconds=min(job.every_seconds, 30)),
            )
        self.add_job(
            _heartbeat,
            "interval",
            seconds=heartbeat_seconds(lease_seconds),
            args=(leadership,),
            id=HEARTBEAT_JOB,
            max_instances=1,
            coalesce=True,
            # a late heartbeat still counts; skipping it could let a SQLite lease lapse
            misfire_grace_time=None,
            next_run_time=datetime.now(UTC),
        )

    def shutdown(self, wait: bool = True) -> None:
        # with wait=False a job may still be finishing while a successor starts: harmless,
        # since every job is safe to run twice, and `serve` must not hang on shutdown
        try:
            super().shutdown(wait)
        finally:
            self.leadership.release()


def start_background(
    db: Database, leadership: Leadership | None = None, *, lease_seconds: int | None = None
) -> LeaderScheduler:
    """Run the jobs in this process's background threads (for `serve`), while it leads."""
    leadership = leadership or leadership_for(db.engine, lease_seconds=lease_seconds)
    scheduler = LeaderScheduler(db, leadership, _lease_seconds(lease_seconds))
    scheduler.start()
    return scheduler


def run_until_stopped(
    db: SessionSource,
    leadership: Leadership,
    *,
    lease_seconds: int | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run the jobs, while this process leads, until SIGTERM or SIGINT (or `stop` is set).
    Jobs running at that moment finish, then leadership is released."""
    stop = stop or threading.Event()
    scheduler = LeaderScheduler(db, leadership, _lease_seconds(lease_seconds))
    with _stopping_on_signals(stop):
        scheduler.start()
        try:
            stop.wait()
        finally:
            # wait=True: releasing leadership while a job still runs would let a successor
            # start the same job alongside it
            scheduler.shutdown(wait=True)
    log.info("scheduler stopped", holder=leadership.holder)


def run_once(db: SessionSource, leadership: Leadership) -> dict[str, int] | None:
    """Run every job once if this process can lead, then step down. None when another leads."""
    if not leadership.acquire():
        return None
    try:
        return {name: run_job(db, name) for name in JOBS}
    finally:
        leadership.release()


def _lease_seconds(given: int | None) -> int:
    return given if given is not None else get_settings().scheduler_lease_seconds


@contextmanager
def _stopping_on_signals(stop: threading.Event) -> Iterator[None]:
    """Set `stop` on SIGTERM or SIGINT. The first signal puts the previous handlers back, so a
    second one ends the process at once instead of waiting for running jobs."""
    if threading.current_thread() is not threading.main_thread():
        # only the main thread may install handlers; whoever runs us elsewhere sets `stop`
        yield
        return
    wanted = (signal.SIGTERM, signal.SIGINT)
    previous = {signum: signal.getsignal(signum) for signum in wanted}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("scheduler stopping", signal=signal.Signals(signum).name)
        restore()
        stop.set()

    for signum in wanted:
        signal.signal(signum, on_signal)
    try:
        yield
    finally:
        restore()
