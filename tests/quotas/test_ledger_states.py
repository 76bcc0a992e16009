"""The ledger as a state machine: hypothesis drives set-limit / reserve / commit / release /
shrink / release_owner / expire / advance-clock / sweep against agency a (systems a1, a2) and
checks, after every step, the database against an independent pure-Python model.

One machine per backend run binds the session-scoped, migrated `engine`; every example opens one
connection with an outer transaction (rolled back in teardown) and each rule is its own unit of
work in a savepoint, committed so that the audit hook runs. Time is frozen with time-machine and
moved only by the rules, so expiry is deterministic.

What the model predicts, and the database must agree with:
- reserve succeeds iff every positive delta fits at every level that has a limit (an agency must
  have one), counting committed + unexpired reserved; otherwise QuotaExceeded naming exactly the
  levels and classes that do not fit, with their limit and usage;
- a shrink beyond what is committed at the tenant is Invalid; commit refuses released and expired
  reservations (expiry is `expires_at <= now`); release and commit are idempotent;
- a limit change is refused (Invalid/Conflict, with the reason's code) exactly when it would break
  the hierarchy or drop below current usage;
- after every step: every counter equals the model's and an independent recount of the ledger,
  committed + unexpired reserved <= limit at every level with a limit, children's limits sum to at
  most their parent's.

Servers (owner_ref) are given back whole with release_owner once they have shrunk: releasing a
committed shrink on its own gives capacity back to the server without asking the limits, which is
pinned separately below (test_releasing_a_committed_shrink_never_passes_the_limit).
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Engine, select
from sqlmodel import Session

from broker.core import clock
from broker.core.errors import Conflict, GovbrokerError, Invalid, QuotaExceeded
from quotas import ledger
from quotas import service as quotas
from quotas.models import Allocation, Quota, Reservation
from tests.fixtures.auth import build_estate
from tests.fixtures.db import TestDatabase
from tests.fixtures.quota import SYSTEM

pytestmark = pytest.mark.slow

START = datetime(2026, 11, 2, 1, 0, tzinfo=UTC)
CLASSES = ("memory_mb", "vcpu")
CENTER_LIMITS = {"memory_mb": 60, "vcpu": 60}
# b has no memory_mb limit: b1 asking for memory is refused as "no_quota"
INITIAL_LIMITS = {("b", "vcpu"): 10, ("a", "vcpu"): 30, ("a", "memory_mb"): 30}
PARENT = {"a": "center", "b": "center", "a1": "a", "a2": "a", "b1": "b"}
KIND = {"center": "center", "a": "agency", "b": "agency", "a1": "system", "a2": "system"}
KIND["b1"] = "system"
CODES = ("center", "a", "b", "a1", "a2", "b1")
OWNERS = ("srv-1", "srv-2", "srv-3")

_QUOTA = Quota.__table__  # type: ignore[attr-defined]
_ALLOCATION = Allocation.__table__  # type: ignore[attr-defined]
_RESERVATION = Reservation.__table__  # type: ignore[attr-defined]


# --- the model ---------------------------------------------------------------------------------


@dataclass
class MReservation:
    ref: str
    tenant: str
    deltas: dict[str, int]
    owner: str | None
    expires_at: datetime
    state: str = "reserved"  # the reservation row's state
    held: str = "reserved"  # its allocations' state (release_owner settles only these)

    @property
    def shrink(self) -> bool:
        return any(v < 0 for v in self.deltas.values())


def agency_of(code: str) -> str:
    return code if KIND[code] == "agency" else PARENT[code]


class Model:
    """Limits and allocations in plain Python; what the ledger should do, worked out by hand."""

    def __init__(self) -> None:
        self.limits: dict[tuple[str, str], int | None] = {
            **{("center", rc): v for rc, v in CENTER_LIMITS.items()},
            **INITIAL_LIMITS,
        }
        self.reservations: list[MReservation] = []

    def limit(self, code: str, rc: str) -> int | None:
        return self.limits.get((code, rc))

    def in_subtree(self, r: MReservation, level: str) -> bool:
        if KIND[level] == "center":
            return True
        if KIND[level] == "agency":
            return agency_of(r.tenant) == level
        return r.tenant == level

    def committed(self, level: str, rc: str) -> int:
        return sum(
            r.deltas.get(rc, 0)
            for r in self.reservations
            if r.held == "committed" and self.in_subtree(r, level)
        )

    def reserved(self, level: str, rc: str, *, live_at: datetime | None = None) -> int:
        return sum(
            max(r.deltas.get(rc, 0), 0)
            for r in self.reservations
            if r.held == "reserved"
            and self.in_subtree(r, level)
            and (live_at is None or r.expires_at > live_at)
        )

    def usage(self, level: str, rc: str, now: datetime) -> int:
        return self.committed(level, rc) + self.reserved(level, rc, live_at=now)

    def levels(self, code: str) -> list[str]:
        return [code] if KIND[code] == "agency" else [PARENT[code], code]

    def children(self, code: str) -> list[str]:
        return [c for c, p in PARENT.items() if p == code]

    # what an operation should do -----------------------------------------------------------

    def shortfalls(self, code: str, deltas: dict[str, int], now: datetime) -> set[tuple]:
        """(class, level code, reason, limit, usage, requested) for every level that cannot fit."""
        over = set()
        for rc, delta in sorted(deltas.items()):
            if delta <= 0:
                continue
            for level in self.levels(code):
                limit = self.limit(level, rc)
                usage = self.usage(level, rc, now)
                if KIND[level] == "agency" and limit is None:
                    over.add((rc, level, "no_quota", 0, usage, delta))
                elif limit is not None and usage + delta > limit:
                    over.add((rc, level, "limit", limit, usage, delta))
        return over

    def shrinks_too_far(self, code: str, deltas: dict[str, int]) -> bool:
        return any(v < 0 and self.committed(code, rc) + v < 0 for rc, v in deltas.items())

    def set_outcome(
        self, code: str, rc: str, limit: int | None, now: datetime
    ) -> tuple[type[GovbrokerError], str] | None:
        """How set_quota should answer: None when accepted, else (error class, reason code)."""
        if limit is None:
            return None if KIND[code] == "system" else (Invalid, "required")
        parent_limit = self.limit(PARENT[code], rc)
        if parent_limit is None:
            return (Invalid, "parent_unset")
        siblings = sum(self.limit(c, rc) or 0 for c in self.children(PARENT[code]) if c != code)
        if siblings + limit > parent_limit:
            return (Invalid, "exceeds_parent")
        if limit < sum(self.limit(c, rc) or 0 for c in self.children(code)):
            return (Invalid, "below_children")
        if limit < self.usage(code, rc, now):
            return (Conflict, "below_usage")
        return None

    def counters_after(self, r: MReservation, transition: str) -> bool:
        """Whether moving r's allocations by `transition` keeps every counter at or above zero."""
        for rc, amount in r.deltas.items():
            d_committed, d_reserved = ledger.counter_changes(amount, transition)
            for level in self.levels(r.tenant):
                if self.committed(level, rc) + d_committed < 0:
                    return False
                if self.reserved(level, rc) + d_reserved < 0:
                    return False
        return True

    def owner_net(self, owner: str, tenant: str, rc: str) -> int:
        return sum(
            r.deltas.get(rc, 0)
            for r in self.reservations
            if r.owner == owner and r.tenant == tenant and r.held == "committed"
        )

    def owner_has_shrinks(self, owner: str | None) -> bool:
        return owner is not None and any(
            r.owner == owner and r.shrink and r.held in ("reserved", "committed")
            for r in self.reservations
        )


