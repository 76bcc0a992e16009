"""The role × tenant authorization matrix, for every endpoint of the API.

The rule (broker/tenancy/authz.py): outside the caller's scope an object does not exist (404, and
a body field naming it is an invalid reference, 422 — never 403, so probing another agency's ids
tells nothing); inside the scope, a missing right is 403. Writes never escalate: nobody hands out,
revokes or takes over a role they could not grant.

The estate (tests/fixtures/auth.py) plus one user added here:

    center ── a ── a1, a2          admin      center_admin@center   home center
           └─ b ── b1              auditor    auditor@center        home center
                                   finance    finance@center        home center
                                   a-admin    agency_admin@a        home a
                                   a-member   member@a1             home a
                                   a-finance  finance@a             home a
                                   a-auditor  auditor@a             home a
                                   b-admin    agency_admin@b        home b
                                   b-member   member@b1             home b
                                   a1-staff   member@a1             home a1   (added below)

Each matrix row is (user, method, path template, body, expected status[, field the problem names]).
Templates are filled from `refs`: {t[code]} a tenant id, {u[username]} a user id, {rb[username]}
the id of that user's estate role binding, {tok[b-member]} an API token of b-member, {missing} an
id that exists nowhere. Quota cases run on the limits of tests/fixtures/quota.py (`quota_estate`).
Inventory cases add {p} a synced simulator provider, {co} a service company and {srv[...]} its
servers: `a` owned by system a1, `a2` by system a2, `b` by system b1, and `loose`, unmanaged.
Provisioning cases (`prov_refs`) use instead the provider of tests/fixtures/provisioning.py as {p},
its catalog imported, with {srv[a1]} and {srv[b1]} servers built through the service, {job[..]}
the jobs that built them, {pending[..]} requests of a1 and b1 waiting for approval and {item}
the custom-size catalog item.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import date
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from billing import statements
from billing.models import LifecycleKind
from billing.schemas import AdjustmentCreate
from broker.audit.models import AuditEvent
from broker.core.authz import Principal
from broker.inventory import providers, sync
from broker.inventory.models import Server
from broker.inventory.schemas import ServiceCompanyCreate
from broker.provisioning import catalog as prov_catalog
from broker.provisioning.models import CatalogItem
from broker.provisioning.schemas import PolicyUpdate
from broker.tenancy import auth, users
from broker.tenancy.models import RoleBinding, User
from broker.tenancy.schemas import RoleBindingCreate, UserCreate
from quotas import requests as quota_requests
from quotas import service as quota_service
from tests.api.answers import table_rows
from tests.fixtures.auth import ESTATE_USERS, PASSWORD
from tests.fixtures.billing import BILLING_TABLES, local, make_world
from tests.fixtures.billing import SYSTEM as BILLING_SYSTEM
from tests.fixtures.inventory import SimCloud
from tests.fixtures.provisioning import ADMIN

PROBLEM = "application/problem+json"

# --- every endpoint of the API --------------------------------------------------------------------

# (method, route path) exactly as the routers declare them; test_matrix_covers_every_endpoint
# fails when a router gains an endpoint that is not listed here and exercised below.
API_ENDPOINTS: list[tuple[str, str]] = [
    ("POST", "/api/v1/auth/login"),
    ("GET", "/api/v1/me"),
    ("POST", "/api/v1/me/password"),
    ("GET", "/api/v1/tokens"),
    ("POST", "/api/v1/tokens"),
    ("DELETE", "/api/v1/tokens/{token_id}"),
    ("GET", "/api/v1/tenants"),
    ("POST", "/api/v1/tenants"),
    ("GET", "/api/v1/tenants/{tenant_id}"),
    ("PATCH", "/api/v1/tenants/{tenant_id}"),
    ("DELETE", "/api/v1/tenants/{tenant_id}"),
    ("GET", "/api/v1/users"),
    ("POST", "/api/v1/users"),
    ("GET", "/api/v1/users/{user_id}"),
    ("PATCH", "/api/v1/users/{user_id}"),
    ("POST", "/api/v1/users/{user_id}/password"),
    ("POST", "/api/v1/users/{user_id}/unlock"),
    ("GET", "/api/v1/role-bindings"),
    ("POST", "/api/v1/role-bindings"),
    ("GET", "/api/v1/role-bindings/{binding_id}"),
    ("DELETE", "/api/v1/role-bindings/{binding_id}"),
    ("GET", "/api/v1/audit-events"),
    ("GET", "/api/v1/resource-classes"),
    ("GET", "/api/v1/quotas"),
    ("GET", "/api/v1/quotas/{tenant_id}/{resource_class}"),
    ("PUT", "/api/v1/quotas/{tenant_id}/{resource_class}"),
    ("POST", "/api/v1/quotas/check"),
    ("GET", "/api/v1/tenants/{tenant_id}/usage"),
    ("GET", "/api/v1/quota-requests"),
    ("POST", "/api/v1/quota-requests"),
    ("GET", "/api/v1/quota-requests/{request_id}"),
    ("PUT", "/api/v1/quota-requests/{request_id}/attachment"),
    ("GET", "/api/v1/quota-requests/{request_id}/attachment"),
    ("POST", "/api/v1/quota-requests/{request_id}/approve"),
    ("POST", "/api/v1/quota-requests/{request_id}/reject"),
    ("POST", "/api/v1/quota-requests/{request_id}/withdraw"),
    ("GET", "/api/v1/service-companies"),
    ("POST", "/api/v1/service-companies"),
    ("GET", "/api/v1/service-companies/{company_id}"),
    ("PATCH", "/api/v1/service-companies/{company_id}"),
    ("GET", "/api/v1/providers"),
    ("POST", "/api/v1/providers"),
    ("GET", "/api/v1/providers/{provider_id}"),
    ("PATCH", "/api/v1/providers/{provider_id}"),
    ("POST", "/api/v1/providers/{provider_id}/check"),
    ("POST", "/api/v1/providers/{provider_id}/sync"),
    ("GET", "/api/v1/providers/{provider_id}/sync-runs"),
    ("GET", "/api/v1/inventory/hosts"),
    ("GET", "/api/v1/inventory/storage"),
    ("GET", "/api/v1/inventory/capacity"),
    ("GET", "/api/v1/servers"),
    ("GET", "/api/v1/servers/{server_id}"),
    ("POST", "/api/v1/servers/{server_id}/adopt"),
    ("POST", "/api/v1/servers"),
    ("POST", "/api/v1/servers/{server_id}/actions"),
    ("DELETE", "/api/v1/servers/{server_id}"),
    ("GET", "/api/v1/jobs"),
    ("GET", "/api/v1/jobs/{job_id}"),
    ("POST", "/api/v1/jobs/{job_id}/approve"),
    ("POST", "/api/v1/jobs/{job_id}/reject"),
    ("GET", "/api/v1/catalog"),
    ("GET", "/api/v1/providers/{provider_id}/catalog"),
    ("POST", "/api/v1/providers/{provider_id}/catalog/import"),
    ("POST", "/api/v1/providers/{provider_id}/catalog"),
    ("PATCH", "/api/v1/catalog/{item_id}"),
    ("GET", "/api/v1/agencies/{agency_id}/provisioning-policy"),
    ("PUT", "/api/v1/agencies/{agency_id}/provisioning-policy"),
    ("GET", "/api/v1/service-companies/{company_id}/price-catalogs"),
    ("POST", "/api/v1/service-companies/{company_id}/price-catalogs"),
    ("GET", "/api/v1/price-catalogs/{catalog_id}"),
    ("GET", "/api/v1/contracts"),
    ("POST", "/api/v1/contracts"),
    ("GET", "/api/v1/contracts/{contract_id}"),
    ("PATCH", "/api/v1/contracts/{contract_id}"),
    ("GET", "/api/v1/contracts/{contract_id}/burndown"),
    ("POST", "/api/v1/statements/generate"),
    ("GET", "/api/v1/statements"),
    ("GET", "/api/v1/statements/export"),
    ("GET", "/api/v1/statements/{statement_id}"),
    ("GET", "/api/v1/statements/{statement_id}/export"),
    ("POST", "/api/v1/statements/{statement_id}/finalize"),
    ("POST", "/api/v1/statements/{statement_id}/adjustments"),
    ("POST", "/api/v1/adjustments/{adjustment_id}/{decision}"),
    ("GET", "/api/v1/billing/spend"),
    ("GET", "/api/v1/billing/unassigned"),
]
PROBE_ENDPOINTS: list[tuple[str, str]] = [
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
]


# --- matrix rows and how one is run ---------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    user: str
    method: str
    path: str
    body: dict[str, Any] | None
    status: int
    field: str | None = None  # for 422: the input field the problem must name


def rows(*cases: tuple[Any, ...]) -> list[Any]:
    out = []
    for c in cases:
        case = Case(*c)
        ident = f"{case.user} {case.method} {case.path} -> {case.status}"
        if case.body and case.method != "GET":
            ident += " " + ",".join(f"{k}={v}" for k, v in case.body.items())
        out.append(pytest.param(case, id=ident))
    return out


def new_system(parent: str, code: str = "new-sys") -> dict[str, Any]:
    return {"parent_id": f"{{t[{parent}]}}", "kind": "system", "code": code, "name_zh": "新系统"}


def new_agency(code: str = "new-ag") -> dict[str, Any]:
    return {"parent_id": "{t[center]}", "kind": "agency", "code": code, "name_zh": "新局"}


def new_user(home: str, username: str = "new-user") -> dict[str, Any]:
    return {"username": username, "display_name": "新用户", "tenant_id": f"{{t[{home}]}}"}


def binding(user: str, role: str, at: str) -> dict[str, Any]:
    return {"user_id": f"{{u[{user}]}}", "role": role, "tenant_id": f"{{t[{at}]}}"}


NEW_PASSWORD = {"password": "Another-Good-7-Passphrase"}
RENAME = {"name_en": "Renamed"}
SUSPEND = {"status": "suspended"}
USER_EDIT = {"display_name": "Renamed"}
UPLOAD = {"__upload__": "memo.pdf"}  # run() sends this body as a multipart file, not JSON


def fill(value: Any, refs: dict[str, Any]) -> Any:
    if isinstance(value, str):
        return value.format(**refs)
    if isinstance(value, dict):
        return {k: fill(v, refs) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, refs) for v in value]
    return value


def assert_problem(resp: Any, status: int) -> dict[str, Any]:
    """RFC 9457: every error is problem+json carrying status, title and detail."""
    assert resp.headers["content-type"].startswith(PROBLEM), resp.headers["content-type"]
    body = resp.json()
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body  # type: ignore[no-any-return]


def expect(resp: Any, status: int, field: str | None = None) -> None:
    where = f"{resp.request.method} {resp.request.url.path}"
    assert resp.status_code == status, f"{where}: got {resp.status_code}, not {status}: {resp.text}"
    if status >= 400:
        problem = assert_problem(resp, status)
        if field is not None:
            named = {e["field"] for e in problem.get("errors", [])}
            assert field in named, f"{where}: the problem should name {field!r}: {resp.text}"


def audit_count(db: Any) -> int:
    with db.unit_of_work(write=False) as s:
        return int(s.execute(select(func.count()).select_from(AuditEvent)).scalar_one())


# what a refused request must not leave behind: no audit event, and for provisioning no job, no
# quota reservation (a reservation is one row whatever it holds) and no idempotency key
FOOTPRINT = text(
    "SELECT (SELECT count(*) FROM audit_event), (SELECT count(*) FROM job),"
    " (SELECT count(*) FROM reservation), (SELECT count(*) FROM idempotency_key)"
)


def footprint(db: Any) -> tuple[int, ...]:
    with db.unit_of_work(write=False) as s:
        return tuple(s.execute(FOOTPRINT).one())


def run(case: Case, clients: Any, refs: dict[str, Any], db: Any) -> Any:
    before = footprint(db)
    if case.body is UPLOAD:
        payload: dict[str, Any] = {"files": {"file": (UPLOAD["__upload__"], b"%PDF-1.4 v2")}}
    else:
        payload = {"json": fill(case.body, refs)}
    resp = clients[case.user].request(case.method, fill(case.path, refs), **payload)
    expect(resp, case.status, case.field)
    if resp.status_code >= 400:
        assert footprint(db) == before, (
            "a refused request must leave no audit event, job, reservation or key behind"
        )
    return resp


@pytest.fixture
def refs(db, estate, clients) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Ids for the templates; adds a1-staff (homed in system a1) and an API token of b-member."""
    system = Principal.system("test-setup")
    with db.unit_of_work() as s:
        staff = users.create_user(
            s,
            system,
            UserCreate(username="a1-staff", display_name="A1 STAFF", tenant_id=estate.tid("a1")),
        )
        users.create_binding(
            s,
            system,
            RoleBindingCreate(user_id=staff.id, role="member", tenant_id=estate.tid("a1")),
        )
        estate.users["a1-staff"] = staff
        b_member = s.get(User, estate.uid("b-member"))
        token, _ = auth.create_token(
            s, auth.load_principal(s, b_member, method="session"), name="ci", expires_in_days=30
        )
        every_binding = select(RoleBinding.user_id, RoleBinding.id)  # type: ignore[call-overload]
        binding_of = {uid: bid for uid, bid in s.execute(every_binding).all()}
    return {
        "t": {code: str(t.id) for code, t in estate.tenants.items()},
        "u": {name: str(u.id) for name, u in estate.users.items()},
        "rb": {name: str(binding_of[u.id]) for name, u in estate.users.items()},
        "tok": {"b-member": str(token.id)},
        "missing": str(uuid.uuid4()),
    }


