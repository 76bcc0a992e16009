"""libvirt-only behaviour, against libvirt's test driver loaded with the project's two host files.

Metadata in govbroker's XML namespace, the preloaded managed and unmanaged domains, bulk listing,
placement across hosts, addresses held as DHCP reservations, live resize limits and the
translation of libvirt's errors into the DriverError hierarchy.
"""

from __future__ import annotations

import socket
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import libvirt
import pytest

from drivers.base import (
    Capability,
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
)
from drivers.libvirt import NS, LibvirtDriver, translate_error
from tests.peers.libvirt import MakeLibvirtDriver, libvirt_host_uri

pytestmark = pytest.mark.libvirt

HOST_A, HOST_B = "libvirt-host-a", "libvirt-host-b"
# the preloaded domains of tests/peers/data/libvirt-host-*.xml
OA_01 = "6c0e6b3a-0d4f-4f43-9b1e-2f5f7d9c0a01"
DB_01 = "6c0e6b3a-0d4f-4f43-9b1e-2f5f7d9c0a02"
LEGACY_ERP = "6c0e6b3a-0d4f-4f43-9b1e-2f5f7d9c0a03"
LEGACY_BACKUP = "6c0e6b3a-0d4f-4f43-9b1e-2f5f7d9c0a04"
WEB_02 = "7d1f7c4b-1e5a-4a54-8c2f-3a6a8e0d1b01"
SCRATCH = "7d1f7c4b-1e5a-4a54-8c2f-3a6a8e0d1b02"


@pytest.fixture
def driver(make_libvirt_driver: MakeLibvirtDriver) -> LibvirtDriver:
    return make_libvirt_driver()


def spec(**fields: Any) -> ServerSpec:
    values: dict[str, Any] = {
        "name": "web-01",
        "image": "uos-server-20",
        "network": "govnet",
        "owner_tag": "agency-a/system-1",
        "request_tag": f"req-{uuid.uuid4()}",
        "vcpu": 1,
        "memory_mb": 1024,
        **fields,
    }
    return ServerSpec(**values)


def govbroker_metadata(xml: str) -> ET.Element | None:
    return ET.fromstring(xml).find(f"metadata/{{{NS}}}instance")  # noqa: S314 - our own XML


def metadata_fields(xml: str) -> dict[str, str]:
    element = govbroker_metadata(xml)
    assert element is not None
    return {child.tag.removeprefix(f"{{{NS}}}"): child.text or "" for child in element}


def mac_of(driver: LibvirtDriver, external_id: str) -> str:
    mac = ET.fromstring(driver.ex_domain_xml(external_id)).find("devices/interface/mac")  # noqa: S314
    assert mac is not None
    return mac.get("address", "")


def dhcp_hosts(driver: LibvirtDriver, host: str) -> dict[str, str]:
    root = ET.fromstring(driver.ex_network_xml("govnet", host))  # noqa: S314
    return {h.get("mac", ""): h.get("ip", "") for h in root.iterfind("ip/dhcp/host")}


def libvirt_error(code: int, source: int, message: str) -> libvirt.libvirtError:
    """A libvirtError as the bindings raise it, for failures the test driver cannot produce."""
    error = libvirt.libvirtError(message)
    error.err = (code, source, message, libvirt.VIR_ERR_ERROR, None, None, None, -1, -1)
    return error


def free_memory(driver: LibvirtDriver) -> dict[str, int]:
    return {
        h.name: h.capacity.total["memory_mb"] - h.capacity.allocated["memory_mb"]
        for h in driver.list_hosts()
    }


# --- metadata ------------------------------------------------------------------------------------


def test_created_domain_carries_owner_and_request_in_govbroker_namespace(
    driver: LibvirtDriver,
) -> None:
    tag = f"req-{uuid.uuid4()}"
    server = driver.create_server(spec(owner_tag="agency-gaj/oa", request_tag=tag))

    assert NS == "urn:govbroker:libvirt:1"
    for xml in (
        driver.ex_domain_xml(server.external_id),
        driver.ex_domain_xml(server.external_id, inactive=True),
    ):
        fields = metadata_fields(xml)
        assert fields["owner"] == "agency-gaj/oa"
        assert fields["request"] == tag
        assert datetime.fromisoformat(fields["created"]) == server.created_at
        # nothing of ours outside the namespace
        assert ET.fromstring(xml).find("metadata/instance") is None  # noqa: S314
    assert server.created_at is not None and server.created_at.tzinfo == UTC


