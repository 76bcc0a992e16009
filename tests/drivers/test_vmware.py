"""VMware-only behaviour, against the vCenter simulator: paging, incremental changes, faults,
placement, custom fields, IP pools, and a vCenter that refuses, hangs or is not there."""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import SoapAdapter, vim

from drivers.base import (
    Capability,
    Conflict,
    Disk,
    DriverError,
    InvalidSpec,
    NotFound,
    PowerState,
    ProviderQuotaExceeded,
    Server,
    ServerSpec,
    Unauthorized,
    Unavailable,
    Unsupported,
    open_driver,
)
from drivers.vmware import VM_PROPERTIES, VMwareDriver
from tests.peers.vcsim import OutOfBand, VcsimModel, VcsimPeer

pytestmark = pytest.mark.vcsim


# --- helpers -----------------------------------------------------------------------------------


class WireLog:
    """Every SOAP call the process makes, by method, with what each property retrieval was for."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self._token_kinds: dict[str, str | None] = {}

    def record(self, method: str, args: Any, result: Any) -> None:
        kind: str | None = None
        if method == "RetrievePropertiesEx":
            kinds = {p.type._wsdlName for spec in args[0] for p in spec.propSet}
            kind = kinds.pop() if len(kinds) == 1 else "mixed"
        elif method == "ContinueRetrievePropertiesEx":
            kind = self._token_kinds.pop(args[0], None)
        token = getattr(result, "token", None)
        if token:
            self._token_kinds[token] = kind
        self.calls.append((method, kind))

    def clear(self) -> None:
        self.calls.clear()

    def pages_of(self, kind: str) -> int:
        return sum(1 for method, k in self.calls if k == kind and "Retrieve" in method)


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> WireLog:
    log = WireLog()
    invoke = SoapAdapter.SoapStubAdapter.InvokeMethod

    def recording(self: Any, mo: Any, info: Any, args: Any, outerStub: Any = None) -> Any:
        result = invoke(self, mo, info, args, outerStub)
        log.record(info.wsdlName, args, result)
        return result

    monkeypatch.setattr(SoapAdapter.SoapStubAdapter, "InvokeMethod", recording)
    return log


@pytest.fixture
def driver(vcsim: VcsimPeer) -> Iterator[VMwareDriver]:
    d: VMwareDriver = vcsim.driver(retry_max_wait=0)
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def created(driver: VMwareDriver) -> Iterator[list[str]]:
    """Ids to delete after the test."""
    ids: list[str] = []
    yield ids
    for external_id in ids:
        with contextlib.suppress(NotFound):
            driver.delete(external_id)


def spec(vcsim: VcsimPeer, **fields: Any) -> ServerSpec:
    values: dict[str, Any] = {
        "name": f"t-{uuid.uuid4().hex[:8]}",
        "image": vcsim.template,
        "network": None,
        "owner_tag": "agency-a",
        "request_tag": f"req-{uuid.uuid4()}",
        "vcpu": 1,
        "memory_mb": 512,
        **fields,
    }
    return ServerSpec(**values)


def raw_custom_field(oob: OutOfBand, vm_id: str, field_name: str) -> str | None:
    """The field's current value as vCenter stores it (last value wins on the simulator)."""
    content = oob._content
    key = next(f.key for f in content.customFieldsManager.field if f.name == field_name)
    values = [v.value for v in oob._vm(vm_id).customValue if v.key == key]
    return values[-1] if values else None


@pytest.fixture
def own_peer(tmp_path: Path) -> Iterator[VcsimPeer]:
    with VcsimPeer(tmp_path, model=VcsimModel(vms=1, templates=())) as peer:
        yield peer


# --- bulk reads ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VcsimPeer]:
    model = VcsimModel(clusters=2, hosts_per_cluster=2, standalone_hosts=1, vms=9)
    with VcsimPeer(tmp_path_factory.mktemp("vcsim-big"), model=model) as peer:
        yield peer


