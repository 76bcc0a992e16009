"""The ledger's behaviour, one rule at a time (the concurrency and state-machine proofs live in
test_concurrency.py and test_ledger_states.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlmodel import select

from broker.core.clock import now
from broker.core.errors import Conflict, Invalid, QuotaExceeded
from quotas import ledger
from quotas import service as quotas
from quotas.models import Allocation, Quota, Reservation
from tests.fixtures.quota import SYSTEM


def counters(session, tenant_id, rc="vcpu"):  # type: ignore[no-untyped-def]
    q = (
        session.execute(
            select(Quota)
            .where(Quota.tenant_id == tenant_id, Quota.resource_class == rc)
            .execution_options(populate_existing=True)
        )
        .scalars()
        .first()
    )
    return (q.committed, q.reserved) if q else (0, 0)


def test_reserve_commit_release_moves_the_counters_at_every_level(session, quota_estate):
    e = quota_estate
    r = ledger.reserve(session, e.tid("a1"), {"vcpu": 8, "memory_mb": 16384}, ref="r1", actor="t")
    assert counters(session, e.tid("a1")) == (0, 8)
    assert counters(session, e.tid("a")) == (0, 8)
    assert counters(session, e.tid("a"), "memory_mb") == (0, 16384)
    ledger.commit(session, r.id)
    assert counters(session, e.tid("a1")) == (8, 0)
    assert counters(session, e.tid("a")) == (8, 0)
    ledger.release(session, r.id)
    assert counters(session, e.tid("a1")) == (0, 0)
    assert counters(session, e.tid("a")) == (0, 0)
    states = session.execute(select(Allocation.state)).scalars().all()
    assert set(states) == {"released"}


def test_reserve_refuses_when_the_system_is_full(session, quota_estate):
    e = quota_estate
    ledger.reserve(session, e.tid("a1"), {"vcpu": 40}, ref="fill", actor="t")
    with pytest.raises(QuotaExceeded) as info:
        ledger.reserve(session, e.tid("a1"), {"vcpu": 1}, ref="one-more", actor="t")
    (over,) = info.value.over
    assert (over.level, over.tenant_code, over.limit, over.usage, over.requested) == (
        "system",
        "a1",
        40,
        40,
        1,
    )


def test_reserve_refuses_when_the_parent_is_full(session, quota_estate):
    """a2 has no limit of its own: it is stopped by agency a's 100 vCPU."""
    e = quota_estate
    ledger.reserve(session, e.tid("a1"), {"vcpu": 40}, ref="a1", actor="t")
    ledger.reserve(session, e.tid("a2"), {"vcpu": 60}, ref="a2", actor="t")
    with pytest.raises(QuotaExceeded) as info:
        ledger.reserve(session, e.tid("a2"), {"vcpu": 1}, ref="a2b", actor="t")
    assert [(o.level, o.tenant_code) for o in info.value.over] == [("agency", "a")]


def test_quota_exceeded_names_every_shortfall_not_just_the_first(session, quota_estate):
    e = quota_estate
    with pytest.raises(QuotaExceeded) as info:
        ledger.reserve(
            session,
            e.tid("a1"),
            {"vcpu": 120, "memory_mb": 300000, "public_ip": 1},
            ref="big",
            actor="t",
        )
    found = {(o.resource_class, o.tenant_code, o.reason) for o in info.value.over}
    assert found == {
        ("vcpu", "a", "limit"),
        ("vcpu", "a1", "limit"),
        ("memory_mb", "a", "limit"),
        ("public_ip", "a", "no_quota"),
    }
    assert session.execute(select(Reservation)).first() is None


def test_shrink_always_succeeds_even_over_quota(session, quota_estate):
    e = quota_estate
    r = ledger.reserve(session, e.tid("a1"), {"vcpu": 30}, ref="grow", actor="t")
    ledger.commit(session, r.id)
    quotas.set_quota(session, SYSTEM, e.tid("a1"), "vcpu", limit=10, force=True)
    with pytest.raises(QuotaExceeded):
        ledger.reserve(session, e.tid("a1"), {"vcpu": 1}, ref="no", actor="t")
    shrink = ledger.reserve(session, e.tid("a1"), {"vcpu": -20}, ref="shrink", actor="t")
    assert counters(session, e.tid("a1")) == (30, 0)  # a pending shrink frees nothing yet
    ledger.commit(session, shrink.id)
    assert counters(session, e.tid("a1")) == (10, 0)


def test_shrink_below_zero_is_refused(session, quota_estate):
    e = quota_estate
    with pytest.raises(Invalid) as info:
        ledger.reserve(session, e.tid("a1"), {"vcpu": -1}, ref="neg", actor="t")
    assert info.value.errors[0].field == "deltas.vcpu"