def test_set_owner_rewrites_the_metadata_and_none_removes_only_the_owner(
    driver: LibvirtDriver,
) -> None:
    server = driver.create_server(spec())

    driver.set_owner(server.external_id, "agency-b")
    fields = metadata_fields(driver.ex_domain_xml(server.external_id, inactive=True))
    assert (fields["owner"], fields["request"]) == ("agency-b", server.request_tag)

    assert driver.set_owner(server.external_id, None).owner_tag is None
    fields = metadata_fields(driver.ex_domain_xml(server.external_id))
    assert "owner" not in fields and fields["request"] == server.request_tag
    found = driver.find_server_by_tag(server.request_tag or "")
    assert found is not None and found.external_id == server.external_id


def test_set_owner_adopts_an_unmanaged_domain_and_none_drops_the_element(
    driver: LibvirtDriver,
) -> None:
    assert govbroker_metadata(driver.ex_domain_xml(LEGACY_ERP)) is None

    adopted = driver.set_owner(LEGACY_ERP, "agency-sjj/erp")
    assert (adopted.owner_tag, adopted.request_tag) == ("agency-sjj/erp", None)
    assert metadata_fields(driver.ex_domain_xml(LEGACY_ERP, inactive=True)) == {
        "owner": "agency-sjj/erp"
    }

    assert driver.set_owner(LEGACY_ERP, None).owner_tag is None
    assert govbroker_metadata(driver.ex_domain_xml(LEGACY_ERP)) is None


def test_set_owner_on_a_stopped_domain_writes_its_definition(driver: LibvirtDriver) -> None:
    assert driver.set_owner(DB_01, "agency-x").owner_tag == "agency-x"
    assert metadata_fields(driver.ex_domain_xml(DB_01, inactive=True))["owner"] == "agency-x"
    assert driver.get_server(DB_01).power_state == PowerState.stopped


# --- the preloaded hosts -------------------------------------------------------------------------


def test_preloaded_domains_are_listed_with_their_owners(driver: LibvirtDriver) -> None:
    servers = {s.external_id: s for s in driver.list_servers()}

    assert set(servers) == {OA_01, DB_01, LEGACY_ERP, LEGACY_BACKUP, WEB_02, SCRATCH}
    oa = servers[OA_01]
    assert (oa.name, oa.host, oa.power_state) == ("OA portal", HOST_A, PowerState.running)
    assert (oa.owner_tag, oa.request_tag) == ("agency-gaj/oa", "req-preloaded-oa-01")
    assert oa.created_at == datetime(2025, 11, 3, 2, 15, tzinfo=UTC)
    assert (oa.vcpu, oa.memory_mb) == (2, 4096)
    assert oa.ips == ("10.20.0.100",)
    assert [(d.size_gb, d.tier) for d in oa.disks] == [(20, "ssd")]
    assert oa.extra["flavor"] == "s1.medium"

    db = servers[DB_01]
    assert (db.owner_tag, db.power_state, db.host) == (
        "agency-sjj/audit",
        PowerState.stopped,
        HOST_A,
    )
    assert [(d.size_gb, d.tier) for d in db.disks] == [(20, "ssd"), (30, "hdd")]
    assert db.ips == ("10.20.0.101",)

    erp = servers[LEGACY_ERP]
    assert (erp.owner_tag, erp.request_tag, erp.created_at) == (None, None, None)
    assert erp.power_state == PowerState.running
    # its file disk is found in hdd-pool by path; the read-only CD-ROM is not its storage
    assert [(d.size_gb, d.tier) for d in erp.disks] == [(40, "hdd")]
    assert servers[LEGACY_BACKUP].owner_tag is None
    assert servers[LEGACY_BACKUP].power_state == PowerState.stopped

    web = servers[WEB_02]
    assert (web.host, web.owner_tag, web.ips) == (HOST_B, "agency-gaj/portal", ("10.20.0.150",))
    assert (servers[SCRATCH].host, servers[SCRATCH].owner_tag) == (HOST_B, None)


def test_get_server_and_list_servers_agree(driver: LibvirtDriver) -> None:
    listed = {s.external_id: s for s in driver.list_servers()}
    for external_id in (OA_01, DB_01, LEGACY_ERP, WEB_02):
        assert driver.get_server(external_id) == listed[external_id]


