"""Months of usage worked out by hand, to the fen.

Each scenario writes lifecycle events at chosen Asia/Shanghai instants, lets metering and the
statement run, and compares every line and total with figures computed in the comments below.
The rounding rule (billing.rating): a line's amount is unit price × quantity ÷ unit × seconds ÷
3600, exact, rounded half up to the fen once per line; the discount is subtotal × pct ÷ 100,
rounded half up once. Memory is priced per GiB-hour and held in MiB.
"""

from __future__ import annotations

from datetime import UTC, date

from billing.models import LifecycleKind
from tests.fixtures.billing import DAY, HOUR, BillingWorld, local


def test_october_created_mid_month_resized_twice_off_three_days_new_prices_on_the_15th(
    billing_world: BillingWorld, clock
):
    """A 31-day month: one server created on the 5th, resized on the 8th and the 20th, powered
    off from the 12th to the 15th, under a price list replaced on the 15th; 5 % discount."""
    w = billing_world
    clock.move_to(local(2026, 11, 2, 9))
    # v1 from 1 Oct: vCPU 10, memory 5 per GiB, SSD 0.1 per GB, IP 2 (fen per hour)
    w.catalog(
        date(2026, 10, 1),
        {"vcpu": "10", "memory_mb": "5", "storage_gb.ssd": "0.1", "public_ip": "2"},
    )
    # v2 from 15 Oct 00:00 Shanghai: vCPU 12, memory 6, SSD 0.13, IP 2.5
    w.catalog(
        date(2026, 10, 15),
        {"vcpu": "12", "memory_mb": "6", "storage_gb.ssd": "0.13", "public_ip": "2.5"},
    )
    c = w.contract(
        "HT-2026-S1", starts_on=date(2026, 10, 1), ends_on=date(2026, 12, 31), discount_pct="5"
    )
    w.server("web-1")
    small = {"vcpu": 2, "memory_mb": 4096, "storage_gb.ssd": 40, "public_ip": 1, "instances": 1}
    medium = {**small, "vcpu": 4, "memory_mb": 8192}
    large = {**medium, "vcpu": 8, "memory_mb": 16384, "storage_gb.ssd": 100}
    w.event("web-1", LifecycleKind.created, local(2026, 10, 5, 8), small, contract=c)
    w.event("web-1", LifecycleKind.resized, local(2026, 10, 8, 20), medium, contract=c)
    w.event(
        "web-1", LifecycleKind.stopped, local(2026, 10, 12, 8), medium, power="stopped", contract=c
    )
    w.event("web-1", LifecycleKind.started, local(2026, 10, 15, 8), medium, contract=c)
    # a reboot changes nothing billed: no new line, no split that could move a rounding
    w.event("web-1", LifecycleKind.rebooted, local(2026, 10, 18, 3, 17), medium, contract=c)
    w.event("web-1", LifecycleKind.resized, local(2026, 10, 20, 14, 30), large, contract=c)

    (st,) = w.generate("2026-10")

    # The stretches (Shanghai time):
    #   A  5 Oct 08:00 → 8 Oct 20:00   84 h    small,  running, v1
    #   B  8 Oct 20:00 → 12 Oct 08:00  84 h    medium, running, v1
    #   C 12 Oct 08:00 → 15 Oct 00:00  64 h    medium, off,     v1  (storage and IP only)
    #   D 15 Oct 00:00 → 15 Oct 08:00   8 h    medium, off,     v2  (storage and IP only)
    #   E 15 Oct 08:00 → 20 Oct 14:30  126.5 h medium, running, v2
    #   F 20 Oct 14:30 → 1 Nov 00:00   273.5 h large,  running, v2  (9.5 h + 11 days)
    # Off: C + D = 72 h, three days.
    assert w.line_table(st) == {
        # v1
        # vCPU 2 × 10 × 84 h = 1680
        ("web-1", "vcpu", 2, "10", "usage"): (84 * HOUR, 1680),
        # vCPU 4 × 10 × 84 h = 3360
        ("web-1", "vcpu", 4, "10", "usage"): (84 * HOUR, 3360),
        # memory 4 GiB × 5 × 84 h = 1680
        ("web-1", "memory_mb", 4096, "5", "usage"): (84 * HOUR, 1680),
        # memory 8 GiB × 5 × 84 h = 3360
        ("web-1", "memory_mb", 8192, "5", "usage"): (84 * HOUR, 3360),
        # SSD 40 GB × 0.1 × (A + B + C = 232 h) = 928
        ("web-1", "storage_gb.ssd", 40, "0.1", "usage"): (232 * HOUR, 928),
        # IP 1 × 2 × 232 h = 464
        ("web-1", "public_ip", 1, "2", "usage"): (232 * HOUR, 464),
        # v2
        # vCPU 4 × 12 × 126.5 h = 6072
        ("web-1", "vcpu", 4, "12", "usage"): (126 * HOUR + 1800, 6072),
        # vCPU 8 × 12 × 273.5 h = 26256
        ("web-1", "vcpu", 8, "12", "usage"): (273 * HOUR + 1800, 26256),
        # memory 8 GiB × 6 × 126.5 h = 6072
        ("web-1", "memory_mb", 8192, "6", "usage"): (126 * HOUR + 1800, 6072),
        # memory 16 GiB × 6 × 273.5 h = 26256
        ("web-1", "memory_mb", 16384, "6", "usage"): (273 * HOUR + 1800, 26256),
        # SSD 40 GB × 0.13 × (D + E = 134.5 h) = 699.4 → 699 (rounded down)
        ("web-1", "storage_gb.ssd", 40, "0.13", "usage"): (134 * HOUR + 1800, 699),
        # SSD 100 GB × 0.13 × 273.5 h = 3555.5 → 3556 (half a fen: rounded up)
        ("web-1", "storage_gb.ssd", 100, "0.13", "usage"): (273 * HOUR + 1800, 3556),
        # IP 1 × 2.5 × (D + E + F = 408 h) = 1020
        ("web-1", "public_ip", 1, "2.5", "usage"): (408 * HOUR, 1020),
    }
    # subtotal: v1 1680 + 3360 + 1680 + 3360 + 928 + 464 = 11472
    #           v2 6072 + 26256 + 6072 + 26256 + 699 + 3556 + 1020 = 69931
    #           11472 + 69931 = 81403
    # discount 5 %: 81403 × 5 / 100 = 4070.15 → 4070; total 81403 − 4070 = 77333
    assert (st.subtotal_amount, st.discount_amount, st.total_amount) == (81403, 4070, 77333)
    assert st.line_count == 13
    # a month of whole days in Shanghai: the server existed 5 Oct 08:00 → 1 Nov 00:00
    assert sum(
        secs for (_, cls, *_), (secs, _) in w.line_table(st).items() if cls == "public_ip"
    ) == (26 * DAY + 16 * HOUR)
    assert w.unassigned("2026-10") == {}


