"""An in-process fake cloud: the embedded demo's default provider and the fastest contract target.

It behaves like a small hypervisor cluster: hosts with capacity and overcommit, storage pools per
tier, networks that hand out addresses, flavors and images, and servers with power states. It can
also misbehave on purpose, so the broker's retry, rollback and reconciliation paths can be tested:

- ``latency_ms``: sleep this long on every call (``time.sleep``; patch it in tests).
- ``fail_on_call``: the Nth call overall (1-based; an int or a list of ints) raises Unavailable.
- ``fail_operations``: ``{operation: kind}`` where kind is one of ``unavailable``, ``not_found``,
  ``conflict``, ``unauthorized``, ``quota``, ``unsupported``; or ``{operation: {"error": kind,
  "times": n}}`` to fail only the next n calls of that operation.
- ``timeout_on``: operation names that raise ``Unavailable("... timed out")``.
- ``create_then_fail``: create_server creates the server and then raises Unavailable (``True`` for
  every create, an int for the next n creates), as when the answer is lost on the way back.

Faults can be changed after construction with ``ex_inject(...)`` and ``ex_clear_faults()``.
Every attempt is one call (a retried call counts twice), and faults apply per driver instance.

State is per instance (``options["state"] == "memory"``, the default), a process-wide named
store (``"shared:<name>"``) that every instance with that name sees, as several connections to one
real provider would, or a file (``"file:<path>"``): shared like a named store and written after
every change, so the embedded demo's servers survive restarts. Hosts, pools, networks, flavors and
images get ids derived from their names, stable across instances and restarts. The first instance
to open a shared store configures it, and ``SimulatorDriver.ex_reset_shared(name)`` forgets it.

``create_server`` is idempotent by request tag: an attempt that finds a server already carrying the
spec's request tag returns it instead of creating a second one, so retrying a create whose answer
was lost is safe. Server names follow host-name rules (1 to 63 characters of letters, digits,
'-', '_' and '.', starting with a letter or digit); others are refused with InvalidSpec.

Each tier has one storage pool. Data disks take room from their tier's pool, at create or later
with ``attach_disk`` (``detach_disk`` gives it back; the root disk, first in ``disks``, stays). A
``storage_hint`` must name the pool of the data disks' tier. Public addresses come from
``PUBLIC_CIDR``, at create (``public_ip``) or with ``add_public_ip``, and are listed in both
``ips`` and ``public_ips``; the bandwidth asked for them is kept and shown in
``extra["bandwidth_mbps"]``. Every one of these operations can be made to fail by its name in
``fail_operations``, like the others.
"""

from __future__ import annotations

import ipaddress
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

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

RESOURCE_CLASSES = ("vcpu", "memory_mb")

DEFAULT_HOSTS: tuple[Mapping[str, Any], ...] = (
    {"name": "sim-host-01", "vcpu": 64, "memory_mb": 262144, "cluster": "sim-cluster"},
    {"name": "sim-host-02", "vcpu": 64, "memory_mb": 262144, "cluster": "sim-cluster"},
)
DEFAULT_STORAGE: Mapping[str, int] = {"ssd": 10240, "hdd": 51200}
DEFAULT_NETWORKS: tuple[Mapping[str, Any], ...] = ({"name": "default", "cidr": "10.0.0.0/16"},)
DEFAULT_FLAVORS: tuple[Mapping[str, Any], ...] = (
    {"name": "s1.small", "vcpu": 1, "memory_mb": 2048, "disk_gb": 20},
    {"name": "s1.medium", "vcpu": 2, "memory_mb": 4096, "disk_gb": 40},
    {"name": "s1.large", "vcpu": 4, "memory_mb": 8192, "disk_gb": 80},
    {"name": "s1.xlarge", "vcpu": 8, "memory_mb": 16384, "disk_gb": 160},
)
DEFAULT_IMAGES: tuple[Mapping[str, Any], ...] = (
    {"name": "kylin-v10-sp3", "os": "linux", "min_disk_gb": 20},
    {"name": "uos-server-20", "os": "linux", "min_disk_gb": 20},
    {"name": "centos-7.9", "os": "linux", "min_disk_gb": 10},
    {"name": "windows-server-2019", "os": "windows", "min_disk_gb": 40},
)
DEFAULT_OVERCOMMIT: Mapping[str, float] = {"vcpu": 4.0, "memory_mb": 1.0}
PUBLIC_CIDR = "203.0.113.0/24"  # TEST-NET-3: never routed
_PUBLIC_NET = ipaddress.ip_network(PUBLIC_CIDR)
FIRST_HOST_OFFSET = 10  # the first addresses of a subnet belong to gateways and DHCP