def test_list_servers_uses_list_all_domains_without_per_domain_lookups(
    driver: LibvirtDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver.check()  # connections are open before counting
    calls: Counter[str] = Counter()

    def count(cls: type, name: str) -> None:
        original = getattr(cls, name)

        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    for name in ("listAllDomains", "lookupByUUIDString", "lookupByUUID", "lookupByName"):
        count(libvirt.virConnect, name)
    count(libvirt.virConnect, "lookupByID")
    for name in ("XMLDesc", "state", "info"):
        count(libvirt.virDomain, name)

    servers = driver.list_servers()

    assert len(servers) == 6
    assert calls["listAllDomains"] == 2  # one per host
    assert calls["lookupByUUIDString"] + calls["lookupByUUID"] == 0
    assert calls["lookupByName"] + calls["lookupByID"] == 0
    assert calls["XMLDesc"] == 6  # each domain's XML read once
    assert calls["state"] + calls["info"] == 0  # states come in one bulk call per host


def test_hosts_report_capacity_from_their_xml(driver: LibvirtDriver) -> None:
    hosts = {h.name: h for h in driver.list_hosts()}

    assert set(hosts) == {HOST_A, HOST_B}
    a, b = hosts[HOST_A], hosts[HOST_B]
    assert dict(a.capacity.total) == {"vcpu": 32, "memory_mb": 131072}
    assert dict(b.capacity.total) == {"vcpu": 16, "memory_mb": 65536}
    # the stopped gov-db-01 and legacy-backup count: their resources stay reserved
    assert dict(a.capacity.allocated) == {"vcpu": 11, "memory_mb": 30720}
    assert dict(b.capacity.allocated) == {"vcpu": 3, "memory_mb": 3072}
    assert a.overcommit["vcpu"] == 4.0 and a.extra["schedulable"]["vcpu"] == 128


def test_stopping_a_server_keeps_its_allocation(driver: LibvirtDriver) -> None:
    server = driver.create_server(spec(vcpu=2, memory_mb=2048))
    before = {h.name: dict(h.capacity.allocated) for h in driver.list_hosts()}

    driver.stop(server.external_id)

    assert {h.name: dict(h.capacity.allocated) for h in driver.list_hosts()} == before


def test_storage_pools_carry_tiers_and_leave_out_the_image_pool(
    make_libvirt_driver: MakeLibvirtDriver,
) -> None:
    pools = make_libvirt_driver().list_storage()
    assert {(p.external_id, p.tier) for p in pools} == {
        (f"{HOST_A}/hdd-pool", "hdd"),
        (f"{HOST_A}/ssd-pool", "ssd"),
        (f"{HOST_B}/hdd-pool", "hdd"),
        (f"{HOST_B}/ssd-pool", "ssd"),
    }
    by_id = {p.external_id: p for p in pools}
    # the test driver reports 100 GiB per pool; the preloaded volumes are allocated in it
    assert (by_id[f"{HOST_A}/hdd-pool"].capacity_gb, by_id[f"{HOST_A}/hdd-pool"].free_gb) == (
        100,
        30,
    )

    mapped = make_libvirt_driver(pool_tiers={"hdd-pool": "archive"}).list_storage()
    assert {p.tier for p in mapped} == {"archive", "ssd"}


def test_images_come_from_the_image_pool_of_every_host(driver: LibvirtDriver) -> None:
    images = {i.external_id: i for i in driver.list_images()}

    assert set(images) == {
        "kylin-v10-sp3.qcow2",
        "uos-server-20.qcow2",
        "windows-server-2019.qcow2",
    }
    assert images["uos-server-20.qcow2"].name == "uos-server-20"
    assert images["uos-server-20.qcow2"].min_disk_gb == 8
    assert images["uos-server-20.qcow2"].extra["hosts"] == [HOST_A, HOST_B]
    assert images["windows-server-2019.qcow2"].extra["hosts"] == [HOST_B]


def test_networks_are_merged_by_name_across_hosts(driver: LibvirtDriver) -> None:
    (govnet,) = driver.list_networks()
    assert (govnet.external_id, govnet.cidr) == ("govnet", "10.20.0.0/24")
    assert govnet.extra["hosts"] == [HOST_A, HOST_B]
    assert govnet.extra["dhcp_ranges"] == ["10.20.0.100-10.20.0.199"]


def test_flavors_come_from_the_options(make_libvirt_driver: MakeLibvirtDriver) -> None:
    custom = [{"name": "c1.tiny", "vcpu": 1, "memory_mb": 512, "disk_gb": 10}]
    driver = make_libvirt_driver(flavors=custom)

    (flavor,) = driver.list_flavors()
    assert (flavor.external_id, flavor.vcpu, flavor.memory_mb, flavor.disk_gb) == (
        "c1.tiny",
        1,
        512,
        10,
    )
    server = driver.create_server(spec(flavor="c1.tiny", vcpu=None, memory_mb=None))
    assert (server.vcpu, server.memory_mb) == (1, 512)
    assert server.disks[0] == Disk(10, "ssd", server.disks[0].external_id)
    assert len(make_libvirt_driver().list_flavors()) == 4  # the defaults


# --- creating ----------------------------------------------------------------------------------


def test_create_lists_the_root_disk_first_then_data_disks_in_their_tiers(
    driver: LibvirtDriver,
) -> None:
    server = driver.create_server(
        spec(flavor="s1.small", vcpu=None, memory_mb=None, disks=(Disk(7, "hdd"), Disk(3, "ssd")))
    )

    assert [(d.size_gb, d.tier) for d in server.disks] == [(20, "ssd"), (7, "hdd"), (3, "ssd")]
    assert all(d.external_id for d in server.disks)
    assert server.extra["flavor"] == "s1.small"
    assert server.power_state == PowerState.running


def test_create_is_idempotent_on_the_request_tag(driver: LibvirtDriver) -> None:
    tag = f"req-{uuid.uuid4()}"
    first = driver.create_server(spec(request_tag=tag))
    again = driver.create_server(spec(request_tag=tag, name="a second name"))

    assert again.external_id == first.external_id
    assert [s.request_tag for s in driver.list_servers()].count(tag) == 1


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        pytest.param({"vcpu": None, "memory_mb": None}, InvalidSpec, id="no-size"),
        pytest.param({"vcpu": 0}, InvalidSpec, id="zero-vcpu"),
        pytest.param({"disks": (Disk(0, "hdd"),)}, InvalidSpec, id="zero-disk"),
        pytest.param({"flavor": "no-such-flavor"}, NotFound, id="unknown-flavor"),
        pytest.param({"image": "no-such-image"}, NotFound, id="unknown-image"),
        pytest.param({"network": "no-such-net"}, NotFound, id="unknown-network"),
        pytest.param({"disks": (Disk(5, "nvme"),)}, NotFound, id="unknown-tier"),
        pytest.param({"host_hint": "kvm99"}, NotFound, id="unknown-host"),
        pytest.param({"public_ip": True}, Unsupported, id="public-ip"),
        pytest.param({"memory_mb": 10**7}, ProviderQuotaExceeded, id="too-big"),
        pytest.param({"disks": (Disk(500, "hdd"),)}, ProviderQuotaExceeded, id="no-storage"),
    ],
)
def test_create_refuses_what_it_cannot_build_and_builds_nothing(
    driver: LibvirtDriver, fields: dict[str, Any], error: type[DriverError]
) -> None:
    before = driver.list_servers()
    free_before = {p.external_id: p.free_gb for p in driver.list_storage()}

    with pytest.raises(error):
        driver.create_server(spec(**fields))

    assert driver.list_servers() == before
    assert {p.external_id: p.free_gb for p in driver.list_storage()} == free_before