# --- agency A's administrator and agency B's objects ----------------------------------------------

# fmt: off
OTHER_AGENCY_OBJECTS = rows(
    ("a-admin", "GET", "/api/v1/tenants/{t[b]}", None, 404),
    ("a-admin", "GET", "/api/v1/tenants/{t[b1]}", None, 404),
    ("a-admin", "PATCH", "/api/v1/tenants/{t[b]}", RENAME, 404),
    ("a-admin", "PATCH", "/api/v1/tenants/{t[b1]}", RENAME, 404),
    ("a-admin", "PATCH", "/api/v1/tenants/{t[b]}", SUSPEND, 404),
    ("a-admin", "PATCH", "/api/v1/tenants/{t[b1]}", SUSPEND, 404),
    ("a-admin", "DELETE", "/api/v1/tenants/{t[b]}", None, 404),
    ("a-admin", "DELETE", "/api/v1/tenants/{t[b1]}", None, 404),
    ("a-admin", "GET", "/api/v1/users/{u[b-member]}", None, 404),
    ("a-admin", "PATCH", "/api/v1/users/{u[b-member]}", USER_EDIT, 404),
    ("a-admin", "POST", "/api/v1/users/{u[b-member]}/password", NEW_PASSWORD, 404),
    ("a-admin", "POST", "/api/v1/users/{u[b-member]}/unlock", None, 404),
    ("a-admin", "GET", "/api/v1/users/{u[b-admin]}", None, 404),
    ("a-admin", "PATCH", "/api/v1/users/{u[b-admin]}", USER_EDIT, 404),
    ("a-admin", "POST", "/api/v1/users/{u[b-admin]}/password", NEW_PASSWORD, 404),
    ("a-admin", "POST", "/api/v1/users/{u[b-admin]}/unlock", None, 404),
    ("a-admin", "GET", "/api/v1/role-bindings/{rb[b-admin]}", None, 404),
    ("a-admin", "DELETE", "/api/v1/role-bindings/{rb[b-admin]}", None, 404),
    ("a-admin", "GET", "/api/v1/role-bindings/{rb[b-member]}", None, 404),
    ("a-admin", "DELETE", "/api/v1/role-bindings/{rb[b-member]}", None, 404),
    # binding someone of agency B anywhere: the user is not there to bind
    ("a-admin", "POST", "/api/v1/role-bindings", binding("b-member", "member", "a1"), 404),
    ("a-admin", "POST", "/api/v1/role-bindings", binding("b-member", "member", "b1"), 404),
)
# fmt: on


@pytest.mark.parametrize("case", OTHER_AGENCY_OBJECTS)
def test_agency_admin_gets_404_on_other_agency_objects(case, clients, refs, db):
    run(case, clients, refs, db)


# A body that points into agency B is an invalid reference — the same answer as for an id that
# exists nowhere — and never a 403 that would confirm the object exists.
# fmt: off
PLACING_INTO_OTHER_AGENCY = rows(
    ("a-admin", "POST", "/api/v1/tenants", new_system("b"), 422, "parent_id"),
    ("a-admin", "POST", "/api/v1/users", new_user("b"), 422, "tenant_id"),
    ("a-admin", "POST", "/api/v1/users", new_user("b1"), 422, "tenant_id"),
    ("a-admin", "POST", "/api/v1/role-bindings", binding("a-member", "member", "b1"), 422,
     "tenant_id"),
    ("a-admin", "POST", "/api/v1/role-bindings", binding("a-finance", "agency_admin", "b"), 422,
     "tenant_id"),
    ("a-admin", "PATCH", "/api/v1/tenants/{t[a1]}", {"parent_id": "{t[b]}"}, 422, "parent_id"),
    ("a-admin", "PATCH", "/api/v1/users/{u[a-member]}", {"tenant_id": "{t[b]}"}, 422, "tenant_id"),
)
# fmt: on


@pytest.mark.parametrize("case", PLACING_INTO_OTHER_AGENCY)
def test_agency_admin_cannot_place_anything_in_other_agency(case, clients, refs, db):
    run(case, clients, refs, db)


# (method, path with agency B's object, the same with an id that exists nowhere, body)
# fmt: off
HIDDEN_VS_MISSING = [
    ("GET", "/api/v1/tenants/{t[b]}", "/api/v1/tenants/{missing}", None),
    ("PATCH", "/api/v1/tenants/{t[b1]}", "/api/v1/tenants/{missing}", RENAME),
    ("PATCH", "/api/v1/tenants/{t[b]}", "/api/v1/tenants/{missing}", SUSPEND),
    ("DELETE", "/api/v1/tenants/{t[b]}", "/api/v1/tenants/{missing}", None),
    ("GET", "/api/v1/users/{u[b-member]}", "/api/v1/users/{missing}", None),
    ("POST", "/api/v1/users/{u[b-admin]}/password", "/api/v1/users/{missing}/password",
     NEW_PASSWORD),
    ("GET", "/api/v1/role-bindings/{rb[b-admin]}", "/api/v1/role-bindings/{missing}", None),
    ("DELETE", "/api/v1/role-bindings/{rb[b-admin]}", "/api/v1/role-bindings/{missing}", None),
    ("POST", "/api/v1/tenants", "/api/v1/tenants", "parent"),
    ("POST", "/api/v1/users", "/api/v1/users", "home"),
    ("POST", "/api/v1/role-bindings", "/api/v1/role-bindings", "scope"),
    ("POST", "/api/v1/role-bindings", "/api/v1/role-bindings", "grantee"),
]
# fmt: on
_BODIES_POINTING = {
    "parent": lambda where: new_system(where),
    "home": lambda where: new_user(where),
    "scope": lambda where: binding("a-member", "member", where),
    "grantee": lambda where: {
        "user_id": f"{{u[{where}]}}",
        "role": "member",
        "tenant_id": "{t[a1]}",
    },
}


