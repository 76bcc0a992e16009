"""The KVM driver: a set of libvirt hosts, spoken to with libvirt-python.

The endpoint is one libvirt URI per host, separated by commas or whitespace (``qemu+ssh://`` or
``qemu+tls://`` in production, ``test:///<absolute path to a host XML>`` in tests). The provider is
the set of those hosts; each keeps one connection for the driver's lifetime (opened lazily, closed
in ``close()``): with the test driver every connection has its own copy of the host's state, and
with a remote daemon reconnecting on every call would cost a TLS or SSH handshake.

What govbroker keeps on a domain lives in its ``<metadata>``, in an element of the namespace
``urn:govbroker:libvirt:1`` (owner tag, request tag, creation time, flavor, image). A domain
without that element is unmanaged: it is listed with no owner.

Identifiers: a server is its domain UUID; a host is its name, taken from the URI (the host name of
a remote URI, the file name of a test-driver URI); a storage pool is ``<host>/<pool>``; networks,
images and flavors are their names, because a network or image of the same name on several hosts
is the same thing to the broker (govnet bridged to one VLAN on every host, one golden image copied
to each host's image pool).

Options (all optional):

- ``pool_tiers``: ``{pool name: tier}``; otherwise a pool's tier is its name up to the first
  ``-``, ``_`` or ``.`` (``ssd-pool`` → ``ssd``).
- ``image_pool``: the pool holding image volumes (``images``); it is not offered as storage.
- ``root_tier``: the tier of root disks (``ssd`` when the host has it, else its first pool's).
- ``flavors``: ``[{name, vcpu, memory_mb, disk_gb}]``; libvirt has none of its own.
- ``overcommit``: ``{resource class: ratio}`` used for placement (vcpu 4.0, memory_mb 1.0).
- ``live_resize_factor``: a domain is defined with this many times its vCPUs and memory as its
  maximum (capped by the host), so it can grow while running (2.0).
- ``volume_format``: the format of new volumes (``qcow2``).
- ``stop_timeout``: seconds a graceful shutdown may take before the domain is powered off (60).
- ``keepalive_interval``, ``keepalive_count``: libvirt keepalive on remote connections, so a dead
  host fails calls in interval × count seconds instead of hanging (5 and 3; 0 disables).
- ``retries``, ``retry_max_wait``: attempts and backoff cap (seconds) for Unavailable errors.
- ``cluster``: the cluster name reported on every host; ``domain_type``: override ``kvm``.

- ``detach_timeout``: seconds a running guest may take to release a detached disk before its
  volume is deleted (30).

Data disks are attached and detached after creation: ``attach_disk`` creates a volume in a pool
of the tier on the server's host and hot-plugs it (or adds it to the definition of a stopped
domain); ``detach_disk`` unplugs it and deletes the volume. A hypervisor without hot-plug (libvirt's
test driver is one) can only change stopped servers: running ones are refused with Unsupported.
Server names become the domain title (the domain name is a slug of it plus a UUID prefix), and
libvirt refuses a '/' or a newline in either, so names with '/' or control characters are refused.
There are no public addresses: a server's addresses come from its network's DHCP range.

Credentials (optional) ``username`` and ``password`` answer SASL prompts; SSH and TLS transports
authenticate with keys and certificates named in the URI.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import re
import secrets
import socket
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

import libvirt

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

NS = "urn:govbroker:libvirt:1"
NS_PREFIX = "govbroker"
ET.register_namespace(NS_PREFIX, NS)

GIB = 1024**3
KIB = 1024
DEFAULT_FLAVORS: tuple[Mapping[str, Any], ...] = (
    {"name": "s1.small", "vcpu": 1, "memory_mb": 2048, "disk_gb": 20},
    {"name": "s1.medium", "vcpu": 2, "memory_mb": 4096, "disk_gb": 40},
    {"name": "s1.large", "vcpu": 4, "memory_mb": 8192, "disk_gb": 80},
    {"name": "s1.xlarge", "vcpu": 8, "memory_mb": 16384, "disk_gb": 160},
)
DEFAULT_OVERCOMMIT: Mapping[str, float] = {"vcpu": 4.0, "memory_mb": 1.0}
RESERVATION_ATTEMPTS = 5  # another broker may take the address we picked; try the next one

# libvirt does not print its errors to stderr: every one is raised and translated below.
libvirt.registerErrorHandler(lambda *_: None, None)


# --- errors --------------------------------------------------------------------------------------


def _codes(*names: str) -> frozenset[int]:
    # getattr: older bindings lack the newer codes, and a missing one must not break the import
    return frozenset(getattr(libvirt, n) for n in names if hasattr(libvirt, n))


_NOT_FOUND = _codes(
    "VIR_ERR_NO_DOMAIN",
    "VIR_ERR_NO_NETWORK",
    "VIR_ERR_NO_STORAGE_POOL",
    "VIR_ERR_NO_STORAGE_VOL",
    "VIR_ERR_NO_DOMAIN_SNAPSHOT",
    "VIR_ERR_NO_DOMAIN_METADATA",
    "VIR_ERR_NO_NETWORK_PORT",
    "VIR_ERR_NO_INTERFACE",
    "VIR_ERR_NO_NODE_DEVICE",
    "VIR_ERR_NO_SECRET",
)
_CONFLICT = _codes(
    "VIR_ERR_OPERATION_INVALID",
    "VIR_ERR_DOM_EXIST",
    "VIR_ERR_STORAGE_VOL_EXIST",
    "VIR_ERR_NETWORK_EXIST",
)
_UNAUTHORIZED = _codes(
    "VIR_ERR_AUTH_FAILED",
    "VIR_ERR_AUTH_CANCELLED",
    "VIR_ERR_AUTH_UNAVAILABLE",
    "VIR_ERR_ACCESS_DENIED",
    "VIR_ERR_OPERATION_DENIED",
)
_UNAVAILABLE = _codes(
    "VIR_ERR_NO_CONNECT",
    "VIR_ERR_INVALID_CONN",
    "VIR_ERR_RPC",
    "VIR_ERR_OPERATION_TIMEOUT",
    "VIR_ERR_AGENT_UNRESPONSIVE",
)
# any error raised by the transport itself (a refused connection, a reset, a closed socket) comes
# from these sources whatever its code
_TRANSPORT_SOURCES = _codes("VIR_FROM_RPC", "VIR_FROM_REMOTE", "VIR_FROM_SSH", "VIR_FROM_LIBSSH")
_UNSUPPORTED = _codes("VIR_ERR_NO_SUPPORT", "VIR_ERR_OPERATION_UNSUPPORTED")
_INVALID = _codes("VIR_ERR_INVALID_ARG", "VIR_ERR_XML_ERROR", "VIR_ERR_XML_DETAIL")


def translate_error(
    error: libvirt.libvirtError, context: str, *, connecting: bool = False
) -> DriverError:
    """The DriverError for a libvirt error, keeping libvirt's own message.

    While connecting, every failure that is not about credentials is Unavailable: the broker can
    only wait for the host (or for someone to fix its URI) and try again.
    """
    code = error.get_error_code()
    source = error.get_error_domain()
    provider_message = error.get_error_message() or str(error) or "unknown libvirt error"
    message = f"libvirt: {context}: {provider_message}"
    kind: type[DriverError]
    if code in _UNAUTHORIZED:
        kind = Unauthorized
    elif connecting or code in _UNAVAILABLE or source in _TRANSPORT_SOURCES:
        kind = Unavailable
    elif code in _NOT_FOUND:
        kind = NotFound
    elif code in _CONFLICT:
        kind = Conflict
    elif code in _UNSUPPORTED:
        kind = Unsupported
    elif code in _INVALID:
        kind = InvalidSpec
    else:
        kind = DriverError
    return kind(message, provider_message=provider_message)


def _is(error: libvirt.libvirtError, *names: str) -> bool:
    return error.get_error_code() in _codes(*names)


# --- XML -----------------------------------------------------------------------------------------

_UNITS: Mapping[str, int] = {
    "b": 1,
    "bytes": 1,
    "kb": 1000,
    "k": KIB,
    "kib": KIB,
    "mb": 1000**2,
    "m": KIB**2,
    "mib": KIB**2,
    "gb": 1000**3,
    "g": GIB,
    "gib": GIB,
    "tb": 1000**4,
    "t": KIB**4,
    "tib": KIB**4,
}


def _parse(xml: str) -> ET.Element:
    # The XML comes from our own hypervisors, and the stdlib parser resolves no external entities.
    return ET.fromstring(xml)  # noqa: S314


def _size_bytes(element: ET.Element | None, default_unit: str) -> int | None:
    if element is None or not (element.text or "").strip():
        return None
    unit = (element.get("unit") or default_unit).lower()
    return int(element.text or "0") * _UNITS.get(unit, 1)


def _gib(size_bytes: int) -> int:
    return math.ceil(size_bytes / GIB)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _without_namespace(element: ET.Element) -> ET.Element:
    """A copy with plain tags: setMetadata applies govbroker's namespace itself."""
    copy = ET.Element(_local(element.tag), dict(element.attrib))
    copy.text = element.text
    for child in element:
        plain = _without_namespace(child)
        plain.tail = None
        copy.append(plain)
    return copy


