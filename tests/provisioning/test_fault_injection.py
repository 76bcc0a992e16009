"""Random requests and lifecycle actions with failures injected at every driver step, process
kills mid-job, syncs in between, and the reconciler; after settling, quota, inventory and the
provider agree.

Faults: the simulator's own injection (a provider error on the next call of an operation, a
create whose answer is lost after the server was made) and a "kill": the driver wrapper raises
`Killed`, a BaseException no handler of the broker catches, before or after the real call, as
when the process dies there. The job is then left as a dead process leaves it (running, its
claim taken, quota reserved). Settling moves the clock past the stale threshold and runs the
reconciler with a healthy provider until no job is active.

Invariants after settling, per tenant and class:
- committed usage in the ledger == the sum of `booked` over the tenant's live managed servers,
  and == the quota counters; nothing is reserved any more (no live job holds anything);
- every server at the provider has an inventory row, owned when it was built by a job;
- every live managed server's booked size is what the provider shows.
"""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Engine, func, select

from broker.core.errors import GovbrokerError
from broker.core.settings import get_settings
from broker.inventory import providers, sync
from broker.inventory.models import Provider, Server
from broker.provisioning import executor, service
from broker.provisioning.models import ACTIVE_STATES, Job
from broker.provisioning.schemas import ServerAction, ServerCreate
from broker.tenancy import auth
from broker.tenancy.models import User
from drivers.simulator import SimulatorDriver
from quotas import ledger
from quotas.models import Quota, Reservation
from tests.fixtures.auth import build_estate
from tests.fixtures.db import TestDatabase
from tests.fixtures.inventory import register_simulator
from tests.fixtures.provisioning import (
    assert_booked_as_seen,
    committed_and_booked,
    give_room,
    offer,
)
from tests.fixtures.quota import set_limits

pytestmark = pytest.mark.slow

START = datetime(2026, 11, 2, 1, 0, tzinfo=UTC)
SECRET = "S3cret-pa55-for-faults"


class Killed(BaseException):
    """The process dies here: nothing in the broker may catch it."""


class Faulty:
    """A driver whose next call of `op` dies before or after reaching the provider."""

    def __init__(self, inner: SimulatorDriver, kill: tuple[str, str] | None) -> None:
        self._inner = inner
        self._kill = kill

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._inner, name)
        if not callable(target) or self._kill is None or self._kill[0] != name:
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            when = self._kill[1] if self._kill else ""
            self._kill = None
            if when == "before":
                raise Killed(name)
            result = target(*args, **kwargs)
            raise Killed(name)
            return result  # pragma: no cover

        return call


PROVIDER_FAULTS = st.sampled_from(
    [
        None,
        None,
        {"fail_operations": {"OP": {"error": "unavailable", "times": 3}}},  # retries run out
        {"fail_operations": {"OP": {"error": "unavailable", "times": 1}}},  # a retry succeeds
        {"fail_operations": {"OP": {"error": "conflict", "times": 1}}},
        {"fail_operations": {"OP": {"error": "quota", "times": 1}}},
        {"fail_operations": {"get_server": {"error": "unavailable", "times": 3}}},
        {"fail_operations": {"find_server_by_tag": {"error": "unavailable", "times": 3}}},
        {"create_then_fail": 1},
        {"create_then_fail": 1, "fail_operations": {"find_server_by_tag": "unavailable"}},
        "kill-before",
        "kill-after",
    ]
)
ACTIONS = st.sampled_from(
    [
        ("stop", {}),
        ("start", {}),
        ("reboot", {}),
        ("resize", {"vcpu": 1, "memory_mb": 1024}),
        ("resize", {"vcpu": 3, "memory_mb": 3072}),
        ("attach_disk", {"size_gb": 10, "tier": "hdd"}),
        ("add_public_ip", {"bandwidth_mbps": 5}),
        ("delete", {}),
    ]
)
OP_OF = {
    "stop": "stop",
    "start": "start",
    "reboot": "reboot",
    "resize": "resize",
    "attach_disk": "attach_disk",
    "add_public_ip": "add_public_ip",
    "delete": "delete",
}