def test_list_servers_pages_through_every_vm_in_few_calls(
    big_peer: VcsimPeer, wire: WireLog
) -> None:
    with big_peer.out_of_band() as oob:
        expected = oob.vm_ids()
    assert len(expected) == big_peer.model.vm_count == 27
    d = big_peer.driver(page_size=5)
    try:
        d.check()
        wire.clear()
        servers = d.list_servers()
        calls = list(wire.calls)
    finally:
        d.close()

    assert {s.external_id for s in servers} == expected
    # templates are VMs too and ride along in the pages, but never become servers
    vm_objects = len(expected) + len(big_peer.templates)
    assert wire.pages_of("VirtualMachine") == math.ceil(vm_objects / 5) == 6
    # besides the pages: the topology (hosts, datastores, folders, networks) and the field keys
    others = [c for c in calls if c[1] != "VirtualMachine"]
    assert all(
        method in ("RetrievePropertiesEx", "ContinueRetrievePropertiesEx", "Fetch")
        for method, _ in others
    ), others
    assert len(others) <= 10


def test_get_server_is_one_round_trip_once_the_topology_is_known(
    driver: VMwareDriver, vcsim_oob: OutOfBand, wire: WireLog
) -> None:
    some = sorted(vcsim_oob.vm_ids())[0]
    driver.get_server(some)
    wire.clear()

    server = driver.get_server(some)

    assert server.external_id == some
    assert wire.calls == [("RetrievePropertiesEx", "VirtualMachine")]


def test_servers_carry_hardware_host_and_disks_from_the_inventory(
    driver: VMwareDriver, vcsim_oob: OutOfBand
) -> None:
    vm_id = vcsim_oob.create_vm(f"oob-{uuid.uuid4().hex[:6]}", vcpu=2, memory_mb=768)
    try:
        listed = {s.external_id: s for s in driver.list_servers()}
        server = listed[vm_id]
        assert (server.vcpu, server.memory_mb) == (2, 768)
        assert server.power_state == PowerState.running
        assert server.disks == (Disk(1, "ssd", server.disks[0].external_id),)
        assert server.host in {h.name for h in driver.list_hosts()}
        assert server.owner_tag is None and server.request_tag is None
        assert server.extra["instance_uuid"]
        assert not {i.external_id for i in driver.list_images()} & set(listed)
    finally:
        vcsim_oob.destroy(vm_id)


def test_images_are_the_templates_with_their_root_disk(
    driver: VMwareDriver, vcsim: VcsimPeer
) -> None:
    images = driver.list_images()
    assert [(i.external_id, i.name, i.min_disk_gb, i.os) for i in images] == [
        (vcsim.template, "centos-7-template", 10, "linux")
    ]


def test_images_can_be_limited_to_a_template_folder(vcsim: VcsimPeer) -> None:
    in_folder = vcsim.driver(template_folder="templates")
    elsewhere = vcsim.driver(template_folder="golden-images")
    try:
        assert [i.external_id for i in in_folder.list_images()] == [vcsim.template]
        with pytest.raises(NotFound):
            elsewhere.list_images()
    finally:
        in_folder.close()
        elsewhere.close()


def test_networks_leave_out_uplinks_and_show_their_ip_pool_range(
    driver: VMwareDriver, vcsim: VcsimPeer
) -> None:
    networks = driver.list_networks()
    assert [n.name for n in networks] == ["DC0_DVPG0", "VM Network"]
    assert {(n.external_id, n.cidr) for n in networks} == {
        (network, cidr) for _, network, cidr in vcsim.ip_pools
    }


def test_hosts_count_every_vm_placed_on_them(driver: VMwareDriver) -> None:
    hosts = driver.list_hosts()
    clusters = {h.cluster for h in hosts}
    assert clusters == {"DC0_C0", None}
    assert all(h.capacity.total == {"vcpu": 2, "memory_mb": 4095} for h in hosts)
    servers = driver.list_servers()
    assert sum(h.capacity.allocated["vcpu"] for h in hosts) == sum(s.vcpu for s in servers)