@pytest.mark.parametrize(
    ("method", "hidden", "missing", "body"),
    HIDDEN_VS_MISSING,
    ids=[f"{m} {h} {b if isinstance(b, str) else ''}".strip() for m, h, _, b in HIDDEN_VS_MISSING],
)
def test_other_agency_objects_look_exactly_like_missing_ones(
    method, hidden, missing, body, clients, refs
):
    """Status, type, title and detail (ids aside) are the same, so a probe learns nothing."""
    refs = {
        **refs,
        "t": {**refs["t"], "nowhere": refs["missing"]},
        "u": {**refs["u"], "nowhere": refs["missing"]},
    }
    if isinstance(body, str):
        other = "b-member" if body == "grantee" else "b"
        hidden_body, missing_body = _BODIES_POINTING[body](other), _BODIES_POINTING[body]("nowhere")
    else:
        hidden_body = missing_body = body

    def answer(path: str, payload: Any) -> dict[str, Any]:
        resp = clients["a-admin"].request(method, fill(path, refs), json=fill(payload, refs))
        problem = assert_problem(resp, resp.status_code)
        assert resp.status_code in (404, 422)
        shown = {k: v for k, v in problem.items() if k not in ("instance", "request_id")}
        text = re.sub(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", "<id>", repr(shown))
        return {"status": resp.status_code, "problem": text}

    assert answer(hidden, hidden_body) == answer(missing, missing_body)


# --- agency administrators inside their own agency ------------------------------------------------

# fmt: off
AGENCY_ADMIN_OWN_AGENCY = rows(
    # systems inside the agency are theirs to create, edit, suspend and delete
    ("a-admin", "GET", "/api/v1/tenants/{t[a]}", None, 200),
    ("a-admin", "POST", "/api/v1/tenants", new_system("a"), 201),
    ("a-admin", "PATCH", "/api/v1/tenants/{t[a1]}", RENAME, 200),
    ("a-admin", "PATCH", "/api/v1/tenants/{t[a1]}", SUSPEND, 200),
    ("a-admin", "DELETE", "/api/v1/tenants/{t[a2]}", None, 204),
    # the agency itself belongs to the center: visible, so 403
    ("a-admin", "PATCH", "/api/v1/tenants/{t[a]}", RENAME, 403),
    ("a-admin", "PATCH", "/api/v1/tenants/{t[a]}", SUSPEND, 403),
    ("a-admin", "DELETE", "/api/v1/tenants/{t[a]}", None, 403),
    # the center (and so creating agencies under it) lies outside an agency admin's scope
    ("a-admin", "GET", "/api/v1/tenants/{t[center]}", None, 404),
    ("a-admin", "PATCH", "/api/v1/tenants/{t[center]}", RENAME, 404),
    ("a-admin", "DELETE", "/api/v1/tenants/{t[center]}", None, 404),
    ("a-admin", "POST", "/api/v1/tenants", new_agency(), 422, "parent_id"),
    # users and bindings homed in the agency
    ("a-admin", "POST", "/api/v1/users", new_user("a"), 201),
    ("a-admin", "POST", "/api/v1/users", new_user("a1"), 201),
    ("a-admin", "GET", "/api/v1/users/{u[a1-staff]}", None, 200),
    ("a-admin", "PATCH", "/api/v1/users/{u[a-member]}", USER_EDIT, 200),
    ("a-admin", "POST", "/api/v1/users/{u[a-member]}/password", NEW_PASSWORD, 200),
    ("a-admin", "POST", "/api/v1/users/{u[a-member]}/unlock", None, 200),
    ("a-admin", "POST", "/api/v1/role-bindings", binding("a-finance", "member", "a1"), 201),
    ("a-admin", "POST", "/api/v1/role-bindings", binding("a-member", "agency_admin", "a"), 201),
    ("a-admin", "GET", "/api/v1/role-bindings/{rb[a-member]}", None, 200),
    ("a-admin", "DELETE", "/api/v1/role-bindings/{rb[a-member]}", None, 204),
    ("a-admin", "GET", "/api/v1/audit-events", None, 403),
)
# fmt: on


@pytest.mark.parametrize("case", AGENCY_ADMIN_OWN_AGENCY)
def test_agency_admin_manages_systems_and_users_of_own_agency_but_not_the_agency(
    case, clients, refs, db
):
    run(case, clients, refs, db)


# --- privilege escalation -------------------------------------------------------------------------

# fmt: off
ESCALATION = rows(
    ("a-admin", "POST", "/api/v1/role-bindings", binding("a-member", "center_admin", "a"), 403),
    ("a-admin", "POST", "/api/v1/role-bindings", binding("a-member", "auditor", "a"), 403),
    ("a-admin", "POST", "/api/v1/role-bindings", binding("a-member", "center_admin", "center"),
     422, "tenant_id"),
    ("a-admin", "POST", "/api/v1/role-bindings", binding("a-member", "agency_admin", "center"),
     422, "tenant_id"),
    # a-auditor holds auditor@a, which an agency admin cannot grant: no takeover, no revoking
    ("a-admin", "POST", "/api/v1/users/{u[a-auditor]}/password", NEW_PASSWORD, 403),
    ("a-admin", "PATCH", "/api/v1/users/{u[a-auditor]}", {"status": "disabled"}, 403),
    ("a-admin", "DELETE", "/api/v1/role-bindings/{rb[a-auditor]}", None, 403),
    # a member cannot hand out anything, not even inside its own system
    ("a-member", "POST", "/api/v1/role-bindings", binding("a1-staff", "member", "a1"), 403),
    ("b-admin", "POST", "/api/v1/role-bindings", binding("b-member", "center_admin", "b"), 403),
)
# fmt: on


@pytest.mark.parametrize("case", ESCALATION)
def test_agency_admin_cannot_grant_or_take_over_roles_it_could_not_grant(case, clients, refs, db):
    run(case, clients, refs, db)


@pytest.mark.parametrize(
    ("role", "scope"), [("center_admin", "center"), ("auditor", "center"), ("agency_admin", "b")]
)
def test_agency_admin_cannot_reset_password_of_own_user_holding_a_higher_or_foreign_role(
    role, scope, clients, refs, db
):
    """a-finance is homed in agency a; once it also holds `role` at `scope`, taking over its
    account through a password reset (or editing it) would hand a-admin that role."""
    granted = clients["admin"].post(
        "/api/v1/role-bindings", json=fill(binding("a-finance", role, scope), refs)
    )
    expect(granted, 201)
    for case in rows(
        ("a-admin", "POST", "/api/v1/users/{u[a-finance]}/password", NEW_PASSWORD, 403),
        ("a-admin", "PATCH", "/api/v1/users/{u[a-finance]}", USER_EDIT, 403),
        ("a-admin", "GET", "/api/v1/users/{u[a-finance]}", None, 200),
    ):
        run(case.values[0], clients, refs, db)


# --- members --------------------------------------------------------------------------------------

# fmt: off
MEMBER = rows(
    # a-member's scope is system a1: a1 and what is homed there
    ("a-member", "GET", "/api/v1/tenants/{t[a1]}", None, 200),
    ("a-member", "PATCH", "/api/v1/tenants/{t[a1]}", RENAME, 403),
    # status is decided one level up, at agency a, but a1 itself is visible: 403, not 404
    ("a-member", "PATCH", "/api/v1/tenants/{t[a1]}", SUSPEND, 403),
    ("a-member", "DELETE", "/api/v1/tenants/{t[a1]}", None, 403),
    ("a-member", "GET", "/api/v1/users/{u[a1-staff]}", None, 200),
    ("a-member", "POST", "/api/v1/users", new_user("a1"), 403),
    ("a-member", "PATCH", "/api/v1/users/{u[a1-staff]}", USER_EDIT, 403),
    ("a-member", "POST", "/api/v1/users/{u[a1-staff]}/password", NEW_PASSWORD, 403),
    ("a-member", "POST", "/api/v1/users/{u[a1-staff]}/unlock", None, 403),
    ("a-member", "DELETE", "/api/v1/role-bindings/{rb[a1-staff]}", None, 403),
    ("a-member", "GET", "/api/v1/audit-events", None, 403),
    # the agency above the system, its sibling a2 and everything homed at `a` are outside it
    ("a-member", "GET", "/api/v1/tenants/{t[a]}", None, 404),
    ("a-member", "GET", "/api/v1/tenants/{t[a2]}", None, 404),
    ("a-member", "POST", "/api/v1/tenants", new_system("a"), 422, "parent_id"),
    ("a-member", "POST", "/api/v1/users", new_user("a"), 422, "tenant_id"),
    ("a-member", "GET", "/api/v1/users/{u[a-admin]}", None, 404),
    ("a-member", "PATCH", "/api/v1/users/{u[a-admin]}", USER_EDIT, 404),
    ("a-member", "POST", "/api/v1/users/{u[a-finance]}/password", NEW_PASSWORD, 404),
    ("a-member", "POST", "/api/v1/users/{u[a-finance]}/unlock", None, 404),
    ("a-member", "GET", "/api/v1/role-bindings/{rb[a-admin]}", None, 404),
    ("a-member", "DELETE", "/api/v1/role-bindings/{rb[a-admin]}", None, 404),
    ("b-member", "GET", "/api/v1/tenants/{t[b]}", None, 404),
    ("b-member", "GET", "/api/v1/tenants/{t[a1]}", None, 404),
)
# fmt: on


@pytest.mark.parametrize("case", MEMBER)
def test_member_cannot_manage_users_or_tenants(case, clients, refs, db):
    run(case, clients, refs, db)


# A member's own account is homed at agency a, outside its a1 scope — but the member can read it
# (GET /users/<self> is 200), so refusing to manage it must be 403: a 404 would deny the existence
# of an object the caller has just been shown.
# fmt: off
MEMBER_SELF = rows(
    ("a-member", "GET", "/api/v1/users/{u[a-member]}", None, 200),
    ("a-member", "PATCH", "/api/v1/users/{u[a-member]}", USER_EDIT, 403),
    ("a-member", "POST", "/api/v1/users/{u[a-member]}/password", NEW_PASSWORD, 403),
    ("a-member", "POST", "/api/v1/users/{u[a-member]}/unlock", None, 403),
)
# fmt: on


@pytest.mark.parametrize("case", MEMBER_SELF)
def test_member_managing_own_account_through_admin_endpoints_gets_403_not_404(
    case, clients, refs, db
):
    run(case, clients, refs, db)


# --- auditors -------------------------------------------------------------------------------------

# fmt: off
AUDITOR_READS = rows(
    ("auditor", "GET", "/api/v1/tenants", None, 200),
    ("auditor", "GET", "/api/v1/tenants/{t[center]}", None, 200),
    ("auditor", "GET", "/api/v1/tenants/{t[b1]}", None, 200),
    ("auditor", "GET", "/api/v1/users", None, 200),
    ("auditor", "GET", "/api/v1/users/{u[b-member]}", None, 200),
    ("auditor", "GET", "/api/v1/users/{u[admin]}", None, 200),
    ("auditor", "GET", "/api/v1/role-bindings", None, 200),
    ("auditor", "GET", "/api/v1/role-bindings/{rb[b-member]}", None, 200),
    ("auditor", "GET", "/api/v1/role-bindings/{rb[admin]}", None, 200),
    ("auditor", "GET", "/api/v1/audit-events", None, 200),
    ("a-auditor", "GET", "/api/v1/tenants/{t[a1]}", None, 200),
    ("a-auditor", "GET", "/api/v1/users/{u[a-admin]}", None, 200),
    ("a-auditor", "GET", "/api/v1/role-bindings/{rb[a1-staff]}", None, 200),
    ("a-auditor", "GET", "/api/v1/audit-events", None, 200),
    ("a-auditor", "GET", "/api/v1/tenants/{t[b]}", None, 404),
    ("a-auditor", "GET", "/api/v1/users/{u[b-member]}", None, 404),
)
# fmt: on


@pytest.mark.parametrize("case", AUDITOR_READS)
def test_auditor_reads_everything_in_scope(case, clients, refs, db):
    run(case, clients, refs, db)


# fmt: off
AUDITOR_WRITES = rows(
    ("auditor", "POST", "/api/v1/tenants", new_agency(), 403),
    ("auditor", "POST", "/api/v1/tenants", new_system("b"), 403),
    ("auditor", "PATCH", "/api/v1/tenants/{t[center]}", RENAME, 403),
    ("auditor", "PATCH", "/api/v1/tenants/{t[b]}", RENAME, 403),
    ("auditor", "PATCH", "/api/v1/tenants/{t[b]}", SUSPEND, 403),
    ("auditor", "PATCH", "/api/v1/tenants/{t[a1]}", RENAME, 403),
    ("auditor", "DELETE", "/api/v1/tenants/{t[a2]}", None, 403),
    ("auditor", "POST", "/api/v1/users", new_user("b"), 403),
    ("auditor", "PATCH", "/api/v1/users/{u[b-member]}", USER_EDIT, 403),
    ("auditor", "POST", "/api/v1/users/{u[b-member]}/password", NEW_PASSWORD, 403),
    ("auditor", "POST", "/api/v1/users/{u[b-member]}/unlock", None, 403),
    ("auditor", "POST", "/api/v1/role-bindings", binding("b-admin", "member", "b1"), 403),
    ("auditor", "DELETE", "/api/v1/role-bindings/{rb[b-member]}", None, 403),
    ("a-auditor", "POST", "/api/v1/tenants", new_system("a"), 403),
    ("a-auditor", "PATCH", "/api/v1/tenants/{t[a1]}", RENAME, 403),
    ("a-auditor", "POST", "/api/v1/users", new_user("a"), 403),
    ("a-auditor", "POST", "/api/v1/users/{u[a-member]}/password", NEW_PASSWORD, 403),
    ("a-auditor", "POST", "/api/v1/role-bindings", binding("a-member", "member", "a2"), 403),
    ("a-auditor", "DELETE", "/api/v1/role-bindings/{rb[a-member]}", None, 403),
)
# fmt: on


@pytest.mark.parametrize("case", AUDITOR_WRITES)
def test_auditor_gets_403_on_every_write(case, clients, refs, db):
    run(case, clients, refs, db)


# --- finance --------------------------------------------------------------------------------------

# fmt: off
FINANCE = rows(
    ("finance", "GET", "/api/v1/tenants/{t[center]}", None, 200),
    ("finance", "GET", "/api/v1/tenants/{t[b1]}", None, 200),
    ("finance", "GET", "/api/v1/users/{u[a-admin]}", None, 403),
    ("finance", "POST", "/api/v1/tenants", new_agency(), 403),
    ("finance", "POST", "/api/v1/tenants", new_system("a"), 403),
    ("finance", "PATCH", "/api/v1/tenants/{t[a]}", RENAME, 403),
    ("finance", "PATCH", "/api/v1/tenants/{t[a1]}", SUSPEND, 403),
    ("finance", "DELETE", "/api/v1/tenants/{t[a2]}", None, 403),
    ("finance", "POST", "/api/v1/users", new_user("a"), 403),
    ("finance", "PATCH", "/api/v1/users/{u[a-member]}", USER_EDIT, 403),
    ("finance", "POST", "/api/v1/users/{u[a-member]}/password", NEW_PASSWORD, 403),
    ("finance", "POST", "/api/v1/users/{u[a-member]}/unlock", None, 403),
    ("finance", "POST", "/api/v1/role-bindings", binding("a-member", "member", "a2"), 403),
    ("finance", "GET", "/api/v1/role-bindings/{rb[a-member]}", None, 403),
    ("finance", "DELETE", "/api/v1/role-bindings/{rb[a-member]}", None, 403),
    ("finance", "GET", "/api/v1/audit-events", None, 403),
    ("a-finance", "GET", "/api/v1/tenants/{t[a1]}", None, 200),
    ("a-finance", "GET", "/api/v1/tenants/{t[b]}", None, 404),
    ("a-finance", "GET", "/api/v1/users/{u[a-member]}", None, 403),
    ("a-finance", "GET", "/api/v1/users/{u[b-member]}", None, 404),
    ("a-finance", "POST", "/api/v1/tenants", new_system("a"), 403),
    ("a-finance", "PATCH", "/api/v1/tenants/{t[a]}", RENAME, 403),
    ("a-finance", "POST", "/api/v1/users", new_user("a"), 403),
    ("a-finance", "PATCH", "/api/v1/users/{u[a-member]}", USER_EDIT, 403),
    ("a-finance", "POST", "/api/v1/role-bindings", binding("a-member", "member", "a2"), 403),
    ("a-finance", "DELETE", "/api/v1/role-bindings/{rb[b-member]}", None, 404),
    ("a-finance", "GET", "/api/v1/audit-events", None, 403),
)
# fmt: on


@pytest.mark.parametrize("case", FINANCE)
def test_finance_reads_tenants_but_manages_nothing_and_cannot_read_audit(case, clients, refs, db):
    run(case, clients, refs, db)


# --- the center administrator ---------------------------------------------------------------------

# fmt: off
CENTER_ADMIN = rows(
    ("admin", "POST", "/api/v1/tenants", new_agency(), 201),
    ("admin", "POST", "/api/v1/tenants", new_system("b"), 201),
    ("admin", "GET", "/api/v1/tenants/{t[b1]}", None, 200),
    ("admin", "PATCH", "/api/v1/tenants/{t[center]}", RENAME, 200),
    ("admin", "PATCH", "/api/v1/tenants/{t[b]}", RENAME, 200),
    ("admin", "PATCH", "/api/v1/tenants/{t[b]}", SUSPEND, 200),
    ("admin", "PATCH", "/api/v1/tenants/{t[a1]}", {"parent_id": "{t[b]}"}, 200),
    ("admin", "DELETE", "/api/v1/tenants/{t[a2]}", None, 204),
    ("admin", "POST", "/api/v1/users", new_user("b1"), 201),
    ("admin", "GET", "/api/v1/users/{u[b-member]}", None, 200),
    ("admin", "PATCH", "/api/v1/users/{u[b-admin]}", USER_EDIT, 200),
    ("admin", "POST", "/api/v1/users/{u[auditor]}/password", NEW_PASSWORD, 200),
    ("admin", "POST", "/api/v1/users/{u[b-member]}/unlock", None, 200),
    ("admin", "POST", "/api/v1/role-bindings", binding("a-finance", "center_admin", "center"),
     201),
    ("admin", "POST", "/api/v1/role-bindings", binding("b-member", "auditor", "a"), 201),
    ("admin", "GET", "/api/v1/role-bindings/{rb[b-admin]}", None, 200),
    ("admin", "DELETE", "/api/v1/role-bindings/{rb[auditor]}", None, 204),
    ("admin", "GET", "/api/v1/audit-events", None, 200),
)
# fmt: on


@pytest.mark.parametrize("case", CENTER_ADMIN)
def test_center_admin_can_do_everything(case, clients, refs, db):
    run(case, clients, refs, db)


# --- quotas ---------------------------------------------------------------------------------------

VCPU_30 = {"limit": 30}
FITS_1_VCPU = {"deltas": {"vcpu": 1}}


def fit_check(at: str) -> dict[str, Any]:
    return {"tenant_id": f"{{t[{at}]}}", **FITS_1_VCPU}


# Reading quotas is common to every role in scope; a system's limit is split by its agency's
# administrators, an agency's and the center's are set by center administrators.
# fmt: off
QUOTAS = rows(
    *[(u, "GET", "/api/v1/resource-classes", None, 200) for u in ("a-member", "finance")],
    ("admin", "PUT", "/api/v1/quotas/{t[b]}/vcpu", {"limit": 60}, 200),
    ("admin", "PUT", "/api/v1/quotas/{t[a1]}/vcpu", {"limit": 30, "force": True}, 200),
    ("auditor", "GET", "/api/v1/quotas/{t[b]}/vcpu", None, 200),
    ("auditor", "GET", "/api/v1/tenants/{t[b]}/usage", None, 200),
    ("auditor", "PUT", "/api/v1/quotas/{t[a1]}/vcpu", VCPU_30, 403),
    ("auditor", "PUT", "/api/v1/quotas/{t[a]}/vcpu", VCPU_30, 403),
    ("finance", "GET", "/api/v1/quotas/{t[a1]}/vcpu", None, 200),
    ("finance", "POST", "/api/v1/quotas/check", fit_check("b"), 200),
    ("finance", "PUT", "/api/v1/quotas/{t[a1]}/vcpu", VCPU_30, 403),
    ("a-admin", "GET", "/api/v1/quotas", None, 200),
    ("a-admin", "GET", "/api/v1/quotas/{t[a]}/vcpu", None, 200),
    ("a-admin", "GET", "/api/v1/tenants/{t[a]}/usage", None, 200),
    ("a-admin", "PUT", "/api/v1/quotas/{t[a1]}/vcpu", VCPU_30, 200),
    ("a-admin", "PUT", "/api/v1/quotas/{t[a1]}/vcpu", {"limit": 30, "force": True}, 403),
    # the agency's own limit is the center's to set; the agency is visible, so 403, not 404
    ("a-admin", "PUT", "/api/v1/quotas/{t[a]}/vcpu", VCPU_30, 403),
    ("a-admin", "GET", "/api/v1/quotas/{t[b]}/vcpu", None, 404),
    ("a-admin", "PUT", "/api/v1/quotas/{t[b1]}/vcpu", VCPU_30, 404),
    ("a-admin", "PUT", "/api/v1/quotas/{t[center]}/vcpu", VCPU_30, 404),
    ("a-admin", "GET", "/api/v1/tenants/{t[b]}/usage", None, 404),
    ("a-admin", "POST", "/api/v1/quotas/check", fit_check("b1"), 404),
    ("a-member", "GET", "/api/v1/quotas/{t[a1]}/vcpu", None, 200),
    ("a-member", "POST", "/api/v1/quotas/check", fit_check("a1"), 200),
    ("a-member", "GET", "/api/v1/tenants/{t[a1]}/usage", None, 200),
    # a1 is visible to its member, who may not split quota: 403, not 404
    ("a-member", "PUT", "/api/v1/quotas/{t[a1]}/vcpu", VCPU_30, 403),
    ("a-member", "GET", "/api/v1/quotas/{t[a]}/vcpu", None, 404),
    ("b-member", "GET", "/api/v1/tenants/{t[a]}/usage", None, 404),
)
# fmt: on


@pytest.mark.parametrize("case", QUOTAS)
def test_quotas_are_read_in_scope_and_set_only_by_the_level_above(
    case, quota_estate, clients, refs, db
):
    run(case, clients, refs, db)


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("admin", {"center", "a", "a1", "b"}),
        ("finance", {"center", "a", "a1", "b"}),
        ("a-admin", {"a", "a1"}),
        ("a-member", {"a1"}),
        ("b-member", set()),
    ],
)
def test_quota_list_shows_only_tenants_in_scope(user, expected, quota_estate, clients, refs):
    resp = clients[user].get("/api/v1/quotas")
    expect(resp, 200)
    assert {q["tenant_code"] for q in resp.json()["data"]} == expected


