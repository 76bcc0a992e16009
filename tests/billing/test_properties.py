"""Properties of rating, metering and statements, over random histories.

- rating: cutting an interval anywhere and adding the pieces back gives the same seconds per
  (month, price, side of the contract), so the same statement line (the rounding rule rounds
  once per line, never per piece);
- statements: the total is the sum of the lines less the discount rounded once;
- metering: the same usage metered whole, or hour by hour at random times with events arriving
  as they happen, or with extra events that change nothing, gives the same statement; metering
  again (the job or catch_up, twice) changes no rated row and no line.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlmodel import col, select

from billing import metering, rating, statements
from billing.models import LifecycleKind, RatedUsage, Statement, UsageInterval
from broker.core.db import SessionSource
from tests.fixtures.auth import Estate
from tests.fixtures.billing import BillingWorld, local, make_world

T0 = datetime(2026, 9, 20, tzinfo=UTC)
SPAN = 50 * 86400  # 20 Sep → 9 Nov (UTC): crosses two month starts in Shanghai
CLASSES = ("vcpu", "memory_mb", "storage_gb.ssd", "public_ip")

prices_ = st.decimals(min_value=0, max_value=40, places=4, allow_nan=False, allow_infinity=False)
instants = st.integers(0, SPAN).map(lambda s: T0 + timedelta(seconds=s))


# --- pure: rounding and cutting ----------------------------------------------------------------


@given(st.integers(-(10**9), 10**9), st.integers(1, 10**6))
def test_round_half_up_is_within_half_and_rounds_halves_away_from_zero(num: int, den: int):
    value = Fraction(num, den)
    got = rating.round_half_up(value)
    assert abs(got - value) <= Fraction(1, 2)
    if abs(value - int(value)) == Fraction(1, 2):
        assert abs(got) > abs(value)
    assert rating.round_half_up(Fraction(2 * num + 1, 2)) == (num + 1 if num >= 0 else num)


@st.composite
def price_windows(draw: st.DrawFn) -> list[rating.PriceWindow]:
    """Consecutive price windows (0–3 changes at random instants), maybe with a gap before the
    first; the last runs on or ends."""
    starts = sorted(set(draw(st.lists(instants, min_size=1, max_size=4))))
    open_ended = draw(st.booleans())
    ends: list[datetime | None] = [*starts[1:], None if open_ended else draw(instants)]
    off = draw(st.booleans())
    out = []
    for start, end in zip(starts, ends, strict=True):
        if end is not None and end <= start:
            break
        out.append(rating.PriceWindow(uuid.uuid4(), draw(prices_), start, end, off))
    return out


@dataclass(frozen=True)
class Piece:
    month: str
    item: uuid.UUID
    payer: uuid.UUID | None


def rated(cuts: list[rating.Cut]) -> Counter[Piece]:
    out: Counter[Piece] = Counter()
    for c in cuts:
        assert c.start < c.end and rating.month_of(c.start) == c.month
        assert rating.month_of(c.end - timedelta(microseconds=1)) == c.month
        out[Piece(c.month, c.price.item_id, c.contract_id)] += c.seconds
    return out


@settings(max_examples=300)
@given(
    start=instants,
    length=st.integers(1, SPAN),
    splits=st.lists(st.floats(0, 1, exclude_min=True, exclude_max=True), max_size=4),
    resource_class=st.sampled_from((*CLASSES, "instances")),
    is_powered=st.booleans(),
    prices=price_windows(),
    # the server's own contract, then renewals: windows that may overlap, gap or nest
    contracts=st.lists(st.tuples(instants, instants).map(sorted), max_size=3).map(
        lambda spans: [rating.ContractWindow(uuid.uuid4(), a, b) for a, b in spans]
    ),
    quantity=st.integers(1, 65536),
)
def test_cutting_an_interval_anywhere_rates_the_same_as_whole(
    start, length, splits, resource_class, is_powered, prices, contracts, quantity
):
    end = start + timedelta(seconds=length)
    # cuts fall between whole seconds too: event times carry microseconds
    points = sorted(
        {start + timedelta(microseconds=int(length * 1_000_000 * f)) for f in splits} - {start, end}
    )
    kw: dict[str, Any] = dict(
        resource_class=resource_class, is_powered=is_powered, prices=prices, contracts=contracts
    )
    whole = rating.cut(start, end, **kw)
    pieces: list[rating.Cut] = []
    for a, b in zip([start, *points], [*points, end], strict=True):
        pieces.extend(rating.cut(a, b, **kw))
    # so the statement line, rounded once on the summed seconds, is the same too
    assert rated(whole) == rated(pieces)
    unit = {p.item_id: p.unit_price for p in prices}
    lines_whole = {
        k: rating.line_amount(unit[k.item], quantity, s, resource_class)
        for k, s in rated(whole).items()
    }
    # rounding each piece instead would be off by at most half a fen per piece: why the rule
    # rounds the line, not the piece
    for key, amount in lines_whole.items():
        per_piece = [
            rating.line_amount(c.price.unit_price, quantity, c.seconds, resource_class)
            for c in pieces
            if Piece(c.month, c.price.item_id, c.contract_id) == key
        ]
        assert abs(sum(per_piece) - amount) <= Fraction(len(per_piece) + 1, 2)
    # nothing is rated outside the prices, or compute while off unless the list says so
    if resource_class == "instances" or (
        resource_class in rating.COMPUTE_CLASSES
        and not is_powered
        and prices
        and not prices[0].bill_compute_when_off
    ):
        assert whole == []


@st.composite
def usages(
    draw: st.DrawFn,
) -> tuple[list[statements.Usage], dict[uuid.UUID, tuple[int | None, int | None]]]:
    """Rated usage as the statement query returns it: one row per server, tenant, price item and
    quantity. Two items may share a class and a price (a price list's next version keeping a
    price) and a server may have moved between systems: lines then differ only in their
    figures."""
    servers = [uuid.uuid4() for _ in range(draw(st.integers(1, 3)))]
    tenants = [None, uuid.uuid4(), uuid.uuid4()]
    items: dict[uuid.UUID, tuple[str, Decimal]] = {}
    for _ in range(draw(st.integers(1, 4))):
        price = draw(st.sampled_from([Decimal("10"), Decimal("0.13")]) | prices_)
        items[uuid.uuid4()] = (draw(st.sampled_from(CLASSES)), price)
    rows: dict[tuple[Any, ...], statements.Usage] = {}
    for _ in range(draw(st.integers(0, 12))):
        sid = draw(st.sampled_from(servers))
        item = draw(st.sampled_from(sorted(items)))
        quantity = draw(st.integers(1, 4096))
        tenant = draw(st.sampled_from(tenants))
        rows[(sid, item, quantity, tenant)] = statements.Usage(
            server_id=sid,
            server_name=f"vm-{servers.index(sid)}",
            tenant_id=tenant,
            resource_class=items[item][0],
            quantity=quantity,
            unit_price=items[item][1],
            price_item_id=item,
            seconds=draw(st.integers(1, 31 * 86400)),
        )
    limits: dict[uuid.UUID, tuple[int | None, int | None]] = {}
    for item in items:
        cap = draw(st.none() | st.integers(0, 10**6))
        minimum = draw(st.none() | st.integers(0, cap if cap is not None else 10**6))
        limits[item] = (cap, minimum)
    return list(rows.values()), limits


@settings(max_examples=300)
@given(usages(), st.decimals(min_value=0, max_value="99.99", places=2), st.randoms())
def test_a_statement_total_is_its_lines_less_the_discount_rounded_once(data, pct, rnd):
    usage, limits = data
    lines = statements.compute_lines(usage, limits)
    subtotal, discount, total = statements.compute_totals(lines, pct)
    assert subtotal == sum(ln.amount for ln in lines)
    assert discount == rating.round_half_up(Fraction(subtotal) * Fraction(pct) / 100)
    assert total == subtotal - discount
    assert 0 <= discount <= subtotal
    # per server and class, the month is brought down to the cap or up to the minimum once, by
    # the price list that billed most of its seconds (a price change mid-month makes no second)
    used: Counter[tuple[uuid.UUID, str]] = Counter()
    seconds: dict[tuple[uuid.UUID, str], Counter[uuid.UUID]] = {}
    for u in usage:
        key = (u.server_id, u.resource_class)
        used[key] += rating.line_amount(u.unit_price, u.quantity, u.seconds, u.resource_class)
        seconds.setdefault(key, Counter())[u.price_item_id] += u.seconds
    expected: Counter[tuple[uuid.UUID, str]] = Counter()
    for key, amount in used.items():
        by_item = seconds[key]
        item = max(by_item, key=lambda i: (by_item[i], str(i)))
        cap, minimum = limits[item]
        if cap is not None and amount > cap:
            amount = cap
        elif minimum is not None and amount < minimum:
            amount = minimum
        expected[key] += amount
    billed: Counter[tuple[uuid.UUID, str]] = Counter()
    for ln in lines:
        billed[(ln.server_id, ln.resource_class)] += ln.amount
    assert billed == expected
    assert sum(1 for ln in lines if ln.kind != "usage") <= len(used)
    # the order is the documented one whatever order the query returns rows in, so the
    # content hash of a regenerated statement is the same
    shuffled = list(usage)
    rnd.shuffle(shuffled)
    again = statements.compute_lines(shuffled, limits)
    assert again == lines
    header = {"month": MONTH, "total_amount": total}
    assert statements.content_hash(header, again) == statements.content_hash(header, lines)


# --- through the database: metering and statements --------------------------------------------

MONTH = "2026-10"
M_START, M_END = local(2026, 10, 1), local(2026, 11, 1)
# changed: moved to another system of the agency
KINDS = (
    LifecycleKind.resized,
    LifecycleKind.stopped,
    LifecycleKind.started,
    LifecycleKind.changed,
    LifecycleKind.deleted,
)


@dataclass(frozen=True)
class Ev:
    server: str
    kind: LifecycleKind
    at: datetime
    sizes: dict[str, int]
    power: str
    tenant: str = "a1"


@dataclass(frozen=True)
class History:
    v1: dict[str, Decimal]
    v2: dict[str, Decimal] | None
    caps: dict[str, int]
    minimums: dict[str, int]
    change_on: date
    starts_on: date
    ends_on: date
    discount: str
    events: list[Ev]


sizes_ = st.fixed_dictionaries(
    {
        "vcpu": st.integers(1, 16),
        "memory_mb": st.sampled_from([512, 1024, 1536, 3072, 4096, 6656]),
        "storage_gb.ssd": st.integers(1, 500),
        "public_ip": st.integers(0, 2),
        "instances": st.just(1),
    }
)
# events from 29 Sep to 2 Nov, to the second
event_times = st.integers(0, 34 * 86400).map(lambda s: local(2026, 9, 29) + timedelta(seconds=s))


@st.composite
def histories(draw: st.DrawFn) -> History:
    v1 = draw(st.fixed_dictionaries({c: prices_ for c in CLASSES}))
    # the next version keeps some prices: lines alike but for their figures
    v2 = draw(st.none() | st.fixed_dictionaries({c: st.just(v1[c]) | prices_ for c in CLASSES}))
    first_day = draw(st.integers(1, 31))
    starts_on = date(2026, 9, 25) + timedelta(days=draw(st.integers(0, 36)))
    ends_on = max(starts_on, date(2026, 10, 1)) + timedelta(days=draw(st.integers(0, 70)))
    times = sorted(set(draw(st.lists(event_times, min_size=1, max_size=9, unique=True))))
    events: list[Ev] = []
    names = [f"vm-{i}" for i in range(draw(st.integers(1, 2)))]
    alive: dict[str, tuple[dict[str, int], str, str]] = {}
    for at in times:
        name = draw(st.sampled_from(names))
        if name not in alive:
            sizes = draw(sizes_)
            alive[name] = (sizes, "running", "a1")
            events.append(Ev(name, LifecycleKind.created, at, sizes, "running"))
            continue
        kind = draw(st.sampled_from(KINDS))
        sizes, power, tenant = alive[name]
        if kind == LifecycleKind.deleted:
            del alive[name]
            events.append(Ev(name, kind, at, {}, power, tenant))
            continue
        if kind == LifecycleKind.resized:
            sizes = draw(sizes_)
        if kind == LifecycleKind.changed:
            tenant = "a2" if tenant == "a1" else "a1"
        power = {"stopped": "stopped", "started": "running"}.get(kind.value, power)
        alive[name] = (sizes, power, tenant)
        events.append(Ev(name, kind, at, sizes, power, tenant))
    return History(
        v1=v1,
        v2=v2,
        caps=draw(st.fixed_dictionaries({}, optional={"vcpu": st.integers(0, 50_000)})),
        minimums=draw(st.fixed_dictionaries({}, optional={"public_ip": st.integers(0, 2_000)})),
        change_on=date(2026, 10, first_day),
        starts_on=starts_on,
        ends_on=ends_on,
        discount=draw(st.sampled_from(["0", "2.5", "5", "12.35", "33.33"])),
        events=events,
    )


def build(db: SessionSource, estate: Estate, h: History) -> tuple[BillingWorld, Any]:
    """A fresh world (its own service company, provider, prices and contract) for `h`."""
    w = make_world(db, estate)
    w.catalog(date(2026, 9, 1), h.v1, caps=h.caps, minimums=h.minimums)
    if h.v2 is not None:
        w.catalog(h.change_on, h.v2, caps=h.caps, minimums=h.minimums)
    contract = w.contract(
        f"HT-P-{uuid.uuid4().hex[:10]}",
        starts_on=h.starts_on,
        ends_on=h.ends_on,
        discount_pct=h.discount,
    )
    for name in sorted({e.server for e in h.events}):
        w.server(name)
    return w, contract


def emit(w: BillingWorld, e: Ev, contract: Any) -> None:
    w.event(e.server, e.kind, e.at, e.sizes, power=e.power, contract=contract, tenant=e.tenant)


def statement_of(w: BillingWorld, contract: Any) -> tuple[Statement, list[tuple[Any, ...]]]:
    (st_,) = w.generate(MONTH, contract_id=contract.id)
    return st_, w.line_rows(st_)


def check_totals(w: BillingWorld, st_: Statement, pct: str) -> None:
    lines = w.lines(st_)
    assert st_.subtotal_amount == sum(ln.amount for ln in lines)
    assert st_.line_count == len(lines)
    assert st_.discount_amount == rating.percent_of(st_.subtotal_amount, Decimal(pct))
    assert st_.total_amount == st_.subtotal_amount - st_.discount_amount


def snapshot(w: BillingWorld) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every rated row and interval of the world's servers, as plain tuples."""
    ids = list(w.servers.values())
    with w.db.unit_of_work(write=False) as s:
        rows = s.execute(select(RatedUsage).where(col(RatedUsage.server_id).in_(ids))).scalars()
        rated_rows = sorted(
            (
                str(r.interval_id),
                r.month,
                str(r.price_item_id),
                r.in_contract,
                r.seconds,
                r.first_at,
                r.last_at,
                str(r.contract_id),
            )
            for r in rows
        )
        intervals = sorted(
            (str(i.id), i.resource_class, i.quantity, i.started_at, i.ended_at, i.rated_until)
            for i in s.execute(
                select(UsageInterval).where(col(UsageInterval.server_id).in_(ids))
            ).scalars()
        )
    return rated_rows, intervals