# --- the machine -------------------------------------------------------------------------------

DELTAS = st.dictionaries(st.sampled_from(CLASSES), st.integers(1, 25), min_size=1, max_size=2)
TENANTS = st.sampled_from(["a", "a1", "a2"])  # whose limits the machine changes
CONSUMERS = st.sampled_from(["a", "a1", "a1", "a2", "a2", "b1"])
TTLS = st.sampled_from([1, 2, 10, 60, 300])


class LedgerMachine(RuleBasedStateMachine):
    engine: Engine  # bound by the test
    totals: Counter[str]  # outcomes over every example, for the report

    def __init__(self) -> None:
        super().__init__()
        self.traveller = time_machine.travel(START, tick=False)
        self.clock = self.traveller.start()
        self.connection = self.engine.connect()
        self.outer = self.connection.begin()
        self.db = TestDatabase(self.connection)
        self.model = Model()
        self.serial = 0
        self.outcomes: Counter[str] = Counter()
        with self.db.unit_of_work() as s:
            estate = build_estate(s)
            for (code, rc), limit in self.model.limits.items():
                quotas.set_quota(s, SYSTEM, estate.tid(code), rc, limit=limit)
        self.ids = {code: estate.tid(code) for code in CODES}
        self.codes = {v: k for k, v in self.ids.items()}

    def teardown(self) -> None:
        self.totals.update(self.outcomes)
        self.totals["examples"] += 1
        self.totals["steps"] += sum(
            v
            for k, v in self.outcomes.items()
            if k.endswith((":ok", "Exceeded", "Conflict", "Invalid"))
        )
        try:
            self.outer.rollback()
            self.connection.close()
        finally:
            self.traveller.stop()

    # helpers -------------------------------------------------------------------------------

    def now(self) -> datetime:
        return clock.now()

    def next_ref(self) -> str:
        self.serial += 1
        return f"r{self.serial}"

    def attempt(self, fn: Any) -> tuple[Any, GovbrokerError | None]:
        """One unit of work: committed when it returns, rolled back when it raises."""
        try:
            with self.db.unit_of_work() as s:
                return fn(s), None
        except GovbrokerError as e:
            return None, e

    def record(self, name: str, error: GovbrokerError | None) -> None:
        self.outcomes[f"{name}:{type(error).__name__ if error else 'ok'}"] += 1
        if error is not None and error.errors:
            self.outcomes[f"{name}:{error.errors[0].code}"] += 1

    def do_reserve(self, code: str, deltas: dict[str, int], ttl: int, owner: str | None) -> None:
        now = self.now()
        expected_over = self.model.shortfalls(code, deltas, now)
        too_far = not expected_over and self.model.shrinks_too_far(code, deltas)
        ref = self.next_ref()
        result, error = self.attempt(
            lambda s: ledger.reserve(
                s,
                self.ids[code],
                deltas,
                ref=ref,
                actor="machine",
                ttl=timedelta(seconds=ttl),
                owner_ref=owner,
            )
        )
        self.record("reserve", error)
        if expected_over:
            assert isinstance(error, QuotaExceeded), (code, deltas, expected_over, error)
            got = {
                (o.resource_class, o.tenant_code, o.reason, o.limit, o.usage, o.requested)
                for o in error.over
            }
            assert got == expected_over
            return
        if too_far:
            assert isinstance(error, Invalid), (code, deltas, error)
            assert error.errors[0].code == "below_zero"
            return
        assert error is None, (code, deltas, error)
        assert result.expires_at == now + timedelta(seconds=ttl)
        self.model.reservations.append(
            MReservation(ref, code, dict(deltas), owner, now + timedelta(seconds=ttl))
        )

    # rules ---------------------------------------------------------------------------------

    @rule(code=TENANTS, rc=st.sampled_from(CLASSES), data=st.data())
    def set_limit(self, code: str, rc: str, data: st.DataObject) -> None:
        """Any limit, or one right at the current usage: some break the rules on purpose."""
        usage = self.model.usage(code, rc, self.now())
        limit = data.draw(
            st.one_of(
                st.none(),
                st.integers(0, 60),
                st.sampled_from([max(usage - 1, 0), usage, usage + 1]),
            ),
            label="limit",
        )
        expected = self.model.set_outcome(code, rc, limit, self.now())
        _, error = self.attempt(
            lambda s: quotas.set_quota(s, SYSTEM, self.ids[code], rc, limit=limit)
        )
        self.record("set_limit", error)
        if expected is None:
            assert error is None, (code, rc, limit, error)
            self.model.limits[(code, rc)] = limit
        else:
            kind, reason = expected
            assert isinstance(error, kind), (code, rc, limit, expected, error)
            assert error.errors[0].code == reason, (code, rc, limit, expected, error)

    @rule(
        code=CONSUMERS,
        deltas=DELTAS,
        ttl=TTLS,
        owner=st.one_of(st.none(), st.sampled_from(OWNERS)),
    )
    def reserve(self, code: str, deltas: dict[str, int], ttl: int, owner: str | None) -> None:
        self.do_reserve(code, deltas, ttl, owner)

    @rule(code=CONSUMERS, deltas=DELTAS, ttl=TTLS, owner=st.sampled_from(OWNERS))
    def grow_server(self, code: str, deltas: dict[str, int], ttl: int, owner: str) -> None:
        """Reserve for a server and commit at once, as creating or growing one does."""
        before = len(self.model.reservations)
        self.do_reserve(code, deltas, ttl, owner)
        if len(self.model.reservations) > before:
            r = self.model.reservations[-1]
            _, error = self.attempt(lambda s: ledger.commit(s, r.ref))
            self.record("commit", error)
            assert error is None, (r, error)
            r.state = r.held = "committed"

    def committable(self, r: MReservation) -> bool:
        """Not a shrink that would leave its server holding less than nothing (see release)."""
        return not (
            r.shrink
            and r.state == "reserved"
            and r.owner is not None
            and any(
                self.model.owner_net(r.owner, r.tenant, rc) + v < 0 for rc, v in r.deltas.items()
            )
        )

    @precondition(lambda self: self.model.reservations)
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        choices = [r for r in self.model.reservations if self.committable(r)]
        if not choices:
            return
        r = data.draw(st.sampled_from(choices), label="reservation")
        now = self.now()
        if r.state == "committed":
            expected: str | None = None
        elif (
            r.state == "released"
            or r.expires_at <= now
            or not self.model.counters_after(r, "commit")
        ):
            expected = "conflict"
        else:
            expected = "commit"
        _, error = self.attempt(lambda s: ledger.commit(s, r.ref))
        self.record("commit", error)
        if expected == "conflict":
            assert isinstance(error, Conflict), (r, error)
            return
        assert error is None, (r, error)
        if expected == "commit":
            r.state = r.held = "committed"

    def releasable(self, r: MReservation) -> bool:
        if r.held != "committed":
            return True
        # given back with the whole server instead: see the module docstring
        return not r.shrink and not self.model.owner_has_shrinks(r.owner)

    @precondition(lambda self: self.model.reservations)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        choices = [r for r in self.model.reservations if self.releasable(r)]
        if not choices:
            return
        r = data.draw(st.sampled_from(choices), label="reservation")
        transition = {"reserved": "release_reserved", "committed": "release_committed"}
        fits = r.held == "released" or self.model.counters_after(r, transition[r.held])
        _, error = self.attempt(lambda s: ledger.release(s, r.ref))
        self.record("release", error)
        if not fits:
            assert isinstance(error, Conflict), (r, error)
            return
        assert error is None, (r, error)
        r.state = r.held = "released"

    @precondition(lambda self: self.model.reservations)
    @rule(data=st.data(), ttl=st.sampled_from([1, 60, 300]))
    def shrink(self, data: st.DataObject, ttl: int) -> None:
        """A server gives back part of what it holds committed in one tenant."""
        choices = sorted(
            {
                (r.owner, r.tenant, rc)
                for r in self.model.reservations
                if r.owner is not None and not self.model.owner_has_shrinks(r.owner)
                for rc in r.deltas
                if self.model.owner_net(r.owner, r.tenant, rc) > 0
            }
        )
        if not choices:
            return
        owner, code, rc = data.draw(st.sampled_from(choices), label="server")
        amount = data.draw(st.integers(1, self.model.owner_net(owner, code, rc)), label="by")
        self.do_reserve(code, {rc: -amount}, ttl, owner)

    @rule(code=TENANTS, rc=st.sampled_from(CLASSES), beyond=st.integers(1, 5))
    def shrink_too_far(self, code: str, rc: str, beyond: int) -> None:
        """More than is committed at the tenant: refused as invalid, and nothing changes."""
        self.do_reserve(code, {rc: -(self.model.committed(code, rc) + beyond)}, 60, None)

    @precondition(lambda self: any(r.owner for r in self.model.reservations))
    @rule(owner=st.sampled_from(OWNERS))
    def release_owner(self, owner: str) -> None:
        mine = [r for r in self.model.reservations if r.owner == owner and r.held == "committed"]
        count, error = self.attempt(lambda s: ledger.release_owner(s, owner))
        self.record("release_owner", error)
        assert error is None, (owner, error)
        assert count == sum(len(r.deltas) for r in mine)
        for r in mine:
            r.held = "released"  # the reservation row keeps its state; only allocations settle

    @rule(seconds=st.sampled_from([1, 2, 5, 30, 120, 600]))
    def advance_clock(self, seconds: int) -> None:
        self.clock.shift(timedelta(seconds=seconds))

    @precondition(lambda self: any(r.state == "reserved" for r in self.model.reservations))
    @rule(data=st.data(), past=st.sampled_from([0, 0, 1]))
    def expire(self, data: st.DataObject, past: int) -> None:
        """Jump to a reservation's expiry exactly (it is expired then) or just past it."""
        now = self.now()
        pending = [r for r in self.model.reservations if r.state == "reserved"]
        r = data.draw(st.sampled_from(pending), label="reservation")
        if r.expires_at + timedelta(seconds=past) > now:
            self.clock.move_to(r.expires_at + timedelta(seconds=past))
            self.outcomes["expired"] += 1

    @rule()
    def sweep(self) -> None:
        now = self.now()
        due = [r for r in self.model.reservations if r.state == "reserved" and r.expires_at <= now]
        swept, error = self.attempt(lambda s: ledger.sweep_expired(s))
        self.record("sweep", error)
        assert error is None, error
        assert swept == len(due)
        self.outcomes["swept"] += swept
        for r in due:
            r.state = r.held = "released"

    # invariants ----------------------------------------------------------------------------

    @invariant()
    def database_agrees_with_the_model_and_with_itself(self) -> None:
        now = self.now()
        conn = self.connection
        rows = {
            (self.codes[r.tenant_id], r.resource_class): (r.hard_limit, r.committed, r.reserved)
            for r in conn.execute(
                select(
                    _QUOTA.c.tenant_id,
                    _QUOTA.c.resource_class,
                    _QUOTA.c.hard_limit,
                    _QUOTA.c.committed,
                    _QUOTA.c.reserved,
                ).where(_QUOTA.c.resource_class.in_(CLASSES))
            )
        }
        ledger_rows = conn.execute(
            select(
                _RESERVATION.c.ref,
                _RESERVATION.c.state.label("res_state"),
                _ALLOCATION.c.tenant_id,
                _ALLOCATION.c.agency_id,
                _ALLOCATION.c.resource_class,
                _ALLOCATION.c.amount,
                _ALLOCATION.c.state,
                _ALLOCATION.c.expires_at,
            ).join(_RESERVATION, _RESERVATION.c.id == _ALLOCATION.c.reservation_id)
        ).all()

        # the ledger is the model's, row for row
        got = sorted(
            (r.ref, r.res_state, self.codes[r.tenant_id], r.resource_class, r.amount, r.state)
            for r in ledger_rows
        )
        want = sorted(
            (m.ref, m.state, m.tenant, rc, amount, m.held)
            for m in self.model.reservations
            for rc, amount in m.deltas.items()
        )
        assert got == want

        for code in CODES:
            for rc in CLASSES:
                limit, committed, reserved = rows.get((code, rc), (None, 0, 0))
                assert limit == self.model.limit(code, rc), (code, rc)
                if KIND[code] == "center":
                    continue  # the center keeps no counters: its usage is its agencies' sum
                # counters == the model's == an independent recount of the database's ledger
                assert (committed, reserved) == (
                    self.model.committed(code, rc),
                    self.model.reserved(code, rc),
                ), (code, rc)
                mine = [
                    r
                    for r in ledger_rows
                    if r.resource_class == rc
                    and (
                        self.codes[r.agency_id] == code
                        if KIND[code] == "agency"
                        else self.codes[r.tenant_id] == code
                    )
                ]
                recount = (
                    sum(r.amount for r in mine if r.state == "committed"),
                    sum(max(r.amount, 0) for r in mine if r.state == "reserved"),
                )
                assert (committed, reserved) == recount, (code, rc)

        for code in CODES:
            for rc in CLASSES:
                limit = self.model.limit(code, rc)
                if limit is None:
                    continue
                live = [
                    r
                    for r in ledger_rows
                    if r.resource_class == rc
                    and (
                        KIND[code] == "center"
                        or (KIND[code] == "agency" and self.codes[r.agency_id] == code)
                        or self.codes[r.tenant_id] == code
                    )
                ]
                usage = sum(r.amount for r in live if r.state == "committed") + sum(
                    max(r.amount, 0) for r in live if r.state == "reserved" and r.expires_at > now
                )
                assert usage <= limit, (code, rc, usage, limit)
                assert usage == self.model.usage(code, rc, now)
                children = sum(self.model.limit(c, rc) or 0 for c in self.model.children(code))
                assert children <= limit, (code, rc, children, limit)


