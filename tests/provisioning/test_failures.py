"""Failure handling, one case at a time: a provider refusal releases the reservation and records
the error; a create whose answer was lost is finished; a process killed mid-job is resolved by the
reconciler (adopted and committed when the provider has the server, released when it has not);
a provider that cannot be reached parks the job with backoff until it can; approvals that nobody
gives expire and give the quota back."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine
from sqlmodel import select

from broker.core.settings import get_settings
from broker.inventory import providers, sync
from broker.inventory.models import Server
from broker.provisioning import catalog, executor
from broker.provisioning import service as provisioning
from broker.provisioning.schemas import PolicyUpdate, ServerCreate
from broker.tenancy import auth
from broker.tenancy.models import User
from drivers.simulator import SimulatorDriver
from quotas.models import Reservation
from tests.fixtures.auth import build_estate
from tests.fixtures.inventory import register_simulator, used
from tests.fixtures.provisioning import ADMIN, Broker, give_room, offer
from tests.fixtures.quota import set_limits


class Killed(BaseException):
    pass


def killing(when: str, op: str = "create_server", **faults: Any):  # type: ignore[no-untyped-def]
    """A driver factory whose driver dies `when` ("before"/"after") its `op` call."""

    def factory(provider):  # type: ignore[no-untyped-def]
        driver = providers.driver_for(provider)
        if faults:
            driver.ex_inject(**faults)
        real = getattr(driver, op)

        def call(*args: Any, **kwargs: Any) -> Any:
            if when == "before":
                raise Killed(op)
            real(*args, **kwargs)
            raise Killed(op)

        if when:
            setattr(driver, op, call)
        return driver

    return factory


def faulty(**faults: Any):  # type: ignore[no-untyped-def]
    return killing("", **faults)


def _reservation_state(broker: Broker, job) -> str:  # type: ignore[no-untyped-def]
    with broker.db.unit_of_work(write=False) as s:
        r = s.get(Reservation, job.reservation_id)
        assert r is not None
        return r.state


def _stale() -> timedelta:
    return timedelta(seconds=get_settings().job_stale_seconds + 1)


def test_a_provider_refusal_fails_the_job_releases_the_quota_and_keeps_the_message(
    clock, broker: Broker, principal_of
) -> None:  # type: ignore[no-untyped-def]
    broker.driver_factory = faulty(fail_operations={"create_server": "quota"})
    job = broker.request(principal_of("a-member"))
    assert job.state == "failed" and job.error_type == "ProviderQuotaExceeded"
    assert "quota exceeded" in (job.error or "")
    assert _reservation_state(broker, job) == "released"
    assert used(broker.db, broker.estate, "a1") == 0
    assert broker.cloud.driver.list_servers() == []


def test_a_lost_create_answer_is_finished_from_the_server_found_by_its_tag(
    broker: Broker, principal_of
) -> None:  # type: ignore[no-untyped-def]
    broker.driver_factory = faulty(create_then_fail=5)  # every retry loses its answer too
    job = broker.request(principal_of("a-member"))
    assert job.state == "succeeded", job.error
    assert next(e for e in job.log if "note" in e)["note"].startswith("the provider's answer")
    assert len(broker.cloud.driver.list_servers()) == 1
    assert used(broker.db, broker.estate, "a1") == 1


def test_killed_after_the_provider_built_it_the_reconciler_adopts_and_commits(
    clock, broker: Broker, principal_of
) -> None:  # type: ignore[no-untyped-def]
    broker.driver_factory = killing("after")
    with pytest.raises(Killed):
        broker.request(principal_of("a-member"))
    (job,) = broker.jobs()
    assert job.state == "running" and _reservation_state(broker, job) == "reserved"
    assert executor.reconcile(broker.db)["resolved"] == 0  # not stale yet: it may be alive
    clock.shift(_stale())
    assert executor.reconcile(broker.db)["resolved"] == 1
    job = broker.job(job.id)
    assert job.state == "succeeded" and _reservation_state(broker, job) == "committed"
    with broker.db.unit_of_work(write=False) as s:
        row = s.get(Server, job.server_id)
        assert row is not None and row.tenant_id == broker.estate.tid("a1")
    assert used(broker.db, broker.estate, "a1") == 1


def test_killed_before_the_provider_was_asked_the_reconciler_releases(
    clock, broker: Broker, principal_of
) -> None:  # type: ignore[no-untyped-def]
    broker.driver_factory = killing("before")
    with pytest.raises(Killed):
        broker.request(principal_of("a-member"))
    (job,) = broker.jobs()
    clock.shift(_stale())
    executor.reconcile(broker.db)
    job = broker.job(job.id)
    assert job.state == "failed" and _reservation_state(broker, job) == "released"
    assert used(broker.db, broker.estate, "a1") == 0
    assert broker.cloud.driver.list_servers() == []


def test_an_unreachable_provider_parks_the_job_with_backoff_until_it_answers(
    clock, broker: Broker, principal_of
) -> None:  # type: ignore[no-untyped-def]
    broker.driver_factory = faulty(
        create_then_fail=5, fail_operations={"find_server_by_tag": "unavailable"}
    )
    job = broker.request(principal_of("a-member"))
    assert job.state == "running" and job.error_type == "Unavailable"
    assert _reservation_state(broker, job) == "reserved"  # the server may exist: keep holding
    clock.shift(timedelta(seconds=61))
    assert executor.reconcile(broker.db)["resolved"] == 1  # due after its backoff
    job = broker.job(job.id)
    assert job.state == "succeeded" and _reservation_state(broker, job) == "committed"


def test_a_kill_during_resize_is_resolved_from_the_servers_size(
    clock, broker: Broker, principal_of
) -> None:  # type: ignore[no-untyped-def]
    member = principal_of("a-member")
    created = broker.request(member, flavor=None, vcpu=2, memory_mb=2048)
    broker.driver_factory = killing("after", "resize")
    with pytest.raises(Killed):
        broker.act(member, created.server_id, "resize", vcpu=4, memory_mb=4096)
    assert used(broker.db, broker.estate, "a1") == 4  # 2 committed + 2 reserved
    clock.shift(_stale())
    broker.driver_factory = None
    executor.reconcile(broker.db)
    with broker.db.unit_of_work(write=False) as s:
        row = s.get(Server, created.server_id)
        assert row is not None and row.booked["vcpu"] == 4 and row.vcpu == 4
    assert used(broker.db, broker.estate, "a1") == 4


def test_an_approval_nobody_gives_expires_and_gives_the_quota_back(
    clock, broker: Broker, principal_of
) -> None:  # type: ignore[no-untyped-def]
    with broker.db.unit_of_work() as s:
        catalog.set_policy(
            s, ADMIN, broker.estate.tid("a"), PolicyUpdate(approval_vcpu=2, approval_hours=24)
        )
    job = broker.request(principal_of("a-member"), flavor=None, vcpu=4, memory_mb=4096)
    assert job.state == "pending_approval" and used(broker.db, broker.estate, "a1") == 4
    clock.shift(timedelta(hours=23))
    assert executor.reconcile(broker.db)["expired"] == 0
    clock.shift(timedelta(hours=2))
    assert executor.reconcile(broker.db)["expired"] == 1
    job = broker.job(job.id)
    assert job.state == "expired" and used(broker.db, broker.estate, "a1") == 0


def test_sync_leaves_a_server_still_being_built_to_its_job(
    clock, broker: Broker, principal_of
) -> None:  # type: ignore[no-untyped-def]
    broker.driver_factory = killing("after")
    with pytest.raises(Killed):
        broker.request(principal_of("a-member"))
    outcome = sync.sync_provider(broker.db, broker.cloud.provider_id)
    assert outcome.status == "ok" and not outcome.counts.get("adopted")
    assert used(broker.db, broker.estate, "a1") == 1  # the job's reservation only, not twice
    clock.shift(_stale())
    executor.reconcile(broker.db)
    assert used(broker.db, broker.estate, "a1") == 1
    with broker.db.unit_of_work(write=False) as s:
        rows = list(s.execute(select(Server)).scalars())
    assert len(rows) == 1 and rows[0].tenant_id == broker.estate.tid("a1")


def test_a_long_provider_call_keeps_its_job_alive_for_the_reconciler(
    committed_db, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """A job whose provider call outlasts the stale threshold keeps beating, so the reconciler
    leaves it alone; real threads on a real database."""

    db = committed_db
    with db.unit_of_work() as s:
        estate = build_estate(s)
        set_limits(s, estate)
    give_room(db, estate, "a")
    name = "slow-sim"
    opts = {"state": f"shared:{name}", "retry_max_wait": 0}
    pid = register_simulator(db, name, opts)
    offer(db, pid)
    with db.unit_of_work(write=False) as s:
        user = s.get(User, estate.uid("a-member"))
        member = auth.load_principal(s, user, method="session")
    submitted = provisioning.request_server(
        db,
        member,
        ServerCreate(
            name="slow-01", system_id=estate.tid("a1"), image="centos-7.9", flavor="s1.small"
        ),
        key=None,
    )
    monkeypatch.setattr(executor, "beat_interval", lambda: 0.05)
    release = threading.Event()
    beats: list[object] = []

    def slow_factory(provider):  # type: ignore[no-untyped-def]
        driver = providers.driver_for(provider)
        real = driver.create_server

        def create(spec):  # type: ignore[no-untyped-def]
            release.wait(10)
            return real(spec)

        driver.create_server = create  # type: ignore[method-assign]
        return driver

    worker = threading.Thread(
        target=lambda: beats.append(
            executor.run(db, submitted.claimed, driver_factory=slow_factory)
        )
    )
    try:
        with time_machine.travel(datetime.now(UTC), tick=True) as traveller:
            worker.start()
            time.sleep(0.3)
            traveller.shift(timedelta(seconds=get_settings().job_stale_seconds * 2))
            time.sleep(0.3)  # several beats at the shifted time
            assert executor.reconcile(db)["resolved"] == 0
            release.set()
            worker.join(10)
    finally:
        release.set()
        SimulatorDriver.ex_reset_shared(name)
    assert beats == ["succeeded"]
