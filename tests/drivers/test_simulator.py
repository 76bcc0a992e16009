"""Simulator-only behaviour: faults, placement, overcommit, shared state, latency, threads."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers import simulator
from drivers.base import (
    Conflict,
    Disk,
    DriverError,
    InvalidSpec,
    NotFound,
    PowerState,
    ProviderQuotaExceeded,
    ServerSpec,
    Unauthorized,
    Unavailable,
    Unsupported,
    driver_class,
    open_driver,
)
from drivers.simulator import SimulatorDriver

SMALL_HOST = {"name": "h1", "vcpu": 4, "memory_mb": 8192}
EXACT = {"vcpu": 1.0, "memory_mb": 1.0}


@pytest.fixture(autouse=True)
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every sleep (latency, timeouts, retry backoff) is recorded instead of slept."""
    slept: list[float] = []
    monkeypatch.setattr(simulator.time, "sleep", slept.append)
    return slept


@pytest.fixture
def shared_name() -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    SimulatorDriver.ex_reset_shared(name)


def make(**options: Any) -> SimulatorDriver:
    return SimulatorDriver("sim://test", {}, {"retry_max_wait": 0, **options})


def spec(**fields: Any) -> ServerSpec:
    values: dict[str, Any] = {
        "name": "vm",
        "image": "centos-7.9",
        "network": None,
        "owner_tag": "agency-a",
        "request_tag": f"req-{uuid.uuid4()}",
        "vcpu": 1,
        "memory_mb": 1024,
        **fields,
    }
    return ServerSpec(**values)


# --- registry ------------------------------------------------------------------------------------


def test_registry_opens_the_simulator() -> None:
    d = open_driver("simulator", "sim://local", {}, {})
    assert isinstance(d, SimulatorDriver) and d.kind == "simulator"
    assert driver_class("simulator") is SimulatorDriver
    d.check()


def test_unknown_state_option_is_refused() -> None:
    with pytest.raises(Unsupported):
        make(state="postgres")


def test_check_refuses_wrong_credentials() -> None:
    d = SimulatorDriver("sim://x", {"user": "a"}, {"accept_credentials": {"user": "b"}})
    with pytest.raises(Unauthorized) as caught:
        d.check()
    assert "401" in caught.value.provider_message


# --- fault injection -----------------------------------------------------------------------------


def test_nth_call_fails_with_a_provider_message() -> None:
    d = make(retries=1, fail_on_call=2)

    d.list_hosts()
    with pytest.raises(Unavailable) as caught:
        d.list_flavors()
    assert caught.value.retryable
    assert caught.value.provider_message.startswith("503")
    assert "call 2" in caught.value.message
    d.list_flavors()  # only the 2nd call fails


def test_transient_fault_is_retried(sleeps: list[float]) -> None:
    d = make(retries=3, fail_on_call=1)

    assert d.list_hosts()
    assert d.ex_calls == ["list_hosts", "list_hosts"]
    assert len(sleeps) == 1  # one backoff between the two attempts


def test_retries_zero_means_one_attempt() -> None:
    d = make(retries=0, fail_on_call=1)
    with pytest.raises(Unavailable):
        d.list_hosts()
    assert d.ex_calls == ["list_hosts"]


def test_persistent_fault_exhausts_the_retries() -> None:
    d = make(retries=3, fail_operations={"create_server": "unavailable"})

    with pytest.raises(Unavailable):
        d.create_server(spec())
    assert d.ex_calls == ["create_server"] * 3
    assert d.list_servers() == []


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("conflict", Conflict),
        ("unauthorized", Unauthorized),
        ("quota", ProviderQuotaExceeded),
        ("not_found", NotFound),
        ("unsupported", Unsupported),
    ],
)
def test_non_retryable_faults_are_not_retried(kind: str, error: type[DriverError]) -> None:
    d = make(retries=3, fail_operations={"list_images": kind})

    with pytest.raises(error) as caught:
        d.list_images()
    assert caught.value.provider_message
    assert d.ex_calls == ["list_images"]