def test_february_2026_contract_from_the_10th_cap_minimum_and_unassigned_time(
    billing_world: BillingWorld, clock
):
    """A 28-day month (2026 is not a leap year). The agency's contract starts on 10 Feb, so the
    server's time before that is the center's unassigned usage. A monthly cap on vCPU, a monthly
    minimum on public IPs, and memory of 1.5 GiB for one hour (a half fen)."""
    w = billing_world
    clock.move_to(local(2026, 3, 2, 9))
    # vCPU 10 (cap 15000 per server and month), memory 5 per GiB, HDD 0.03 per GB,
    # IP 2 (minimum 100 per server and month)
    w.catalog(
        date(2026, 1, 1),
        {"vcpu": "10", "memory_mb": "5", "storage_gb.hdd": "0.03", "public_ip": "2"},
        caps={"vcpu": 15000},
        minimums={"public_ip": 100},
    )
    c = w.contract(
        "HT-2026-S2",
        agency="b",
        starts_on=date(2026, 2, 10),
        ends_on=date(2026, 12, 31),
        budget_amount=10_000_000,
    )
    w.server("db-1", tenant="b1")
    w.server("tiny-1", tenant="b1")
    db_sizes = {"vcpu": 4, "memory_mb": 8192, "storage_gb.hdd": 500, "public_ip": 1}
    tiny_sizes = {"vcpu": 1, "memory_mb": 1536, "public_ip": 1}
    # created in January, bound to the contract that only begins on 10 Feb
    w.event(
        "db-1",
        LifecycleKind.created,
        local(2026, 1, 20, 10),
        db_sizes,
        contract=c,
        tenant="b1",
        agency="b",
    )
    # one hour before March begins in Shanghai (28 Feb 15:00 UTC → 16:00 UTC)
    w.event(
        "tiny-1",
        LifecycleKind.created,
        local(2026, 2, 28, 23),
        tiny_sizes,
        contract=c,
        tenant="b1",
        agency="b",
    )

    assert w.generate("2026-01") == []  # the contract is not in force in January
    (st,) = w.generate("2026-02")

    # in contract: 10 Feb 00:00 → 1 Mar 00:00 = 19 days = 456 h
    assert w.line_table(st) == {
        # db-1 vCPU 4 × 10 × 456 h = 18240 ...
        ("db-1", "vcpu", 4, "10", "usage"): (456 * HOUR, 18240),
        # ... above the monthly cap of 15000: a cap line of 15000 − 18240 = −3240
        ("db-1", "vcpu", 0, "10", "cap"): (456 * HOUR, -3240),
        # memory 8 GiB × 5 × 456 h = 18240 (no cap on memory)
        ("db-1", "memory_mb", 8192, "5", "usage"): (456 * HOUR, 18240),
        # HDD 500 GB × 0.03 × 456 h = 6840
        ("db-1", "storage_gb.hdd", 500, "0.03", "usage"): (456 * HOUR, 6840),
        # IP 1 × 2 × 456 h = 912, above the minimum of 100
        ("db-1", "public_ip", 1, "2", "usage"): (456 * HOUR, 912),
        # tiny-1, one hour: vCPU 1 × 10 × 1 h = 10
        ("tiny-1", "vcpu", 1, "10", "usage"): (HOUR, 10),
        # memory 1536 MiB = 1.5 GiB × 5 × 1 h = 7.5 → 8 (half a fen: rounded up)
        ("tiny-1", "memory_mb", 1536, "5", "usage"): (HOUR, 8),
        # IP 1 × 2 × 1 h = 2, below the minimum of 100: a minimum line of 100 − 2 = 98
        ("tiny-1", "public_ip", 1, "2", "usage"): (HOUR, 2),
        ("tiny-1", "public_ip", 0, "2", "minimum"): (HOUR, 98),
    }
    # subtotal 18240 − 3240 + 18240 + 6840 + 912 + 10 + 8 + 2 + 98 = 41110; no discount
    assert (st.subtotal_amount, st.discount_amount, st.total_amount) == (41110, 0, 41110)

    # before the contract: 1 Feb 00:00 → 10 Feb 00:00 = 9 days = 216 h, unassigned (no cap or
    # minimum there: those are contract terms)
    assert w.unassigned("2026-02") == {
        # vCPU 4 × 10 × 216 h = 8640
        ("db-1", "vcpu", 4, "10"): (216 * HOUR, 8640),
        # memory 8 GiB × 5 × 216 h = 8640
        ("db-1", "memory_mb", 8192, "5"): (216 * HOUR, 8640),
        # HDD 500 × 0.03 × 216 h = 3240
        ("db-1", "storage_gb.hdd", 500, "0.03"): (216 * HOUR, 3240),
        # IP 1 × 2 × 216 h = 432
        ("db-1", "public_ip", 1, "2"): (216 * HOUR, 432),
    }
    # January: 20 Jan 10:00 → 1 Feb 00:00 = 11 days 14 h = 278 h, all unassigned;
    # vCPU 4 × 10 × 278 = 11120
    assert w.unassigned("2026-01")[("db-1", "vcpu", 4, "10")] == (278 * HOUR, 11120)
    # February has 28 days in Shanghai: unassigned 216 h + contract 456 h = 672 h = 28 × 24 h
    rated = w.rated()
    assert rated[("db-1", "vcpu", "2026-02", False)] + rated[("db-1", "vcpu", "2026-02", True)] == (
        28 * DAY
    )
    # and tiny-1's hour is February's, not March's
    assert not [k for k in rated if k[0] == "tiny-1" and k[2] != "2026-02"]


