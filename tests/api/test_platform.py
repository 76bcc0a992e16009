"""Health, readiness, metrics, OpenAPI, request ids and the problem+json envelope."""

from __future__ import annotations

import gc

from fastapi.testclient import TestClient
from sqlalchemy import text

from api.app import create_app
from broker import migrations
from broker.core.db import get_database
from broker.core.settings import get_settings


def test_healthz_answers_without_auth(anon):
    resp = anon.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}


def test_readyz_reports_database_and_migrations(anon):
    resp = anon.get("/readyz")
    assert resp.status_code == 200
    assert resp.json()["checks"] == {"database": "ok", "migrations": "ok"}


def test_readyz_is_503_when_migrations_are_behind(anon, db):
    db.connection.execute(text("UPDATE alembic_version SET version_num = 'older'"))
    resp = anon.get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["checks"]["migrations"]["current"] == ["older"]


class _DeadDatabase:
    def session(self, *, write: bool = True):  # type: ignore[no-untyped-def]
        raise OSError("connection refused")

    def unit_of_work(self, *, write: bool = True):  # type: ignore[no-untyped-def]
        raise OSError("connection refused")


def test_readyz_is_503_when_the_database_is_unreachable():
    client = TestClient(create_app(db=_DeadDatabase()))
    resp = client.get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["checks"]["database"].startswith("unreachable")


def test_a_served_app_puts_what_start_up_made_out_of_the_collectors_way(monkeypatch, tmp_path):
    url = f"sqlite:///{tmp_path}/served.db"
    migrations.upgrade(url)
    monkeypatch.setenv("GOVBROKER_DATABASE_URL", url)
    monkeypatch.setenv("GOVBROKER_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("GOVBROKER_EMBEDDED_SCHEDULER", "false")
    get_settings.cache_clear()
    get_database.cache_clear()
    gc.unfreeze()
    try:
        app = create_app()  # as `serve` makes it
        assert gc.get_freeze_count() == 0
        with TestClient(app) as client:
            assert gc.get_freeze_count() > 0
            assert client.get("/readyz").status_code == 200
        # an app given its database (as tests make them) leaves the collector alone
        gc.unfreeze()
        with TestClient(create_app(db=get_database())):
            assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        get_database().dispose()
        get_database.cache_clear()
        get_settings.cache_clear()


def test_metrics_count_requests_by_route_template_not_raw_path(clients, estate):
    admin = clients["admin"]
    for code in ("a", "b"):
        assert admin.get(f"/api/v1/tenants/{estate.tid(code)}").status_code == 200
    admin.get("/api/v1/tenants/not-a-uuid")
    body = admin.get("/metrics").text
    assert (
        'govbroker_http_requests_total{method="GET",route="/api/v1/tenants/{tenant_id}",'
        'status="200"} 2.0' in body
    )
    assert str(estate.tid("a")) not in body
    assert "govbroker_http_request_duration_seconds_bucket" in body


def test_unknown_routes_count_under_one_label(anon):
    anon.get("/no/such/path/1")
    anon.get("/no/such/path/2")
    body = anon.get("/metrics").text
    assert 'route="<unmatched>",status="404"} 2.0' in body


def test_openapi_document_is_served_at_api_openapi_json(anon):
    spec = anon.get("/api/openapi.json").json()
    for path in (
        "/api/v1/tenants",
        "/api/v1/users",
        "/api/v1/role-bindings",
        "/api/v1/tokens",
        "/api/v1/me",
        "/api/v1/audit-events",
        "/api/v1/auth/login",
    ):
        assert path in spec["paths"]


def test_request_id_is_echoed_and_appears_in_problems(anon):
    resp = anon.get("/api/v1/me", headers={"X-Request-ID": "trace-42"})
    assert resp.status_code == 401
    assert resp.headers["x-request-id"] == "trace-42"
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.json()["request_id"] == "trace-42"
    assert resp.headers["www-authenticate"] == "Bearer"


def test_unsafe_request_ids_are_replaced(anon):
    resp = anon.get("/healthz", headers={"X-Request-ID": "bad id\nwith newline"})
    assert resp.headers["x-request-id"] != "bad id\nwith newline"
    assert len(resp.headers["x-request-id"]) == 32


def test_unknown_route_and_wrong_method_are_problems(clients):
    admin = clients["admin"]
    missing = admin.get("/api/v1/nothing-here")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    wrong = admin.put("/api/v1/tenants")
    assert wrong.status_code == 405
    assert wrong.json()["status"] == 405


def test_audit_events_record_request_id_and_client_ip(clients, estate, db):
    resp = clients["admin"].patch(
        f"/api/v1/tenants/{estate.tid('a')}",
        json={"name_en": "Agency A"},
        headers={"X-Request-ID": "req-audit-1"},
    )
    assert resp.status_code == 200
    row = db.connection.execute(
        text(
            "SELECT action, request_id, client_ip, actor_name FROM audit_event "
            "WHERE request_id = 'req-audit-1'"
        )
    ).one()
    assert row.action == "tenant.update"
    assert row.actor_name == "admin"
    assert row.client_ip == "testclient"


def test_no_page_loads_assets_from_the_internet(anon):
    """Intranets have no CDN: the docs pages that would load one are not served."""
    assert anon.get("/api/docs").status_code == 404
    assert anon.get("/api/redoc").status_code == 404
    assert "cdn" not in anon.get("/api/openapi.json").text.lower()