def test_fault_limited_to_some_calls() -> None:
    d = make(retries=1, fail_operations={"get_server": {"error": "unavailable", "times": 2}})
    server = d.create_server(spec())

    for _ in range(2):
        with pytest.raises(Unavailable):
            d.get_server(server.external_id)
    assert d.get_server(server.external_id).external_id == server.external_id


def test_timeout(sleeps: list[float]) -> None:
    d = make(retries=1, timeout_on=["list_servers"], timeout_ms=30_000)

    with pytest.raises(Unavailable) as caught:
        d.list_servers()
    assert "timed out" in caught.value.message
    assert "timed out" in caught.value.provider_message
    assert sleeps == [30.0]
    d.list_hosts()  # other operations answer


def test_create_then_fail_leaves_a_server_findable_by_tag() -> None:
    d = make(retries=1, create_then_fail=True)
    s = spec()

    with pytest.raises(Unavailable):
        d.create_server(s)
    found = d.find_server_by_tag(s.request_tag)
    assert found is not None and found.owner_tag == "agency-a"
    assert [x.external_id for x in d.list_servers()] == [found.external_id]


def test_retried_create_after_a_lost_answer_does_not_duplicate() -> None:
    d = make(retries=3, create_then_fail=1)
    s = spec()

    server = d.create_server(s)
    assert d.ex_calls == ["create_server", "create_server"]
    assert [x.external_id for x in d.list_servers()] == [server.external_id]
    assert d.create_server(spec()).external_id != server.external_id  # fault was one-shot


def test_inject_and_clear_after_construction() -> None:
    d = make(retries=1)
    d.list_hosts()

    d.ex_inject(fail_on_call=2, timeout_on=["list_images"])
    d.list_hosts()
    with pytest.raises(Unavailable):
        d.list_hosts()
    with pytest.raises(Unavailable, match="timed out"):
        d.list_images()

    d.ex_inject(fail_operations={"list_images": "conflict"}, create_then_fail=True)
    d.ex_clear_faults()
    assert d.list_images()
    assert d.create_server(spec())


def test_inject_refuses_nonsense() -> None:
    d = make()
    with pytest.raises(ValueError, match="error kind"):
        d.ex_inject(fail_operations={"list_hosts": "gremlins"})
    with pytest.raises(ValueError, match="from 1"):
        d.ex_inject(fail_on_call=0)


# --- latency -------------------------------------------------------------------------------------


def test_latency_is_applied_per_call(sleeps: list[float]) -> None:
    d = make(latency_ms=25)

    d.check()
    d.list_hosts()
    d.create_server(spec())
    assert sleeps == [0.025] * 3


def test_no_latency_by_default(sleeps: list[float]) -> None:
    make().list_hosts()
    assert sleeps == []


# --- placement and capacity ----------------------------------------------------------------------


def test_placement_refused_when_hosts_are_full() -> None:
    d = make(hosts=[SMALL_HOST], overcommit=EXACT)
    d.create_server(spec(vcpu=4, memory_mb=4096))

    with pytest.raises(ProviderQuotaExceeded) as caught:
        d.create_server(spec(vcpu=1, memory_mb=1024))
    assert caught.value.provider_message == simulator.NO_VALID_HOST
    assert len(d.list_servers()) == 1


def test_placement_takes_the_first_host_with_room() -> None:
    d = make(hosts=[SMALL_HOST, {"name": "h2", "vcpu": 8, "memory_mb": 8192}], overcommit=EXACT)

    assert d.create_server(spec(vcpu=3)).host == "h1"
    assert d.create_server(spec(vcpu=3)).host == "h2"
    assert d.create_server(spec(vcpu=1)).host == "h1"
    assert d.create_server(spec(vcpu=2, host_hint="h2")).host == "h2"
    with pytest.raises(NotFound):
        d.create_server(spec(host_hint="h9"))