# --- quota change requests: an agency asks, the center decides ------------------------------------

MORE_VCPU = {"changes": {"vcpu": 10}, "justification": "new tax system goes live"}


def ask(at: str) -> dict[str, Any]:
    return {"tenant_id": f"{{t[{at}]}}", **MORE_VCPU}


@pytest.fixture
def qr_refs(refs, quota_estate, db) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """refs plus {qr[a]} and {qr[b]}: a pending request of each agency, each with an attachment."""
    ids = {}
    with db.unit_of_work() as s:
        for agency in ("a", "b"):
            asker = auth.load_principal(
                s, s.get(User, quota_estate.uid(f"{agency}-admin")), method="session"
            )
            req = quota_requests.create(
                s,
                asker,
                tenant_id=quota_estate.tid(agency),
                changes={"vcpu": 10},
                justification="capacity for the new system",
            )
            quota_requests.attach(
                s,
                asker,
                req.id,
                filename="memo.pdf",
                content_type="application/pdf",
                content=b"%PDF-1.4 memo",
            )
            ids[agency] = str(req.id)
    return {**refs, "qr": ids}


# fmt: off
QUOTA_REQUESTS = rows(
    ("a-admin", "GET", "/api/v1/quota-requests", None, 200),
    ("a-admin", "POST", "/api/v1/quota-requests", ask("a"), 201),
    ("a-admin", "GET", "/api/v1/quota-requests/{qr[a]}", None, 200),
    ("a-admin", "GET", "/api/v1/quota-requests/{qr[a]}/attachment", None, 200),
    ("a-admin", "PUT", "/api/v1/quota-requests/{qr[a]}/attachment", UPLOAD, 200),
    ("a-admin", "POST", "/api/v1/quota-requests/{qr[a]}/withdraw", None, 200),
    # deciding is the center's, and the request is visible: 403
    ("a-admin", "POST", "/api/v1/quota-requests/{qr[a]}/approve", {}, 403),
    ("a-admin", "POST", "/api/v1/quota-requests/{qr[a]}/reject", {"reason": "no"}, 403),
    # agency B's request does not exist for agency A
    ("a-admin", "POST", "/api/v1/quota-requests", ask("b"), 422, "tenant_id"),
    ("a-admin", "GET", "/api/v1/quota-requests/{qr[b]}", None, 404),
    ("a-admin", "GET", "/api/v1/quota-requests/{qr[b]}/attachment", None, 404),
    ("a-admin", "PUT", "/api/v1/quota-requests/{qr[b]}/attachment", UPLOAD, 404),
    ("a-admin", "POST", "/api/v1/quota-requests/{qr[b]}/withdraw", None, 404),
    ("a-admin", "POST", "/api/v1/quota-requests/{qr[b]}/approve", {}, 404),
    ("a-admin", "POST", "/api/v1/quota-requests/{qr[b]}/reject", {"reason": "no"}, 404),
    ("a-member", "GET", "/api/v1/quota-requests/{qr[a]}", None, 404),
    ("a-member", "POST", "/api/v1/quota-requests", ask("a"), 422, "tenant_id"),
    ("a-finance", "GET", "/api/v1/quota-requests/{qr[a]}", None, 200),
    ("a-finance", "POST", "/api/v1/quota-requests", ask("a"), 403),
    ("a-finance", "PUT", "/api/v1/quota-requests/{qr[a]}/attachment", UPLOAD, 403),
    ("a-finance", "POST", "/api/v1/quota-requests/{qr[a]}/withdraw", None, 403),
    ("auditor", "GET", "/api/v1/quota-requests/{qr[b]}", None, 200),
    ("auditor", "GET", "/api/v1/quota-requests/{qr[b]}/attachment", None, 200),
    ("auditor", "POST", "/api/v1/quota-requests", ask("a"), 403),
    ("auditor", "POST", "/api/v1/quota-requests/{qr[b]}/withdraw", None, 403),
    ("auditor", "POST", "/api/v1/quota-requests/{qr[b]}/approve", {}, 403),
    ("auditor", "POST", "/api/v1/quota-requests/{qr[b]}/reject", {"reason": "no"}, 403),
    ("admin", "POST", "/api/v1/quota-requests/{qr[a]}/approve", {}, 200),
    ("admin", "POST", "/api/v1/quota-requests/{qr[b]}/reject", {"reason": "not this year"}, 200),
)
# fmt: on


@pytest.mark.parametrize("case", QUOTA_REQUESTS)
def test_agencies_ask_for_quota_and_only_the_center_decides(case, qr_refs, clients, db):
    run(case, clients, qr_refs, db)


@pytest.mark.parametrize(
    ("user", "expected"),
    [("admin", {"a", "b"}), ("finance", {"a", "b"}), ("a-admin", {"a"}), ("b-member", set())],
)
def test_quota_request_list_shows_only_requests_in_scope(user, expected, qr_refs, clients):
    agency_of = {qr_refs["t"][c]: c for c in ("a", "b")}
    got = _all_pages(clients[user], "/api/v1/quota-requests", "tenant_id")
    assert {agency_of[t] for t in got} == expected


# --- inventory: the center's business; servers wherever server.read holds ------------------------

NEW_COMPANY = {"code": "new-co", "name_zh": "新服务商"}
COMPANY_EDIT = {"contact": "值班电话 010-12345678"}
NEW_PROVIDER = {
    "kind": "simulator",
    "name": "new-sim",
    "endpoint": "sim://new-sim",
    "credentials": {"username": "u", "password": "pw-of-new-sim"},
}
PROVIDER_EDIT = {"sync_interval_s": 900}


def adopt_to(code: str) -> dict[str, Any]:
    return {"tenant_id": f"{{t[{code}]}}"}


@pytest.fixture
def inv_cloud(sim_cloud) -> SimCloud:  # type: ignore[no-untyped-def]
    return sim_cloud()  # type: ignore[no-any-return]


@pytest.fixture
def center_refs(refs, inv_cloud, db) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """refs plus {p}, a registered simulator provider, and {co}, a service company."""
    with db.unit_of_work() as s:
        company = providers.create_company(
            s,
            Principal.system("test-setup"),
            ServiceCompanyCreate(code="svc-co", name_zh="某服务商"),
        )
    return {**refs, "p": str(inv_cloud.provider_id), "co": str(company.id)}


@pytest.fixture
def inv_refs(  # type: ignore[no-untyped-def]
    center_refs, quota_estate, inv_cloud, db
) -> dict[str, Any]:
    """center_refs plus servers {srv[..]} of the provider, synced: `a`, `a2` and `b` adopted by
    their owner tags into a1, a2 and b1, and `loose` with no owner. The agencies get storage,
    memory and instance limits besides the quota estate's, because sync adopts a server by its
    owner tag only when every class it holds fits."""
    system = Principal.system("test-setup")
    with db.unit_of_work() as s:
        for code in ("a", "b"):
            for rc in ("storage_gb.ssd", "storage_gb.hdd", "memory_mb", "instances"):
                quota_service.set_quota(s, system, quota_estate.tid(code), rc, limit=100_000)
    spawned = {
        key: inv_cloud.spawn(owner=owner, name=f"srv-{key}")
        for key, owner in (("a", "a/a1"), ("a2", "a/a2"), ("b", "b/b1"), ("loose", None))
    }
    outcome = sync.sync_provider(db, inv_cloud.provider_id)
    assert outcome.status == "ok" and outcome.counts.get("adopted") == 3, outcome
    with db.unit_of_work(write=False) as s:
        stmt = select(Server.external_id, Server.id).where(  # type: ignore[call-overload]
            Server.provider_id == inv_cloud.provider_id
        )
        by_external = dict(s.execute(stmt).all())
    return {
        **center_refs,
        "srv": {key: str(by_external[srv.external_id]) for key, srv in spawned.items()},
    }


AGENCY_USERS = [u for u, home, *_ in ESTATE_USERS if home != "center"]
# Providers, companies, hosts, storage and capacity are read with inventory.read at the center:
# center_admin and the center's auditor. Center finance sees the center but lacks the right (403);
# agency users do not see the center at all, so its inventory does not exist for them (404) —
# lists included, since a list of the center's objects is itself the center's.
CENTER_READ = {"admin": 200, "auditor": 200, "finance": 403} | dict.fromkeys(AGENCY_USERS, 404)
CENTER_WRITE = {"auditor": 403, "finance": 403} | dict.fromkeys(AGENCY_USERS, 404)
CENTER_ONLY_READS = [
    "/api/v1/service-companies",
    "/api/v1/service-companies/{co}",
    "/api/v1/providers",
    "/api/v1/providers/{p}",
    "/api/v1/providers/{p}/sync-runs",
    "/api/v1/inventory/hosts",
    "/api/v1/inventory/storage",
    "/api/v1/inventory/capacity",
]
# (method, path, body, the center administrator's status)
CENTER_ONLY_WRITES = [
    ("POST", "/api/v1/service-companies", NEW_COMPANY, 201),
    ("PATCH", "/api/v1/service-companies/{co}", COMPANY_EDIT, 200),
    ("POST", "/api/v1/providers", NEW_PROVIDER, 201),
    ("PATCH", "/api/v1/providers/{p}", PROVIDER_EDIT, 200),
    ("POST", "/api/v1/providers/{p}/check", None, 200),
    ("POST", "/api/v1/providers/{p}/sync", None, 200),
]

# fmt: off
INVENTORY_CENTER = rows(
    *[(u, "GET", path, None, status) for path in CENTER_ONLY_READS
      for u, status in CENTER_READ.items()],
    *[("admin", m, path, body, ok) for m, path, body, ok in CENTER_ONLY_WRITES],
    *[(u, m, path, body, status) for m, path, body, _ in CENTER_ONLY_WRITES
      for u, status in CENTER_WRITE.items()],
    ("admin", "GET", "/api/v1/providers/{missing}", None, 404),
    ("admin", "GET", "/api/v1/service-companies/{missing}", None, 404),
    ("admin", "PATCH", "/api/v1/providers/{missing}", PROVIDER_EDIT, 404),
    ("admin", "POST", "/api/v1/providers/{missing}/sync", None, 404),
    ("admin", "GET", "/api/v1/inventory/capacity?provider_id={missing}", None, 404),
)
# fmt: on