@dataclass(frozen=True)
class _Tags:
    """govbroker's metadata element on a domain; None fields are absent."""

    owner: str | None = None
    request: str | None = None
    created: datetime | None = None
    flavor: str | None = None
    image: str | None = None

    FIELDS: ClassVar[tuple[str, ...]] = ("owner", "request", "created", "flavor", "image")

    @classmethod
    def from_element(cls, element: ET.Element | None) -> _Tags | None:
        if element is None:
            return None
        values: dict[str, Any] = {}
        for child in element:
            name = _local(child.tag)
            if name in cls.FIELDS and child.text and child.text.strip():
                values[name] = child.text.strip()
        if "created" in values:
            try:
                created = datetime.fromisoformat(values["created"])
            except ValueError:
                created = None
            if created is not None and created.tzinfo is None:
                created = created.replace(tzinfo=UTC)  # we always write UTC; old entries too
            values["created"] = created.astimezone(UTC) if created else None
        return cls(**values)

    def element(self, namespace: str | None) -> ET.Element:
        def tag(name: str) -> str:
            return f"{{{namespace}}}{name}" if namespace else name

        root = ET.Element(tag("instance"))
        for name in self.FIELDS:
            value = getattr(self, name)
            if value is not None:
                child = ET.SubElement(root, tag(name))
                child.text = value.isoformat() if isinstance(value, datetime) else str(value)
        return root


@dataclass(frozen=True)
class _DiskRef:
    target: str
    pool: str | None
    volume: str | None
    path: str | None
    shared: bool  # read-only or shareable: another domain may use it too


@dataclass(frozen=True)
class _Domain:
    """What one domain XML says, parsed once."""

    uuid: str
    name: str
    title: str | None
    vcpu: int
    max_vcpu: int
    memory_kib: int
    max_memory_kib: int
    tags: _Tags | None
    metadata: ET.Element | None
    disks: tuple[_DiskRef, ...]
    nics: tuple[tuple[str, str | None], ...]  # (mac, network name)

    @property
    def display_name(self) -> str:
        return self.title or self.name


def _parse_domain(xml: str) -> _Domain:
    root = _parse(xml)
    vcpu_el = root.find("vcpu")
    max_vcpu = int((vcpu_el.text if vcpu_el is not None else None) or "1")
    vcpu = int(vcpu_el.get("current", max_vcpu)) if vcpu_el is not None else max_vcpu
    max_memory = _size_bytes(root.find("memory"), "KiB") or 0
    memory = _size_bytes(root.find("currentMemory"), "KiB") or max_memory
    metadata = root.find(f"metadata/{{{NS}}}instance")
    disks = []
    for disk in root.iterfind("devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue  # CD-ROMs and floppies hold images, not the server's storage
        source = disk.find("source")
        target = disk.find("target")
        attrs = source.attrib if source is not None else {}
        disks.append(
            _DiskRef(
                target=target.get("dev", "") if target is not None else "",
                pool=attrs.get("pool"),
                volume=attrs.get("volume"),
                path=attrs.get("file") or attrs.get("dev"),
                shared=disk.find("readonly") is not None or disk.find("shareable") is not None,
            )
        )
    nics = []
    for nic in root.iterfind("devices/interface"):
        mac = nic.find("mac")
        source = nic.find("source")
        if mac is not None and mac.get("address"):
            network = source.get("network") if source is not None else None
            nics.append((mac.get("address", "").lower(), network))
    title = root.findtext("title")
    return _Domain(
        uuid=root.findtext("uuid", ""),
        name=root.findtext("name", ""),
        title=title.strip() if title and title.strip() else None,
        vcpu=vcpu,
        max_vcpu=max_vcpu,
        memory_kib=memory // KIB,
        max_memory_kib=max_memory // KIB,
        tags=_Tags.from_element(metadata),
        metadata=metadata,
        disks=tuple(disks),
        nics=tuple(nics),
    )


@dataclass(frozen=True)
class _Net:
    """A network on one host: its subnet, DHCP ranges and who holds which address."""

    name: str
    cidr: str | None
    gateway: str | None
    ip_index: int | None  # the <ip> element that carries the DHCP ranges (for network updates)
    ranges: tuple[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address], ...]
    reservations: Mapping[str, str]  # mac → address
    reservation_xml: Mapping[str, tuple[int, str]]  # mac → (ip index, <host> element)
    leases: Mapping[str, str]
    extra: Mapping[str, Any]

    def used(self) -> set[str]:
        used = set(self.reservations.values()) | set(self.leases.values())
        if self.gateway:
            used.add(self.gateway)
        return used


def _parse_network(xml: str, leases: Mapping[str, str]) -> _Net:
    root = _parse(xml)
    cidr = gateway = None
    ip_index: int | None = None
    ranges: list[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]] = []
    reservations: dict[str, str] = {}
    reservation_xml: dict[str, tuple[int, str]] = {}
    for index, ip in enumerate(root.iterfind("ip")):
        if ip.get("family", "ipv4") != "ipv4" or not ip.get("address"):
            continue
        address = ip.get("address", "")
        mask = ip.get("prefix") or ip.get("netmask") or "24"
        subnet = ipaddress.IPv4Network(f"{address}/{mask}", strict=False)
        if cidr is None:
            cidr, gateway = str(subnet), address
        for r in ip.iterfind("dhcp/range"):
            if ip_index is None:
                ip_index, cidr, gateway = index, str(subnet), address
            ranges.append(
                (ipaddress.IPv4Address(r.get("start", "")), ipaddress.IPv4Address(r.get("end", "")))
            )
        for h in ip.iterfind("dhcp/host"):
            mac = (h.get("mac") or "").lower()
            if mac and h.get("ip"):
                reservations[mac] = h.get("ip", "")
                reservation_xml[mac] = (index, ET.tostring(h, encoding="unicode").strip())
    forward = root.find("forward")
    bridge = root.find("bridge")
    extra = {
        "forward": forward.get("mode", "nat") if forward is not None else "isolated",
        "bridge": bridge.get("name") if bridge is not None else None,
        "dhcp_ranges": [f"{a}-{b}" for a, b in ranges],
    }
    return _Net(
        name=root.findtext("name", ""),
        cidr=cidr,
        gateway=gateway,
        ip_index=ip_index,
        ranges=tuple(ranges),
        reservations=reservations,
        reservation_xml=reservation_xml,
        leases=leases,
        extra=extra,
    )


@dataclass(frozen=True)
class _Volume:
    name: str
    pool: str
    key: str
    path: str | None
    capacity: int
    format: str | None


def _parse_volume(xml: str, pool: str) -> _Volume:
    root = _parse(xml)
    name = root.findtext("name", "")
    path = root.findtext("target/path")
    fmt = root.find("target/format")
    return _Volume(
        name=name,
        pool=pool,
        key=root.findtext("key") or path or f"{pool}/{name}",
        path=path,
        capacity=_size_bytes(root.find("capacity"), "bytes") or 0,
        format=fmt.get("type") if fmt is not None else None,
    )


