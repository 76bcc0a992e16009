"""Billing's rules at the service level: bad input is refused with the error that names what is
wrong and leaves nothing written; finalized statements stay as they were; credit notes,
budget alerts and late events behave as documented."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import date, datetime
from functools import partial
from typing import Any

import pytest
from sqlalchemy import func
from sqlmodel import Session, col, select

from billing import contracts, prices, statements
from billing.models import (
    Adjustment,
    AdjustmentState,
    BudgetAlert,
    Contract,
    LifecycleKind,
    PriceCatalog,
    PriceItem,
    Statement,
    StatementLine,
)
from billing.schemas import AdjustmentCreate, ContractCreate, PriceCatalogCreate, PriceItemIn
from broker.audit.models import AuditEvent
from broker.core.authz import Principal
from broker.core.errors import Conflict, Forbidden, GovbrokerError, Invalid
from broker.tenancy import service as tenancy
from broker.tenancy.schemas import TenantUpdate
from tests.fixtures.billing import DAY, HOUR, SYSTEM, BillingWorld, local

WATCHED = (
    PriceCatalog,
    PriceItem,
    Contract,
    Statement,
    StatementLine,
    Adjustment,
    BudgetAlert,
    AuditEvent,
)


def _counts(s: Session) -> dict[str, int]:
    return {
        m.__tablename__: s.execute(select(func.count()).select_from(m)).scalar_one()  # type: ignore[arg-type]
        for m in WATCHED
    }


def refused(
    w: BillingWorld, error: type[GovbrokerError], call: Callable[[Session], Any]
) -> GovbrokerError:
    """Run `call` in one unit of work, expect `error`, and check that the service wrote nothing
    before refusing: the counts seen by the same session (which flushes first) are unchanged."""
    with w.db.unit_of_work() as s:
        before = _counts(s)
        with pytest.raises(error) as info:
            call(s)
        assert _counts(s) == before
    return info.value


def fields(err: GovbrokerError) -> list[str]:
    return [e.field for e in err.errors]


def adding_catalog(w: BillingWorld, effective_from: date) -> Callable[[Session], PriceCatalog]:
    """A call for `refused`: a price list of `w`'s company, vCPU at 10 fen, from that day."""
    data = PriceCatalogCreate(
        name=f"价目表 {effective_from}",
        effective_from=effective_from,
        items=[PriceItemIn(resource_class="vcpu", unit_price="10")],
    )
    return lambda s: prices.create_catalog(s, SYSTEM, w.company_id, data)


def effective_until(w: BillingWorld, catalog: PriceCatalog) -> datetime | None:
    with w.db.unit_of_work() as s:
        kept = s.get(PriceCatalog, catalog.id)
        assert kept is not None
        return kept.effective_until


@pytest.fixture
def october(billing_world: BillingWorld, clock) -> tuple[BillingWorld, Contract]:
    """One server of agency a with 1 vCPU at 10 fen an hour all of October 2026 (744 h = 7440
    fen), under a contract for October to December with a budget of 9000 fen."""
    w = billing_world
    clock.move_to(local(2026, 11, 2, 9))
    c = w.vcpu_contract(f"HT-R-{uuid.uuid4().hex[:6]}", budget_amount=9000)
    w.server("vm-1")
    w.event("vm-1", LifecycleKind.created, local(2026, 10, 1), {"vcpu": 1}, contract=c)
    w.event("vm-1", LifecycleKind.deleted, local(2026, 11, 10), {}, contract=c)
    return w, c


# --- price catalogs ----------------------------------------------------------------------------


def test_catalog_versions_may_not_overlap(billing_world: BillingWorld, clock):
    w = billing_world
    clock.move_to(local(2026, 9, 20))
    first = w.catalog(date(2026, 10, 1), {"vcpu": "10"})
    for start in (date(2026, 10, 1), date(2026, 9, 15)):  # the same start, an earlier start
        err = refused(w, Conflict, adding_catalog(w, start))
        assert fields(err) == ["effective_from"]
        assert err.errors[0].code == "overlap"
    assert effective_until(w, first) is None
    # a later start is accepted and closes the version before it on that day
    second = w.catalog(date(2026, 10, 15), {"vcpu": "12"})
    assert second.version == 2
    # and now a start between the two overlaps the closed first version too
    err = refused(w, Conflict, adding_catalog(w, date(2026, 10, 10)))
    assert fields(err) == ["effective_from"]
    assert effective_until(w, first) == local(2026, 10, 15)


