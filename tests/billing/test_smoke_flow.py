"""One day of one server, metered, rated and put on a statement: the plumbing end to end."""

from __future__ import annotations

from datetime import date

from billing.models import LifecycleKind
from tests.fixtures.billing import BillingWorld, local


def test_a_day_of_one_server_reaches_the_statement_to_the_fen(billing_world: BillingWorld, clock):
    w = billing_world
    clock.move_to(local(2026, 11, 2))
    w.catalog(
        date(2026, 10, 1),
        {"vcpu": "10", "memory_mb": "5", "storage_gb.ssd": "0.1", "public_ip": "2"},
    )
    c = w.contract("HT-SMOKE-1", starts_on=date(2026, 10, 1), ends_on=date(2026, 12, 31))
    w.server("web-1")
    sizes = {"vcpu": 2, "memory_mb": 4096, "storage_gb.ssd": 40, "public_ip": 1, "instances": 1}
    w.event("web-1", LifecycleKind.created, local(2026, 10, 5, 8), sizes, contract=c)
    w.event("web-1", LifecycleKind.deleted, local(2026, 10, 6, 8), {}, contract=c)
    (st,) = w.generate("2026-10")
    # 24 h: vCPU 2×10×24 = 480, memory 4 GiB×5×24 = 480, SSD 40×0.1×24 = 96, IP 2×24 = 48
    assert st.total_amount == 480 + 480 + 96 + 48
    assert {ln.resource_class: ln.amount for ln in w.lines(st)} == {
        "vcpu": 480,
        "memory_mb": 480,
        "storage_gb.ssd": 96,
        "public_ip": 48,
    }
    again = w.generate("2026-10")
    assert [s.total_amount for s in again] == [1104]