ERROR_KINDS: Mapping[str, type[DriverError]] = {
    "unavailable": Unavailable,
    "not_found": NotFound,
    "notfound": NotFound,
    "conflict": Conflict,
    "unauthorized": Unauthorized,
    "quota": ProviderQuotaExceeded,
    "provider_quota_exceeded": ProviderQuotaExceeded,
    "unsupported": Unsupported,
}
PROVIDER_MESSAGES: Mapping[type[DriverError], str] = {
    Unavailable: "503 Service Unavailable: the simulated API is temporarily unable to serve",
    NotFound: "404 Not Found: the simulated resource could not be found",
    Conflict: "409 Conflict: the simulated resource is in a state that forbids this",
    Unauthorized: "401 Unauthorized: the simulated credentials were refused",
    ProviderQuotaExceeded: "403 Forbidden: simulated provider quota exceeded",
    Unsupported: "501 Not Implemented: the simulated provider cannot do this",
}
NO_VALID_HOST = "No valid host was found. There are not enough hosts available."


# --- state ---------------------------------------------------------------------------------------


@dataclass
class _HostState:
    external_id: str
    name: str
    cluster: str | None
    total: dict[str, int]


@dataclass
class _PoolState:
    external_id: str
    name: str
    tier: str
    capacity_gb: int


@dataclass
class _NetworkState:
    external_id: str
    name: str
    cidr: str | None


@dataclass
class _ServerState:
    external_id: str
    name: str
    vcpu: int
    memory_mb: int
    disks: list[Disk]
    ips: list[str]
    power_state: PowerState
    owner_tag: str | None
    request_tag: str | None
    created_at: datetime
    host: str
    network: str | None
    image: str
    flavor: str | None
    scope: str | None
    bandwidth_mbps: int | None = None
    # None when the image and flavor gave no root disk: then every disk is a data disk
    root_disk: str | None = None

    def public_ips(self) -> tuple[str, ...]:
        return tuple(ip for ip in self.ips if ipaddress.ip_address(ip) in _PUBLIC_NET)

    def to_server(self) -> Server:
        extra: dict[str, Any] = {"image": self.image, "network": self.network}
        if self.flavor is not None:
            extra["flavor"] = self.flavor
        if self.scope is not None:
            extra["scope"] = self.scope
        if self.bandwidth_mbps is not None:
            extra["bandwidth_mbps"] = self.bandwidth_mbps
        return Server(
            external_id=self.external_id,
            name=self.name,
            vcpu=self.vcpu,
            memory_mb=self.memory_mb,
            disks=tuple(self.disks),
            ips=tuple(self.ips),
            power_state=self.power_state,
            owner_tag=self.owner_tag,
            request_tag=self.request_tag,
            created_at=self.created_at,
            host=self.host,
            extra=extra,
            public_ips=self.public_ips(),
        )


