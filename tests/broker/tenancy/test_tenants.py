"""Service level: the tenant tree — placement, listing, suspension, archiving, moves, deletion.

The estate (tests/fixtures/auth.py): center ── a ── a1, a2 / b ── b1, with an agency admin for
each agency, members in a1 and b1. The test's `session` joins the test transaction, so its
`commit()` is real to the code (the audit hook links events at commit) yet is rolled back when
the test ends. Every committed change must leave its audit event; a refused call, rolled back,
must leave neither its change nor its event.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, text
from sqlmodel import Session, select

from broker.audit.models import AuditEvent
from broker.core.authz import Principal
from broker.core.errors import Conflict, Forbidden, GovbrokerError, Invalid, NotFound
from broker.tenancy import service as tenancy
from broker.tenancy import users
from broker.tenancy.authz import authorize
from broker.tenancy.models import Tenant
from broker.tenancy.schemas import RoleBindingCreate, TenantCreate, TenantUpdate, UserCreate

SYSTEM = Principal.system("test-tenants")


# --- helpers ----------------------------------------------------------------------------------


def audit_count(session: Session) -> int:
    return int(session.execute(select(func.count()).select_from(AuditEvent)).scalar_one())


def last_seq(session: Session) -> int:
    return int(session.execute(select(func.coalesce(func.max(AuditEvent.seq), 0))).scalar_one())


def events_since(session: Session, seq: int) -> list[AuditEvent]:
    """The audit events appended after event number `seq`, oldest first."""
    stmt = select(AuditEvent).where(AuditEvent.seq > seq).order_by(AuditEvent.seq)  # type: ignore[arg-type]
    return list(session.execute(stmt).scalars())


def tenant_rows(session: Session) -> list[tuple[Any, ...]]:
    """Every tenant row as the database holds it, for before/after comparisons."""
    return [tuple(r) for r in session.execute(text("SELECT * FROM tenant ORDER BY id")).all()]


def fresh(session: Session, tenant_id: uuid.UUID) -> Tenant:
    """The tenant as stored now, not as an earlier load in this session remembers it."""
    session.expire_all()
    tenant = session.get(Tenant, tenant_id)
    assert tenant is not None
    return tenant


def create(
    session: Session, principal: Principal, parent_id: uuid.UUID, kind: str, code: str, **kw: Any
) -> Tenant:
    data = TenantCreate(
        parent_id=parent_id, kind=kind, code=code, name_zh=kw.pop("name_zh", f"租户{code}"), **kw
    )
    return tenancy.create_tenant(session, principal, data)


def edit(session: Session, principal: Principal, tenant_id: uuid.UUID, **changes: Any) -> Tenant:
    return tenancy.update_tenant(session, principal, tenant_id, TenantUpdate(**changes))


def codes(rows: list[Tenant]) -> set[str]:
    return {t.code for t in rows}


def listed(session: Session, principal: Principal, **filters: Any) -> set[str]:
    rows, nxt = tenancy.list_tenants(session, principal, limit=500, **filters)
    assert nxt is None
    return codes(rows)


def every_page(
    session: Session, principal: Principal, limit: int, **filters: Any
) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    while True:
        rows, cursor = tenancy.list_tenants(
            session, principal, cursor=cursor, limit=limit, **filters
        )
        pages.append([t.code for t in rows])
        assert len(pages) < 1000, "pagination does not end"
        if cursor is None:
            return pages


@contextmanager
def refused(session: Session, error: type[GovbrokerError]) -> Iterator[pytest.ExceptionInfo[Any]]:
    """The call inside must raise `error`; after the rollback nothing of it may remain."""
    audit_before, rows_before = audit_count(session), tenant_rows(session)
    with pytest.raises(error) as info:
        yield info
    session.rollback()
    assert tenant_rows(session) == rows_before, "a refused call changed tenants"
    assert audit_count(session) == audit_before, "a refused call left an audit event"


@pytest.fixture
def ids(estate: Any) -> dict[str, uuid.UUID]:
    return {code: t.id for code, t in estate.tenants.items()}


@pytest.fixture
def ownership() -> Iterator[Callable[[tenancy.OwnershipCheck], None]]:
    """Register ownership checks for this test only: they are removed again afterwards."""
    registered: list[tenancy.OwnershipCheck] = []
    already = list(tenancy._ownership_checks)

    def register(check: tenancy.OwnershipCheck) -> None:
        tenancy.register_ownership_check(check)
        registered.append(check)

    yield register
    for check in registered:
        if check in tenancy._ownership_checks:
            tenancy._ownership_checks.remove(check)
    assert tenancy._ownership_checks == already


# --- creating agencies and systems ------------------------------------------------------------


def test_an_agency_is_placed_under_the_center_with_the_center_path_plus_its_own_id(session, ids):
    center = fresh(session, ids["center"])
    agency = create(session, SYSTEM, center.id, "agency", "c")
    session.commit()
    stored = fresh(session, agency.id)
    assert stored.parent_id == center.id
    assert stored.kind == "agency" and stored.status == "active"
    assert stored.path == f"{center.path}{agency.id.hex}/"
    assert stored.path == f"/{center.id.hex}/{agency.id.hex}/"


def test_a_system_is_placed_under_its_agency_with_the_agency_path_plus_its_own_id(
    session, ids, principal_of
):
    system = create(session, principal_of("a-admin"), ids["a"], "system", "a3", name_zh="甲局三")
    session.commit()
    stored = fresh(session, system.id)
    agency = fresh(session, ids["a"])
    assert stored.parent_id == agency.id and stored.kind == "system"
    assert stored.path == f"{agency.path}{system.id.hex}/"
    assert stored.path.count("/") == 4  # /center/agency/system/


def test_creating_a_tenant_is_audited_with_its_snapshot(session, ids, principal_of):
    before = last_seq(session)
    system = create(session, principal_of("a-admin"), ids["a"], "system", "a3", name_en="Third")
    session.commit()
    [event] = events_since(session, before)
    assert event.action == "tenant.create" and event.actor_name == "a-admin"
    assert event.target_type == "tenant" and event.target_id == str(system.id)
    assert event.tenant_path == system.path
    assert event.after is not None
    assert event.after["code"] == "a3" and event.after["parent_id"] == str(ids["a"])


def test_an_agency_admin_creates_systems_only_in_its_own_agency(session, ids, principal_of):
    a_admin = principal_of("a-admin")
    with refused(session, Invalid) as info:  # the center lies outside its scope
        create(session, a_admin, ids["center"], "agency", "c")
    assert info.value.errors[0].field == "parent_id"
    with refused(session, Invalid) as info:  # agency b does not exist for a-admin
        create(session, a_admin, ids["b"], "system", "b9")
    assert info.value.errors[0].field == "parent_id"


def test_a_tenant_code_is_used_once(session, ids):
    with refused(session, Conflict) as info:
        create(session, SYSTEM, ids["b"], "system", "a1")
    assert [e.field for e in info.value.errors] == ["code"]


# --- listing ----------------------------------------------------------------------------------


def test_listing_filters_by_kind(session, estate):
    assert listed(session, SYSTEM, kind="center") == {"center"}
    assert listed(session, SYSTEM, kind="agency") == {"a", "b"}
    assert listed(session, SYSTEM, kind="system") == {"a1", "a2", "b1"}


def test_listing_filters_by_parent(session, ids):
    assert listed(session, SYSTEM, parent_id=ids["a"]) == {"a1", "a2"}
    assert listed(session, SYSTEM, parent_id=ids["center"]) == {"a", "b"}
    assert listed(session, SYSTEM, parent_id=ids["a1"]) == set()


def test_listing_filters_by_status(session, ids):
    edit(session, SYSTEM, ids["a2"], status="suspended")
    edit(session, SYSTEM, ids["b1"], status="archived")
    session.commit()
    assert listed(session, SYSTEM, status="suspended") == {"a2"}
    assert listed(session, SYSTEM, status="archived") == {"b1"}
    assert listed(session, SYSTEM, status="active") == {"center", "a", "b", "a1"}


def test_listing_searches_code_and_both_names(session, ids):
    edit(session, SYSTEM, ids["b"], name_en="Finance Bureau")
    session.commit()
    assert listed(session, SYSTEM, q="甲局") == {"a", "a1", "a2"}
    assert listed(session, SYSTEM, q="系统一") == {"a1", "b1"}
    assert listed(session, SYSTEM, q="A1") == {"a1"}  # codes match whatever the case
    assert listed(session, SYSTEM, q="finance bureau") == {"b"}
    assert listed(session, SYSTEM, q="no such tenant") == set()


def test_listing_filters_combine(session, ids):
    assert listed(session, SYSTEM, kind="system", parent_id=ids["a"], q="一") == {"a1"}
    assert listed(session, SYSTEM, kind="agency", q="系统") == set()


@pytest.mark.parametrize(
    ("q", "found"),
    [("x_", {"x_1"}), ("%", {"z9"}), ("1_0", set())],
    ids=["underscore", "percent", "underscore inside"],
)
def test_listing_search_treats_like_wildcards_as_plain_characters(session, ids, q, found):
    create(session, SYSTEM, ids["a"], "system", "x_1", name_zh="下划线")
    create(session, SYSTEM, ids["a"], "system", "xy1", name_zh="百分之百")
    create(session, SYSTEM, ids["a"], "system", "z9", name_zh="100%达标")
    session.commit()
    assert listed(session, SYSTEM, q=q) == found


def test_listing_shows_only_the_callers_subtree(session, principal_of):
    assert listed(session, principal_of("a-admin")) == {"a", "a1", "a2"}
    assert listed(session, principal_of("b-member")) == {"b1"}
    assert listed(session, principal_of("auditor")) == {"center", "a", "b", "a1", "a2", "b1"}


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 8, 16, 17, 50])
def test_cursor_pagination_returns_every_tenant_exactly_once(session, ids, limit):
    for n in range(11):
        parent = ids["a"] if n % 2 else ids["b"]
        create(session, SYSTEM, parent, "system", f"p{n:02d}{'-x' if n % 3 else '.y'}")
    session.commit()
    everything = tenancy.list_tenants(session, SYSTEM, limit=500)[0]
    assert len(everything) == 17
    pages = every_page(session, SYSTEM, limit)
    seen = [code for page in pages for code in page]
    assert seen == [t.code for t in everything]  # each once, in the listing's order
    assert all(0 < len(page) <= limit for page in pages), pages
    assert len(pages) == -(-17 // limit)


@pytest.mark.parametrize("limit", [1, 2, 4])
def test_cursor_pagination_with_filters_and_scope_returns_each_match_once(
    session, ids, principal_of, limit
):
    for n in range(7):
        create(session, SYSTEM, ids["a"], "system", f"a-sys-{n}", name_zh=f"甲局新系统{n}")
    session.commit()
    a_admin = principal_of("a-admin")
    for filters in ({}, {"kind": "system"}, {"parent_id": ids["a"]}, {"q": "新系统"}):
        pages = every_page(session, a_admin, limit, **filters)
        seen = [code for page in pages for code in page]
        assert len(seen) == len(set(seen)), f"{filters}: a tenant came twice: {pages}"
        assert set(seen) == listed(session, a_admin, **filters), filters
        assert all(page for page in pages), f"{filters}: an empty page: {pages}"


_example = itertools.count()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    suffixes=st.sets(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,6}", fullmatch=True), max_size=12),
    limit=st.integers(min_value=1, max_value=6),
)
def test_cursor_pagination_property_every_child_exactly_once(session, ids, suffixes, limit):
    """Whatever the codes (case, dots, dashes, underscores sort differently per collation),
    paging through an agency's systems yields each exactly once."""
    n = next(_example)
    agency = create(session, SYSTEM, ids["center"], "agency", f"prop{n}")
    made = {create(session, SYSTEM, agency.id, "system", f"q{n}-{s}").code for s in suffixes}
    pages = every_page(session, SYSTEM, limit, parent_id=agency.id)
    seen = [code for page in pages for code in page]
    assert sorted(seen) == sorted(made)
    assert len(seen) == len(set(seen))