def test_reserve_is_idempotent_on_ref(session, quota_estate):
    e = quota_estate
    first = ledger.reserve(session, e.tid("a1"), {"vcpu": 4}, ref="same", actor="t")
    again = ledger.reserve(session, e.tid("a1"), {"vcpu": 4}, ref="same", actor="t")
    assert again.id == first.id
    assert counters(session, e.tid("a1")) == (0, 4)
    with pytest.raises(Conflict):
        ledger.reserve(session, e.tid("a1"), {"vcpu": 5}, ref="same", actor="t")


def test_commit_and_release_are_idempotent(session, quota_estate):
    e = quota_estate
    r = ledger.reserve(session, e.tid("a1"), {"vcpu": 4}, ref="x", actor="t")
    ledger.commit(session, r.id)
    ledger.commit(session, "x")
    assert counters(session, e.tid("a1")) == (4, 0)
    ledger.release(session, r.id)
    ledger.release(session, r.id)
    assert counters(session, e.tid("a1")) == (0, 0)
    with pytest.raises(Conflict):
        ledger.commit(session, r.id)


def test_expired_reservations_are_never_counted_and_get_swept(clock, session, quota_estate):
    e = quota_estate
    r = ledger.reserve(
        session, e.tid("a1"), {"vcpu": 40}, ref="old", actor="t", ttl=timedelta(minutes=5)
    )
    clock.shift(timedelta(minutes=6))
    fresh = ledger.reserve(session, e.tid("a1"), {"vcpu": 40}, ref="new", actor="t")
    with pytest.raises(Conflict, match="expired"):
        ledger.commit(session, r.id)
    assert ledger.sweep_expired(session) == 1
    assert counters(session, e.tid("a1")) == (0, 40)
    assert session.get(Reservation, r.id).state == "released"
    assert session.get(Reservation, fresh.id).state == "reserved"


def test_release_owner_gives_back_every_committed_allocation_of_a_server(session, quota_estate):
    e = quota_estate
    create = ledger.reserve(
        session, e.tid("a1"), {"vcpu": 8, "instances": 1}, ref="c", actor="t", owner_ref="server:1"
    )
    ledger.commit(session, create.id)
    grow = ledger.reserve(
        session, e.tid("a1"), {"vcpu": 4}, ref="g", actor="t", owner_ref="server:1"
    )
    ledger.commit(session, grow.id)
    shrink = ledger.reserve(
        session, e.tid("a1"), {"vcpu": -2}, ref="s", actor="t", owner_ref="server:1"
    )
    ledger.commit(session, shrink.id)
    assert counters(session, e.tid("a1")) == (10, 0)
    assert ledger.release_owner(session, "server:1") == 4
    assert counters(session, e.tid("a1")) == (0, 0)
    assert counters(session, e.tid("a"), "instances") == (0, 0)


def test_agency_without_quota_gets_nothing(session, quota_estate):
    with pytest.raises(QuotaExceeded) as info:
        ledger.reserve(session, quota_estate.tid("b1"), {"memory_mb": 1}, ref="m", actor="t")
    assert info.value.over[0].reason == "no_quota"


def test_expired_quota_admits_no_new_reservations_but_keeps_allocations(
    clock, session, quota_estate
):
    e = quota_estate
    r = ledger.reserve(session, e.tid("b1"), {"vcpu": 5}, ref="b", actor="t")
    ledger.commit(session, r.id)
    until = now() + timedelta(days=2)
    quotas.set_quota(session, SYSTEM, e.tid("b"), "vcpu", limit=50, valid_until=until)
    clock.shift(timedelta(days=3))
    with pytest.raises(QuotaExceeded) as info:
        ledger.reserve(session, e.tid("b1"), {"vcpu": 1}, ref="late", actor="t")
    assert info.value.over[0].reason == "expired"
    assert counters(session, e.tid("b")) == (5, 0)
    _, lines, _ = quotas.usage_report(session, SYSTEM, e.tid("b"))
    vcpu = next(line for line in lines if line.resource_class == "vcpu")
    assert (vcpu.status, vcpu.committed, vcpu.days_remaining) == ("expired", 5, 0)


def test_check_reports_without_reserving(session, quota_estate):
    e = quota_estate
    assert ledger.check(session, e.tid("a1"), {"vcpu": 40}) == []
    over = ledger.check(session, e.tid("a1"), {"vcpu": 41})
    assert [(o.tenant_code, o.shortfall) for o in over] == [("a1", 1)]
    assert session.execute(select(Reservation)).first() is None


def test_unknown_classes_and_bad_amounts_name_the_field(session, quota_estate):
    e = quota_estate
    with pytest.raises(Invalid) as info:
        ledger.reserve(session, e.tid("a1"), {"gpu": 1, "vcpu": 10**12}, ref="bad", actor="t")
    assert {err.field for err in info.value.errors} == {"deltas.gpu", "deltas.vcpu"}