def test_ledger_state_machine(engine: Engine) -> None:
    class Machine(LedgerMachine):
        pass

    Machine.engine = engine
    Machine.totals = Counter()
    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=40,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    totals = Machine.totals
    print(dict(sorted(totals.items())))
    # the walk reached what it claims to check: fits and refusals of every kind
    assert totals["reserve:ok"] >= 20 and totals["reserve:QuotaExceeded"] >= 5, totals
    assert totals["set_limit:ok"] >= 5, totals
    assert totals["set_limit:Invalid"] + totals["set_limit:Conflict"] >= 5, totals
    assert totals["commit:ok"] >= 5, totals


# --- pinned: what the machine keeps out of its random walk ------------------------------------


def counters(session: Session, tenant_id: uuid.UUID, rc: str = "vcpu") -> tuple[int, int]:
    q = (
        session.execute(
            select(Quota)
            .where(Quota.tenant_id == tenant_id, Quota.resource_class == rc)
            .execution_options(populate_existing=True)
        )
        .scalars()
        .one()
    )
    return q.committed, q.reserved


def test_releasing_a_committed_shrink_never_passes_the_limit(session, quota_estate):  # type: ignore[no-untyped-def]
    """a1 may hold 40 vCPU. A server grows to 30 and shrinks by 20; another takes the 30 freed
    up to the limit. Giving the committed shrink back would hand the first server its 20 again,
    60 in all: the ledger must refuse it (or otherwise stay within the limit), never just do it."""
    e = quota_estate
    a1 = e.tid("a1")
    grow = ledger.reserve(session, a1, {"vcpu": 30}, ref="grow", actor="t", owner_ref="srv:1")
    ledger.commit(session, grow.id)
    shrink = ledger.reserve(session, a1, {"vcpu": -20}, ref="shrink", actor="t", owner_ref="srv:1")
    ledger.commit(session, shrink.id)
    other = ledger.reserve(session, a1, {"vcpu": 30}, ref="other", actor="t", owner_ref="srv:2")
    ledger.commit(session, other.id)
    assert counters(session, a1) == (40, 0)
    try:
        with session.begin_nested():
            ledger.release(session, shrink.id)
    except (QuotaExceeded, Conflict):
        pass
    committed, reserved = counters(session, a1)
    assert committed + reserved <= 40, f"a1 holds {committed} committed against a limit of 40"