def test_overcommit_raises_schedulable_capacity() -> None:
    exact = make(hosts=[SMALL_HOST], overcommit=EXACT)
    doubled = make(hosts=[SMALL_HOST], overcommit={"vcpu": 2.0, "memory_mb": 1.0})

    exact.create_server(spec(vcpu=4))
    with pytest.raises(ProviderQuotaExceeded):
        exact.create_server(spec(vcpu=4))
    doubled.create_server(spec(vcpu=4))
    doubled.create_server(spec(vcpu=4))

    (host,) = doubled.list_hosts()
    assert host.capacity.total["vcpu"] == 4 and host.capacity.allocated["vcpu"] == 8
    assert host.overcommit["vcpu"] == 2.0
    assert host.extra["schedulable"]["vcpu"] == 8


def test_memory_overcommit() -> None:
    d = make(hosts=[SMALL_HOST], overcommit={"vcpu": 1.0, "memory_mb": 1.5})
    d.create_server(spec(vcpu=1, memory_mb=12288))
    with pytest.raises(ProviderQuotaExceeded):
        d.create_server(spec(vcpu=1, memory_mb=1))


def test_default_hosts() -> None:
    hosts = make().list_hosts()
    assert [h.capacity.total for h in hosts] == [{"vcpu": 64, "memory_mb": 262144}] * 2


def test_resize_beyond_the_host_is_refused() -> None:
    d = make(hosts=[SMALL_HOST], overcommit=EXACT)
    server = d.create_server(spec(vcpu=2, memory_mb=2048))

    with pytest.raises(ProviderQuotaExceeded):
        d.resize(server.external_id, vcpu=5, memory_mb=2048)
    assert d.resize(server.external_id, vcpu=4, memory_mb=8192).vcpu == 4
    assert d.get_server(server.external_id).vcpu == 4


def test_resize_allowed_when_stopped() -> None:
    d = make()
    server = d.create_server(spec())
    d.stop(server.external_id)
    assert d.resize(server.external_id, vcpu=2, memory_mb=2048).vcpu == 2


def test_storage_is_consumed_and_refused_when_full() -> None:
    d = make(storage={"ssd": 100, "hdd": 50})
    server = d.create_server(spec(disks=(Disk(30, "hdd"),)))  # + 10 GB root on ssd

    free = {p.tier: p.free_gb for p in d.list_storage()}
    assert free == {"ssd": 90, "hdd": 20}
    with pytest.raises(ProviderQuotaExceeded):
        d.create_server(spec(disks=(Disk(21, "hdd"),)))
    with pytest.raises(NotFound):
        d.create_server(spec(disks=(Disk(1, "nvme"),)))
    d.delete(server.external_id)
    assert {p.tier: p.free_gb for p in d.list_storage()} == {"ssd": 100, "hdd": 50}


def test_flavor_root_disk_and_names() -> None:
    d = make()
    server = d.create_server(spec(flavor="s1.medium", vcpu=None, memory_mb=None))
    assert (server.vcpu, server.memory_mb) == (2, 4096)
    assert server.disks[0].size_gb == 40 and server.disks[0].external_id
    assert server.extra["flavor"] == "s1.medium"


def test_bad_specs() -> None:
    d = make()
    with pytest.raises(NotFound):
        d.create_server(spec(image="no-such-image"))
    with pytest.raises(NotFound):
        d.create_server(spec(flavor="no-such-flavor"))
    with pytest.raises(NotFound):
        d.create_server(spec(network="no-such-net"))
    with pytest.raises(DriverError):
        d.create_server(spec(vcpu=None))
    assert d.list_servers() == []


# --- server behaviour ----------------------------------------------------------------------------


def test_power_conflicts() -> None:
    d = make()
    server = d.create_server(spec())
    with pytest.raises(Conflict):
        d.start(server.external_id)
    d.stop(server.external_id)
    with pytest.raises(Conflict):
        d.reboot(server.external_id)