# --- suspension -------------------------------------------------------------------------------


def test_suspending_an_agency_blocks_writes_by_its_agency_admin(session, ids, estate, principal_of):
    edit(session, SYSTEM, ids["a"], status="suspended")
    session.commit()
    a_admin = principal_of("a-admin")
    blocked: list[Callable[[], Any]] = [
        lambda: create(session, a_admin, ids["a"], "system", "a3"),
        lambda: edit(session, a_admin, ids["a1"], name_en="Renamed"),
        lambda: edit(session, a_admin, ids["a1"], status="suspended"),
        lambda: tenancy.delete_tenant(session, a_admin, ids["a2"]),
        lambda: users.create_user(
            session, a_admin, UserCreate(username="new-a", display_name="新", tenant_id=ids["a"])
        ),
        lambda: users.create_binding(
            session,
            a_admin,
            RoleBindingCreate(user_id=estate.uid("a-finance"), role="member", tenant_id=ids["a1"]),
        ),
    ]
    for attempt in blocked:
        with refused(session, Forbidden) as info:
            attempt()
        assert info.value.extra.get("tenant_status") == "suspended"
    # reading is not a write: the agency stays visible to its administrator
    assert tenancy.get_tenant(session, a_admin, ids["a1"]).code == "a1"
    assert listed(session, a_admin) == {"a", "a1", "a2"}