DB_SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@DB_SETTINGS
@given(
    h=histories(),
    runs=st.lists(event_times, min_size=1, max_size=6),
    noops=st.lists(st.tuples(st.integers(0, 8), st.integers(1, 86400)), max_size=3),
    batch=st.integers(1, 7),
)
def test_metering_hour_by_hour_or_with_no_op_events_gives_the_same_statement(
    db, estate, clock, h, runs, noops, batch
):
    clock.move_to(local(2026, 11, 3, 9))
    # whole: every event written first, metered and rated in one go by the statement run
    whole, c1 = build(db, estate, h)
    for e in h.events:
        emit(whole, e, c1)
    st1, lines1 = statement_of(whole, c1)
    check_totals(whole, st1, h.discount)

    # piecemeal: events written as they happen, the hourly job run at random times in between
    # with a small batch, plus events that change nothing (a reboot, a sync seeing the same)
    parts, c2 = build(db, estate, h)
    events = list(h.events)
    for i, after in noops:
        if not events:
            break
        base = events[min(i, len(events) - 1)]
        at = base.at + timedelta(seconds=after)
        same_time = {e.at for e in events}
        later = [e for e in events if e.server == base.server and e.at > base.at]
        if at in same_time or (later and at >= later[0].at):
            continue
        kind = LifecycleKind.rebooted if base.sizes else LifecycleKind.changed
        events.append(Ev(base.server, kind, at, base.sizes, base.power, base.tenant))
    events.sort(key=lambda e: e.at)
    pending = list(events)
    for until in sorted(runs):
        while pending and pending[0].at < until:
            emit(parts, pending.pop(0), c2)
        metering.run(db, until=until, batch=batch)
    for e in pending:
        emit(parts, e, c2)
    st2, lines2 = statement_of(parts, c2)
    check_totals(parts, st2, h.discount)

    assert lines2 == lines1
    assert (st2.subtotal_amount, st2.discount_amount, st2.total_amount) == (
        st1.subtotal_amount,
        st1.discount_amount,
        st1.total_amount,
    )
    assert {k: v for k, v in parts.rated().items() if k[2] == MONTH} == {
        k: v for k, v in whole.rated().items() if k[2] == MONTH
    }