@dataclass
class _Store:
    """One simulated cloud. Every read and write holds `lock`."""

    hosts: list[_HostState]
    overcommit: dict[str, float]
    pools: list[_PoolState]
    networks: list[_NetworkState]
    flavors: list[Flavor]
    images: list[Image]
    servers: dict[str, _ServerState] = field(default_factory=dict)
    scopes: set[str] = field(default_factory=set)
    lock: threading.RLock = field(default_factory=threading.RLock)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> _Store:
        hosts = [
            _HostState(
                external_id=_stable_id("host", str(h["name"])),
                name=str(h["name"]),
                cluster=h.get("cluster"),
                total={"vcpu": int(h["vcpu"]), "memory_mb": int(h["memory_mb"])},
            )
            for h in options.get("hosts") or DEFAULT_HOSTS
        ]
        overcommit = {**DEFAULT_OVERCOMMIT, **(options.get("overcommit") or {})}
        pools = [
            _PoolState(_stable_id("pool", str(tier)), f"sim-{tier}-pool", str(tier), int(gb))
            for tier, gb in (options.get("storage") or DEFAULT_STORAGE).items()
        ]
        networks = [
            _NetworkState(_stable_id("network", str(n["name"])), str(n["name"]), n.get("cidr"))
            for n in options.get("networks") or DEFAULT_NETWORKS
        ]
        flavors = [
            Flavor(
                external_id=_stable_id("flavor", str(f["name"])),
                name=str(f["name"]),
                vcpu=int(f["vcpu"]),
                memory_mb=int(f["memory_mb"]),
                disk_gb=int(f.get("disk_gb", 0)),
            )
            for f in options.get("flavors") or DEFAULT_FLAVORS
        ]
        images = [
            Image(
                external_id=_stable_id("image", str(i["name"])),
                name=str(i["name"]),
                os=i.get("os"),
                min_disk_gb=int(i.get("min_disk_gb", 0)),
            )
            for i in options.get("images") or DEFAULT_IMAGES
        ]
        if not hosts or not pools or not networks:
            raise DriverError("simulator: hosts, storage and networks must not be empty")
        ratios = {k: float(v) for k, v in overcommit.items()}
        return cls(hosts, ratios, pools, networks, flavors, images)

    # -- derived views (call with the lock held) --

    def allocated(self, host: str) -> dict[str, int]:
        used = dict.fromkeys(RESOURCE_CLASSES, 0)
        for s in self.servers.values():
            if s.host == host:
                used["vcpu"] += s.vcpu
                used["memory_mb"] += s.memory_mb
        return used

    def schedulable(self, host: _HostState) -> dict[str, int]:
        return {rc: int(host.total[rc] * self.overcommit.get(rc, 1.0)) for rc in RESOURCE_CLASSES}

    def fits(self, host: _HostState, need: Mapping[str, int]) -> bool:
        used, room = self.allocated(host.name), self.schedulable(host)
        return all(used[rc] + need.get(rc, 0) <= room[rc] for rc in RESOURCE_CLASSES)

    def used_gb(self, tier: str) -> int:
        return sum(d.size_gb for s in self.servers.values() for d in s.disks if d.tier == tier)

    def reserve(self, disks: Iterable[Disk]) -> None:
        """Refuse disks that are empty or that their tier's pool has no room for."""
        want: dict[str, int] = {}
        for d in disks:
            if d.size_gb < 1:
                raise InvalidSpec(f"simulator: invalid disk size {d.size_gb} GB")
            want[d.tier] = want.get(d.tier, 0) + d.size_gb
        for tier, gb in want.items():
            pool = self.pool(tier)
            free = pool.capacity_gb - self.used_gb(tier)
            if gb > free:
                raise ProviderQuotaExceeded(
                    f"simulator: pool {pool.name} has {free} GB free, {gb} GB asked",
                    provider_message=f"Insufficient disk space on datastore '{pool.name}'.",
                )

    def pool(self, tier: str) -> _PoolState:
        for p in self.pools:
            if p.tier == tier:
                return p
        raise NotFound(
            f"simulator: no storage pool of tier {tier!r}",
            provider_message=f"Datastore for tier '{tier}' was not found.",
        )

    def server(self, external_id: str) -> _ServerState:
        try:
            return self.servers[external_id]
        except KeyError:
            raise NotFound(
                f"simulator: no server {external_id!r}",
                provider_message=f"Instance {external_id} could not be found.",
            ) from None

    def allocate_ip(self, cidr: str) -> str:
        used = {ip for s in self.servers.values() for ip in s.ips}
        net = ipaddress.ip_network(cidr, strict=False)
        for i, addr in enumerate(net.hosts()):
            if i + 1 >= FIRST_HOST_OFFSET and str(addr) not in used:
                return str(addr)
        raise ProviderQuotaExceeded(
            f"simulator: network {cidr} has no free address",
            provider_message=f"No more IP addresses available on network {cidr}.",
        )