def test_storage_tiers_come_from_the_mapping_or_the_name(vcsim: VcsimPeer) -> None:
    mapped = vcsim.driver(datastore_tiers={"LocalDS_1": "archive"})
    try:
        tiers = {p.name: p.tier for p in mapped.list_storage()}
    finally:
        mapped.close()
    # LocalDS_0 has no mapping and no ssd-like name
    assert tiers == {"LocalDS_0": "hdd", "LocalDS_1": "archive"}


def test_a_driver_stays_in_its_datacenter(tmp_path: Path) -> None:
    model = VcsimModel(datacenters=2, vms=1, templates=())
    with VcsimPeer(tmp_path, model=model) as peer:
        second = peer.driver(datacenter="DC1")
        try:
            names = sorted(s.name for s in second.list_servers())
            hosts = sorted(h.name for h in second.list_hosts())
            scope = second.ensure_tenant_scope("agency-dc1")
        finally:
            second.close()
        with pytest.raises(NotFound) as caught:
            peer.driver(datacenter="DC9").check()
    assert names == ["DC1_C0_RP0_VM0", "DC1_H0_VM0"]
    assert hosts == ["DC1_C0_H0", "DC1_C0_H1", "DC1_C0_H2", "DC1_H0"]
    assert scope == "DC1/vm/govbroker/agency-dc1"
    assert "DC0, DC1" in caught.value.provider_message


# --- incremental changes ------------------------------------------------------------------------


def test_incremental_changes_follow_out_of_band_edits(
    driver: VMwareDriver, vcsim_oob: OutOfBand
) -> None:
    assert Capability.incremental_sync in driver.capabilities
    first = driver.ex_server_changes()
    assert first.full and not first.removed
    assert {s.external_id for s in first.changed} == vcsim_oob.vm_ids()
    quiet = driver.ex_server_changes(first.version)
    assert (quiet.changed, quiet.removed, quiet.full) == ((), (), False)

    name = f"oob-{uuid.uuid4().hex[:6]}"
    vm_id = vcsim_oob.create_vm(name, vcpu=1, memory_mb=256)
    created = driver.ex_server_changes(quiet.version)
    assert [(s.external_id, s.name, s.vcpu, s.memory_mb) for s in created.changed] == [
        (vm_id, name, 1, 256)
    ]

    vcsim_oob.reconfigure(vm_id, vcpu=3, memory_mb=768)
    resized = driver.ex_server_changes(created.version)
    assert [(s.external_id, s.vcpu, s.memory_mb) for s in resized.changed] == [(vm_id, 3, 768)]

    vcsim_oob.power_off(vm_id)
    stopped = driver.ex_server_changes(resized.version)
    assert [(s.external_id, s.power_state) for s in stopped.changed] == [
        (vm_id, PowerState.stopped)
    ]

    vcsim_oob.move_to_folder(vm_id, "govbroker/agency-oob")
    moved = driver.ex_server_changes(stopped.version)
    assert [s.external_id for s in moved.changed] == [vm_id] and not moved.removed
    assert moved.changed[0].extra["scope"] == "DC0/vm/govbroker/agency-oob"

    vcsim_oob.destroy(vm_id)
    gone = driver.ex_server_changes(moved.version)
    assert (gone.changed, gone.removed) == ((), (vm_id,))


def test_incremental_changes_wait_for_a_change_when_asked(
    driver: VMwareDriver, vcsim_oob: OutOfBand
) -> None:
    version = driver.ex_server_changes().version
    started = time.monotonic()
    nothing = driver.ex_server_changes(version, max_wait_s=1)
    assert nothing.changed == () and time.monotonic() - started >= 0.9


def test_a_version_from_another_session_gives_a_full_listing(
    vcsim: VcsimPeer, driver: VMwareDriver, vcsim_oob: OutOfBand
) -> None:
    version = driver.ex_server_changes().version
    other = vcsim.driver()
    try:
        again = other.ex_server_changes(version)
    finally:
        other.close()
    assert again.full and {s.external_id for s in again.changed} == vcsim_oob.vm_ids()


