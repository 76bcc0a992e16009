"""The OpenStack driver: Nova, Placement, Glance, Keystone (and Neutron when the cloud has one).

Everything goes through openstacksdk with explicit auth (no clouds.yaml, no OS_* variables).
SDK and keystoneauth exceptions are translated in `_translate`; SDK objects are mapped to the
plain types of drivers.base before they leave this module.

How the driver maps govbroker's model onto OpenStack:

- Tenancy: one Keystone project per tenant, named ``<project_prefix><code>``, in the driver
  user's project domain; the driver's user gets the admin role there. The scope handed back is
  the project's *name*: unique in its domain, and it carries the tenant code (the contract asks
  that). ``ServerSpec.scope`` may be that name or the project id.
- Ownership: metadata ``govbroker.owner`` and ``govbroker.request``; a server without an owner
  key that lives in a tenant project is reported as owned by that tenant. The request tag is
  also a Nova server tag (when Nova's tag rules allow it) so a lookup by tag is one filtered
  listing instead of a scan.
- Capacity: Placement's inventories and usages of each hypervisor's resource provider (the
  hypervisors API stopped reporting sizes in microversion 2.88). Stopped servers keep their
  allocations there, as the contract wants.
- Storage: the hypervisors' local disk (Placement's DISK_GB) is one pool whose tier comes from
  ``local_disk_tier``, because OpenStack does not say what those disks are. A data disk on that
  tier becomes the flavor's *ephemeral* disk: a second local disk that Nova creates with the
  server and destroys with it, sized by the flavor, which is what a data disk on
  hypervisor-local storage is. One such disk per server: Nova reports ephemeral space as one
  number per flavor, so several could not be told apart when read back. When the catalog has a
  block-storage service, its scheduler pools are listed too (tier = the volume type that selects
  the pool's backend) and data disks of those tiers become volumes Nova creates at boot and
  deletes with the server. Any other tier raises Unsupported.
- Networks: the network service's networks when the catalog has one; otherwise a single entry
  ``none`` that creates servers with ``networks="none"``.
- Floating IPs: only when the network service has the L3 extension ("router") and an external
  network; otherwise Capability.floating_ip is absent and ``public_ip=True`` raises Unsupported.
  ``add_public_ip`` allocates one in the server's project and associates it with the server's
  first port (Neutron maps one floating IP to one fixed address, so a second one is a Conflict);
  ``release_public_ip`` deletes it. Bandwidth limits need Neutron QoS policies, which the driver
  does not manage: ``bandwidth_mbps`` is not applied. Floating addresses are the ``public_ips``.
- Attaching and detaching data disks after creation needs the block-storage service
  (Capability.volumes): ``attach_disk`` creates a volume of the tier's volume type and attaches
  it; ``detach_disk`` detaches and deletes it. The root and the ephemeral disk stay.
- Names: Nova takes 1 to 255 characters without leading or trailing whitespace.
- Custom sizes: a public flavor of exactly that size, found or created (``gb.<vcpu>c<mem>m...``).
  Resizing goes through Nova's resize + confirm, which restarts the guest: not a live resize.

Options: ``region``, ``timeout_s`` (per HTTP call), ``retries``, ``retry_max_wait``,
``wait_timeout_s`` (for a server to reach a state), ``poll_interval_s``, ``page_size``,
``project_prefix`` (default ``govbroker-``), ``local_disk_tier`` (default ``local``),
``root_disk_gb`` (root disk of custom flavors, default 10; at least the image's min_disk).
"""

from __future__ import annotations

import contextlib
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import openstack
import openstack.exceptions as os_exc
import requests
from keystoneauth1 import exceptions as ksa_exc

from drivers.base import (
    Capability,
    Capacity,
    Conflict,
    Disk,
    Driver,
    DriverError,
    Flavor,
    Host,
    Image,
    InvalidSpec,
    Network,
    NotFound,
    PowerState,
    ProviderQuotaExceeded,
    Server,
    ServerSpec,
    StoragePool,
    Unauthorized,
    Unavailable,
    Unsupported,
    remote,
)

T = TypeVar("T")

OWNER_KEY = "govbroker.owner"
REQUEST_KEY = "govbroker.request"
NO_NETWORK = "none"
LOCAL_POOL_ID = "nova-local-disk"
VOLUME_SERVICES = frozenset({"block-storage", "volumev3", "volumev2", "volume"})
NOVA_TAG_MAX = 60  # Nova refuses longer server tags, and any with "/" or ","
QUOTA_TEXT = re.compile(r"quota|over ?limit", re.IGNORECASE)
NO_VALID_HOST = "No valid host was found"

STATUS_TO_POWER: Mapping[str, PowerState] = {
    "ACTIVE": PowerState.running,
    "SHUTOFF": PowerState.stopped,
    "SUSPENDED": PowerState.suspended,
    "PAUSED": PowerState.suspended,
    "SHELVED": PowerState.stopped,
    "SHELVED_OFFLOADED": PowerState.stopped,
    "BUILD": PowerState.building,
    "REBUILD": PowerState.building,
    "RESIZE": PowerState.building,
    "VERIFY_RESIZE": PowerState.building,
    "REVERT_RESIZE": PowerState.building,
    "MIGRATING": PowerState.building,
    "REBOOT": PowerState.running,
    "HARD_REBOOT": PowerState.running,
    "ERROR": PowerState.error,
}
BASE_CAPABILITIES = frozenset(
    {
        Capability.create,
        Capability.resize,
        Capability.power,
        Capability.reboot,
        Capability.tenant_scope,
        Capability.templates,
        Capability.flavors,
    }
)