def _domain_xml(
    *,
    domain_type: str,
    arch: str,
    name: str,
    uuid_: str,
    title: str,
    tags: _Tags,
    vcpu: int,
    max_vcpu: int,
    memory_kib: int,
    max_memory_kib: int,
    disks: Iterable[tuple[str, str, str]],  # (pool, volume, format)
    nic: tuple[str, str] | None,  # (mac, network)
) -> str:
    def sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
        child = ET.SubElement(parent, tag, attrs)
        child.text = text
        return child

    root = ET.Element("domain", {"type": domain_type})
    sub(root, "name", name)
    sub(root, "uuid", uuid_)
    sub(root, "title", title)
    sub(root, "metadata").append(tags.element(NS))
    # <memory> is what the guest boots with; <currentMemory> is the balloon target we account
    # for. The gap between them is what the domain can grow into while running.
    sub(root, "memory", str(max_memory_kib), unit="KiB")
    sub(root, "currentMemory", str(memory_kib), unit="KiB")
    sub(root, "vcpu", str(max_vcpu), placement="static", current=str(vcpu))
    os_el = sub(root, "os")
    sub(os_el, "type", "hvm", arch=arch)
    sub(os_el, "boot", dev="hd")
    features = sub(root, "features")
    sub(features, "acpi")  # a graceful shutdown is an ACPI power button press
    sub(features, "apic")
    sub(root, "cpu", mode="host-model")
    sub(root, "clock", offset="utc")
    sub(root, "on_poweroff", "destroy")
    sub(root, "on_reboot", "restart")
    sub(root, "on_crash", "destroy")
    devices = sub(root, "devices")
    for index, (pool, volume, fmt) in enumerate(disks):
        devices.append(_disk_element(pool, volume, fmt, _target_name(index)))
    if nic is not None:
        interface = sub(devices, "interface", type="network")
        sub(interface, "mac", address=nic[0])
        sub(interface, "source", network=nic[1])
        sub(interface, "model", type="virtio")
    sub(devices, "memballoon", model="virtio")
    return ET.tostring(root, encoding="unicode")


def _disk_element(pool: str, volume: str, fmt: str, target: str) -> ET.Element:
    disk = ET.Element("disk", {"type": "volume", "device": "disk"})
    ET.SubElement(disk, "driver", {"name": "qemu", "type": fmt, "cache": "none"})
    ET.SubElement(disk, "source", {"pool": pool, "volume": volume})
    ET.SubElement(disk, "target", {"dev": target, "bus": "virtio"})
    return disk


def _target_name(index: int) -> str:
    """vda … vdz, vdaa … (as the kernel names virtio disks)."""
    name = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        name = chr(ord("a") + rest) + name
    return f"vd{name}"


def _volume_xml(name: str, capacity_gb: int, fmt: str, backing: _Volume | None = None) -> str:
    root = ET.Element("volume")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "capacity", unit="bytes").text = str(capacity_gb * GIB)
    ET.SubElement(ET.SubElement(root, "target"), "format", type=fmt)
    if backing is not None and backing.path:
        store = ET.SubElement(root, "backingStore")
        ET.SubElement(store, "path").text = backing.path
        ET.SubElement(store, "format", type=backing.format or "raw")
    return ET.tostring(root, encoding="unicode")


# --- hosts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HostRef:
    uri: str
    name: str

    @property
    def remote(self) -> bool:
        return bool(urlsplit(self.uri).hostname)