# --- create, placement, custom fields, addresses ------------------------------------------------


def test_create_places_the_clone_in_the_tenant_folder_with_its_custom_fields(
    driver: VMwareDriver, vcsim: VcsimPeer, vcsim_oob: OutOfBand, created: list[str]
) -> None:
    code = f"agency-{uuid.uuid4().hex[:6]}"
    scope = driver.ensure_tenant_scope(code)
    assert scope == f"DC0/vm/govbroker/{code}"

    server = driver.create_server(spec(vcsim, scope=scope, owner_tag=code))
    created.append(server.external_id)

    vm = vcsim_oob._vm(server.external_id)
    assert (vm.parent.name, vm.parent.parent.name) == (code, "govbroker")
    assert server.extra["scope"] == scope
    assert raw_custom_field(vcsim_oob, server.external_id, "govbroker.tenant") == code
    assert raw_custom_field(vcsim_oob, server.external_id, "govbroker.request") == (
        server.request_tag
    )
    assert server.extra["instance_uuid"] == vm.config.instanceUuid

    assert driver.set_owner(server.external_id, "agency-b").owner_tag == "agency-b"
    assert raw_custom_field(vcsim_oob, server.external_id, "govbroker.tenant") == "agency-b"
    assert driver.set_owner(server.external_id, None).owner_tag is None
    assert raw_custom_field(vcsim_oob, server.external_id, "govbroker.tenant") == ""


def test_create_without_a_scope_goes_to_the_root_folder(
    driver: VMwareDriver, vcsim: VcsimPeer, vcsim_oob: OutOfBand, created: list[str]
) -> None:
    server = driver.create_server(spec(vcsim))
    created.append(server.external_id)
    assert vcsim_oob._vm(server.external_id).parent.name == "govbroker"
    assert "scope" not in server.extra


def test_unknown_scope_template_flavor_and_tier_are_refused(
    driver: VMwareDriver, vcsim: VcsimPeer, vcsim_oob: OutOfBand
) -> None:
    before = vcsim_oob.vm_ids()
    for bad in (
        spec(vcsim, scope="DC0/vm/govbroker/nobody"),
        spec(vcsim, image="vm-999999"),
        spec(vcsim, image=sorted(before)[0]),  # a VM, not a template
        spec(vcsim, flavor="m9.huge", vcpu=None, memory_mb=None),
        spec(vcsim, disks=(Disk(5, "nvme-gold"),)),
    ):
        with pytest.raises(NotFound) as caught:
            driver.create_server(bad)
        assert caught.value.provider_message
    with pytest.raises(InvalidSpec):
        driver.create_server(spec(vcsim, vcpu=None))
    with pytest.raises(InvalidSpec):
        driver.create_server(spec(vcsim, disks=(Disk(0, "hdd"),)))
    assert vcsim_oob.vm_ids() == before


def test_create_twice_with_one_request_tag_makes_one_vm(
    driver: VMwareDriver, vcsim: VcsimPeer, vcsim_oob: OutOfBand, created: list[str]
) -> None:
    before = vcsim_oob.vm_ids()
    request = spec(vcsim)
    first = driver.create_server(request)
    created.append(first.external_id)
    again = driver.create_server(request)
    assert again.external_id == first.external_id
    assert vcsim_oob.vm_ids() == before | {first.external_id}


def test_an_interrupted_create_is_finished_by_the_retry(
    vcsim: VcsimPeer,
    vcsim_oob: OutOfBand,
    monkeypatch: pytest.MonkeyPatch,
    created: list[str],
) -> None:
    request = spec(vcsim, vcpu=2, memory_mb=1024)
    crashing = vcsim.driver(retry_max_wait=0, retries=1)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise Unavailable("connection lost after the clone", provider_message="reset by peer")

    monkeypatch.setattr(crashing, "_finish", crash)
    with pytest.raises(Unavailable):
        crashing.create_server(request)
    crashing.close()

    half = vcsim.driver(retry_max_wait=0)
    try:
        found = half.find_server_by_tag(request.request_tag)
        assert found is not None and found.power_state == PowerState.stopped
        created.append(found.external_id)

        finished = half.create_server(request)
    finally:
        half.close()
    assert finished.external_id == found.external_id
    assert finished.power_state == PowerState.running
    assert (finished.vcpu, finished.memory_mb, finished.request_tag) == (
        2,
        1024,
        request.request_tag,
    )
    assert finished.ips