def test_suspending_an_agency_blocks_writes_by_its_members(session, ids, principal_of):
    member = principal_of("a-member")
    authorize(member, "server.manage", fresh(session, ids["a1"]))  # allowed while active
    edit(session, SYSTEM, ids["a"], status="suspended")
    session.commit()
    with pytest.raises(Forbidden) as info:
        authorize(member, "server.manage", fresh(session, ids["a1"]))
    assert info.value.extra == {"tenant_status": "suspended"}
    authorize(member, "server.read", fresh(session, ids["a1"]))  # reads go on
    # agency b is untouched
    authorize(principal_of("b-member"), "server.manage", fresh(session, ids["b1"]))


def test_center_admin_still_changes_a_suspended_agency(session, ids, principal_of):
    edit(session, SYSTEM, ids["a"], status="suspended")
    session.commit()
    admin = principal_of("admin")
    edit(session, admin, ids["a1"], name_en="Still editable")
    create(session, admin, ids["a"], "system", "a3")
    session.commit()
    assert fresh(session, ids["a1"]).name_en == "Still editable"
    assert listed(session, admin, parent_id=ids["a"]) == {"a1", "a2", "a3"}


def test_reactivating_an_agency_restores_writes_by_its_admin_and_members(
    session, ids, principal_of
):
    edit(session, SYSTEM, ids["a"], status="suspended")
    session.commit()
    a_admin, member = principal_of("a-admin"), principal_of("a-member")
    with refused(session, Forbidden):
        edit(session, a_admin, ids["a1"], name_en="Renamed")
    edit(session, SYSTEM, ids["a"], status="active")
    session.commit()
    edit(session, a_admin, ids["a1"], name_en="Renamed")
    session.commit()
    assert fresh(session, ids["a1"]).name_en == "Renamed"
    authorize(member, "server.manage", fresh(session, ids["a1"]))


