"""Every writer takes its row locks in one order — jobs, servers, quota rows (in the ledger's
global order), hosts — so that on PostgreSQL two of them never wait for each other in a circle.
Each test pauses one writer while it holds some of its locks, lets the other run into them, then
lets the first go on: both must finish (a deadlock aborts one of them). On SQLite, whose writers
take turns on the whole database, the same scenes must simply end well.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from sqlmodel import select

from broker.audit.models import AuditEvent
from broker.core import clock as broker_clock
from broker.core.authz import Principal
from broker.inventory import providers
from broker.inventory import sync as inventory_sync
from broker.inventory.models import Provider, Server
from broker.provisioning import executor, service
from broker.provisioning.schemas import ServerAction, ServerCreate
from broker.tenancy import auth
from broker.tenancy.models import User
from drivers.simulator import SimulatorDriver
from quotas import ledger
from tests.fixtures.auth import Estate, build_estate
from tests.fixtures.db import TestDatabase
from tests.fixtures.inventory import register_simulator
from tests.fixtures.provisioning import give_room, offer
from tests.fixtures.quota import set_limits

# long enough for the other writer to reach the paused one's locks and queue on them
QUEUE_S = 0.5


@dataclass
class Scene:
    db: TestDatabase
    estate: Estate
    clouds: list[str]

    def principal(self, username: str) -> Principal:
        with self.db.unit_of_work(write=False) as s:
            return auth.load_principal(s, s.get(User, self.estate.uid(username)), method="session")

    def cloud(self, **options: Any) -> str:
        name = f"lock-{uuid.uuid4().hex[:8]}"
        pid = register_simulator(
            self.db, name, {"state": f"shared:{name}", "retry_max_wait": 0, **options}
        )
        offer(self.db, pid)
        self.clouds.append(name)
        return name

    def provider_id(self, name: str) -> uuid.UUID:
        with self.db.unit_of_work(write=False) as s:
            return s.execute(select(Provider.id).where(Provider.name == name)).scalar_one()

    def listing(self, name: str) -> inventory_sync.Observed:
        """What a sync of the provider reads from it now (its step 1)."""
        with self.db.unit_of_work(write=False) as s:
            provider = s.get(Provider, self.provider_id(name))
            assert provider is not None
            s.expunge(provider)
        driver = providers.driver_for(provider)
        try:
            return inventory_sync.observe(driver)
        finally:
            driver.close()

    def apply(self, name: str, observed: inventory_sync.Observed) -> dict[str, int]:
        """Sync's step 2, for that listing."""
        with self.db.unit_of_work() as s:
            provider = s.get(Provider, self.provider_id(name))
            assert provider is not None
            return inventory_sync.apply(s, provider, observed)

    def request(self, who: str, system: str, **extra: Any) -> service.Submitted:
        data = ServerCreate(
            name=f"vm-{uuid.uuid4().hex[:6]}",
            system_id=self.estate.tid(system),
            image="centos-7.9",
            flavor="s1.small",
            **extra,
        )
        return service.request_server(self.db, self.principal(who), data, key=None)

    def built(self, claimed: executor.Claimed | None) -> executor.Outcome:
        """The job's provider call done, its outcome not yet booked (what a batch is given)."""
        assert claimed is not None
        driver = providers.driver_for(claimed.provider)
        try:
            return claimed, executor._call(driver, claimed.job, False), None
        finally:
            driver.close()


@pytest.fixture
def scene(committed_db: TestDatabase) -> Iterator[Scene]:
    with committed_db.unit_of_work() as s:
        estate = build_estate(s)
        set_limits(s, estate)
    give_room(committed_db, estate, "a", "b")
    made = Scene(committed_db, estate, [])
    yield made
    for name in made.clouds:
        SimulatorDriver.ex_reset_shared(name)


