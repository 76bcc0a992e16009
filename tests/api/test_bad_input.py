"""Bad input: always a 4xx RFC 9457 problem naming the field, never a 500, never a half-write.

Every case is sent as the center administrator (so authorization never hides the input error),
through a client that turns server errors into responses instead of raising them, so a 500 shows
up as a failed assertion with its body. After each refused request the rows of tenant,
user_account and role_binding — and the count of audit_event rows — must be exactly what they were.

Extra objects besides the estate (tests/fixtures/auth.py): an archived agency `old` with no
children, used as an archived parent, home and binding scope.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from broker.core.authz import Principal
from broker.tenancy import service as tenancy
from broker.tenancy.schemas import TenantCreate, TenantUpdate

PROBLEM = "application/problem+json"
MISSING = str(uuid.UUID(int=0xDEAD))  # an id that exists nowhere

# ordered by primary key so that two snapshots compare row by row
ROWS = {
    "tenant": text("SELECT * FROM tenant ORDER BY id"),
    "user_account": text("SELECT * FROM user_account ORDER BY id"),
    "role_binding": text("SELECT * FROM role_binding ORDER BY id"),
}
COUNTS = {
    name: text(f"SELECT count(*) FROM {name}")
    for name in ("tenant", "user_account", "role_binding", "audit_event")
}


def database_state(db: Any) -> dict[str, Any]:
    """Row counts of the four tables plus the full rows of the three the API edits."""
    conn = db.connection
    state: dict[str, Any] = {f"{n} rows": conn.execute(q).scalar_one() for n, q in COUNTS.items()}
    for name, query in ROWS.items():
        state[name] = [tuple(r) for r in conn.execute(query).all()]
    return state


def cursor_of(value: Any) -> str:
    """A well-formed base64url cursor holding `value` — the shape the API encodes."""
    raw = json.dumps(value).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def fill(value: Any, refs: dict[str, Any]) -> Any:
    if isinstance(value, str):
        return value.format(**refs)
    if isinstance(value, dict):
        return {k: fill(v, refs) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, refs) for v in value]
    return value


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def admin(clients: Any) -> Iterator[TestClient]:
    """The center administrator, with server errors answered (500) rather than raised."""
    with TestClient(clients.app, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = clients["admin"].headers["Authorization"]
        yield c


@pytest.fixture
def refs(db: Any, estate: Any) -> dict[str, Any]:
    """Ids for the case templates; creates the archived, childless agency `old`."""
    system = Principal.system("test-setup")
    with db.unit_of_work() as s:
        center = estate.tid("center")
        old = tenancy.create_tenant(
            s, system, TenantCreate(parent_id=center, kind="agency", code="old", name_zh="旧局")
        )
        tenancy.update_tenant(s, system, old.id, TenantUpdate(status="archived"))
    tenants = {code: str(t.id) for code, t in estate.tenants.items()}
    return {
        "t": tenants | {"old": str(old.id), "missing": MISSING},
        "u": {name: str(u.id) for name, u in estate.users.items()} | {"missing": MISSING},
        "missing": MISSING,
    }


# --- how a case is sent and judged -----------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    method: str
    path: str
    status: int
    field_name: str  # the input field the problem must name
    json: Any = None
    content: bytes | None = None
    params: dict[str, Any] = field(default_factory=dict)


def send(client: TestClient, case: Bad, refs: dict[str, Any]) -> Any:
    kwargs: dict[str, Any] = {"params": fill(case.params, refs)}
    if case.content is not None:
        kwargs["content"] = case.content
        kwargs["headers"] = {"content-type": "application/json"}
    elif case.json is not None:
        kwargs["json"] = fill(case.json, refs)
    return client.request(case.method, fill(case.path, refs), **kwargs)


def assert_problem(resp: Any, status: int, field_name: str | None) -> dict[str, Any]:
    where = f"{resp.request.method} {resp.request.url}"
    assert resp.status_code == status, f"{where}: got {resp.status_code}, not {status}: {resp.text}"
    assert resp.headers["content-type"].startswith(PROBLEM), f"{where}: {resp.headers}"
    problem: dict[str, Any] = resp.json()
    assert problem["status"] == status
    assert problem["type"].startswith("urn:govbroker:problem:")
    assert isinstance(problem["title"], str) and problem["title"]
    assert isinstance(problem["detail"], str) and problem["detail"]
    for err in problem.get("errors", []):
        assert {"field", "message", "code"} <= set(err), f"{where}: malformed error {err}"
    if field_name is not None:
        named = [e["field"] for e in problem.get("errors", [])]
        assert field_name in named, f"{where}: the problem should name {field_name!r}: {resp.text}"
    return problem


def check_refused(case: Bad, admin: TestClient, refs: dict[str, Any], db: Any) -> None:
    before = database_state(db)
    resp = send(admin, case, refs)
    assert_problem(resp, case.status, case.field_name)
    assert database_state(db) == before, "a refused request must leave nothing behind"


def cases(*rows: tuple[str, Bad]) -> list[Any]:
    return [pytest.param(case, id=name) for name, case in rows]


def new_agency(**overrides: Any) -> dict[str, Any]:
    body = {"parent_id": "{t[center]}", "kind": "agency", "code": "new-ag", "name_zh": "新局"}
    return {**body, **overrides}


def new_system(parent: str = "a", **overrides: Any) -> dict[str, Any]:
    body = {
        "parent_id": f"{{t[{parent}]}}",
        "kind": "system",
        "code": "new-sys",
        "name_zh": "新系统",
    }
    return {**body, **overrides}


def new_user(**overrides: Any) -> dict[str, Any]:
    body = {"username": "new-user", "display_name": "新用户", "tenant_id": "{t[a]}"}
    return {**body, **overrides}


def binding(user: str = "a-finance", role: str = "member", at: str = "a1") -> dict[str, Any]:
    return {"user_id": f"{{u[{user}]}}", "role": role, "tenant_id": f"{{t[{at}]}}"}


TENANTS, USERS, BINDINGS, TOKENS = (
    "/api/v1/tenants",
    "/api/v1/users",
    "/api/v1/role-bindings",
    "/api/v1/tokens",
)
A1 = "/api/v1/tenants/{t[a1]}"
AGENCY_A = "/api/v1/tenants/{t[a]}"
MEMBER = "/api/v1/users/{u[a-member]}"
AUDIT = "/api/v1/audit-events"


# --- wrong types ------------------------------------------------------------------------------

WRONG_TYPES = cases(
    (
        "string for the parent uuid",
        Bad("POST", TENANTS, 422, "parent_id", new_agency(parent_id="center")),
    ),
    ("number for name_zh", Bad("POST", TENANTS, 422, "name_zh", new_agency(name_zh=123))),
    ("number for code", Bad("POST", TENANTS, 422, "code", new_agency(code=42))),
    ("object for code", Bad("POST", TENANTS, 422, "code", new_agency(code={"v": "x"}))),
    ("null for required name_zh", Bad("POST", TENANTS, 422, "name_zh", new_agency(name_zh=None))),
    ("null for required kind", Bad("POST", TENANTS, 422, "kind", new_agency(kind=None))),
    (
        "center is not a kind one creates",
        Bad("POST", TENANTS, 422, "kind", new_agency(kind="center")),
    ),
    ("list for the tenant object", Bad("POST", TENANTS, 422, "body", [new_agency()])),
    ("string for the tenant object", Bad("POST", TENANTS, 422, "body", "new-ag")),
    (
        "number for the user's tenant uuid",
        Bad("POST", USERS, 422, "tenant_id", new_user(tenant_id=12345)),
    ),
    ("null for required username", Bad("POST", USERS, 422, "username", new_user(username=None))),
    (
        "list for display_name",
        Bad("POST", USERS, 422, "display_name", new_user(display_name=["x"])),
    ),
    ("list for the user object", Bad("POST", USERS, 422, "body", [new_user()])),
    (
        "string for the binding's user uuid",
        Bad("POST", BINDINGS, 422, "user_id", {**binding(), "user_id": "a-finance"}),
    ),
    ("number for role", Bad("POST", BINDINGS, 422, "role", {**binding(), "role": 7})),
    ("unknown role", Bad("POST", BINDINGS, 422, "role", {**binding(), "role": "emperor"})),
    (
        "null for the binding's tenant",
        Bad("POST", BINDINGS, 422, "tenant_id", {**binding(), "tenant_id": None}),
    ),
    ("null for the token name", Bad("POST", TOKENS, 422, "name", {"name": None})),
    (
        "string for expires_in_days",
        Bad("POST", TOKENS, 422, "expires_in_days", {"name": "ci", "expires_in_days": "soon"}),
    ),
    (
        "fraction for expires_in_days",
        Bad("POST", TOKENS, 422, "expires_in_days", {"name": "ci", "expires_in_days": 1.5}),
    ),
    (
        "zero expires_in_days",
        Bad("POST", TOKENS, 422, "expires_in_days", {"name": "ci", "expires_in_days": 0}),
    ),
    ("list for the token object", Bad("POST", TOKENS, 422, "body", [{"name": "ci"}])),
    ("null for name_zh on edit", Bad("PATCH", A1, 422, "name_zh", {"name_zh": None})),
    ("number for name_zh on edit", Bad("PATCH", A1, 422, "name_zh", {"name_zh": 5})),
    ("blank name_zh on edit", Bad("PATCH", A1, 422, "name_zh", {"name_zh": "   "})),
    ("string for parent uuid on edit", Bad("PATCH", A1, 422, "parent_id", {"parent_id": "b"})),
    ("unknown tenant status", Bad("PATCH", A1, 422, "status", {"status": "deleted"})),
    ("string for the tenant edit object", Bad("PATCH", A1, 422, "body", "rename")),
    (
        "null for display_name on edit",
        Bad("PATCH", MEMBER, 422, "display_name", {"display_name": None}),
    ),
    (
        "null for the user's tenant on edit",
        Bad("PATCH", MEMBER, 422, "tenant_id", {"tenant_id": None}),
    ),
    ("unknown user status", Bad("PATCH", MEMBER, 422, "status", {"status": "banned"})),
    (
        "non-uuid tenant id in the path",
        Bad("PATCH", "/api/v1/tenants/a1", 422, "tenant_id", {"name_en": "x"}),
    ),
    ("non-uuid user id in the path", Bad("GET", "/api/v1/users/a-member", 422, "user_id")),
    ("null password", Bad("POST", MEMBER + "/password", 422, "password", {"password": None})),
)


@pytest.mark.parametrize("case", WRONG_TYPES)
def test_wrong_types_are_refused_naming_the_field(case, admin, refs, db):
    check_refused(case, admin, refs, db)


# --- unknown fields ---------------------------------------------------------------------------

UNKNOWN_FIELDS = cases(
    ("tenant with colour", Bad("POST", TENANTS, 422, "colour", new_agency(colour="red"))),
    (
        "tenant created with status",
        Bad("POST", TENANTS, 422, "status", new_agency(status="archived")),
    ),
    ("tenant created with path", Bad("POST", TENANTS, 422, "path", new_agency(path="/x/"))),
    ("tenant created with id", Bad("POST", TENANTS, 422, "id", new_agency(id=MISSING))),
    ("tenant code changed on edit", Bad("PATCH", A1, 422, "code", {"code": "a9"})),
    ("tenant kind changed on edit", Bad("PATCH", A1, 422, "kind", {"kind": "agency"})),
    ("tenant path set on edit", Bad("PATCH", A1, 422, "path", {"name_en": "x", "path": "/"})),
    (
        "user created with password_hash",
        Bad("POST", USERS, 422, "password_hash", new_user(password_hash="x")),
    ),
    ("user created with is_admin", Bad("POST", USERS, 422, "is_admin", new_user(is_admin=True))),
    ("username changed on edit", Bad("PATCH", MEMBER, 422, "username", {"username": "someone"})),
    (
        "user failed_logins reset on edit",
        Bad("PATCH", MEMBER, 422, "failed_logins", {"failed_logins": 0}),
    ),
    (
        "binding with an expiry",
        Bad(
            "POST", BINDINGS, 422, "expires_at", {**binding(), "expires_at": "2030-01-01T00:00:00Z"}
        ),
    ),
    ("token with scopes", Bad("POST", TOKENS, 422, "scopes", {"name": "ci", "scopes": ["all"]})),
)


@pytest.mark.parametrize("case", UNKNOWN_FIELDS)
def test_unknown_fields_are_refused_naming_them(case, admin, refs, db):
    check_refused(case, admin, refs, db)


# --- oversize strings and bad patterns --------------------------------------------------------

OVERSIZE = cases(
    (
        "name_zh of 201 characters",
        Bad("POST", TENANTS, 422, "name_zh", new_agency(name_zh="长" * 201)),
    ),
    (
        "name_en of 201 characters",
        Bad("POST", TENANTS, 422, "name_en", new_agency(name_en="x" * 201)),
    ),
    ("code of 65 characters", Bad("POST", TENANTS, 422, "code", new_agency(code="c" * 65))),
    (
        "description of 1001 characters",
        Bad("POST", TENANTS, 422, "description", new_agency(description="d" * 1001)),
    ),
    (
        "contact_name of 101 characters",
        Bad("POST", TENANTS, 422, "contact_name", new_agency(contact_name="名" * 101)),
    ),
    (
        "name_zh of 201 characters on edit",
        Bad("PATCH", A1, 422, "name_zh", {"name_zh": "长" * 201}),
    ),
    (
        "description of 1001 characters on edit",
        Bad("PATCH", A1, 422, "description", {"description": "d" * 1001}),
    ),
    ("username of 65 characters", Bad("POST", USERS, 422, "username", new_user(username="u" * 65))),
    (
        "display_name of 101 characters",
        Bad("POST", USERS, 422, "display_name", new_user(display_name="x" * 101)),
    ),
    (
        "password of 257 characters",
        Bad("POST", USERS, 422, "password", new_user(password="Pw-9" * 64 + "x")),
    ),
    ("token name of 101 characters", Bad("POST", TOKENS, 422, "name", {"name": "t" * 101})),
)

BAD_PATTERNS = cases(
    ("code with a space", Bad("POST", TENANTS, 422, "code", new_agency(code="new ag"))),
    ("code in Chinese", Bad("POST", TENANTS, 422, "code", new_agency(code="新局"))),
    ("code starting with a dash", Bad("POST", TENANTS, 422, "code", new_agency(code="-ag"))),
    ("empty code", Bad("POST", TENANTS, 422, "code", new_agency(code=""))),
    ("code with a slash", Bad("POST", TENANTS, 422, "code", new_system(code="a/b"))),
    ("username with capitals", Bad("POST", USERS, 422, "username", new_user(username="Alice"))),
    ("username in Chinese", Bad("POST", USERS, 422, "username", new_user(username="张三丰"))),
    ("username with a space", Bad("POST", USERS, 422, "username", new_user(username="li si"))),
    ("username too short", Bad("POST", USERS, 422, "username", new_user(username="ab"))),
    (
        "email without an at sign",
        Bad("POST", USERS, 422, "email", new_user(email="nobody.example.cn")),
    ),
    ("phone in words", Bad("POST", USERS, 422, "phone", new_user(phone="call me"))),
    (
        "contact email with spaces",
        Bad("PATCH", A1, 422, "contact_email", {"contact_email": "a b@c.cn"}),
    ),
    (
        "contact phone with letters",
        Bad("PATCH", A1, 422, "contact_phone", {"contact_phone": "010-ABCD"}),
    ),
)


@pytest.mark.parametrize("case", OVERSIZE)
def test_oversize_strings_are_refused_naming_the_field(case, admin, refs, db):
    check_refused(case, admin, refs, db)


@pytest.mark.parametrize("case", BAD_PATTERNS)
def test_strings_breaking_their_pattern_are_refused_naming_the_field(case, admin, refs, db):
    check_refused(case, admin, refs, db)


def test_strings_exactly_at_their_limits_are_accepted(admin, refs):
    """The limits are inclusive: the refusals above are about length, not about the content."""
    body = new_agency(code="c" * 64, name_zh="长" * 200, name_en="e" * 200, description="d" * 1000)
    resp = admin.post(TENANTS, json=fill(body, refs))
    assert resp.status_code == 201, resp.text
    assert resp.json()["name_zh"] == "长" * 200
    resp = admin.post(USERS, json=fill(new_user(username="u" * 64), refs))
    assert resp.status_code == 201, resp.text


# --- malformed JSON ---------------------------------------------------------------------------

MALFORMED = cases(
    ("truncated object", Bad("POST", TENANTS, 422, "body", content=b'{"code": ')),
    ("not json at all", Bad("POST", TENANTS, 422, "body", content=b"not json")),
    ("trailing comma", Bad("POST", USERS, 422, "body", content=b'{"username": "xyz",}')),
    ("single quotes", Bad("PATCH", A1, 422, "body", content=b"{'name_zh': 'x'}")),
    ("two objects", Bad("POST", BINDINGS, 422, "body", content=b"{}{}")),
    ("invalid utf-8", Bad("POST", TOKENS, 422, "body", content=b'{"name": "\xff\xfe"}')),
)


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_json_is_refused_naming_the_body(case, admin, refs, db):
    """A character offset is not a field: the problem names `body` (and says where it broke)."""
    check_refused(case, admin, refs, db)


# --- references to tenants that cannot take the object ----------------------------------------

BAD_PARENTS = cases(
    (
        "parent that does not exist",
        Bad("POST", TENANTS, 422, "parent_id", new_system(parent="missing")),
    ),
    ("system under a system", Bad("POST", TENANTS, 422, "parent_id", new_system(parent="a1"))),
    (
        "system under the center",
        Bad("POST", TENANTS, 422, "parent_id", new_system(parent="center")),
    ),
    (
        "agency under an agency",
        Bad("POST", TENANTS, 422, "parent_id", new_agency(parent_id="{t[a]}")),
    ),
    (
        "agency under a system",
        Bad("POST", TENANTS, 422, "parent_id", new_agency(parent_id="{t[b1]}")),
    ),
    (
        "system under an archived agency",
        Bad("POST", TENANTS, 422, "parent_id", new_system(parent="old")),
    ),
    (
        "moving a system under a missing parent",
        Bad("PATCH", A1, 422, "parent_id", {"parent_id": "{missing}"}),
    ),
    (
        "moving a system under a system",
        Bad("PATCH", A1, 422, "parent_id", {"parent_id": "{t[b1]}"}),
    ),
    (
        "moving a system under the center",
        Bad("PATCH", A1, 422, "parent_id", {"parent_id": "{t[center]}"}),
    ),
    (
        "moving a system under an archived agency",
        Bad("PATCH", A1, 422, "parent_id", {"parent_id": "{t[old]}"}),
    ),
    (
        "moving an agency under an agency",
        Bad("PATCH", AGENCY_A, 422, "parent_id", {"parent_id": "{t[b]}"}),
    ),
    (
        "giving the center a parent",
        Bad("PATCH", "/api/v1/tenants/{t[center]}", 422, "parent_id", {"parent_id": "{t[a]}"}),
    ),
    (
        "user homed in a missing tenant",
        Bad("POST", USERS, 422, "tenant_id", new_user(tenant_id="{missing}")),
    ),
    (
        "user homed in an archived agency",
        Bad("POST", USERS, 422, "tenant_id", new_user(tenant_id="{t[old]}")),
    ),
    (
        "user moved to a missing tenant",
        Bad("PATCH", MEMBER, 422, "tenant_id", {"tenant_id": "{missing}"}),
    ),
    ("binding at a missing tenant", Bad("POST", BINDINGS, 422, "tenant_id", binding(at="missing"))),
    ("binding at an archived agency", Bad("POST", BINDINGS, 422, "tenant_id", binding(at="old"))),
)

CYCLES = cases(
    ("agency under itself", Bad("PATCH", AGENCY_A, 422, "parent_id", {"parent_id": "{t[a]}"})),
    (
        "agency under its own system",
        Bad("PATCH", AGENCY_A, 422, "parent_id", {"parent_id": "{t[a1]}"}),
    ),
    ("system under itself", Bad("PATCH", A1, 422, "parent_id", {"parent_id": "{t[a1]}"})),
    (
        "renamed and moved under its own child",
        Bad("PATCH", AGENCY_A, 422, "parent_id", {"name_zh": "改名", "parent_id": "{t[a2]}"}),
    ),
    (
        "suspended and moved under itself",
        Bad("PATCH", A1, 422, "parent_id", {"status": "suspended", "parent_id": "{t[a1]}"}),
    ),
)


@pytest.mark.parametrize("case", BAD_PARENTS)
def test_references_to_tenants_that_cannot_hold_the_object_are_refused(case, admin, refs, db):
    check_refused(case, admin, refs, db)


@pytest.mark.parametrize("case", CYCLES)
def test_moving_a_tenant_under_itself_or_its_descendant_is_refused(case, admin, refs, db):
    check_refused(case, admin, refs, db)


# --- duplicates and roles at the wrong kind of tenant -----------------------------------------

DUPLICATES = cases(
    ("tenant code of an agency", Bad("POST", TENANTS, 409, "code", new_agency(code="a"))),
    (
        "tenant code of a system",
        Bad("POST", TENANTS, 409, "code", new_system(parent="b", code="a1")),
    ),
    (
        "tenant code of an archived tenant",
        Bad("POST", TENANTS, 409, "code", new_agency(code="old")),
    ),
    ("username", Bad("POST", USERS, 409, "username", new_user(username="a-member"))),
    (
        "username of the center admin",
        Bad("POST", USERS, 409, "username", new_user(username="admin")),
    ),
    ("role binding", Bad("POST", BINDINGS, 409, "role", binding("a-member", "member", "a1"))),
    (
        "center admin binding",
        Bad("POST", BINDINGS, 409, "role", binding("admin", "center_admin", "center")),
    ),
)

WRONG_KIND = cases(
    (
        "center_admin at an agency",
        Bad("POST", BINDINGS, 422, "role", binding(role="center_admin", at="a")),
    ),
    (
        "center_admin at a system",
        Bad("POST", BINDINGS, 422, "role", binding(role="center_admin", at="a1")),
    ),
    (
        "agency_admin at the center",
        Bad("POST", BINDINGS, 422, "role", binding(role="agency_admin", at="center")),
    ),
    (
        "agency_admin at a system",
        Bad("POST", BINDINGS, 422, "role", binding(role="agency_admin", at="a1")),
    ),
    (
        "member at the center",
        Bad("POST", BINDINGS, 422, "role", binding(role="member", at="center")),
    ),
    ("auditor at a system", Bad("POST", BINDINGS, 422, "role", binding(role="auditor", at="a1"))),
)


@pytest.mark.parametrize("case", DUPLICATES)
def test_duplicates_are_a_conflict_naming_the_field(case, admin, refs, db):
    check_refused(case, admin, refs, db)


@pytest.mark.parametrize("case", WRONG_KIND)
def test_role_bound_at_the_wrong_kind_of_tenant_is_refused_naming_role(case, admin, refs, db):
    check_refused(case, admin, refs, db)


# --- query strings: cursors, limits, enums, time ranges ---------------------------------------

TS = "2026-01-01T00:00:00+00:00"
BAD_CURSORS = cases(
    (
        "garbage on tenants",
        Bad("GET", TENANTS, 422, "cursor", params={"cursor": "!!not-a-cursor!!"}),
    ),
    ("non-ascii on tenants", Bad("GET", TENANTS, 422, "cursor", params={"cursor": "下一页"})),
    ("base64 of no json", Bad("GET", TENANTS, 422, "cursor", params={"cursor": "bm90IGpzb24"})),
    (
        "object instead of list",
        Bad("GET", TENANTS, 422, "cursor", params={"cursor": cursor_of({"code": "a"})}),
    ),
    (
        "two values for tenants",
        Bad("GET", TENANTS, 422, "cursor", params={"cursor": cursor_of(["a", "b"])}),
    ),
    (
        "number for the tenant code",
        Bad("GET", TENANTS, 422, "cursor", params={"cursor": cursor_of([5])}),
    ),
    ("empty list for users", Bad("GET", USERS, 422, "cursor", params={"cursor": cursor_of([])})),
    (
        "null for the username",
        Bad("GET", USERS, 422, "cursor", params={"cursor": cursor_of([None])}),
    ),
    ("longer than 512", Bad("GET", USERS, 422, "cursor", params={"cursor": "A" * 513})),
    (
        "one value for bindings",
        Bad("GET", BINDINGS, 422, "cursor", params={"cursor": cursor_of([TS])}),
    ),
    (
        "naive time for bindings",
        Bad(
            "GET",
            BINDINGS,
            422,
            "cursor",
            params={"cursor": cursor_of(["2026-01-01T00:00:00", MISSING])},
        ),
    ),
    (
        "non-time for bindings",
        Bad("GET", BINDINGS, 422, "cursor", params={"cursor": cursor_of(["yesterday", MISSING])}),
    ),
    (
        "number for the binding time",
        Bad("GET", BINDINGS, 422, "cursor", params={"cursor": cursor_of([17, MISSING])}),
    ),
    (
        "non-uuid string for the binding id",
        Bad("GET", BINDINGS, 422, "cursor", params={"cursor": cursor_of([TS, "x"])}),
    ),
    (
        "number for the binding id",
        Bad("GET", BINDINGS, 422, "cursor", params={"cursor": cursor_of([TS, 5])}),
    ),
    (
        "list for the binding id",
        Bad("GET", BINDINGS, 422, "cursor", params={"cursor": cursor_of([TS, [MISSING]])}),
    ),
    (
        "string for the audit seq",
        Bad("GET", AUDIT, 422, "cursor", params={"cursor": cursor_of(["7"])}),
    ),
    (
        "boolean for the audit seq",
        Bad("GET", AUDIT, 422, "cursor", params={"cursor": cursor_of([True])}),
    ),
    (
        "fraction for the audit seq",
        Bad("GET", AUDIT, 422, "cursor", params={"cursor": cursor_of([1.5])}),
    ),
    (
        "audit seq past 64 bits",
        Bad("GET", AUDIT, 422, "cursor", params={"cursor": cursor_of([2**63])}),
    ),
    (
        "audit seq of 31 digits",
        Bad("GET", AUDIT, 422, "cursor", params={"cursor": cursor_of([10**30])}),
    ),
)

LIMITS = cases(
    *[
        (
            f"limit {value} on {path.rsplit('/', 1)[1]}",
            Bad("GET", path, 422, "limit", params={"limit": value}),
        )
        for path in (TENANTS, USERS, BINDINGS, AUDIT)
        for value in ("0", "-1", "501", "ten")
    ],
    ("fractional limit", Bad("GET", TENANTS, 422, "limit", params={"limit": "2.5"})),
)

BAD_QUERIES = cases(
    ("tenant kind planet", Bad("GET", TENANTS, 422, "kind", params={"kind": "planet"})),
    ("tenant status deleted", Bad("GET", TENANTS, 422, "status", params={"status": "deleted"})),
    ("tenant parent not a uuid", Bad("GET", TENANTS, 422, "parent_id", params={"parent_id": "a"})),
    ("tenant search of 101 characters", Bad("GET", TENANTS, 422, "q", params={"q": "q" * 101})),
    ("user status banned", Bad("GET", USERS, 422, "status", params={"status": "banned"})),
    ("user tenant not a uuid", Bad("GET", USERS, 422, "tenant_id", params={"tenant_id": "a"})),
    ("binding role king", Bad("GET", BINDINGS, 422, "role", params={"role": "king"})),
    ("binding user not a uuid", Bad("GET", BINDINGS, 422, "user_id", params={"user_id": "admin"})),
    ("audit actor_id not a uuid", Bad("GET", AUDIT, 422, "actor_id", params={"actor_id": "admin"})),
    (
        "audit action of 65 characters",
        Bad("GET", AUDIT, 422, "action", params={"action": "a" * 65}),
    ),
    (
        "audit tenant that does not exist",
        Bad("GET", AUDIT, 422, "tenant_id", params={"tenant_id": "{missing}"}),
    ),
    ("naive since", Bad("GET", AUDIT, 422, "since", params={"since": "2026-01-01T00:00:00"})),
    ("naive until", Bad("GET", AUDIT, 422, "until", params={"until": "2026-01-01T00:00:00"})),
    ("since in words", Bad("GET", AUDIT, 422, "since", params={"since": "yesterday"})),
    (
        "until before since",
        Bad(
            "GET",
            AUDIT,
            422,
            "until",
            params={"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
        ),
    ),
    (
        "until equal to since",
        Bad("GET", AUDIT, 422, "until", params={"since": TS, "until": "2026-01-01T08:00:00+08:00"}),
    ),
)


@pytest.mark.parametrize("case", BAD_CURSORS)
def test_cursors_the_list_never_returned_are_refused_naming_cursor(case, admin, refs, db):
    check_refused(case, admin, refs, db)


@pytest.mark.parametrize("case", LIMITS)
def test_limit_out_of_range_is_refused_naming_limit(case, admin, refs, db):
    check_refused(case, admin, refs, db)


@pytest.mark.parametrize("case", BAD_QUERIES)
def test_bad_query_values_are_refused_naming_the_parameter(case, admin, refs, db):
    check_refused(case, admin, refs, db)


def test_limits_at_the_edges_of_the_range_are_accepted(admin):
    for limit in ("1", "500"):
        resp = admin.get(TENANTS, params={"limit": limit})
        assert resp.status_code == 200, resp.text
        assert resp.json()["count"] == min(int(limit), 6)


# --- NUL characters: not storable in PostgreSQL text, so they must be caught before it --------

NUL_INPUT = [
    pytest.param("POST", TENANTS, new_agency(name_zh="甲\x00局"), {}, "name_zh", id="tenant name"),
    pytest.param("PATCH", A1, {"description": "x\x00y"}, {}, "description", id="description"),
    pytest.param(
        "POST", USERS, new_user(display_name="a\x00b"), {}, "display_name", id="user name"
    ),
    pytest.param("POST", TOKENS, {"name": "ci\x00"}, {}, "name", id="token name"),
    pytest.param("GET", TENANTS, None, {"q": "a\x00"}, "q", id="tenant search"),
    pytest.param("GET", USERS, None, {"q": "a\x00"}, "q", id="user search"),
    pytest.param("GET", TENANTS, None, {"cursor": cursor_of(["a\x00"])}, "cursor", id="cursor"),
    pytest.param("GET", AUDIT, None, {"actor": "a\x00"}, "actor", id="audit actor"),
]


@pytest.mark.parametrize(("method", "path", "body", "params", "field_name"), NUL_INPUT)
def test_nul_characters_are_refused_or_stored_but_never_a_500(
    method, path, body, params, field_name, admin, refs, db
):
    """SQLite stores NUL and PostgreSQL refuses it: either answer is fine, a crash is not."""
    before = database_state(db)
    kwargs: dict[str, Any] = {"params": params}
    if body is not None:
        kwargs["json"] = fill(body, refs)
    resp = admin.request(method, fill(path, refs), **kwargs)
    if resp.status_code >= 400:
        assert_problem(resp, 422, field_name)
        assert database_state(db) == before
    else:
        assert resp.status_code in (200, 201), resp.text


# --- random bodies ----------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)

# (method, path, the fields of the endpoint's input model)
# fmt: off
RANDOM_TARGETS = [
    pytest.param("POST", TENANTS, ["parent_id", "kind", "code", "name_zh", "name_en",
                                   "contact_name", "contact_email", "contact_phone",
                                   "description"], id="POST tenants"),
    pytest.param("PATCH", A1, ["name_zh", "name_en", "contact_name", "contact_email",
                               "contact_phone", "description", "parent_id", "status"],
                 id="PATCH system"),
    pytest.param("PATCH", AGENCY_A, ["name_zh", "name_en", "description", "parent_id", "status"],
                 id="PATCH agency"),
    pytest.param("POST", USERS, ["username", "display_name", "email", "phone", "tenant_id",
                                 "password"], id="POST users"),
    pytest.param("PATCH", MEMBER, ["display_name", "email", "phone", "status", "tenant_id"],
                 id="PATCH user"),
    pytest.param("POST", BINDINGS, ["user_id", "role", "tenant_id"], id="POST role-bindings"),
    pytest.param("POST", TOKENS, ["name", "expires_in_days"], id="POST tokens"),
]

PLAUSIBLE_WORDS = [
    "agency", "system", "center", "active", "suspended", "archived", "disabled",
    "center_admin", "agency_admin", "member", "finance", "auditor",
    "a", "a1", "b1", "old", "admin", "a-member", "新系统", "  ",
    "x@example.cn", "+86 10 1234 5678", "Correct-Horse-9-Battery",
]
# fmt: on


def plausible_values(refs: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values that pass some checks, so random bodies also reach the services, not just pydantic."""
    ids = sorted({*refs["t"].values(), *refs["u"].values()})
    return st.one_of(
        st.sampled_from(ids),
        st.sampled_from(PLAUSIBLE_WORDS),
        st.from_regex(r"[a-z0-9][a-z0-9_.-]{2,12}", fullmatch=True),
        st.integers(min_value=-2, max_value=4000),
    )


@pytest.mark.parametrize(("method", "path", "fields"), RANDOM_TARGETS)
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_bodies_never_get_a_server_error(method, path, fields, data, admin, refs, db):
    """Whatever JSON arrives — junk, or the real field names with junk or plausible values —
    the answer is a success or a problem+json 4xx that wrote nothing, never a 500. The estate
    changes as examples succeed (a system gets archived, a user disabled); the rule holds in
    every state."""
    values = JSON_VALUES | plausible_values(refs)
    shaped = st.dictionaries(
        st.sampled_from(fields) | st.text(max_size=10), values, max_size=len(fields) + 1
    )
    body = data.draw(JSON_VALUES | shaped, label="body")
    url = fill(path, refs)
    before = database_state(db)
    resp = admin.request(method, url, json=body)
    assert resp.status_code < 500, f"{method} {url} {body!r}: {resp.status_code} {resp.text}"
    if resp.status_code >= 400:
        assert resp.headers["content-type"].startswith(PROBLEM), resp.headers
        assert database_state(db) == before, f"{method} {url} {body!r}: refused but wrote"