def test_a_failed_create_leaves_no_volumes_or_reservations(
    driver: LibvirtDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    free_before = {p.external_id: p.free_gb for p in driver.list_storage()}
    reservations_before = dhcp_hosts(driver, HOST_A)

    def refuse(self: Any, xml: str) -> Any:
        raise libvirt_error(
            libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_FROM_DOMAIN, "XML error: refused on purpose"
        )

    monkeypatch.setattr(libvirt.virConnect, "defineXML", refuse)
    with pytest.raises(InvalidSpec, match="refused on purpose"):
        driver.create_server(spec(disks=(Disk(5, "hdd"),)))

    assert {p.external_id: p.free_gb for p in driver.list_storage()} == free_before
    assert dhcp_hosts(driver, HOST_A) == reservations_before


# --- placement across hosts ----------------------------------------------------------------------


def test_placement_picks_the_host_with_most_free_memory(driver: LibvirtDriver) -> None:
    free = free_memory(driver)
    assert free[HOST_A] > free[HOST_B]
    assert driver.create_server(spec()).host == HOST_A

    # fill host a until host b has more room: the next server goes there
    free = free_memory(driver)
    filler = free[HOST_A] - free[HOST_B] + 4096
    assert driver.create_server(spec(memory_mb=filler, host_hint=HOST_A)).host == HOST_A
    assert driver.create_server(spec()).host == HOST_B


def test_host_hint_is_respected(driver: LibvirtDriver) -> None:
    server = driver.create_server(spec(host_hint=HOST_B))

    assert server.host == HOST_B
    assert driver.get_server(server.external_id).host == HOST_B
    listed = {s.external_id: s.host for s in driver.list_servers()}
    assert listed[server.external_id] == HOST_B


def test_an_image_on_one_host_only_places_the_server_there(driver: LibvirtDriver) -> None:
    server = driver.create_server(spec(image="windows-server-2019", vcpu=2, memory_mb=4096))

    assert server.host == HOST_B
    assert server.disks[0].size_gb == 40  # the root disk is at least the image


def test_addresses_are_dhcp_reservations_unique_across_hosts(driver: LibvirtDriver) -> None:
    on_b = driver.create_server(spec(host_hint=HOST_B))
    on_a = driver.create_server(spec(host_hint=HOST_A))

    # .100 and .101 are held on host a, .150 on host b: govnet is one VLAN on both hosts
    assert on_b.ips == ("10.20.0.102",)
    assert on_a.ips == ("10.20.0.103",)
    assert dhcp_hosts(driver, HOST_B)[mac_of(driver, on_b.external_id)] == "10.20.0.102"
    assert dhcp_hosts(driver, HOST_A)[mac_of(driver, on_a.external_id)] == "10.20.0.103"
    assert mac_of(driver, on_b.external_id).startswith("52:54:00:")


def test_a_network_whose_range_is_full_refuses_the_create(
    driver: LibvirtDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from drivers import libvirt as module

    monkeypatch.setattr(module, "_pick_address", lambda *_: None)
    with pytest.raises(ProviderQuotaExceeded) as caught:
        driver.create_server(spec())
    assert "No more IP addresses" in caught.value.provider_message


# --- lifecycle -----------------------------------------------------------------------------------


def test_delete_removes_the_domain_its_volumes_and_its_reservation(
    driver: LibvirtDriver,
) -> None:
    free_before = {p.external_id: p.free_gb for p in driver.list_storage()}
    images_before = driver.list_images()
    server = driver.create_server(spec(disks=(Disk(9, "hdd"),), host_hint=HOST_A))
    mac = mac_of(driver, server.external_id)
    assert mac in dhcp_hosts(driver, HOST_A)

    driver.delete(server.external_id)

    assert {p.external_id: p.free_gb for p in driver.list_storage()} == free_before
    assert mac not in dhcp_hosts(driver, HOST_A)
    assert driver.list_images() == images_before
    with pytest.raises(NotFound):
        driver.get_server(server.external_id)


def test_deleting_an_unmanaged_domain_spares_the_image_in_its_cdrom(
    driver: LibvirtDriver,
) -> None:
    hdd_before = {p.external_id: p.free_gb for p in driver.list_storage()}[f"{HOST_A}/hdd-pool"]

    driver.delete(LEGACY_ERP)

    assert LEGACY_ERP not in {s.external_id for s in driver.list_servers()}
    pools = {p.external_id: p.free_gb for p in driver.list_storage()}
    assert pools[f"{HOST_A}/hdd-pool"] == hdd_before + 40
    assert "kylin-v10-sp3.qcow2" in {i.external_id for i in driver.list_images()}


def test_power_operations_refuse_what_the_state_forbids(driver: LibvirtDriver) -> None:
    server = driver.create_server(spec())

    with pytest.raises(Conflict, match="already running"):
        driver.start(server.external_id)
    driver.stop(server.external_id)
    with pytest.raises(Conflict, match="not running"):
        driver.stop(server.external_id)
    # reboot has no check of its own: this is libvirt's refusal, translated
    with pytest.raises(Conflict) as caught:
        driver.reboot(server.external_id)
    not_running = "Requested operation is not valid: domain is not running"
    assert caught.value.provider_message == not_running


def test_resize_is_live_up_to_the_maximum_and_needs_a_stop_beyond(driver: LibvirtDriver) -> None:
    assert Capability.resize_live in driver.capabilities
    server = driver.create_server(spec(vcpu=1, memory_mb=1024))
    assert (server.extra["max_vcpu"], server.extra["max_memory_mb"]) == (2, 2048)

    grown = driver.resize(server.external_id, vcpu=2, memory_mb=2048)
    assert (grown.vcpu, grown.memory_mb, grown.power_state) == (2, 2048, PowerState.running)
    inactive = ET.fromstring(driver.ex_domain_xml(server.external_id, inactive=True))  # noqa: S314
    assert inactive.find("vcpu").get("current") in ("2", None)  # type: ignore[union-attr]

    with pytest.raises(Conflict, match="stop it"):
        driver.resize(server.external_id, vcpu=4, memory_mb=2048)

    driver.stop(server.external_id)
    bigger = driver.resize(server.external_id, vcpu=4, memory_mb=8192)
    assert (bigger.vcpu, bigger.memory_mb) == (4, 8192)
    assert bigger.extra["max_vcpu"] >= 4 and bigger.extra["max_memory_mb"] >= 8192
    started = driver.start(server.external_id)
    assert (started.vcpu, started.memory_mb, started.power_state) == (4, 8192, PowerState.running)


def test_resize_beyond_the_host_is_refused(driver: LibvirtDriver) -> None:
    server = driver.create_server(spec(host_hint=HOST_B))
    driver.stop(server.external_id)

    with pytest.raises(ProviderQuotaExceeded):
        driver.resize(server.external_id, vcpu=1, memory_mb=65536)
    assert driver.get_server(server.external_id).memory_mb == 1024


def test_resize_drops_the_flavor_from_the_metadata(driver: LibvirtDriver) -> None:
    server = driver.create_server(spec(flavor="s1.small", vcpu=None, memory_mb=None))
    driver.stop(server.external_id)

    resized = driver.resize(server.external_id, vcpu=1, memory_mb=1024)

    assert "flavor" not in resized.extra
    fields = metadata_fields(driver.ex_domain_xml(server.external_id))
    assert "flavor" not in fields and fields["owner"] == server.owner_tag


def test_ensure_tenant_scope_has_nothing_to_create(driver: LibvirtDriver) -> None:
    assert driver.ensure_tenant_scope("agency-gaj") is None
    assert Capability.tenant_scope not in driver.capabilities


# --- errors --------------------------------------------------------------------------------------


def test_unknown_ids_are_not_found_with_libvirts_message(driver: LibvirtDriver) -> None:
    with pytest.raises(NotFound) as caught:
        driver.get_server(str(uuid.uuid4()))
    assert "Domain not found" in caught.value.provider_message
    with pytest.raises(NotFound):
        driver.get_server("not-a-uuid")


@pytest.mark.parametrize(
    ("code", "source", "expected"),
    [
        ("VIR_ERR_NO_DOMAIN", "VIR_FROM_QEMU", NotFound),
        ("VIR_ERR_NO_STORAGE_VOL", "VIR_FROM_STORAGE", NotFound),
        ("VIR_ERR_OPERATION_INVALID", "VIR_FROM_QEMU", Conflict),
        ("VIR_ERR_AUTH_FAILED", "VIR_FROM_REMOTE", Unauthorized),
        ("VIR_ERR_ACCESS_DENIED", "VIR_FROM_ACCESS", Unauthorized),
        ("VIR_ERR_SYSTEM_ERROR", "VIR_FROM_RPC", Unavailable),
        ("VIR_ERR_INTERNAL_ERROR", "VIR_FROM_RPC", Unavailable),
        ("VIR_ERR_RPC", "VIR_FROM_REMOTE", Unavailable),
        ("VIR_ERR_OPERATION_TIMEOUT", "VIR_FROM_QEMU", Unavailable),
        ("VIR_ERR_INVALID_CONN", "VIR_FROM_NONE", Unavailable),
        ("VIR_ERR_NO_SUPPORT", "VIR_FROM_TEST", Unsupported),
        ("VIR_ERR_XML_ERROR", "VIR_FROM_DOMAIN", InvalidSpec),
        ("VIR_ERR_INTERNAL_ERROR", "VIR_FROM_QEMU", DriverError),
    ],
)
def test_libvirt_errors_map_to_the_driver_error_hierarchy(
    code: str, source: str, expected: type[DriverError]
) -> None:
    message = f"{code} from {source}: the provider's own words"
    error = translate_error(
        libvirt_error(getattr(libvirt, code), getattr(libvirt, source), message), "an operation"
    )

    assert type(error) is expected
    assert error.provider_message == message
    assert message in error.message


def test_a_refused_connection_is_unavailable_not_a_libvirt_error(
    make_libvirt_driver: MakeLibvirtDriver,
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    driver = make_libvirt_driver(f"qemu+tcp://127.0.0.1:{port}/system")

    with pytest.raises(Unavailable) as caught:
        driver.check()
    assert "Connection refused" in caught.value.provider_message
    assert isinstance(caught.value.__cause__, libvirt.libvirtError)


def test_a_missing_host_file_is_unavailable(make_libvirt_driver: MakeLibvirtDriver) -> None:
    driver = make_libvirt_driver("test:///nonexistent/libvirt-host-z.xml")

    with pytest.raises(Unavailable):
        driver.list_hosts()


def test_refused_credentials_are_unauthorized_and_not_retried(
    make_libvirt_driver: MakeLibvirtDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = libvirt.openAuth
    answers: list[tuple[str, str]] = []

    def open_with_sasl(uri: str, auth: list[Any], flags: int) -> Any:
        # what a SASL server asks for: a name and a passphrase, answered through the callback
        asked = [
            [libvirt.VIR_CRED_AUTHNAME, "name", "", "", None],
            [libvirt.VIR_CRED_PASSPHRASE, "password", "", "", None],
        ]
        if auth[1](asked, auth[2]) != 0 or asked[1][4] != "s3cret":
            answers.append((str(asked[0][4]), str(asked[1][4])))
            raise libvirt_error(
                libvirt.VIR_ERR_AUTH_FAILED,
                libvirt.VIR_FROM_REMOTE,
                "authentication failed: authentication failed",
            )
        answers.append((asked[0][4], asked[1][4]))
        return real_open(uri, auth, flags)

    monkeypatch.setattr(libvirt, "openAuth", open_with_sasl)

    refused = make_libvirt_driver(credentials={"username": "broker", "password": "wrong"})
    with pytest.raises(Unauthorized) as caught:
        refused.check()
    assert caught.value.provider_message == "authentication failed: authentication failed"
    assert answers == [("broker", "wrong")]  # one attempt: retrying cannot fix a password

    make_libvirt_driver(credentials={"username": "broker", "password": "s3cret"}).check()
    assert answers[-2:] == [("broker", "s3cret"), ("broker", "s3cret")]  # one per host


def test_a_transient_rpc_failure_is_retried(
    driver: LibvirtDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = libvirt.virConnect.listAllDomains
    calls: list[int] = []

    def flaky(self: Any, flags: int = 0) -> Any:
        calls.append(flags)
        if len(calls) == 1:
            raise libvirt_error(
                libvirt.VIR_ERR_SYSTEM_ERROR,
                libvirt.VIR_FROM_RPC,
                "Cannot recv data: Connection reset by peer",
            )
        return real(self, flags)

    monkeypatch.setattr(libvirt.virConnect, "listAllDomains", flaky)

    assert len(driver.list_servers()) == 6
    assert len(calls) == 3  # the failed call, then one per host


def test_libvirt_prints_nothing_to_stderr(
    driver: LibvirtDriver, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(NotFound):
        driver.get_server(str(uuid.uuid4()))
    with pytest.raises(Conflict):
        driver.reboot(DB_01)

    assert capfd.readouterr().err == ""


# --- endpoints -----------------------------------------------------------------------------------


def test_endpoint_takes_commas_and_whitespace(make_libvirt_driver: MakeLibvirtDriver) -> None:
    endpoint = f"  {libvirt_host_uri('a')},\n\t{libvirt_host_uri('b')} ,"
    driver = make_libvirt_driver(endpoint)

    assert [h.name for h in driver.list_hosts()] == [HOST_A, HOST_B]
    single = make_libvirt_driver(libvirt_host_uri("b"))
    assert {s.host for s in single.list_servers()} == {HOST_B}


@pytest.mark.parametrize("endpoint", ["", " , ", "{a}, {a}"])
def test_an_endpoint_without_hosts_or_with_one_twice_is_refused(endpoint: str) -> None:
    with pytest.raises(DriverError):
        LibvirtDriver(endpoint.format(a=libvirt_host_uri("a")), {}, {})


def test_each_driver_keeps_its_own_connection_per_host(
    make_libvirt_driver: MakeLibvirtDriver,
) -> None:
    first, second = make_libvirt_driver(), make_libvirt_driver()
    server = first.create_server(spec())

    # the same connection serves every later call of the first driver...
    assert first.get_server(server.external_id).external_id == server.external_id
    # ...while the second has its own copy of the hosts (the test driver's private state)
    with pytest.raises(NotFound):
        second.get_server(server.external_id)


# --- data disks and names ------------------------------------------------------------------------


def disk_targets(xml: str) -> list[str]:
    root = ET.fromstring(xml)  # noqa: S314 - our own XML
    return [t.get("dev", "") for t in root.iterfind("devices/disk/target")]


def test_attach_disk_to_a_stopped_domain_adds_a_volume_to_its_definition(
    driver: LibvirtDriver,
) -> None:
    server = driver.create_server(spec(host_hint=HOST_A))
    driver.stop(server.external_id)
    free_before = {p.external_id: p.free_gb for p in driver.list_storage()}

    attached = driver.attach_disk(server.external_id, Disk(3, "hdd"))
    root, data = attached.disks
    assert root == server.disks[0]
    assert (data.size_gb, data.tier) == (3, "hdd") and data.external_id
    assert disk_targets(driver.ex_domain_xml(server.external_id, inactive=True)) == ["vda", "vdb"]
    assert free_before[f"{HOST_A}/hdd-pool"] - 3 == next(
        p.free_gb for p in driver.list_storage() if p.external_id == f"{HOST_A}/hdd-pool"
    )
    # the definition kept everything else: metadata, network, size
    assert metadata_fields(driver.ex_domain_xml(server.external_id))["owner"] == "agency-a/system-1"
    assert driver.start(server.external_id).disks == attached.disks

    driver.stop(server.external_id)
    detached = driver.detach_disk(server.external_id, data.external_id)
    assert detached.disks == (root,)
    assert {p.external_id: p.free_gb for p in driver.list_storage()} == free_before


def test_attach_disk_to_a_running_domain_without_hot_plug_is_unsupported_and_leaves_nothing(
    driver: LibvirtDriver,
) -> None:
    server = driver.create_server(spec(host_hint=HOST_A))
    free_before = {p.external_id: p.free_gb for p in driver.list_storage()}

    with pytest.raises(Unsupported) as caught:
        driver.attach_disk(server.external_id, Disk(2, "hdd"))
    assert "stop the server" in caught.value.message
    assert "not supported" in caught.value.provider_message
    assert {p.external_id: p.free_gb for p in driver.list_storage()} == free_before
    assert driver.get_server(server.external_id).disks == server.disks


def test_detach_disk_refuses_the_root_disk_and_unknown_disks(driver: LibvirtDriver) -> None:
    server = driver.create_server(spec(disks=(Disk(2, "hdd"),)))
    driver.stop(server.external_id)

    with pytest.raises(InvalidSpec):
        driver.detach_disk(server.external_id, server.disks[0].external_id or "")
    with pytest.raises(NotFound):
        driver.detach_disk(server.external_id, "/var/lib/libvirt/hdd/nothing.qcow2")
    assert driver.get_server(server.external_id).disks == server.disks


def test_attach_disk_is_refused_when_no_pool_of_the_tier_has_room(driver: LibvirtDriver) -> None:
    server = driver.create_server(spec(host_hint=HOST_A))
    driver.stop(server.external_id)

    with pytest.raises(ProviderQuotaExceeded):
        driver.attach_disk(server.external_id, Disk(31, "hdd"))  # host a's hdd pool has 30 GiB
    with pytest.raises(NotFound):
        driver.attach_disk(server.external_id, Disk(1, "nvme"))
    with pytest.raises(InvalidSpec):
        driver.attach_disk(server.external_id, Disk(0, "hdd"))
    assert driver.get_server(server.external_id).disks == server.disks


def test_libvirt_has_no_public_addresses(driver: LibvirtDriver) -> None:
    assert Capability.floating_ip not in driver.capabilities
    with pytest.raises(Unsupported):
        driver.add_public_ip(OA_01)


@pytest.mark.parametrize("name", ["web/01", "web\n01", "web\t01", ""])
def test_names_libvirt_refuses_are_refused_before_anything_is_built(
    driver: LibvirtDriver, name: str
) -> None:
    before = len(driver.list_servers())
    assert LibvirtDriver.invalid_name(name)
    with pytest.raises(InvalidSpec):
        driver.create_server(spec(name=name))
    assert len(driver.list_servers()) == before


def test_names_with_spaces_and_chinese_are_accepted(driver: LibvirtDriver) -> None:
    assert LibvirtDriver.invalid_name("政务 门户 01") is None
    assert driver.create_server(spec(name="政务 门户 01")).name == "政务 门户 01"