@pytest.mark.parametrize("case", INVENTORY_CENTER)
def test_providers_companies_and_capacity_are_the_centers_alone(case, center_refs, clients, db):
    run(case, clients, center_refs, db)


# Servers are read where server.read holds: agency admins, members and auditors in their subtree,
# the center's administrator and auditor everywhere; unmanaged ones only by readers of the center's
# inventory. Finance roles see the tenants (and the center) without the right: 403, not 404.
# Adopting is the center administrator's; everyone else who can see the server gets 403.
# fmt: off
SERVERS = rows(
    *[(u, "GET", "/api/v1/servers", None, 200) for u, *_ in ESTATE_USERS],
    ("admin", "GET", "/api/v1/servers/{srv[a]}", None, 200),
    ("admin", "GET", "/api/v1/servers/{srv[loose]}", None, 200),
    ("admin", "GET", "/api/v1/servers/{missing}", None, 404),
    ("auditor", "GET", "/api/v1/servers/{srv[b]}", None, 200),
    ("auditor", "GET", "/api/v1/servers/{srv[loose]}", None, 200),
    ("finance", "GET", "/api/v1/servers/{srv[a]}", None, 403),
    ("finance", "GET", "/api/v1/servers/{srv[loose]}", None, 403),
    ("a-admin", "GET", "/api/v1/servers/{srv[a]}", None, 200),
    ("a-admin", "GET", "/api/v1/servers/{srv[a2]}", None, 200),
    ("a-admin", "GET", "/api/v1/servers/{srv[b]}", None, 404),
    ("a-admin", "GET", "/api/v1/servers/{srv[loose]}", None, 404),
    ("a-member", "GET", "/api/v1/servers/{srv[a]}", None, 200),
    ("a-member", "GET", "/api/v1/servers/{srv[a2]}", None, 404),
    ("a-member", "GET", "/api/v1/servers/{srv[loose]}", None, 404),
    ("a-finance", "GET", "/api/v1/servers/{srv[a]}", None, 403),
    ("a-finance", "GET", "/api/v1/servers/{srv[b]}", None, 404),
    ("a-auditor", "GET", "/api/v1/servers/{srv[a2]}", None, 200),
    ("a-auditor", "GET", "/api/v1/servers/{srv[b]}", None, 404),
    ("a-auditor", "GET", "/api/v1/servers/{srv[loose]}", None, 404),
    ("b-admin", "GET", "/api/v1/servers/{srv[b]}", None, 200),
    ("b-admin", "GET", "/api/v1/servers/{srv[a]}", None, 404),
    ("b-member", "GET", "/api/v1/servers/{srv[b]}", None, 200),
    ("b-member", "GET", "/api/v1/servers/{srv[a]}", None, 404),
    # adopting
    ("admin", "POST", "/api/v1/servers/{srv[loose]}/adopt", adopt_to("a1"), 200),
    ("admin", "POST", "/api/v1/servers/{srv[a]}/adopt", adopt_to("a1"), 409),
    ("admin", "POST", "/api/v1/servers/{srv[loose]}/adopt", adopt_to("center"), 409, "tenant_id"),
    ("admin", "POST", "/api/v1/servers/{srv[loose]}/adopt", {"tenant_id": "{missing}"}, 422,
     "tenant_id"),
    ("admin", "POST", "/api/v1/servers/{missing}/adopt", adopt_to("a1"), 404),
    ("auditor", "POST", "/api/v1/servers/{srv[loose]}/adopt", adopt_to("a1"), 403),
    ("auditor", "POST", "/api/v1/servers/{srv[b]}/adopt", adopt_to("b1"), 403),
    ("finance", "POST", "/api/v1/servers/{srv[loose]}/adopt", adopt_to("a1"), 403),
    ("a-admin", "POST", "/api/v1/servers/{srv[a]}/adopt", adopt_to("a1"), 403),
    ("a-admin", "POST", "/api/v1/servers/{srv[a]}/adopt", adopt_to("b1"), 422, "tenant_id"),
    ("a-admin", "POST", "/api/v1/servers/{srv[loose]}/adopt", adopt_to("a1"), 404),
    ("a-admin", "POST", "/api/v1/servers/{srv[b]}/adopt", adopt_to("b1"), 404),
    ("a-member", "POST", "/api/v1/servers/{srv[a]}/adopt", adopt_to("a1"), 403),
    ("a-finance", "POST", "/api/v1/servers/{srv[a]}/adopt", adopt_to("a1"), 403),
    ("a-auditor", "POST", "/api/v1/servers/{srv[a]}/adopt", adopt_to("a1"), 403),
    ("b-admin", "POST", "/api/v1/servers/{srv[b]}/adopt", adopt_to("b1"), 403),
    ("b-admin", "POST", "/api/v1/servers/{srv[loose]}/adopt", adopt_to("b1"), 404),
    ("b-member", "POST", "/api/v1/servers/{srv[b]}/adopt", adopt_to("b1"), 403),
)
# fmt: on


@pytest.mark.parametrize("case", SERVERS)
def test_servers_are_read_in_scope_and_adopted_only_by_the_center(case, inv_refs, clients, db):
    run(case, clients, inv_refs, db)


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("admin", {"a", "a2", "b", "loose"}),
        ("auditor", {"a", "a2", "b", "loose"}),
        ("finance", set()),
        ("a-admin", {"a", "a2"}),
        ("a-auditor", {"a", "a2"}),
        ("a-member", {"a"}),
        ("a-finance", set()),
        ("b-admin", {"b"}),
        ("b-member", {"b"}),
    ],
)
def test_server_list_shows_only_servers_in_scope(user, expected, inv_refs, clients):
    key_of = {sid: key for key, sid in inv_refs["srv"].items()}
    got = _all_pages(clients[user], "/api/v1/servers", "id")
    assert sorted(key_of[s] for s in got) == sorted(expected)


def test_server_list_filtered_by_another_agency_is_an_invalid_reference(inv_refs, clients):
    for tenant in ("b", "b1", "center"):
        resp = clients["a-admin"].get(
            "/api/v1/servers", params={"tenant_id": inv_refs["t"][tenant]}
        )
        expect(resp, 422, "tenant_id")


CENTER_ONLY_LISTS = [
    ("GET", "/api/v1/service-companies"),
    ("GET", "/api/v1/providers"),
    ("GET", "/api/v1/inventory/hosts"),
    ("GET", "/api/v1/inventory/storage"),
    ("GET", "/api/v1/inventory/capacity"),
    ("POST", "/api/v1/service-companies"),
    ("POST", "/api/v1/providers"),
]


def test_agency_users_get_one_and_the_same_problem_on_every_center_only_collection(
    center_refs, clients, db
):
    """No agency role can tell one center-only collection from another, nor learn anything from
    the answer: the same status, type and title everywhere, and nothing written."""
    before = audit_count(db)
    answers = set()
    for user in AGENCY_USERS:
        for method, path in CENTER_ONLY_LISTS:
            body = {"/api/v1/providers": NEW_PROVIDER, "/api/v1/service-companies": NEW_COMPANY}
            resp = clients[user].request(
                method, path, json=body.get(path) if method == "POST" else None
            )
            problem = assert_problem(resp, resp.status_code)
            answers.add((resp.status_code, problem["type"], problem["title"]))
    assert answers == {(404, "urn:govbroker:problem:not-found", "Not found")}
    assert audit_count(db) == before


# (method, path with an object the caller cannot see, the same with an id that exists nowhere, body)
# fmt: off
INVENTORY_HIDDEN_VS_MISSING = [
    ("GET", "/api/v1/providers/{p}", "/api/v1/providers/{missing}", None),
    ("PATCH", "/api/v1/providers/{p}", "/api/v1/providers/{missing}", PROVIDER_EDIT),
    ("POST", "/api/v1/providers/{p}/check", "/api/v1/providers/{missing}/check", None),
    ("POST", "/api/v1/providers/{p}/sync", "/api/v1/providers/{missing}/sync", None),
    ("GET", "/api/v1/providers/{p}/sync-runs", "/api/v1/providers/{missing}/sync-runs", None),
    ("GET", "/api/v1/inventory/hosts?provider_id={p}",
     "/api/v1/inventory/hosts?provider_id={missing}", None),
    ("GET", "/api/v1/service-companies/{co}", "/api/v1/service-companies/{missing}", None),
    ("PATCH", "/api/v1/service-companies/{co}", "/api/v1/service-companies/{missing}",
     COMPANY_EDIT),
    ("GET", "/api/v1/servers/{srv[b]}", "/api/v1/servers/{missing}", None),
    ("GET", "/api/v1/servers/{srv[loose]}", "/api/v1/servers/{missing}", None),
    ("POST", "/api/v1/servers/{srv[b]}/adopt", "/api/v1/servers/{missing}/adopt", adopt_to("a1")),
    ("POST", "/api/v1/servers/{srv[loose]}/adopt", "/api/v1/servers/{missing}/adopt",
     adopt_to("a1")),
]
# fmt: on


