"""The periodic jobs and how often they run. Each job is one unit of work, safe to run twice and
safe to run on several replicas at once (leader election arrives with the scheduler process)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from sqlmodel import Session

from quotas import ledger
from quotas import service as quotas

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Job:
    name: str
    run: Callable[[Session], int]
    every_seconds: int
    description: str


JOBS: dict[str, Job] = {
    job.name: job
    for job in (
        Job(
            "reservation-sweep",
            ledger.sweep_expired,
            60,
            "release quota reservations past their expiry",
        ),
        Job(
            "quota-expiry-notices",
            quotas.emit_expiry_notices,
            3600,
            "record notices 7 days and 1 day before a quota expires",
        ),
    )
}


def run_job(db: Any, name: str) -> int:
    """Run one job in its own unit of work; returns what it processed."""
    job = JOBS[name]
    with db.unit_of_work() as session:
        done = job.run(session)
    log.info("job finished", job=name, processed=done)
    return done
