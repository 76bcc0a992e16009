"""Liveness, readiness and metrics: unauthenticated, for probes and scrapers on the cluster."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.deps import database
from broker import migrations

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request, response: Response) -> dict[str, object]:
    checks: dict[str, object] = {}
    try:
        with database(request).unit_of_work(write=False) as session:
            session.execute(text("SELECT 1"))
            current = migrations.current_revisions(session.connection())
        checks["database"] = "ok"
        head = migrations.head_revisions()
        checks["migrations"] = (
            "ok" if current == head else {"current": sorted(current), "head": sorted(head)}
        )
    except Exception as exc:  # a probe reports every failure as not-ready, never raises
        checks["database"] = f"unreachable: {type(exc).__name__}"
    ready = checks.get("database") == "ok" and checks.get("migrations") == "ok"
    response.status_code = 200 if ready else 503
    return {"status": "ready" if ready else "not ready", "checks": checks}


@router.get("/metrics")
def metrics(request: Request) -> Response:
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