@pytest.mark.parametrize(
    ("method", "hidden", "missing", "body"),
    INVENTORY_HIDDEN_VS_MISSING,
    ids=[f"{m} {h}" for m, h, _, _ in INVENTORY_HIDDEN_VS_MISSING],
)
def test_hidden_inventory_looks_exactly_like_missing_inventory(
    method, hidden, missing, body, clients, inv_refs
):
    def answer(path: str) -> dict[str, Any]:
        resp = clients["a-admin"].request(method, fill(path, inv_refs), json=fill(body, inv_refs))
        problem = assert_problem(resp, resp.status_code)
        assert resp.status_code == 404
        shown = {k: v for k, v in problem.items() if k not in ("instance", "request_id")}
        return {
            "problem": re.sub(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", "<id>", repr(shown))
        }

    assert answer(hidden) == answer(missing)


# --- provisioning: server requests, lifecycle actions, jobs -------------------------------------


def new_server(system: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": "vm-new",
        "system_id": f"{{t[{system}]}}",
        "image": "centos-7.9",
        "flavor": "s1.small",
        **fields,
    }


STOP = {"action": "stop"}
DECISION = {"reason": "checked with the budget office"}
NEW_SIZE = {"kind": "size", "code": "large", "size": {"max_vcpu": 64, "max_memory_mb": 262144}}
ITEM_EDIT = {"agency_ids": ["{t[a]}"]}
POLICY = {"approval_vcpu": 2}
POLICY_OF_A = "/api/v1/agencies/{t[a]}/provisioning-policy"


@pytest.fixture
def prov_refs(refs, broker, principal_of, db) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """refs plus {p}: the provider of the `broker` fixture, its catalog imported; {srv[a1]} and
    {srv[b1]}: running servers built through the service by a-member and b-member, {job[..]} the
    jobs that built them; {pending[a1]} and {pending[b1]}: requests waiting for approval (made
    while both agencies had an approval threshold of 1 vCPU, lifted again afterwards so that the
    cases' own requests run at once); {item}: the custom-size catalog item."""
    est = broker.estate
    requesters = (("a1", "a-member"), ("b1", "b-member"))
    srv, job, pending = {}, {}, {}
    for system, requester in requesters:
        built = broker.request(principal_of(requester), system_id=est.tid(system))
        assert built.state == "succeeded", built.error
        srv[system], job[system] = str(built.server_id), str(built.id)
    for threshold in (PolicyUpdate(approval_vcpu=1), PolicyUpdate()):
        with db.unit_of_work() as s:
            for agency in ("a", "b"):
                prov_catalog.set_policy(s, ADMIN, est.tid(agency), threshold)
        if threshold.approval_vcpu is None:
            break
        for system, requester in requesters:
            waiting = broker.request(
                principal_of(requester), system_id=est.tid(system), flavor="s1.medium"
            )
            assert waiting.state == "pending_approval", waiting.state
            pending[system] = str(waiting.id)
    with db.unit_of_work(write=False) as s:
        item = s.execute(
            select(CatalogItem.id).where(  # type: ignore[call-overload]
                CatalogItem.provider_id == broker.cloud.provider_id, CatalogItem.kind == "size"
            )
        ).scalar_one()
    return {
        **refs,
        "p": str(broker.cloud.provider_id),
        "srv": srv,
        "job": job,
        "pending": pending,
        "item": str(item),
    }


# Who holds what over system a1 (member@a1 is a-member; agency a's roles and the center's cover
# it): everyone listed sees a1, so a missing right there is 403; agency B's users do not see it.
A1_MANAGERS = ["admin", "a-admin", "a-member"]
A1_NO_MANAGE = ["auditor", "a-auditor", "finance", "a-finance"]
A1_READERS = ["admin", "auditor", "a-admin", "a-auditor", "a-member"]
A1_NO_READ = ["finance", "a-finance"]
A1_APPROVERS = ["admin", "a-admin"]
A1_NO_APPROVE = ["auditor", "a-auditor", "a-member", "finance", "a-finance"]
B_USERS = ["b-admin", "b-member"]
DECIDE = ("approve", "reject")

# fmt: off
PROVISIONING = rows(
    # asking for a server: server.manage in the system the body names
    *[(u, "POST", "/api/v1/servers", new_server("a1"), 202) for u in A1_MANAGERS],
    ("a-admin", "POST", "/api/v1/servers", new_server("a2"), 202),
    ("b-member", "POST", "/api/v1/servers", new_server("b1"), 202),
    *[(u, "POST", "/api/v1/servers", new_server("a1"), 403) for u in A1_NO_MANAGE],
    # a system outside the caller's scope is an invalid reference, like one that exists nowhere
    ("a-member", "POST", "/api/v1/servers", new_server("a2"), 422, "system_id"),
    ("a-admin", "POST", "/api/v1/servers", new_server("b1"), 422, "system_id"),
    ("a-finance", "POST", "/api/v1/servers", new_server("b1"), 422, "system_id"),
    ("a-auditor", "POST", "/api/v1/servers", new_server("b1"), 422, "system_id"),
    *[(u, "POST", "/api/v1/servers", new_server("a1"), 422, "system_id") for u in B_USERS],
    ("admin", "POST", "/api/v1/servers", {**new_server("a1"), "system_id": "{missing}"}, 422,
     "system_id"),
    ("a-admin", "POST", "/api/v1/servers", new_server("a"), 422, "system_id"),
    # lifecycle actions and deletion of a1's server
    *[(u, "POST", "/api/v1/servers/{srv[a1]}/actions", STOP, 202) for u in A1_MANAGERS],
    *[(u, "DELETE", "/api/v1/servers/{srv[a1]}", None, 202) for u in A1_MANAGERS],
    *[(u, "POST", "/api/v1/servers/{srv[a1]}/actions", STOP, 403) for u in A1_NO_MANAGE],
    *[(u, "DELETE", "/api/v1/servers/{srv[a1]}", None, 403) for u in A1_NO_MANAGE],
    *[(u, "POST", "/api/v1/servers/{srv[a1]}/actions", STOP, 404) for u in B_USERS],
    *[(u, "DELETE", "/api/v1/servers/{srv[a1]}", None, 404) for u in B_USERS],
    ("a-admin", "POST", "/api/v1/servers/{srv[b1]}/actions", STOP, 404),
    ("a-admin", "DELETE", "/api/v1/servers/{srv[b1]}", None, 404),
    ("admin", "POST", "/api/v1/servers/{missing}/actions", STOP, 404),
    ("admin", "DELETE", "/api/v1/servers/{missing}", None, 404),
    # jobs are read with server.read (finance sees a1 without it: 403, as for its servers) and
    # decided with server.approve, the agency administrator's
    *[(u, "GET", "/api/v1/jobs", None, 200) for u, *_ in ESTATE_USERS],
    *[(u, "GET", "/api/v1/jobs/{job[a1]}", None, 200) for u in A1_READERS],
    *[(u, "GET", "/api/v1/jobs/{job[a1]}", None, 403) for u in A1_NO_READ],
    *[(u, "GET", "/api/v1/jobs/{job[a1]}", None, 404) for u in B_USERS],
    ("a-admin", "GET", "/api/v1/jobs/{job[b1]}", None, 404),
    ("admin", "GET", "/api/v1/jobs/{missing}", None, 404),
    *[(u, "POST", f"/api/v1/jobs/{{pending[a1]}}/{d}", DECISION, 200)
      for u in A1_APPROVERS for d in DECIDE],
    *[(u, "POST", f"/api/v1/jobs/{{pending[a1]}}/{d}", DECISION, 403)
      for u in A1_NO_APPROVE for d in DECIDE],
    *[(u, "POST", f"/api/v1/jobs/{{pending[a1]}}/{d}", DECISION, 404)
      for u in B_USERS for d in DECIDE],
    *[("a-admin", "POST", f"/api/v1/jobs/{{pending[b1]}}/{d}", DECISION, 404) for d in DECIDE],
    ("admin", "POST", "/api/v1/jobs/{missing}/approve", DECISION, 404),
    # reached, and refused for the job's state: it was never waiting
    ("a-admin", "POST", "/api/v1/jobs/{job[a1]}/approve", DECISION, 409),
)
# fmt: on


@pytest.mark.parametrize("case", PROVISIONING)
def test_servers_are_requested_and_managed_in_scope_and_jobs_decided_by_agency_admins(
    case, prov_refs, clients, db
):
    run(case, clients, prov_refs, db)


# --- provisioning: the catalog and the agencies' provisioning policies ---------------------------

# (method, path, body, the center administrator's status)
CATALOG_WRITES = [
    ("POST", "/api/v1/providers/{p}/catalog/import", None, 200),
    ("POST", "/api/v1/providers/{p}/catalog", NEW_SIZE, 201),
    ("PATCH", "/api/v1/catalog/{item}", ITEM_EDIT, 200),
]
AGENCY_A_VIEWERS = ["admin", "auditor", "finance", "a-admin", "a-finance", "a-auditor"]

# fmt: off
CATALOG = rows(
    # what may be asked for in a system: read with server.read there
    *[(u, "GET", "/api/v1/catalog?tenant_id={t[a1]}", None, 200) for u in A1_READERS],
    *[(u, "GET", "/api/v1/catalog?tenant_id={t[a1]}", None, 403) for u in A1_NO_READ],
    *[(u, "GET", "/api/v1/catalog?tenant_id={t[a1]}", None, 404) for u in B_USERS],
    ("a-member", "GET", "/api/v1/catalog?tenant_id={t[a2]}", None, 404),
    ("a-admin", "GET", "/api/v1/catalog?tenant_id={t[b1]}", None, 404),
    ("admin", "GET", "/api/v1/catalog", None, 422, "tenant_id"),
    # a provider's whole catalog, importing and curating it: the center's, as providers are
    *[(u, "GET", "/api/v1/providers/{p}/catalog", None, status)
      for u, status in CENTER_READ.items()],
    *[("admin", m, path, body, ok) for m, path, body, ok in CATALOG_WRITES],
    *[(u, m, path, body, status) for m, path, body, _ in CATALOG_WRITES
      for u, status in CENTER_WRITE.items()],
    ("admin", "GET", "/api/v1/providers/{missing}/catalog", None, 404),
    ("admin", "POST", "/api/v1/providers/{missing}/catalog/import", None, 404),
    ("admin", "POST", "/api/v1/providers/{missing}/catalog", NEW_SIZE, 404),
    ("admin", "PATCH", "/api/v1/catalog/{missing}", ITEM_EDIT, 404),
    # an agency's policy is read with tenant.read at the agency and set by the center alone; the
    # agency is visible to its own roles, who may not set (or waive) its approvals: 403, not 404
    *[(u, "GET", POLICY_OF_A, None, 200) for u in AGENCY_A_VIEWERS],
    ("a-member", "GET", POLICY_OF_A, None, 404),
    ("b-admin", "GET", POLICY_OF_A, None, 404),
    ("admin", "GET", "/api/v1/agencies/{t[a1]}/provisioning-policy", None, 404),
    ("admin", "PUT", POLICY_OF_A, POLICY, 200),
    *[(u, "PUT", POLICY_OF_A, POLICY, 403) for u in AGENCY_A_VIEWERS if u != "admin"],
    ("a-member", "PUT", POLICY_OF_A, POLICY, 404),
    ("b-admin", "PUT", POLICY_OF_A, POLICY, 404),
    ("admin", "PUT", "/api/v1/agencies/{t[a1]}/provisioning-policy", POLICY, 404),
    ("admin", "PUT", "/api/v1/agencies/{missing}/provisioning-policy", POLICY, 404),
)
# fmt: on


@pytest.mark.parametrize("case", CATALOG)
def test_catalog_is_curated_and_policies_set_by_the_center_alone(case, prov_refs, clients, db):
    run(case, clients, prov_refs, db)


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("admin", {"a1", "b1", "pending a1", "pending b1"}),
        ("auditor", {"a1", "b1", "pending a1", "pending b1"}),
        ("finance", set()),
        ("a-admin", {"a1", "pending a1"}),
        ("a-auditor", {"a1", "pending a1"}),
        ("a-member", {"a1", "pending a1"}),
        ("a-finance", set()),
        ("b-admin", {"b1", "pending b1"}),
        ("b-member", {"b1", "pending b1"}),
    ],
)
def test_job_list_shows_only_jobs_in_scope(user, expected, prov_refs, clients):
    key_of = {jid: key for key, jid in prov_refs["job"].items()}
    key_of |= {jid: f"pending {key}" for key, jid in prov_refs["pending"].items()}
    got = _all_pages(clients[user], "/api/v1/jobs", "id")
    assert sorted(key_of[j] for j in got) == sorted(expected)


def test_job_list_filtered_by_another_agency_is_an_invalid_reference(prov_refs, clients):
    for tenant in ("b", "b1", "center"):
        resp = clients["a-admin"].get("/api/v1/jobs", params={"tenant_id": prov_refs["t"][tenant]})
        expect(resp, 422, "tenant_id")


# (method, path with agency B's or the center's object, the same with an id that exists nowhere,
# body)
# fmt: off
PROVISIONING_HIDDEN_VS_MISSING = [
    ("GET", "/api/v1/jobs/{job[b1]}", "/api/v1/jobs/{missing}", None),
    ("POST", "/api/v1/jobs/{pending[b1]}/approve", "/api/v1/jobs/{missing}/approve", DECISION),
    ("POST", "/api/v1/jobs/{pending[b1]}/reject", "/api/v1/jobs/{missing}/reject", DECISION),
    ("POST", "/api/v1/servers/{srv[b1]}/actions", "/api/v1/servers/{missing}/actions", STOP),
    ("DELETE", "/api/v1/servers/{srv[b1]}", "/api/v1/servers/{missing}", None),
    ("GET", "/api/v1/catalog?tenant_id={t[b1]}", "/api/v1/catalog?tenant_id={missing}", None),
    ("GET", "/api/v1/providers/{p}/catalog", "/api/v1/providers/{missing}/catalog", None),
    ("POST", "/api/v1/providers/{p}/catalog/import",
     "/api/v1/providers/{missing}/catalog/import", None),
    ("POST", "/api/v1/providers/{p}/catalog", "/api/v1/providers/{missing}/catalog", NEW_SIZE),
    ("PATCH", "/api/v1/catalog/{item}", "/api/v1/catalog/{missing}", ITEM_EDIT),
    ("GET", "/api/v1/agencies/{t[b]}/provisioning-policy",
     "/api/v1/agencies/{missing}/provisioning-policy", None),
    ("PUT", "/api/v1/agencies/{t[b]}/provisioning-policy",
     "/api/v1/agencies/{missing}/provisioning-policy", POLICY),
]
# fmt: on