class ProvisioningMachine(RuleBasedStateMachine):
    engine: Engine
    totals: Counter[str]

    def __init__(self) -> None:
        super().__init__()
        self.traveller = time_machine.travel(START, tick=False)
        self.clock = self.traveller.start()
        self.connection = self.engine.connect()
        self.outer = self.connection.begin()
        self.db = TestDatabase(self.connection)
        self.name = f"faults-{uuid.uuid4().hex[:8]}"
        self.outcomes: Counter[str] = Counter()
        self.kill: tuple[str, str] | None = None
        self.faults: dict[str, Any] | None = None
        self.servers: list[uuid.UUID] = []

    @initialize()
    def setup(self) -> None:
        with self.db.unit_of_work() as s:
            self.estate = build_estate(s)
            set_limits(s, self.estate)
        give_room(self.db, self.estate, "a", "b")
        opts = {"state": f"shared:{self.name}", "retry_max_wait": 0}
        self.provider_id = register_simulator(self.db, self.name, opts)
        self.sim = SimulatorDriver(f"sim://{self.name}", {}, opts)
        offer(self.db, self.provider_id)
        with self.db.unit_of_work(write=False) as s:
            user = s.get(User, self.estate.uid("a-member"))
            assert user is not None
            self.member = auth.load_principal(s, user, method="session")

    def teardown(self) -> None:
        self.totals.update(self.outcomes)
        self.totals["examples"] += 1
        SimulatorDriver.ex_reset_shared(self.name)
        try:
            self.outer.rollback()
            self.connection.close()
        finally:
            self.traveller.stop()

    # the driver every job opens: the shared simulated cloud, with the pending kill if any
    def factory(self, provider: Provider) -> Any:
        driver = providers.driver_for(provider)
        # faults belong to a driver instance: the job's own gets the pending ones
        if self.faults:
            driver.ex_inject(**self.faults)  # type: ignore[attr-defined]
        kill, self.kill, self.faults = self.kill, None, None
        return Faulty(driver, kill)  # type: ignore[arg-type]

    def inject(self, fault: Any, op: str) -> None:
        self.faults = None
        if fault is None:
            return
        if isinstance(fault, str):
            self.kill = (op, fault.removeprefix("kill-"))
            return
        spec = {**fault}
        if "fail_operations" in spec:
            spec["fail_operations"] = {
                (op if k == "OP" else k): v for k, v in spec["fail_operations"].items()
            }
        self.faults = spec

    def run_job(self, job: executor.Claimed | None) -> None:
        if job is None:
            return
        try:
            state = executor.run(self.db, job, driver_factory=self.factory)
            self.outcomes[f"job:{state}"] += 1
        except Killed:
            self.outcomes["job:killed"] += 1
        finally:
            self.faults = None
            self.kill = None

    # rules -----------------------------------------------------------------------------------

    @rule(
        fault=PROVIDER_FAULTS,
        size=st.sampled_from([(1, 1024), (2, 2048), (4, 4096)]),
        public_ip=st.booleans(),
        disk=st.sampled_from([None, 10, 40]),
    )
    def request(self, fault: Any, size: tuple[int, int], public_ip: bool, disk: int | None) -> None:
        data = ServerCreate(
            name=f"vm-{uuid.uuid4().hex[:6]}",
            system_id=self.estate.tid("a1"),
            image="centos-7.9",
            vcpu=size[0],
            memory_mb=size[1],
            public_ip=public_ip,
            bandwidth_mbps=10 if public_ip else None,
            disks=[{"size_gb": disk, "tier": "hdd"}] if disk else [],
        )
        try:
            submitted = service.request_server(self.db, self.member, data, key=None)
        except GovbrokerError as exc:
            self.outcomes[f"request:{type(exc).__name__}"] += 1
            return
        self.servers.append(submitted.job_id)
        self.inject(fault, "create_server")
        self.run_job(submitted.claimed)

    @precondition(lambda self: bool(self.live_servers()))
    @rule(pick=st.integers(0, 1000), action=ACTIONS, fault=PROVIDER_FAULTS)
    def act(self, pick: int, action: tuple[str, dict[str, Any]], fault: Any) -> None:
        live = self.live_servers()
        server_id = live[pick % len(live)]
        name, params = action
        try:
            with self.db.unit_of_work() as s:
                if name == "delete":
                    job = service.delete(s, self.member, server_id)
                else:
                    job = service.act(
                        s, self.member, server_id, ServerAction(action=name, **params)
                    )
                claimed = executor.handover(s, job)
        except GovbrokerError as exc:
            self.outcomes[f"{name}:{type(exc).__name__}"] += 1
            return
        self.inject(fault, OP_OF[name])
        self.run_job(claimed)

    @rule()
    def sync(self) -> None:
        outcome = sync.sync_provider(self.db, self.provider_id)
        self.outcomes[f"sync:{outcome.status}"] += 1

    @rule(minutes=st.sampled_from([1, 5, 20]))
    def wait_and_reconcile(self, minutes: int) -> None:
        self.clock.shift(timedelta(minutes=minutes))
        counts = executor.reconcile(self.db, driver_factory=self.factory)
        self.outcomes["reconcile"] += 1
        self.outcomes["reconciled"] += counts["resolved"]

    # helpers ---------------------------------------------------------------------------------

    def live_servers(self) -> list[uuid.UUID]:
        with self.db.unit_of_work(write=False) as s:
            return list(
                s.execute(
                    select(Server.id)
                    .where(Server.tenant_id.is_not(None), Server.gone_at.is_(None))  # type: ignore[union-attr]
                    .order_by(Server.name)
                ).scalars()
            )

    def settle(self) -> None:
        stale = timedelta(seconds=get_settings().job_stale_seconds + 1)
        for _ in range(get_settings().job_max_attempts + 2):
            with self.db.unit_of_work(write=False) as s:
                active = s.execute(
                    select(func.count(Job.id)).where(
                        Job.state.in_([a.value for a in ACTIVE_STATES])  # type: ignore[attr-defined]
                    )
                ).scalar_one()
            if not active:
                return
            self.clock.shift(stale)
            counts = executor.reconcile(self.db)
            self.outcomes["reconciled"] += counts["resolved"] + counts["started"]
        raise AssertionError("jobs still active after settling")

    @invariant()
    def consistent_once_settled(self) -> None:
        if not hasattr(self, "estate"):
            return
        self.settle()
        with self.db.unit_of_work(write=False) as s:
            rows = list(
                s.execute(select(Server).where(Server.provider_id == self.provider_id)).scalars()
            )
            # the ledger holds exactly what the live managed servers hold
            held, expected = committed_and_booked(s)
            assert held == expected, (held, expected)
            for q in s.execute(select(Quota)).scalars():
                if q.tenant_id == self.estate.tid("a1"):
                    assert q.committed == expected[(q.tenant_id, q.resource_class)], q
                    assert q.reserved == 0, q
            reserved = s.execute(
                select(func.count(Reservation.id)).where(Reservation.state == ledger.RESERVED)
            ).scalar_one()
            assert reserved == 0
            # every server at the provider is inventoried, and a job-built one is managed
            at_provider = {x.external_id: x for x in self.sim.list_servers()}
            by_external = {r.external_id: r for r in rows if r.gone_at is None}
            assert set(at_provider) <= set(by_external), set(at_provider) - set(by_external)
            classes = ledger.resource_classes(s)
            for ext, x in at_provider.items():
                assert_booked_as_seen(by_external[ext], x, classes)
            # and nothing is inventoried as live that the provider no longer has
            assert set(by_external) <= set(at_provider) | {
                r.external_id for r in rows if r.tenant_id is None
            }


def test_provisioning_survives_faults_kills_and_the_reconciler(engine: Engine) -> None:
    class Machine(ProvisioningMachine):
        pass

    Machine.engine = engine
    Machine.totals = Counter()
    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=25,
            stateful_step_count=15,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    totals = Machine.totals
    print(dict(sorted(totals.items())))
    # the walk reached what it claims to check
    assert totals["job:succeeded"] >= 10, totals
    assert totals["job:failed"] >= 3, totals
    assert totals["job:killed"] >= 3, totals
    assert totals["reconciled"] >= 3, totals