def test_data_disks_land_on_a_datastore_of_their_tier(
    driver: VMwareDriver, vcsim: VcsimPeer, vcsim_oob: OutOfBand, created: list[str]
) -> None:
    server = driver.create_server(spec(vcsim, disks=(Disk(3, "hdd"), Disk(2, "ssd"))))
    created.append(server.external_id)

    assert [(d.size_gb, d.tier) for d in server.disks] == [(10, "ssd"), (3, "hdd"), (2, "ssd")]
    files = [
        d.backing.fileName
        for d in vcsim_oob._vm(server.external_id).config.hardware.device
        if isinstance(d, vim.vm.device.VirtualDisk)
    ]
    assert sorted(f.split("]")[0] for f in files) == ["[LocalDS_0", "[LocalDS_0", "[LocalDS_1"]


def test_root_disks_go_to_the_root_tier_when_one_is_set(
    vcsim: VcsimPeer, vcsim_oob: OutOfBand, created: list[str]
) -> None:
    d = vcsim.driver(retry_max_wait=0, root_tier="hdd")
    try:
        server = d.create_server(spec(vcsim))
        created.append(server.external_id)
        with pytest.raises(NotFound):
            d.create_server(spec(vcsim, host_hint="no-such-host"))
    finally:
        d.close()
    assert server.disks[0].tier == "hdd"
    assert vcsim_oob._vm(server.external_id).config.files.vmPathName.startswith("[LocalDS_1]")


def test_addresses_come_from_the_network_pool_and_return_to_it(
    driver: VMwareDriver, vcsim: VcsimPeer, created: list[str]
) -> None:
    network = next(n for n in driver.list_networks() if n.name == "VM Network")
    assert network.cidr is not None
    subnet = ipaddress.ip_network(network.cidr)

    a = driver.create_server(spec(vcsim, network=network.external_id))
    b = driver.create_server(spec(vcsim, network=network.external_id))
    created.extend([a.external_id, b.external_id])
    assert len(a.ips) == len(b.ips) == 1 and a.ips != b.ips
    assert all(ipaddress.ip_address(ip) in subnet for ip in a.ips + b.ips)

    driver.delete(b.external_id)
    c = driver.create_server(spec(vcsim, network=network.external_id))
    created.append(c.external_id)
    assert c.ips == b.ips  # released on delete, so the pool hands it out again


# --- power, size, faults ------------------------------------------------------------------------


@pytest.fixture
def running(driver: VMwareDriver, vcsim: VcsimPeer, created: list[str]) -> Server:
    server = driver.create_server(spec(vcsim, vcpu=1, memory_mb=1024))
    created.append(server.external_id)
    return server


def test_power_faults_are_conflicts_with_the_vcenter_message(
    driver: VMwareDriver, running: Server
) -> None:
    with pytest.raises(Conflict) as caught:
        driver.start(running.external_id)
    assert "InvalidPowerState" in caught.value.provider_message
    assert "existingState=poweredOn" in caught.value.provider_message

    driver.stop(running.external_id)
    with pytest.raises(Conflict):
        driver.reboot(running.external_id)


def test_resizing_a_running_vm_needs_it_powered_off(driver: VMwareDriver, running: Server) -> None:
    assert Capability.resize_live not in driver.capabilities
    with pytest.raises(Conflict) as caught:
        driver.resize(running.external_id, vcpu=2, memory_mb=2048)
    assert "hot add" in caught.value.provider_message
    assert driver.get_server(running.external_id).vcpu == 1

    driver.stop(running.external_id)
    resized = driver.resize(running.external_id, vcpu=2, memory_mb=2048)
    assert (resized.vcpu, resized.memory_mb) == (2, 2048)