def test_a_price_change_may_not_start_inside_time_already_rated(billing_world: BillingWorld, clock):
    w = billing_world
    clock.move_to(local(2026, 10, 20, 9))
    first = w.catalog(date(2026, 10, 1), {"vcpu": "10"})
    c = w.contract("HT-R-RATED", starts_on=date(2026, 10, 1), ends_on=date(2026, 12, 31))
    w.server("vm-1")
    w.event("vm-1", LifecycleKind.created, local(2026, 10, 1), {"vcpu": 1}, contract=c)
    w.meter(local(2026, 10, 20, 9))  # rated up to 20 Oct 09:00
    err = refused(w, Conflict, adding_catalog(w, date(2026, 10, 15)))
    assert fields(err) == ["effective_from"]
    assert err.errors[0].code == "already_rated"
    assert effective_until(w, first) is None
    # from the next day on, nothing has been rated yet
    assert w.catalog(date(2026, 10, 21), {"vcpu": "12"}).version == 2


def test_a_first_price_list_may_not_start_inside_time_metered_without_one(
    billing_world: BillingWorld, clock
):
    """Metering passed over the first days of October before any price list existed: those
    hours are gone, so a list claiming to price them would promise a bill that never comes."""
    w = billing_world
    clock.move_to(local(2026, 10, 5, 9))
    w.server("vm-1")
    w.event("vm-1", LifecycleKind.created, local(2026, 10, 1), {"vcpu": 1}, tenant=None)
    w.meter(local(2026, 10, 5, 9))
    err = refused(w, Conflict, adding_catalog(w, date(2026, 10, 1)))
    assert fields(err) == ["effective_from"]
    w.catalog(date(2026, 10, 6), {"vcpu": "10"})


# --- contracts ---------------------------------------------------------------------------------


def test_a_suspended_agency_cannot_sign_a_contract(billing_world: BillingWorld, clock):
    w = billing_world
    with w.db.unit_of_work() as s:
        tenancy.update_tenant(s, SYSTEM, w.estate.tid("b"), TenantUpdate(status="suspended"))
    data = ContractCreate(
        number="HT-R-SUSPENDED",
        title="政务云服务合同",
        agency_id=w.estate.tid("b"),
        service_company_id=w.company_id,
        signed_on=date(2026, 10, 1),
        starts_on=date(2026, 10, 1),
        ends_on=date(2026, 12, 31),
        budget_amount=100_000,
    )
    err = refused(w, Conflict, lambda s: contracts.create_contract(s, SYSTEM, data))
    assert fields(err) == ["agency_id"]
    with w.db.unit_of_work() as s:
        assert (
            s.execute(select(Contract).where(Contract.number == "HT-R-SUSPENDED")).first() is None
        )


# --- statements --------------------------------------------------------------------------------


def test_statement_months_in_the_future_or_malformed_are_invalid(
    billing_world: BillingWorld, clock
):
    w = billing_world
    clock.move_to(local(2026, 11, 2, 9))
    for month in ("2026-12", "2027-01", "2026-13", "2026-1", "26-10", "2026/10", "october"):
        err = refused(w, Invalid, partial(statements.generate, principal=SYSTEM, month=month))
        assert fields(err) == ["month"], month
    err = refused(w, Invalid, lambda s: statements.generate(s, SYSTEM, month="2026-12"))
    assert err.errors[0].code == "future"


def test_finalizing_twice_or_before_the_month_is_over_is_a_conflict(october, clock):
    w, c = october
    (november,) = w.generate("2026-11")  # a draft of the month still running
    err = refused(w, Conflict, lambda s: statements.finalize(s, SYSTEM, november.id))
    assert "not over" in err.detail
    assert w.statement(c, "2026-11").state == "draft"

    (st,) = w.generate("2026-10")
    final = w.finalize(st)
    err = refused(w, Conflict, lambda s: statements.finalize(s, SYSTEM, st.id))
    assert "already finalized" in err.detail
    again = w.statement(c, "2026-10")
    assert (again.state, again.content_hash, again.finalized_at) == (
        "final",
        final.content_hash,
        final.finalized_at,
    )


def test_adjustments_apply_only_to_finalized_statements(october):
    w, _ = october
    (st,) = w.generate("2026-10")
    note = AdjustmentCreate(kind="credit", amount=100, reason="服务中断补偿 2 小时")
    err = refused(w, Conflict, lambda s: statements.propose_adjustment(s, SYSTEM, st.id, note))
    assert "finalized" in err.detail


