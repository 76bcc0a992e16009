"""The Driver interface and the plain data types that cross the boundary.

Every hypervisor adapter translates its SDK's objects into these types at the edge, so nothing of
pyvmomi, openstacksdk or libvirt reaches the broker. Drivers raise only `DriverError` subclasses,
each keeping the provider's own message. Modules are found through `REGISTRY` and imported
lazily, so a missing optional SDK breaks only its own driver.
"""

from __future__ import annotations

import abc
import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

from tenacity import (
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

# --- errors ------------------------------------------------------------------------------------


class DriverError(Exception):
    """Base of every error a driver raises; `provider_message` is the provider's own words."""

    retryable = False

    def __init__(self, message: str, *, provider_message: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.provider_message = provider_message or message


class NotFound(DriverError):
    pass


class Conflict(DriverError):
    """The object is in a state that forbids the operation (e.g. powering off a stopped VM)."""


class Unauthorized(DriverError):
    pass


class Unavailable(DriverError):
    """The provider cannot answer now (timeout, connection refused, 5xx); retrying may work."""

    retryable = True


class ProviderQuotaExceeded(DriverError):
    """The provider's own quota refused the request (not govbroker's)."""


class Unsupported(DriverError):
    """The provider lacks the capability asked for."""


class InvalidSpec(DriverError):
    """The request itself is wrong (no size, a zero-sized disk): retrying cannot help."""


# --- data types --------------------------------------------------------------------------------


class PowerState(StrEnum):
    running = "running"
    stopped = "stopped"
    suspended = "suspended"
    building = "building"
    error = "error"
    unknown = "unknown"


class Capability(StrEnum):
    create = "create"
    resize_live = "resize_live"
    resize = "resize"
    power = "power"
    reboot = "reboot"
    floating_ip = "floating_ip"
    volumes = "volumes"
    tenant_scope = "tenant_scope"
    incremental_sync = "incremental_sync"
    templates = "templates"
    flavors = "flavors"


@dataclass(frozen=True)
class Capacity:
    """Per resource class: what exists and what is allocated (before overcommit). Stopped
    servers count as allocated: their resources stay reserved on the host."""

    total: Mapping[str, int]
    allocated: Mapping[str, int]


@dataclass(frozen=True)
class Host:
    external_id: str
    name: str
    cluster: str | None
    capacity: Capacity
    overcommit: Mapping[str, float] = field(default_factory=dict)
    state: str = "up"
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoragePool:
    external_id: str
    name: str
    tier: str
    capacity_gb: int
    free_gb: int
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Network:
    external_id: str
    name: str
    cidr: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Flavor:
    external_id: str
    name: str
    vcpu: int
    memory_mb: int
    disk_gb: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Image:
    external_id: str
    name: str
    os: str | None = None
    min_disk_gb: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Disk:
    size_gb: int
    tier: str
    external_id: str | None = None


@dataclass(frozen=True)
class Server:
    external_id: str
    name: str
    vcpu: int
    memory_mb: int
    disks: tuple[Disk, ...]
    ips: tuple[str, ...]
    power_state: PowerState
    owner_tag: str | None
    request_tag: str | None
    created_at: datetime | None
    host: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    # the addresses of `ips` reachable from outside (floating IPs, public pool addresses)
    public_ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServerSpec:
    """What to create: a flavor or a custom size, an image/template, a network, data disks.

    `flavor`, `image` and `network` are the provider's external ids, as the list_* calls return
    them. `disks` are the data disks; the root disk comes from the flavor or image.
    """

    name: str
    image: str
    network: str | None
    owner_tag: str
    request_tag: str
    flavor: str | None = None
    vcpu: int | None = None
    memory_mb: int | None = None
    disks: tuple[Disk, ...] = ()
    public_ip: bool = False
    host_hint: str | None = None
    storage_hint: str | None = None  # a storage pool's external id, for the disks
    scope: str | None = None  # from ensure_tenant_scope
    bandwidth_mbps: int | None = None  # of the public IP, where the provider can limit it


# --- the interface -----------------------------------------------------------------------------


class Driver(abc.ABC):
    """One provider (an OpenStack region, a vCenter, a set of libvirt hosts, the simulator)."""

    kind: str = "abstract"
    capabilities: frozenset[Capability] = frozenset()
    # what the provider accepts as a server name; `name_rule` says it in words for the user
    name_max_length: int = 255
    # matched from the start with \Z at the end: "$" would let a trailing newline through
    name_pattern: re.Pattern[str] = re.compile(r"^[^\x00-\x1f\x7f]+\Z")
    name_rule: str = "1 to 255 characters, no control characters"

    def __init__(self, endpoint: str, credentials: Mapping[str, str], options: Mapping[str, Any]):
        self.endpoint = endpoint
        self.credentials = credentials
        self.options = options

    def require(self, capability: Capability) -> None:
        if capability not in self.capabilities:
            raise Unsupported(f"{self.kind} provider cannot {capability}")

    @classmethod
    def invalid_name(cls, name: str) -> str | None:
        """Why the provider would refuse `name` as a server name, or None when it is fine.
        A class method: the broker checks names before it reserves anything or connects."""
        if not name or len(name) > cls.name_max_length or not cls.name_pattern.match(name):
            return f"{cls.kind} server names are {cls.name_rule}"
        return None

    @abc.abstractmethod
    def check(self) -> None:
        """Connect and authenticate; raise a DriverError when that fails."""

    @abc.abstractmethod
    def list_hosts(self) -> list[Host]: ...

    @abc.abstractmethod
    def list_storage(self) -> list[StoragePool]: ...

    @abc.abstractmethod
    def list_networks(self) -> list[Network]: ...

    @abc.abstractmethod
    def list_flavors(self) -> list[Flavor]: ...

    @abc.abstractmethod
    def list_images(self) -> list[Image]: ...

    @abc.abstractmethod
    def list_servers(self) -> list[Server]:
        """Every server, in bulk (never one round trip per server)."""

    @abc.abstractmethod
    def get_server(self, external_id: str) -> Server: ...

    @abc.abstractmethod
    def find_server_by_tag(self, request_tag: str) -> Server | None:
        """The server created for a request, found after a crash by the tag it carries."""

    @abc.abstractmethod
    def create_server(self, spec: ServerSpec) -> Server:
        """Create and return the server once it runs. Idempotent on `spec.request_tag`: when a
        server with that tag exists already (a retried or replayed create), that server is
        returned instead of a second one. `Server.disks` lists the root disk first."""

    @abc.abstractmethod
    def start(self, external_id: str) -> Server: ...

    @abc.abstractmethod
    def stop(self, external_id: str) -> Server: ...

    @abc.abstractmethod
    def reboot(self, external_id: str) -> Server: ...

    @abc.abstractmethod
    def resize(self, external_id: str, *, vcpu: int, memory_mb: int) -> Server: ...

    @abc.abstractmethod
    def delete(self, external_id: str) -> None: ...

    def custom_root_gb(self) -> int:
        """The root disk a custom-size server (no flavor) gets before the image's minimum, so
        that the broker reserves what the provider will make."""
        return 0

    def root_tier(self) -> str | None:
        """The storage tier a new server's root disk is made in, so that the broker reserves
        and places it there; by default the first tier the provider lists."""
        return next((p.tier for p in self.list_storage()), None)

    def attach_disk(self, external_id: str, disk: Disk) -> Server:
        """Create a data disk of `disk.size_gb` on `disk.tier` and attach it; the returned
        server lists it (with its external id) after the disks it had."""
        raise Unsupported(f"{self.kind} provider cannot attach disks")

    def detach_disk(self, external_id: str, disk_id: str) -> Server:
        """Detach the data disk `disk_id` and delete it (the root disk cannot be detached)."""
        raise Unsupported(f"{self.kind} provider cannot detach disks")

    def add_public_ip(self, external_id: str, *, bandwidth_mbps: int | None = None) -> Server:
        """Give the server one public address (listed in `ips` and `public_ips`)."""
        raise Unsupported(f"{self.kind} provider cannot add public IPs")

    def release_public_ip(self, external_id: str, ip: str) -> Server:
        """Take the public address `ip` off the server and give it back to the pool."""
        raise Unsupported(f"{self.kind} provider cannot release public IPs")

    @abc.abstractmethod
    def ensure_tenant_scope(self, tenant_code: str) -> str | None:
        """The provider-side home of a tenant (project, folder), created on demand."""

    @abc.abstractmethod
    def set_owner(self, external_id: str, owner_tag: str | None) -> Server: ...

    def close(self) -> None:  # noqa: B027 - optional hook; most drivers hold nothing
        """Release connections."""


# --- retries -----------------------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def remote(attempts: int = 3, max_wait: float = 4.0) -> Callable[[F], F]:
    """Retry a remote call on retryable errors only (Unavailable), with jittered backoff."""
    return retry(  # type: ignore[return-value]
        retry=retry_if_exception_type(Unavailable),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential_jitter(multiplier=0.05, max=max_wait),
        reraise=True,
    )


# --- registry ----------------------------------------------------------------------------------

# kind → (module, class): imported only when a provider of that kind is used
REGISTRY: dict[str, tuple[str, str]] = {
    "simulator": ("drivers.simulator", "SimulatorDriver"),
    "libvirt": ("drivers.libvirt", "LibvirtDriver"),
    "vmware": ("drivers.vmware", "VMwareDriver"),
    "openstack": ("drivers.openstack", "OpenStackDriver"),
}


def driver_class(kind: str) -> type[Driver]:
    try:
        module_name, class_name = REGISTRY[kind]
    except KeyError as exc:
        raise Unsupported(f"no driver for provider kind {kind!r}") from exc
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise Unavailable(
            f"the {kind} driver needs an optional package: {exc.name or exc}",
            provider_message=str(exc),
        ) from exc
    cls = getattr(module, class_name)
    assert issubclass(cls, Driver)
    return cls


def open_driver(
    kind: str, endpoint: str, credentials: Mapping[str, str], options: Mapping[str, Any]
) -> Driver:
    return driver_class(kind)(endpoint, credentials, options)