def test_unknown_ids_keep_the_vcenter_message(driver: VMwareDriver) -> None:
    with pytest.raises(NotFound) as caught:
        driver.get_server("vm-424242")
    assert "ManagedObjectNotFound" in caught.value.provider_message


def test_templates_are_not_servers(driver: VMwareDriver, vcsim: VcsimPeer) -> None:
    with pytest.raises(NotFound):
        driver.get_server(vcsim.template)
    with pytest.raises(NotFound):
        driver.delete(vcsim.template)


def test_the_registry_opens_the_vmware_driver(vcsim: VcsimPeer) -> None:
    d = open_driver("vmware", vcsim.endpoint, vcsim.credentials, {"retry_max_wait": 0})
    try:
        assert isinstance(d, VMwareDriver)
        d.check()
    finally:
        d.close()


# --- a vCenter that refuses, hangs or is not there ----------------------------------------------


def test_wrong_credentials_are_unauthorized(tmp_path: Path) -> None:
    model = VcsimModel(vms=1, templates=())
    with VcsimPeer(tmp_path, model=model, username="govbroker", password="s3cret") as peer:
        assert peer.credentials == {"username": "govbroker", "password": "s3cret"}
        wrong = peer.driver(credentials={"username": "govbroker", "password": "guess"})
        with pytest.raises(Unauthorized) as caught:
            wrong.check()
        assert "InvalidLogin" in caught.value.provider_message

        right = peer.driver(retry_max_wait=0)
        try:
            right.check()
        finally:
            right.close()


def test_tls_is_verified_unless_told_not_to(tmp_path: Path) -> None:
    with VcsimPeer(tmp_path, model=VcsimModel(vms=1, templates=()), tls=True) as peer:
        assert peer.endpoint.startswith("https://")
        trusting = peer.driver(retry_max_wait=0, verify_tls=False)
        try:
            trusting.check()
        finally:
            trusting.close()
        verifying = peer.driver(retry_max_wait=0, verify_tls=True)
        with pytest.raises(DriverError) as caught:
            verifying.check()
        assert not isinstance(caught.value, Unavailable)  # retrying cannot fix a certificate
        assert "certificate" in caught.value.provider_message.lower()


def test_a_hung_vcenter_is_unavailable_within_the_timeout(own_peer: VcsimPeer) -> None:
    connected = own_peer.driver(retry_max_wait=0, timeout_s=1, retries=2)
    connected.check()
    own_peer.pause()
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            connected.list_servers()
        assert time.monotonic() - started < 2 * 1 + 1.5
        assert "timed out" in caught.value.provider_message

        fresh = own_peer.driver(retry_max_wait=0, timeout_s=1, retries=1)
        started = time.monotonic()
        with pytest.raises(Unavailable):
            fresh.check()  # stuck in the API version handshake, before any login
        assert time.monotonic() - started < 1 + 1.5
    finally:
        own_peer.resume()
    assert connected.list_servers()  # the session survives the hang
    connected.close()


def test_nothing_listening_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nobody listens there
    d = VMwareDriver(
        f"http://127.0.0.1:{port}/sdk",
        {"username": "u", "password": "p"},
        {
            "retry_max_wait": 0,
            "retries": 2,
        },
    )
    with pytest.raises(Unavailable) as caught:
        d.check()
    assert "refused" in caught.value.provider_message.lower()


# --- the peer itself ----------------------------------------------------------------------------


def test_the_peer_stops_by_pid_and_removes_its_datastores(tmp_path: Path) -> None:
    peer = VcsimPeer(tmp_path, model=VcsimModel(vms=1, templates=("t1", "t2"))).start()
    pid = peer.pid
    assert set(peer.templates) == {"t1", "t2"} and peer.vm_count == 2
    assert list((tmp_path / "tmp").glob("govcsim-*"))
    peer.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not list((tmp_path / "tmp").glob("govcsim-*"))