def test_a_note_needs_a_second_person_and_credits_change_only_the_adjusted_total(
    october, principal_of
):
    w, c = october
    finance = principal_of("finance")
    second = Principal.system("second-approver")
    (st,) = w.generate("2026-10")
    final = w.finalize(st, finance)
    assert final.total_amount == 7440  # vCPU 1 × 10 × 744 h
    with w.db.unit_of_work() as s:
        credit = statements.propose_adjustment(
            s, finance, st.id, AdjustmentCreate(kind="credit", amount=440, reason="SLA 未达标补偿")
        )
        debit = statements.propose_adjustment(
            s, finance, st.id, AdjustmentCreate(kind="debit", amount=25, reason="漏计公网流量")
        )
        rejected = statements.propose_adjustment(
            s, finance, st.id, AdjustmentCreate(kind="credit", amount=999, reason="重复申请")
        )
    err = refused(
        w, Forbidden, lambda s: statements.decide_adjustment(s, finance, credit.id, approve=True)
    )
    assert "second person" in err.detail
    with w.db.unit_of_work() as s:
        assert s.get(Adjustment, credit.id).state == AdjustmentState.proposed  # type: ignore[union-attr]
        statements.decide_adjustment(s, second, credit.id, approve=True)
        statements.decide_adjustment(s, second, debit.id, approve=True)
        statements.decide_adjustment(s, second, rejected.id, approve=False)
    # deciding twice is a conflict
    refused(w, Conflict, lambda s: statements.decide_adjustment(s, second, debit.id, approve=False))
    after = w.statement(c, "2026-10")
    lines = w.line_table(after)
    # the statement is as it was finalized
    assert (after.total_amount, after.content_hash, after.state) == (
        7440,
        final.content_hash,
        "final",
    )
    with w.db.unit_of_work() as s:
        assert statements.recompute_hash(s, after) == final.content_hash
        notes = statements.adjustments_of(s, [after.id])
    # adjusted: 7440 − 440 (approved credit) + 25 (approved debit); the rejected credit counts not
    assert statements.adjusted_total(after, notes) == 7440 - 440 + 25
    assert w.line_table(w.statement(c, "2026-10")) == lines


def test_finalize_then_regenerate_keeps_the_content_hash(october):
    w, c = october
    (st,) = w.generate("2026-10")
    final = w.finalize(st)
    lines = w.line_table(final)
    assert final.content_hash and len(final.content_hash) == 64
    with w.db.unit_of_work() as s:
        assert statements.recompute_hash(s, final) == final.content_hash
    (again,) = w.generate("2026-10")
    assert again.content_hash == final.content_hash
    kept = w.statement(c, "2026-10")
    assert (kept.content_hash, kept.total_amount, kept.state) == (
        final.content_hash,
        7440,
        "final",
    )
    assert w.line_table(kept) == lines
    with w.db.unit_of_work() as s:
        mismatches = s.execute(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.action == "statement.mismatch", AuditEvent.target_id == str(st.id))
        ).scalar_one()
    assert mismatches == 0


def test_a_finalized_statement_never_changes_when_late_usage_arrives(october, clock):
    w, c = october
    (st,) = w.generate("2026-10")
    final = w.finalize(st)
    lines = w.line_table(final)
    # sync finds, after finalization, a server of the agency that ran since 20 Oct 00:00
    clock.move_to(local(2026, 11, 5, 9))
    w.server("late-1")
    w.event("late-1", LifecycleKind.created, local(2026, 10, 20), {"vcpu": 2}, contract=c)
    w.meter(local(2026, 11, 5, 9))
    (again,) = w.generate("2026-10")
    kept = w.statement(c, "2026-10")
    assert (again.id, kept.total_amount, kept.content_hash, kept.state) == (
        st.id,
        7440,
        final.content_hash,
        "final",
    )
    assert w.line_table(kept) == lines
    with w.db.unit_of_work() as s:
        # the late usage is rated (12 days × 24 h × 2 vCPU in October) but not on the statement
        assert statements.recompute_hash(s, kept) != final.content_hash
        mismatch = s.execute(
            select(AuditEvent).where(
                AuditEvent.action == "statement.mismatch", AuditEvent.target_id == str(st.id)
            )
        ).scalar_one()
    assert mismatch.after["content_hash"] != final.content_hash
    assert w.rated()[("late-1", "vcpu", "2026-10", True)] == 12 * DAY