def test_an_agency_admin_may_suspend_and_reactivate_a_system_of_its_agency(
    session, ids, principal_of
):
    a_admin = principal_of("a-admin")
    before = last_seq(session)
    edit(session, a_admin, ids["a1"], status="suspended")
    session.commit()
    assert fresh(session, ids["a1"]).status == "suspended"
    # suspended means suspended for its administrator too, except for the status itself
    with refused(session, Forbidden):
        edit(session, a_admin, ids["a1"], name_en="Renamed")
    with pytest.raises(Forbidden):
        authorize(principal_of("a-member"), "server.manage", fresh(session, ids["a1"]))
    edit(session, a_admin, ids["a1"], status="active")
    session.commit()
    assert fresh(session, ids["a1"]).status == "active"
    edit(session, a_admin, ids["a1"], name_en="Renamed")
    session.commit()
    actions = [e.action for e in events_since(session, before)]
    assert actions == ["tenant.suspend", "tenant.activate", "tenant.update"]


def test_an_agency_admin_cannot_suspend_its_own_agency(session, ids, principal_of):
    """The agency is in its administrator's scope, so the refusal is Forbidden, not NotFound."""
    with refused(session, Forbidden):
        edit(session, principal_of("a-admin"), ids["a"], status="suspended")


def test_an_agency_admin_cannot_suspend_another_agencys_system(session, ids, principal_of):
    with refused(session, NotFound):
        edit(session, principal_of("a-admin"), ids["b1"], status="suspended")