@pytest.mark.parametrize(
    ("method", "hidden", "missing", "body"),
    PROVISIONING_HIDDEN_VS_MISSING,
    ids=[f"{m} {h}" for m, h, _, _ in PROVISIONING_HIDDEN_VS_MISSING],
)
def test_hidden_provisioning_objects_look_exactly_like_missing_ones(
    method, hidden, missing, body, clients, prov_refs, db
):
    before = footprint(db)

    def answer(path: str, payload: Any) -> dict[str, Any]:
        resp = clients["a-admin"].request(
            method, fill(path, prov_refs), json=fill(payload, prov_refs)
        )
        problem = assert_problem(resp, resp.status_code)
        assert resp.status_code == 404
        shown = {k: v for k, v in problem.items() if k not in ("instance", "request_id")}
        text = re.sub(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", "<id>", repr(shown))
        return {"status": resp.status_code, "problem": text}

    assert answer(hidden, body) == answer(missing, body)
    assert footprint(db) == before


def test_server_request_into_another_agency_looks_like_one_into_nowhere(clients, prov_refs, db):
    before = footprint(db)
    answers = []
    for system in ("{t[b1]}", "{missing}"):
        body = fill({**new_server("a1"), "system_id": system}, prov_refs)
        resp = clients["a-admin"].post("/api/v1/servers", json=body)
        expect(resp, 422, "system_id")
        shown = {k: v for k, v in resp.json().items() if k not in ("instance", "request_id")}
        answers.append(re.sub(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", "<id>", repr(shown)))
    assert answers[0] == answers[1]
    assert footprint(db) == before


# --- billing (统采分签): price lists, contracts, statements, notes, the center's views -----------

# Price lists are public inside the cloud and curated by the center administrator (billing.manage
# is center_admin's alone). Contracts, statements and burn-downs are read with billing.read over
# the contract's agency: the center's administrator, finance and auditor everywhere, an agency's
# administrator, finance and auditor in their own. a-member is bound at system a1, below the
# agency, so agency a's contracts and statements do not exist for it (404), like agency B's.
# Statements are drafted, finalized and adjusted with statement.manage held at the center
# (center_admin, center finance); a credit or debit note is decided by a second such person.
# The spend and unassigned views are the center's: its billing readers; agency roles get 403.
CATALOGS = "/api/v1/service-companies/{co}/price-catalogs"
NEW_CATALOG = {
    "name": "2027 年价目表",
    "effective_from": "2027-01-01",
    "items": [{"resource_class": "vcpu", "unit_price": "9.5"}],
}
NEW_CONTRACT = {
    "number": "HT-NEW-2026",
    "title": "政务云服务合同（新签）",
    "agency_id": "{t[a]}",
    "service_company_id": "{co}",
    "signed_on": "2026-11-01",
    "starts_on": "2026-11-01",
    "ends_on": "2027-10-31",
    "budget_amount": 5_000_000,
}
CONTRACT_EDIT = {"budget_amount": 2_000_000}
GENERATE = {"month": "2026-10"}
NOTE = {"kind": "credit", "amount": 100, "reason": "network outage on 2026-09-15"}
EXPORT_SEPTEMBER = "/api/v1/statements/export?month=2026-09&format=csv"

EVERYONE = [u for u, *_ in ESTATE_USERS]
CENTER_BILLING = ["admin", "auditor", "finance"]
A_BILLING = [*CENTER_BILLING, "a-admin", "a-finance", "a-auditor"]
A_BLIND = ["a-member", "b-admin", "b-member"]
B_BILLING = [*CENTER_BILLING, "b-admin"]
B_BLIND = ["a-admin", "a-member", "a-finance", "a-auditor", "b-member"]
STATEMENT_MANAGERS = ["admin", "finance"]
A_BILLING_NO_STATEMENTS = [u for u in A_BILLING if u not in STATEMENT_MANAGERS]
A_BILLING_NO_CONTRACTS = [u for u in A_BILLING if u != "admin"]
AGENCY_ROLES = [u for u, home, *_ in ESTATE_USERS if home != "center"]


@pytest.fixture
def bill_refs(refs, db, estate, clock, principal_of) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """refs plus {co}, a service company, and {cat} its price list from 2026-09-01; {ct[a]} and
    {ct[b]}: a contract of each agency from September, with a server in a1 and b1 from 09-10 to
    10-10; {final[..]}: September's statements, finalized; {draft[..]}: October's, drafts;
    {adj[..]}: credit notes on the final ones, proposed by center finance. "Now" is 2026-11-02."""
    world = make_world(db, estate)
    catalog = world.catalog(date(2026, 9, 1), {"vcpu": "10", "memory_mb": "5"})
    contract = {}
    for agency, system in (("a", "a1"), ("b", "b1")):
        signed = world.contract(
            f"HT-{agency}-2026",
            agency=agency,
            starts_on=date(2026, 9, 1),
            ends_on=date(2027, 8, 31),
        )
        contract[agency] = str(signed.id)
        world.server(f"srv-{system}", tenant=system)
        on = {"contract": signed, "tenant": system, "agency": agency}
        sizes = {"vcpu": 1, "memory_mb": 1024}
        world.event(f"srv-{system}", LifecycleKind.created, local(2026, 9, 10), sizes, **on)
        world.event(f"srv-{system}", LifecycleKind.deleted, local(2026, 10, 10), {}, **on)
    code = {estate.tid(c): c for c in ("a", "b")}
    final, draft, adj = {}, {}, {}
    for statement in world.generate("2026-09"):
        with db.unit_of_work() as s:
            statements.finalize(s, BILLING_SYSTEM, statement.id)
            note = statements.propose_adjustment(
                s, principal_of("finance"), statement.id, AdjustmentCreate(**NOTE)
            )
        final[code[statement.agency_id]] = str(statement.id)
        adj[code[statement.agency_id]] = str(note.id)
    for statement in world.generate("2026-10"):
        draft[code[statement.agency_id]] = str(statement.id)
    assert set(final) == set(draft) == {"a", "b"}
    return {
        **refs,
        "co": str(world.company_id),
        "cat": str(catalog.id),
        "ct": contract,
        "final": final,
        "draft": draft,
        "adj": adj,
    }


# fmt: off
BILLING = rows(
    # price lists: everyone signed in reads them, the center administrator alone writes them
    *[(u, "GET", CATALOGS, None, 200) for u in EVERYONE],
    *[(u, "GET", "/api/v1/price-catalogs/{cat}", None, 200) for u in EVERYONE],
    ("admin", "POST", CATALOGS, NEW_CATALOG, 201),
    *[(u, "POST", CATALOGS, NEW_CATALOG, 403) for u in EVERYONE if u != "admin"],
    ("admin", "GET", "/api/v1/service-companies/{missing}/price-catalogs", None, 404),
    ("admin", "POST", "/api/v1/service-companies/{missing}/price-catalogs", NEW_CATALOG, 404),
    ("admin", "GET", "/api/v1/price-catalogs/{missing}", None, 404),
    # contracts: signed and changed by the center administrator, read with billing.read
    *[(u, "GET", "/api/v1/contracts", None, 200) for u in EVERYONE],
    ("admin", "POST", "/api/v1/contracts", NEW_CONTRACT, 201),
    *[(u, "POST", "/api/v1/contracts", NEW_CONTRACT, 403) for u in EVERYONE if u != "admin"],
    *[(u, "GET", "/api/v1/contracts/{ct[a]}", None, 200) for u in A_BILLING],
    *[(u, "GET", "/api/v1/contracts/{ct[a]}", None, 404) for u in A_BLIND],
    *[(u, "GET", "/api/v1/contracts/{ct[b]}", None, 200) for u in B_BILLING],
    *[(u, "GET", "/api/v1/contracts/{ct[b]}", None, 404) for u in B_BLIND],
    *[(u, "GET", "/api/v1/contracts/{ct[a]}/burndown", None, 200) for u in A_BILLING],
    *[(u, "GET", "/api/v1/contracts/{ct[a]}/burndown", None, 404) for u in A_BLIND],
    ("b-admin", "GET", "/api/v1/contracts/{ct[b]}/burndown", None, 200),
    ("a-finance", "GET", "/api/v1/contracts/{ct[b]}/burndown", None, 404),
    ("admin", "PATCH", "/api/v1/contracts/{ct[a]}", CONTRACT_EDIT, 200),
    *[(u, "PATCH", "/api/v1/contracts/{ct[a]}", CONTRACT_EDIT, 403)
      for u in A_BILLING_NO_CONTRACTS],
    *[(u, "PATCH", "/api/v1/contracts/{ct[a]}", CONTRACT_EDIT, 404) for u in A_BLIND],
    ("a-admin", "PATCH", "/api/v1/contracts/{ct[b]}", CONTRACT_EDIT, 404),
    ("admin", "GET", "/api/v1/contracts/{missing}", None, 404),
    ("admin", "PATCH", "/api/v1/contracts/{missing}", CONTRACT_EDIT, 404),
    ("admin", "GET", "/api/v1/contracts/{missing}/burndown", None, 404),
    # drafting the month: statement.manage at the center
    *[(u, "POST", "/api/v1/statements/generate", GENERATE, 200) for u in STATEMENT_MANAGERS],
    *[(u, "POST", "/api/v1/statements/generate", GENERATE, 403)
      for u in EVERYONE if u not in STATEMENT_MANAGERS],
    # reading and exporting statements: billing.read and billing.export over the agency
    *[(u, "GET", "/api/v1/statements", None, 200) for u in EVERYONE],
    *[(u, "GET", "/api/v1/statements/{draft[a]}", None, 200) for u in A_BILLING],
    *[(u, "GET", "/api/v1/statements/{draft[a]}", None, 404) for u in A_BLIND],
    *[(u, "GET", "/api/v1/statements/{final[b]}", None, 200) for u in B_BILLING],
    *[(u, "GET", "/api/v1/statements/{final[b]}", None, 404) for u in B_BLIND],
    *[(u, "GET", "/api/v1/statements/{final[a]}/export?format=csv", None, 200) for u in A_BILLING],
    *[(u, "GET", "/api/v1/statements/{final[a]}/export?format=csv", None, 404) for u in A_BLIND],
    *[(u, "GET", "/api/v1/statements/{final[b]}/export?format=csv", None, 404) for u in B_BLIND],
    *[(u, "GET", EXPORT_SEPTEMBER, None, 200) for u in [*A_BILLING, "b-admin"]],
    # nothing of September is theirs to export
    *[(u, "GET", EXPORT_SEPTEMBER, None, 404) for u in ("a-member", "b-member")],
    ("a-admin", "GET", EXPORT_SEPTEMBER + "&agency_id={t[b]}", None, 404),
    ("admin", "GET", "/api/v1/statements/{missing}", None, 404),
    ("admin", "GET", "/api/v1/statements/{missing}/export", None, 404),
    # finalizing and credit or debit notes: statement.manage at the center; visible statements
    # are 403 to everyone else who reads them
    *[(u, "POST", "/api/v1/statements/{draft[a]}/finalize", None, 200)
      for u in STATEMENT_MANAGERS],
    *[(u, "POST", "/api/v1/statements/{draft[a]}/finalize", None, 403)
      for u in A_BILLING_NO_STATEMENTS],
    *[(u, "POST", "/api/v1/statements/{draft[a]}/finalize", None, 404) for u in A_BLIND],
    ("a-finance", "POST", "/api/v1/statements/{draft[b]}/finalize", None, 404),
    ("admin", "POST", "/api/v1/statements/{missing}/finalize", None, 404),
    *[(u, "POST", "/api/v1/statements/{final[a]}/adjustments", NOTE, 201)
      for u in STATEMENT_MANAGERS],
    *[(u, "POST", "/api/v1/statements/{final[a]}/adjustments", NOTE, 403)
      for u in A_BILLING_NO_STATEMENTS],
    *[(u, "POST", "/api/v1/statements/{final[a]}/adjustments", NOTE, 404) for u in A_BLIND],
    ("a-finance", "POST", "/api/v1/statements/{final[b]}/adjustments", NOTE, 404),
    ("admin", "POST", "/api/v1/statements/{missing}/adjustments", NOTE, 404),
    # center finance proposed {adj[..]}: a second person decides, never the proposer
    *[("admin", "POST", f"/api/v1/adjustments/{{adj[a]}}/{d}", None, 200) for d in DECIDE],
    *[("finance", "POST", f"/api/v1/adjustments/{{adj[a]}}/{d}", None, 403) for d in DECIDE],
    *[(u, "POST", f"/api/v1/adjustments/{{adj[a]}}/{d}", None, 403)
      for u in A_BILLING_NO_STATEMENTS for d in DECIDE],
    *[(u, "POST", f"/api/v1/adjustments/{{adj[a]}}/{d}", None, 404)
      for u in A_BLIND for d in DECIDE],
    ("a-finance", "POST", "/api/v1/adjustments/{adj[b]}/approve", None, 404),
    ("admin", "POST", "/api/v1/adjustments/{missing}/approve", None, 404),
    ("admin", "POST", "/api/v1/adjustments/{missing}/reject", None, 404),
    # the center's views
    *[(u, "GET", "/api/v1/billing/spend", None, 200) for u in CENTER_BILLING],
    *[(u, "GET", "/api/v1/billing/spend", None, 403) for u in AGENCY_ROLES],
    *[(u, "GET", "/api/v1/billing/unassigned?month=2026-10", None, 200) for u in CENTER_BILLING],
    *[(u, "GET", "/api/v1/billing/unassigned?month=2026-10", None, 403) for u in AGENCY_ROLES],
)
# fmt: on


@pytest.mark.parametrize("case", BILLING)
def test_billing_is_read_in_scope_and_written_by_the_center(case, bill_refs, clients, db):
    before = table_rows(db, BILLING_TABLES)
    resp = run(case, clients, bill_refs, db)
    if resp.status_code >= 400:
        assert table_rows(db, BILLING_TABLES) == before, "a refused request changed billing"


# (method, path with agency B's object, the same with an id that exists nowhere, body)
# fmt: off
BILLING_HIDDEN_VS_MISSING = [
    pytest.param("GET", "/api/v1/contracts/{ct[b]}", "/api/v1/contracts/{missing}", None),
    pytest.param("PATCH", "/api/v1/contracts/{ct[b]}", "/api/v1/contracts/{missing}",
                 CONTRACT_EDIT),
    pytest.param("GET", "/api/v1/contracts/{ct[b]}/burndown",
                 "/api/v1/contracts/{missing}/burndown", None),
    pytest.param("GET", "/api/v1/statements/{final[b]}", "/api/v1/statements/{missing}", None),
    pytest.param("GET", "/api/v1/statements/{final[b]}/export",
                 "/api/v1/statements/{missing}/export", None),
    pytest.param("POST", "/api/v1/statements/{draft[b]}/finalize",
                 "/api/v1/statements/{missing}/finalize", None),
    pytest.param("POST", "/api/v1/statements/{final[b]}/adjustments",
                 "/api/v1/statements/{missing}/adjustments", NOTE),
    pytest.param("POST", "/api/v1/adjustments/{adj[b]}/approve",
                 "/api/v1/adjustments/{missing}/approve", None),
    pytest.param("POST", "/api/v1/adjustments/{adj[b]}/reject",
                 "/api/v1/adjustments/{missing}/reject", None),
    pytest.param("GET", EXPORT_SEPTEMBER + "&agency_id={t[b]}",
                 EXPORT_SEPTEMBER + "&agency_id={missing}", None),
]
# fmt: on


@pytest.mark.parametrize(
    ("method", "hidden", "missing", "body"),
    BILLING_HIDDEN_VS_MISSING,
    ids=[f"{p.values[0]} {p.values[1]}" for p in BILLING_HIDDEN_VS_MISSING],
)
@pytest.mark.parametrize("user", ["a-admin", "a-finance"])
def test_hidden_billing_objects_look_exactly_like_missing_ones(
    user, method, hidden, missing, body, clients, bill_refs, db
):
    before = footprint(db), table_rows(db, BILLING_TABLES)

    def answer(path: str) -> dict[str, Any]:
        resp = clients[user].request(method, fill(path, bill_refs), json=fill(body, bill_refs))
        problem = assert_problem(resp, resp.status_code)
        assert resp.status_code == 404
        shown = {k: v for k, v in problem.items() if k not in ("instance", "request_id")}
        text = re.sub(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", "<id>", repr(shown))
        return {"status": resp.status_code, "problem": text}

    assert answer(hidden) == answer(missing)
    assert (footprint(db), table_rows(db, BILLING_TABLES)) == before


# --- the caller's own account and tokens: every role, nobody else's -------------------------------

# fmt: off
SELF_SERVICE = rows(
    *[(u, "GET", "/api/v1/me", None, 200) for u, *_ in ESTATE_USERS],
    *[(u, "GET", "/api/v1/tokens", None, 200) for u, *_ in ESTATE_USERS],
    *[(u, "POST", "/api/v1/tokens", {"name": "laptop"}, 201) for u, *_ in ESTATE_USERS],
    # estate users have no password yet, so the current one cannot match: reached, and refused
    ("a-member", "POST", "/api/v1/me/password",
     {"current_password": PASSWORD, "new_password": "Another-Good-7-Passphrase"}, 422,
     "current_password"),
    ("a-admin", "DELETE", "/api/v1/tokens/{tok[b-member]}", None, 404),
    ("b-admin", "DELETE", "/api/v1/tokens/{tok[b-member]}", None, 404),
    ("admin", "DELETE", "/api/v1/tokens/{tok[b-member]}", None, 404),
    ("b-member", "DELETE", "/api/v1/tokens/{tok[b-member]}", None, 204),
)
# fmt: on


@pytest.mark.parametrize("case", SELF_SERVICE)
def test_every_role_manages_its_own_account_and_tokens_only(case, clients, refs, db):
    resp = run(case, clients, refs, db)
    if case.path == "/api/v1/me" and resp.status_code == 200:
        assert resp.json()["user"]["username"] == case.user
    if case.path == "/api/v1/tokens" and case.method == "GET":
        assert case.user == "b-member" or refs["tok"]["b-member"] not in resp.text


@pytest.mark.parametrize("user", ["a-member", "finance", "b-member"])
def test_everyone_can_read_their_own_role_bindings(user, clients, refs, db):
    """The list shows a caller its own bindings whatever its role; reading one by id must agree."""
    listed = clients[user].get("/api/v1/role-bindings")
    expect(listed, 200)
    assert refs["rb"][user] in {b["id"] for b in listed.json()["data"]}
    run(Case(user, "GET", f"/api/v1/role-bindings/{{rb[{user}]}}", None, 200), clients, refs, db)


# --- lists are filtered by scope in SQL -----------------------------------------------------------


def _all_pages(client: Any, path: str, key: str, **params: Any) -> list[Any]:
    """Walk a list with limit=1. Rows filtered out after the LIMIT (in Python) would show up as
    empty pages, so every page must carry exactly one row until the cursor runs out."""
    seen, cursor = [], None
    while True:
        page_params = {**params, "limit": 1} | ({"cursor": cursor} if cursor else {})
        resp = client.get(path, params=page_params)
        expect(resp, 200)
        page = resp.json()
        if page["next_cursor"] is not None:
            assert page["count"] == 1, f"an empty page before the end of {path}: {page}"
        seen += [row[key] for row in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen


A_USERS = ["a-admin", "a-auditor", "a-finance", "a-member", "a1-staff"]
ALL_USERS = sorted([u for u, *_ in ESTATE_USERS] + ["a1-staff"])


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("admin", ALL_USERS),
        ("auditor", ALL_USERS),
        ("a-admin", A_USERS),
        ("a-auditor", A_USERS),
        ("b-admin", ["b-admin", "b-member"]),
        ("a-member", ["a1-staff"]),
        ("finance", []),
        ("a-finance", []),
    ],
)
def test_user_list_shows_only_users_homed_where_the_caller_may_read_users(
    user, expected, clients, refs
):
    assert _all_pages(clients[user], "/api/v1/users", "username") == expected


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("admin", ["a", "a1", "a2", "b", "b1", "center"]),
        ("auditor", ["a", "a1", "a2", "b", "b1", "center"]),
        ("finance", ["a", "a1", "a2", "b", "b1", "center"]),
        ("a-admin", ["a", "a1", "a2"]),
        ("a-finance", ["a", "a1", "a2"]),
        ("a-member", ["a1"]),
        ("b-member", ["b1"]),
    ],
)
def test_tenant_list_shows_only_tenants_in_scope(user, expected, clients, refs):
    assert _all_pages(clients[user], "/api/v1/tenants", "code") == expected


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("a-admin", A_USERS),
        ("auditor", ALL_USERS),
        ("b-member", ["b-member"]),  # only its own binding
        ("finance", ["finance"]),
    ],
)
def test_role_binding_list_shows_bindings_in_scope_and_the_callers_own(
    user, expected, clients, refs
):
    name_of = {uid: name for name, uid in refs["u"].items()}
    got = _all_pages(clients[user], "/api/v1/role-bindings", "user_id")
    assert sorted(name_of[u] for u in got) == expected