@DB_SETTINGS
@given(h=histories(), batch=st.integers(1, 5))
def test_metering_again_changes_nothing(db, estate, clock, h, batch):
    clock.move_to(local(2026, 11, 3, 9))
    w, c = build(db, estate, h)
    for e in h.events:
        emit(w, e, c)
    metering.run(db, until=M_END, batch=batch)
    st1, lines1 = statement_of(w, c)
    before = snapshot(w)

    metering.run(db, until=M_END, batch=batch)
    metering.run(db, until=M_END - timedelta(days=3), batch=batch)  # an older `until`: no-op
    with db.unit_of_work() as s:
        metering.catch_up(s, until=M_END)
        metering.catch_up(s, until=M_END)
    assert snapshot(w) == before
    st2, lines2 = statement_of(w, c)
    assert snapshot(w) == before
    assert lines2 == lines1
    assert (st2.id, st2.total_amount) == (st1.id, st1.total_amount)

    # metering on into November adds November, and leaves October's rows and statement alone
    metering.run(db, until=local(2026, 11, 3), batch=batch)
    october = [r for r in snapshot(w)[0] if r[1] == MONTH]
    assert october == [r for r in before[0] if r[1] == MONTH]
    st3, lines3 = statement_of(w, c)
    assert lines3 == lines1 and st3.total_amount == st1.total_amount
    check_totals(w, st3, h.discount)