# --- translation at the edge -------------------------------------------------------------------


def _status_error(status: int | None, message: str, what: str) -> DriverError:
    text = f"openstack: {what}: {message}"
    if status == 401:
        return Unauthorized(text, provider_message=message)
    if status in (403, 409, 413, 429) and QUOTA_TEXT.search(message):
        return ProviderQuotaExceeded(text, provider_message=message)
    if status == 403:
        return Unauthorized(text, provider_message=message)
    if status == 404:
        return NotFound(text, provider_message=message)
    if status == 409:
        return Conflict(text, provider_message=message)
    if status == 400:
        return InvalidSpec(text, provider_message=message)
    if status is None or status >= 500 or status in (408, 429):
        return Unavailable(text, provider_message=message)
    return DriverError(text, provider_message=message)


def _translate(exc: BaseException, what: str) -> DriverError | None:
    """The DriverError for an SDK or keystoneauth failure; None for anything else (our bugs)."""
    if isinstance(exc, os_exc.HttpException):
        message = str(exc.details or exc.message or exc)
        return _status_error(exc.status_code, message, what)
    if isinstance(exc, ksa_exc.HttpError):
        message = str(exc.details or exc.message or exc)
        return _status_error(exc.http_status, message, what)
    if isinstance(exc, ksa_exc.ConnectionError | ksa_exc.DiscoveryFailure):
        return Unavailable(f"openstack: {what}: {exc}", provider_message=str(exc))
    if isinstance(exc, ksa_exc.EndpointNotFound | os_exc.EndpointNotFound):
        return Unsupported(f"openstack: {what}: {exc}", provider_message=str(exc))
    if isinstance(exc, ksa_exc.AuthorizationFailure):
        return Unauthorized(f"openstack: {what}: {exc}", provider_message=str(exc))
    if isinstance(exc, requests.exceptions.JSONDecodeError | _Malformed):
        return Unavailable(
            f"openstack: {what}: malformed response ({exc})", provider_message=str(exc)
        )
    if isinstance(exc, requests.exceptions.RequestException):
        return Unavailable(f"openstack: {what}: {exc}", provider_message=str(exc))
    if isinstance(exc, ksa_exc.ClientException | os_exc.SDKException):
        return DriverError(f"openstack: {what}: {exc}", provider_message=str(exc))
    return None


class _Malformed(Exception):
    """A 2xx answer whose body lacks what every such answer has (a gateway's page, a bug)."""


def _need(value: T | None, what: str) -> T:
    if value is None:
        raise _Malformed(f"the response has no {what}")
    return value


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    # Nova writes UTC; a stamp without an offset is UTC too
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _flavor_name(vcpu: int, memory_mb: int, root_gb: int, ephemeral_gb: int) -> str:
    name = f"gb.{vcpu}c{memory_mb}m{root_gb}d"
    return f"{name}{ephemeral_gb}e" if ephemeral_gb else name


def _gb(value: Any) -> int:
    """Cinder reports sizes as numbers or as "infinite"/"unknown": those count as 0 here."""
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return 0


def _is_volume_id(disk_id: str) -> bool:
    # root and ephemeral disks are "<server id>:root" and "<server id>:ephemeral0"
    return ":" not in disk_id


def _valid_nova_tag(tag: str) -> bool:
    return 0 < len(tag) <= NOVA_TAG_MAX and "/" not in tag and "," not in tag


# --- the driver --------------------------------------------------------------------------------


