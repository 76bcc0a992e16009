"""HTTP level: login, lock-out, password changes, API tokens and OIDC bearers, as clients see them.

The OIDC identity provider and the settings fixture come from tests/broker/tenancy/test_auth.py.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlmodel import select

from api.app import create_app
from broker.audit.models import AuditEvent
from broker.core import clock as broker_clock
from broker.core.authz import Principal
from broker.migrations import all_metadata
from broker.tenancy import users
from broker.tenancy.models import User
from tests.broker.tenancy import test_auth as shared
from tests.broker.tenancy.test_auth import REJECTED_OIDC, FakeIdP
from tests.fixtures.auth import PASSWORD, build_estate

# fixtures shared with the service-level tests, requested by name below
configure = shared.configure
idp = shared.idp
oidc = shared.oidc

SYSTEM = Principal.system("test-identity")
NEW_PASSWORD = "Another-Good-Pass-42"
WRONG = "Wrong-Password-123"
PROBLEM = "urn:govbroker:problem:"


# --- helpers -----------------------------------------------------------------------------------


def assert_problem(resp: Any, status: int, slug: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = resp.json()
    assert body["type"] == PROBLEM + slug and body["status"] == status
    if status == 401:
        assert resp.headers["www-authenticate"] == "Bearer"
    return body


def login(anon: TestClient, username: str, password: str) -> Any:
    return anon.post("/api/v1/auth/login", json={"username": username, "password": password})


def as_bearer(app: Any, token: str) -> TestClient:
    client = TestClient(app, raise_server_exceptions=True)
    client.headers["Authorization"] = f"Bearer {token}"
    return client


def me(app: Any, token: str) -> Any:
    return as_bearer(app, token).get("/api/v1/me")


def at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _user(db, username: str) -> User:  # type: ignore[no-untyped-def]
    with db.unit_of_work(write=False) as s:
        return s.execute(select(User).where(User.username == username)).scalar_one()


def _audit_actions(db, user_id: Any) -> list[str]:  # type: ignore[no-untyped-def]
    with db.unit_of_work(write=False) as s:
        stmt = (
            select(AuditEvent.action)
            .where(AuditEvent.target_id == str(user_id))
            .order_by(AuditEvent.seq)  # type: ignore[arg-type]
        )
        return list(s.execute(stmt).scalars())


def columns_containing(connection: Any, needle: str) -> list[str]:
    """Every `table.column` of every table whose text form contains `needle` (raw SQL)."""
    quote = connection.dialect.identifier_preparer.quote
    hits = []
    for table in all_metadata().sorted_tables:
        for column in table.columns:
            sql = text(f"SELECT CAST({quote(column.name)} AS TEXT) FROM {quote(table.name)}")
            for (value,) in connection.execute(sql):
                if value is not None and needle in value:
                    hits.append(f"{table.name}.{column.name}")
    return hits


@pytest.fixture
def give_password(db, estate):  # type: ignore[no-untyped-def]
    def give(username: str, password: str = PASSWORD) -> None:
        with db.unit_of_work() as s:
            users.set_password(s, SYSTEM, estate.uid(username), password)

    return give


@pytest.fixture
def member_token(clock, estate, give_password, anon) -> str:  # type: ignore[no-untyped-def]
    """a-member has a password and has logged in once: the session token."""
    give_password("a-member")
    resp = login(anon, "a-member", PASSWORD)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["access_token"])


def lock_out(anon: TestClient, username: str = "a-member", times: int = 5) -> None:
    for _ in range(times):
        assert_problem(login(anon, username, WRONG), 401, "unauthenticated")


# --- password login ----------------------------------------------------------------------------


def test_login_returns_a_bearer_session_token_that_works_on_me(
    clock, app, anon, estate, give_password
):
    give_password("a-member")
    resp = login(anon, "a-member", PASSWORD)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["token_type"] == "bearer"
    assert at(body["expires_at"]) == broker_clock.now() + timedelta(hours=8)
    mine = me(app, body["access_token"])
    assert mine.status_code == 200, mine.text
    assert mine.json()["user"]["username"] == "a-member"
    assert mine.json()["auth_method"] == "session"
    assert at(mine.json()["user"]["last_login_at"]) == broker_clock.now()
    assert [(b["role"], b["tenant_code"]) for b in mine.json()["bindings"]] == [("member", "a1")]


def test_me_needs_a_bearer(anon):
    assert_problem(anon.get("/api/v1/me"), 401, "unauthenticated")


def test_wrong_password_and_unknown_user_get_the_same_401_problem(anon, estate, give_password):
    give_password("a-member")
    wrong = assert_problem(login(anon, "a-member", WRONG), 401, "unauthenticated")
    unknown = assert_problem(login(anon, "no-such-user", WRONG), 401, "unauthenticated")
    del wrong["request_id"], unknown["request_id"]
    assert wrong == unknown


def test_disabled_user_cannot_log_in(clients, anon, estate, give_password):
    give_password("a-member")
    resp = clients["admin"].patch(
        f"/api/v1/users/{estate.uid('a-member')}", json={"status": "disabled"}
    )
    assert resp.status_code == 200, resp.text
    refused = assert_problem(login(anon, "a-member", PASSWORD), 401, "unauthenticated")
    bad = assert_problem(login(anon, "a-member", WRONG), 401, "unauthenticated")
    assert "access_token" not in refused
    assert refused["detail"] == bad["detail"]  # a disabled account is not told apart


def test_session_token_expires_after_its_lifetime(clock, app, member_token):
    clock.shift(timedelta(hours=8) - timedelta(seconds=1))
    assert me(app, member_token).status_code == 200
    clock.shift(timedelta(seconds=1))
    assert_problem(me(app, member_token), 401, "unauthenticated")


# --- password policy ---------------------------------------------------------------------------


def _create_user(ctx: dict[str, Any], password: str) -> Any:
    return ctx["clients"]["admin"].post(
        "/api/v1/users",
        json={
            "username": "new-clerk",
            "display_name": "New Clerk",
            "tenant_id": str(ctx["estate"].tid("a")),
            "password": password,
        },
    )


def _admin_sets(ctx: dict[str, Any], password: str) -> Any:
    return ctx["clients"]["admin"].post(
        f"/api/v1/users/{ctx['estate'].uid('a-member')}/password", json={"password": password}
    )


def _own_change(ctx: dict[str, Any], password: str) -> Any:
    return as_bearer(ctx["app"], ctx["member_token"]).post(
        "/api/v1/me/password", json={"current_password": PASSWORD, "new_password": password}
    )


ENDPOINTS = {
    # id: (call, username the password is for, field the problem names)
    "create-user": (_create_user, "new-clerk", "password"),
    "admin-set-password": (_admin_sets, "a-member", "password"),
    "own-password-change": (_own_change, "a-member", "new_password"),
}
WEAK = {
    "too-short": lambda username: "Ab1!xyz",
    "too-few-character-classes": lambda username: "onlylowercaseletters",
    "contains-the-username": lambda username: f"Xx9!{username.upper()}zz",
}


@pytest.mark.parametrize("weak", list(WEAK.values()), ids=list(WEAK))
@pytest.mark.parametrize("endpoint", list(ENDPOINTS.values()), ids=list(ENDPOINTS))
def test_weak_password_is_refused_with_422_naming_the_field(
    app, anon, clients, estate, member_token, endpoint, weak
):
    call, username, field = endpoint
    password = weak(username)
    ctx = {"app": app, "clients": clients, "estate": estate, "member_token": member_token}
    body = assert_problem(call(ctx, password), 422, "invalid")
    assert [(e["field"], e["code"]) for e in body["errors"]] == [(field, "password_policy")]
    # nothing was changed: the weak password opens nothing, the old one still works
    assert login(anon, username, password).status_code == 401
    assert login(anon, "a-member", PASSWORD).status_code == 200


def test_own_password_change_needs_the_current_password(app, member_token):
    resp = as_bearer(app, member_token).post(
        "/api/v1/me/password", json={"current_password": WRONG, "new_password": NEW_PASSWORD}
    )
    body = assert_problem(resp, 422, "invalid")
    assert body["errors"][0]["field"] == "current_password"


# --- lock-out ----------------------------------------------------------------------------------


def test_account_locks_after_threshold_failures_even_for_the_right_password(
    clock, anon, estate, give_password
):
    give_password("a-member")
    lock_out(anon)
    body = assert_problem(login(anon, "a-member", PASSWORD), 423, "account-locked")
    until = broker_clock.now() + timedelta(minutes=15)
    assert at(body["locked_until"]) == until
    assert "access_token" not in body


def test_failed_logins_are_committed_and_audited_although_the_request_fails(
    clock, db, anon, estate, give_password
):
    give_password("a-member")
    lock_out(anon, times=2)
    user = _user(db, "a-member")
    assert user.failed_logins == 2 and user.locked_until is None
    assert _audit_actions(db, user.id)[-2:] == ["auth.login_failed", "auth.login_failed"]
    lock_out(anon, times=3)
    user = _user(db, "a-member")
    assert user.locked_until == broker_clock.now() + timedelta(minutes=15)
    assert _audit_actions(db, user.id)[-3:] == [
        "auth.login_failed",
        "auth.login_failed",
        "user.lock",
    ]


def test_failed_login_is_committed_on_a_real_database(committed_db):
    with committed_db.unit_of_work() as s:
        estate = build_estate(s, with_passwords=True)
    client = TestClient(create_app(db=committed_db), raise_server_exceptions=True)
    assert_problem(login(client, "a-member", WRONG), 401, "unauthenticated")
    with committed_db.unit_of_work(write=False) as s:
        user = s.get(User, estate.uid("a-member"))
        assert user is not None and user.failed_logins == 1
        failed = s.execute(
            select(AuditEvent.action).where(
                AuditEvent.target_id == str(user.id), AuditEvent.action == "auth.login_failed"
            )
        ).all()
        assert len(failed) == 1


def test_lock_lifts_after_lockout_minutes(clock, anon, estate, give_password):
    give_password("a-member")
    lock_out(anon)
    clock.shift(timedelta(minutes=15) - timedelta(seconds=1))
    assert_problem(login(anon, "a-member", PASSWORD), 423, "account-locked")
    clock.shift(timedelta(seconds=1))
    assert login(anon, "a-member", PASSWORD).status_code == 200


def test_lockout_threshold_is_configurable(clock, configure, anon, estate, give_password):
    configure(lockout_threshold=3)
    give_password("a-member")
    lock_out(anon, times=3)
    assert_problem(login(anon, "a-member", PASSWORD), 423, "account-locked")


def test_admin_unlocks_a_locked_account(clock, db, clients, anon, estate, give_password):
    give_password("a-member")
    lock_out(anon)
    resp = clients["admin"].post(f"/api/v1/users/{estate.uid('a-member')}/unlock")
    assert resp.status_code == 200, resp.text
    assert resp.json()["locked_until"] is None
    assert login(anon, "a-member", PASSWORD).status_code == 200
    assert "user.unlock" in _audit_actions(db, estate.uid("a-member"))


def test_admin_of_another_agency_cannot_unlock(clock, clients, anon, estate, give_password):
    give_password("a-member")
    lock_out(anon)
    resp = clients["b-admin"].post(f"/api/v1/users/{estate.uid('a-member')}/unlock")
    assert_problem(resp, 404, "not-found")
    assert_problem(login(anon, "a-member", PASSWORD), 423, "account-locked")


# --- a password change ends sessions -----------------------------------------------------------


def test_password_change_ends_earlier_sessions(clock, app, anon, member_token):
    clock.shift(timedelta(minutes=1))
    second = login(anon, "a-member", PASSWORD).json()["access_token"]
    clock.shift(timedelta(minutes=1))
    resp = as_bearer(app, member_token).post(
        "/api/v1/me/password", json={"current_password": PASSWORD, "new_password": NEW_PASSWORD}
    )
    assert resp.status_code == 204, resp.text
    for old in (member_token, second):
        assert_problem(me(app, old), 401, "unauthenticated")
    assert login(anon, "a-member", PASSWORD).status_code == 401
    fresh = login(anon, "a-member", NEW_PASSWORD)
    assert fresh.status_code == 200
    assert me(app, fresh.json()["access_token"]).status_code == 200


def test_password_change_ends_a_session_begun_within_the_same_second(
    clock, app, anon, estate, give_password
):
    # password set, login, change: all inside one second; the earlier session must still end
    give_password("a-member")
    clock.shift(timedelta(milliseconds=200))
    token = login(anon, "a-member", PASSWORD).json()["access_token"]
    clock.shift(timedelta(milliseconds=200))
    resp = as_bearer(app, token).post(
        "/api/v1/me/password", json={"current_password": PASSWORD, "new_password": NEW_PASSWORD}
    )
    assert resp.status_code == 204, resp.text
    assert_problem(me(app, token), 401, "unauthenticated")


def test_admin_set_password_ends_the_users_sessions(clock, app, clients, estate, member_token):
    clock.shift(timedelta(minutes=1))
    resp = clients["admin"].post(
        f"/api/v1/users/{estate.uid('a-member')}/password", json={"password": NEW_PASSWORD}
    )
    assert resp.status_code == 200, resp.text
    assert_problem(me(app, member_token), 401, "unauthenticated")


# --- API tokens --------------------------------------------------------------------------------


def create_token(client: TestClient, **body: Any) -> dict[str, Any]:
    resp = client.post("/api/v1/tokens", json={"name": "ci pipeline", **body})
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def list_tokens(client: TestClient) -> list[dict[str, Any]]:
    resp = client.get("/api/v1/tokens")
    assert resp.status_code == 200, resp.text
    return list(resp.json()["data"])


def test_api_token_is_shown_once_and_works_as_a_bearer(clock, app, clients):
    created = create_token(clients["a-member"])
    raw = created["token"]
    assert raw.startswith("gbk_") and created["prefix"] == raw[:10]
    assert at(created["expires_at"]) == broker_clock.now() + timedelta(days=90)
    mine = me(app, raw)
    assert mine.status_code == 200, mine.text
    assert mine.json()["user"]["username"] == "a-member"
    assert mine.json()["auth_method"] == "token"


def test_token_list_shows_the_prefix_but_never_the_secret(clock, app, clients):
    raw = create_token(clients["a-member"])["token"]
    resp = clients["a-member"].get("/api/v1/tokens")
    assert raw not in resp.text and raw[4:] not in resp.text
    (listed,) = resp.json()["data"]
    assert "token" not in listed and listed["prefix"] == raw[:10]
    # nor when the token lists itself
    assert raw not in as_bearer(app, raw).get("/api/v1/tokens").text


def test_raw_api_token_is_stored_nowhere_in_the_database(clock, db, app, clients):
    member = clients["a-member"]
    created = create_token(member)
    raw = created["token"]
    create_token(member, name="another")
    user_client = as_bearer(app, raw)
    assert user_client.get("/api/v1/me").status_code == 200
    clock.shift(timedelta(minutes=10))
    assert user_client.get("/api/v1/tokens").status_code == 200  # touches last_used_at again
    assert member.delete(f"/api/v1/tokens/{created['id']}").status_code == 204
    with db.unit_of_work(write=False) as s:
        actions = set(s.execute(select(AuditEvent.action)).scalars())
    assert {"token.create", "token.revoke"} <= actions
    assert columns_containing(db.connection, raw) == []
    assert columns_containing(db.connection, raw[len("gbk_") :]) == []
    # the scan does see the token's row: its hash is there, once
    digest = hashlib.sha256(raw.encode()).hexdigest()
    assert columns_containing(db.connection, digest) == ["api_token.token_hash"]


def test_revoked_api_token_is_refused(clock, app, clients):
    created = create_token(clients["a-member"])
    assert me(app, created["token"]).status_code == 200
    assert clients["a-member"].delete(f"/api/v1/tokens/{created['id']}").status_code == 204
    assert_problem(me(app, created["token"]), 401, "unauthenticated")
    (listed,) = list_tokens(clients["a-member"])
    assert at(listed["revoked_at"]) == broker_clock.now()


def test_another_users_token_cannot_be_revoked(clock, app, clients):
    created = create_token(clients["a-member"])
    resp = clients["b-member"].delete(f"/api/v1/tokens/{created['id']}")
    assert_problem(resp, 404, "not-found")
    assert me(app, created["token"]).status_code == 200


def test_expired_api_token_is_refused(clock, app, clients):
    raw = create_token(clients["a-member"], expires_in_days=1)["token"]
    clock.shift(timedelta(days=1) - timedelta(seconds=1))
    assert me(app, raw).status_code == 200
    clock.shift(timedelta(seconds=1))
    body = assert_problem(me(app, raw), 401, "unauthenticated")
    assert "expired" in body["detail"]


def test_api_token_last_use_is_recorded(clock, app, clients):
    raw = create_token(clients["a-member"])["token"]
    assert list_tokens(clients["a-member"])[0]["last_used_at"] is None
    assert me(app, raw).status_code == 200
    first_use = broker_clock.now()
    assert at(list_tokens(clients["a-member"])[0]["last_used_at"]) == first_use
    # recorded at most every five minutes, so a busy token does not write on every request
    clock.shift(timedelta(minutes=1))
    assert me(app, raw).status_code == 200
    assert at(list_tokens(clients["a-member"])[0]["last_used_at"]) == first_use
    clock.shift(timedelta(minutes=5))
    assert me(app, raw).status_code == 200
    assert at(list_tokens(clients["a-member"])[0]["last_used_at"]) == broker_clock.now()


def test_disabled_users_api_tokens_stop_working_and_stay_revoked(clock, app, clients, estate):
    raw = create_token(clients["a-member"])["token"]
    url = f"/api/v1/users/{estate.uid('a-member')}"
    assert clients["admin"].patch(url, json={"status": "disabled"}).status_code == 200
    assert_problem(me(app, raw), 401, "unauthenticated")
    assert clients["admin"].patch(url, json={"status": "active"}).status_code == 200
    assert_problem(me(app, raw), 401, "unauthenticated")


@pytest.mark.parametrize("days", [366, 3651])
def test_token_lifetime_over_the_maximum_is_refused_naming_expires_in_days(clock, clients, days):
    resp = clients["a-member"].post("/api/v1/tokens", json={"name": "ci", "expires_in_days": days})
    body = assert_problem(resp, 422, "invalid")
    assert [e["field"] for e in body["errors"]] == ["expires_in_days"]
    assert list_tokens(clients["a-member"]) == []


def test_token_lifetime_maximum_is_configurable(clock, configure, clients):
    configure(api_token_max_days=30)
    resp = clients["a-member"].post("/api/v1/tokens", json={"name": "ci", "expires_in_days": 31})
    body = assert_problem(resp, 422, "invalid")
    assert [e["field"] for e in body["errors"]] == ["expires_in_days"]
    create_token(clients["a-member"], expires_in_days=30)


# --- OIDC bearer JWTs --------------------------------------------------------------------------


def test_oidc_bearer_shows_the_mapped_user_on_me(clock, app, estate, oidc):
    resp = me(app, oidc.token())
    assert resp.status_code == 200, resp.text
    assert resp.json()["user"]["username"] == "a-member"
    assert resp.json()["auth_method"] == "oidc"
    assert [(b["role"], b["tenant_code"]) for b in resp.json()["bindings"]] == [("member", "a1")]


@pytest.mark.parametrize(("make", "says"), list(REJECTED_OIDC.values()), ids=list(REJECTED_OIDC))
def test_oidc_bearer_is_refused_with_401(clock, app, estate, oidc, make, says):
    body = assert_problem(me(app, make(oidc)), 401, "unauthenticated")
    assert says in body["detail"]


def test_oidc_bearer_is_refused_once_expired(clock, app, estate, oidc):
    token = oidc.token()
    assert me(app, token).status_code == 200
    clock.shift(timedelta(minutes=5))
    assert_problem(me(app, token), 401, "unauthenticated")


def test_oidc_bearer_for_a_disabled_user_is_refused(clock, app, clients, estate, oidc):
    resp = clients["admin"].patch(
        f"/api/v1/users/{estate.uid('a-member')}", json={"status": "disabled"}
    )
    assert resp.status_code == 200, resp.text
    assert_problem(me(app, oidc.token()), 401, "unauthenticated")


def test_oidc_bearer_is_refused_when_oidc_is_not_configured(clock, app, estate, idp: FakeIdP):
    body = assert_problem(me(app, idp.token()), 401, "unauthenticated")
    assert "not one this service issued" in body["detail"]


def test_oidc_username_claim_is_configurable(clock, app, configure, estate, oidc):
    configure(oidc_username_claim="gov_uid")
    resp = me(app, oidc.token(gov_uid="b-member", preferred_username="admin"))
    assert resp.status_code == 200, resp.text
    assert resp.json()["user"]["username"] == "b-member"
    assert resp.json()["auth_method"] == "oidc"
    assert_problem(me(app, oidc.token()), 401, "unauthenticated")