def test_an_agency_admin_cannot_reactivate_a_system_while_its_agency_is_suspended(
    session, ids, principal_of
):
    edit(session, SYSTEM, ids["a1"], status="suspended")
    edit(session, SYSTEM, ids["a"], status="suspended")
    session.commit()
    with refused(session, Forbidden):
        edit(session, principal_of("a-admin"), ids["a1"], status="active")


# --- archiving --------------------------------------------------------------------------------


def test_archiving_is_refused_while_the_tenant_has_children_not_archived(session, ids):
    with refused(session, Conflict) as info:
        edit(session, SYSTEM, ids["a"], status="archived")
    assert info.value.extra["owned"] == ["2 tenant(s) not archived"]
    assert "2 tenant(s) not archived" in info.value.detail
    edit(session, SYSTEM, ids["a1"], status="archived")
    session.commit()
    with refused(session, Conflict) as info:
        edit(session, SYSTEM, ids["a"], status="archived")
    assert info.value.extra["owned"] == ["1 tenant(s) not archived"]
    edit(session, SYSTEM, ids["a2"], status="archived")
    edit(session, SYSTEM, ids["a"], status="archived")
    session.commit()
    assert fresh(session, ids["a"]).status == "archived"


def test_archiving_is_refused_while_an_ownership_check_reports_something(session, ids, ownership):
    asked: list[tuple[str, str]] = []

    def servers(_session: Session, tenant: Tenant, purpose: str) -> list[str]:
        asked.append((tenant.code, purpose))
        return ["2 server(s) in vcenter-1"] if tenant.id == ids["a2"] else []

    ownership(servers)
    with refused(session, Conflict) as info:
        edit(session, SYSTEM, ids["a2"], status="archived")
    assert asked == [("a2", "archive")]
    assert info.value.extra["owned"] == ["2 server(s) in vcenter-1"]
    assert "2 server(s) in vcenter-1" in info.value.detail
    # a tenant the check reports nothing for is archived as before
    edit(session, SYSTEM, ids["a1"], status="archived")
    session.commit()
    assert fresh(session, ids["a1"]).status == "archived"
    assert fresh(session, ids["a2"]).status == "active"


def test_archiving_lists_everything_the_tenant_still_owns(session, ids, ownership):
    ownership(lambda _s, t, _purpose: ["1 quota"] if t.id == ids["a"] else [])
    ownership(lambda _s, t, _purpose: ["3 invoice(s) open"] if t.id == ids["a"] else [])
    with refused(session, Conflict) as info:
        edit(session, SYSTEM, ids["a"], status="archived")
    assert info.value.extra["owned"] == ["2 tenant(s) not archived", "1 quota", "3 invoice(s) open"]


def test_an_archived_tenant_is_read_only_until_reactivated(session, ids, principal_of):
    edit(session, SYSTEM, ids["a2"], status="archived")
    session.commit()
    with refused(session, Conflict):
        edit(session, SYSTEM, ids["a2"], name_en="Renamed")
    with refused(session, Conflict):
        edit(session, SYSTEM, ids["a2"], description="still here")
    with refused(session, Conflict):
        edit(session, SYSTEM, ids["a2"], parent_id=ids["b"])
    with refused(session, Forbidden):  # below the center, an archived subtree takes no writes
        edit(session, principal_of("a-admin"), ids["a2"], name_en="Renamed")
    assert tenancy.get_tenant(session, SYSTEM, ids["a2"]).status == "archived"
    edit(session, SYSTEM, ids["a2"], status="active")
    session.commit()
    edit(session, SYSTEM, ids["a2"], name_en="Renamed")
    session.commit()
    assert fresh(session, ids["a2"]).name_en == "Renamed"