class OpenStackDriver(Driver):
    kind = "openstack"
    # what every Nova cloud can do; check() adds floating_ip and volumes when the catalog has
    # the services for them
    capabilities = BASE_CAPABILITIES
    name_pattern = re.compile(r"^(?!\s)[^\x00-\x1f\x7f]+(?<!\s)\Z")
    name_rule = "1 to 255 characters, no control characters, no leading or trailing whitespace"

    def __init__(self, endpoint: str, credentials: Mapping[str, str], options: Mapping[str, Any]):
        super().__init__(endpoint, credentials, options)
        missing = {"username", "password", "project_name"} - set(credentials)
        if missing:
            raise InvalidSpec(f"openstack: credentials lack {', '.join(sorted(missing))}")
        self._region = options.get("region") or None
        self._timeout_s = float(options.get("timeout_s", 60))
        self._wait_timeout_s = float(options.get("wait_timeout_s", 600))
        self._poll_s = float(options.get("poll_interval_s", 0.5))
        self._page_size = int(options.get("page_size", 500))
        self._prefix = str(options.get("project_prefix", "govbroker-"))
        self._local_tier = str(options.get("local_disk_tier", "local"))
        self._root_gb = int(options.get("root_disk_gb", 10))
        attempts = max(1, int(options.get("retries", 3)))
        self._retry = remote(attempts, float(options.get("retry_max_wait", 4.0)))
        self._lock = threading.Lock()
        self._scoped: dict[str, Any] = {}  # project id → Connection acting in that project
        self._projects: dict[str, str] = {}  # project id → name, for owner fallback
        self._services: frozenset[str] | None = None
        self._fip_network: str | None = None
        self._domain: str | None = None
        self._conn = self._connect()

    def _connect(self, **override: str) -> Any:
        c = self.credentials
        auth: dict[str, str] = {
            "auth_url": self.endpoint,
            "username": c["username"],
            "password": c["password"],
            "user_domain_name": c.get("user_domain_name", "Default"),
        }
        if override:
            auth.update(override)
        else:
            auth["project_name"] = c["project_name"]
            auth["project_domain_name"] = c.get("project_domain_name", "Default")
        try:
            return openstack.connect(
                auth=auth,
                auth_type="password",
                region_name=self._region,
                api_timeout=self._timeout_s,
                # retries belong to remote(): one policy, and tests can count attempts
                connect_retries=0,
                status_code_retries=0,
                app_name="govbroker",
                load_yaml_config=False,
                load_envvars=False,
            )
        except Exception as exc:
            error = _translate(exc, "connect")
            if error is None:
                raise
            raise error from exc

    # -- the one door every remote call goes through --

    def _remote(self, what: str, fn: Callable[[], T]) -> T:
        def attempt() -> T:
            try:
                return fn()
            except DriverError:
                raise
            except Exception as exc:
                error = _translate(exc, what)
                if error is None:
                    raise
                raise error from exc

        return self._retry(attempt)()

    def close(self) -> None:
        with self._lock:
            conns = [self._conn, *self._scoped.values()]
            self._scoped.clear()
        for conn in conns:
            conn.close()

    # -- catalog --

    def _catalog(self) -> frozenset[str]:
        """The service types in this region's catalog (read from the token: no extra call)."""
        if self._services is None:

            def do() -> frozenset[str]:
                access = self._conn.session.auth.get_access(self._conn.session)
                endpoints = access.service_catalog.get_endpoints(region_name=self._region)
                return frozenset(k for k, v in endpoints.items() if v)

            self._services = self._remote("read the service catalog", do)
        return self._services

    def _has_network(self) -> bool:
        return "network" in self._catalog()

    def _has_volumes(self) -> bool:
        return bool(self._catalog() & VOLUME_SERVICES)

    def _floating_network(self) -> str | None:
        """The external network floating IPs come from, when the network service has L3."""
        if not self._has_network():
            return None
        if self._fip_network is None:

            def do() -> str:
                aliases = {e.alias for e in self._conn.network.extensions()}
                if "router" not in aliases:
                    return ""
                external = list(self._conn.network.networks(is_router_external=True))
                return external[0].id if external else ""

            self._fip_network = self._remote("find the floating IP network", do)
        return self._fip_network or None

    def check(self) -> None:
        """Authenticate, read the catalog and set this cloud's capabilities from it."""
        # the session, not Connection.authorize(): that one hides the HTTP status of a refusal
        self._remote("authenticate", lambda: self._conn.session.get_token())
        self._services = None
        self._fip_network = None
        caps = set(BASE_CAPABILITIES)
        if self._floating_network():
            caps.add(Capability.floating_ip)
        if self._has_volumes():
            caps.add(Capability.volumes)
        self.capabilities = frozenset(caps)

    # -- inventory --

    def _providers(self) -> list[tuple[Any, dict[str, Any], dict[str, int]]]:
        """Each hypervisor with its Placement inventories and usages (its provider has the
        hypervisor's id). Not details=True: since 2.88 that adds only an uptime, fetched with
        one RPC to every compute host."""
        placement = self._conn.placement
        found = []
        for hv in self._conn.compute.hypervisors(details=False):
            rp_id = _need(hv.id, "hypervisor id")
            inventories = {
                i.resource_class: i for i in placement.resource_provider_inventories(rp_id)
            }
            usages = placement.fetch_resource_provider_usages(rp_id).usages or {}
            found.append((hv, inventories, {k: int(v) for k, v in usages.items()}))
        return found

    def list_hosts(self) -> list[Host]:
        def do() -> list[Host]:
            hosts = []
            for hv, inventories, usages in self._providers():
                total, allocated, overcommit = {}, {}, {}
                for rc, key in (("VCPU", "vcpu"), ("MEMORY_MB", "memory_mb")):
                    inv = inventories.get(rc)
                    total[key] = int(inv.total or 0) if inv else 0
                    allocated[key] = usages.get(rc, 0)
                    overcommit[key] = float(inv.allocation_ratio or 1.0) if inv else 1.0
                memory = inventories.get("MEMORY_MB")
                hosts.append(
                    Host(
                        external_id=str(hv.id),
                        name=str(hv.name),
                        cluster=None,
                        capacity=Capacity(total=total, allocated=allocated),
                        overcommit=overcommit,
                        state="up" if hv.state == "up" and hv.status == "enabled" else "down",
                        extra={"reserved_memory_mb": int(memory.reserved or 0) if memory else 0},
                    )
                )
            return hosts

        return self._remote("list hosts", do)

    def list_storage(self) -> list[StoragePool]:
        with_volumes = self._has_volumes()

        def do() -> list[StoragePool]:
            capacity = used = 0
            for _hv, inventories, usages in self._providers():
                disk = inventories.get("DISK_GB")
                capacity += int(disk.total or 0) - int(disk.reserved or 0) if disk else 0
                used += usages.get("DISK_GB", 0)
            pools = [
                StoragePool(
                    external_id=LOCAL_POOL_ID,
                    name="hypervisor local disk",
                    tier=self._local_tier,
                    capacity_gb=capacity,
                    free_gb=max(0, min(capacity, capacity - used)),
                    extra={"kind": "local", "note": "root and ephemeral disks of servers"},
                )
            ]
            return pools + self._volume_pools() if with_volumes else pools

        return self._remote("list storage", do)

    def _volume_pools(self) -> list[StoragePool]:
        """Cinder's scheduler pools. A pool's tier is the volume type that selects its backend
        (the type is what a create asks for); a backend no type names is its own tier."""
        tiers: dict[str, str] = {}
        for volume_type in self._conn.block_storage.types():
            backend = (volume_type.extra_specs or {}).get("volume_backend_name")
            if backend:
                tiers.setdefault(backend, str(volume_type.name))
        pools = []
        for pool in self._conn.block_storage.backend_pools():
            caps = pool.capabilities or {}
            backend = str(caps.get("volume_backend_name") or pool.name)
            total, free = _gb(caps.get("total_capacity_gb")), _gb(caps.get("free_capacity_gb"))
            pools.append(
                StoragePool(
                    external_id=str(pool.name),
                    name=str(pool.name),
                    tier=tiers.get(backend, backend),
                    capacity_gb=total,
                    free_gb=max(0, min(total, free)),
                    extra={"kind": "volume", "backend": backend},
                )
            )
        return pools

    def list_networks(self) -> list[Network]:
        if not self._has_network():
            return [Network(NO_NETWORK, NO_NETWORK, None, extra={"kind": "no network service"})]

        def do() -> list[Network]:
            cidrs = {s.id: s.cidr for s in self._conn.network.subnets()}
            return [
                Network(
                    external_id=_need(n.id, "network id"),
                    name=str(n.name or n.id),
                    cidr=next((cidrs[s] for s in n.subnet_ids or () if s in cidrs), None),
                    extra={"shared": bool(n.is_shared), "external": bool(n.is_router_external)},
                )
                for n in self._conn.network.networks()
            ]

        return self._remote("list networks", do)

    def list_flavors(self) -> list[Flavor]:
        def do() -> list[Flavor]:
            return [
                Flavor(
                    external_id=_need(f.id, "flavor id"),
                    name=str(f.name),
                    vcpu=int(f.vcpus),
                    memory_mb=int(f.ram),
                    disk_gb=int(f.disk or 0),
                    extra={"ephemeral_gb": int(f.ephemeral or 0), "public": bool(f.is_public)},
                )
                for f in self._conn.compute.flavors(details=True)
            ]

        return self._remote("list flavors", do)

    def custom_root_gb(self) -> int:
        return self._root_gb

    def list_images(self) -> list[Image]:
        def do() -> list[Image]:
            return [
                Image(
                    external_id=_need(i.id, "image id"),
                    name=str(i.name or i.id),
                    os=i.os_type or (i.properties or {}).get("os_type"),
                    min_disk_gb=int(i.min_disk or 0),
                    extra={"status": i.status, "visibility": i.visibility},
                )
                for i in self._conn.image.images(limit=self._page_size)
                if i.status == "active"
            ]

        return self._remote("list images", do)

    # -- servers --

    def _project_names(self, project_ids: Iterable[str]) -> dict[str, str]:
        unknown = set(project_ids) - self._projects.keys()
        if unknown:
            names = {p.id: p.name for p in self._conn.identity.projects()}
            with self._lock:
                self._projects.update(names)
        return self._projects

    def _to_server(
        self,
        s: Any,
        projects: Mapping[str, str] | None = None,
        volumes: Mapping[str, tuple[int, str]] | None = None,
    ) -> Server:
        server_id = _need(s.id, "server id")
        flavor = _need(s.flavor, "server flavor")
        metadata = dict(s.metadata or {})
        owner = metadata.get(OWNER_KEY)
        project = s.project_id
        if owner is None and projects and project in projects:
            name = projects[project]
            owner = name.removeprefix(self._prefix) if name.startswith(self._prefix) else None
        disks = []
        if flavor.disk:
            disks.append(Disk(int(flavor.disk), self._local_tier, f"{server_id}:root"))
        if flavor.ephemeral:
            disks.append(Disk(int(flavor.ephemeral), self._local_tier, f"{server_id}:ephemeral0"))
        for attachment in s.attached_volumes or ():
            volume_id = str(attachment.id or attachment.volume_id)
            size, tier = (volumes or {}).get(volume_id, (0, "unknown"))
            disks.append(Disk(size, tier, volume_id))
        fixed: list[str] = []
        floating: list[str] = []
        for addresses in (s.addresses or {}).values():
            for a in addresses:
                (floating if a.get("OS-EXT-IPS:type") == "floating" else fixed).append(a["addr"])
        return Server(
            public_ips=tuple(floating),
            external_id=server_id,
            name=str(s.name),
            vcpu=int(flavor.vcpus),
            memory_mb=int(flavor.ram),
            disks=tuple(disks),
            ips=tuple(fixed + floating),
            power_state=STATUS_TO_POWER.get(str(s.status), PowerState.unknown),
            owner_tag=owner,
            request_tag=metadata.get(REQUEST_KEY),
            created_at=_parse_time(s.created_at),
            host=s.hypervisor_hostname or s.compute_host,
            extra={
                "status": s.status,
                "project_id": project,
                "flavor": flavor.original_name or flavor.name,
                "image": getattr(s.image, "id", None),
                "task_state": s.task_state,
            },
        )

    def _servers(self, **query: Any) -> list[Server]:
        raw = list(
            self._conn.compute.servers(
                details=True, all_projects=True, limit=self._page_size, **query
            )
        )
        projects: Mapping[str, str] = {}
        if any(OWNER_KEY not in (s.metadata or {}) for s in raw):
            projects = self._project_names(s.project_id for s in raw if s.project_id)
        volumes: dict[str, tuple[int, str]] = {}
        if any(s.attached_volumes for s in raw):
            # one listing for every server's volumes, never a call per volume
            for v in self._conn.block_storage.volumes(details=True, all_projects=True):
                volumes[str(v.id)] = (int(v.size or 0), str(v.volume_type or "unknown"))
        return [self._to_server(s, projects, volumes) for s in raw]

    def list_servers(self) -> list[Server]:
        return self._remote("list servers", self._servers)

    def _get_raw(self, external_id: str) -> Any:
        return self._remote(
            f"get server {external_id}", lambda: self._conn.compute.get_server(external_id)
        )

    def get_server(self, external_id: str) -> Server:
        def do() -> Server:
            s = self._conn.compute.get_server(external_id)
            projects = {}
            if OWNER_KEY not in (s.metadata or {}) and s.project_id:
                projects = self._project_names([s.project_id])
            volumes = {}
            for attachment in s.attached_volumes or ():
                v = self._conn.block_storage.get_volume(attachment.id or attachment.volume_id)
                volumes[str(v.id)] = (int(v.size or 0), str(v.volume_type or "unknown"))
            return self._to_server(s, projects, volumes)

        return self._remote(f"get server {external_id}", do)

    def _find_by_tag(self, request_tag: str) -> Server | None:
        query = {"tags": request_tag} if _valid_nova_tag(request_tag) else {}
        for server in self._servers(**query):
            if server.request_tag == request_tag:
                return server
        return None

    def find_server_by_tag(self, request_tag: str) -> Server | None:
        return self._remote(f"find server {request_tag}", lambda: self._find_by_tag(request_tag))

    # -- flavors for custom sizes --

    def _ensure_flavor(self, vcpu: int, memory_mb: int, root_gb: int, ephemeral_gb: int) -> str:
        def matching() -> str | None:
            for f in self._conn.compute.flavors(details=True, is_public=True):
                if (f.vcpus, f.ram, f.disk or 0, f.ephemeral or 0, f.swap or 0) == (
                    vcpu,
                    memory_mb,
                    root_gb,
                    ephemeral_gb,
                    0,
                ) and f.is_public:
                    return str(f.id)
            return None

        def do() -> str:
            found = matching()
            if found:
                return found
            try:
                flavor = self._conn.compute.create_flavor(
                    name=_flavor_name(vcpu, memory_mb, root_gb, ephemeral_gb),
                    vcpus=vcpu,
                    ram=memory_mb,
                    disk=root_gb,
                    ephemeral=ephemeral_gb,
                    is_public=True,
                )
                return str(_need(flavor.id, "flavor id"))
            except os_exc.ConflictException:
                # another caller created it between our look and our create
                found = matching()
                if found:
                    return found
                raise

        return self._remote(f"find or create a {vcpu} vCPU / {memory_mb} MB flavor", do)

    # -- tenancy --

    def _project_domain(self) -> str:
        """Tenant projects go in the domain of the driver's own project."""
        if self._domain is None:

            def do() -> str:
                project = self._conn.identity.get_project(self._conn.current_project_id)
                return str(project.domain_id)

            self._domain = self._remote("read the driver's project", do)
        return self._domain

    def ensure_tenant_scope(self, tenant_code: str) -> str | None:
        if not tenant_code:
            raise InvalidSpec("openstack: an empty tenant code has no scope")
        name = f"{self._prefix}{tenant_code}"
        domain = self._project_domain()

        def do() -> str:
            identity = self._conn.identity
            try:
                project = identity.find_project(name, domain_id=domain, ignore_missing=False)
            except os_exc.NotFoundException:
                try:
                    project = identity.create_project(
                        name=name, domain_id=domain, description="govbroker tenant"
                    )
                except os_exc.ConflictException:
                    # another caller created it between our look and our create
                    project = identity.find_project(name, domain_id=domain, ignore_missing=False)
            role = identity.find_role("admin", ignore_missing=False)
            # idempotent (a PUT): lets the driver act in the project it made
            identity.assign_project_role_to_user(project, self._conn.current_user_id, role)
            with self._lock:
                self._projects[project.id] = project.name
            return str(project.name)

        return self._remote(f"ensure project {name}", do)

    def _conn_for(self, scope: str | None) -> Any:
        if scope is None:
            return self._conn
        domain = self._project_domain()

        def do() -> Any:
            project = self._conn.identity.find_project(
                scope, domain_id=domain, ignore_missing=False
            )
            with self._lock:
                conn = self._scoped.get(project.id)
            if conn is None:
                conn = self._connect(project_id=project.id)
                with self._lock:
                    conn = self._scoped.setdefault(project.id, conn)
            return conn

        return self._remote(f"act in project {scope}", do)

    # -- create --

    def _plan_disks(self, spec: ServerSpec) -> tuple[int, list[dict[str, Any]]]:
        """Where each data disk goes: the flavor's ephemeral GB for the one disk of the local
        tier (see the module docstring), block-storage volumes for the others."""
        ephemeral_gb = 0
        volumes: list[dict[str, Any]] = []
        for d in spec.disks:
            if d.size_gb < 1:
                raise InvalidSpec(f"openstack: invalid disk size {d.size_gb} GB")
            if d.tier == self._local_tier:
                if ephemeral_gb:
                    raise Unsupported(
                        "openstack: a server gets at most one data disk on the hypervisors' "
                        "local disk (the flavor's ephemeral disk)"
                    )
                ephemeral_gb = d.size_gb
            elif self._has_volumes():
                volumes.append(
                    {
                        "boot_index": -1,
                        "source_type": "blank",
                        "destination_type": "volume",
                        "volume_size": d.size_gb,
                        "volume_type": d.tier,
                        # the data disk lives and dies with its server, as everywhere else
                        "delete_on_termination": True,
                    }
                )
            else:
                raise Unsupported(
                    f"openstack: no storage of tier {d.tier!r} here (no block-storage service; "
                    f"the hypervisors' local disk is tier {self._local_tier!r})"
                )
        return ephemeral_gb, volumes

    def _image_min_disk(self, image_id: str) -> int:
        return self._remote(
            f"get image {image_id}", lambda: int(self._conn.image.get_image(image_id).min_disk or 0)
        )

    def _flavor_for(self, spec: ServerSpec, ephemeral_gb: int) -> str:
        if spec.flavor is not None:
            flavor = self._remote(
                f"find flavor {spec.flavor}",
                lambda: self._conn.compute.find_flavor(spec.flavor, ignore_missing=False),
            )
            if ephemeral_gb and int(flavor.ephemeral or 0) != ephemeral_gb:
                vcpu, memory_mb, root = int(flavor.vcpus), int(flavor.ram), int(flavor.disk or 0)
                return self._ensure_flavor(vcpu, memory_mb, root, ephemeral_gb)
            return str(flavor.id)
        if spec.vcpu is None or spec.memory_mb is None:
            raise InvalidSpec("openstack: a server needs a flavor or both vcpu and memory_mb")
        if spec.vcpu < 1 or spec.memory_mb < 1:
            raise InvalidSpec(f"openstack: invalid size {spec.vcpu} vCPU / {spec.memory_mb} MB")
        root = max(self._root_gb, self._image_min_disk(spec.image))
        return self._ensure_flavor(spec.vcpu, spec.memory_mb, root, ephemeral_gb)

    def _networks_for(self, network: str | None) -> Any:
        if network == NO_NETWORK or (network is None and not self._has_network()):
            return NO_NETWORK
        if not self._has_network():
            raise NotFound(
                f"openstack: no network {network!r} (this cloud has no network service)",
                provider_message=f"Network {network} could not be found.",
            )
        return [{"uuid": network or self.list_networks()[0].external_id}]

    def create_server(self, spec: ServerSpec) -> Server:
        why = self.invalid_name(spec.name)
        if why is not None:
            raise InvalidSpec(f"openstack: invalid server name {spec.name!r}: {why}")
        existing = self.find_server_by_tag(spec.request_tag)
        if existing is not None:
            return self._settle_create(existing.external_id)
        if spec.public_ip and self._floating_network() is None:
            raise Unsupported(
                "openstack: this cloud has no floating IPs (no network service with L3 and an "
                "external network)"
            )
        ephemeral_gb, volumes = self._plan_disks(spec)
        flavor_id = self._flavor_for(spec, ephemeral_gb)
        conn = self._conn_for(spec.scope)
        attrs: dict[str, Any] = {
            "name": spec.name,
            "image_id": spec.image,
            "flavor_id": flavor_id,
            "metadata": {OWNER_KEY: spec.owner_tag, REQUEST_KEY: spec.request_tag},
            "networks": self._networks_for(spec.network),
        }
        if volumes:
            attrs["block_device_mapping"] = volumes
        if _valid_nova_tag(spec.request_tag):
            attrs["tags"] = [spec.request_tag]
        if spec.host_hint is not None:
            attrs["host"] = self._service_host(spec.host_hint)

        def do() -> str:
            # a retry after a lost answer must not start a second server
            again = self._find_by_tag(spec.request_tag)
            if again is not None:
                return again.external_id
            return str(_need(conn.compute.create_server(**attrs).id, "server id"))

        server_id = self._remote(f"create server {spec.name}", do)
        self._settle_create(server_id)
        if spec.public_ip:
            self._attach_floating_ip(conn, server_id)
        return self.get_server(server_id)

    def _service_host(self, hint: str) -> str:
        """The compute service host of a hypervisor named by id or name (for Nova's `host`)."""

        def do() -> str:
            for hv in self._conn.compute.hypervisors(details=True):
                if hint in (hv.id, hv.name):
                    return str((hv.service_details or {}).get("host") or hv.name)
            raise NotFound(
                f"openstack: no host {hint!r}", provider_message=f"Host {hint} could not be found."
            )

        return self._remote(f"find host {hint}", do)

    def _settle_create(self, server_id: str) -> Server:
        """Wait for ACTIVE. A server that ends in ERROR is deleted (a retried create then starts
        afresh) and its fault raised; "no valid host" is the provider running out of room."""
        s = self._wait(server_id, {"ACTIVE"}, "become ACTIVE")
        if s.status == "ERROR":
            fault = (s.fault or {}).get("message") or "the server went to ERROR"
            with contextlib.suppress(NotFound):
                self._delete_and_wait(server_id)
            error = ProviderQuotaExceeded if NO_VALID_HOST in fault else DriverError
            raise error(
                f"openstack: server {server_id} failed to build: {fault}", provider_message=fault
            )
        return self.get_server(server_id)

    def _wait(self, server_id: str, statuses: set[str], what: str) -> Any:
        """Poll until the server is in one of `statuses` with no task running, or ERROR."""
        deadline = time.monotonic() + self._wait_timeout_s
        while True:
            s = self._get_raw(server_id)
            if s.status == "ERROR" or (s.status in statuses and not s.task_state):
                return s
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"openstack: server {server_id} did not {what} in {self._wait_timeout_s:.0f} s "
                    f"(status {s.status}, task {s.task_state})",
                    provider_message=f"status {s.status}",
                )
            time.sleep(self._poll_s)

    def _attach_floating_ip(self, conn: Any, server_id: str) -> None:
        """Allocate in the server's own project (its quota pays) and attach to its first port."""
        network_id = self._floating_network()
        if network_id is None:
            raise Unsupported("openstack: this cloud has no floating IPs")

        def do() -> None:
            ports = list(conn.network.ports(device_id=server_id))
            if not ports:
                raise Conflict(
                    f"openstack: server {server_id} has no port to attach a floating IP to",
                    provider_message="no port",
                )
            if list(conn.network.ips(port_id=ports[0].id)):
                return  # attached by an earlier attempt
            conn.network.create_ip(floating_network_id=network_id, port_id=ports[0].id)

        self._remote(f"attach a floating IP to {server_id}", do)

    def add_public_ip(self, external_id: str, *, bandwidth_mbps: int | None = None) -> Server:
        network_id = self._floating_network()
        if network_id is None:
            raise Unsupported(
                "openstack: this cloud has no floating IPs (no network service with L3 and an "
                "external network)"
            )
        s = self._get_raw(external_id)
        before = {str(a) for a in self.get_server(external_id).public_ips}

        def do() -> str:
            ports = list(self._conn.network.ports(device_id=external_id))
            if not ports:
                raise Conflict(
                    f"openstack: server {external_id} has no port to attach a floating IP to",
                    provider_message="no port",
                )
            for fip in self._conn.network.ips(port_id=ports[0].id):
                address = str(fip.floating_ip_address)
                if address in before:
                    raise Conflict(
                        f"openstack: the port of server {external_id} has floating IP {address} "
                        "already, and Neutron maps one floating IP to one fixed address",
                        provider_message=f"port {ports[0].id} already has floating IP {address}",
                    )
                return address  # allocated by an earlier attempt whose answer was lost
            fip = self._conn.network.create_ip(
                floating_network_id=network_id, port_id=ports[0].id, project_id=s.project_id
            )
            return str(fip.floating_ip_address)

        address = self._remote(f"add a floating IP to {external_id}", do)
        return self._address_settled(external_id, address, present=True)

    def release_public_ip(self, external_id: str, ip: str) -> Server:
        if self._floating_network() is None:
            raise Unsupported("openstack: this cloud has no floating IPs")
        self._get_raw(external_id)  # NotFound for an unknown server
        attempts = 0

        def do() -> None:
            nonlocal attempts
            attempts += 1
            port_ids = {p.id for p in self._conn.network.ports(device_id=external_id)}
            fips = [
                f
                for f in self._conn.network.ips(floating_ip_address=ip)
                if f.port_id and f.port_id in port_ids
            ]
            if not fips:
                if attempts > 1:
                    return  # the first attempt released it and its answer was lost
                raise NotFound(
                    f"openstack: server {external_id} has no floating IP {ip}",
                    provider_message=f"Floating IP {ip} is not associated with server "
                    f"{external_id}.",
                )
            for fip in fips:
                self._conn.network.delete_ip(fip, ignore_missing=True)

        self._remote(f"release floating IP {ip} of {external_id}", do)
        return self._address_settled(external_id, ip, present=False)

    def _address_settled(self, server_id: str, address: str, *, present: bool) -> Server:
        """Nova learns of a floating IP change from Neutron a moment later: wait for it."""
        deadline = time.monotonic() + self._wait_timeout_s
        while True:
            server = self.get_server(server_id)
            if (address in server.public_ips) == present or time.monotonic() > deadline:
                return server
            time.sleep(self._poll_s)

    def attach_disk(self, external_id: str, disk: Disk) -> Server:
        if not self._has_volumes():
            raise Unsupported("openstack: this cloud has no block-storage service to add disks")
        if disk.size_gb < 1:
            raise InvalidSpec(f"openstack: invalid disk size {disk.size_gb} GB")
        if disk.tier == self._local_tier:
            raise Unsupported(
                f"openstack: disks on the hypervisors' local disk (tier {self._local_tier!r}) "
                "come only with the flavor at create"
            )
        s = self._get_raw(external_id)
        volumes = self._conn.block_storage
        # a name of its own, so a retry after a lost answer finds the volume instead of making
        # a second one
        name = f"{s.name}-data-{secrets.token_hex(4)}"

        def create() -> Any:
            for found in volumes.volumes(name=name):
                return found
            return volumes.create_volume(size=disk.size_gb, volume_type=disk.tier, name=name)

        def attach() -> None:
            current = volumes.get_volume(volume.id)
            if any(a.get("server_id") == external_id for a in current.attachments or ()):
                return  # attached by an earlier attempt
            self._conn.compute.create_volume_attachment(external_id, volume_id=volume.id)

        volume = self._remote(f"create a {disk.size_gb} GB volume", create)
        try:
            self._volume_settled(volume.id, "available")
            self._remote(f"attach volume {volume.id} to {external_id}", attach)
            self._volume_settled(volume.id, "in-use")
        except BaseException:
            with contextlib.suppress(DriverError, os_exc.SDKException):
                self._conn.compute.delete_volume_attachment(external_id, volume.id)
            with contextlib.suppress(DriverError, os_exc.SDKException):
                self._volume_settled(volume.id, "available")
                volumes.delete_volume(volume.id, ignore_missing=True)
            raise
        return self.get_server(external_id)

    def detach_disk(self, external_id: str, disk_id: str) -> Server:
        s = self._get_raw(external_id)
        if disk_id == f"{external_id}:root":
            raise InvalidSpec(
                f"openstack: {disk_id} is the root disk of {s.name}",
                provider_message="The root disk of a server cannot be detached.",
            )
        attached = {str(a.id or a.volume_id) for a in s.attached_volumes or ()}
        if disk_id not in attached:
            raise NotFound(
                f"openstack: server {external_id} has no disk {disk_id!r}",
                provider_message=f"Volume {disk_id} is not attached to server {external_id}.",
            )
        if not _is_volume_id(disk_id) or not self._has_volumes():
            raise Unsupported(f"openstack: {disk_id} is not a volume and cannot be detached")
        self._remote(
            f"detach volume {disk_id} from {external_id}",
            lambda: self._conn.compute.delete_volume_attachment(external_id, disk_id),
        )
        self._volume_settled(disk_id, "available")
        self._remote(
            f"delete volume {disk_id}",
            lambda: self._conn.block_storage.delete_volume(disk_id, ignore_missing=True),
        )
        return self.get_server(external_id)

    def _volume_settled(self, volume_id: str, status: str) -> None:
        deadline = time.monotonic() + self._wait_timeout_s
        while True:
            volume = self._remote(
                f"read volume {volume_id}", lambda: self._conn.block_storage.get_volume(volume_id)
            )
            if volume.status == status:
                return
            if str(volume.status).startswith("error"):
                raise DriverError(
                    f"openstack: volume {volume_id} went to {volume.status}",
                    provider_message=f"volume status {volume.status}",
                )
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"openstack: volume {volume_id} did not become {status} in "
                    f"{self._wait_timeout_s:.0f} s (status {volume.status})",
                    provider_message=f"volume status {volume.status}",
                )
            time.sleep(self._poll_s)

    # -- lifecycle --

    def _act(self, what: str, server_id: str, fn: Callable[[Any], None]) -> None:
        self._remote(f"{what} server {server_id}", lambda: fn(server_id))

    def start(self, external_id: str) -> Server:
        self._act("start", external_id, self._conn.compute.start_server)
        return self._settled(external_id, {"ACTIVE"}, "start")

    def stop(self, external_id: str) -> Server:
        self._act("stop", external_id, self._conn.compute.stop_server)
        return self._settled(external_id, {"SHUTOFF"}, "stop")

    def reboot(self, external_id: str) -> Server:
        self._act("reboot", external_id, lambda i: self._conn.compute.reboot_server(i, "SOFT"))
        return self._settled(external_id, {"ACTIVE"}, "reboot")

    def _settled(self, server_id: str, statuses: set[str], what: str) -> Server:
        s = self._wait(server_id, statuses, what)
        if s.status == "ERROR":
            fault = (s.fault or {}).get("message") or "the server went to ERROR"
            raise DriverError(
                f"openstack: {what} {server_id} failed: {fault}", provider_message=fault
            )
        return self.get_server(server_id)

    def resize(self, external_id: str, *, vcpu: int, memory_mb: int) -> Server:
        if vcpu < 1 or memory_mb < 1:
            raise InvalidSpec(f"openstack: invalid size {vcpu} vCPU / {memory_mb} MB")
        s = self._get_raw(external_id)
        flavor = _need(s.flavor, "server flavor")
        if (int(flavor.vcpus), int(flavor.ram)) == (vcpu, memory_mb):
            return self.get_server(external_id)
        # keep the disks: Nova cannot shrink them, and the data disk must survive
        target = self._ensure_flavor(
            vcpu, memory_mb, int(flavor.disk or 0), int(flavor.ephemeral or 0)
        )
        self._act("resize", external_id, lambda i: self._conn.compute.resize_server(i, target))
        # a resize Nova gives up on (no host has room, say) puts the server back as it was
        # rather than in ERROR, so any settled state ends the wait
        settled = {"VERIFY_RESIZE", "ACTIVE", "SHUTOFF"}
        resized = self._wait(external_id, settled, "finish resizing")
        if resized.status != "VERIFY_RESIZE":
            fault = (resized.fault or {}).get("message") or f"the server is {resized.status}"
            error = ProviderQuotaExceeded if NO_VALID_HOST in fault else DriverError
            raise error(f"openstack: resize {external_id} failed: {fault}", provider_message=fault)
        self._act("confirm the resize of", external_id, self._conn.compute.confirm_server_resize)
        # Nova brings a stopped server back stopped and a running one running
        return self._settled(external_id, {"ACTIVE", "SHUTOFF"}, "confirm the resize")

    def _delete_and_wait(self, server_id: str) -> None:
        self._remote(
            f"delete server {server_id}",
            lambda: self._conn.compute.delete_server(server_id, ignore_missing=False),
        )
        deadline = time.monotonic() + self._wait_timeout_s
        while True:
            try:
                s = self._get_raw(server_id)
            except NotFound:
                return
            if s.status in ("DELETED", "SOFT_DELETED"):
                return
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"openstack: server {server_id} was not gone in {self._wait_timeout_s:.0f} s",
                    provider_message=f"status {s.status}",
                )
            time.sleep(self._poll_s)

    def delete(self, external_id: str) -> None:
        self._delete_and_wait(external_id)

    def set_owner(self, external_id: str, owner_tag: str | None) -> Server:
        s = self._get_raw(external_id)

        def do() -> None:
            if owner_tag is not None:
                self._conn.compute.set_server_metadata(external_id, **{OWNER_KEY: owner_tag})
            elif OWNER_KEY in (s.metadata or {}):
                self._conn.compute.delete_server_metadata(external_id, [OWNER_KEY])

        self._remote(f"set the owner of server {external_id}", do)
        return self.get_server(external_id)