def _host_name(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.hostname:
        return parts.hostname
    if parts.scheme.split("+")[0] == "test":
        return PurePosixPath(parts.path).stem or "default"
    return socket.gethostname()  # a local hypervisor is this machine


def _parse_endpoint(endpoint: str) -> tuple[_HostRef, ...]:
    uris = [u for u in re.split(r"[,\s]+", endpoint or "") if u]
    if not uris:
        raise DriverError("libvirt: the endpoint names no host URI")
    hosts = tuple(_HostRef(uri, _host_name(uri)) for uri in uris)
    names = [h.name for h in hosts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DriverError(f"libvirt: the endpoint names host {duplicates[0]!r} twice")
    return hosts


_EVENT_LOOP_LOCK = threading.Lock()
_event_loop_started = False


def _ensure_event_loop() -> None:
    """Keepalive needs libvirt's event loop running in this process; start it once."""
    global _event_loop_started
    with _EVENT_LOOP_LOCK:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


@dataclass(frozen=True)
class _Pool:
    name: str
    tier: str
    capacity: int
    available: int
    active: bool


@dataclass
class _HostState:
    """One host as placement sees it: what exists and what is used."""

    ref: _HostRef
    conn: Any
    arch: str
    cpus: int
    memory_mb: int
    domains: list[tuple[Any, _Domain]]
    pools: list[_Pool]
    images: dict[str, _Volume]
    networks: dict[str, _Net]

    def allocated(self) -> dict[str, int]:
        return _allocated(d for _, d in self.domains)


_POWER_STATES: Mapping[int, PowerState] = {
    libvirt.VIR_DOMAIN_NOSTATE: PowerState.unknown,
    libvirt.VIR_DOMAIN_RUNNING: PowerState.running,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.running,  # running, waiting on I/O
    libvirt.VIR_DOMAIN_PAUSED: PowerState.suspended,
    libvirt.VIR_DOMAIN_SHUTDOWN: PowerState.running,  # still running while it shuts down
    libvirt.VIR_DOMAIN_SHUTOFF: PowerState.stopped,
    libvirt.VIR_DOMAIN_CRASHED: PowerState.error,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.suspended,
}


class _HostView:
    """Volumes and networks of one host, fetched at most once per driver call.

    ``bulk`` loads every pool's volumes on the first question (listing every server); otherwise
    each volume is looked up alone (one server).
    """

    def __init__(self, driver: LibvirtDriver, ref: _HostRef, conn: Any, *, bulk: bool) -> None:
        self.driver, self.ref, self.conn, self.bulk = driver, ref, conn, bulk
        self._by_ref: dict[tuple[str, str], _Volume] | None = None
        self._by_path: dict[str, _Volume] = {}
        self._networks: dict[str, _Net] | None = None

    def _load_volumes(self) -> dict[tuple[str, str], _Volume]:
        if self._by_ref is None:
            self._by_ref = {}
            for pool in self.conn.listAllStoragePools(
                libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE
            ):
                pool_name = pool.name()
                for vol in pool.listAllVolumes(0):
                    v = _parse_volume(vol.XMLDesc(0), pool_name)
                    self._by_ref[(pool_name, v.name)] = v
                    if v.path:
                        self._by_path[v.path] = v
        return self._by_ref

    def volume(self, disk: _DiskRef) -> _Volume | None:
        if self.bulk:
            by_ref = self._load_volumes()
            if disk.pool and disk.volume:
                return by_ref.get((disk.pool, disk.volume))
            return self._by_path.get(disk.path or "")
        try:
            if disk.pool and disk.volume:
                pool = self.conn.storagePoolLookupByName(disk.pool)
                return _parse_volume(pool.storageVolLookupByName(disk.volume).XMLDesc(0), disk.pool)
            if disk.path:
                vol = self.conn.storageVolLookupByPath(disk.path)
                return _parse_volume(vol.XMLDesc(0), vol.storagePoolLookupByVolume().name())
        except libvirt.libvirtError as exc:
            if _is(exc, "VIR_ERR_NO_STORAGE_VOL", "VIR_ERR_NO_STORAGE_POOL"):
                return None
            raise
        return None

    def networks(self) -> dict[str, _Net]:
        if self._networks is None:
            self._networks = self.driver._networks_of(self.conn)
        return self._networks

    def server(self, domain: _Domain, state: int) -> Server:
        disks = []
        for ref in domain.disks:
            vol = self.volume(ref)
            if vol is None:
                # outside every pool (a raw block device, a file libvirt does not manage)
                disks.append(Disk(0, "unknown", external_id=ref.path))
            else:
                disks.append(Disk(_gib(vol.capacity), self.driver._tier(vol.pool), vol.key))
        ips: list[str] = []
        for mac, network in domain.nics:
            net = self.networks().get(network or "")
            address = net and (net.reservations.get(mac) or net.leases.get(mac))
            if address and address not in ips:
                ips.append(address)
        tags = domain.tags or _Tags()
        extra: dict[str, Any] = {
            "domain": domain.name,
            "max_vcpu": domain.max_vcpu,
            "max_memory_mb": domain.max_memory_kib // KIB,
            "networks": sorted({n for _, n in domain.nics if n}),
        }
        if tags.flavor:
            extra["flavor"] = tags.flavor
        if tags.image:
            extra["image"] = tags.image
        return Server(
            external_id=domain.uuid,
            name=domain.display_name,
            vcpu=domain.vcpu,
            memory_mb=domain.memory_kib // KIB,
            disks=tuple(disks),
            ips=tuple(ips),
            power_state=_POWER_STATES.get(state, PowerState.unknown),
            owner_tag=tags.owner,
            request_tag=tags.request,
            created_at=tags.created,
            host=self.ref.name,
            extra=extra,
        )


def _not_found(what: str, key: str, provider_message: str | None = None) -> NotFound:
    return NotFound(
        f"libvirt: no {what} {key!r}",
        provider_message=provider_message or f"{what.capitalize()} not found: {key}",
    )


# --- the driver ----------------------------------------------------------------------------------


class LibvirtDriver(Driver):
    kind = "libvirt"
    # libvirt refuses '/' and newlines in domain names and newlines in titles; it sets no length
    name_pattern = re.compile(r"^[^/\x00-\x1f\x7f]+\Z")
    name_rule = "1 to 255 characters, no '/' and no control characters"
    # resize_live: domains are defined with a maximum above their size, and vCPU and memory
    # changes within it apply to the running domain; growing past it needs the server stopped
    # (refused with Conflict while running). No floating IPs (addresses come from each network's
    # DHCP range) and no tenant scope (libvirt has no projects or folders).
    capabilities = frozenset(
        {
            Capability.create,
            Capability.resize,
            Capability.resize_live,
            Capability.power,
            Capability.reboot,
            Capability.volumes,
            Capability.flavors,
        }
    )

    def __init__(
        self, endpoint: str, credentials: Mapping[str, str], options: Mapping[str, Any]
    ) -> None:
        super().__init__(endpoint, credentials, options)
        self._hosts = _parse_endpoint(endpoint)
        self._pool_tiers: Mapping[str, str] = dict(options.get("pool_tiers") or {})
        self._image_pool = str(options.get("image_pool", "images"))
        root_tier = options.get("root_tier")
        self._root_tier = str(root_tier) if root_tier else None
        self._flavors = [
            Flavor(
                external_id=str(f["name"]),
                name=str(f["name"]),
                vcpu=int(f["vcpu"]),
                memory_mb=int(f["memory_mb"]),
                disk_gb=int(f.get("disk_gb", 0)),
            )
            for f in options.get("flavors") or DEFAULT_FLAVORS
        ]
        ratios = {**DEFAULT_OVERCOMMIT, **(options.get("overcommit") or {})}
        self._overcommit = {k: float(v) for k, v in ratios.items()}
        self._live_factor = max(1.0, float(options.get("live_resize_factor", 2.0)))
        self._volume_format = str(options.get("volume_format", "qcow2"))
        self._stop_timeout = float(options.get("stop_timeout", 60.0))
        self._detach_timeout = float(options.get("detach_timeout", 30.0))
        self._keepalive = (
            int(options.get("keepalive_interval", 5)),
            int(options.get("keepalive_count", 3)),
        )
        domain_type = options.get("domain_type")
        self._domain_type = str(domain_type) if domain_type else None
        self._cluster = options.get("cluster")
        attempts = max(1, int(options.get("retries", 3)))
        self._retry = remote(attempts, float(options.get("retry_max_wait", 4.0)))
        self._conns: dict[str, Any] = {}
        self._conn_lock = threading.Lock()
        # one create at a time picks and reserves an address; the reservation is the claim
        self._address_lock = threading.Lock()
        self._where: dict[str, str] = {}  # domain uuid → host name, to look there first

    # -- connections --

    def _conn(self, host: _HostRef) -> Any:
        with self._conn_lock:
            conn = self._conns.get(host.name)
            if conn is not None:
                return conn
            if host.remote and self._keepalive[0] > 0:
                _ensure_event_loop()  # must run before the connection opens
            try:
                conn = libvirt.openAuth(host.uri, self._auth(), 0)
            except libvirt.libvirtError as exc:
                raise translate_error(exc, f"connect to {host.name}", connecting=True) from exc
            if conn is None:  # old bindings returned None instead of raising
                raise Unavailable(
                    f"libvirt: connect to {host.name} failed",
                    provider_message=f"failed to connect to the hypervisor {host.uri}",
                )
            if host.remote and self._keepalive[0] > 0:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.setKeepAlive(*self._keepalive)
            self._conns[host.name] = conn
            return conn

    def _auth(self) -> list[Any]:
        username = self.credentials.get("username")
        password = self.credentials.get("password")

        def answer(credentials: list[list[Any]], _: object) -> int:
            # never prompt: a missing answer fails the authentication instead
            for credential in credentials:
                if credential[0] == libvirt.VIR_CRED_AUTHNAME and username:
                    credential[4] = username
                elif credential[0] == libvirt.VIR_CRED_PASSPHRASE and password:
                    credential[4] = password
                else:
                    return -1
            return 0

        return [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE], answer, None]

    def _drop_dead_connections(self) -> None:
        """Forget connections that died, so the next attempt reconnects."""
        with self._conn_lock:
            for name, conn in list(self._conns.items()):
                try:
                    alive = bool(conn.isAlive())
                except libvirt.libvirtError:
                    alive = False
                if not alive:
                    del self._conns[name]
                    with contextlib.suppress(libvirt.libvirtError):
                        conn.close()

    def close(self) -> None:
        with self._conn_lock:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def _remote(self, op: str, fn: Callable[[], T]) -> T:
        def attempt() -> T:
            try:
                return fn()
            except libvirt.libvirtError as exc:
                error = translate_error(exc, op)
                if isinstance(error, Unavailable):
                    self._drop_dead_connections()
                raise error from exc

        return self._retry(attempt)()

    # -- reading a host --

    def _tier(self, pool: str) -> str:
        if pool in self._pool_tiers:
            return self._pool_tiers[pool]
        return re.split(r"[-_.]", pool, maxsplit=1)[0] or pool

    def _domains_of(self, conn: Any) -> list[tuple[Any, _Domain]]:
        found = []
        for dom in conn.listAllDomains(0):
            try:
                found.append((dom, _parse_domain(dom.XMLDesc(0))))
            except libvirt.libvirtError as exc:
                if not _is(exc, "VIR_ERR_NO_DOMAIN"):
                    raise  # a domain undefined since the listing is simply gone
        return found

    def _states_of(self, conn: Any, domains: list[tuple[Any, _Domain]]) -> dict[str, int]:
        # one round trip for every domain's state instead of one per domain
        states = {
            dom.UUIDString(): int(stats.get("state.state", libvirt.VIR_DOMAIN_NOSTATE))
            for dom, stats in conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE)
        }
        for dom, parsed in domains:
            if parsed.uuid not in states:  # defined between the two calls
                states[parsed.uuid] = int(dom.state()[0])
        return states

    def _networks_of(self, conn: Any) -> dict[str, _Net]:
        nets = {}
        for net in conn.listAllNetworks(0):
            leases: dict[str, str] = {}
            if net.isActive():
                try:
                    for lease in net.DHCPLeases() or ():
                        if lease.get("mac") and lease.get("ipaddr"):
                            leases[str(lease["mac"]).lower()] = str(lease["ipaddr"])
                except libvirt.libvirtError as exc:
                    if not _is(exc, "VIR_ERR_NO_SUPPORT"):  # the test driver keeps no leases
                        raise
            parsed = _parse_network(net.XMLDesc(0), leases)
            nets[parsed.name] = parsed
        return nets

    def _pools_of(self, conn: Any) -> list[_Pool]:
        pools = []
        for pool in conn.listAllStoragePools(0):
            name = pool.name()
            if name == self._image_pool:
                continue
            state, capacity, _, available = pool.info()
            active = state == libvirt.VIR_STORAGE_POOL_RUNNING
            pools.append(_Pool(name, self._tier(name), capacity, available, active))
        return sorted(pools, key=lambda p: p.name)

    def _images_of(self, conn: Any) -> dict[str, _Volume]:
        try:
            pool = conn.storagePoolLookupByName(self._image_pool)
        except libvirt.libvirtError as exc:
            if _is(exc, "VIR_ERR_NO_STORAGE_POOL"):
                return {}  # a host without images can still run servers built elsewhere
            raise
        if not pool.isActive():
            return {}
        volumes = (_parse_volume(v.XMLDesc(0), self._image_pool) for v in pool.listAllVolumes(0))
        return {v.name: v for v in volumes}

    def _state_of(self, ref: _HostRef) -> _HostState:
        conn = self._conn(ref)
        info = conn.getInfo()
        return _HostState(
            ref=ref,
            conn=conn,
            arch=str(info[0]),
            cpus=int(info[2]),
            memory_mb=int(info[1]),
            domains=self._domains_of(conn),
            pools=self._pools_of(conn),
            images=self._images_of(conn),
            networks=self._networks_of(conn),
        )

    def _schedulable(self, cpus: int, memory_mb: int) -> dict[str, int]:
        total = {"vcpu": cpus, "memory_mb": memory_mb}
        return {rc: int(v * self._overcommit.get(rc, 1.0)) for rc, v in total.items()}

    def _locate(self, external_id: str) -> tuple[_HostRef, Any, Any]:
        """The host, connection and domain of a server; NotFound when no reachable host has it."""
        try:
            uuid.UUID(external_id)
        except ValueError:
            raise _not_found(
                "server",
                external_id,
                f"Domain not found: no domain with matching uuid '{external_id}'",
            ) from None
        cached = self._where.get(external_id)
        hosts = sorted(self._hosts, key=lambda h: h.name != cached)
        unreachable: Unavailable | None = None
        provider_message = None
        for host in hosts:
            try:
                conn = self._conn(host)
            except Unavailable as exc:
                unreachable = exc
                continue
            try:
                dom = conn.lookupByUUIDString(external_id)
            except libvirt.libvirtError as exc:
                if _is(exc, "VIR_ERR_NO_DOMAIN"):
                    provider_message = exc.get_error_message()
                    continue
                raise
            self._where[external_id] = host.name
            return host, conn, dom
        if unreachable is not None:
            raise unreachable  # it may be on the host we cannot reach
        self._where.pop(external_id, None)
        raise _not_found("server", external_id, provider_message)

    def _server(self, host: _HostRef, conn: Any, dom: Any) -> Server:
        domain = _parse_domain(dom.XMLDesc(0))
        state = int(dom.state()[0])
        return _HostView(self, host, conn, bulk=False).server(domain, state)

    def _find_by_tag(self, request_tag: str) -> tuple[_HostRef, Any, Any] | None:
        for host in self._hosts:
            conn = self._conn(host)
            for dom, domain in self._domains_of(conn):
                if domain.tags and domain.tags.request == request_tag:
                    return host, conn, dom
        return None

    # -- inventory --

    def check(self) -> None:
        def do() -> None:
            for host in self._hosts:
                self._conn(host).getLibVersion()

        self._remote("check", do)

    def root_tier(self) -> str | None:
        def do() -> str | None:
            roots = {self._root_tier_of(self._state_of(h)) for h in self._hosts}
            known = sorted(r for r in roots if r is not None)
            # hosts that disagree are unusual; the same answer every time matters more
            return known[0] if known else None

        return self._remote("root_tier", do)

    def list_hosts(self) -> list[Host]:
        def do() -> list[Host]:
            hosts = []
            for ref in self._hosts:
                conn = self._conn(ref)
                info = conn.getInfo()
                cpus, memory_mb = int(info[2]), int(info[1])
                domains = self._domains_of(conn)
                allocated = _allocated(d for _, d in domains)
                hosts.append(
                    Host(
                        external_id=ref.name,
                        name=ref.name,
                        cluster=self._cluster,
                        capacity=Capacity(
                            total={"vcpu": cpus, "memory_mb": memory_mb}, allocated=allocated
                        ),
                        overcommit=dict(self._overcommit),
                        extra={
                            "uri": ref.uri,
                            "arch": str(info[0]),
                            "mhz": int(info[3]),
                            "hypervisor": conn.getType(),
                            "domains": len(domains),
                            "schedulable": self._schedulable(cpus, memory_mb),
                        },
                    )
                )
            return hosts

        return self._remote("list_hosts", do)

    def list_storage(self) -> list[StoragePool]:
        def do() -> list[StoragePool]:
            return [
                StoragePool(
                    external_id=f"{ref.name}/{p.name}",
                    name=p.name,
                    tier=p.tier,
                    capacity_gb=p.capacity // GIB,
                    free_gb=min(p.available, p.capacity) // GIB,
                    extra={"host": ref.name, "active": p.active},
                )
                for ref in self._hosts
                for p in self._pools_of(self._conn(ref))
            ]

        return self._remote("list_storage", do)

    def list_networks(self) -> list[Network]:
        def do() -> list[Network]:
            merged: dict[str, tuple[_Net, list[str]]] = {}
            for ref in self._hosts:
                for name, net in self._networks_of(self._conn(ref)).items():
                    merged.setdefault(name, (net, []))[1].append(ref.name)
            return [
                Network(name, name, net.cidr, extra={**net.extra, "hosts": hosts})
                for name, (net, hosts) in sorted(merged.items())
            ]

        return self._remote("list_networks", do)

    def list_flavors(self) -> list[Flavor]:
        return list(self._flavors)

    def list_images(self) -> list[Image]:
        def do() -> list[Image]:
            merged: dict[str, tuple[int, list[str]]] = {}
            for ref in self._hosts:
                for name, vol in self._images_of(self._conn(ref)).items():
                    size, hosts = merged.get(name, (0, []))
                    merged[name] = (max(size, _gib(vol.capacity)), [*hosts, ref.name])
            return [
                Image(
                    external_id=name,
                    name=PurePosixPath(name).stem,
                    min_disk_gb=size,
                    extra={"pool": self._image_pool, "hosts": hosts},
                )
                for name, (size, hosts) in sorted(merged.items())
            ]

        return self._remote("list_images", do)

    # -- servers --

    def list_servers(self) -> list[Server]:
        def do() -> list[Server]:
            servers = []
            for ref in self._hosts:
                conn = self._conn(ref)
                domains = self._domains_of(conn)
                states = self._states_of(conn, domains)
                view = _HostView(self, ref, conn, bulk=True)
                for _, domain in domains:
                    self._where[domain.uuid] = ref.name
                    servers.append(view.server(domain, states[domain.uuid]))
            return servers

        return self._remote("list_servers", do)

    def get_server(self, external_id: str) -> Server:
        return self._remote("get_server", lambda: self._server(*self._locate(external_id)))

    def find_server_by_tag(self, request_tag: str) -> Server | None:
        def do() -> Server | None:
            found = self._find_by_tag(request_tag)
            return self._server(*found) if found else None

        return self._remote("find_server_by_tag", do)

    def create_server(self, spec: ServerSpec) -> Server:
        def do() -> Server:
            everywhere = [self._state_of(h) for h in self._hosts]
            for state in everywhere:
                for dom, domain in state.domains:
                    if domain.tags is not None and domain.tags.request == spec.request_tag:
                        # a retried or replayed create finds what the first attempt made
                        return self._server(state.ref, state.conn, dom)
            return self._create(spec, everywhere)

        return self._remote("create_server", do)

    def _size(self, spec: ServerSpec) -> tuple[int, int, Flavor | None]:
        flavor = None
        if spec.flavor is not None:
            flavor = next(
                (f for f in self._flavors if spec.flavor in (f.external_id, f.name)), None
            )
            if flavor is None:
                raise _not_found("flavor", spec.flavor)
            vcpu, memory_mb = flavor.vcpu, flavor.memory_mb
        elif spec.vcpu is not None and spec.memory_mb is not None:
            vcpu, memory_mb = spec.vcpu, spec.memory_mb
        else:
            raise InvalidSpec("libvirt: a server needs a flavor or both vcpu and memory_mb")
        if vcpu < 1 or memory_mb < 1:
            raise InvalidSpec(f"libvirt: invalid size {vcpu} vCPU / {memory_mb} MB")
        return vcpu, memory_mb, flavor

    def _root_tier_of(self, state: _HostState) -> str | None:
        tiers = [p.tier for p in state.pools if p.active]
        if self._root_tier is not None:
            return self._root_tier if self._root_tier in tiers else None
        if "ssd" in tiers:
            return "ssd"
        return tiers[0] if tiers else None

    def _create(self, spec: ServerSpec, everywhere: list[_HostState]) -> Server:
        why = self.invalid_name(spec.name)
        if why is not None:
            raise InvalidSpec(f"libvirt: invalid server name {spec.name!r}: {why}")
        vcpu, memory_mb, flavor = self._size(spec)
        if spec.public_ip:
            raise Unsupported("libvirt: libvirt networks have no floating or public addresses")
        if spec.scope is not None:
            raise InvalidSpec("libvirt: libvirt has no tenant scopes; scope must be None")
        for disk in spec.disks:
            if disk.size_gb < 1:
                raise InvalidSpec(f"libvirt: invalid disk size {disk.size_gb} GB")
        if spec.host_hint is not None and spec.host_hint not in {h.name for h in self._hosts}:
            raise _not_found("host", spec.host_hint)

        image = next(
            (
                name
                for s in everywhere
                for name in s.images
                if spec.image in (name, PurePosixPath(name).stem)
            ),
            None,
        )
        if image is None:
            raise _not_found("image", spec.image)
        network = spec.network or min((n for s in everywhere for n in s.networks), default=None)
        if network is None or not any(network in s.networks for s in everywhere):
            raise _not_found("network", str(network))
        known_tiers = {p.tier for s in everywhere for p in s.pools}
        for disk in spec.disks:
            if disk.tier not in known_tiers:
                raise _not_found("storage pool of tier", disk.tier)

        placement = self._place(spec, everywhere, image, network, vcpu, memory_mb, flavor)
        return self._build(spec, placement, everywhere, image, network, vcpu, memory_mb, flavor)

    def _place(
        self,
        spec: ServerSpec,
        everywhere: list[_HostState],
        image: str,
        network: str,
        vcpu: int,
        memory_mb: int,
        flavor: Flavor | None,
    ) -> _Placement:
        """The host with the most free memory that has the image, the network and room."""
        need = {"vcpu": vcpu, "memory_mb": memory_mb}
        best: tuple[int, _Placement] | None = None
        for s in everywhere:
            if spec.host_hint is not None and s.ref.name != spec.host_hint:
                continue
            if image not in s.images or network not in s.networks:
                continue
            root_tier = self._root_tier_of(s)
            if root_tier is None:
                continue
            root_gb = max(flavor.disk_gb if flavor else 0, _gib(s.images[image].capacity))
            pools = _pools_for(s, [Disk(root_gb, root_tier), *spec.disks])
            used, room = s.allocated(), self._schedulable(s.cpus, s.memory_mb)
            if pools is None or any(used[rc] + need[rc] > room[rc] for rc in need):
                continue
            free = s.memory_mb - used["memory_mb"]
            if best is None or free > best[0]:
                best = (free, _Placement(s, pools[0], pools[1:], root_gb))
        if best is None:
            raise ProviderQuotaExceeded(
                f"libvirt: no host can place {vcpu} vCPU / {memory_mb} MB with image {image} on "
                f"network {network}",
                provider_message="No valid host was found. There are not enough hosts available "
                "with the image, the network and storage of the tiers asked for.",
            )
        return best[1]

    def _build(
        self,
        spec: ServerSpec,
        placement: _Placement,
        everywhere: list[_HostState],
        image: str,
        network: str,
        vcpu: int,
        memory_mb: int,
        flavor: Flavor | None,
    ) -> Server:
        """Volumes, address, domain, start: all of it, or (as far as libvirt lets us) none."""
        host = placement.host
        conn = host.conn
        server_uuid = str(uuid.uuid4())
        name = f"{_slug(spec.name)}-{server_uuid[:8]}"
        fmt = self._volume_format
        tags = _Tags(
            owner=spec.owner_tag,
            request=spec.request_tag,
            created=datetime.now(UTC).replace(microsecond=0),
            flavor=flavor.name if flavor else None,
            image=image,
        )
        volumes: list[Any] = []
        reservation: _Reservation | None = None
        dom = None
        try:
            root_pool = conn.storagePoolLookupByName(placement.root.name)
            root_name = f"{name}-root.{fmt}"
            if fmt == "qcow2":
                # A thin overlay on the image, as Nova's image cache does: instant and small.
                # The image volume must then stay while servers use it; delete never touches
                # the image pool.
                backing = host.images[image]
                root = root_pool.createXML(
                    _volume_xml(root_name, placement.root_gb, fmt, backing=backing), 0
                )
            else:
                # raw and LVM volumes cannot have a backing file: copy the image
                source = conn.storagePoolLookupByName(self._image_pool).storageVolLookupByName(
                    image
                )
                root = root_pool.createXMLFrom(
                    _volume_xml(root_name, placement.root_gb, fmt), source, 0
                )
            volumes.append(root)
            disks = [(placement.root.name, root.name(), fmt)]
            for index, (disk, pool) in enumerate(zip(spec.disks, placement.data, strict=True), 1):
                vol = conn.storagePoolLookupByName(pool.name).createXML(
                    _volume_xml(f"{name}-data{index}.{fmt}", disk.size_gb, fmt), 0
                )
                volumes.append(vol)
                disks.append((pool.name, vol.name(), fmt))
            mac = _new_mac(everywhere)
            reservation = self._reserve_address(host, everywhere, network, mac, name)
            dom = conn.defineXML(
                _domain_xml(
                    domain_type=self._domain_type or _domain_type_of(conn),
                    arch=host.arch,
                    name=name,
                    uuid_=server_uuid,
                    title=" ".join(spec.name.split()),
                    tags=tags,
                    vcpu=vcpu,
                    max_vcpu=self._maximum(vcpu, host.cpus),
                    memory_kib=memory_mb * KIB,
                    max_memory_kib=self._maximum(memory_mb, host.memory_mb) * KIB,
                    disks=disks,
                    nic=(mac, network),
                )
            )
            dom.create()
        except BaseException:
            _undo(dom, volumes, reservation)
            raise
        self._where[server_uuid] = host.ref.name
        return self._server(host.ref, conn, dom)

    def _maximum(self, size: int, host_total: int) -> int:
        return max(size, min(host_total, math.ceil(size * self._live_factor)))

    def _reserve_address(
        self, host: _HostState, everywhere: list[_HostState], network: str, mac: str, name: str
    ) -> _Reservation | None:
        """Reserve an address for `mac` in the network's DHCP range on the server's host.

        libvirt's test driver supports network updates, so this is the production mechanism
        everywhere: a DHCP host entry (mac → address) added to the network's live and persistent
        definitions, which dnsmasq serves to the guest and which is where server addresses are read
        from. Addresses held on the same-named network of every host count as taken, because such
        networks are bridged to one VLAN. libvirt refuses a second entry for an address on one
        host, so that is the claim; across hosts only this process's lock keeps two creates apart.
        """
        if not host.networks[network].ranges:
            return None  # the network's addresses come from outside libvirt
        with self._address_lock:
            current = {
                s.ref.name: _parse_network(
                    s.conn.networkLookupByName(network).XMLDesc(0), s.networks[network].leases
                )
                for s in everywhere
                if network in s.networks
            }
            net = current[host.ref.name]
            net_obj = host.conn.networkLookupByName(network)
            refused: set[str] = set()
            for _ in range(RESERVATION_ATTEMPTS):
                address = _pick_address(current.values(), net.ranges, refused)
                if address is None:
                    raise ProviderQuotaExceeded(
                        f"libvirt: network {network} on {host.ref.name} has no free address",
                        provider_message=f"No more IP addresses available in the DHCP ranges of "
                        f"network '{network}' ({', '.join(net.extra['dhcp_ranges'])})",
                    )
                entry = ET.tostring(
                    ET.Element("host", {"mac": mac, "name": _hostname(name), "ip": address}),
                    encoding="unicode",
                )
                reservation = _Reservation(net_obj, net.ip_index or 0, entry)
                try:
                    reservation.apply(libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST)
                except libvirt.libvirtError as exc:
                    if not _is(exc, "VIR_ERR_OPERATION_INVALID"):
                        raise
                    refused.add(address)  # someone else reserved it since we looked
                    continue
                return reservation
        raise Conflict(
            f"libvirt: every address tried on network {network} was taken meanwhile",
            provider_message=f"there is an existing dhcp host entry in network '{network}' for "
            f"each of {', '.join(sorted(refused))}",
        )

    def start(self, external_id: str) -> Server:
        def do() -> Server:
            host, conn, dom = self._locate(external_id)
            if dom.isActive():
                raise _invalid_state(dom, "start", "domain is already running")
            dom.create()
            return self._server(host, conn, dom)

        return self._remote("start", do)

    def stop(self, external_id: str) -> Server:
        def do() -> Server:
            host, conn, dom = self._locate(external_id)
            if not dom.isActive():
                raise _invalid_state(dom, "stop", "domain is not running")
            paused = int(dom.state()[0]) in (
                libvirt.VIR_DOMAIN_PAUSED,
                libvirt.VIR_DOMAIN_PMSUSPENDED,
            )
            if paused or self._stop_timeout <= 0:
                _power_off(dom)  # a paused guest cannot answer the ACPI button
            else:
                dom.shutdown()
                deadline = time.monotonic() + self._stop_timeout
                while dom.isActive():
                    if time.monotonic() >= deadline:
                        _power_off(dom)
                        break
                    time.sleep(0.5)
            return self._server(host, conn, dom)

        return self._remote("stop", do)

    def reboot(self, external_id: str) -> Server:
        def do() -> Server:
            host, conn, dom = self._locate(external_id)
            dom.reboot(0)  # libvirt refuses a stopped domain with "operation invalid"
            return self._server(host, conn, dom)

        return self._remote("reboot", do)

    def resize(self, external_id: str, *, vcpu: int, memory_mb: int) -> Server:
        def do() -> Server:
            if vcpu < 1 or memory_mb < 1:
                raise InvalidSpec(f"libvirt: invalid size {vcpu} vCPU / {memory_mb} MB")
            host, conn, dom = self._locate(external_id)
            domain = _parse_domain(dom.XMLDesc(0))
            info = conn.getInfo()
            cpus, host_memory_mb = int(info[2]), int(info[1])
            used = _allocated(d for _, d in self._domains_of(conn))
            room = self._schedulable(cpus, host_memory_mb)
            delta = {"vcpu": vcpu - domain.vcpu, "memory_mb": memory_mb - domain.memory_kib // KIB}
            if any(delta[rc] > 0 and used[rc] + delta[rc] > room[rc] for rc in delta):
                raise ProviderQuotaExceeded(
                    f"libvirt: host {host.name} cannot grow {domain.name} to {vcpu} vCPU / "
                    f"{memory_mb} MB",
                    provider_message="No valid host was found. There are not enough hosts "
                    "available.",
                )
            memory_kib = memory_mb * KIB
            if dom.isActive():
                if vcpu > domain.max_vcpu or memory_kib > domain.max_memory_kib:
                    raise Conflict(
                        f"libvirt: {domain.name} can grow to at most {domain.max_vcpu} vCPU / "
                        f"{domain.max_memory_kib // KIB} MB while running; stop it to go further",
                        provider_message="Requested operation is not valid: requested size "
                        "exceeds the maximum of the running domain",
                    )
                # two calls: several drivers (the test driver among them) refuse LIVE|CONFIG
                flags = [libvirt.VIR_DOMAIN_AFFECT_LIVE]
                if dom.isPersistent():
                    flags.append(libvirt.VIR_DOMAIN_AFFECT_CONFIG)
                for flag in flags:
                    dom.setVcpusFlags(vcpu, flag)
                    dom.setMemoryFlags(memory_kib, flag)
            else:
                config = libvirt.VIR_DOMAIN_AFFECT_CONFIG
                max_vcpu = self._maximum(vcpu, cpus)
                if max_vcpu > domain.max_vcpu:
                    dom.setVcpusFlags(max_vcpu, config | libvirt.VIR_DOMAIN_VCPU_MAXIMUM)
                dom.setVcpusFlags(vcpu, config)
                max_memory_kib = self._maximum(memory_mb, host_memory_mb) * KIB
                if max_memory_kib > domain.max_memory_kib:
                    dom.setMemoryFlags(max_memory_kib, config | libvirt.VIR_DOMAIN_MEM_MAXIMUM)
                dom.setMemoryFlags(memory_kib, config)
            if domain.tags is not None and domain.tags.flavor is not None:
                _write_tags(dom, domain, replace(domain.tags, flavor=None))  # a custom size now
            return self._server(host, conn, dom)

        return self._remote("resize", do)

    def delete(self, external_id: str) -> None:
        def do() -> None:
            host, conn, dom = self._locate(external_id)
            domain = _parse_domain(dom.XMLDesc(0))
            persistent = bool(dom.isPersistent())
            if dom.isActive():
                _power_off(dom)
            # Volumes and addresses go before the definition: if this fails half-way, a retry
            # still finds the domain and finishes the job.
            view = _HostView(self, host, conn, bulk=False)
            for ref in domain.disks:
                vol = None if ref.shared else view.volume(ref)
                if vol is not None and vol.pool != self._image_pool:  # never an image
                    _delete_volume(conn, vol)
            networks = view.networks()
            for mac, network in domain.nics:
                net = networks.get(network or "")
                if net is not None and mac in net.reservation_xml:
                    index, entry = net.reservation_xml[mac]
                    _Reservation(conn.networkLookupByName(net.name), index, entry).apply(
                        libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE
                    )
            if persistent:
                _undefine(dom)
            self._where.pop(external_id, None)

        self._remote("delete", do)

    def attach_disk(self, external_id: str, disk: Disk) -> Server:
        if disk.size_gb < 1:
            raise InvalidSpec(f"libvirt: invalid disk size {disk.size_gb} GB")

        def do() -> Server:
            host, conn, dom = self._locate(external_id)
            domain = _parse_domain(dom.XMLDesc(0))
            pool = self._pool_for(host, conn, disk)
            fmt = self._volume_format
            taken = {d.target for d in domain.disks}
            taken |= {d.target for d in _parse_domain(_inactive_xml(dom)).disks}
            target = next(
                _target_name(i) for i in range(len(taken) + 1) if _target_name(i) not in taken
            )
            vol = conn.storagePoolLookupByName(pool.name).createXML(
                _volume_xml(f"{domain.name}-{secrets.token_hex(4)}.{fmt}", disk.size_gb, fmt), 0
            )
            element = _disk_element(pool.name, vol.name(), fmt, target)
            try:
                _change_devices(dom, element, attach=True)
            except BaseException:
                with contextlib.suppress(libvirt.libvirtError):
                    vol.delete(0)
                raise
            return self._server(host, conn, dom)

        return self._remote("attach_disk", do)

    def _pool_for(self, host: _HostRef, conn: Any, disk: Disk) -> _Pool:
        pools = [p for p in self._pools_of(conn) if p.active and p.tier == disk.tier]
        if not pools:
            raise _not_found("storage pool of tier", f"{disk.tier} on {host.name}")
        pool = max(pools, key=lambda p: p.available)
        if pool.available < disk.size_gb * GIB:
            raise ProviderQuotaExceeded(
                f"libvirt: no {disk.tier} pool on {host.name} has {disk.size_gb} GB free",
                provider_message=f"Not enough space in storage pool '{pool.name}': "
                f"{pool.available // GIB} GiB available, {disk.size_gb} GiB asked",
            )
        return pool

    def detach_disk(self, external_id: str, disk_id: str) -> Server:
        def do() -> Server:
            host, conn, dom = self._locate(external_id)
            xml = dom.XMLDesc(0)
            domain = _parse_domain(xml)
            view = _HostView(self, host, conn, bulk=False)
            index, ref, vol = next(
                (
                    (i, r, v)
                    for i, r in enumerate(domain.disks)
                    for v in [view.volume(r)]
                    if disk_id in ((v.key if v else None), r.path)
                ),
                (None, None, None),
            )
            if index is None or ref is None:
                raise _not_found("disk", disk_id, f"No disk {disk_id} on domain {domain.name}")
            if index == 0:
                raise InvalidSpec(
                    f"libvirt: {disk_id} is the root disk of {domain.display_name}",
                    provider_message=f"disk {ref.target} is the boot disk of domain {domain.name}",
                )
            element = next(
                d
                for d in _parse(xml).iterfind("devices/disk")
                if d.find("target") is not None and d.find("target").get("dev") == ref.target  # type: ignore[union-attr]
            )
            _change_devices(dom, element, attach=False)
            if dom.isActive():
                self._await_release(dom, ref.target)
            # a shared or read-only disk, or an image, belongs to others too: only unplug it
            if vol is not None and not ref.shared and vol.pool != self._image_pool:
                _delete_volume(conn, vol)
            return self._server(host, conn, dom)

        return self._remote("detach_disk", do)

    def _await_release(self, dom: Any, target: str) -> None:
        """A running guest releases an unplugged disk when it is ready to: its volume must not
        be deleted before."""
        deadline = time.monotonic() + self._detach_timeout
        while any(d.target == target for d in _parse_domain(dom.XMLDesc(0)).disks):
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"libvirt: the guest of {dom.name()} has not released disk {target} yet",
                    provider_message=f"device {target} is still attached to {dom.name()} "
                    f"after {self._detach_timeout:.0f} s",
                )
            time.sleep(0.5)

    def ensure_tenant_scope(self, tenant_code: str) -> str | None:
        # libvirt has no projects or folders: ownership lives in each domain's metadata
        return None

    def set_owner(self, external_id: str, owner_tag: str | None) -> Server:
        def do() -> Server:
            host, conn, dom = self._locate(external_id)
            domain = _parse_domain(dom.XMLDesc(0))
            _write_tags(dom, domain, replace(domain.tags or _Tags(), owner=owner_tag))
            return self._server(host, conn, dom)

        return self._remote("set_owner", do)

    # -- extras (ex_) --

    def ex_domain_xml(self, external_id: str, *, inactive: bool = False) -> str:
        """The domain's XML as libvirt has it (live, or the persistent definition)."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0

        def do() -> str:
            return str(self._locate(external_id)[2].XMLDesc(flags))

        return self._remote("ex_domain_xml", do)

    def ex_network_xml(self, network: str, host: str) -> str:
        """A network's XML on one host (its DHCP reservations, for instance)."""
        ref = next((h for h in self._hosts if h.name == host), None)
        if ref is None:
            raise _not_found("host", host)

        def do() -> str:
            return str(self._conn(ref).networkLookupByName(network).XMLDesc(0))

        return self._remote("ex_network_xml", do)