def test_an_archived_agency_takes_no_new_systems_users_or_role_bindings(session, ids, estate):
    old = create(session, SYSTEM, ids["center"], "agency", "old")
    edit(session, SYSTEM, old.id, status="archived")
    session.commit()
    with refused(session, Invalid) as info:
        create(session, SYSTEM, old.id, "system", "old1")
    assert info.value.errors[0].field == "parent_id"
    with refused(session, Invalid) as info:
        edit(session, SYSTEM, ids["a1"], parent_id=old.id)
    assert info.value.errors[0].field == "parent_id"
    with refused(session, Invalid) as info:
        users.create_user(
            session, SYSTEM, UserCreate(username="retired", display_name="旧", tenant_id=old.id)
        )
    assert info.value.errors[0].field == "tenant_id"
    with refused(session, Invalid) as info:
        users.create_binding(
            session,
            SYSTEM,
            RoleBindingCreate(user_id=estate.uid("a-finance"), role="finance", tenant_id=old.id),
        )
    assert info.value.errors[0].field == "tenant_id"


def test_a_system_cannot_be_reactivated_under_an_archived_agency(session, ids):
    """Archiving needs every child archived; reactivating a child must not undo that."""
    for code in ("a1", "a2", "a"):
        edit(session, SYSTEM, ids[code], status="archived")
    session.commit()
    with refused(session, GovbrokerError) as info:
        edit(session, SYSTEM, ids["a1"], status="active")
    assert isinstance(info.value, Conflict | Invalid)
    assert fresh(session, ids["a1"]).status == "archived"


# --- moving -----------------------------------------------------------------------------------


def test_moving_a_system_to_another_agency_rewrites_its_path(session, ids, principal_of):
    before = last_seq(session)
    edit(session, SYSTEM, ids["a1"], parent_id=ids["b"])
    session.commit()
    moved, b = fresh(session, ids["a1"]), fresh(session, ids["b"])
    assert moved.parent_id == b.id
    assert moved.path == f"{b.path}{moved.id.hex}/"
    assert listed(session, SYSTEM, parent_id=ids["b"]) == {"a1", "b1"}
    assert listed(session, SYSTEM, parent_id=ids["a"]) == {"a2"}
    [event] = events_since(session, before)
    assert event.action == "tenant.update"
    assert event.before == {"parent_id": str(ids["a"])}
    assert event.after == {"parent_id": str(ids["b"])}
    # scope follows the path: a1 is now agency b's, and a-member's binding there moved with it
    with pytest.raises(NotFound):
        tenancy.get_tenant(session, principal_of("a-admin"), ids["a1"])
    assert tenancy.get_tenant(session, principal_of("b-admin"), ids["a1"]).code == "a1"
    assert principal_of("a-member").sees(moved.path)


def test_moving_a_system_back_restores_its_original_path(session, ids):
    original = fresh(session, ids["a1"]).path
    edit(session, SYSTEM, ids["a1"], parent_id=ids["b"])
    session.commit()
    edit(session, SYSTEM, ids["a1"], parent_id=ids["a"])
    session.commit()
    assert fresh(session, ids["a1"]).path == original


def test_an_agency_admin_cannot_move_a_system_out_of_its_agency(session, ids, principal_of):
    with refused(session, Invalid) as info:
        edit(session, principal_of("a-admin"), ids["a1"], parent_id=ids["b"])
    assert info.value.errors[0].field == "parent_id"


@pytest.mark.parametrize(
    ("tenant", "new_parent"), [("a", "a"), ("a", "a1"), ("a1", "a1"), ("a", "b")]
)
def test_a_move_into_its_own_subtree_or_to_a_wrong_kind_changes_nothing(
    session, ids, tenant, new_parent
):
    with refused(session, Invalid) as info:
        edit(session, SYSTEM, ids[tenant], name_zh="改名了", parent_id=ids[new_parent])
    assert info.value.errors[0].field == "parent_id"
    assert fresh(session, ids[tenant]).name_zh != "改名了"


