"""The driver contract: the same behaviour asked of every hypervisor driver.

Each test speaks only the Driver interface. A driver joins the suite with one entry in `TARGETS`
(the pytest marks that gate it) and a fixture `contract_<kind>` that yields a connected Driver.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from drivers.base import (
    Capability,
    Conflict,
    Disk,
    Driver,
    Flavor,
    Host,
    Image,
    Network,
    NotFound,
    PowerState,
    Server,
    ServerSpec,
    StoragePool,
    Unsupported,
    open_driver,
)

# kind → the marks that gate it. Each driver's fixture `contract_<kind>` (in tests/peers/ for the
# real peers) yields a fresh Driver connected to its peer; the tests below never name a driver.
TARGETS: dict[str, tuple[pytest.MarkDecorator, ...]] = {
    "simulator": (),
    "libvirt": (pytest.mark.libvirt,),
    "vmware": (pytest.mark.vcsim,),
    "openstack": (pytest.mark.openstack,),
}


@pytest.fixture
def contract_simulator() -> Iterator[Driver]:
    d = open_driver("simulator", "sim://contract", {}, {"retry_max_wait": 0})
    try:
        yield d
    finally:
        d.close()


@pytest.fixture(
    params=[pytest.param(kind, marks=marks, id=kind) for kind, marks in TARGETS.items()]
)
def driver(request: pytest.FixtureRequest) -> Driver:
    d: Driver = request.getfixturevalue(f"contract_{request.param}")
    return d


Spawn = Callable[..., Server]


@pytest.fixture
def spawn(driver: Driver) -> Iterator[Spawn]:
    """Create a server from spec fields (defaults from the inventory) and delete it afterwards."""
    created: list[str] = []
    image = min(driver.list_images(), key=lambda i: i.min_disk_gb)
    network = driver.list_networks()[0]

    def make(**fields: Any) -> Server:
        spec: dict[str, Any] = {
            "name": f"contract-{uuid.uuid4().hex[:8]}",
            "image": image.external_id,
            "network": network.external_id,
            "owner_tag": "agency-a/system-1",
            "request_tag": f"req-{uuid.uuid4()}",
            **fields,
        }
        server = driver.create_server(ServerSpec(**spec))
        created.append(server.external_id)
        return server

    yield make
    for external_id in created:
        with contextlib.suppress(NotFound):
            driver.delete(external_id)


def smallest_flavor(driver: Driver) -> Flavor:
    return min(driver.list_flavors(), key=lambda f: (f.vcpu, f.memory_mb))


def allocated(driver: Driver, resource_class: str) -> int:
    return sum(h.capacity.allocated.get(resource_class, 0) for h in driver.list_hosts())


def test_check_passes(driver: Driver) -> None:
    driver.check()


@pytest.mark.parametrize(
    ("method", "item_type"),
    [
        ("list_hosts", Host),
        ("list_storage", StoragePool),
        ("list_networks", Network),
        ("list_flavors", Flavor),
        ("list_images", Image),
    ],
)
def test_inventory_is_listed_and_typed(driver: Driver, method: str, item_type: type) -> None:
    items = getattr(driver, method)()
    assert items and all(isinstance(i, item_type) for i in items)
    ids = [i.external_id for i in items]
    assert all(isinstance(i, str) and i for i in ids) and len(set(ids)) == len(ids)


def test_hosts_report_capacity_per_class(driver: Driver) -> None:
    for host in driver.list_hosts():
        assert host.capacity.total["vcpu"] > 0 and host.capacity.total["memory_mb"] > 0
        assert host.capacity.allocated.keys() >= {"vcpu", "memory_mb"}


def test_storage_reports_capacity_and_free(driver: Driver) -> None:
    for pool in driver.list_storage():
        assert pool.tier and 0 <= pool.free_gb <= pool.capacity_gb


def test_create_from_flavor_is_visible_with_its_tags(driver: Driver, spawn: Spawn) -> None:
    flavor = smallest_flavor(driver)
    created = spawn(flavor=flavor.external_id, request_tag="req-flavor-" + uuid.uuid4().hex)

    assert (created.vcpu, created.memory_mb) == (flavor.vcpu, flavor.memory_mb)
    assert created.power_state == PowerState.running
    assert created.owner_tag == "agency-a/system-1"
    assert created.created_at is not None
    assert created.created_at.utcoffset() == timedelta(0)
    assert created.ips
    fetched = driver.get_server(created.external_id)
    assert (fetched.external_id, fetched.owner_tag, fetched.request_tag) == (
        created.external_id,
        created.owner_tag,
        created.request_tag,
    )
    listed = {s.external_id: s for s in driver.list_servers()}
    assert listed[created.external_id].request_tag == created.request_tag


def test_create_custom_size_with_a_data_disk(driver: Driver, spawn: Spawn) -> None:
    tier = driver.list_storage()[0].tier
    created = spawn(vcpu=1, memory_mb=1024, disks=(Disk(size_gb=7, tier=tier),))

    assert (created.vcpu, created.memory_mb) == (1, 1024)
    assert any(d.size_gb == 7 and d.tier == tier for d in created.disks)
    fetched = driver.get_server(created.external_id)
    assert any(d.size_gb == 7 and d.tier == tier for d in fetched.disks)


def test_two_creates_get_distinct_ids_and_addresses(driver: Driver, spawn: Spawn) -> None:
    a, b = spawn(vcpu=1, memory_mb=512), spawn(vcpu=1, memory_mb=512)
    assert a.external_id != b.external_id
    assert not set(a.ips) & set(b.ips)


def test_find_server_by_tag(driver: Driver, spawn: Spawn) -> None:
    tag = f"req-find-{uuid.uuid4()}"
    created = spawn(vcpu=1, memory_mb=512, request_tag=tag)

    found = driver.find_server_by_tag(tag)
    assert found is not None and found.external_id == created.external_id
    assert driver.find_server_by_tag(f"req-nobody-{uuid.uuid4()}") is None


def test_power_cycle(driver: Driver, spawn: Spawn) -> None:
    server = spawn(vcpu=1, memory_mb=512)

    assert driver.stop(server.external_id).power_state == PowerState.stopped
    assert driver.get_server(server.external_id).power_state == PowerState.stopped
    with pytest.raises(Conflict):
        driver.stop(server.external_id)
    assert driver.start(server.external_id).power_state == PowerState.running
    assert driver.reboot(server.external_id).power_state == PowerState.running
    assert driver.get_server(server.external_id).power_state == PowerState.running


def test_resize_up_and_down(driver: Driver, spawn: Spawn) -> None:
    server = spawn(vcpu=1, memory_mb=1024)
    if Capability.resize_live not in driver.capabilities:
        driver.stop(server.external_id)

    bigger = driver.resize(server.external_id, vcpu=2, memory_mb=2048)
    assert (bigger.vcpu, bigger.memory_mb) == (2, 2048)
    smaller = driver.resize(server.external_id, vcpu=1, memory_mb=512)
    assert (smaller.vcpu, smaller.memory_mb) == (1, 512)
    fetched = driver.get_server(server.external_id)
    assert (fetched.vcpu, fetched.memory_mb) == (1, 512)


def test_set_owner(driver: Driver, spawn: Spawn) -> None:
    server = spawn(vcpu=1, memory_mb=512)

    assert driver.set_owner(server.external_id, "agency-b").owner_tag == "agency-b"
    assert driver.get_server(server.external_id).owner_tag == "agency-b"
    assert driver.set_owner(server.external_id, None).owner_tag is None


def test_delete_removes_it(driver: Driver, spawn: Spawn) -> None:
    server = spawn(vcpu=1, memory_mb=512)

    driver.delete(server.external_id)
    with pytest.raises(NotFound):
        driver.get_server(server.external_id)
    assert server.external_id not in {s.external_id for s in driver.list_servers()}
    assert driver.find_server_by_tag(server.request_tag or "") is None
    with pytest.raises(NotFound):
        driver.delete(server.external_id)


@pytest.mark.parametrize(
    "operation",
    [
        pytest.param(lambda d, i: d.get_server(i), id="get_server"),
        pytest.param(lambda d, i: d.start(i), id="start"),
        pytest.param(lambda d, i: d.stop(i), id="stop"),
        pytest.param(lambda d, i: d.reboot(i), id="reboot"),
        pytest.param(lambda d, i: d.resize(i, vcpu=1, memory_mb=512), id="resize"),
        pytest.param(lambda d, i: d.set_owner(i, "x"), id="set_owner"),
        pytest.param(lambda d, i: d.delete(i), id="delete"),
    ],
)
def test_unknown_id_is_not_found(driver: Driver, operation: Callable[[Driver, str], Any]) -> None:
    with pytest.raises(NotFound) as caught:
        operation(driver, str(uuid.uuid4()))
    assert caught.value.provider_message


def test_allocated_capacity_follows_create_and_delete(driver: Driver, spawn: Spawn) -> None:
    before_vcpu, before_mem = allocated(driver, "vcpu"), allocated(driver, "memory_mb")

    server = spawn(vcpu=2, memory_mb=2048)
    assert allocated(driver, "vcpu") == before_vcpu + 2
    assert allocated(driver, "memory_mb") == before_mem + 2048

    driver.delete(server.external_id)
    assert allocated(driver, "vcpu") == before_vcpu
    assert allocated(driver, "memory_mb") == before_mem


def test_ensure_tenant_scope_is_idempotent(driver: Driver) -> None:
    code = f"agency-{uuid.uuid4().hex[:6]}"
    first = driver.ensure_tenant_scope(code)
    assert driver.ensure_tenant_scope(code) == first
    if first is not None:
        assert code in first


def free_gb(driver: Driver, tier: str) -> int:
    return sum(p.free_gb for p in driver.list_storage() if p.tier == tier)


def test_attach_then_detach_a_data_disk(driver: Driver, spawn: Spawn) -> None:
    if Capability.volumes not in driver.capabilities:
        pytest.skip(f"{driver.kind} cannot attach disks")
    tier = max(driver.list_storage(), key=lambda p: p.free_gb).tier
    server = spawn(vcpu=1, memory_mb=512)
    # stopped: every peer can change a stopped server's disks, while libvirt's test driver
    # cannot hot-plug (running servers are covered by each driver's own tests)
    driver.stop(server.external_id)
    free_before = free_gb(driver, tier)
    had = [d.external_id for d in server.disks]

    attached = driver.attach_disk(server.external_id, Disk(size_gb=2, tier=tier))
    new = attached.disks[-1]
    assert [d.external_id for d in attached.disks[:-1]] == had
    assert (new.size_gb, new.tier) == (2, tier) and new.external_id
    fetched = driver.get_server(server.external_id)
    assert new.external_id in {d.external_id for d in fetched.disks}
    assert free_gb(driver, tier) == free_before - 2

    detached = driver.detach_disk(server.external_id, new.external_id)
    assert [d.external_id for d in detached.disks] == had
    assert [d.external_id for d in driver.get_server(server.external_id).disks] == had
    assert free_gb(driver, tier) == free_before
    with pytest.raises(NotFound):
        driver.detach_disk(server.external_id, new.external_id)


def test_add_then_release_a_public_ip(driver: Driver, spawn: Spawn) -> None:
    if Capability.floating_ip not in driver.capabilities:
        pytest.skip(f"{driver.kind} has no public addresses")
    server = spawn(vcpu=1, memory_mb=512)
    assert not set(server.public_ips)

    added = driver.add_public_ip(server.external_id)
    (ip,) = set(added.public_ips) - set(server.public_ips)
    assert ip in added.ips
    fetched = driver.get_server(server.external_id)
    assert ip in fetched.ips and ip in fetched.public_ips

    released = driver.release_public_ip(server.external_id, ip)
    assert ip not in released.ips and ip not in released.public_ips
    fetched = driver.get_server(server.external_id)
    assert ip not in fetched.ips and ip not in fetched.public_ips
    with pytest.raises(NotFound):
        driver.release_public_ip(server.external_id, ip)


def test_missing_capabilities_are_refused_as_unsupported(driver: Driver, spawn: Spawn) -> None:
    missing = {Capability.volumes, Capability.floating_ip} - driver.capabilities
    if not missing:
        pytest.skip(f"{driver.kind} attaches disks and adds public addresses")
    server = spawn(vcpu=1, memory_mb=512)
    if Capability.volumes in missing:
        with pytest.raises(Unsupported):
            driver.attach_disk(server.external_id, Disk(size_gb=1, tier="any"))
    if Capability.floating_ip in missing:
        with pytest.raises(Unsupported):
            driver.add_public_ip(server.external_id)


@pytest.mark.parametrize("name", ["", "web\x00db", "x" * 300])
def test_invalid_name_explains_a_clearly_bad_name(driver: Driver, name: str) -> None:
    why = driver.invalid_name(name)
    assert why and isinstance(why, str)


def test_invalid_name_accepts_a_plain_host_name(driver: Driver) -> None:
    assert driver.invalid_name("web-01") is None
    assert type(driver).invalid_name("app-server-02") is None