# --- helpers of the driver -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Placement:
    host: _HostState
    root: _Pool
    data: list[_Pool]
    root_gb: int


@dataclass(frozen=True)
class _Reservation:
    """A DHCP host entry in one network on one host."""

    network: Any
    ip_index: int
    entry: str

    def apply(self, command: int) -> None:
        flags = 0
        if self.network.isActive():
            flags |= libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE
        if self.network.isPersistent():
            flags |= libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG
        self.network.update(
            command, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, self.ip_index, self.entry, flags
        )


def _allocated(domains: Iterable[_Domain]) -> dict[str, int]:
    # stopped domains count: their resources stay reserved on the host
    used = {"vcpu": 0, "memory_mb": 0}
    for d in domains:
        used["vcpu"] += d.vcpu
        used["memory_mb"] += d.memory_kib // KIB
    return used


def _pools_for(state: _HostState, disks: list[Disk]) -> list[_Pool] | None:
    """A pool of the right tier with room for each disk (the emptiest first), or None."""
    left = {p.name: p.available for p in state.pools if p.active}
    chosen = []
    for disk in disks:
        fits = [
            p
            for p in state.pools
            if p.active and p.tier == disk.tier and left[p.name] >= disk.size_gb * GIB
        ]
        if not fits:
            return None
        pool = max(fits, key=lambda p: left[p.name])
        left[pool.name] -= disk.size_gb * GIB
        chosen.append(pool)
    return chosen


