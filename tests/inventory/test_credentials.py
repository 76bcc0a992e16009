"""Provider credentials at rest and in motion: the stored column is ciphertext, and no API response,
log line or audit event ever carries the secret — not even when a provider echoes it back in an
error message, which some do (OpenStack's keystone and vCenter both quote what they were sent).

Everything is done through the HTTP API as the center administrator, with every log line captured
as the product renders it. Secrets are long and distinctive so that a hit cannot be a coincidence.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
from cryptography.fernet import Fernet, MultiFernet
from fastapi.testclient import TestClient
from sqlalchemy import text

from broker.core.settings import get_settings
from broker.inventory import providers
from broker.migrations import all_metadata
from drivers.base import Unauthorized
from tests.fixtures.db import TestDatabase

SECRET = "Kv7-unmistakable-Pa55phrase-for-inventory-q3Z"
ROTATED = "Jw2-second-unmistakable-Pa55phrase-m8R"
USERNAME = "svc-broker"
NAME = "sim-secretive"


# --- capturing what leaves the process ----------------------------------------------------------


@dataclass
class Logs:
    structlog_out: io.StringIO
    caplog: pytest.LogCaptureFixture
    capfd: pytest.CaptureFixture[str]
    fd_text: list[str] = field(default_factory=list)

    def text(self) -> str:
        out, err = self.capfd.readouterr()
        self.fd_text += [out, err]
        return "\n".join([self.structlog_out.getvalue(), self.caplog.text, *self.fd_text])


@pytest.fixture
def logs(app: Any, caplog: pytest.LogCaptureFixture, capfd: Any) -> Iterator[Logs]:
    """Every log line at every level, rendered by the product's own structlog processors (so an
    exception's traceback is in the text just as it would be in production) into a buffer, plus
    whatever reaches the standard library's logging and the process's stdout and stderr. Set up
    after `app`, whose creation configures logging."""
    saved = structlog.get_config()
    buffer = io.StringIO()
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(buffer),
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )
    caplog.set_level(logging.DEBUG)
    try:
        yield Logs(buffer, caplog, capfd)
    finally:
        structlog.configure(**saved)


class Recorder:
    """The administrator's client, keeping every response's headers and body."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.seen: list[str] = []

    def __call__(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.client.request(method, path, **kwargs)
        self.seen.append(f"{method} {path} {resp.status_code}\n{resp.headers}\n{resp.text}")
        return resp

    def containing(self, needle: str) -> list[str]:
        return [s.split("\n", 1)[0] for s in self.seen if needle in s]


@pytest.fixture
def api(clients: Any) -> Recorder:
    return Recorder(clients["admin"])


@pytest.fixture
def api_500(clients: Any) -> Iterator[Recorder]:
    """Like `api`, but a server error comes back as a 500 response instead of being raised."""
    with TestClient(clients.app, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = clients["admin"].headers["Authorization"]
        yield Recorder(c)


# --- what the database holds --------------------------------------------------------------------


def columns_containing(db: TestDatabase, needle: str) -> list[str]:
    """Every `table.column`, of every table, whose text form holds `needle` (plain SQL)."""
    conn = db.connection
    quote = conn.dialect.identifier_preparer.quote
    hits = []
    for table in all_metadata().sorted_tables:
        for column in table.columns:
            sql = text(f"SELECT CAST({quote(column.name)} AS TEXT) FROM {quote(table.name)}")
            if any(v is not None and needle in v for (v,) in conn.execute(sql)):
                hits.append(f"{table.name}.{column.name}")
    return hits


def stored_token(db: TestDatabase) -> str:
    sql = text("SELECT credentials_enc FROM provider WHERE name = :name")
    return str(db.connection.execute(sql, {"name": NAME}).scalar_one())


def audit_texts(db: TestDatabase) -> list[str]:
    sql = text("SELECT action, CAST(before AS TEXT), CAST(after AS TEXT) FROM audit_event")
    return [" ".join(str(v) for v in row) for row in db.connection.execute(sql)]


# --- drivers that leak ----------------------------------------------------------------------------


class EchoingDriver:
    """A provider that quotes the password it was sent in its error messages."""

    def __init__(self, credentials: Mapping[str, str], crash: bool) -> None:
        self.credentials = dict(credentials)
        self.crash = crash

    def fail(self) -> None:
        said = (
            f"authentication failed for {USERNAME} with password '{self.credentials['password']}'"
        )
        if self.crash:
            # an SDK's own exception, which the driver failed to translate
            raise RuntimeError(said)
        raise Unauthorized("provider refused the credentials", provider_message=f"401: {said}")

    def check(self) -> None:
        self.fail()

    def list_hosts(self) -> list[Any]:
        self.fail()
        return []

    def close(self) -> None:
        pass


def echoing(monkeypatch: pytest.MonkeyPatch, *, crash: bool = False) -> None:
    """Every provider from now on is opened as an EchoingDriver over its decrypted credentials."""

    def open_driver(
        kind: str, endpoint: str, credentials: Mapping[str, str], options: Mapping[str, Any]
    ) -> Any:
        return EchoingDriver(credentials, crash)

    monkeypatch.setattr(providers, "open_driver", open_driver)


def register(api: Recorder) -> str:
    resp = api(
        "POST",
        "/api/v1/providers",
        json={
            "kind": "simulator",
            "name": NAME,
            "endpoint": f"sim://{NAME}",
            "credentials": {"username": USERNAME, "password": SECRET},
            # the simulator accepts only these, so that a check can be refused
            "options": {"accept_credentials": {"username": USERNAME, "password": "other-one"}},
        },
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["credential_fields"] == ["password", "username"]
    return str(resp.json()["id"])


# --- the tests ------------------------------------------------------------------------------------


def test_the_stored_credentials_are_a_fernet_token_of_them_and_nothing_else(api, db):
    register(api)

    token = stored_token(db)

    assert token.startswith("gAAAAA"), token  # Fernet's version byte, base64url-encoded
    assert SECRET not in token and USERNAME not in token
    keys = MultiFernet([Fernet(k) for k in get_settings().fernet_keys()])
    assert json.loads(keys.decrypt(token.encode())) == {"username": USERNAME, "password": SECRET}
    # the scan sees the ciphertext where it is, and the secret nowhere
    assert columns_containing(db, token) == ["provider.credentials_enc"]
    assert columns_containing(db, SECRET) == []


def test_no_response_log_line_audit_event_or_column_ever_holds_the_secret(
    logs, api, db, monkeypatch
):
    pid = register(api)
    path = f"/api/v1/providers/{pid}"

    # reading it back, every way there is
    for method, where in (
        ("GET", path),
        ("GET", "/api/v1/providers"),
        ("GET", "/api/v1/providers?kind=simulator&enabled=true"),
    ):
        assert api(method, where).status_code == 200
    # a refused check: the simulator wants other credentials
    refused = api("POST", f"{path}/check").json()
    assert refused["ok"] is False and refused["error_type"] == "Unauthorized"
    # accepted once the simulator accepts anything; then a sync that works
    assert api("PATCH", path, json={"options": {}}).status_code == 200
    assert api("POST", f"{path}/check").json()["ok"] is True
    assert api("POST", f"{path}/sync").json()["status"] == "ok"
    # input refused with the secret in it is not quoted back
    for body in (
        {"credentials": {"Pass-Word": SECRET}},
        {"credentials": {"password": SECRET + "\x00"}},
        {"credentials": {"password": SECRET * 200}},
        {"password": SECRET},
        {"credentials": SECRET},
    ):
        assert api("PATCH", path, json=body).status_code == 422
    assert (
        api("POST", "/api/v1/providers", json={"name": NAME, "secret": SECRET}).status_code == 422
    )

    # a provider that echoes the password: in a check, and in a sync
    echoing(monkeypatch)
    leaked_check = api("POST", f"{path}/check").json()
    assert leaked_check["ok"] is False and "***" in leaked_check["error"]
    failed = api("POST", f"{path}/sync").json()
    assert failed["status"] == "failed" and "***" in failed["error"]
    assert "***" in api("GET", path).json()["last_sync_error"]
    assert api("GET", f"{path}/sync-runs").status_code == 200

    # rotated: the new secret is as invisible as the old one, and replaces it at rest
    rotated = api("PATCH", path, json={"credentials": {"username": USERNAME, "password": ROTATED}})
    assert rotated.status_code == 200
    assert api("POST", f"{path}/check").json()["error"].count("***") >= 1
    assert api("POST", f"{path}/sync").json()["status"] == "failed"
    keys = MultiFernet([Fernet(k) for k in get_settings().fernet_keys()])
    assert json.loads(keys.decrypt(stored_token(db).encode()))["password"] == ROTATED
    for where in ("/api/v1/audit-events", "/api/v1/inventory/hosts", "/api/v1/servers"):
        assert api("GET", where).status_code == 200

    captured = logs.text()
    # the capture works: lines of each kind are there
    assert "provider registered" in captured  # structlog, info
    assert "provider connection checked" in captured
    assert "provider sync failed" in captured  # structlog, warning
    assert "HTTP Request: POST http://testserver/api/v1/providers" in captured  # stdlib
    assert "sim-secretive" in captured
    for secret in (SECRET, ROTATED):
        assert api.containing(secret) == []
        assert secret not in captured
        assert [t for t in audit_texts(db) if secret in t] == []
        assert columns_containing(db, secret) == []
    actions = {t.split(" ", 1)[0] for t in audit_texts(db)}
    assert {"provider.create", "provider.update", "provider.check", "provider.sync"} <= actions


def test_a_sync_crashing_with_the_secret_in_its_exception_logs_no_secret(
    logs, api, db, monkeypatch
):
    """A driver that lets an SDK's exception through (not a DriverError): the run records the
    failure with the secret scrubbed, and the traceback logged beside it must be scrubbed too."""
    pid = register(api)
    echoing(monkeypatch, crash=True)

    run = api("POST", f"/api/v1/providers/{pid}/sync").json()

    assert run["status"] == "failed" and "RuntimeError" in run["error"] and "***" in run["error"]
    captured = logs.text()
    assert "provider sync crashed" in captured
    assert api.containing(SECRET) == [] and columns_containing(db, SECRET) == []
    assert SECRET not in captured


def test_a_check_crashing_with_the_secret_in_its_exception_logs_no_secret(
    logs, api, api_500, db, monkeypatch
):
    """The same driver fault during a connection check: whatever the answer, neither it nor the
    log line about it may carry the secret."""
    pid = register(api)
    echoing(monkeypatch, crash=True)

    resp = api_500("POST", f"/api/v1/providers/{pid}/check")

    assert resp.status_code in (200, 500), resp.text
    captured = logs.text()
    # what failed must be told somewhere, in the answer or in the log, else nobody can fix it
    told = "RuntimeError" in captured or resp.json().get("error_type") == "RuntimeError"
    assert told, f"nothing says what crashed: {resp.text}\n{captured}"
    assert api_500.containing(SECRET) == [] and columns_containing(db, SECRET) == []
    assert SECRET not in captured