def test_agency_auditor_sees_only_audit_events_of_its_agency(clients, refs):
    a_subtree = {refs["t"][c] for c in ("a", "a1", "a2")}
    mine = _all_pages(clients["a-auditor"], "/api/v1/audit-events", "tenant_id")
    everything = _all_pages(clients["auditor"], "/api/v1/audit-events", "tenant_id")
    assert mine and set(mine) <= a_subtree
    assert sorted(mine) == sorted(t for t in everything if t in a_subtree)
    assert {refs["t"]["b"], refs["t"]["b1"]} <= set(everything)
    # naming agency B in the filter is an invalid reference, as if it did not exist
    resp = clients["a-auditor"].get("/api/v1/audit-events", params={"tenant_id": refs["t"]["b"]})
    expect(resp, 422, "tenant_id")


# --- authentication -------------------------------------------------------------------------------

_SAMPLE_BODY: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/api/v1/me/password"): {"current_password": "x", "new_password": "y"},
    ("POST", "/api/v1/tokens"): {"name": "t"},
    ("POST", "/api/v1/tenants"): {
        "parent_id": str(uuid.uuid4()),
        "kind": "agency",
        "code": "x",
        "name_zh": "x",
    },
    ("PATCH", "/api/v1/tenants/{tenant_id}"): RENAME,
    ("POST", "/api/v1/users"): {
        "username": "someone",
        "display_name": "x",
        "tenant_id": str(uuid.uuid4()),
    },
    ("PATCH", "/api/v1/users/{user_id}"): USER_EDIT,
    ("POST", "/api/v1/users/{user_id}/password"): NEW_PASSWORD,
    ("PUT", "/api/v1/quotas/{tenant_id}/{resource_class}"): VCPU_30,
    ("POST", "/api/v1/quotas/check"): {"tenant_id": str(uuid.uuid4()), **FITS_1_VCPU},
    ("POST", "/api/v1/quota-requests"): {"tenant_id": str(uuid.uuid4()), **MORE_VCPU},
    ("POST", "/api/v1/quota-requests/{request_id}/approve"): {},
    ("POST", "/api/v1/quota-requests/{request_id}/reject"): {"reason": "no"},
    ("POST", "/api/v1/role-bindings"): {
        "user_id": str(uuid.uuid4()),
        "role": "member",
        "tenant_id": str(uuid.uuid4()),
    },
    ("POST", "/api/v1/service-companies"): NEW_COMPANY,
    ("PATCH", "/api/v1/service-companies/{company_id}"): COMPANY_EDIT,
    ("POST", "/api/v1/providers"): NEW_PROVIDER,
    ("PATCH", "/api/v1/providers/{provider_id}"): PROVIDER_EDIT,
    ("POST", "/api/v1/servers/{server_id}/adopt"): {"tenant_id": str(uuid.uuid4())},
    ("POST", "/api/v1/servers"): {**new_server("a1"), "system_id": str(uuid.uuid4())},
    ("POST", "/api/v1/servers/{server_id}/actions"): STOP,
    ("POST", "/api/v1/jobs/{job_id}/approve"): DECISION,
    ("POST", "/api/v1/jobs/{job_id}/reject"): DECISION,
    ("POST", "/api/v1/providers/{provider_id}/catalog"): NEW_SIZE,
    ("PATCH", "/api/v1/catalog/{item_id}"): ITEM_EDIT,
    ("PUT", "/api/v1/agencies/{agency_id}/provisioning-policy"): POLICY,
    ("POST", "/api/v1/service-companies/{company_id}/price-catalogs"): NEW_CATALOG,
    ("POST", "/api/v1/contracts"): {**NEW_CONTRACT, "agency_id": str(uuid.uuid4())},
    ("PATCH", "/api/v1/contracts/{contract_id}"): CONTRACT_EDIT,
    ("POST", "/api/v1/statements/generate"): GENERATE,
    ("POST", "/api/v1/statements/{statement_id}/adjustments"): NOTE,
}
NEEDS_AUTH = [e for e in API_ENDPOINTS if e != ("POST", "/api/v1/auth/login")]


def _concrete(path: str) -> str:
    return re.sub(r"\{[a-z_]+\}", str(uuid.uuid4()), path)


@pytest.mark.parametrize(
    "credential", [None, "Bearer not-a-token", "Bearer gbk_unknown", "Basic eDp5"]
)
@pytest.mark.parametrize(("method", "path"), NEEDS_AUTH, ids=[f"{m} {p}" for m, p in NEEDS_AUTH])
def test_unauthenticated_requests_get_401_with_www_authenticate(method, path, credential, app, db):
    client = TestClient(app, raise_server_exceptions=True)
    headers = {"Authorization": credential} if credential else {}
    resp = client.request(
        method, _concrete(path), json=_SAMPLE_BODY.get((method, path)), headers=headers
    )
    expect(resp, 401)
    assert resp.headers["www-authenticate"].lower().startswith("bearer")


@pytest.mark.parametrize("path", [p for _, p in PROBE_ENDPOINTS])
def test_probes_and_metrics_need_no_authentication(path, anon, db):
    resp = anon.get(path)
    assert resp.status_code == 200, resp.text
    assert "www-authenticate" not in resp.headers
    assert not resp.headers["content-type"].startswith(PROBLEM)


def test_login_needs_no_authentication_and_its_token_works(clients, anon):
    expect(
        clients["admin"].post(
            f"/api/v1/users/{clients.estate.uid('a-member')}/password", json={"password": PASSWORD}
        ),
        200,
    )
    resp = anon.post("/api/v1/auth/login", json={"username": "a-member", "password": PASSWORD})
    expect(resp, 200)
    token = resp.json()["access_token"]
    me = anon.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    expect(me, 200)
    assert me.json()["user"]["username"] == "a-member"
    bad = anon.post("/api/v1/auth/login", json={"username": "a-member", "password": "wrong"})
    expect(bad, 401)
    assert bad.headers["www-authenticate"].lower().startswith("bearer")


# --- the matrix is complete -----------------------------------------------------------------------

ROLE_TABLES = [
    OTHER_AGENCY_OBJECTS,
    PLACING_INTO_OTHER_AGENCY,
    AGENCY_ADMIN_OWN_AGENCY,
    ESCALATION,
    MEMBER,
    MEMBER_SELF,
    AUDITOR_READS,
    AUDITOR_WRITES,
    FINANCE,
    CENTER_ADMIN,
    QUOTAS,
    QUOTA_REQUESTS,
    INVENTORY_CENTER,
    SERVERS,
    PROVISIONING,
    CATALOG,
    BILLING,
    SELF_SERVICE,
]


def _template_regex(route_path: str) -> re.Pattern[str]:
    parts = re.split(r"\{[a-z_]+\}", route_path)
    return re.compile("[^/]+".join(re.escape(p) for p in parts) + "$")


def test_matrix_covers_every_endpoint(app):
    """Every route the app serves is listed above, and every /api/v1 route but login is exercised
    by some role in the matrix (login has its own test)."""
    # the OpenAPI document lists every route, however the routers are nested
    served = {(m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops}
    assert served == set(API_ENDPOINTS) | set(PROBE_ENDPOINTS)
    # a query string is not part of the route ("/api/v1/catalog?tenant_id=..." exercises the list)
    exercised = {
        (p.values[0].method, p.values[0].path.split("?")[0]) for table in ROLE_TABLES for p in table
    }
    for method, route in NEEDS_AUTH:
        pattern = _template_regex(route)
        assert any(m == method and pattern.match(t) for m, t in exercised), (
            f"no role case exercises {method} {route}"
        )
    roles = {p.values[0].user for table in ROLE_TABLES for p in table}
    assert {u for u, *_ in ESTATE_USERS} <= roles