def _pick_address(
    nets: Iterable[_Net], ranges: Iterable[tuple[Any, Any]], refused: set[str]
) -> str | None:
    used = set(refused)
    for net in nets:
        used |= net.used()
    for start, end in ranges:
        for n in range(int(start), int(end) + 1):
            address = str(ipaddress.IPv4Address(n))
            if address not in used:
                return address
    return None


def _new_mac(everywhere: list[_HostState]) -> str:
    known = {mac for s in everywhere for _, d in s.domains for mac, _ in d.nics}
    known |= {mac for s in everywhere for n in s.networks.values() for mac in n.reservations}
    while True:
        # 52:54:00 is the prefix QEMU guests use; the rest is random
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
        if mac not in known:
            return mac


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:48] or "server"


def _hostname(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63] or "server"


def _domain_type_of(conn: Any) -> str:
    return "test" if str(conn.getType()).lower() == "test" else "kvm"


def _invalid_state(dom: Any, action: str, why: str) -> Conflict:
    return Conflict(
        f"libvirt: cannot {action} {dom.name()}: {why}",
        provider_message=f"Requested operation is not valid: {why}",
    )


def _power_off(dom: Any) -> None:
    try:
        dom.destroy()
    except libvirt.libvirtError as exc:
        # it may have shut down by itself since we looked
        if not (_is(exc, "VIR_ERR_OPERATION_INVALID") and not dom.isActive()):
            raise