def test_a_raw_pass_sees_the_same_vms_as_a_full_sync(
    driver: VMwareDriver, vcsim_oob: OutOfBand
) -> None:
    templates = len(driver.list_images())
    raw = vcsim_oob.retrieve_vms(VM_PROPERTIES, page_size=3)
    assert raw == len(driver.list_servers()) + templates


# --- data disks, names, addresses ----------------------------------------------------------------


def disk_files(oob: OutOfBand, vm_id: str) -> list[str]:
    return [
        d.backing.fileName
        for d in oob._vm(vm_id).config.hardware.device
        if isinstance(d, vim.vm.device.VirtualDisk)
    ]


def test_a_disk_is_attached_to_a_running_vm_on_its_tier_and_destroyed_on_detach(
    driver: VMwareDriver, running: Server, vcsim_oob: OutOfBand
) -> None:
    attached = driver.attach_disk(running.external_id, Disk(4, "hdd"))

    assert attached.power_state == PowerState.running
    assert attached.disks[: len(running.disks)] == running.disks
    new = attached.disks[-1]
    assert (new.size_gb, new.tier) == (4, "hdd") and new.external_id
    files = disk_files(vcsim_oob, running.external_id)
    assert len(files) == len(running.disks) + 1
    assert sum(f.startswith("[LocalDS_1]") for f in files) == 1  # hdd is LocalDS_1

    detached = driver.detach_disk(running.external_id, new.external_id)
    assert detached.disks == running.disks
    assert len(disk_files(vcsim_oob, running.external_id)) == len(running.disks)


def test_the_boot_disk_and_unknown_disks_cannot_be_detached(
    driver: VMwareDriver, running: Server
) -> None:
    with pytest.raises(InvalidSpec):
        driver.detach_disk(running.external_id, running.disks[0].external_id or "")
    with pytest.raises(NotFound) as caught:
        driver.detach_disk(running.external_id, "[LocalDS_1] nothing/nothing.vmdk")
    assert caught.value.provider_message
    assert driver.get_server(running.external_id).disks == running.disks


def test_attach_refuses_empty_disks_unknown_tiers_and_full_datastores(
    driver: VMwareDriver, running: Server
) -> None:
    hdd_free = next(p.free_gb for p in driver.list_storage() if p.tier == "hdd")
    with pytest.raises(InvalidSpec):
        driver.attach_disk(running.external_id, Disk(0, "hdd"))
    with pytest.raises(NotFound):
        driver.attach_disk(running.external_id, Disk(1, "nvme"))
    with pytest.raises(ProviderQuotaExceeded):
        driver.attach_disk(running.external_id, Disk(hdd_free + 1, "hdd"))
    with pytest.raises(NotFound):
        driver.attach_disk("vm-999999", Disk(1, "hdd"))
    assert driver.get_server(running.external_id).disks == running.disks


@pytest.mark.parametrize("name", ["50%-off", "web/01", "web\\01", "x" * 81, "web\n"])
def test_names_vsphere_would_escape_or_cut_are_refused(
    driver: VMwareDriver, vcsim: VcsimPeer, name: str
) -> None:
    assert VMwareDriver.invalid_name(name)
    with pytest.raises(InvalidSpec):
        driver.create_server(spec(vcsim, name=name))


def test_eighty_characters_and_chinese_names_are_accepted(
    driver: VMwareDriver, vcsim: VcsimPeer, created: list[str]
) -> None:
    assert VMwareDriver.invalid_name("x" * 80) is None
    server = driver.create_server(spec(vcsim, name="政务云 门户-01"))
    created.append(server.external_id)
    assert server.name == "政务云 门户-01"


def test_vcenter_has_no_public_addresses(driver: VMwareDriver, running: Server) -> None:
    assert Capability.floating_ip not in driver.capabilities
    with pytest.raises(Unsupported):
        driver.add_public_ip(running.external_id)