def test_addresses_come_from_the_network_in_sequence() -> None:
    d = make(networks=[{"name": "gov", "cidr": "10.1.0.0/16"}])
    a = d.create_server(spec())
    b = d.create_server(spec(public_ip=True))

    assert a.ips == ("10.1.0.10",)
    assert b.ips == ("10.1.0.11", "203.0.113.10")
    d.delete(a.external_id)
    assert d.create_server(spec()).ips == ("10.1.0.10",)  # freed addresses are reused


def test_ids_are_uuid4() -> None:
    server = make().create_server(spec())
    assert uuid.UUID(server.external_id).version == 4


def test_tenant_scope_is_recorded_and_required() -> None:
    d = make()
    with pytest.raises(NotFound):
        d.create_server(spec(scope="govbroker/agency-a"))

    scope = d.ensure_tenant_scope("agency-a")
    assert scope == "govbroker/agency-a"
    assert d.create_server(spec(scope=scope)).extra["scope"] == scope


# --- state ---------------------------------------------------------------------------------------


def test_shared_state_is_seen_by_every_instance(shared_name: str) -> None:
    a = make(state=f"shared:{shared_name}")
    b = make(state=f"shared:{shared_name}")
    alone = make()

    server = a.create_server(spec())
    assert b.get_server(server.external_id).external_id == server.external_id
    b.stop(server.external_id)
    with pytest.raises(Conflict):
        a.stop(server.external_id)
    with pytest.raises(NotFound):
        alone.get_server(server.external_id)

    SimulatorDriver.ex_reset_shared(shared_name)
    assert make(state=f"shared:{shared_name}").list_servers() == []


def test_shared_state_keeps_faults_per_instance(shared_name: str) -> None:
    a = make(
        state=f"shared:{shared_name}", retries=1, fail_operations={"list_hosts": "unavailable"}
    )
    b = make(state=f"shared:{shared_name}", retries=1)

    with pytest.raises(Unavailable):
        a.list_hosts()
    assert b.list_hosts()


def test_memory_state_is_per_instance() -> None:
    a, b = make(), make()
    a.create_server(spec())
    assert b.list_servers() == []


# --- threads -------------------------------------------------------------------------------------


def test_concurrent_creates_are_consistent() -> None:
    d = make(hosts=[{"name": "h1", "vcpu": 16, "memory_mb": 65536}], overcommit=EXACT)
    barrier = threading.Barrier(16)
    results: list[Any] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        try:
            server: Any = d.create_server(spec(vcpu=1, memory_mb=2048))
        except DriverError as exc:
            server = exc
        with lock:
            results.append(server)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not [r for r in results if isinstance(r, Exception)]
    assert len({r.external_id for r in results}) == 16
    assert len({ip for r in results for ip in r.ips}) == 16
    (host,) = d.list_hosts()
    assert host.capacity.allocated == {"vcpu": 16, "memory_mb": 32768}
    with pytest.raises(ProviderQuotaExceeded):
        d.create_server(spec(vcpu=1))
    assert len(d.ex_calls) == 16 + 2


def test_concurrent_creates_never_overfill_a_host() -> None:
    d = make(hosts=[{"name": "h1", "vcpu": 8, "memory_mb": 65536}], overcommit=EXACT)
    barrier = threading.Barrier(16)
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        try:
            d.create_server(spec(vcpu=1, memory_mb=1024))
            outcome = "created"
        except ProviderQuotaExceeded:
            outcome = "refused"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(outcomes) == ["created"] * 8 + ["refused"] * 8
    (host,) = d.list_hosts()
    assert host.capacity.allocated["vcpu"] == 8