def _undefine(dom: Any) -> None:
    everything = (
        libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    )
    try:
        dom.undefineFlags(everything)
    except libvirt.libvirtError as exc:
        if not _is(exc, "VIR_ERR_INVALID_ARG"):
            raise
        # drivers without checkpoints or NVRAM (the test driver) refuse those flags
        dom.undefineFlags(
            libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        )


def _delete_volume(conn: Any, vol: _Volume) -> None:
    try:
        conn.storagePoolLookupByName(vol.pool).storageVolLookupByName(vol.name).delete(0)
    except libvirt.libvirtError as exc:
        if not _is(exc, "VIR_ERR_NO_STORAGE_VOL"):  # gone already: an earlier attempt got it
            raise


def _undo(dom: Any, volumes: list[Any], reservation: _Reservation | None) -> None:
    """Best effort: whatever is left behind is an unmanaged leftover, never a half server."""
    if dom is not None:
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            _undefine(dom)
    for vol in volumes:
        with contextlib.suppress(libvirt.libvirtError):
            vol.delete(0)
    if reservation is not None:
        with contextlib.suppress(libvirt.libvirtError):
            reservation.apply(libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE)


def _inactive_xml(dom: Any) -> str:
    if not dom.isPersistent():
        return str(dom.XMLDesc(0))
    # SECURE: the definition is written back whole, with its passwords
    return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))