def _stable_id(kind: str, name: str) -> str:
    """The same configuration gives the same ids in every instance and after restarts, as a
    real cloud's objects keep theirs."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{kind}:{name}"))


_ID_NAMESPACE = uuid.UUID("6f1c2a52-3d4e-4b8a-9c61-5a0e7d2b9f10")


def _dump_servers(store: _Store) -> dict[str, Any]:
    return {
        "scopes": sorted(store.scopes),
        "servers": [
            {
                **{k: getattr(srv, k) for k in _SERVER_SCALARS},
                "disks": [[d.size_gb, d.tier, d.external_id] for d in srv.disks],
                "ips": list(srv.ips),
                "power_state": srv.power_state.value,
                "created_at": srv.created_at.isoformat(),
            }
            for srv in store.servers.values()
        ],
    }


def _load_servers(store: _Store, data: Mapping[str, Any]) -> None:
    store.scopes = set(data.get("scopes", ()))
    for item in data.get("servers", ()):
        srv = _ServerState(
            **{k: item.get(k) for k in _SERVER_SCALARS},
            disks=[Disk(size_gb=d[0], tier=d[1], external_id=d[2]) for d in item["disks"]],
            ips=list(item["ips"]),
            power_state=PowerState(item["power_state"]),
            created_at=datetime.fromisoformat(item["created_at"]),
        )
        if "root_disk" not in item and srv.disks:
            # files written before root_disk was kept: every default image has a root disk
            srv.root_disk = srv.disks[0].external_id
        store.servers[srv.external_id] = srv


_SERVER_SCALARS = (
    "external_id",
    "name",
    "vcpu",
    "memory_mb",
    "owner_tag",
    "request_tag",
    "host",
    "network",
    "image",
    "flavor",
    "scope",
    "bandwidth_mbps",
    "root_disk",
)
MUTATING = frozenset(
    {
        "create_server",
        "start",
        "stop",
        "reboot",
        "resize",
        "delete",
        "set_owner",
        "ensure_tenant_scope",
        "attach_disk",
        "detach_disk",
        "add_public_ip",
        "release_public_ip",
    }
)

_SHARED: dict[str, _Store] = {}
_SHARED_LOCK = threading.Lock()


def _pick(items: Iterable[T], key: str, what: str, attr: Callable[[T], tuple[str, str]]) -> T:
    """Find an inventory item by external id or by name."""
    for item in items:
        if key in attr(item):
            return item
    raise NotFound(
        f"simulator: no {what} {key!r}",
        provider_message=f"{what.capitalize()} {key} could not be found.",
    )


# --- the driver ----------------------------------------------------------------------------------


class SimulatorDriver(Driver):
    kind = "simulator"
    name_max_length = 63
    name_pattern = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")
    name_rule = (
        "1 to 63 characters: letters, digits, '-', '_' and '.', starting with a letter or digit"
    )
    capabilities = frozenset(
        {
            Capability.create,
            Capability.resize,
            Capability.resize_live,
            Capability.power,
            Capability.reboot,
            Capability.floating_ip,
            Capability.volumes,
            Capability.tenant_scope,
            Capability.templates,
            Capability.flavors,
        }
    )

    def __init__(self, endpoint: str, credentials: Mapping[str, str], options: Mapping[str, Any]):
        super().__init__(endpoint, credentials, options)
        state = str(options.get("state", "memory"))
        self._file: Path | None = None
        if state == "memory":
            self._store = _Store.from_options(options)
        elif state.startswith("shared:") and state.removeprefix("shared:"):
            name = state.removeprefix("shared:")
            with _SHARED_LOCK:
                if name not in _SHARED:
                    _SHARED[name] = _Store.from_options(options)
                self._store = _SHARED[name]
        elif state.startswith("file:") and state.removeprefix("file:"):
            self._file = Path(state.removeprefix("file:"))
            with _SHARED_LOCK:
                if state not in _SHARED:
                    store = _Store.from_options(options)
                    if self._file.exists():
                        _load_servers(store, json.loads(self._file.read_text("utf-8")))
                    _SHARED[state] = store
                self._store = _SHARED[state]
        else:
            raise Unsupported(
                f"simulator: unknown state {state!r} (memory, shared:<name> or file:<path>)"
            )
        self._latency_s = float(options.get("latency_ms", 0)) / 1000.0
        self._timeout_s = float(options.get("timeout_ms", 0)) / 1000.0
        attempts = max(1, int(options.get("retries", 3)))
        self._retry = remote(attempts, float(options.get("retry_max_wait", 4.0)))
        self._fault_lock = threading.Lock()
        self._calls: list[str] = []
        self._fail_on_calls: set[int] = set()
        self._fail_operations: dict[str, list[Any]] = {}  # op → [error class, times left or None]
        self._timeout_on: set[str] = set()
        self._create_then_fail: int | None = 0  # None = always
        self.ex_inject(
            fail_on_call=options.get("fail_on_call"),
            fail_operations=options.get("fail_operations"),
            timeout_on=options.get("timeout_on"),
            create_then_fail=options.get("create_then_fail"),
        )

    # -- extras (ex_) --

    def ex_inject(
        self,
        *,
        fail_on_call: int | Iterable[int] | None = None,
        fail_operations: Mapping[str, Any] | None = None,
        timeout_on: Iterable[str] | None = None,
        create_then_fail: bool | int | None = None,
    ) -> None:
        """Add faults. `fail_on_call=N` fails the Nth call from now (1 = the very next call)."""
        with self._fault_lock:
            if fail_on_call is not None:
                ns = [fail_on_call] if isinstance(fail_on_call, int) else list(fail_on_call)
                if any(n < 1 for n in ns):
                    raise ValueError("fail_on_call counts from 1")
                self._fail_on_calls.update(len(self._calls) + n for n in ns)
            for op, how in (fail_operations or {}).items():
                kind, times = (
                    (how, None) if isinstance(how, str) else (how["error"], how.get("times"))
                )
                try:
                    error = ERROR_KINDS[str(kind).lower()]
                except KeyError:
                    raise ValueError(
                        f"unknown error kind {kind!r}: {sorted(ERROR_KINDS)}"
                    ) from None
                self._fail_operations[op] = [error, times]
            if isinstance(timeout_on, str):
                timeout_on = [timeout_on]
            self._timeout_on.update(timeout_on or ())
            if create_then_fail is True:
                self._create_then_fail = None
            elif create_then_fail:
                self._create_then_fail = int(create_then_fail)

    def ex_clear_faults(self) -> None:
        with self._fault_lock:
            self._fail_on_calls.clear()
            self._fail_operations.clear()
            self._timeout_on.clear()
            self._create_then_fail = 0

    @property
    def ex_calls(self) -> list[str]:
        """The operation of every call so far (every attempt, failed or not), in order."""
        with self._fault_lock:
            return list(self._calls)

    @classmethod
    def ex_reset_shared(cls, name: str | None = None) -> None:
        """Forget one shared store (or all of them); the next instance starts a fresh cloud."""
        with _SHARED_LOCK:
            if name is None:
                _SHARED.clear()
            else:
                _SHARED.pop(name.removeprefix("shared:"), None)

    # -- the one door every call goes through --

    def _call(self, op: str) -> None:
        """Count the call, apply latency, then raise the injected fault if one is due."""
        if self._latency_s > 0:
            time.sleep(self._latency_s)
        with self._fault_lock:
            self._calls.append(op)
            n = len(self._calls)
            fail_nth = n in self._fail_on_calls
            self._fail_on_calls.discard(n)
            timeout = op in self._timeout_on
            error: type[DriverError] | None = None
            if op in self._fail_operations:
                error, times = self._fail_operations[op]
                if times is not None:
                    if times <= 1:
                        del self._fail_operations[op]
                    else:
                        self._fail_operations[op][1] = times - 1
        if fail_nth:
            raise Unavailable(
                f"simulator: injected failure of call {n} ({op})",
                provider_message=PROVIDER_MESSAGES[Unavailable],
            )
        if timeout:
            if self._timeout_s > 0:
                time.sleep(self._timeout_s)
            raise Unavailable(
                f"simulator: {op} timed out",
                provider_message=f"Read timed out waiting for {self.endpoint} ({op})",
            )
        if error is not None:
            raise error(
                f"simulator: injected {error.__name__} in {op}",
                provider_message=PROVIDER_MESSAGES[error],
            )

    def _remote(self, op: str, fn: Callable[[], T]) -> T:
        def attempt() -> T:
            self._call(op)
            result = fn()
            if self._file is not None and op in MUTATING:
                self._save()
            return result

        return self._retry(attempt)()

    def _save(self) -> None:
        """Write the servers to the state file (whole, then renamed: never half a file)."""
        assert self._file is not None
        with self._store.lock:
            text = json.dumps(_dump_servers(self._store), ensure_ascii=False, indent=1)
        tmp = self._file.with_name(f".{self._file.name}.{uuid.uuid4().hex}")
        tmp.write_text(text, "utf-8")
        tmp.replace(self._file)

    # -- inventory --

    def check(self) -> None:
        def do() -> None:
            expected = self.options.get("accept_credentials")
            if expected is not None and dict(self.credentials) != dict(expected):
                raise Unauthorized(
                    "simulator: credentials refused",
                    provider_message="401 Unauthorized: The request you have made requires "
                    "authentication.",
                )

        self._remote("check", do)

    def list_hosts(self) -> list[Host]:
        def do() -> list[Host]:
            st = self._store
            with st.lock:
                return [
                    Host(
                        external_id=h.external_id,
                        name=h.name,
                        cluster=h.cluster,
                        capacity=Capacity(total=dict(h.total), allocated=st.allocated(h.name)),
                        overcommit=dict(st.overcommit),
                        extra={"schedulable": st.schedulable(h)},
                    )
                    for h in st.hosts
                ]

        return self._remote("list_hosts", do)

    def list_storage(self) -> list[StoragePool]:
        def do() -> list[StoragePool]:
            st = self._store
            with st.lock:
                return [
                    StoragePool(
                        external_id=p.external_id,
                        name=p.name,
                        tier=p.tier,
                        capacity_gb=p.capacity_gb,
                        free_gb=p.capacity_gb - st.used_gb(p.tier),
                    )
                    for p in st.pools
                ]

        return self._remote("list_storage", do)

    def list_networks(self) -> list[Network]:
        def do() -> list[Network]:
            with self._store.lock:
                return [Network(n.external_id, n.name, n.cidr) for n in self._store.networks]

        return self._remote("list_networks", do)

    def list_flavors(self) -> list[Flavor]:
        def do() -> list[Flavor]:
            with self._store.lock:
                return list(self._store.flavors)

        return self._remote("list_flavors", do)

    def list_images(self) -> list[Image]:
        def do() -> list[Image]:
            with self._store.lock:
                return list(self._store.images)

        return self._remote("list_images", do)

    # -- servers --

    def list_servers(self) -> list[Server]:
        def do() -> list[Server]:
            with self._store.lock:
                return [s.to_server() for s in self._store.servers.values()]

        return self._remote("list_servers", do)

    def get_server(self, external_id: str) -> Server:
        def do() -> Server:
            with self._store.lock:
                return self._store.server(external_id).to_server()

        return self._remote("get_server", do)

    def find_server_by_tag(self, request_tag: str) -> Server | None:
        def do() -> Server | None:
            with self._store.lock:
                found = self._by_tag(request_tag)
                return found.to_server() if found else None

        return self._remote("find_server_by_tag", do)

    def _by_tag(self, request_tag: str) -> _ServerState | None:
        for s in self._store.servers.values():
            if s.request_tag == request_tag:
                return s
        return None

    def create_server(self, spec: ServerSpec) -> Server:
        def do() -> Server:
            with self._store.lock:
                existing = self._by_tag(spec.request_tag)
                server = existing.to_server() if existing else self._create(spec)
            with self._fault_lock:
                fail = self._create_then_fail is None or self._create_then_fail > 0
                if self._create_then_fail:
                    self._create_then_fail -= 1
            if fail:
                raise Unavailable(
                    f"simulator: create_server lost the answer after creating {server.external_id}",
                    provider_message="504 Gateway Timeout: the request may have completed",
                )
            return server

        return self._remote("create_server", do)

    def _create(self, spec: ServerSpec) -> Server:
        st = self._store
        why = self.invalid_name(spec.name)
        if why is not None:
            raise InvalidSpec(
                f"simulator: invalid server name {spec.name!r}: {why}",
                provider_message=f"Invalid input for field/attribute name. Value: {spec.name}.",
            )
        if spec.bandwidth_mbps is not None and spec.bandwidth_mbps < 1:
            raise InvalidSpec(f"simulator: invalid bandwidth {spec.bandwidth_mbps} Mbit/s")
        flavor: Flavor | None = None
        if spec.flavor is not None:
            flavor = _pick(st.flavors, spec.flavor, "flavor", lambda f: (f.external_id, f.name))
            vcpu, memory_mb = flavor.vcpu, flavor.memory_mb
        elif spec.vcpu is not None and spec.memory_mb is not None:
            vcpu, memory_mb = spec.vcpu, spec.memory_mb
        else:
            raise InvalidSpec("simulator: a server needs a flavor or both vcpu and memory_mb")
        if vcpu < 1 or memory_mb < 1:
            raise InvalidSpec(f"simulator: invalid size {vcpu} vCPU / {memory_mb} MB")
        image = _pick(st.images, spec.image, "image", lambda i: (i.external_id, i.name))
        if spec.network is None:
            network = st.networks[0]
        else:
            network = _pick(st.networks, spec.network, "network", lambda n: (n.external_id, n.name))
        if spec.scope is not None and spec.scope not in st.scopes:
            raise NotFound(
                f"simulator: no tenant scope {spec.scope!r}",
                provider_message=f"Folder {spec.scope} could not be found.",
            )

        need = {"vcpu": vcpu, "memory_mb": memory_mb}
        candidates = st.hosts
        if spec.host_hint is not None:
            candidates = [
                _pick(st.hosts, spec.host_hint, "host", lambda h: (h.external_id, h.name))
            ]
        host = next((h for h in candidates if st.fits(h, need)), None)
        if host is None:
            raise ProviderQuotaExceeded(
                f"simulator: no host can place {vcpu} vCPU / {memory_mb} MB",
                provider_message=NO_VALID_HOST,
            )

        if spec.storage_hint is not None:
            self._check_hint(spec.storage_hint, spec.disks)
        root_gb = max(flavor.disk_gb if flavor else 0, image.min_disk_gb)
        disks = [Disk(root_gb, st.pools[0].tier)] if root_gb else []
        disks += list(spec.disks)
        st.reserve(disks)
        disks = [Disk(d.size_gb, d.tier, external_id=str(uuid.uuid4())) for d in disks]
        root_disk = disks[0].external_id if root_gb else None

        ips = [st.allocate_ip(network.cidr or "10.0.0.0/16")]
        if spec.public_ip:
            ips.append(st.allocate_ip(PUBLIC_CIDR))
        server = _ServerState(
            external_id=str(uuid.uuid4()),
            name=spec.name,
            vcpu=vcpu,
            memory_mb=memory_mb,
            disks=disks,
            ips=ips,
            power_state=PowerState.running,
            owner_tag=spec.owner_tag,
            request_tag=spec.request_tag,
            created_at=datetime.now(UTC),
            host=host.name,
            network=network.name,
            image=image.name,
            flavor=flavor.name if flavor else None,
            scope=spec.scope,
            bandwidth_mbps=spec.bandwidth_mbps,
            root_disk=root_disk,
        )
        st.servers[server.external_id] = server
        return server.to_server()

    def _check_hint(self, hint: str, disks: Iterable[Disk]) -> None:
        """One pool per tier: a hint can only confirm the pool the data disks go to anyway."""
        pool = _pick(self._store.pools, hint, "storage pool", lambda p: (p.external_id, p.name))
        other = sorted({d.tier for d in disks if d.tier != pool.tier})
        if other:
            raise InvalidSpec(
                f"simulator: storage pool {pool.name} holds tier {pool.tier!r}, not "
                f"{', '.join(repr(t) for t in other)}",
                provider_message=f"Datastore '{pool.name}' does not match the storage policy.",
            )

    def _change(self, op: str, external_id: str, fn: Callable[[_ServerState], None]) -> Server:
        def do() -> Server:
            with self._store.lock:
                server = self._store.server(external_id)
                fn(server)
                return server.to_server()

        return self._remote(op, do)

    def start(self, external_id: str) -> Server:
        def power_on(s: _ServerState) -> None:
            if s.power_state == PowerState.running:
                raise _invalid_state(s, "power on")
            s.power_state = PowerState.running

        return self._change("start", external_id, power_on)

    def stop(self, external_id: str) -> Server:
        def power_off(s: _ServerState) -> None:
            if s.power_state == PowerState.stopped:
                raise _invalid_state(s, "power off")
            s.power_state = PowerState.stopped

        return self._change("stop", external_id, power_off)

    def reboot(self, external_id: str) -> Server:
        def reboot(s: _ServerState) -> None:
            if s.power_state != PowerState.running:
                raise _invalid_state(s, "reboot")

        return self._change("reboot", external_id, reboot)

    def resize(self, external_id: str, *, vcpu: int, memory_mb: int) -> Server:
        def resize(s: _ServerState) -> None:
            if vcpu < 1 or memory_mb < 1:
                raise InvalidSpec(f"simulator: invalid size {vcpu} vCPU / {memory_mb} MB")
            st = self._store
            host = _pick(st.hosts, s.host, "host", lambda h: (h.external_id, h.name))
            delta = {"vcpu": vcpu - s.vcpu, "memory_mb": memory_mb - s.memory_mb}
            if not st.fits(host, delta):
                raise ProviderQuotaExceeded(
                    f"simulator: host {host.name} cannot grow {s.name} to {vcpu} vCPU / "
                    f"{memory_mb} MB",
                    provider_message=NO_VALID_HOST,
                )
            s.vcpu, s.memory_mb, s.flavor = vcpu, memory_mb, None

        return self._change("resize", external_id, resize)

    def delete(self, external_id: str) -> None:
        def do() -> None:
            with self._store.lock:
                self._store.server(external_id)
                del self._store.servers[external_id]

        self._remote("delete", do)

    def attach_disk(self, external_id: str, disk: Disk) -> Server:
        def attach(s: _ServerState) -> None:
            self._store.reserve([disk])
            s.disks.append(Disk(disk.size_gb, disk.tier, external_id=str(uuid.uuid4())))

        return self._change("attach_disk", external_id, attach)

    def detach_disk(self, external_id: str, disk_id: str) -> Server:
        def detach(s: _ServerState) -> None:
            index = next((i for i, d in enumerate(s.disks) if d.external_id == disk_id), None)
            if index is None or not disk_id:
                raise NotFound(
                    f"simulator: server {s.name} has no disk {disk_id!r}",
                    provider_message=f"Volume {disk_id} could not be found.",
                )
            if disk_id == s.root_disk:
                raise InvalidSpec(
                    f"simulator: disk {disk_id} is the root disk of {s.name}",
                    provider_message=f"Can't detach root device volume {disk_id}.",
                )
            del s.disks[index]

        return self._change("detach_disk", external_id, detach)

    def add_public_ip(self, external_id: str, *, bandwidth_mbps: int | None = None) -> Server:
        def add(s: _ServerState) -> None:
            if bandwidth_mbps is not None and bandwidth_mbps < 1:
                raise InvalidSpec(f"simulator: invalid bandwidth {bandwidth_mbps} Mbit/s")
            s.ips.append(self._store.allocate_ip(PUBLIC_CIDR))
            if bandwidth_mbps is not None:
                s.bandwidth_mbps = bandwidth_mbps

        return self._change("add_public_ip", external_id, add)

    def release_public_ip(self, external_id: str, ip: str) -> Server:
        def release(s: _ServerState) -> None:
            if ip not in s.public_ips():
                raise NotFound(
                    f"simulator: server {s.name} has no public address {ip!r}",
                    provider_message=f"Floating IP {ip} is not associated with instance "
                    f"{s.external_id}.",
                )
            s.ips.remove(ip)

        return self._change("release_public_ip", external_id, release)

    def ensure_tenant_scope(self, tenant_code: str) -> str | None:
        def do() -> str:
            if not tenant_code:
                raise InvalidSpec("simulator: an empty tenant code has no scope")
            scope = f"govbroker/{tenant_code}"
            with self._store.lock:
                self._store.scopes.add(scope)
            return scope

        return self._remote("ensure_tenant_scope", do)

    def set_owner(self, external_id: str, owner_tag: str | None) -> Server:
        def set_owner(s: _ServerState) -> None:
            s.owner_tag = owner_tag

        return self._change("set_owner", external_id, set_owner)


def _invalid_state(server: _ServerState, action: str) -> Conflict:
    return Conflict(
        f"simulator: cannot {action} {server.name} while it is {server.power_state}",
        provider_message=f"The attempted operation cannot be performed in the current state "
        f"({server.power_state.value}).",
    )
