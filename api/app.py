"""The composition root of the HTTP service: `create_app()`."""

from __future__ import annotations

from fastapi import FastAPI

from api import problems
from api.deps import SessionSource
from api.middleware import Metrics, RequestContextMiddleware
from api.routers import audit, health, identity, quotas, role_bindings, tenants, users
from broker import __version__
from broker.core.db import get_database
from broker.core.logging import configure_logging


def create_app(db: SessionSource | None = None) -> FastAPI:
    configure_logging()
    app = FastAPI(
        title="govbroker",
        version=__version__,
        summary="Control plane for e-government clouds (电子政务云)",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    app.state.db = db if db is not None else get_database()
    app.state.metrics = Metrics()
    problems.install(app)
    for module in (health, identity, tenants, users, role_bindings, quotas, audit):
        app.include_router(module.router)
    app.add_middleware(RequestContextMiddleware, metrics=app.state.metrics)
    return app
