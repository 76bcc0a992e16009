"""APScheduler 3 wiring for the embedded deployment: `serve` runs the jobs in-process."""

from __future__ import annotations

from typing import Any

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from broker.jobs.registry import JOBS, run_job

log = structlog.get_logger(__name__)


def _safe(db: Any, name: str) -> None:
    try:
        run_job(db, name)
    except Exception:  # a failed run is logged and retried at the next tick
        log.exception("job failed", job=name)


def start_background(db: Any) -> BackgroundScheduler:
    scheduler = BackgroundScheduler(timezone="UTC")
    for job in JOBS.values():
        scheduler.add_job(
            _safe,
            "interval",
            seconds=job.every_seconds,
            args=(db, job.name),
            id=job.name,
            max_instances=1,
            coalesce=True,
        )
    scheduler.start()
    return scheduler