def test_file_state_survives_a_restart_and_inventory_ids_are_stable(tmp_path: Path) -> None:
    state = f"file:{tmp_path / 'cloud.json'}"
    first = SimulatorDriver("sim://demo", {}, {"state": state})
    image = first.list_images()[0]
    created = first.create_server(
        ServerSpec(
            name="persisted-01",
            image=image.external_id,
            network=first.list_networks()[0].external_id,
            owner_tag="fgw",
            request_tag="req-file-1",
            vcpu=2,
            memory_mb=2048,
        )
    )
    first.stop(created.external_id)
    hosts = [h.external_id for h in first.list_hosts()]
    SimulatorDriver.ex_reset_shared(state)  # as if the process had ended

    again = SimulatorDriver("sim://demo", {}, {"state": state})
    back = again.get_server(created.external_id)
    assert (back.name, back.vcpu, back.owner_tag, back.power_state) == (
        "persisted-01",
        2,
        "fgw",
        PowerState.stopped,
    )
    assert back.disks == created.disks and back.created_at == created.created_at
    assert [h.external_id for h in again.list_hosts()] == hosts
    assert again.list_images()[0].external_id == image.external_id
    again.delete(created.external_id)
    SimulatorDriver.ex_reset_shared(state)
    assert SimulatorDriver("sim://demo", {}, {"state": state}).list_servers() == []
    SimulatorDriver.ex_reset_shared(state)


# --- disks, public addresses, names --------------------------------------------------------------

NEW_OPERATIONS = ("attach_disk", "detach_disk", "add_public_ip", "release_public_ip")


def _run(d: SimulatorDriver, op: str, server_id: str, disk_id: str, ip: str) -> Any:
    if op == "attach_disk":
        return d.attach_disk(server_id, Disk(5, "hdd"))
    if op == "detach_disk":
        return d.detach_disk(server_id, disk_id)
    if op == "add_public_ip":
        return d.add_public_ip(server_id)
    return d.release_public_ip(server_id, ip)


@pytest.mark.parametrize("op", NEW_OPERATIONS)
def test_disk_and_address_operations_fail_on_injected_faults_and_change_nothing(op: str) -> None:
    d = make(retries=3)
    server = d.create_server(spec(disks=(Disk(3, "hdd"),), public_ip=True))
    disk_id, ip = server.disks[1].external_id or "", server.public_ips[0]
    d.ex_inject(fail_operations={op: "conflict"})
    calls_before = len(d.ex_calls)

    with pytest.raises(Conflict) as caught:
        _run(d, op, server.external_id, disk_id, ip)
    assert caught.value.provider_message.startswith("409")
    assert d.ex_calls[calls_before:] == [op]  # not retried
    assert d.get_server(server.external_id) == server


@pytest.mark.parametrize("op", NEW_OPERATIONS)
def test_disk_and_address_operations_are_retried_on_transient_faults(op: str) -> None:
    d = make(retries=3)
    server = d.create_server(spec(disks=(Disk(3, "hdd"),), public_ip=True))
    disk_id, ip = server.disks[1].external_id or "", server.public_ips[0]
    d.ex_inject(fail_operations={op: {"error": "unavailable", "times": 1}})
    calls_before = len(d.ex_calls)

    changed = _run(d, op, server.external_id, disk_id, ip)
    assert d.ex_calls[calls_before:] == [op, op]
    assert changed != server and d.get_server(server.external_id) == changed


def test_attach_disk_takes_room_from_the_pool_and_detach_gives_it_back() -> None:
    d = make(storage={"ssd": 100, "hdd": 50})
    server = d.create_server(spec())  # 10 GB root on ssd

    attached = d.attach_disk(server.external_id, Disk(20, "hdd"))
    root, data = attached.disks
    assert root == server.disks[0]
    assert (data.size_gb, data.tier) == (20, "hdd")
    assert data.external_id and uuid.UUID(data.external_id).version == 4
    assert {p.tier: p.free_gb for p in d.list_storage()} == {"ssd": 90, "hdd": 30}
    assert d.get_server(server.external_id).disks == attached.disks

    detached = d.detach_disk(server.external_id, data.external_id)
    assert detached.disks == (root,)
    assert {p.tier: p.free_gb for p in d.list_storage()} == {"ssd": 90, "hdd": 50}


