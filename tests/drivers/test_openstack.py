"""OpenStack-specific behaviour of OpenStackDriver.

Two kinds of tests: against the real peer (Keystone, Placement, Glance, Nova; marked
`openstack`), and at the HTTP level with requests-mock for what a healthy peer will not do on
demand: 5xx, timeouts, refused credentials, malformed bodies, and clouds with what the peer
lacks (floating IPs, block storage) or without a network service at all.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import openstack
import pytest
import requests
import requests_mock

from drivers.base import (
    Capability,
    Conflict,
    Disk,
    Driver,
    DriverError,
    InvalidSpec,
    NotFound,
    PowerState,
    ProviderQuotaExceeded,
    ServerSpec,
    Unauthorized,
    Unavailable,
    Unsupported,
    open_driver,
)
from drivers.openstack import NO_NETWORK, OWNER_KEY, REQUEST_KEY
from tests.peers.openstack import open_openstack_driver

# --- against the real peer ---------------------------------------------------------------------


@pytest.fixture
def peer_driver(openstack_peer: dict[str, Any], openstack_turn: None) -> Iterator[Driver]:
    driver = open_openstack_driver(openstack_peer)
    driver.check()
    yield driver
    driver.close()


@pytest.fixture
def sdk(openstack_peer: dict[str, Any]) -> Iterator[Any]:
    """A plain openstacksdk connection, to arrange what the driver does not do (quotas)."""
    conn = openstack.connect(
        auth_url=openstack_peer["auth_url"],
        username=openstack_peer["username"],
        password=openstack_peer["password"],
        project_name=openstack_peer["project_name"],
        user_domain_name=openstack_peer["user_domain_name"],
        project_domain_name=openstack_peer["project_domain_name"],
        region_name=openstack_peer["region"],
        load_yaml_config=False,
        load_envvars=False,
    )
    yield conn
    conn.close()


@pytest.fixture
def make(peer_driver: Driver, openstack_peer: dict[str, Any]) -> Iterator[Callable[..., Any]]:
    """Create servers on the peer from spec fields; delete them afterwards."""
    created: list[str] = []

    def create(**fields: Any) -> Any:
        spec = {
            "name": f"os-{uuid.uuid4().hex[:8]}",
            "image": openstack_peer["image_id"],
            "network": openstack_peer["network_id"],
            "owner_tag": "agency-a/system-1",
            "request_tag": f"req-{uuid.uuid4()}",
            "vcpu": 1,
            "memory_mb": 512,
            **fields,
        }
        server = peer_driver.create_server(ServerSpec(**spec))
        created.append(server.external_id)
        return server

    yield create
    for external_id in created:
        with contextlib.suppress(NotFound):
            peer_driver.delete(external_id)


@pytest.mark.openstack
def test_peer_capabilities_say_no_floating_ips_and_no_live_resize(peer_driver: Driver) -> None:
    # the peer's network service has no L3 extension and Nova's resize restarts the guest
    assert Capability.floating_ip not in peer_driver.capabilities
    assert Capability.resize_live not in peer_driver.capabilities
    assert {Capability.create, Capability.resize, Capability.tenant_scope} <= (
        peer_driver.capabilities
    )


@pytest.mark.openstack
def test_hosts_and_storage_come_from_placement(peer_driver: Driver) -> None:
    (host,) = peer_driver.list_hosts()
    # nova's fake virt driver reports 1000 vCPU, 800000 MB and 600000 GB of local disk
    assert host.capacity.total == {"vcpu": 1000, "memory_mb": 800000}
    assert host.overcommit["vcpu"] > 0
    (pool,) = peer_driver.list_storage()
    assert pool.tier == "local" and 0 < pool.free_gb <= pool.capacity_gb <= 600000


@pytest.mark.openstack
def test_data_disk_is_the_flavors_ephemeral_disk_after_the_root_disk(
    peer_driver: Driver, make: Callable[..., Any]
) -> None:
    server = make(vcpu=1, memory_mb=768, disks=(Disk(size_gb=5, tier="local"),))

    assert [(d.size_gb, d.tier) for d in server.disks] == [(10, "local"), (5, "local")]
    assert server.extra["flavor"] == "gb.1c768m10d5e"
    flavors = {f.name: f for f in peer_driver.list_flavors()}
    assert flavors["gb.1c768m10d5e"].extra["ephemeral_gb"] == 5


@pytest.mark.openstack
def test_unplaceable_disks_are_refused_before_anything_is_created(
    peer_driver: Driver, make: Callable[..., Any]
) -> None:
    tag = f"req-{uuid.uuid4()}"
    with pytest.raises(Unsupported, match="tier 'ssd'"):
        make(request_tag=tag, disks=(Disk(size_gb=5, tier="ssd"),))
    with pytest.raises(Unsupported, match="at most one data disk"):
        make(request_tag=tag, disks=(Disk(5, "local"), Disk(6, "local")))
    assert peer_driver.find_server_by_tag(tag) is None


@pytest.mark.openstack
def test_public_ip_is_unsupported_on_the_peer(
    peer_driver: Driver, make: Callable[..., Any]
) -> None:
    tag = f"req-{uuid.uuid4()}"
    with pytest.raises(Unsupported, match="floating IP"):
        make(request_tag=tag, public_ip=True)
    assert peer_driver.find_server_by_tag(tag) is None


@pytest.mark.openstack
def test_custom_sizes_share_one_flavor_and_addresses_come_from_the_network(
    peer_driver: Driver, make: Callable[..., Any]
) -> None:
    a, b = make(vcpu=1, memory_mb=640), make(vcpu=1, memory_mb=640)

    assert a.extra["flavor"] == b.extra["flavor"] == "gb.1c640m10d"
    assert sum(f.name == "gb.1c640m10d" for f in peer_driver.list_flavors()) == 1
    assert all(ip.startswith("10.20.") for ip in a.ips + b.ips)


@pytest.mark.openstack
def test_create_twice_with_one_request_tag_makes_one_server(
    peer_driver: Driver, make: Callable[..., Any]
) -> None:
    tag = f"req-{uuid.uuid4()}"
    first = make(request_tag=tag)
    again = make(request_tag=tag, name="another-name")

    assert again.external_id == first.external_id
    assert [s.external_id for s in peer_driver.list_servers() if s.request_tag == tag] == [
        first.external_id
    ]


@pytest.mark.openstack
def test_server_in_a_tenant_project_belongs_to_that_tenant(
    peer_driver: Driver, make: Callable[..., Any], sdk: Any
) -> None:
    code = f"agency-{uuid.uuid4().hex[:6]}"
    scope = peer_driver.ensure_tenant_scope(code)
    server = make(scope=scope, owner_tag=f"{code}/system-9")

    project = sdk.identity.find_project(scope, ignore_missing=False)
    assert server.extra["project_id"] == project.id
    assert server.owner_tag == f"{code}/system-9"
    # without the metadata key, the project says whose it is
    assert peer_driver.set_owner(server.external_id, None).owner_tag == code
    listed = {s.external_id: s for s in peer_driver.list_servers()}
    assert listed[server.external_id].owner_tag == code


@pytest.mark.openstack
def test_nova_quota_refusal_is_provider_quota_exceeded(
    peer_driver: Driver, make: Callable[..., Any], sdk: Any
) -> None:
    scope = peer_driver.ensure_tenant_scope(f"quota-{uuid.uuid4().hex[:6]}")
    project = sdk.identity.find_project(scope, ignore_missing=False)
    sdk.compute.update_quota_set(project.id, cores=1)

    with pytest.raises(ProviderQuotaExceeded) as caught:
        make(scope=scope, vcpu=2, memory_mb=512)
    assert "Quota exceeded" in caught.value.provider_message


@pytest.mark.openstack
def test_starting_a_running_server_is_a_conflict(
    peer_driver: Driver, make: Callable[..., Any]
) -> None:
    server = make()
    with pytest.raises(Conflict) as caught:
        peer_driver.start(server.external_id)
    # Nova's own words, e.g. "Cannot 'start' instance … while it is in vm_state active"
    assert "vm_state active" in caught.value.provider_message


@pytest.mark.openstack
def test_resize_of_a_stopped_server_leaves_it_stopped(
    peer_driver: Driver, make: Callable[..., Any]
) -> None:
    server = make(vcpu=1, memory_mb=512, disks=(Disk(3, "local"),))
    peer_driver.stop(server.external_id)

    resized = peer_driver.resize(server.external_id, vcpu=2, memory_mb=1024)
    assert (resized.vcpu, resized.memory_mb) == (2, 1024)
    assert resized.power_state == PowerState.stopped
    # the data disk survives the resize
    assert [(d.size_gb, d.tier) for d in resized.disks] == [(10, "local"), (3, "local")]


@pytest.mark.openstack
def test_wrong_password_is_unauthorized(
    openstack_peer: dict[str, Any], openstack_turn: None
) -> None:
    driver = open_openstack_driver({**openstack_peer, "password": "not-the-password"})
    with pytest.raises(Unauthorized) as caught:
        driver.check()
    assert caught.value.provider_message
    driver.close()


# --- at the HTTP level --------------------------------------------------------------------------

AUTH = "http://keystone.test/v3"
COMPUTE = "http://compute.test/v2.1"
IMAGE = "http://image.test"
PLACEMENT = "http://placement.test"
NETWORK = "http://network.test"
VOLUME_ROOT = "http://volume.test/v3/"
VOLUME = f"{VOLUME_ROOT}p1"
JSON = {"Content-Type": "application/json"}
IDENTITY_VERSION = {
    "version": {"id": "v3.14", "status": "stable", "links": [{"rel": "self", "href": f"{AUTH}/"}]}
}
SERVER_ID = "3b0c1f4e-8f6a-4a53-9a1c-6b0e6d1f3a10"
FLAVOR_ID = "f1"
NET_ID = "9e1d6b54-2f3c-4d89-a3f1-0d5c0c7e2b11"


def _token(services: dict[str, str]) -> dict[str, Any]:
    catalog = [
        {
            "type": kind,
            "name": kind,
            "id": kind,
            "endpoints": [
                {
                    "id": f"{kind}-public",
                    "interface": "public",
                    "region": "RegionOne",
                    "region_id": "RegionOne",
                    "url": url,
                }
            ],
        }
        for kind, url in {"identity": AUTH, **services}.items()
    ]
    domain = {"id": "default", "name": "Default"}
    return {
        "token": {
            "methods": ["password"],
            "expires_at": "2099-01-01T00:00:00.000000Z",
            "issued_at": "2026-01-01T00:00:00.000000Z",
            "user": {"id": "u1", "name": "admin", "domain": domain},
            "project": {"id": "p1", "name": "admin", "domain": domain},
            "roles": [{"id": "r1", "name": "admin"}],
            "catalog": catalog,
        }
    }


def _server(**fields: Any) -> dict[str, Any]:
    return {
        "id": SERVER_ID,
        "name": "web-1",
        "status": "ACTIVE",
        "OS-EXT-STS:task_state": None,
        "tenant_id": "p1",
        "created": "2026-03-01T08:00:00Z",
        "metadata": {OWNER_KEY: "agency-a", REQUEST_KEY: "req-1"},
        "flavor": {
            "vcpus": 1,
            "ram": 512,
            "disk": 10,
            "ephemeral": 0,
            "swap": 0,
            "original_name": "m1.tiny",
            "extra_specs": {},
        },
        "addresses": {"gb-shared": [{"addr": "10.20.0.10", "version": 4}]},
        "image": {"id": "img-1"},
        "OS-EXT-SRV-ATTR:hypervisor_hostname": "hv-1",
        **fields,
    }


def _fake_cloud_driver(**options: Any) -> Driver:
    credentials = {"username": "admin", "password": "secret", "project_name": "admin"}
    merged = {"retry_max_wait": 0, "poll_interval_s": 0, "timeout_s": 7, **options}
    return open_driver("openstack", AUTH, credentials, merged)


class FakeCloud:
    """A catalog and the discovery documents openstacksdk asks for; tests add the rest."""

    def __init__(
        self, mock: requests_mock.Mocker, *, network: bool = False, volumes: bool = False
    ) -> None:
        self.mock = mock
        services = {"compute": COMPUTE, "image": IMAGE, "placement": PLACEMENT}
        if network:
            services["network"] = NETWORK
        if volumes:
            services["block-storage"] = VOLUME
        mock.get(AUTH, json=IDENTITY_VERSION)
        mock.post(
            f"{AUTH}/auth/tokens",
            json=_token(services),
            headers={"X-Subject-Token": "token-1"},
            status_code=201,
        )
        compute_version: dict[str, Any] = {"id": "v2.1", "status": "CURRENT", "version": "2.96"}
        compute_version |= {"min_version": "2.1", "links": [{"rel": "self", "href": f"{COMPUTE}/"}]}
        mock.get(COMPUTE, json={"version": compute_version})
        net_self = [{"rel": "self", "href": f"{NETWORK}/v2.0/"}]
        net_versions = [{"id": "v2.0", "status": "CURRENT", "links": net_self}]
        mock.get(NETWORK, json={"versions": net_versions})
        volume_version: dict[str, Any] = {"id": "v3.0", "status": "CURRENT", "version": "3.70"}
        volume_version |= {"min_version": "3.0", "links": [{"rel": "self", "href": VOLUME_ROOT}]}
        mock.get(VOLUME_ROOT, json={"version": volume_version})

    def driver(self, **options: Any) -> Driver:
        return _fake_cloud_driver(**options)

    def calls(self, method: str, url_part: str) -> list[Any]:
        return [r for r in self.mock.request_history if r.method == method and url_part in r.url]


@pytest.fixture
def mock_http() -> Iterator[requests_mock.Mocker]:
    with requests_mock.Mocker() as mock:
        yield mock


@pytest.fixture
def cloud(mock_http: requests_mock.Mocker) -> FakeCloud:
    return FakeCloud(mock_http, network=False)


@pytest.fixture
def cloud_with_network(mock_http: requests_mock.Mocker) -> FakeCloud:
    return FakeCloud(mock_http, network=True)


def _error(status: int, key: str, message: str) -> dict[str, Any]:
    return {
        "status_code": status,
        "json": {key: {"code": status, "message": message}},
        "headers": JSON,
    }


def test_server_errors_are_unavailable_after_the_retries(cloud: FakeCloud) -> None:
    cloud.mock.get(f"{COMPUTE}/servers/{SERVER_ID}", **_error(500, "computeFault", "boom"))
    driver = cloud.driver(retries=3)

    with pytest.raises(Unavailable) as caught:
        driver.get_server(SERVER_ID)
    assert caught.value.provider_message == "boom"
    assert len(cloud.calls("GET", f"/servers/{SERVER_ID}")) == 3


def test_a_passing_5xx_is_retried_away(cloud: FakeCloud) -> None:
    cloud.mock.get(
        f"{COMPUTE}/servers/{SERVER_ID}",
        [
            _error(503, "computeFault", "try later"),
            {"json": {"server": _server()}, "headers": JSON},
        ],
    )
    server = cloud.driver().get_server(SERVER_ID)

    assert (server.external_id, server.owner_tag, server.request_tag) == (
        SERVER_ID,
        "agency-a",
        "req-1",
    )
    assert server.ips == ("10.20.0.10",) and server.created_at is not None
    assert server.created_at.utcoffset() == timedelta(0)
    assert len(cloud.calls("GET", f"/servers/{SERVER_ID}")) == 2


def test_timeouts_are_unavailable_and_use_the_configured_timeout(cloud: FakeCloud) -> None:
    cloud.mock.get(f"{COMPUTE}/servers/{SERVER_ID}", exc=requests.exceptions.ReadTimeout)

    with pytest.raises(Unavailable, match="timed out"):
        cloud.driver(retries=2, timeout_s=7).get_server(SERVER_ID)
    calls = cloud.calls("GET", f"/servers/{SERVER_ID}")
    assert len(calls) == 2 and calls[0].timeout == 7


def test_refused_password_is_unauthorized_and_not_retried(mock_http: requests_mock.Mocker) -> None:
    mock_http.get(AUTH, json=IDENTITY_VERSION)
    message = "The request you have made requires authentication."
    mock_http.post(f"{AUTH}/auth/tokens", **_error(401, "error", message))
    driver = _fake_cloud_driver()

    with pytest.raises(Unauthorized) as caught:
        driver.check()
    assert message in caught.value.provider_message
    assert len([r for r in mock_http.request_history if r.method == "POST"]) == 1


@pytest.mark.parametrize(
    ("status", "message", "error"),
    [
        (403, "Quota exceeded for cores: Requested 4, but already used 20 of 20 cores",
         ProviderQuotaExceeded),
        (403, "Policy doesn't allow os_compute_api:servers:create to be performed.", Unauthorized),
        (404, "Flavor f1 could not be found.", NotFound),
        (409, "Multiple possible networks found, use a Network ID to be more specific.", Conflict),
        (400, "Invalid imageRef provided.", InvalidSpec),
    ],
)  # fmt: skip
def test_create_refusals_keep_novas_message(
    cloud: FakeCloud, status: int, message: str, error: type[DriverError]
) -> None:
    cloud.mock.get(f"{COMPUTE}/servers/detail", json={"servers": []}, headers=JSON)
    flavor = {"id": FLAVOR_ID, "name": "m1.tiny", "vcpus": 1, "ram": 512, "disk": 1}
    cloud.mock.get(f"{COMPUTE}/flavors/{FLAVOR_ID}", json={"flavor": flavor}, headers=JSON)
    key = {403: "forbidden", 404: "itemNotFound", 409: "conflictingRequest"}.get(
        status, "badRequest"
    )
    cloud.mock.post(f"{COMPUTE}/servers", **_error(status, key, message))
    spec = ServerSpec("web-1", "img-1", None, "agency-a", "req-1", flavor=FLAVOR_ID)

    with pytest.raises(error) as caught:
        cloud.driver().create_server(spec)
    assert caught.value.provider_message == message
    assert len(cloud.calls("POST", "/servers")) == 1  # refusals are not retried
    body = json.loads(cloud.calls("POST", "/servers")[0].text)["server"]
    # no network service: Nova is told so, instead of guessing one
    assert body["networks"] == NO_NETWORK and body["metadata"][REQUEST_KEY] == "req-1"


def test_stopping_a_stopped_server_is_a_conflict(cloud: FakeCloud) -> None:
    message = f"Cannot 'stop' instance {SERVER_ID} while it is in vm_state stopped"
    cloud.mock.post(
        f"{COMPUTE}/servers/{SERVER_ID}/action", **_error(409, "conflictingRequest", message)
    )
    with pytest.raises(Conflict) as caught:
        cloud.driver().stop(SERVER_ID)
    assert caught.value.provider_message == message


def test_a_gateway_page_instead_of_json_is_unavailable(cloud: FakeCloud) -> None:
    cloud.mock.get(
        f"{COMPUTE}/servers/detail",
        text="<html><body>502 Bad Gateway</body></html>",
        headers={"Content-Type": "text/html"},
    )
    with pytest.raises(Unavailable, match="malformed"):
        cloud.driver(retries=2).list_servers()
    assert len(cloud.calls("GET", "/servers/detail")) == 2


def test_a_body_without_the_server_is_unavailable(cloud: FakeCloud) -> None:
    cloud.mock.get(f"{COMPUTE}/servers/{SERVER_ID}", json={"unexpected": True}, headers=JSON)
    with pytest.raises(Unavailable, match="malformed"):
        cloud.driver(retries=1).get_server(SERVER_ID)


def test_list_servers_pages_in_bulk_across_projects(cloud: FakeCloud) -> None:
    second = _server(id="second", metadata={})
    cloud.mock.get(
        f"{COMPUTE}/servers/detail",
        [
            {
                "json": {
                    "servers": [_server()],
                    "servers_links": [
                        {"rel": "next", "href": f"{COMPUTE}/servers/detail?marker={SERVER_ID}"}
                    ],
                },
                "headers": JSON,
            },
            {"json": {"servers": [second]}, "headers": JSON},
            # a full page makes the SDK ask for the next one
            {"json": {"servers": []}, "headers": JSON},
        ],
    )
    projects = [{"id": "p1", "name": "govbroker-agency-b", "domain_id": "default"}]
    cloud.mock.get(f"{AUTH}/projects", json={"projects": projects}, headers=JSON)

    servers = cloud.driver(page_size=1).list_servers()

    assert [s.external_id for s in servers] == [SERVER_ID, "second"]
    # no owner key: the tenant project says whose it is
    assert [s.owner_tag for s in servers] == ["agency-a", "agency-b"]
    pages = cloud.calls("GET", "/servers/detail")
    assert len(pages) == 3 and all(r.qs["all_tenants"] == ["true"] for r in pages)
    assert pages[0].qs["limit"] == ["1"]
    assert not cloud.calls("GET", "/servers/second")  # never one call per server


def test_without_a_network_service_there_is_one_none_network_and_no_floating_ips(
    cloud: FakeCloud,
) -> None:
    driver = cloud.driver()
    driver.check()

    assert Capability.floating_ip not in driver.capabilities
    assert [(n.external_id, n.name) for n in driver.list_networks()] == [(NO_NETWORK, NO_NETWORK)]
    cloud.mock.get(f"{COMPUTE}/servers/detail", json={"servers": []}, headers=JSON)
    spec = ServerSpec("web-1", "img-1", None, "agency-a", "req-1", flavor=FLAVOR_ID, public_ip=True)
    with pytest.raises(Unsupported, match="floating IP"):
        driver.create_server(spec)
    assert not cloud.calls("POST", "/servers")


def _neutron_with_l3(cloud: FakeCloud) -> None:
    m = cloud.mock
    m.get(
        f"{NETWORK}/v2.0/extensions",
        json={"extensions": [{"alias": "router", "name": "Neutron L3 Router"}]},
        headers=JSON,
    )

    def networks(request: Any, context: Any) -> dict[str, Any]:
        private = {"id": NET_ID, "name": "private", "subnets": ["s1"], "router:external": False}
        public = {"id": "ext-net", "name": "public", "subnets": [], "router:external": True}
        if request.qs.get("router:external") == ["true"]:
            return {"networks": [public]}
        return {"networks": [private, public]}

    m.get(f"{NETWORK}/v2.0/networks", json=networks, headers=JSON)
    subnets = [{"id": "s1", "cidr": "10.0.0.0/24", "network_id": NET_ID}]
    m.get(f"{NETWORK}/v2.0/subnets", json={"subnets": subnets}, headers=JSON)


def test_with_l3_networking_a_server_gets_a_floating_ip(cloud_with_network: FakeCloud) -> None:
    cloud = cloud_with_network
    _neutron_with_l3(cloud)
    m = cloud.mock
    attached: list[str] = []
    fixed = {"addr": "10.0.0.10", "version": 4, "OS-EXT-IPS:type": "fixed"}

    def server(request: Any, context: Any) -> dict[str, Any]:
        addresses = [fixed]
        if attached:
            addresses.append({"addr": attached[0], "version": 4, "OS-EXT-IPS:type": "floating"})
        return {"server": _server(addresses={"private": addresses})}

    m.get(f"{COMPUTE}/servers/detail", json={"servers": []}, headers=JSON)
    flavor = {"id": FLAVOR_ID, "name": "m1.tiny", "vcpus": 1, "ram": 512, "disk": 10}
    m.get(f"{COMPUTE}/flavors/{FLAVOR_ID}", json={"flavor": flavor}, headers=JSON)
    m.post(f"{COMPUTE}/servers", json={"server": {"id": SERVER_ID}}, status_code=202, headers=JSON)
    m.get(f"{COMPUTE}/servers/{SERVER_ID}", json=server, headers=JSON)
    port = {"id": "port-1", "device_id": SERVER_ID, "network_id": NET_ID}
    m.get(f"{NETWORK}/v2.0/ports", json={"ports": [port]}, headers=JSON)
    m.get(f"{NETWORK}/v2.0/floatingips", json={"floatingips": []}, headers=JSON)

    def allocate(request: Any, context: Any) -> dict[str, Any]:
        attached.append("203.0.113.7")
        context.status_code = 201
        return {"floatingip": {"id": "fip-1", "floating_ip_address": "203.0.113.7"}}

    m.post(f"{NETWORK}/v2.0/floatingips", json=allocate, headers=JSON)
    driver = cloud.driver()
    driver.check()

    assert Capability.floating_ip in driver.capabilities
    assert [n.external_id for n in driver.list_networks()] == [NET_ID, "ext-net"]
    spec = ServerSpec(
        "web-1", "img-1", NET_ID, "agency-a", "req-1", flavor=FLAVOR_ID, public_ip=True
    )
    created = driver.create_server(spec)

    assert created.ips == ("10.0.0.10", "203.0.113.7")
    (request,) = cloud.calls("POST", "/floatingips")
    assert request.json()["floatingip"] == {"floating_network_id": "ext-net", "port_id": "port-1"}
    body = json.loads(cloud.calls("POST", "/servers")[0].text)["server"]
    assert body["networks"] == [{"uuid": NET_ID}] and body["tags"] == ["req-1"]


def test_with_block_storage_data_disks_of_other_tiers_are_volumes(
    mock_http: requests_mock.Mocker,
) -> None:
    cloud = FakeCloud(mock_http, volumes=True)
    m = cloud.mock
    attachments = [{"id": "vol-1", "delete_on_termination": True}]
    server = _server(**{"os-extended-volumes:volumes_attached": attachments})
    # two look-ups by tag before the create find nothing; then the listing and the SDK's
    # probe for a further page
    pages = [[], [], [server], []]
    m.get(f"{COMPUTE}/servers/detail", [{"json": {"servers": p}, "headers": JSON} for p in pages])
    flavor = {"id": FLAVOR_ID, "name": "m1.tiny", "vcpus": 1, "ram": 512, "disk": 10}
    m.get(f"{COMPUTE}/flavors/{FLAVOR_ID}", json={"flavor": flavor}, headers=JSON)
    m.post(f"{COMPUTE}/servers", json={"server": {"id": SERVER_ID}}, status_code=202, headers=JSON)
    m.get(f"{COMPUTE}/servers/{SERVER_ID}", json={"server": server}, headers=JSON)
    volume = {"id": "vol-1", "size": 20, "volume_type": "ssd"}
    m.get(f"{VOLUME}/volumes/vol-1", json={"volume": volume}, headers=JSON)
    m.get(f"{VOLUME}/volumes/detail", json={"volumes": [volume]}, headers=JSON)
    driver = cloud.driver()
    driver.check()

    assert Capability.volumes in driver.capabilities
    spec = ServerSpec("web-1", "img-1", None, "agency-a", "req-1", flavor=FLAVOR_ID,
                      disks=(Disk(20, "ssd"),))  # fmt: skip
    created = driver.create_server(spec)

    body = json.loads(cloud.calls("POST", "/servers")[0].text)["server"]
    assert body["block_device_mapping_v2"] == [
        {
            "boot_index": -1,
            "source_type": "blank",
            "destination_type": "volume",
            "volume_size": 20,
            "volume_type": "ssd",
            "delete_on_termination": True,
        }
    ]
    # the root disk first, then the volume with the size and tier block storage reports
    expected = [(10, "local", f"{SERVER_ID}:root"), (20, "ssd", "vol-1")]
    assert [(d.size_gb, d.tier, d.external_id) for d in created.disks] == expected
    (listed,) = driver.list_servers()
    assert [(d.size_gb, d.tier) for d in listed.disks] == [(10, "local"), (20, "ssd")]
    assert len(cloud.calls("GET", "/volumes/detail")) == 1  # one listing for all servers


# --- public addresses, data disks and names after create (HTTP level) -----------------------------


def test_a_floating_ip_is_added_to_the_first_port_and_released(
    cloud_with_network: FakeCloud,
) -> None:
    cloud = cloud_with_network
    _neutron_with_l3(cloud)
    m = cloud.mock
    fips: list[dict[str, Any]] = []
    fixed = {"addr": "10.0.0.10", "version": 4, "OS-EXT-IPS:type": "fixed"}

    def server(request: Any, context: Any) -> dict[str, Any]:
        floating = [
            {"addr": f["floating_ip_address"], "version": 4, "OS-EXT-IPS:type": "floating"}
            for f in fips
        ]
        return {"server": _server(addresses={"private": [fixed, *floating]})}

    def listing(request: Any, context: Any) -> dict[str, Any]:
        wanted = request.qs.get("floating_ip_address") or request.qs.get("port_id")
        if request.qs.get("floating_ip_address"):
            found = [f for f in fips if [f["floating_ip_address"]] == wanted]
        else:
            found = [f for f in fips if [f["port_id"]] == wanted]
        return {"floatingips": found}

    def allocate(request: Any, context: Any) -> dict[str, Any]:
        fip = {"id": "fip-1", "floating_ip_address": "203.0.113.7", "port_id": "port-1"}
        fips.append(fip)
        context.status_code = 201
        return {"floatingip": fip}

    def release(request: Any, context: Any) -> str:
        fips.clear()
        context.status_code = 204
        return ""

    flavor = {"id": FLAVOR_ID, "name": "m1.tiny", "vcpus": 1, "ram": 512, "disk": 10}
    m.get(f"{COMPUTE}/flavors/{FLAVOR_ID}", json={"flavor": flavor}, headers=JSON)
    m.get(f"{COMPUTE}/servers/{SERVER_ID}", json=server, headers=JSON)
    port = {"id": "port-1", "device_id": SERVER_ID, "network_id": NET_ID}
    m.get(f"{NETWORK}/v2.0/ports", json={"ports": [port]}, headers=JSON)
    m.get(f"{NETWORK}/v2.0/floatingips", json=listing, headers=JSON)
    m.post(f"{NETWORK}/v2.0/floatingips", json=allocate, headers=JSON)
    m.delete(f"{NETWORK}/v2.0/floatingips/fip-1", text=release)
    driver = cloud.driver()
    driver.check()

    added = driver.add_public_ip(SERVER_ID)
    assert added.ips == ("10.0.0.10", "203.0.113.7")
    assert added.public_ips == ("203.0.113.7",)
    (request,) = cloud.calls("POST", "/floatingips")
    assert request.json()["floatingip"] == {
        "floating_network_id": "ext-net",
        "port_id": "port-1",
        "project_id": "p1",
    }
    with pytest.raises(Conflict):  # one floating IP per fixed address
        driver.add_public_ip(SERVER_ID)

    released = driver.release_public_ip(SERVER_ID, "203.0.113.7")
    assert released.ips == ("10.0.0.10",) and released.public_ips == ()
    with pytest.raises(NotFound):
        driver.release_public_ip(SERVER_ID, "203.0.113.7")


def test_without_floating_ips_or_block_storage_the_new_operations_are_unsupported(
    cloud: FakeCloud,
) -> None:
    driver = cloud.driver()
    driver.check()
    assert {Capability.floating_ip, Capability.volumes}.isdisjoint(driver.capabilities)
    with pytest.raises(Unsupported):
        driver.add_public_ip(SERVER_ID)
    with pytest.raises(Unsupported):
        driver.release_public_ip(SERVER_ID, "203.0.113.7")
    with pytest.raises(Unsupported):
        driver.attach_disk(SERVER_ID, Disk(5, "ssd"))


def test_with_block_storage_a_volume_is_attached_and_detached_and_deleted(
    mock_http: requests_mock.Mocker,
) -> None:
    cloud = FakeCloud(mock_http, volumes=True)
    m = cloud.mock
    volumes: dict[str, dict[str, Any]] = {}

    def server(request: Any, context: Any) -> dict[str, Any]:
        attached = [{"id": v["id"]} for v in volumes.values() if v["status"] == "in-use"]
        return {"server": _server(**{"os-extended-volumes:volumes_attached": attached})}

    def create(request: Any, context: Any) -> dict[str, Any]:
        body = request.json()["volume"]
        volume = {"id": "vol-1", "status": "available", "attachments": [], **body}
        volumes["vol-1"] = volume
        context.status_code = 202
        return {"volume": volume}

    def attach(request: Any, context: Any) -> dict[str, Any]:
        volumes["vol-1"]["status"] = "in-use"
        volumes["vol-1"]["attachments"] = [{"server_id": SERVER_ID}]
        return {"volumeAttachment": {"id": "vol-1", "volumeId": "vol-1", "serverId": SERVER_ID}}

    def detach(request: Any, context: Any) -> str:
        volumes["vol-1"].update(status="available", attachments=[])
        context.status_code = 202
        return ""

    def delete(request: Any, context: Any) -> str:
        volumes.pop("vol-1")
        context.status_code = 202
        return ""

    flavor = {"id": FLAVOR_ID, "name": "m1.tiny", "vcpus": 1, "ram": 512, "disk": 10}
    m.get(f"{COMPUTE}/flavors/{FLAVOR_ID}", json={"flavor": flavor}, headers=JSON)
    m.get(f"{COMPUTE}/servers/{SERVER_ID}", json=server, headers=JSON)
    m.get(f"{VOLUME}/volumes/detail", json={"volumes": []}, headers=JSON)
    m.post(f"{VOLUME}/volumes", json=create, headers=JSON)
    m.get(f"{VOLUME}/volumes/vol-1", json=lambda r, c: {"volume": volumes["vol-1"]}, headers=JSON)
    m.delete(f"{VOLUME}/volumes/vol-1", text=delete)
    m.post(f"{COMPUTE}/servers/{SERVER_ID}/os-volume_attachments", json=attach, headers=JSON)
    m.delete(f"{COMPUTE}/servers/{SERVER_ID}/os-volume_attachments/vol-1", text=detach)
    driver = cloud.driver(poll_interval_s=0)
    driver.check()

    attached = driver.attach_disk(SERVER_ID, Disk(20, "ssd"))
    body = cloud.calls("POST", "/volumes")[0].json()["volume"]
    assert (body["size"], body["volume_type"]) == (20, "ssd")
    assert body["name"].startswith("web-1-data-")
    expected = [(10, "local", f"{SERVER_ID}:root"), (20, "ssd", "vol-1")]
    assert [(d.size_gb, d.tier, d.external_id) for d in attached.disks] == expected

    with pytest.raises(InvalidSpec):
        driver.detach_disk(SERVER_ID, f"{SERVER_ID}:root")
    with pytest.raises(NotFound):
        driver.detach_disk(SERVER_ID, "vol-404")
    with pytest.raises(Unsupported):  # the local tier comes only with the flavor
        driver.attach_disk(SERVER_ID, Disk(5, "local"))

    detached = driver.detach_disk(SERVER_ID, "vol-1")
    assert [d.external_id for d in detached.disks] == [f"{SERVER_ID}:root"]
    assert volumes == {}


@pytest.mark.parametrize("name", [" web", "web ", "web\n01", "x" * 256, ""])
def test_names_nova_refuses_are_refused_before_any_call(cloud: FakeCloud, name: str) -> None:
    driver = cloud.driver()
    assert driver.invalid_name(name)
    calls = len(cloud.mock.request_history)
    with pytest.raises(InvalidSpec):
        driver.create_server(ServerSpec(name, "img-1", None, "agency-a", "req-1", vcpu=1,
                                        memory_mb=512))  # fmt: skip
    assert len(cloud.mock.request_history) == calls


def test_nova_takes_inner_spaces_slashes_and_chinese(cloud: FakeCloud) -> None:
    assert cloud.driver().invalid_name("政务云 web/01") is None
