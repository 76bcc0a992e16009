"""The arithmetic of billing, pure: months in the billing time zone, cutting usage at price,
month and contract boundaries, and turning exact seconds into fen.

The rounding rule, written once: a statement line's amount is
unit price (fen per unit-hour) × quantity ÷ unit × seconds ÷ 3600, computed exactly (fractions)
and rounded half up to the fen. Nothing is rounded before the line, so cutting usage anywhere and
adding the pieces back gives the same line.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from functools import cache
from itertools import pairwise
from zoneinfo import ZoneInfo

from broker.core.settings import get_settings

HOUR = 3600
# what a price is per: memory is held in MiB and priced per GiB-hour
PRICE_UNIT: dict[str, int] = {"memory_mb": 1024}
# classes a powered-off server stops paying for (it keeps paying for storage and public IPs),
# unless its price list says otherwise; bandwidth carries no traffic while the server is off
COMPUTE_CLASSES = frozenset({"vcpu", "memory_mb", "bandwidth_mbps"})
# dates billing accepts (contract periods, price lists): far enough for any real contract, near
# enough that every date has a midnight in every zone
FIRST_DAY = date(2000, 1, 1)
LAST_DAY = date(2199, 12, 31)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)
POWERED_OFF_STATES = frozenset({"stopped", "suspended"})
# counted by quota, not billed: a server is paid for by what it holds
UNBILLED_CLASSES = frozenset({"instances"})


def _ratio_half_up(num: int, den: int) -> int:
    """num / den (den > 0) to the nearest integer, halves away from zero."""
    whole, rest = divmod(abs(num), den)
    return (-1 if num < 0 else 1) * (whole + (1 if 2 * rest >= den else 0))


def round_half_up(value: Fraction) -> int:
    """Round to the nearest integer, halves away from zero."""
    return _ratio_half_up(value.numerator, value.denominator)


def exact_amount(unit_price: Decimal, quantity: int, seconds: int, resource_class: str) -> Fraction:
    """Fen owed for holding `quantity` for `seconds`, before rounding."""
    per = PRICE_UNIT.get(resource_class, 1)
    return Fraction(unit_price) * quantity * seconds / (HOUR * per)


def line_amount(unit_price: Decimal, quantity: int, seconds: int, resource_class: str) -> int:
    """round_half_up(exact_amount(...)) in plain integers: the same result without building
    Fractions (a statement has one line per server and class)."""
    num, den = unit_price.as_integer_ratio()
    return _ratio_half_up(num * quantity * seconds, den * HOUR * PRICE_UNIT.get(resource_class, 1))


def percent_of(amount: int, pct: Decimal) -> int:
    """A discount on a subtotal, by the same rounding rule."""
    return round_half_up(Fraction(amount) * Fraction(pct) / 100)


def powered(power_state: str) -> bool:
    return power_state not in POWERED_OFF_STATES


@cache
def zone(name: str | None = None) -> ZoneInfo:
    return ZoneInfo(name or get_settings().billing_timezone)


def month_of(at: datetime) -> str:
    local = at.astimezone(zone())
    return f"{local.year:04d}-{local.month:02d}"


def parse_month(month: str) -> tuple[int, int]:
    """'2026-10' → (2026, 10); ValueError on anything else."""
    year, sep, mon = month.partition("-")
    digits = year + mon
    # ASCII only: str.isdigit() also takes full-width and other scripts' digits
    if not sep or len(year) != 4 or len(mon) != 2 or not (digits.isascii() and digits.isdigit()):
        raise ValueError("a month looks like 2026-10")
    y, m = int(year), int(mon)
    if not 1 <= m <= 12 or y < 2000:
        raise ValueError("a month looks like 2026-10")
    return y, m


def local_midnight(day: date) -> datetime:
    """The instant a calendar day of the billing zone begins, in UTC."""
    return datetime(day.year, day.month, day.day, tzinfo=zone()).astimezone(UTC)


def month_bounds(month: str) -> tuple[datetime, datetime]:
    y, m = parse_month(month)
    nxt = date(y + m // 12, m % 12 + 1, 1)
    return local_midnight(date(y, m, 1)), local_midnight(nxt)


def month_starts_between(start: datetime, end: datetime) -> list[datetime]:
    """Month boundaries strictly inside (start, end)."""
    out: list[datetime] = []
    cursor = month_bounds(month_of(start))[1]
    while cursor < end:
        out.append(cursor)
        cursor = month_bounds(month_of(cursor))[1]
    return out


def floor_hour(at: datetime) -> datetime:
    at = at.astimezone(UTC)
    return at.replace(minute=0, second=0, microsecond=0)


@dataclass(frozen=True)
class PriceWindow:
    """One price-list item in force over [start, end) (end None: until further notice)."""

    item_id: uuid.UUID
    unit_price: Decimal
    start: datetime
    end: datetime | None
    bill_compute_when_off: bool

    def covers(self, at: datetime) -> bool:
        return self.start <= at and (self.end is None or at < self.end)


@dataclass(frozen=True)
class ContractWindow:
    """A contract's period as instants, [start, end)."""

    contract_id: uuid.UUID
    start: datetime
    end: datetime

    def covers(self, at: datetime) -> bool:
        return self.start <= at < self.end