# --- deleting ---------------------------------------------------------------------------------


def test_deleting_a_tenant_with_children_users_and_bindings_is_refused(session, ids):
    with refused(session, Conflict) as info:
        tenancy.delete_tenant(session, SYSTEM, ids["a"])
    owned = info.value.extra["owned"]
    # a-admin, a-member, a-finance and a-auditor are homed in a; three of them are bound at a
    assert owned == ["2 tenant(s) not archived", "4 user(s)", "3 role binding(s)"]
    assert "archive it instead" in info.value.detail


def test_deleting_a_system_with_a_role_binding_is_refused(session, ids):
    with refused(session, Conflict) as info:
        tenancy.delete_tenant(session, SYSTEM, ids["a1"])  # a-member is bound at a1
    assert info.value.extra["owned"] == ["1 role binding(s)"]


def test_deleting_a_system_with_a_user_is_refused(session, ids):
    system = create(session, SYSTEM, ids["a"], "system", "a3")
    users.create_user(
        session, SYSTEM, UserCreate(username="a3-ops", display_name="运维", tenant_id=system.id)
    )
    session.commit()
    with refused(session, Conflict) as info:
        tenancy.delete_tenant(session, SYSTEM, system.id)
    assert info.value.extra["owned"] == ["1 user(s)"]


def test_deleting_an_agency_whose_children_are_all_archived_is_refused(session, ids):
    agency = create(session, SYSTEM, ids["center"], "agency", "c")
    child = create(session, SYSTEM, agency.id, "system", "c1")
    edit(session, SYSTEM, child.id, status="archived")
    session.commit()
    with refused(session, Conflict) as info:
        tenancy.delete_tenant(session, SYSTEM, agency.id)
    assert info.value.extra["owned"] == ["archived child tenants"]


def test_deleting_a_tenant_an_ownership_check_reports_is_refused(session, ids, ownership):
    ownership(lambda _s, t, _purpose: ["1 volume"] if t.id == ids["a2"] else [])
    with refused(session, Conflict) as info:
        tenancy.delete_tenant(session, SYSTEM, ids["a2"])
    assert info.value.extra["owned"] == ["1 volume"]


def test_history_that_only_blocks_deletion_lets_the_tenant_be_archived(session, ids, ownership):
    """Checks learn the purpose: past usage records keep a tenant from deletion, not archiving."""

    def history(_session: Session, tenant: Tenant, purpose: str) -> list[str]:
        held = tenant.id == ids["a2"] and purpose == "delete"
        return ["12 usage record(s)"] if held else []

    ownership(history)
    with refused(session, Conflict) as info:
        tenancy.delete_tenant(session, SYSTEM, ids["a2"])
    assert info.value.extra["owned"] == ["12 usage record(s)"]
    edit(session, SYSTEM, ids["a2"], status="archived")
    session.commit()
    assert fresh(session, ids["a2"]).status == "archived"


def test_deleting_an_unused_system_removes_it_and_is_audited(session, ids, principal_of):
    before = last_seq(session)
    tenancy.delete_tenant(session, principal_of("a-admin"), ids["a2"])
    session.commit()
    session.expire_all()
    assert session.get(Tenant, ids["a2"]) is None
    [event] = events_since(session, before)
    assert event.action == "tenant.delete" and event.actor_name == "a-admin"
    assert event.target_id == str(ids["a2"])
    assert event.before is not None and event.before["code"] == "a2"
    assert event.after is None


def test_the_center_and_agencies_are_not_deleted_by_agency_admins(session, ids, principal_of):
    with refused(session, Conflict):
        tenancy.delete_tenant(session, SYSTEM, ids["center"])
    agency = create(session, SYSTEM, ids["center"], "agency", "c")
    session.commit()
    with refused(session, NotFound):  # another agency is invisible to a-admin
        tenancy.delete_tenant(session, principal_of("a-admin"), agency.id)
    with refused(session, Forbidden):  # its own agency belongs to the center
        tenancy.delete_tenant(session, principal_of("a-admin"), ids["a"])