def test_budget_alerts_at_80_and_100_percent_are_recorded_once_each(october, clock):
    w, c = october

    def alerts() -> list[tuple[int, int]]:
        with w.db.unit_of_work(write=False) as s:
            return [
                (a.threshold_pct, a.spent_amount)
                for a in s.execute(
                    select(BudgetAlert)
                    .where(BudgetAlert.contract_id == c.id)
                    .order_by(col(BudgetAlert.threshold_pct))
                ).scalars()
            ]

    # October: 7440 of 9000 = 82.7 %
    w.generate("2026-10")
    assert alerts() == [(80, 7440)]
    w.generate("2026-10")
    assert alerts() == [(80, 7440)]
    # November so far (1 Nov 00:00 → 2 Nov 09:00 = 33 h × 10 = 330): 7770, still below 100 %
    w.generate("2026-11")
    assert alerts() == [(80, 7440)]
    # the month is over: 9 days = 216 h × 10 = 2160; 7440 + 2160 = 9600 ≥ 9000
    clock.move_to(local(2026, 12, 2, 9))
    w.generate("2026-11")
    assert alerts() == [(80, 7440), (100, 9600)]
    w.generate("2026-11")
    w.generate("2026-10")
    assert alerts() == [(80, 7440), (100, 9600)]
    with w.db.unit_of_work(write=False) as s:
        burn = statements.burndown(s, SYSTEM, s.get(Contract, c.id))  # type: ignore[arg-type]
    assert (burn["spent_amount"], burn["remaining_amount"], burn["spent_pct"]) == (
        9600,
        -600,
        "106.67",
    )


# --- metering ----------------------------------------------------------------------------------


def test_an_event_written_after_its_hour_was_rated_never_rates_that_time_twice(
    billing_world: BillingWorld, clock
):
    """The resize happened at 12:00 on 1 Oct but was written after metering had rated the whole
    day at 1 vCPU. The time already rated stays as rated; the new size takes over where rating
    stopped, so the day is not paid twice."""
    w = billing_world
    clock.move_to(local(2026, 10, 3, 9))
    c = w.vcpu_contract("HT-R-LATE")
    w.server("vm-1")
    w.event("vm-1", LifecycleKind.created, local(2026, 10, 1), {"vcpu": 1}, contract=c)
    w.meter(local(2026, 10, 2))
    w.event("vm-1", LifecycleKind.resized, local(2026, 10, 1, 12), {"vcpu": 2}, contract=c)
    w.meter(local(2026, 10, 3))
    rated = w.rated()
    assert rated == {("vm-1", "vcpu", "2026-10", True): 48 * HOUR}
    (st,) = w.generate("2026-10")
    # 1 Oct: 1 vCPU × 10 × 24 h = 240; 2 Oct 00:00 → 3 Oct 09:00: 2 vCPU × 10 × 33 h = 660
    assert w.line_table(st) == {
        ("vm-1", "vcpu", 1, "10", "usage"): (24 * HOUR, 240),
        ("vm-1", "vcpu", 2, "10", "usage"): (33 * HOUR, 660),
    }


def test_a_price_list_may_bill_compute_while_powered_off(billing_world: BillingWorld, clock):
    w = billing_world
    clock.move_to(local(2026, 11, 2, 9))
    w.catalog(
        date(2026, 10, 1), {"vcpu": "10", "storage_gb.ssd": "0.1"}, bill_compute_when_off=True
    )
    c = w.contract("HT-R-OFF", starts_on=date(2026, 10, 1), ends_on=date(2026, 12, 31))
    w.server("vm-1")
    sizes = {"vcpu": 2, "storage_gb.ssd": 10}
    w.event("vm-1", LifecycleKind.created, local(2026, 10, 1), sizes, contract=c)
    w.event("vm-1", LifecycleKind.stopped, local(2026, 10, 2), sizes, power="stopped", contract=c)
    w.event("vm-1", LifecycleKind.deleted, local(2026, 10, 3), {}, contract=c)
    (st,) = w.generate("2026-10")
    # running or not, 48 h: vCPU 2 × 10 × 48 = 960, SSD 10 × 0.1 × 48 = 48
    assert w.line_table(st) == {
        ("vm-1", "vcpu", 2, "10", "usage"): (48 * HOUR, 960),
        ("vm-1", "storage_gb.ssd", 10, "0.1", "usage"): (48 * HOUR, 48),
    }
