"""Checks of API answers shared by the API tests: a JSON success, an RFC 9457 problem, and the
rows a refused request must have left as they were."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import text

from tests.fixtures.db import TestDatabase

PROBLEM = "application/problem+json"


def ok(resp: Any, status: int = 200) -> Any:
    assert resp.status_code == status, f"{resp.status_code}, not {status}: {resp.text}"
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    return resp.json()


def problem(resp: Any, status: int, field: str | None = None) -> dict[str, Any]:
    """The response is a problem of `status`, naming `field` among its errors when given."""
    where = f"{resp.request.method} {resp.request.url}"
    assert resp.status_code == status, f"{where}: got {resp.status_code}, not {status}: {resp.text}"
    assert resp.headers["content-type"].startswith(PROBLEM), f"{where}: {resp.headers}"
    body: dict[str, Any] = resp.json()
    assert body["status"] == status and body["type"].startswith("urn:govbroker:problem:")
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    if field is not None:
        named = [e["field"] for e in body.get("errors", [])]
        assert field in named, f"{where}: the problem should name {field!r}: {resp.text}"
    return body


def table_rows(db: TestDatabase, tables: Iterable[str]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of `tables`, read with plain SQL, to compare before and after a request."""
    return {
        table: [tuple(r) for r in db.connection.execute(text(f"SELECT * FROM {table} ORDER BY 1"))]
        for table in tables
    }
