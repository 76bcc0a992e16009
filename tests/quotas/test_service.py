"""Service level: setting limits (hierarchy, usage, roles, windows), expiry notices, usage reports,
and what quota means for archiving and deleting a tenant.

Limits of `quota_estate` (tests/fixtures/quota.py): center 1 000 000 of every class; agency a:
vcpu 100, memory_mb 204800, instances 20; agency b: vcpu 50; system a1: vcpu 40; a2: no limit of
its own. Audit events are linked at commit: tests that look at the trail `session.commit()` first
(the test's transaction is still rolled back at the end). Tests that move time ask for `clock`
before `session`/`quota_estate`, so the limits are set in travelled time.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import event, func
from sqlmodel import Session, select

from broker.audit.models import AuditEvent
from broker.core.clock import now
from broker.core.errors import Conflict, Forbidden, GovbrokerError, Invalid, NotFound, QuotaExceeded
from broker.tenancy import service as tenancy
from broker.tenancy.models import Tenant
from broker.tenancy.schemas import TenantCreate, TenantUpdate
from quotas import ledger
from quotas import service as quotas
from quotas.models import Quota, QuotaNotice
from tests.fixtures.quota import CENTER_LIMIT, SYSTEM

# --- helpers ----------------------------------------------------------------------------------


def limit_of(session: Session, tenant_id: uuid.UUID, rc: str = "vcpu") -> int | None:
    """The limit as stored now; None when there is no row or no limit of its own."""
    q = (
        session.execute(
            select(Quota)
            .where(Quota.tenant_id == tenant_id, Quota.resource_class == rc)
            .execution_options(populate_existing=True)
        )
        .scalars()
        .first()
    )
    return q.hard_limit if q is not None else None


def last_seq(session: Session) -> int:
    return int(session.execute(select(func.coalesce(func.max(AuditEvent.seq), 0))).scalar_one())


def events_since(session: Session, seq: int) -> list[AuditEvent]:
    stmt = select(AuditEvent).where(AuditEvent.seq > seq).order_by(AuditEvent.seq)  # type: ignore[arg-type]
    return list(session.execute(stmt).scalars())


def field_of(error: GovbrokerError) -> tuple[str, str]:
    (only,) = error.errors
    return only.field, only.code


def line(lines: list[quotas.UsageLine], rc: str = "vcpu") -> quotas.UsageLine:
    return next(x for x in lines if x.resource_class == rc)


def child(
    children: list[tuple[Tenant, list[quotas.UsageLine]]], code: str, rc: str = "vcpu"
) -> quotas.UsageLine:
    return next(line(lines, rc) for t, lines in children if t.code == code)


def hold(session: Session, tenant_id: uuid.UUID, amount: int, ref: str, *, commit: bool) -> None:
    r = ledger.reserve(session, tenant_id, {"vcpu": amount}, ref=ref, actor="test")
    if commit:
        ledger.commit(session, r.id)


def new_tenant(session: Session, parent_id: uuid.UUID, kind: str, code: str) -> Tenant:
    return tenancy.create_tenant(
        session, SYSTEM, TenantCreate(parent_id=parent_id, kind=kind, code=code, name_zh=code)
    )


def archive(session: Session, tenant_id: uuid.UUID) -> Tenant:
    return tenancy.update_tenant(session, SYSTEM, tenant_id, TenantUpdate(status="archived"))


# --- the hierarchy: children's limits sum to at most the parent's -----------------------------


def test_an_agency_may_take_at_most_what_the_center_has_left(session, quota_estate):
    e = quota_estate
    left = CENTER_LIMIT - 50  # b holds 50
    with pytest.raises(Invalid) as info:
        quotas.set_quota(session, SYSTEM, e.tid("a"), "vcpu", limit=left + 1)
    assert field_of(info.value) == ("limit", "exceeds_parent")
    assert str(left) in info.value.detail
    assert limit_of(session, e.tid("a")) == 100
    quotas.set_quota(session, SYSTEM, e.tid("a"), "vcpu", limit=left)
    assert limit_of(session, e.tid("a")) == left


def test_a_system_may_take_at_most_what_its_agency_has_left(session, quota_estate):
    e = quota_estate
    with pytest.raises(Invalid) as info:
        quotas.set_quota(session, SYSTEM, e.tid("a2"), "vcpu", limit=61)
    assert field_of(info.value) == ("limit", "exceeds_parent")
    assert "at most 60" in info.value.detail
    quotas.set_quota(session, SYSTEM, e.tid("a2"), "vcpu", limit=60)
    assert limit_of(session, e.tid("a2")) == 60


def test_an_agency_limit_cannot_drop_below_what_its_systems_hold(session, quota_estate):
    e = quota_estate
    with pytest.raises(Invalid) as info:
        quotas.set_quota(session, SYSTEM, e.tid("a"), "vcpu", limit=39)
    assert field_of(info.value) == ("limit", "below_children")
    quotas.set_quota(session, SYSTEM, e.tid("a"), "vcpu", limit=40)
    assert limit_of(session, e.tid("a")) == 40


def test_the_center_limit_cannot_drop_below_what_the_agencies_hold(session, quota_estate):
    e = quota_estate
    with pytest.raises(Invalid) as info:
        quotas.set_quota(session, SYSTEM, e.tid("center"), "vcpu", limit=149)
    assert field_of(info.value) == ("limit", "below_children")
    quotas.set_quota(session, SYSTEM, e.tid("center"), "vcpu", limit=150)
    assert limit_of(session, e.tid("center")) == 150


def test_a_system_gets_no_limit_before_its_agency_has_one(session, quota_estate):
    with pytest.raises(Invalid) as info:
        quotas.set_quota(session, SYSTEM, quota_estate.tid("b1"), "memory_mb", limit=1)
    assert field_of(info.value) == ("limit", "parent_unset")


# --- lowering below usage ---------------------------------------------------------------------


def test_lowering_a_system_limit_below_usage_is_refused_with_a_conflict(session, quota_estate):
    e = quota_estate
    hold(session, e.tid("a1"), 30, "use", commit=True)
    with pytest.raises(Conflict) as info:
        quotas.set_quota(session, SYSTEM, e.tid("a1"), "vcpu", limit=29)
    assert field_of(info.value) == ("limit", "below_usage")
    assert "force=true" in info.value.detail
    assert limit_of(session, e.tid("a1")) == 40
    quotas.set_quota(session, SYSTEM, e.tid("a1"), "vcpu", limit=30)  # exactly the usage is fine
    assert limit_of(session, e.tid("a1")) == 30


def test_lowering_an_agency_limit_below_usage_counts_reservations_too(session, quota_estate):
    e = quota_estate
    hold(session, e.tid("a2"), 50, "pending", commit=False)  # reserved, not committed
    with pytest.raises(Conflict) as info:
        quotas.set_quota(session, SYSTEM, e.tid("a"), "vcpu", limit=45)
    assert field_of(info.value) == ("limit", "below_usage")
    assert limit_of(session, e.tid("a")) == 100


def test_a_center_admin_may_force_a_limit_below_usage_leaving_the_tenant_over_quota(
    session, quota_estate, principal_of
):
    e = quota_estate
    admin = principal_of("admin")
    hold(session, e.tid("a1"), 30, "use", commit=True)
    session.commit()
    seq = last_seq(session)
    quotas.set_quota(session, admin, e.tid("a1"), "vcpu", limit=20, force=True)
    session.commit()
    assert limit_of(session, e.tid("a1")) == 20
    assert [(ev.action, ev.actor_name) for ev in events_since(session, seq)] == [
        ("quota.set", "admin"),
        ("quota.force_below_usage", "admin"),
    ]
    assert events_since(session, seq)[1].after == {"limit": 20, "usage": 30}
    # over quota: allocations stay, nothing new is admitted, and the shortfall says by how much
    _, _, children = quotas.usage_report(session, admin, e.tid("a"))
    a1 = child(children, "a1")
    assert (a1.status, a1.committed, a1.available) == ("over_quota", 30, 0)
    with pytest.raises(QuotaExceeded) as info:
        ledger.reserve(session, e.tid("a1"), {"vcpu": 1}, ref="more", actor="test")
    (over,) = info.value.over
    assert (over.level, over.tenant_code, over.limit, over.usage, over.requested) == (
        "system",
        "a1",
        20,
        30,
        1,
    )
    assert over.shortfall == 11
    assert "limit 20, in use 30, requested 1" in info.value.detail


def test_only_center_admins_may_force_a_limit(session, quota_estate, principal_of):
    e = quota_estate
    a_admin = principal_of("a-admin")
    hold(session, e.tid("a1"), 30, "use", commit=True)
    with pytest.raises(Forbidden):
        quotas.set_quota(session, a_admin, e.tid("a1"), "vcpu", limit=20, force=True)
    with pytest.raises(Conflict):
        quotas.set_quota(session, a_admin, e.tid("a1"), "vcpu", limit=20)
    assert limit_of(session, e.tid("a1")) == 40


# --- who sets what ----------------------------------------------------------------------------


def test_an_agency_admin_splits_its_agencys_quota_among_its_systems(
    session, quota_estate, principal_of
):
    e = quota_estate
    a_admin = principal_of("a-admin")
    quotas.set_quota(session, a_admin, e.tid("a1"), "vcpu", limit=50)
    quotas.set_quota(session, a_admin, e.tid("a2"), "vcpu", limit=50)
    quotas.set_quota(session, a_admin, e.tid("a2"), "instances", limit=20)
    assert (limit_of(session, e.tid("a1")), limit_of(session, e.tid("a2"))) == (50, 50)
    with pytest.raises(Invalid) as info:
        quotas.set_quota(session, a_admin, e.tid("a1"), "vcpu", limit=51)
    assert field_of(info.value) == ("limit", "exceeds_parent")


def test_an_agency_admin_cannot_set_its_own_agencys_limit(session, quota_estate, principal_of):
    e = quota_estate
    with pytest.raises(Forbidden):
        quotas.set_quota(session, principal_of("a-admin"), e.tid("a"), "vcpu", limit=90)
    assert limit_of(session, e.tid("a")) == 100


@pytest.mark.parametrize("code", ["b", "b1", "center"])
def test_tenants_outside_an_agency_admins_scope_are_not_found(
    code, session, quota_estate, principal_of
):
    with pytest.raises(NotFound):
        quotas.set_quota(session, principal_of("a-admin"), quota_estate.tid(code), "vcpu", limit=1)


def test_a_member_cannot_split_quota(session, quota_estate, principal_of):
    with pytest.raises(Forbidden):
        quotas.set_quota(session, principal_of("a-member"), quota_estate.tid("a1"), "vcpu", limit=1)


def test_a_system_may_drop_its_own_limit_and_share_its_agencys_pool(
    session, quota_estate, principal_of
):
    e = quota_estate
    a_admin = principal_of("a-admin")
    quotas.set_quota(session, a_admin, e.tid("a1"), "vcpu", limit=None)
    assert limit_of(session, e.tid("a1")) is None
    listed = {(t.code, q.resource_class) for q, t in quotas.list_quotas(session, a_admin)}
    assert ("a1", "vcpu") not in listed
    ledger.reserve(session, e.tid("a1"), {"vcpu": 100}, ref="whole-pool", actor="test")
    with pytest.raises(QuotaExceeded) as info:
        ledger.reserve(session, e.tid("a1"), {"vcpu": 1}, ref="beyond", actor="test")
    assert [(o.level, o.tenant_code) for o in info.value.over] == [("agency", "a")]


@pytest.mark.parametrize("code", ["a", "center"])
def test_an_agency_or_the_center_always_needs_a_limit(code, session, quota_estate):
    with pytest.raises(Invalid) as info:
        quotas.set_quota(session, SYSTEM, quota_estate.tid(code), "vcpu", limit=None)
    assert field_of(info.value) == ("limit", "required")


# --- bad input --------------------------------------------------------------------------------


def test_an_unknown_class_names_resource_class(session, quota_estate):
    with pytest.raises(Invalid) as info:
        quotas.set_quota(session, SYSTEM, quota_estate.tid("a"), "gpu", limit=1)
    assert field_of(info.value) == ("resource_class", "unknown_class")


@pytest.mark.parametrize("limit", [-1, 10_000_001, 10**30])
def test_negative_or_huge_limits_name_limit(limit, session, quota_estate):
    with pytest.raises(Invalid) as info:
        quotas.set_quota(session, SYSTEM, quota_estate.tid("a2"), "vcpu", limit=limit)
    assert field_of(info.value) == ("limit", "out_of_range")
    assert limit_of(session, quota_estate.tid("a2")) is None


def test_an_archived_tenant_gets_no_quota(session, quota_estate):
    e = quota_estate
    archive(session, e.tid("a2"))
    with pytest.raises(Invalid) as info:
        quotas.set_quota(session, SYSTEM, e.tid("a2"), "vcpu", limit=1)
    assert field_of(info.value) == ("tenant_id", "archived")


# --- validity windows -------------------------------------------------------------------------


def test_valid_until_must_be_later_than_valid_from(clock, session, quota_estate):
    e = quota_estate
    start = now() + timedelta(days=1)
    for end in (start, start - timedelta(seconds=1)):
        with pytest.raises(Invalid) as info:
            quotas.set_quota(
                session, SYSTEM, e.tid("b"), "vcpu", limit=50, valid_from=start, valid_until=end
            )
        assert field_of(info.value) == ("valid_until", "window")
    # only valid_until given: compared with the window's current start
    with pytest.raises(Invalid) as info:
        quotas.set_quota(
            session, SYSTEM, e.tid("b"), "vcpu", limit=50, valid_until=now() - timedelta(days=1)
        )
    assert field_of(info.value) == ("valid_until", "window")


def test_usage_report_counts_down_days_remaining_and_marks_an_expired_quota(
    clock, session, quota_estate
):
    e = quota_estate
    hold(session, e.tid("b1"), 5, "kept", commit=True)
    until = now() + timedelta(days=10)
    quotas.set_quota(session, SYSTEM, e.tid("b"), "vcpu", limit=50, valid_until=until)

    def b_vcpu() -> quotas.UsageLine:
        _, lines, _ = quotas.usage_report(session, SYSTEM, e.tid("b"))
        return line(lines)

    first = b_vcpu()
    assert (first.status, first.days_remaining, first.valid_until) == ("valid", 10, until)
    clock.shift(timedelta(days=9, hours=12))
    assert (b_vcpu().status, b_vcpu().days_remaining) == ("valid", 1)  # half a day counts as one
    clock.shift(timedelta(hours=12))
    expired = b_vcpu()
    assert (expired.status, expired.days_remaining) == ("expired", 0)
    assert (expired.committed, expired.limit) == (5, 50)  # allocations stay
    with pytest.raises(QuotaExceeded) as info:
        ledger.reserve(session, e.tid("b1"), {"vcpu": 1}, ref="late", actor="test")
    assert info.value.over[0].reason == "expired"


def test_a_window_that_has_not_started_reports_not_yet_valid(clock, session, quota_estate):
    e = quota_estate
    quotas.set_quota(
        session, SYSTEM, e.tid("b"), "vcpu", limit=50, valid_from=now() + timedelta(days=2)
    )
    _, lines, _ = quotas.usage_report(session, SYSTEM, e.tid("b"))
    assert line(lines).status == "not_yet_valid"
    with pytest.raises(QuotaExceeded) as info:
        ledger.reserve(session, e.tid("b1"), {"vcpu": 1}, ref="early", actor="test")
    assert info.value.over[0].reason == "not_yet_valid"


def test_renewing_an_expired_window_is_audited_as_quota_renew(
    clock, session, quota_estate, principal_of
):
    e = quota_estate
    admin = principal_of("admin")
    old_until = now() + timedelta(days=5)
    quotas.set_quota(session, admin, e.tid("b"), "vcpu", limit=50, valid_until=old_until)
    session.commit()
    clock.shift(timedelta(days=6))
    seq = last_seq(session)
    new_from, new_until = now(), now() + timedelta(days=365)
    quotas.set_quota(
        session, admin, e.tid("b"), "vcpu", limit=50, valid_from=new_from, valid_until=new_until
    )
    session.commit()
    (renewed,) = events_since(session, seq)
    assert (renewed.action, renewed.target_type, renewed.tenant_id) == (
        "quota.renew",
        "quota",
        e.tid("b"),
    )
    assert renewed.before["valid_until"] == old_until.isoformat()
    assert renewed.after["valid_until"] == new_until.isoformat()
    assert renewed.after["limit"] == 50
    _, lines, _ = quotas.usage_report(session, admin, e.tid("b"))
    assert (line(lines).status, line(lines).days_remaining) == ("valid", 365)
    ledger.reserve(session, e.tid("b1"), {"vcpu": 1}, ref="after-renewal", actor="test")


def test_changing_the_limit_is_audited_as_quota_set_and_an_unchanged_write_not_at_all(
    session, quota_estate, principal_of
):
    e = quota_estate
    admin = principal_of("admin")
    session.commit()
    seq = last_seq(session)
    quotas.set_quota(session, admin, e.tid("b"), "vcpu", limit=60)
    quotas.set_quota(session, admin, e.tid("b"), "vcpu", limit=60)
    session.commit()
    (changed,) = events_since(session, seq)
    assert changed.action == "quota.set"
    assert (changed.before["limit"], changed.after["limit"]) == (50, 60)


# --- expiry notices ---------------------------------------------------------------------------


def notices(session: Session) -> list[tuple[str, uuid.UUID, str, datetime]]:
    rows = session.execute(
        select(QuotaNotice).order_by(QuotaNotice.created_at, QuotaNotice.kind)  # type: ignore[arg-type]
    ).scalars()
    return [(n.kind, n.tenant_id, n.resource_class, n.valid_until) for n in rows]


def test_expiry_notices_come_7_days_and_1_day_before_expiry_once_each(clock, session, quota_estate):
    e = quota_estate
    until = now() + timedelta(days=10)
    quotas.set_quota(session, SYSTEM, e.tid("b"), "vcpu", limit=50, valid_until=until)
    assert quotas.emit_expiry_notices(session) == 0
    clock.shift(timedelta(days=3))  # 7 days left
    assert quotas.emit_expiry_notices(session) == 1
    assert quotas.emit_expiry_notices(session) == 0  # a rerun emits nothing again
    clock.shift(timedelta(days=5))  # 2 days left
    assert quotas.emit_expiry_notices(session) == 0
    clock.shift(timedelta(days=1))  # 1 day left
    assert quotas.emit_expiry_notices(session) == 1
    assert quotas.emit_expiry_notices(session) == 0
    clock.shift(timedelta(days=2))  # expired: nothing more to warn about
    assert quotas.emit_expiry_notices(session) == 0
    assert notices(session) == [
        ("expiry_7d", e.tid("b"), "vcpu", until),
        ("expiry_1d", e.tid("b"), "vcpu", until),
    ]


def test_a_renewed_window_gets_its_own_notices(clock, session, quota_estate):
    e = quota_estate
    first = now() + timedelta(days=7)
    quotas.set_quota(session, SYSTEM, e.tid("b"), "vcpu", limit=50, valid_until=first)
    assert quotas.emit_expiry_notices(session) == 1
    second = first + timedelta(days=30)
    quotas.set_quota(session, SYSTEM, e.tid("b"), "vcpu", limit=50, valid_until=second)
    assert quotas.emit_expiry_notices(session) == 0
    clock.shift(second - now() - timedelta(days=7))
    assert quotas.emit_expiry_notices(session) == 1
    clock.shift(timedelta(days=6))
    assert quotas.emit_expiry_notices(session) == 1
    assert quotas.emit_expiry_notices(session) == 0
    assert [(kind, until) for kind, _, _, until in notices(session)] == [
        ("expiry_7d", first),
        ("expiry_7d", second),
        ("expiry_1d", second),
    ]


def test_quotas_without_an_end_or_without_a_limit_get_no_notice(clock, session, quota_estate):
    e = quota_estate
    # a1's window ends in 3 days, but it has no limit of its own to lose
    quotas.set_quota(
        session, SYSTEM, e.tid("a1"), "vcpu", limit=None, valid_until=now() + timedelta(days=3)
    )
    assert quotas.emit_expiry_notices(session) == 0  # the estate's limits never end


# --- usage reports ----------------------------------------------------------------------------


def test_an_agency_report_rolls_up_its_systems(session, quota_estate):
    e = quota_estate
    hold(session, e.tid("a1"), 10, "a1-committed", commit=True)
    hold(session, e.tid("a2"), 5, "a2-reserved", commit=False)
    tenant, lines, children = quotas.usage_report(session, SYSTEM, e.tid("a"))
    assert tenant.code == "a"
    a = line(lines)
    assert (a.limit, a.committed, a.reserved, a.available) == (100, 10, 5, 85)
    assert (a.utilization_percent, a.status, a.unit) == (Decimal("15.0"), "valid", "vCPU")
    assert [t.code for t, _ in children] == ["a1", "a2"]
    a1 = child(children, "a1")
    assert (a1.limit, a1.committed, a1.reserved, a1.available) == (40, 10, 0, 30)
    assert a1.utilization_percent == Decimal("25.0")
    a2 = child(children, "a2")  # no limit of its own: usage shown, nothing to divide by
    assert (a2.limit, a2.committed, a2.reserved, a2.available) == (None, 0, 5, None)
    assert (a2.utilization_percent, a2.status) == (None, "unlimited")
    # every configured class has a line, in the configured order
    assert [x.resource_class for x in lines] == list(ledger.resource_classes(session))


def test_the_center_report_sums_the_agencies(session, quota_estate):
    e = quota_estate
    hold(session, e.tid("a1"), 10, "a1", commit=True)
    hold(session, e.tid("a2"), 5, "a2", commit=False)
    hold(session, e.tid("b1"), 25, "b1", commit=True)
    tenant, lines, children = quotas.usage_report(session, SYSTEM, e.tid("center"))
    assert tenant.kind == "center"
    center = line(lines)
    assert (center.limit, center.committed, center.reserved) == (CENTER_LIMIT, 35, 5)
    assert center.available == CENTER_LIMIT - 40
    assert center.utilization_percent == Decimal("0.0")
    assert [t.code for t, _ in children] == ["a", "b"]
    assert (child(children, "a").committed, child(children, "a").reserved) == (10, 5)
    b = child(children, "b")
    assert (b.limit, b.committed, b.available, b.utilization_percent) == (
        50,
        25,
        25,
        Decimal("50.0"),
    )


def test_reports_do_not_count_expired_reservations(clock, session, quota_estate):
    e = quota_estate
    ledger.reserve(
        session, e.tid("a1"), {"vcpu": 8}, ref="lapsing", actor="t", ttl=timedelta(minutes=5)
    )
    clock.shift(timedelta(minutes=6))
    for code in ("center", "a"):
        _, lines, children = quotas.usage_report(session, SYSTEM, e.tid(code))
        assert (line(lines).reserved, line(lines).committed) == (0, 0), code
    _, _, children = quotas.usage_report(session, SYSTEM, e.tid("a"))
    assert child(children, "a1").reserved == 0


def test_expired_reservations_do_not_count_as_usage_when_lowering_a_limit(
    clock, session, quota_estate
):
    """Two 100-vCPU reservations of a2, each expired (unswept) before the next was made: nothing
    is in use, at any level, so lowering a limit to what the children hold must succeed."""
    e = quota_estate
    for ref in ("first", "second"):
        ledger.reserve(
            session, e.tid("a2"), {"vcpu": 100}, ref=ref, actor="t", ttl=timedelta(minutes=5)
        )
        clock.shift(timedelta(minutes=6))
    quotas.set_quota(session, SYSTEM, e.tid("a"), "vcpu", limit=40)  # a1 holds 40
    quotas.set_quota(session, SYSTEM, e.tid("center"), "vcpu", limit=90)  # a 40 + b 50
    assert limit_of(session, e.tid("center")) == 90


def test_the_center_report_reads_all_agencies_in_a_fixed_number_of_statements(
    db, session, quota_estate, principal_of
):
    e = quota_estate
    admin = principal_of("admin")

    def add_agencies(first: int, count: int) -> None:
        for i in range(first, first + count):
            agency = new_tenant(session, e.tid("center"), "agency", f"n{i}")
            system = new_tenant(session, agency.id, "system", f"n{i}-s")
            quotas.set_quota(session, SYSTEM, agency.id, "vcpu", limit=10)
            quotas.set_quota(session, SYSTEM, system.id, "vcpu", limit=5)
            hold(session, system.id, 2, f"n{i}", commit=True)
        session.commit()

    def report_statements() -> tuple[int, Any]:
        seen: list[str] = []
        session.expunge_all()  # every run loads the same objects afresh

        def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            seen.append(statement)

        event.listen(db.connection, "before_cursor_execute", count)
        try:
            report = quotas.usage_report(session, admin, e.tid("center"))
        finally:
            event.remove(db.connection, "before_cursor_execute", count)
        return len(seen), report

    report_statements()  # warm the resource-class cache
    add_agencies(0, 3)
    few, (_, lines, children) = report_statements()
    assert len(children) == 5
    assert line(lines).committed == 6
    add_agencies(3, 9)
    many, (_, lines, children) = report_statements()
    assert [t.code for t, _ in children] == ["a", "b", *sorted(f"n{i}" for i in range(12))]
    assert line(lines).committed == 24
    assert all(child(children, f"n{i}").committed == 2 for i in range(12))
    assert many == few


# --- archiving and deleting -------------------------------------------------------------------


def test_archiving_a_system_is_refused_while_its_quota_is_in_use(session, quota_estate):
    e = quota_estate
    hold(session, e.tid("a1"), 5, "in-use", commit=True)
    with pytest.raises(Conflict) as info:
        archive(session, e.tid("a1"))
    assert "5 vcpu in use" in info.value.extra["owned"]
    ledger.release(session, "in-use")
    archive(session, e.tid("a1"))  # its limit alone does not keep it from being archived
    assert session.get(Tenant, e.tid("a1")).status == "archived"


def test_deleting_a_tenant_is_refused_while_it_has_quota_settings(session, quota_estate):
    e = quota_estate
    fresh = new_tenant(session, e.tid("a"), "system", "a3")
    quotas.set_quota(session, SYSTEM, fresh.id, "vcpu", limit=10)
    with pytest.raises(Conflict) as info:
        tenancy.delete_tenant(session, SYSTEM, fresh.id)
    assert "quota settings" in info.value.extra["owned"]
    bare = new_tenant(session, e.tid("a"), "system", "a4")
    tenancy.delete_tenant(session, SYSTEM, bare.id)
    assert session.get(Tenant, bare.id) is None