def pause_after(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, *, when: Callable[[], bool]
) -> tuple[threading.Event, threading.Event]:
    """Make owner.name stop, once, after its first call for which `when()` holds, until
    released: (paused, release)."""
    paused, release = threading.Event(), threading.Event()
    real = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        if when() and not paused.is_set():
            paused.set()
            assert release.wait(30)
        return out

    monkeypatch.setattr(owner, name, wrapper)
    return paused, release


def in_thread(fn: Callable[[], Any], results: dict[str, Any], tag: str) -> threading.Thread:
    def body() -> None:
        try:
            results[tag] = fn()
        except Exception as exc:  # what ended it is the finding
            results[tag] = exc

    t = threading.Thread(target=body, name=tag)
    t.start()
    return t


def race(
    paused: threading.Event,
    release: threading.Event,
    first: Callable[[], Any],
    second: Callable[[], Any],
) -> tuple[Any, Any]:
    """Run `first` (in a thread named "first") until it pauses holding some locks, start
    `second` into them, then let `first` go on: what each returned, or raised."""
    results: dict[str, Any] = {}
    one = in_thread(first, results, "first")
    assert paused.wait(30)
    two = in_thread(second, results, "second")
    time.sleep(QUEUE_S)
    release.set()
    one.join(60)
    two.join(60)
    return results["first"], results["second"]