# --- the audit trail --------------------------------------------------------------------------


def test_every_change_writes_its_audit_event(session, ids):
    made: dict[str, uuid.UUID] = {}

    def make_agency() -> None:
        made["c"] = create(session, SYSTEM, ids["center"], "agency", "c").id

    def make_system() -> None:
        made["c1"] = create(session, SYSTEM, made["c"], "system", "c1").id

    steps: list[tuple[Callable[[], Any], list[str]]] = [
        (make_agency, ["tenant.create"]),
        (make_system, ["tenant.create"]),
        (lambda: edit(session, SYSTEM, made["c1"], name_en="One"), ["tenant.update"]),
        (lambda: edit(session, SYSTEM, made["c1"], status="suspended"), ["tenant.suspend"]),
        (lambda: edit(session, SYSTEM, made["c1"], status="active"), ["tenant.activate"]),
        (lambda: edit(session, SYSTEM, made["c1"], parent_id=ids["a"]), ["tenant.update"]),
        (
            lambda: edit(session, SYSTEM, made["c1"], status="suspended", description="x"),
            ["tenant.suspend", "tenant.update"],
        ),
        (lambda: edit(session, SYSTEM, made["c1"], status="archived"), ["tenant.archive"]),
        (lambda: edit(session, SYSTEM, made["c"], status="archived"), ["tenant.archive"]),
        (lambda: edit(session, SYSTEM, made["c"], status="active"), ["tenant.activate"]),
        (lambda: tenancy.delete_tenant(session, SYSTEM, made["c"]), ["tenant.delete"]),
    ]
    for n, (step, expected) in enumerate(steps):
        before = last_seq(session)
        step()
        session.commit()
        got = [e.action for e in events_since(session, before)]
        assert got == expected, f"step {n}: {got} instead of {expected}"


def test_an_edit_that_changes_nothing_writes_no_audit_event(session, ids):
    before = audit_count(session)
    edit(session, SYSTEM, ids["a1"], name_zh=fresh(session, ids["a1"]).name_zh)
    edit(session, SYSTEM, ids["a1"], status="active", parent_id=ids["a"])
    session.commit()
    assert audit_count(session) == before


Ids = dict[str, uuid.UUID]
# each refused after part of its work may already be done (a status staged with its audit event,
# a name set) — the rollback must take all of it back
REFUSALS: dict[str, Callable[[Session, Ids, Principal], Any]] = {
    "archive with children": lambda s, t, _: edit(s, SYSTEM, t["a"], status="archived"),
    "suspend then move under a system": lambda s, t, _: edit(
        s, SYSTEM, t["a1"], status="suspended", parent_id=t["b1"]
    ),
    "rename then move under own child": lambda s, t, _: edit(
        s, SYSTEM, t["a"], name_zh="改名", parent_id=t["a2"]
    ),
    "create with a used code": lambda s, t, _: create(s, SYSTEM, t["a"], "system", "b1"),
    "delete with a binding": lambda s, t, _: tenancy.delete_tenant(s, SYSTEM, t["a1"]),
    "agency admin renames its agency": lambda s, t, a_admin: edit(
        s, a_admin, t["a"], name_en="Mine"
    ),
    "agency admin creates in another agency": lambda s, t, a_admin: create(
        s, a_admin, t["b"], "system", "b2"
    ),
}


@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_a_refused_call_writes_neither_its_change_nor_its_audit_event(
    session, ids, principal_of, refusal
):
    with refused(session, GovbrokerError):
        REFUSALS[refusal](session, ids, principal_of("a-admin"))
    # the same session goes on: whatever the refused call staged must not ride along
    before = last_seq(session)
    edit(session, SYSTEM, ids["b1"], name_en="After the refusal")
    session.commit()
    assert [e.action for e in events_since(session, before)] == ["tenant.update"]
    assert fresh(session, ids["a"]).status == "active"
    assert fresh(session, ids["a"]).name_zh == "甲局"
    assert fresh(session, ids["a1"]).status == "active"
    assert fresh(session, ids["a1"]).parent_id == ids["a"]