def test_month_ends_at_midnight_in_shanghai_not_in_utc(billing_world: BillingWorld, clock):
    """A server lives from 31 Oct 23:30 to 1 Nov 00:30 Shanghai time: half an hour in October,
    half an hour in November, although all of it is still 31 October in UTC. With a 2.5 %
    discount that lands on half a fen in both months."""
    w = billing_world
    clock.move_to(local(2026, 12, 2, 9))
    created, deleted = local(2026, 10, 31, 23, 30), local(2026, 11, 1, 0, 30)
    assert (created.astimezone(UTC).day, deleted.astimezone(UTC).day) == (31, 31)
    # vCPU 10, memory 5 per GiB, IP 4 (fen per hour)
    w.catalog(date(2026, 10, 1), {"vcpu": "10", "memory_mb": "5", "public_ip": "4"})
    c = w.contract(
        "HT-2026-S3", starts_on=date(2026, 10, 1), ends_on=date(2026, 12, 31), discount_pct="2.5"
    )
    w.server("app-1")
    w.server("edge-1")
    # app-1 from the first instant of October (30 Sep 16:00 UTC) to 16 Nov 00:00
    app = {"vcpu": 2, "memory_mb": 2048, "instances": 1}
    w.event("app-1", LifecycleKind.created, local(2026, 10, 1), app, contract=c)
    w.event("app-1", LifecycleKind.deleted, local(2026, 11, 16), {}, contract=c)
    edge = {"vcpu": 3, "memory_mb": 1024, "public_ip": 1}
    w.event("edge-1", LifecycleKind.created, created, edge, contract=c)
    w.event("edge-1", LifecycleKind.deleted, deleted, {}, contract=c)

    (october,) = w.generate("2026-10")
    (november,) = w.generate("2026-11")

    half_hour = 1800
    edge_lines = {
        # vCPU 3 × 10 × 0.5 h = 15
        ("edge-1", "vcpu", 3, "10", "usage"): (half_hour, 15),
        # memory 1 GiB × 5 × 0.5 h = 2.5 → 3 (half a fen: rounded up)
        ("edge-1", "memory_mb", 1024, "5", "usage"): (half_hour, 3),
        # IP 1 × 4 × 0.5 h = 2
        ("edge-1", "public_ip", 1, "4", "usage"): (half_hour, 2),
    }
    # October: 31 days = 744 h
    assert w.line_table(october) == {
        # vCPU 2 × 10 × 744 h = 14880
        ("app-1", "vcpu", 2, "10", "usage"): (744 * HOUR, 14880),
        # memory 2 GiB × 5 × 744 h = 7440
        ("app-1", "memory_mb", 2048, "5", "usage"): (744 * HOUR, 7440),
        **edge_lines,
    }
    # subtotal 14880 + 7440 + 15 + 3 + 2 = 22340
    # discount 22340 × 2.5 / 100 = 558.5 → 559 (half a fen: rounded up); total 21781
    assert (october.subtotal_amount, october.discount_amount, october.total_amount) == (
        22340,
        559,
        21781,
    )
    # November: 1 Nov 00:00 → 16 Nov 00:00 = 15 days = 360 h
    assert w.line_table(november) == {
        # vCPU 2 × 10 × 360 h = 7200
        ("app-1", "vcpu", 2, "10", "usage"): (360 * HOUR, 7200),
        # memory 2 GiB × 5 × 360 h = 3600
        ("app-1", "memory_mb", 2048, "5", "usage"): (360 * HOUR, 3600),
        **edge_lines,
    }
    # subtotal 7200 + 3600 + 15 + 3 + 2 = 10820
    # discount 10820 × 2.5 / 100 = 270.5 → 271 (half a fen: rounded up); total 10549
    assert (november.subtotal_amount, november.discount_amount, november.total_amount) == (
        10820,
        271,
        10549,
    )