def batch_failure(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What made finish_batch give up (it logs and falls back to one by one)."""
    seen: list[str] = []

    class Log:
        def info(self, _event: str, **kw: Any) -> None:
            seen.append(_event)

        warning = exception = info

    monkeypatch.setattr(executor, "log", Log())
    return seen


def test_a_batch_of_one_agencys_creates_and_a_request_with_bandwidth(
    scene: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's two reservations differ in classes (the second has bandwidth, first in the
    global order): committed one after the other, their locks came out of order, and a request
    locking bandwidth first then instances closed a circle with the batch."""
    scene.cloud()
    plain = scene.built(scene.request("a-member", "a1").claimed)
    with_ip = scene.built(
        scene.request("a-member", "a1", public_ip=True, bandwidth_mbps=10).claimed
    )
    failures = batch_failure(monkeypatch)
    paused, release = pause_after(monkeypatch, ledger, "commit", when=lambda: True)
    batch, request = race(
        paused,
        release,
        lambda: executor.finish_batch(scene.db, [plain, with_ip]),
        lambda: scene.request("a-member", "a1", public_ip=True, bandwidth_mbps=5),
    )
    assert batch == [True, True], (batch, failures)
    assert isinstance(request, service.Submitted), request


def test_a_batch_finishing_a_delete_and_sync_releasing_that_server(
    scene: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sync releases a vanished server's quota by locking the server, then the quota. A batch
    finishing that server's delete (with another agency's create) locked the quota first."""
    scene.cloud()
    first = scene.request("a-member", "a1").claimed
    assert first is not None
    assert executor.run(scene.db, first) == "succeeded"
    server_id = first.job.server_id
    with scene.db.unit_of_work() as s:
        deleting = executor.handover(s, service.delete(s, scene.principal("a-member"), server_id))
    deleted = scene.built(deleting)
    assert deleted[1] is None  # gone at the provider
    other = scene.built(scene.request("b-member", "b1").claimed)
    with scene.db.unit_of_work() as s:  # as sync's listing found it: gone, its quota still held
        row = s.get(Server, server_id)
        assert row is not None
        row.gone_at = broker_clock.now()
    failures = batch_failure(monkeypatch)
    paused, release = pause_after(monkeypatch, ledger, "lock_tenants", when=lambda: True)
    batch, released = race(
        paused,
        release,
        lambda: executor.finish_batch(scene.db, [deleted, other]),
        lambda: inventory_sync._release_one(scene.db, server_id),
    )
    assert batch == [True, True], (batch, failures)
    assert not isinstance(released, Exception), released
    with scene.db.unit_of_work(write=False) as s:
        row = s.get(Server, server_id)
        assert row is not None and not row.booked  # given back once, by whichever came first


def test_a_request_held_before_placing_and_one_placed_before_holding(
    scene: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request naming a provider holds its quota, then locks that provider's hosts; one
    naming none, with providers putting the root disk on different tiers, is reserved only once
    placed. It used to lock the hosts first, then the quota: the reverse."""
    ssd = scene.cloud()
    scene.cloud(storage={"hdd": 51200, "ssd": 10240})
    paused, release = pause_after(
        monkeypatch, service, "_hold", when=lambda: threading.current_thread().name == "first"
    )
    named, anywhere = race(
        paused,
        release,
        lambda: scene.request("a-member", "a1", provider=ssd),
        lambda: scene.request("a-member", "a1"),
    )
    assert isinstance(named, service.Submitted), named
    assert isinstance(anywhere, service.Submitted), anywhere


def test_a_batch_of_creates_and_a_sync_listing_their_servers_the_other_way_round(
    scene: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch inserts its new servers' rows in batch order. A sync listing the same servers in
    the other order inserted them too, in its order, and each waited for the other's row. Sync now
    leaves a server that a running job is building to that job."""
    name = scene.cloud()
    listed_first = scene.built(scene.request("a-member", "a1").claimed)
    listed_second = scene.built(scene.request("a-member", "a1").claimed)
    observed = scene.listing(name)
    order = [s.external_id for s in observed.servers]
    assert listed_first[1] is not None and listed_second[1] is not None
    assert order.index(listed_first[1].external_id) < order.index(listed_second[1].external_id)
    failures = batch_failure(monkeypatch)
    paused, release = pause_after(
        monkeypatch,
        executor,
        "_finish_create",
        when=lambda: threading.current_thread().name == "first",
    )
    batch, applied = race(
        paused,
        release,
        lambda: executor.finish_batch(scene.db, [listed_second, listed_first]),
        lambda: scene.apply(name, observed),
    )
    assert batch == [True, True], (batch, failures)
    assert isinstance(applied, dict), applied
    assert applied.get("servers_new", 0) == 0  # both were the jobs' to write
    with scene.db.unit_of_work(write=False) as s:
        for built in (listed_first, listed_second):
            row = s.get(Server, built[0].job.server_id)
            assert row is not None and row.booked["instances"] == 1


def test_a_resize_committed_between_syncs_read_and_its_lock_is_not_drift(
    clock: Any, scene: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sync reads the rows, then locks the ones it will write. A job that stamped its write before
    the listing began but committed after sync read the row was taken for no change at all, and
    sync wrote drift from the size the row had before the resize."""
    name = scene.cloud()
    first = scene.request("a-member", "a1").claimed
    assert first is not None and executor.run(scene.db, first) == "succeeded"
    server_id = first.job.server_id
    clock.shift(timedelta(seconds=10))
    with scene.db.unit_of_work() as s:
        action = ServerAction(action="resize", vcpu=4, memory_mb=4096)
        resizing = executor.handover(
            s, service.act(s, scene.principal("a-member"), server_id, action)
        )
    resized = scene.built(resizing)
    paused, release = pause_after(
        monkeypatch, ledger, "commit", when=lambda: threading.current_thread().name == "first"
    )
    finishing = threading.Thread(
        target=lambda: executor._finish(scene.db, resized[0], resized[1]), name="first"
    )
    finishing.start()
    assert paused.wait(30)  # the job holds the server's row, stamped before the listing
    clock.shift(timedelta(seconds=5))
    observed = scene.listing(name)  # shows 4 vCPU
    results: dict[str, Any] = {}
    syncing = in_thread(lambda: scene.apply(name, observed), results, "sync")
    time.sleep(QUEUE_S)  # sync read the row (1 vCPU booked) and waits for its lock
    release.set()
    finishing.join(60)
    syncing.join(60)
    assert isinstance(results["sync"], dict), results["sync"]
    with scene.db.unit_of_work(write=False) as s:
        row = s.get(Server, server_id)
        assert row is not None
        assert (row.vcpu, row.booked["vcpu"], row.drift) == (4, 4, None)
        drift = s.execute(select(AuditEvent).where(AuditEvent.action == "server.drift")).first()
        assert drift is None
