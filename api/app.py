"""The composition root of the HTTP service: `create_app()`."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import problems
from api.deps import SessionSource
from api.middleware import Metrics, RequestContextMiddleware
from api.routers import (
    audit,
    billing,
    health,
    identity,
    inventory,
    provisioning,
    quotas,
    role_bindings,
    tenants,
    users,
)
from broker import __version__
from broker.core.db import get_database
from broker.core.logging import configure_logging
from broker.core.settings import get_settings
from broker.jobs.scheduler import start_background
from broker.provisioning.executor import InlineRunner, JobRunner, ThreadRunner


def create_app(db: SessionSource | None = None, jobs: JobRunner | None = None) -> FastAPI:
    """The API. Given no database (as `serve` calls it), it uses the configured one, runs
    provisioning jobs on a pool of worker threads and the periodic jobs in-process when
    GOVBROKER_EMBEDDED_SCHEDULER is on. Given a database (tests), jobs run inline unless a
    runner is given."""
    configure_logging()
    served = db is None
    run_jobs = served and get_settings().embedded_scheduler

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if served:
            # what start-up made (modules, models, routes) lives as long as the
            # process: out of the collector's sight, full collections no longer walk it, which
            # took tens of milliseconds from whichever request happened to trigger one
            gc.collect()
            gc.freeze()
        scheduler = start_background(app.state.db) if run_jobs else None
        try:
            yield
        finally:
            if scheduler is not None:
                scheduler.shutdown(wait=False)
            if isinstance(app.state.jobs, ThreadRunner):
                app.state.jobs.shutdown()

    app = FastAPI(
        lifespan=lifespan,
        title="govbroker",
        version=__version__,
        summary="Control plane for e-government clouds (电子政务云)",
        openapi_url="/api/openapi.json",
        # the stock docs pages load their scripts from a CDN, and the product runs on intranets
        # with none: the OpenAPI document is served, an intranet's own viewer can render it
        docs_url=None,
        redoc_url=None,
    )
    app.state.db = db if db is not None else get_database()
    if jobs is None:
        jobs = InlineRunner(app.state.db) if db is not None else ThreadRunner(app.state.db)
    app.state.jobs = jobs
    app.state.metrics = Metrics()
    problems.install(app)
    for module in (
        health,
        identity,
        tenants,
        users,
        role_bindings,
        quotas,
        audit,
        inventory,
        provisioning,
        billing,
    ):
        app.include_router(module.router)
    app.include_router(quotas.requests_router)
    app.add_middleware(RequestContextMiddleware, metrics=app.state.metrics)
    return app