def test_a_contract_inside_one_month_and_an_unmanaged_server(billing_world: BillingWorld, clock):
    """A contract running 10 to 20 October (both days included) takes only those 11 days of a
    server that runs all month; the days before and after, and a server no agency owns, are
    unassigned."""
    w = billing_world
    clock.move_to(local(2026, 11, 2, 9))
    # vCPU 10, SSD 0.05 per GB (fen per hour)
    w.catalog(date(2026, 10, 1), {"vcpu": "10", "storage_gb.ssd": "0.05"})
    c = w.contract("HT-2026-S4", starts_on=date(2026, 10, 10), ends_on=date(2026, 10, 20))
    w.server("short-1")
    w.server("stray-1", tenant=None)
    w.event(
        "short-1",
        LifecycleKind.created,
        local(2026, 10, 1),
        {"vcpu": 1, "storage_gb.ssd": 30},
        contract=c,
    )
    # found by sync on 25 Oct 06:00, owned by nobody; 3 GB × 0.05 = 0.15 fen an hour
    w.event(
        "stray-1",
        LifecycleKind.discovered,
        local(2026, 10, 25, 6),
        {"vcpu": 2, "storage_gb.ssd": 3},
        tenant=None,
        agency=None,
    )

    (st,) = w.generate("2026-10")
    # 10 Oct 00:00 → 21 Oct 00:00 = 11 days = 264 h
    assert w.line_table(st) == {
        # vCPU 1 × 10 × 264 h = 2640
        ("short-1", "vcpu", 1, "10", "usage"): (264 * HOUR, 2640),
        # SSD 30 × 0.05 × 264 h = 396
        ("short-1", "storage_gb.ssd", 30, "0.05", "usage"): (264 * HOUR, 396),
    }
    assert st.total_amount == 2640 + 396
    assert w.unassigned("2026-10") == {
        # before (9 days) and after (11 days) the contract: 20 days = 480 h
        # vCPU 1 × 10 × 480 h = 4800
        ("short-1", "vcpu", 1, "10"): (480 * HOUR, 4800),
        # SSD 30 × 0.05 × 480 h = 720
        ("short-1", "storage_gb.ssd", 30, "0.05"): (480 * HOUR, 720),
        # stray-1: 25 Oct 06:00 → 1 Nov 00:00 = 6 days 18 h = 162 h
        # vCPU 2 × 10 × 162 h = 3240
        ("stray-1", "vcpu", 2, "10"): (162 * HOUR, 3240),
        # SSD 3 × 0.05 × 162 h = 24.3 → 24
        ("stray-1", "storage_gb.ssd", 3, "0.05"): (162 * HOUR, 24),
    }