def test_attach_disk_is_refused_when_the_pool_is_full() -> None:
    d = make(storage={"ssd": 100, "hdd": 50})
    server = d.create_server(spec(disks=(Disk(30, "hdd"),)))

    with pytest.raises(ProviderQuotaExceeded) as caught:
        d.attach_disk(server.external_id, Disk(21, "hdd"))
    assert "Insufficient disk space" in caught.value.provider_message
    assert len(d.get_server(server.external_id).disks) == 2
    assert d.attach_disk(server.external_id, Disk(20, "hdd")).disks[-1].size_gb == 20


def test_attach_disk_refuses_empty_disks_and_unknown_tiers() -> None:
    d = make()
    server = d.create_server(spec())

    with pytest.raises(InvalidSpec):
        d.attach_disk(server.external_id, Disk(0, "ssd"))
    with pytest.raises(NotFound):
        d.attach_disk(server.external_id, Disk(1, "nvme"))
    with pytest.raises(NotFound):
        d.attach_disk(str(uuid.uuid4()), Disk(1, "ssd"))
    assert d.get_server(server.external_id).disks == server.disks


def test_detaching_the_root_disk_is_refused() -> None:
    d = make()
    server = d.create_server(spec(disks=(Disk(5, "hdd"),)))

    with pytest.raises(InvalidSpec) as caught:
        d.detach_disk(server.external_id, server.disks[0].external_id or "")
    assert "root" in caught.value.provider_message
    assert d.get_server(server.external_id).disks == server.disks


def test_detaching_an_unknown_disk_is_not_found() -> None:
    d = make()
    server = d.create_server(spec())
    with pytest.raises(NotFound) as caught:
        d.detach_disk(server.external_id, str(uuid.uuid4()))
    assert caught.value.provider_message


def test_every_disk_of_a_server_without_root_disk_can_be_detached() -> None:
    d = make(images=[{"name": "pxe", "min_disk_gb": 0}])
    server = d.create_server(spec(image="pxe", disks=(Disk(5, "hdd"),)))

    (data,) = server.disks
    assert d.detach_disk(server.external_id, data.external_id or "").disks == ()


def test_public_addresses_are_added_and_released() -> None:
    d = make(networks=[{"name": "gov", "cidr": "10.1.0.0/16"}])
    server = d.create_server(spec())
    assert server.public_ips == ()

    first = d.add_public_ip(server.external_id)
    second = d.add_public_ip(server.external_id)
    assert second.ips == ("10.1.0.10", "203.0.113.10", "203.0.113.11")
    assert second.public_ips == ("203.0.113.10", "203.0.113.11")
    assert first.public_ips == ("203.0.113.10",)

    released = d.release_public_ip(server.external_id, "203.0.113.10")
    assert released.ips == ("10.1.0.10", "203.0.113.11")
    assert released.public_ips == ("203.0.113.11",)
    other = d.create_server(spec(public_ip=True))
    assert other.public_ips == ("203.0.113.10",)  # the released address went back to the pool


def test_releasing_an_address_the_server_lacks_is_not_found() -> None:
    d = make()
    server = d.create_server(spec())
    private = server.ips[0]

    with pytest.raises(NotFound):
        d.release_public_ip(server.external_id, "203.0.113.99")
    with pytest.raises(NotFound):
        d.release_public_ip(server.external_id, private)  # private addresses are not released
    assert d.get_server(server.external_id).ips == server.ips


def test_public_address_pool_exhaustion_is_a_provider_quota() -> None:
    d = make()
    server = d.create_server(spec())
    # a /24 minus the network, broadcast and the first nine host addresses
    for _ in range(254 - 9):
        d.add_public_ip(server.external_id)
    with pytest.raises(ProviderQuotaExceeded):
        d.add_public_ip(server.external_id)