def _change_devices(dom: Any, disk: ET.Element, *, attach: bool) -> None:
    """Hot-plug (or unplug) a disk on a running domain and in its definition; on a stopped one,
    in its definition only."""
    xml = ET.tostring(disk, encoding="unicode")
    if dom.isActive():
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        if dom.isPersistent():
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    else:
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    try:
        if attach:
            dom.attachDeviceFlags(xml, flags)
        else:
            dom.detachDeviceFlags(xml, flags)
        return
    except libvirt.libvirtError as exc:
        if not _is(exc, "VIR_ERR_NO_SUPPORT"):
            raise
        if dom.isActive():
            raise Unsupported(
                f"libvirt: the hypervisor of {dom.name()} cannot {'attach' if attach else 'detach'}"
                " disks while it runs; stop the server first",
                provider_message=exc.get_error_message() or str(exc),
            ) from exc
    # Hypervisors without the device API (libvirt's test driver) still take a new definition,
    # which is what the API does to a stopped domain.
    root = _parse(_inactive_xml(dom))
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    target = disk.find("target")
    dev = target.get("dev") if target is not None else None
    if attach:
        disks = list(devices.iterfind("disk"))
        position = list(devices).index(disks[-1]) + 1 if disks else 0
        devices.insert(position, disk)
    else:
        for old in devices.findall("disk"):
            old_target = old.find("target")
            if old_target is not None and old_target.get("dev") == dev:
                devices.remove(old)
    dom.connect().defineXML(ET.tostring(root, encoding="unicode"))


def _write_tags(dom: Any, domain: _Domain, tags: _Tags) -> None:
    """Rewrite govbroker's metadata element, keeping children this version does not know."""
    element = tags.element(None)
    if domain.metadata is not None:
        for child in domain.metadata:
            if _local(child.tag) not in _Tags.FIELDS:
                element.append(_without_namespace(child))
    xml = ET.tostring(element, encoding="unicode") if len(element) else None
    if dom.isActive():
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        if dom.isPersistent():
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    else:
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, NS_PREFIX if xml else None, NS, flags)
