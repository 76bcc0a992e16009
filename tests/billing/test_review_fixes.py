"""Money cases a review found: late and simultaneous events, caps across a price change,
renewals and period changes, sub-second times, frozen hashes, powered-off bandwidth, credits,
dates outside billing's calendar, and billing writers racing on PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from datetime import date, timedelta
from decimal import Decimal

import pytest
from pydantic import ValidationError
from sqlmodel import select

from billing import contracts, rating, statements
from billing.models import LifecycleKind, Statement
from billing.schemas import AdjustmentCreate, ContractCreate, ContractUpdate
from broker.audit.models import AuditEvent
from broker.core.errors import Conflict, Invalid
from broker.inventory.models import Server
from tests.fixtures.auth import build_estate
from tests.fixtures.billing import DAY, HOUR, SYSTEM, BillingWorld, local, make_world


def test_an_event_older_than_a_metered_delete_does_not_bring_the_server_back(
    billing_world: BillingWorld, clock
):
    w = billing_world
    clock.move_to(local(2026, 11, 2, 9))
    c = w.vcpu_contract("HT-LATE")
    w.server("s")
    w.event("s", LifecycleKind.created, local(2026, 10, 5, 8), {"vcpu": 2}, contract=c)
    w.event("s", LifecycleKind.deleted, local(2026, 10, 6, 8, 20), {}, contract=c)
    w.meter(local(2026, 10, 6, 12))
    # dated before the delete, committed after it was metered: an overtaken state
    w.event("s", LifecycleKind.changed, local(2026, 10, 6, 8, 10), {"vcpu": 2}, contract=c)
    w.meter(local(2026, 10, 31, 12))
    assert w.rated() == {("s", "vcpu", "2026-10", True): 24 * HOUR + 20 * 60}


def test_events_of_one_instant_apply_seen_then_owned(billing_world: BillingWorld, clock):
    w = billing_world
    clock.move_to(local(2026, 11, 2, 9))
    c = w.vcpu_contract("HT-SAME")
    at = local(2026, 10, 5, 8)
    for i in range(8):
        w.server(f"s{i}", tenant=None)
        # written in the order sync writes them, at one instant: ids order them randomly
        w.event(f"s{i}", LifecycleKind.discovered, at, {"vcpu": 1}, tenant=None, agency=None)
        w.event(f"s{i}", LifecycleKind.adopted, at, {"vcpu": 1}, contract=c)
    w.meter(local(2026, 10, 6, 8))
    assert w.rated() == {(f"s{i}", "vcpu", "2026-10", True): DAY for i in range(8)}


def test_a_monthly_minimum_applies_once_across_a_price_change(billing_world: BillingWorld, clock):
    w = billing_world
    clock.move_to(local(2026, 11, 2, 9))
    w.catalog(date(2026, 10, 1), {"public_ip": "1"}, minimums={"public_ip": 1000})
    w.catalog(date(2026, 10, 15), {"public_ip": "1"}, minimums={"public_ip": 1000})
    c = w.contract("HT-MIN", starts_on=date(2026, 10, 1), ends_on=date(2026, 12, 31))
    w.server("s")
    w.event("s", LifecycleKind.created, local(2026, 10, 10), {"public_ip": 1}, contract=c)
    w.event("s", LifecycleKind.deleted, local(2026, 10, 20), {}, contract=c)
    (st,) = w.generate("2026-10")
    # 5 days at each price: 120 + 120 fen of use, topped up once to the minimum of 1000
    assert st.total_amount == 1000
    assert [ln.kind for ln in w.lines(st)].count("minimum") == 1


def test_a_server_outliving_its_contract_is_billed_to_the_agencys_renewal(
    billing_world: BillingWorld, clock
):
    w = billing_world
    clock.move_to(local(2026, 12, 2, 9))
    w.catalog(date(2026, 10, 1), {"vcpu": "10"})
    old = w.contract("HT-2026", starts_on=date(2026, 1, 1), ends_on=date(2026, 10, 31))
    new = w.contract("HT-2027", starts_on=date(2026, 11, 1), ends_on=date(2027, 10, 31))
    w.server("s")
    w.event("s", LifecycleKind.created, local(2026, 10, 31, 12), {"vcpu": 1}, contract=old)
    by_contract = {st.contract_id: st for st in w.generate("2026-11")}
    # all of November (30 days × 24 h × 10 fen) on the renewal, nothing unassigned
    assert by_contract[new.id].total_amount == 30 * 24 * 10
    assert w.unassigned("2026-11") == {}
    october = {st.contract_id: st for st in w.generate("2026-10")}
    assert october[old.id].total_amount == 12 * 10


def test_a_contract_end_cannot_move_behind_rated_time(billing_world: BillingWorld, clock):
    w = billing_world
    clock.move_to(local(2026, 11, 16, 9))
    c = w.vcpu_contract("HT-END")
    w.server("s")
    w.event("s", LifecycleKind.created, local(2026, 10, 5), {"vcpu": 1}, contract=c)
    w.meter(local(2026, 11, 16, 9))
    for ends_on in (date(2026, 10, 31), date(2026, 11, 10)):
        with pytest.raises(Conflict) as refused, w.db.unit_of_work() as s:
            contracts.update_contract(s, SYSTEM, c.id, ContractUpdate(ends_on=ends_on))
        assert refused.value.errors[0].field == "ends_on"
    with w.db.unit_of_work() as s:  # ahead of rating, it may move
        assert contracts.update_contract(
            s, SYSTEM, c.id, ContractUpdate(ends_on=date(2026, 11, 20))
        ).ends_on == date(2026, 11, 20)


def test_times_between_whole_seconds_lose_nothing_when_rated_hour_by_hour(
    billing_world: BillingWorld, clock
):
    w = billing_world
    clock.move_to(local(2026, 11, 2, 9))
    c = w.vcpu_contract("HT-SUB")
    w.server("s")
    start = local(2026, 10, 5, 8) + timedelta(microseconds=300_000)
    w.event("s", LifecycleKind.created, start, {"vcpu": 1}, contract=c)
    w.event(
        "s",
        LifecycleKind.resized,
        start + timedelta(hours=3, microseconds=400_000),
        {"vcpu": 2},
        contract=c,
    )
    w.event("s", LifecycleKind.deleted, start + timedelta(hours=12), {}, contract=c)
    for hour in range(14):
        w.meter(local(2026, 10, 5, 8 + hour))
    rated = w.rated()[("s", "vcpu", "2026-10", True)]
    assert rated == 12 * HOUR


def test_a_finalized_hash_survives_a_rename_and_a_new_discount(billing_world: BillingWorld, clock):
    w = billing_world
    clock.move_to(local(2026, 11, 2, 9))
    c = w.vcpu_contract("HT-HASH", discount_pct="5")
    w.server("s")
    w.event("s", LifecycleKind.created, local(2026, 10, 5, 8), {"vcpu": 1}, contract=c)
    (st,) = w.generate("2026-10")
    digest = w.finalize(st).content_hash
    with w.db.unit_of_work() as s:
        s.get(Server, w.servers["s"]).name = "s-renamed-by-sync"
        contracts.update_contract(s, SYSTEM, c.id, ContractUpdate(discount_pct=Decimal(10)))
    w.generate("2026-10")
    with w.db.unit_of_work(write=False) as s:
        assert statements.recompute_hash(s, s.get(Statement, st.id)) == digest
        assert not list(
            s.execute(select(AuditEvent).where(AuditEvent.action == "statement.mismatch"))
        )


def test_bandwidth_stops_billing_while_the_server_is_off():
    window = rating.PriceWindow(
        item_id=uuid.uuid4(),
        unit_price=Decimal(1),
        start=local(2026, 10, 1),
        end=None,
        bill_compute_when_off=False,
    )
    span = (local(2026, 10, 5), local(2026, 10, 6))
    assert (
        rating.cut(*span, resource_class="bandwidth_mbps", is_powered=False, prices=[window]) == []
    )
    on = rating.cut(*span, resource_class="bandwidth_mbps", is_powered=True, prices=[window])
    assert [p.seconds for p in on] == [DAY]


def test_a_credit_cannot_exceed_what_the_statement_bills(billing_world: BillingWorld, clock):
    w = billing_world
    clock.move_to(local(2026, 11, 2, 9))
    c = w.vcpu_contract("HT-CREDIT")
    w.server("s")
    w.event("s", LifecycleKind.created, local(2026, 10, 5, 8), {"vcpu": 1}, contract=c)
    w.event("s", LifecycleKind.deleted, local(2026, 10, 5, 18), {}, contract=c)
    (st,) = w.generate("2026-10")
    w.finalize(st)
    with pytest.raises(Invalid) as refused, w.db.unit_of_work() as s:
        statements.propose_adjustment(
            s, SYSTEM, st.id, AdjustmentCreate(kind="credit", amount=101, reason="too much back")
        )
    assert refused.value.errors[0].field == "amount"


@pytest.mark.parametrize("field", ["starts_on", "ends_on", "signed_on"])
def test_contract_dates_stay_inside_billings_calendar(field):
    body = {
        "number": "HT-FAR",
        "title": "far",
        "agency_id": uuid.uuid4(),
        "service_company_id": uuid.uuid4(),
        "signed_on": date(2026, 1, 1),
        "starts_on": date(2026, 1, 1),
        "ends_on": date(2026, 12, 31),
        "budget_amount": 1,
    }
    for far in (date(9999, 12, 31), date(1, 1, 1)):
        with pytest.raises(ValidationError) as refused:
            ContractCreate(**{**body, field: far})
        assert refused.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize("backend", ["postgresql"])
def test_two_generates_at_once_both_answer_and_make_one_statement(committed_db):
    with committed_db.unit_of_work() as s:
        estate = build_estate(s)
    w = make_world(committed_db, estate)
    c = w.vcpu_contract("HT-RACE")
    for i in range(30):
        w.server(f"s{i}")
        w.event(f"s{i}", LifecycleKind.created, local(2026, 10, 5, i % 24), {"vcpu": 1}, contract=c)
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run() -> None:
        try:
            start.wait()
            w.generate("2026-10")
        except BaseException as exc:  # the test reports whatever a racer raised
            errors.append(exc)

    racers = [threading.Thread(target=run) for _ in range(2)]
    for t in racers:
        t.start()
    for t in racers:
        t.join(timeout=120)
    assert errors == []
    with committed_db.unit_of_work(write=False) as s:
        assert len(list(s.execute(select(Statement)).scalars())) == 1