def test_bandwidth_is_kept_from_the_spec_and_from_add_public_ip() -> None:
    d = make()
    limited = d.create_server(spec(public_ip=True, bandwidth_mbps=50))
    assert limited.extra["bandwidth_mbps"] == 50
    assert d.get_server(limited.external_id).extra["bandwidth_mbps"] == 50

    plain = d.create_server(spec())
    assert "bandwidth_mbps" not in plain.extra
    assert d.add_public_ip(plain.external_id).extra.get("bandwidth_mbps") is None
    assert d.add_public_ip(plain.external_id, bandwidth_mbps=20).extra["bandwidth_mbps"] == 20
    # an address added without a bandwidth leaves the one asked before
    assert d.add_public_ip(limited.external_id).extra["bandwidth_mbps"] == 50


def test_invalid_bandwidth_is_refused() -> None:
    d = make()
    with pytest.raises(InvalidSpec):
        d.create_server(spec(bandwidth_mbps=0))
    server = d.create_server(spec())
    with pytest.raises(InvalidSpec):
        d.add_public_ip(server.external_id, bandwidth_mbps=-1)
    assert d.get_server(server.external_id).ips == server.ips


def test_storage_hint_must_name_the_pool_of_the_data_disks_tier() -> None:
    d = make()
    pools = {p.tier: p for p in d.list_storage()}

    hinted = d.create_server(spec(disks=(Disk(5, "hdd"),), storage_hint=pools["hdd"].external_id))
    assert [x.tier for x in hinted.disks] == ["ssd", "hdd"]
    with pytest.raises(InvalidSpec):
        d.create_server(spec(disks=(Disk(5, "hdd"),), storage_hint=pools["ssd"].external_id))
    with pytest.raises(NotFound):
        d.create_server(spec(disks=(Disk(5, "hdd"),), storage_hint=str(uuid.uuid4())))
    assert [s.external_id for s in d.list_servers()] == [hinted.external_id]


def test_file_state_keeps_disks_public_addresses_and_bandwidth(tmp_path: Path) -> None:
    state = f"file:{tmp_path / 'cloud.json'}"
    first = make(state=state)
    server = first.create_server(spec(bandwidth_mbps=10, disks=(Disk(4, "hdd"),)))
    first.attach_disk(server.external_id, Disk(6, "hdd"))
    first.detach_disk(server.external_id, server.disks[1].external_id or "")
    first.add_public_ip(server.external_id, bandwidth_mbps=30)
    kept = first.add_public_ip(server.external_id)
    first.release_public_ip(server.external_id, kept.public_ips[0])
    before = first.get_server(server.external_id)
    SimulatorDriver.ex_reset_shared(state)  # as if the process had ended

    again = make(state=state)
    after = again.get_server(server.external_id)
    assert after == before
    assert [x.size_gb for x in after.disks] == [10, 6]
    assert len(after.public_ips) == 1 and after.extra["bandwidth_mbps"] == 30
    with pytest.raises(InvalidSpec):  # which disk is the root is kept too
        again.detach_disk(server.external_id, after.disks[0].external_id or "")
    SimulatorDriver.ex_reset_shared(state)


@pytest.mark.parametrize(
    "name",
    ["", "-web", ".web", "web 01", "web/01", "web\n", "政务云-01", "a" * 64, "web@01"],
)
def test_create_server_refuses_names_the_simulator_does_not_accept(name: str) -> None:
    d = make()
    assert SimulatorDriver.invalid_name(name)
    with pytest.raises(InvalidSpec) as caught:
        d.create_server(spec(name=name))
    assert "1 to 63 characters" in caught.value.message
    assert d.list_servers() == []


@pytest.mark.parametrize("name", ["w", "web-01", "db_02.prod", "9lives", "a" * 63])
def test_host_name_like_names_are_accepted(name: str) -> None:
    assert SimulatorDriver.invalid_name(name) is None
    assert make().create_server(spec(name=name)).name == name
