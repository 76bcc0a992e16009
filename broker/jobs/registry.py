"""The periodic jobs and how often they run. Only the elected leader runs them (broker/jobs/leader),
yet each job stays safe to run twice: a leader cut off from the database may finish a run after
its successor has started one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog
from sqlmodel import Session

from billing import metering, statements
from broker.core.db import SessionSource
from broker.inventory import sync
from broker.provisioning import executor
from broker.provisioning import service as provisioning
from quotas import ledger
from quotas import service as quotas

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Job:
    name: str
    run: Callable[[SessionSource], int]
    every_seconds: int
    description: str


def in_one_unit_of_work(fn: Callable[[Session], int]) -> Callable[[SessionSource], int]:
    def run(db: SessionSource) -> int:
        with db.unit_of_work() as session:
            return fn(session)

    return run


def sync_due_providers(db: SessionSource) -> int:
    """Sync each enabled provider whose interval has passed; each in its own units of work,
    because reading a provider must not hold a transaction open."""
    return len(sync.sync_all(db, trigger="schedule", only_due=True))


def meter_usage(db: SessionSource) -> int:
    """Turn lifecycle events into usage intervals and rate elapsed time up to the last hour;
    after downtime the same pass catches up on every hour missed."""
    return metering.run(db).total()


def reconcile_jobs(db: SessionSource) -> int:
    """Resolve provisioning jobs a crash or a lost provider left behind."""
    return sum(executor.reconcile(db).values())


JOBS: dict[str, Job] = {
    job.name: job
    for job in (
        Job(
            "reservation-sweep",
            in_one_unit_of_work(ledger.sweep_expired),
            60,
            "release quota reservations past their expiry",
        ),
        Job(
            "quota-expiry-notices",
            in_one_unit_of_work(quotas.emit_expiry_notices),
            3600,
            "record notices 7 days and 1 day before a quota expires",
        ),
        Job(
            "inventory-sync",
            sync_due_providers,
            60,
            "sync every enabled provider whose sync interval has passed",
        ),
        Job(
            "provisioning-reconciler",
            reconcile_jobs,
            60,
            "finish or roll back provisioning jobs stuck after a crash, by asking the provider",
        ),
        Job(
            "metering",
            meter_usage,
            3600,
            "meter lifecycle events into usage intervals and rate each elapsed hour once",
        ),
        Job(
            "monthly-statements",
            in_one_unit_of_work(statements.generate_due),
            3600,
            "draft last month's statement of every contract that has none (on the 1st)",
        ),
        Job(
            "idempotency-purge",
            in_one_unit_of_work(provisioning.purge_idempotency_keys),
            3600,
            "forget Idempotency-Keys past their retention",
        ),
    )
}


def run_job(db: SessionSource, name: str) -> int:
    """Run one job; returns what it processed."""
    done = JOBS[name].run(db)
    log.info("job finished", job=name, processed=done)
    return done