def whole_seconds(at: datetime) -> int:
    """Seconds since the epoch, floored: a piece's seconds are the difference of its ends', so
    pieces cut anywhere (even between two seconds) add up to the whole."""
    return (at - _EPOCH) // _SECOND


@dataclass(frozen=True)
class Cut:
    """A piece of an interval that is rated one way."""

    start: datetime
    end: datetime
    month: str
    price: PriceWindow
    # the contract that pays for the piece; None: outside every contract (unassigned)
    contract_id: uuid.UUID | None

    @property
    def in_contract(self) -> bool:
        return self.contract_id is not None

    @property
    def seconds(self) -> int:
        return whole_seconds(self.end) - whole_seconds(self.start)


def cut(
    start: datetime,
    end: datetime,
    *,
    resource_class: str,
    is_powered: bool,
    prices: Sequence[PriceWindow],
    contracts: Sequence[ContractWindow] = (),
) -> list[Cut]:
    """Cut [start, end) at month starts, price changes and contract periods; drop the pieces
    nothing prices (no price in force, or compute while powered off unless the price list bills
    it). Each piece is paid by the first of `contracts` whose period covers it (the server's own
    contract first, then its agency's renewals), or by none. Neighbouring pieces rated alike
    are merged."""
    if end <= start or resource_class in UNBILLED_CLASSES:
        return []
    marks: set[datetime] = {start, end, *month_starts_between(start, end)}
    for p in prices:
        marks.update(t for t in (p.start, p.end) if t is not None and start < t < end)
    for c in contracts:
        marks.update(t for t in (c.start, c.end) if start < t < end)
    points = sorted(marks)
    out: list[Cut] = []
    for a, b in pairwise(points):
        price = next((p for p in prices if p.covers(a)), None)
        if price is None:
            continue
        if resource_class in COMPUTE_CLASSES and not is_powered and not price.bill_compute_when_off:
            continue
        payer = next((c.contract_id for c in contracts if c.covers(a)), None)
        piece = Cut(a, b, month_of(a), price, payer)
        last = out[-1] if out else None
        if (
            last is not None
            and last.end == a
            and (last.month, last.price, last.contract_id) == (piece.month, price, payer)
        ):
            out[-1] = Cut(last.start, b, last.month, price, payer)
        else:
            out.append(piece)
    return out


def contract_window(contract_id: uuid.UUID, starts_on: date, ends_on: date) -> ContractWindow:
    """A contract's period as instants: from its first day's midnight to the midnight after its
    last day."""
    return ContractWindow(
        contract_id, local_midnight(starts_on), local_midnight(ends_on + timedelta(days=1))
    )
