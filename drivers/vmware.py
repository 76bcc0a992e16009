"""VMware vCenter through pyvmomi.

One driver instance holds one vCenter session and works in one datacenter (option
``datacenter``, default: the first by name). What maps to what:

- servers are VMs (templates excluded), ``external_id`` is the VM's MoRef value ("vm-123");
- hosts are ESXi hosts, storage pools are datastores, networks are standard networks and
  distributed portgroups (uplink portgroups left out), images are template VMs;
- flavors do not exist in vCenter: they come from the ``flavors`` option (or the defaults below)
  and only size CPU and memory; the root disk is the template's;
- a tenant's scope is the VM folder ``<folder_root>/<code>`` under the datacenter's vmFolder, and
  ``ensure_tenant_scope`` returns its inventory path ("DC0/vm/govbroker/agency-a");
- the owner and the request tag live in custom fields (``govbroker.tenant``,
  ``govbroker.request``), created on demand.

Reads are bulk: a ContainerView walked by the PropertyCollector's ``RetrievePropertiesEx`` /
``ContinueRetrievePropertiesEx`` in pages of ``page_size`` objects, asking only for the
properties in ``VM_PROPERTIES``; the MoRef → name maps of hosts, datastores, folders and networks
come from one more retrieval. ``ex_server_changes`` follows changes with ``WaitForUpdatesEx``.

Creating a server clones a template: the clone carries an ``instanceUuid`` derived from the
request tag, so a retried create finds a clone whose answer was lost (``SearchIndex.FindByUuid``)
and finishes it instead of cloning again; the request-tag custom field is written last and marks
the create as complete. Addresses come from the vCenter IP pool associated with the VM's network
(``IpPoolManager.AllocateIpv4Address``, idempotent per allocation id) and reach the guest through
guest customization with a fixed IP. vCenter lets only extension sessions allocate from IP pools;
with ``ip_allocation: "none"`` the driver leaves addressing to DHCP and reports what the guest
reports.

Options: ``datacenter``, ``verify_tls`` (default true), ``timeout_s`` (socket timeout, default
30), ``task_timeout_s`` (default 600), ``retries`` (attempts, default 3), ``retry_max_wait``,
``page_size`` (default 500), ``folder_root`` (default "govbroker"), ``template_folder`` (a folder
path under vmFolder to take images from; default: every template in the datacenter),
``datastore_tiers`` ({datastore name: tier}; otherwise names containing ssd/flash/nvme are "ssd"
and the rest ``default_tier``, "hdd"), ``root_tier`` (where clones' root disks go; default the
template's datastore), ``flavors``, ``overcommit``, ``ip_allocation`` ("ip_pool" or "none"),
``owner_field``, ``request_field``, ``created_field``.

Data disks are added after creation with ``attach_disk`` (a thin VirtualDisk created on the
emptiest accessible datastore of the tier, on the VM's first SCSI controller, by
``ReconfigVM_Task``) and removed with ``detach_disk`` (its file destroyed); the boot disk cannot
be removed. There are no public addresses: vCenter's IP pools hand out the addresses of the VM's
own network. Server names are at most 80 characters, as vSphere's inventory names, and may not
contain '%', '/' or '\\', which vSphere escapes in names (the VM would not be called what was
asked).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import math
import re
import ssl
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pyVim import connect as pyvim_connect
from pyVmomi import VmomiSupport, vim, vmodl

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
log = logging.getLogger(__name__)

PC = vmodl.query.PropertyCollector
MIB = 1024 * 1024
GIB = 1024 * MIB

# Exactly what a server is made of; nothing else is fetched per VM. `config.createDate` joins
# when the session's API version has it (vSphere 6.7 and later).
VM_PROPERTIES: tuple[str, ...] = (
    "name",
    "parent",
    "config.template",
    "config.instanceUuid",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "config.hardware.device",
    "runtime.powerState",
    "runtime.host",
    "guest.net",
    "guest.ipAddress",
    "customValue",
)
CREATE_DATE = "config.createDate"
TOPOLOGY_TYPES = [
    vim.HostSystem,
    vim.Datastore,
    vim.Folder,
    vim.ComputeResource,
    vim.Network,
    vim.DistributedVirtualSwitch,
]

DEFAULT_FLAVORS: tuple[Mapping[str, Any], ...] = (
    {"name": "s1.small", "vcpu": 1, "memory_mb": 2048},
    {"name": "s1.medium", "vcpu": 2, "memory_mb": 4096},
    {"name": "s1.large", "vcpu": 4, "memory_mb": 8192},
    {"name": "s1.xlarge", "vcpu": 8, "memory_mb": 16384},
)
DEFAULT_OVERCOMMIT: Mapping[str, float] = {"vcpu": 4.0, "memory_mb": 1.0}
SSD_NAME = re.compile(r"ssd|flash|nvme", re.IGNORECASE)
# deterministic instanceUuids for clones: uuid5(namespace, request tag)
REQUEST_NAMESPACE = uuid.UUID("5b0c1f52-2a53-4f4e-9d0b-6f1c8a3e7d21")
ALLOCATION_PREFIX = "govbroker:"
POWER_STATES: Mapping[str, PowerState] = {
    "poweredOn": PowerState.running,
    "poweredOff": PowerState.stopped,
    "suspended": PowerState.suspended,
}
SCSI_RESERVED_UNIT = 7  # the controller's own unit on a SCSI bus


# --- translated state ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerChanges:
    """What `ex_server_changes` saw. With `full`, `changed` is every server there is (the version
    was unknown to this session, so the caller must drop servers missing from it)."""

    changed: tuple[Server, ...]
    removed: tuple[str, ...]
    version: str
    full: bool = False


@dataclass(frozen=True)
class _HostInfo:
    name: str
    parent: str | None
    threads: int
    memory_mb: int
    state: str


@dataclass(frozen=True)
class _DatastoreInfo:
    name: str
    tier: str
    capacity_gb: int
    free_gb: int
    accessible: bool


@dataclass(frozen=True)
class _ComputeInfo:
    name: str
    pool: str | None
    is_cluster: bool


@dataclass(frozen=True)
class _NetworkInfo:
    name: str
    kind: str  # "network" or "dvportgroup"
    uplink: bool
    switch: str | None  # the distributed switch's MoRef value, for portgroups
    key: str | None


@dataclass
class _Topology:
    """MoRef value → what a server or a placement needs to know, from one retrieval."""

    hosts: dict[str, _HostInfo] = field(default_factory=dict)
    datastores: dict[str, _DatastoreInfo] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=dict)  # → inventory path
    compute: dict[str, _ComputeInfo] = field(default_factory=dict)
    networks: dict[str, _NetworkInfo] = field(default_factory=dict)
    switch_uuids: dict[str, str] = field(default_factory=dict)

    def knows(
        self, hosts: Iterable[str], datastores: Iterable[str], folders: Iterable[str]
    ) -> bool:
        return (
            all(h in self.hosts for h in hosts)
            and all(d in self.datastores for d in datastores)
            and all(f in self.folders for f in folders)
        )


@dataclass
class _Session:
    """Everything that lives and dies with one vCenter login."""

    si: Any
    content: Any
    version: str
    datacenter: Any
    dc_name: str
    vm_folder: Any
    vm_view: Any
    topology_view: Any
    with_create_date: bool
    watch: _Watch | None = None


@dataclass
class _Watch:
    collector: Any
    filter: Any


@dataclass(frozen=True)
class _FieldKeys:
    owner: int | None
    request: int | None
    created: int | None


# --- fault translation --------------------------------------------------------------------------


def _fault_text(fault: Any) -> str:
    """The provider's words for a vim/vmodl fault, with the details its message often lacks."""
    name = getattr(fault, "_wsdlName", type(fault).__name__)
    msg = str(getattr(fault, "msg", "") or "")
    if msg.startswith("*types."):  # the simulator's message is its Go type name
        msg = ""
    details: list[str] = []
    for attr in ("obj", "requestedState", "existingState", "name", "invalidProperty", "file"):
        value = getattr(fault, attr, None)
        if value:
            details.append(f"{attr}={getattr(value, '_moId', value)}")
    text = f"{name}: {msg}" if msg else name
    return f"{text} ({', '.join(details)})" if details else text


def _translate(exc: BaseException, what: str) -> DriverError:
    """Map a pyvmomi fault or a transport error to the driver's errors, keeping the message."""
    if isinstance(exc, DriverError):
        return exc
    if isinstance(exc, vmodl.MethodFault):
        text = _fault_text(exc)
        if isinstance(exc, vim.fault.InvalidLogin | vim.fault.NoPermission):
            return Unauthorized(f"vmware: {what}: {text}", provider_message=text)
        if isinstance(exc, vmodl.fault.ManagedObjectNotFound | vim.fault.NotFound):
            return NotFound(f"vmware: {what}: {text}", provider_message=text)
        if isinstance(exc, vim.fault.InsufficientResourcesFault | vim.fault.NoDiskSpace):
            return ProviderQuotaExceeded(f"vmware: {what}: {text}", provider_message=text)
        if isinstance(
            exc,
            vim.fault.InvalidState
            | vim.fault.TaskInProgress
            | vim.fault.DuplicateName
            | vim.fault.CustomizationPending,
        ):
            return Conflict(f"vmware: {what}: {text}", provider_message=text)
        if isinstance(
            exc,
            vmodl.fault.InvalidArgument
            | vim.fault.InvalidVmConfig
            | vim.fault.InvalidDeviceSpec
            | vim.fault.InvalidName,
        ):
            return InvalidSpec(f"vmware: {what}: {text}", provider_message=text)
        if isinstance(exc, vmodl.fault.NotSupported):
            return Unsupported(f"vmware: {what}: {text}", provider_message=text)
        if isinstance(
            exc,
            vim.fault.NotAuthenticated
            | vim.fault.Timedout
            | vmodl.fault.HostCommunication
            | vmodl.fault.SystemError
            | vmodl.fault.RequestCanceled,
        ):
            return Unavailable(f"vmware: {what}: {text}", provider_message=text)
        return DriverError(f"vmware: {what}: {text}", provider_message=text)
    if isinstance(exc, ssl.SSLCertVerificationError):
        # a certificate that does not verify will not verify on the next attempt either
        return DriverError(f"vmware: {what}: {exc}", provider_message=str(exc))
    if isinstance(exc, OSError | http.client.HTTPException):
        text = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError) and "timed out" not in text:
            text = f"timed out: {text}"
        return Unavailable(f"vmware: {what}: {text}", provider_message=text)
    return DriverError(f"vmware: {what}: {exc!r}", provider_message=str(exc) or repr(exc))


# --- pure conversion ----------------------------------------------------------------------------


def _moid(ref: Any) -> str | None:
    return None if ref is None else str(ref._moId)


def _props(content: Any) -> dict[str, Any]:
    return {p.name: p.val for p in content.propSet or ()}


def _tier(name: str, tiers: Mapping[str, str], default: str) -> str:
    if name in tiers:
        return tiers[name]
    return "ssd" if SSD_NAME.search(name) else default


def _disks(devices: Sequence[Any] | None, datastores: Mapping[str, _DatastoreInfo]) -> list[Disk]:
    """The VM's virtual disks, boot disk first: ordered by controller and unit as the firmware
    enumerates them."""
    found: list[tuple[int, int, Disk]] = []
    for d in devices or ():
        if not isinstance(d, vim.vm.device.VirtualDisk):
            continue
        kb = d.capacityInKB or 0
        size_gb = math.ceil(kb / MIB) if kb > 0 else 0
        ds = datastores.get(_moid(getattr(d.backing, "datastore", None)) or "")
        found.append(
            (
                d.controllerKey or 0,
                d.unitNumber or 0,
                Disk(size_gb, ds.tier if ds else "unknown", external_id=_disk_identity(d)),
            )
        )
    found.sort(key=lambda t: (t[0], t[1]))
    return [d for _, _, d in found]


def _disk_identity(device: Any) -> str:
    backing = device.backing
    ident = getattr(backing, "uuid", None) or getattr(backing, "fileName", None)
    return str(ident or device.key)


def _ips(props: Mapping[str, Any]) -> tuple[str, ...]:
    ips: list[str] = []
    for nic in props.get("guest.net") or ():
        for ip in nic.ipAddress or ():
            if ip not in ips and not ip.startswith("fe80:"):
                ips.append(ip)
    primary = props.get("guest.ipAddress")
    if primary and primary not in ips:
        ips.insert(0, primary)
    return tuple(ips)


def _custom_values(values: Sequence[Any] | None) -> dict[int, str]:
    # later entries win: vCenter keeps one value per key, the simulator appends every SetField
    return {v.key: v.value for v in values or () if hasattr(v, "value")}


def _utc(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, str) and value:
        try:
            return _utc(datetime.fromisoformat(value))
        except ValueError:
            return None
    return None


def _to_server(
    moid: str, props: Mapping[str, Any], topo: _Topology, keys: _FieldKeys, scope_prefix: str
) -> Server:
    values = _custom_values(props.get("customValue"))
    host_id = _moid(props.get("runtime.host"))
    host = topo.hosts.get(host_id or "")
    created = _utc(props.get(CREATE_DATE))
    if created is None and keys.created is not None:
        created = _utc(values.get(keys.created))
    folder = topo.folders.get(_moid(props.get("parent")) or "")
    extra: dict[str, Any] = {
        "instance_uuid": props.get("config.instanceUuid"),
        "host_id": host_id,
        "folder": folder,
    }
    if folder and folder.startswith(scope_prefix):
        code = folder[len(scope_prefix) :].split("/", 1)[0]
        extra["scope"] = scope_prefix + code
    return Server(
        external_id=moid,
        name=str(props.get("name") or moid),
        vcpu=int(props.get("config.hardware.numCPU") or 0),
        memory_mb=int(props.get("config.hardware.memoryMB") or 0),
        disks=tuple(_disks(props.get("config.hardware.device"), topo.datastores)),
        ips=_ips(props),
        power_state=POWER_STATES.get(str(props.get("runtime.powerState")), PowerState.unknown),
        owner_tag=(values.get(keys.owner) or None) if keys.owner is not None else None,
        request_tag=(values.get(keys.request) or None) if keys.request is not None else None,
        created_at=created,
        host=host.name if host else host_id,
        extra=extra,
    )


def _request_uuid(request_tag: str) -> str:
    return str(uuid.uuid5(REQUEST_NAMESPACE, request_tag))


# --- the driver ---------------------------------------------------------------------------------


class VMwareDriver(Driver):
    kind = "vmware"
    name_max_length = 80
    name_pattern = re.compile(r"^[^%/\\\x00-\x1f\x7f]+\Z")
    name_rule = "1 to 80 characters, without '%', '/', '\\' or control characters"
    # Not resize_live: vCenter refuses CPU/memory changes on a running VM unless hot-add is
    # enabled, and never shrinks one live; `resize` asks for the VM to be powered off then.
    # Not floating_ip: vCenter has no public addresses of its own.
    capabilities = frozenset(
        {
            Capability.create,
            Capability.resize,
            Capability.power,
            Capability.reboot,
            Capability.volumes,
            Capability.tenant_scope,
            Capability.incremental_sync,
            Capability.templates,
            Capability.flavors,
        }
    )

    def __init__(self, endpoint: str, credentials: Mapping[str, str], options: Mapping[str, Any]):
        super().__init__(endpoint, credentials, options)
        url = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise InvalidSpec(f"vmware: endpoint {endpoint!r} is not an http(s) URL")
        self._scheme = url.scheme
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._path = url.path.rstrip("/") or "/sdk"
        self._timeout_s = float(options.get("timeout_s", 30))
        self._task_timeout_s = float(options.get("task_timeout_s", 600))
        self._verify_tls = bool(options.get("verify_tls", True))
        self._page_size = max(1, int(options.get("page_size", 500)))
        self._folder_root = str(options.get("folder_root", "govbroker")).strip("/")
        self._template_folder = options.get("template_folder")
        self._tiers = {str(k): str(v) for k, v in (options.get("datastore_tiers") or {}).items()}
        self._default_tier = str(options.get("default_tier", "hdd"))
        self._root_tier = options.get("root_tier")
        self._ip_allocation = str(options.get("ip_allocation", "ip_pool"))
        self._overcommit = {**DEFAULT_OVERCOMMIT, **(options.get("overcommit") or {})}
        self._field_names = (
            str(options.get("owner_field", "govbroker.tenant")),
            str(options.get("request_field", "govbroker.request")),
            str(options.get("created_field", "govbroker.created")),
        )
        self._flavors = [
            Flavor(
                external_id=str(f.get("id", f["name"])),
                name=str(f["name"]),
                vcpu=int(f["vcpu"]),
                memory_mb=int(f["memory_mb"]),
                # no disk_gb: the root disk is the template's, whatever a flavor says
            )
            for f in options.get("flavors") or DEFAULT_FLAVORS
        ]
        self._retry = remote(
            max(1, int(options.get("retries", 3))), float(options.get("retry_max_wait", 4.0))
        )
        self._lock = threading.RLock()
        self._session: _Session | None = None
        self._topology_cache: _Topology | None = None
        self._keys: _FieldKeys | None = None
        if not self.credentials.get("username"):
            raise Unauthorized("vmware: credentials need a username and a password")

    # -- connection ------------------------------------------------------------------------------

    def _connect(self) -> _Session:
        with self._lock:
            if self._session is not None:
                return self._session
            context = None
            if self._scheme == "https":
                context = ssl.create_default_context()
                if not self._verify_tls:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
            version = self._negotiate_version(context)
            # pyVim's SmartConnect does this negotiation itself, over a connection without a
            # timeout, so a hung vCenter would hang it forever; Connect with the version found
            # here logs in with the same stub SmartConnect would build.
            si = pyvim_connect.Connect(
                host=self._host,
                port=self._port if self._scheme == "https" else -self._port,
                user=self.credentials.get("username", ""),
                pwd=self.credentials.get("password", ""),
                path=self._path,
                version=version,
                sslContext=context,
                httpConnectionTimeout=self._timeout_s,
                disableSslCertValidation=not self._verify_tls,
            )
            content = si.RetrieveContent()
            try:
                dc = self._find_datacenter(content)
                views = content.viewManager
                vm_view = views.CreateContainerView(dc, [vim.VirtualMachine], True)
                topology_view = views.CreateContainerView(dc, TOPOLOGY_TYPES, True)
            except BaseException:
                with contextlib.suppress(Exception):  # do not leave the login behind
                    content.sessionManager.Logout()
                raise
            self._session = _Session(
                si=si,
                content=content,
                version=version,
                datacenter=dc,
                dc_name=str(dc.name),
                vm_folder=dc.vmFolder,
                vm_view=vm_view,
                topology_view=topology_view,
                with_create_date=VmomiSupport.IsChildVersion(version, "vim.version.version12"),
            )
            self._topology_cache = None
            self._keys = None
            return self._session

    def _negotiate_version(self, context: ssl.SSLContext | None) -> str:
        """The newest vim25 API version both pyVmomi and the endpoint speak."""
        conn: http.client.HTTPConnection
        if self._scheme == "https":
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout_s, context=context
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout_s)
        try:
            conn.request("GET", f"{self._path}/vimServiceVersions.xml")
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise Unavailable(
                f"vmware: {self.endpoint} answered {response.status} for its API versions",
                provider_message=f"{response.status} {response.reason}",
            )
        try:
            root = ET.fromstring(body)  # noqa: S314 - the endpoint is the configured vCenter
        except ET.ParseError as exc:
            raise Unavailable(
                f"vmware: {self.endpoint} is not a vSphere API endpoint",
                provider_message=str(exc),
            ) from exc
        offered: set[str] = set()
        for ns in root.iter("namespace"):
            if (ns.findtext("name") or "") == "urn:vim25":
                offered.add(ns.findtext("version") or "")
                offered.update(v.text or "" for v in ns.iterfind("priorVersions/version"))
        for version in pyvim_connect.GetServiceVersions("vim25"):
            if VmomiSupport.versionIdMap.get(version) in offered:
                return str(version)
        raise Unavailable(
            f"vmware: {self.endpoint} offers no API version pyVmomi speaks",
            provider_message=f"vim25 versions offered: {sorted(offered)}",
        )

    def _find_datacenter(self, content: Any) -> Any:
        wanted = self.options.get("datacenter")
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.Datacenter], True)
        try:
            found = {
                str(props.get("name")): oc.obj
                for oc in self._retrieve_with(content, view, vim.Datacenter, ("name",))
                for props in [_props(oc)]
            }
        finally:
            view.DestroyView()
        if not found:
            raise NotFound(
                "vmware: the vCenter has no datacenter", provider_message="no datacenter"
            )
        if wanted is None:
            return found[min(found)]
        if str(wanted) not in found:
            raise NotFound(
                f"vmware: no datacenter {wanted!r}",
                provider_message=f"Datacenter {wanted} was not found ({', '.join(sorted(found))})",
            )
        return found[str(wanted)]

    def _drop_session(self) -> None:
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            stub = getattr(session.si, "_stub", None)
            if stub is not None and hasattr(stub, "DropConnections"):
                stub.DropConnections()

    def close(self) -> None:
        with self._lock:
            session, self._session = self._session, None
        if session is None:
            return
        try:
            if session.watch is not None:
                session.watch.collector.DestroyPropertyCollector()
            session.vm_view.DestroyView()
            session.topology_view.DestroyView()
            session.content.sessionManager.Logout()
        except Exception as exc:  # closing must not fail on a vCenter that went away
            log.debug("vmware: close: %s", exc)
        finally:
            stub = getattr(session.si, "_stub", None)
            if stub is not None and hasattr(stub, "DropConnections"):
                stub.DropConnections()

    # -- the one door every remote call goes through ------------------------------------------

    def _remote(self, what: str, fn: Callable[[_Session, int], T]) -> T:
        """Run `fn(session, attempt)` with faults translated; retried only on Unavailable."""
        attempts = 0

        def attempt() -> T:
            nonlocal attempts
            attempts += 1
            try:
                return fn(self._connect(), attempts)
            except vim.fault.NotAuthenticated as exc:
                # the session expired (or the vCenter restarted): log in again on the retry
                self._drop_session()
                raise _translate(exc, f"{what} at {self.endpoint}") from exc
            except DriverError:
                raise
            except Exception as exc:
                # Transport errors keep the session: pyvmomi has dropped its pooled connections
                # already, and a retry after a hiccup reuses the login, the views and the watch.
                raise _translate(exc, f"{what} at {self.endpoint}") from exc

        return self._retry(attempt)()

    # -- property collector --------------------------------------------------------------------

    def _retrieve_with(
        self, content: Any, root: Any, kind: Any, paths: Sequence[str]
    ) -> Iterator[Any]:
        """Every object of `kind` under the container view `root`, page by page."""
        spec = PC.FilterSpec(
            objectSet=[
                PC.ObjectSpec(
                    obj=root,
                    skip=True,
                    selectSet=[PC.TraversalSpec(type=vim.view.ContainerView, path="view")],
                )
            ],
            propSet=[PC.PropertySpec(type=kind, pathSet=list(paths))],
        )
        return self._pages(content, [spec])

    def _pages(self, content: Any, specs: list[Any]) -> Iterator[Any]:
        collector = content.propertyCollector
        result = collector.RetrievePropertiesEx(
            specSet=specs, options=PC.RetrieveOptions(maxObjects=self._page_size)
        )
        token = None
        try:
            while result is not None:
                token = result.token
                yield from result.objects or ()
                if not token:
                    return
                result = collector.ContinueRetrievePropertiesEx(token=token)
                token = None
        finally:
            if token:
                # a caller that stopped early (found what it looked for): the vCenter would
                # otherwise hold the remaining pages until the session ends
                with contextlib.suppress(vmodl.MethodFault, OSError, http.client.HTTPException):
                    collector.CancelRetrievePropertiesEx(token=token)

    def _objects(
        self, session: _Session, kind: Any, moids: Sequence[str], paths: Sequence[str]
    ) -> Iterator[Any]:
        """Named objects in one retrieval; missing ones are left out (vCenter reports them in
        missingSet, the simulator skips them)."""
        stub = session.si._stub
        spec = PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=kind(m, stub)) for m in moids],
            propSet=[PC.PropertySpec(type=kind, pathSet=list(paths))],
            reportMissingObjectsInResults=True,
        )
        for oc in self._pages(session.content, [spec]):
            if oc.propSet or not oc.missingSet:
                yield oc

    def _one(self, session: _Session, kind: Any, moid: str, paths: Sequence[str]) -> dict[str, Any]:
        """One object's properties, or the vCenter's ManagedObjectNotFound."""
        spec = PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=kind(moid, session.si._stub))],
            propSet=[PC.PropertySpec(type=kind, pathSet=list(paths))],
            reportMissingObjectsInResults=False,
        )
        result = session.content.propertyCollector.RetrievePropertiesEx(
            specSet=[spec], options=PC.RetrieveOptions()
        )
        if result is not None and result.objects:
            return _props(result.objects[0])
        # vCenter raises this itself; the simulator returns nothing for a missing object
        raise vmodl.fault.ManagedObjectNotFound(
            msg="The object has already been deleted or has not been completely created",
            obj=kind(moid, session.si._stub),
        )

    def _vm_paths(self, session: _Session) -> tuple[str, ...]:
        return VM_PROPERTIES + ((CREATE_DATE,) if session.with_create_date else ())

    # -- topology and custom fields ------------------------------------------------------------

    def _topology(self, session: _Session, *, refresh: bool = False) -> _Topology:
        with self._lock:
            if self._topology_cache is not None and not refresh:
                return self._topology_cache
        view = session.topology_view
        spec = PC.FilterSpec(
            objectSet=[
                PC.ObjectSpec(
                    obj=view,
                    skip=True,
                    selectSet=[PC.TraversalSpec(type=vim.view.ContainerView, path="view")],
                )
            ],
            propSet=[
                PC.PropertySpec(
                    type=vim.HostSystem,
                    pathSet=[
                        "name",
                        "parent",
                        "hardware.cpuInfo.numCpuThreads",
                        "hardware.memorySize",
                        "runtime.connectionState",
                        "runtime.inMaintenanceMode",
                    ],
                ),
                PC.PropertySpec(
                    type=vim.Datastore,
                    pathSet=["name", "summary.capacity", "summary.freeSpace", "summary.accessible"],
                ),
                PC.PropertySpec(type=vim.Folder, pathSet=["name", "parent"]),
                PC.PropertySpec(type=vim.ComputeResource, pathSet=["name", "resourcePool"]),
                PC.PropertySpec(type=vim.Network, pathSet=["name"]),
                PC.PropertySpec(
                    type=vim.dvs.DistributedVirtualPortgroup,
                    pathSet=["key", "config.uplink", "config.distributedVirtualSwitch"],
                ),
                PC.PropertySpec(type=vim.DistributedVirtualSwitch, pathSet=["uuid"]),
            ],
        )
        topo = _Topology()
        folders: dict[str, tuple[str, str | None]] = {}
        for oc in self._pages(session.content, [spec]):
            moid, p = str(oc.obj._moId), _props(oc)
            if isinstance(oc.obj, vim.HostSystem):
                state = "up"
                if p.get("runtime.inMaintenanceMode"):
                    state = "maintenance"
                elif p.get("runtime.connectionState") != "connected":
                    state = "down"
                topo.hosts[moid] = _HostInfo(
                    name=str(p.get("name")),
                    parent=_moid(p.get("parent")),
                    threads=int(p.get("hardware.cpuInfo.numCpuThreads") or 0),
                    memory_mb=int(p.get("hardware.memorySize") or 0) // MIB,
                    state=state,
                )
            elif isinstance(oc.obj, vim.Datastore):
                name = str(p.get("name"))
                capacity = int(p.get("summary.capacity") or 0)
                free = min(max(int(p.get("summary.freeSpace") or 0), 0), capacity)
                topo.datastores[moid] = _DatastoreInfo(
                    name=name,
                    tier=_tier(name, self._tiers, self._default_tier),
                    capacity_gb=capacity // GIB,
                    free_gb=free // GIB,
                    accessible=bool(p.get("summary.accessible", True)),
                )
            elif isinstance(oc.obj, vim.Folder):
                folders[moid] = (str(p.get("name")), _moid(p.get("parent")))
            elif isinstance(oc.obj, vim.ComputeResource):
                topo.compute[moid] = _ComputeInfo(
                    name=str(p.get("name")),
                    pool=_moid(p.get("resourcePool")),
                    is_cluster=isinstance(oc.obj, vim.ClusterComputeResource),
                )
            elif isinstance(oc.obj, vim.Network):
                is_pg = isinstance(oc.obj, vim.dvs.DistributedVirtualPortgroup)
                topo.networks[moid] = _NetworkInfo(
                    name=str(p.get("name")),
                    kind="dvportgroup" if is_pg else "network",
                    uplink=bool(p.get("config.uplink")),
                    switch=_moid(p.get("config.distributedVirtualSwitch")),
                    key=p.get("key"),
                )
            elif isinstance(oc.obj, vim.DistributedVirtualSwitch):
                topo.switch_uuids[moid] = str(p.get("uuid"))

        def path(moid: str, depth: int = 0) -> str:
            name, parent = folders[moid]
            if parent in folders and depth < 64:
                return f"{path(parent, depth + 1)}/{name}"
            return f"{session.dc_name}/{name}"

        topo.folders = {moid: path(moid) for moid in folders}
        with self._lock:
            self._topology_cache = topo
        return topo

    def _topology_for(self, session: _Session, props: Mapping[str, Any]) -> _Topology:
        """The cached topology, refreshed when it misses the host, a datastore or the folder a
        server uses (added since it was read)."""
        topo = self._topology(session)
        datastores = [
            _moid(getattr(d.backing, "datastore", None)) or ""
            for d in props.get("config.hardware.device") or ()
            if isinstance(d, vim.vm.device.VirtualDisk)
        ]
        host, folder = _moid(props.get("runtime.host")), _moid(props.get("parent"))
        if topo.knows([host] if host else [], datastores, [folder] if folder else []):
            return topo
        return self._topology(session, refresh=True)

    def _field_keys(self, session: _Session, *, create: bool = False) -> _FieldKeys:
        with self._lock:
            keys = self._keys
        if keys is not None and (
            not create or None not in (keys.owner, keys.request, keys.created)
        ):
            return keys
        manager = session.content.customFieldsManager
        defined = {
            f.name: f.key
            for f in manager.field or ()
            if f.managedObjectType in (None, vim.VirtualMachine)
        }
        if create:
            for name in self._field_names:
                if name in defined:
                    continue
                try:
                    defined[name] = manager.AddFieldDefinition(
                        name=name, moType=vim.VirtualMachine
                    ).key
                except vim.fault.DuplicateName:
                    # another client defined it meanwhile
                    defined.update({f.name: f.key for f in manager.field or () if f.name == name})
        owner, request, created = (defined.get(n) for n in self._field_names)
        keys = _FieldKeys(owner=owner, request=request, created=created)
        with self._lock:
            self._keys = keys
        return keys

    def _scope_prefix(self, session: _Session) -> str:
        return f"{session.dc_name}/vm/{self._folder_root}/"

    def _convert(self, session: _Session, moid: str, props: Mapping[str, Any]) -> Server:
        topo = self._topology_for(session, props)
        return _to_server(moid, props, topo, self._field_keys(session), self._scope_prefix(session))

    def _server(self, session: _Session, moid: str) -> Server:
        props = self._one(session, vim.VirtualMachine, moid, self._vm_paths(session))
        if props.get("config.template"):
            raise NotFound(
                f"vmware: {moid} is a template, not a server",
                provider_message=f"The object {moid} is a template.",
            )
        return self._convert(session, moid, props)

    # -- inventory -------------------------------------------------------------------------------

    def check(self) -> None:
        self._remote("check", lambda s, _: s.content.sessionManager.currentSession)

    def list_hosts(self) -> list[Host]:
        def do(session: _Session, _: int) -> list[Host]:
            topo = self._topology(session, refresh=True)
            used = {moid: {"vcpu": 0, "memory_mb": 0} for moid in topo.hosts}
            paths = (
                "config.template",
                "runtime.host",
                "config.hardware.numCPU",
                "config.hardware.memoryMB",
            )
            for oc in self._retrieve_with(
                session.content, session.vm_view, vim.VirtualMachine, paths
            ):
                p = _props(oc)
                host = used.get(_moid(p.get("runtime.host")) or "")
                if host is None or p.get("config.template"):
                    continue
                # stopped VMs count: their resources stay reserved on the host
                host["vcpu"] += int(p.get("config.hardware.numCPU") or 0)
                host["memory_mb"] += int(p.get("config.hardware.memoryMB") or 0)
            hosts = []
            for moid, h in sorted(topo.hosts.items(), key=lambda kv: kv[1].name):
                compute = topo.compute.get(h.parent or "")
                hosts.append(
                    Host(
                        external_id=moid,
                        name=h.name,
                        cluster=compute.name if compute and compute.is_cluster else None,
                        capacity=Capacity(
                            total={"vcpu": h.threads, "memory_mb": h.memory_mb},
                            allocated=used[moid],
                        ),
                        overcommit=dict(self._overcommit),
                        state=h.state,
                        extra={"compute_resource": h.parent},
                    )
                )
            return hosts

        return self._remote("list_hosts", do)

    def root_tier(self) -> str | None:
        # clones go where the template is unless root_tier says otherwise; the template's
        # datastore is not known before a clone, so the first tier listed stands in for it
        return str(self._root_tier) if self._root_tier else super().root_tier()

    def list_storage(self) -> list[StoragePool]:
        def do(session: _Session, _: int) -> list[StoragePool]:
            topo = self._topology(session, refresh=True)
            return [
                StoragePool(
                    external_id=moid,
                    name=d.name,
                    tier=d.tier,
                    capacity_gb=d.capacity_gb,
                    free_gb=d.free_gb,
                    extra={"accessible": d.accessible},
                )
                for moid, d in sorted(topo.datastores.items(), key=lambda kv: kv[1].name)
            ]

        return self._remote("list_storage", do)

    def list_networks(self) -> list[Network]:
        def do(session: _Session, _: int) -> list[Network]:
            topo = self._topology(session, refresh=True)
            pools = self._ip_pools(session)
            networks = []
            for moid, n in sorted(topo.networks.items(), key=lambda kv: kv[1].name):
                if n.uplink:
                    continue
                pool = pools.get(moid)
                extra: dict[str, Any] = {"type": n.kind}
                if pool is not None:
                    extra["ip_pool"] = pool.id
                networks.append(
                    Network(
                        external_id=moid,
                        name=n.name,
                        cidr=_pool_cidr(pool) if pool is not None else None,
                        extra=extra,
                    )
                )
            return networks

        return self._remote("list_networks", do)

    def list_flavors(self) -> list[Flavor]:
        return list(self._flavors)

    def list_images(self) -> list[Image]:
        def do(session: _Session, _: int) -> list[Image]:
            root, view = session.vm_view, None
            if self._template_folder:
                folder = session.content.searchIndex.FindByInventoryPath(
                    f"{session.dc_name}/vm/{str(self._template_folder).strip('/')}"
                )
                if folder is None:
                    raise NotFound(
                        f"vmware: no template folder {self._template_folder!r}",
                        provider_message=f"Folder {self._template_folder} was not found.",
                    )
                view = session.content.viewManager.CreateContainerView(
                    folder, [vim.VirtualMachine], True
                )
                root = view
            try:
                # a light pass to find the templates, then their devices: templates are few
                templates = sorted(
                    str(oc.obj._moId)
                    for oc in self._retrieve_with(
                        session.content, root, vim.VirtualMachine, ("config.template",)
                    )
                    if _props(oc).get("config.template")
                )
            finally:
                if view is not None:
                    view.DestroyView()
            topo = self._topology(session)
            images = []
            for oc in self._objects(
                session,
                vim.VirtualMachine,
                templates,
                ("name", "config.guestId", "config.guestFullName", "config.hardware.device"),
            ):
                p = _props(oc)
                disks = _disks(p.get("config.hardware.device"), topo.datastores)
                guest = str(p.get("config.guestId") or "")
                images.append(
                    Image(
                        external_id=str(oc.obj._moId),
                        name=str(p.get("name")),
                        os="windows" if guest.startswith("win") else ("linux" if guest else None),
                        min_disk_gb=disks[0].size_gb if disks else 0,
                        extra={"guest": p.get("config.guestFullName") or guest},
                    )
                )
            return sorted(images, key=lambda i: i.name)

        return self._remote("list_images", do)

    def _ip_pools(self, session: _Session) -> dict[str, Any]:
        """Network MoRef value → the enabled IPv4 pool associated with it."""
        if self._ip_allocation == "none":
            return {}
        pools: dict[str, Any] = {}
        for pool in session.content.ipPoolManager.QueryIpPools(dc=session.datacenter) or ():
            cfg = pool.ipv4Config
            if cfg is None or cfg.ipPoolEnabled is False or not cfg.range:
                continue
            for assoc in pool.networkAssociation or ():
                moid = _moid(assoc.network)
                if moid and moid not in pools:
                    pools[moid] = pool
        return pools

    # -- servers ---------------------------------------------------------------------------------

    def list_servers(self) -> list[Server]:
        def do(session: _Session, _: int) -> list[Server]:
            topo = self._topology(session, refresh=True)
            keys = self._field_keys(session)
            prefix = self._scope_prefix(session)
            servers = []
            for oc in self._retrieve_with(
                session.content, session.vm_view, vim.VirtualMachine, self._vm_paths(session)
            ):
                props = {p.name: p.val for p in oc.propSet}
                if not props.get("config.template"):
                    servers.append(_to_server(oc.obj._moId, props, topo, keys, prefix))
            return servers

        return self._remote("list_servers", do)

    def get_server(self, external_id: str) -> Server:
        return self._remote("get_server", lambda s, _: self._server(s, external_id))

    def find_server_by_tag(self, request_tag: str) -> Server | None:
        def do(session: _Session, _: int) -> Server | None:
            found = self._by_request_uuid(session, request_tag)
            if found is not None:
                return found[0]
            # A VM tagged without the derived instanceUuid (vCenter replaces an instanceUuid
            # that collides): look through every VM's custom fields.
            keys = self._field_keys(session)
            if keys.request is None:
                return None
            for oc in self._retrieve_with(
                session.content,
                session.vm_view,
                vim.VirtualMachine,
                ("customValue", "config.template"),
            ):
                p = _props(oc)
                values = _custom_values(p.get("customValue"))
                if values.get(keys.request) == request_tag and not p.get("config.template"):
                    return self._server(session, str(oc.obj._moId))
            return None

        return self._remote("find_server_by_tag", do)

    def _by_request_uuid(self, session: _Session, request_tag: str) -> tuple[Server, bool] | None:
        """The clone made for this request by its derived instanceUuid, and whether its create
        finished (the request tag is written last)."""
        ref = session.content.searchIndex.FindByUuid(
            datacenter=session.datacenter,
            uuid=_request_uuid(request_tag),
            vmSearch=True,
            instanceUuid=True,
        )
        if ref is None:
            return None
        try:
            server = self._server(session, str(ref._moId))
        except (NotFound, vmodl.fault.ManagedObjectNotFound):
            return None  # destroyed between the search and the read
        if server.request_tag not in (None, request_tag):
            return None
        # an unfinished create has no tag yet: its instanceUuid carries the request
        return replace(server, request_tag=request_tag), server.request_tag == request_tag

    # -- create ----------------------------------------------------------------------------------

    def create_server(self, spec: ServerSpec) -> Server:
        why = self.invalid_name(spec.name)
        if why is not None:
            raise InvalidSpec(f"vmware: invalid server name {spec.name!r}: {why}")
        vcpu, memory_mb = self._size(spec)
        for disk in spec.disks:
            if disk.size_gb < 1:
                raise InvalidSpec(f"vmware: invalid disk size {disk.size_gb} GB")
        if spec.public_ip:
            raise Unsupported(
                "vmware: vCenter has no public addresses",
                provider_message="public IP addresses are not a vCenter resource",
            )

        def do(session: _Session, _: int) -> Server:
            keys = self._field_keys(session, create=True)
            existing = self._by_request_uuid(session, spec.request_tag)
            if existing is not None and existing[1]:
                return existing[0]
            if existing is not None:
                moid = existing[0].external_id  # an interrupted create: finish it
            else:
                moid = self._clone(session, spec, vcpu, memory_mb)
            self._finish(session, moid, spec, vcpu, memory_mb, keys)
            return self._server(session, moid)

        return self._remote("create_server", do)

    def _size(self, spec: ServerSpec) -> tuple[int, int]:
        if spec.flavor is not None:
            for f in self._flavors:
                if spec.flavor in (f.external_id, f.name):
                    return f.vcpu, f.memory_mb
            raise NotFound(
                f"vmware: no flavor {spec.flavor!r}",
                provider_message=f"Flavor {spec.flavor} could not be found.",
            )
        if spec.vcpu is None or spec.memory_mb is None:
            raise InvalidSpec("vmware: a server needs a flavor or both vcpu and memory_mb")
        if spec.vcpu < 1 or spec.memory_mb < 1:
            raise InvalidSpec(f"vmware: invalid size {spec.vcpu} vCPU / {spec.memory_mb} MB")
        return spec.vcpu, spec.memory_mb

    def _clone(self, session: _Session, spec: ServerSpec, vcpu: int, memory_mb: int) -> str:
        stub = session.si._stub
        try:
            template = self._one(
                session,
                vim.VirtualMachine,
                spec.image,
                ("name", "config.template", "config.hardware.device", "runtime.host"),
            )
        except vmodl.fault.ManagedObjectNotFound as exc:
            raise NotFound(
                f"vmware: no template {spec.image!r}", provider_message=_fault_text(exc)
            ) from exc
        if not template.get("config.template"):
            raise NotFound(
                f"vmware: {spec.image} is not a template",
                provider_message=f"The virtual machine {spec.image} is not a template.",
            )
        topo = self._topology(session)
        folder = self._scope_folder(session, spec.scope)
        devices = list(template.get("config.hardware.device") or ())

        # Without a hint the clone joins the template's compute resource: in a DRS cluster
        # vCenter picks the host, a standalone host takes it itself.
        location = vim.vm.RelocateSpec()
        host_id = _moid(template.get("runtime.host"))
        if spec.host_hint is not None:
            host_id = self._host_by_hint(session, spec.host_hint)
            location.host = vim.HostSystem(host_id, stub)
        host = topo.hosts.get(host_id or "")
        compute = topo.compute.get(host.parent or "") if host else None
        if compute is None or compute.pool is None:
            topo = self._topology(session, refresh=True)
            host = topo.hosts.get(host_id or "")
            compute = topo.compute.get(host.parent or "") if host else None
        if compute is None or compute.pool is None:
            raise NotFound(
                f"vmware: no resource pool for host {host_id}",
                provider_message=f"Host {host_id} has no resource pool.",
            )
        location.pool = vim.ResourcePool(compute.pool, stub)
        if self._root_tier:
            location.datastore = vim.Datastore(self._datastore(topo, str(self._root_tier)), stub)

        changes = self._data_disks(session, topo, devices, spec.disks)
        nic = self._nic_change(topo, devices, spec.network, stub)
        if nic is not None:
            changes.append(nic)
        config = vim.vm.ConfigSpec(
            numCPUs=vcpu,
            memoryMB=memory_mb,
            instanceUuid=_request_uuid(spec.request_tag),
            deviceChange=changes,
        )
        clone = vim.vm.CloneSpec(location=location, powerOn=False, template=False, config=config)
        task = vim.VirtualMachine(spec.image, stub).CloneVM_Task(
            folder=folder, name=spec.name, spec=clone
        )
        return str(self._wait(task, "clone")._moId)

    def _scope_folder(self, session: _Session, scope: str | None) -> Any:
        if scope is None:
            return self._ensure_folder(session, [self._folder_root])
        found = session.content.searchIndex.FindByInventoryPath(scope)
        if not isinstance(found, vim.Folder):
            raise NotFound(
                f"vmware: no tenant scope {scope!r}",
                provider_message=f"Folder {scope} could not be found.",
            )
        return found

    def _ensure_folder(self, session: _Session, names: Sequence[str]) -> Any:
        """The folder at vmFolder/<names...>, created level by level where missing."""
        folder = session.vm_folder
        index = session.content.searchIndex
        for name in names:
            child = index.FindChild(entity=folder, name=name)
            if child is None:
                try:
                    child = folder.CreateFolder(name=name)
                except vim.fault.DuplicateName:
                    # created by a concurrent caller between the lookup and the create
                    child = index.FindChild(entity=folder, name=name)
            if not isinstance(child, vim.Folder):
                raise Conflict(
                    f"vmware: {name!r} under {folder} is not a folder",
                    provider_message=f"The name '{name}' already exists.",
                )
            folder = child
        # no need to forget the cached topology: reading a VM in an unknown folder refreshes it
        return folder

    def _host_by_hint(self, session: _Session, hint: str) -> str:
        topo = self._topology(session)
        for moid, h in topo.hosts.items():
            if hint in (moid, h.name):
                return moid
        raise NotFound(
            f"vmware: no host {hint!r}", provider_message=f"Host {hint} could not be found."
        )

    def _datastore(self, topo: _Topology, tier: str) -> str:
        candidates = [(d.free_gb, m) for m, d in topo.datastores.items() if d.tier == tier]
        candidates = [c for c in candidates if topo.datastores[c[1]].accessible]
        if not candidates:
            raise NotFound(
                f"vmware: no datastore of tier {tier!r}",
                provider_message=f"Datastore for tier '{tier}' was not found.",
            )
        return max(candidates)[1]

    def _data_disks(
        self, session: _Session, topo: _Topology, devices: list[Any], disks: Sequence[Disk]
    ) -> list[Any]:
        if not disks:
            return []
        stub = session.si._stub
        controllers = [d for d in devices if isinstance(d, vim.vm.device.VirtualSCSIController)]
        if not controllers:
            raise Unsupported(
                "vmware: the template has no SCSI controller for data disks",
                provider_message="no SCSI controller",
            )
        controller = min(controllers, key=lambda c: c.busNumber or 0)
        taken = {d.unitNumber for d in devices if d.controllerKey == controller.key}
        units = (u for u in range(16) if u != SCSI_RESERVED_UNIT and u not in taken)
        changes = []
        for n, disk in enumerate(disks):
            unit = next(units, None)
            if unit is None:
                raise InvalidSpec(f"vmware: too many disks for one SCSI controller ({len(disks)})")
            ds_moid = self._datastore(topo, disk.tier)
            device = vim.vm.device.VirtualDisk(
                key=-(n + 1),
                controllerKey=controller.key,
                unitNumber=unit,
                capacityInKB=disk.size_gb * MIB,
                backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                    fileName=f"[{topo.datastores[ds_moid].name}]",
                    datastore=vim.Datastore(ds_moid, stub),
                    diskMode="persistent",
                    thinProvisioned=True,
                ),
            )
            changes.append(
                vim.vm.device.VirtualDeviceSpec(
                    operation="add", fileOperation="create", device=device
                )
            )
        return changes

    def _nic_change(
        self, topo: _Topology, devices: list[Any], network: str | None, stub: Any
    ) -> Any | None:
        """Move the template's first NIC to the requested network, if it is on another one."""
        if network is None:
            return None
        target = topo.networks.get(network)
        if target is None:
            for moid, n in topo.networks.items():
                if n.name == network:
                    network, target = moid, n
                    break
        if target is None or target.uplink:
            raise NotFound(
                f"vmware: no network {network!r}",
                provider_message=f"Network {network} could not be found.",
            )
        nics = [d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]
        if not nics:
            raise Unsupported(
                "vmware: the template has no network adapter", provider_message="no NIC"
            )
        nic = nics[0]
        if _nic_network(nic) == network:
            return None
        if target.kind == "dvportgroup":
            nic.backing = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
                port=vim.dvs.PortConnection(
                    switchUuid=topo.switch_uuids.get(target.switch or "", ""),
                    portgroupKey=target.key or network,
                )
            )
        else:
            nic.backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
                deviceName=target.name, network=vim.Network(network, stub)
            )
        return vim.vm.device.VirtualDeviceSpec(operation="edit", device=nic)

    def _finish(
        self,
        session: _Session,
        moid: str,
        spec: ServerSpec,
        vcpu: int,
        memory_mb: int,
        keys: _FieldKeys,
    ) -> None:
        """Bring a clone to a running, tagged server; every step is skipped when done already,
        so a create interrupted anywhere resumes here."""
        stub = session.si._stub
        vm = vim.VirtualMachine(moid, stub)
        p = self._one(
            session,
            vim.VirtualMachine,
            moid,
            (
                "config.instanceUuid",
                "config.hardware.numCPU",
                "config.hardware.memoryMB",
                "config.hardware.device",
                "config.tools.pendingCustomization",
                "runtime.powerState",
                "guest.net",
                "customValue",
            ),
        )
        values = _custom_values(p.get("customValue"))
        manager = session.content.customFieldsManager
        if keys.owner is not None and values.get(keys.owner) != spec.owner_tag:
            manager.SetField(entity=vm, key=keys.owner, value=spec.owner_tag)
        if keys.created is not None and not values.get(keys.created):
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            manager.SetField(entity=vm, key=keys.created, value=stamp)
        # vCenter applies the clone spec's size; the simulator copies the template's instead
        if (p.get("config.hardware.numCPU"), p.get("config.hardware.memoryMB")) != (
            vcpu,
            memory_mb,
        ):
            self._wait(
                vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(numCPUs=vcpu, memoryMB=memory_mb)),
                "reconfigure",
            )
        powered_off = p.get("runtime.powerState") == "poweredOff"
        if powered_off and not _ips(p) and not p.get("config.tools.pendingCustomization"):
            self._customize(session, vm, spec.name, p)
        if p.get("runtime.powerState") != "poweredOn":
            self._wait(vm.PowerOnVM_Task(), "power on")
        if keys.request is not None:
            # written last: a VM carrying the request tag is a finished create
            manager.SetField(entity=vm, key=keys.request, value=spec.request_tag)

    def _customize(self, session: _Session, vm: Any, name: str, props: Mapping[str, Any]) -> None:
        """Give the first NIC a fixed address from its network's IP pool through guest
        customization, applied by the guest at the next power-on. The allocation id is the
        VM's, so allocating again after a retry yields the same address."""
        nics = [
            d
            for d in props.get("config.hardware.device") or ()
            if isinstance(d, vim.vm.device.VirtualEthernetCard)
        ]
        if not nics:
            return
        pool = self._ip_pools(session).get(_nic_network(nics[0]) or "")
        if pool is None:
            return
        allocation = ALLOCATION_PREFIX + str(props.get("config.instanceUuid"))
        ip = session.content.ipPoolManager.AllocateIpv4Address(
            dc=session.datacenter, poolId=pool.id, allocationId=allocation
        )
        if not ip:
            raise ProviderQuotaExceeded(
                f"vmware: IP pool {pool.name!r} has no free address",
                provider_message=f"IP pool {pool.name} is exhausted.",
            )
        cfg = pool.ipv4Config
        hostname = re.sub(r"[^A-Za-z0-9-]", "-", name)[:63].strip("-") or "vm"
        adapter = vim.vm.customization.IPSettings(
            ip=vim.vm.customization.FixedIp(ipAddress=ip),
            subnetMask=cfg.netmask,
            gateway=[cfg.gateway] if cfg.gateway else [],
            dnsServerList=list(cfg.dns or ()),
        )
        spec = vim.vm.customization.Specification(
            identity=vim.vm.customization.LinuxPrep(
                hostName=vim.vm.customization.FixedName(name=hostname),
                domain=str(pool.dnsDomain or "local"),
            ),
            globalIPSettings=vim.vm.customization.GlobalIPSettings(),
            nicSettingMap=[vim.vm.customization.AdapterMapping(adapter=adapter)]
            + [
                vim.vm.customization.AdapterMapping(
                    adapter=vim.vm.customization.IPSettings(
                        ip=vim.vm.customization.DhcpIpGenerator()
                    )
                )
                for _ in nics[1:]
            ],
        )
        self._wait(vm.CustomizeVM_Task(spec=spec), "customize")

    def _release_addresses(self, session: _Session, props: Mapping[str, Any]) -> None:
        instance_uuid = props.get("config.instanceUuid")
        if not instance_uuid:
            return
        pools = self._ip_pools(session)
        for ref in props.get("network") or ():
            pool = pools.get(_moid(ref) or "")
            if pool is None:
                continue
            try:
                session.content.ipPoolManager.ReleaseIpAllocation(
                    dc=session.datacenter,
                    poolId=pool.id,
                    allocationId=ALLOCATION_PREFIX + str(instance_uuid),
                )
            except vmodl.MethodFault as exc:
                # the VM is gone either way; a leaked address is an operator's cleanup
                log.warning("vmware: releasing %s's address failed: %s", instance_uuid, exc)

    # -- tasks -----------------------------------------------------------------------------------

    def _wait(self, task: Any, what: str) -> Any:
        """The task's result, or its fault raised. The simulator finishes tasks before answering,
        vCenter later: poll `info` with a growing pause rather than a WaitForUpdates round."""
        deadline = time.monotonic() + self._task_timeout_s
        pause = 0.0
        while True:
            info = task.info
            if info.state == vim.TaskInfo.State.success:
                return info.result
            if info.state == vim.TaskInfo.State.error:
                fault = info.error
                if isinstance(fault, BaseException):
                    raise fault
                raise DriverError(
                    f"vmware: {what} failed", provider_message=str(getattr(fault, "msg", fault))
                )
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"vmware: {what} ({task._moId}) still {info.state} after "
                    f"{self._task_timeout_s:.0f} s",
                    provider_message=f"Task {task._moId} is {info.state}.",
                )
            time.sleep(pause)
            pause = min(max(pause * 2, 0.05), 2.0)

    # -- power, size, deletion -----------------------------------------------------------------

    def _power(self, what: str, external_id: str, action: Callable[[Any], Any]) -> Server:
        def do(session: _Session, attempt: int) -> Server:
            self._server(session, external_id)  # NotFound for unknown ids and templates
            try:
                self._wait(action(vim.VirtualMachine(external_id, session.si._stub)), what)
            except vim.fault.InvalidPowerState:
                # a retry after a lost answer finds the state it asked for: that is success
                if attempt == 1:
                    raise
            return self._server(session, external_id)

        return self._remote(what, do)

    def start(self, external_id: str) -> Server:
        return self._power("power on", external_id, lambda vm: vm.PowerOnVM_Task())

    def stop(self, external_id: str) -> Server:
        return self._power("power off", external_id, lambda vm: vm.PowerOffVM_Task())

    def reboot(self, external_id: str) -> Server:
        # a hard reset: RebootGuest needs running VMware Tools and reports no completion
        def do(session: _Session, _: int) -> Server:
            self._server(session, external_id)
            self._wait(vim.VirtualMachine(external_id, session.si._stub).ResetVM_Task(), "reset")
            return self._server(session, external_id)

        return self._remote("reboot", do)

    def resize(self, external_id: str, *, vcpu: int, memory_mb: int) -> Server:
        if vcpu < 1 or memory_mb < 1:
            raise InvalidSpec(f"vmware: invalid size {vcpu} vCPU / {memory_mb} MB")

        def do(session: _Session, _: int) -> Server:
            server = self._server(session, external_id)
            if server.power_state == PowerState.running:
                p = self._one(
                    session,
                    vim.VirtualMachine,
                    external_id,
                    ("config.cpuHotAddEnabled", "config.memoryHotAddEnabled"),
                )
                refusal = _live_resize_refusal(
                    server,
                    vcpu,
                    memory_mb,
                    p.get("config.cpuHotAddEnabled"),
                    p.get("config.memoryHotAddEnabled"),
                )
                if refusal:
                    raise Conflict(
                        f"vmware: cannot resize {server.name} while it runs: {refusal}",
                        provider_message=refusal,
                    )
            vm = vim.VirtualMachine(external_id, session.si._stub)
            spec = vim.vm.ConfigSpec(numCPUs=vcpu, memoryMB=memory_mb)
            self._wait(vm.ReconfigVM_Task(spec=spec), "reconfigure")
            return self._server(session, external_id)

        return self._remote("resize", do)

    def delete(self, external_id: str) -> None:
        def do(session: _Session, attempt: int) -> None:
            try:
                props = self._one(
                    session,
                    vim.VirtualMachine,
                    external_id,
                    ("config.template", "config.instanceUuid", "runtime.powerState", "network"),
                )
            except vmodl.fault.ManagedObjectNotFound:
                if attempt > 1:
                    return  # the first attempt destroyed it and its answer was lost
                raise
            if props.get("config.template"):
                raise NotFound(
                    f"vmware: {external_id} is a template, not a server",
                    provider_message=f"The object {external_id} is a template.",
                )
            vm = vim.VirtualMachine(external_id, session.si._stub)
            if props.get("runtime.powerState") != "poweredOff":
                with contextlib.suppress(vim.fault.InvalidPowerState):  # off meanwhile
                    self._wait(vm.PowerOffVM_Task(), "power off")
            self._wait(vm.Destroy_Task(), "destroy")
            self._release_addresses(session, props)

        self._remote("delete", do)

    def attach_disk(self, external_id: str, disk: Disk) -> Server:
        if disk.size_gb < 1:
            raise InvalidSpec(f"vmware: invalid disk size {disk.size_gb} GB")

        def do(session: _Session, _: int) -> Server:
            self._server(session, external_id)  # NotFound for unknown ids and templates
            devices = self._devices(session, external_id)
            topo = self._topology(session, refresh=True)
            changes = self._data_disks(session, topo, devices, [disk])
            ds = topo.datastores[_moid(changes[0].device.backing.datastore) or ""]
            # thin disks would be accepted on a full datastore and fail the guest's writes later
            if ds.free_gb < disk.size_gb:
                raise ProviderQuotaExceeded(
                    f"vmware: datastore {ds.name} has {ds.free_gb} GB free, "
                    f"{disk.size_gb} GB asked",
                    provider_message=f"Insufficient disk space on datastore '{ds.name}'.",
                )
            vm = vim.VirtualMachine(external_id, session.si._stub)
            self._wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=changes)), "add disk")
            return self._server(session, external_id)

        return self._remote("attach_disk", do)

    def detach_disk(self, external_id: str, disk_id: str) -> Server:
        def do(session: _Session, attempt: int) -> Server:
            server = self._server(session, external_id)
            devices = self._devices(session, external_id)
            device = next((d for d in devices if _disk_identity(d) == disk_id), None)
            if device is None:
                if attempt > 1:
                    return server  # the first attempt removed it and its answer was lost
                raise NotFound(
                    f"vmware: {server.name} has no disk {disk_id!r}",
                    provider_message=f"The device '{disk_id}' was not found on {external_id}.",
                )
            if server.disks and server.disks[0].external_id == disk_id:
                raise InvalidSpec(
                    f"vmware: {disk_id} is the boot disk of {server.name}",
                    provider_message=f"The device '{disk_id}' is the boot disk.",
                )
            change = vim.vm.device.VirtualDeviceSpec(
                operation="remove", fileOperation="destroy", device=device
            )
            vm = vim.VirtualMachine(external_id, session.si._stub)
            self._wait(
                vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[change])), "remove disk"
            )
            return self._server(session, external_id)

        return self._remote("detach_disk", do)

    def _devices(self, session: _Session, external_id: str) -> list[Any]:
        props = self._one(session, vim.VirtualMachine, external_id, ("config.hardware.device",))
        return list(props.get("config.hardware.device") or ())

    def set_owner(self, external_id: str, owner_tag: str | None) -> Server:
        def do(session: _Session, _: int) -> Server:
            self._server(session, external_id)
            keys = self._field_keys(session, create=True)
            session.content.customFieldsManager.SetField(
                entity=vim.VirtualMachine(external_id, session.si._stub),
                key=keys.owner,
                value=owner_tag or "",  # an empty value is how vCenter clears a custom field
            )
            return self._server(session, external_id)

        return self._remote("set_owner", do)

    def ensure_tenant_scope(self, tenant_code: str) -> str | None:
        if not tenant_code or "/" in tenant_code or "%" in tenant_code:
            raise InvalidSpec(f"vmware: {tenant_code!r} cannot name a folder")

        def do(session: _Session, _: int) -> str:
            path = f"{self._scope_prefix(session)}{tenant_code}"
            if isinstance(session.content.searchIndex.FindByInventoryPath(path), vim.Folder):
                return path
            self._ensure_folder(session, [self._folder_root, tenant_code])
            return path

        return self._remote("ensure_tenant_scope", do)

    # -- incremental sync (ex_) ------------------------------------------------------------------

    def ex_server_changes(
        self, version: str | None = None, *, max_wait_s: int = 0
    ) -> ServerChanges:
        """Servers changed or removed since `version`, via WaitForUpdatesEx on a property filter
        over every VM. Pass None first: that sets up the filter and returns every server
        (`full`); then pass the version returned each time. A version this session does not know
        (a new driver, a new login) also gives a full listing. `max_wait_s` > 0 waits up to
        that long for a first change (kept below `timeout_s`, or the socket would give up first).
        """
        wait = max(0, min(int(max_wait_s), math.ceil(self._timeout_s) - 1))

        def do(session: _Session, _: int) -> ServerChanges:
            if version is None or session.watch is None:
                return self._watch_from_scratch(session)
            try:
                return self._changes(session, session.watch, version, wait)
            except vmodl.query.InvalidCollectorVersion:
                return self._watch_from_scratch(session)

        return self._remote("ex_server_changes", do)

    def _watch_from_scratch(self, session: _Session) -> ServerChanges:
        if session.watch is not None:
            session.watch.collector.DestroyPropertyCollector()
            session.watch = None
        collector = session.content.propertyCollector.CreatePropertyCollector()
        spec = PC.FilterSpec(
            objectSet=[
                PC.ObjectSpec(
                    obj=session.vm_view,
                    skip=True,
                    selectSet=[PC.TraversalSpec(type=vim.view.ContainerView, path="view")],
                )
            ],
            propSet=[
                PC.PropertySpec(type=vim.VirtualMachine, pathSet=list(self._vm_paths(session)))
            ],
        )
        watch = _Watch(
            collector=collector, filter=collector.CreateFilter(spec, partialUpdates=False)
        )
        session.watch = watch
        topo = self._topology(session, refresh=True)
        keys = self._field_keys(session)
        prefix = self._scope_prefix(session)
        servers: list[Server] = []
        version = ""
        while True:
            update = collector.WaitForUpdatesEx(
                version=version, options=PC.WaitOptions(maxWaitSeconds=0)
            )
            if update is None:
                break
            version = update.version
            for fs in update.filterSet or ():
                for ou in fs.objectSet or ():
                    props = {c.name: c.val for c in ou.changeSet or () if c.op != "remove"}
                    if not props.get("config.template"):
                        servers.append(_to_server(ou.obj._moId, props, topo, keys, prefix))
            if not update.truncated:
                break
        return ServerChanges(changed=tuple(servers), removed=(), version=version, full=True)

    def _changes(
        self, session: _Session, watch: _Watch, version: str, max_wait_s: int
    ) -> ServerChanges:
        touched: list[str] = []
        seen: set[str] = set()
        wait = max_wait_s
        while True:
            update = watch.collector.WaitForUpdatesEx(
                version=version, options=PC.WaitOptions(maxWaitSeconds=wait)
            )
            if update is None:
                break
            version = update.version
            # Enter, modify and leave only say which VMs to read again: a VM moved between
            # folders leaves and enters in one batch, in either order, and the simulator
            # reports some changes under a parent property; reading current state settles both.
            for fs in update.filterSet or ():
                for ou in fs.objectSet or ():
                    moid = str(ou.obj._moId)
                    if moid not in seen:
                        seen.add(moid)
                        touched.append(moid)
            if not update.truncated:
                break
            wait = 0
        if not touched:
            return ServerChanges(changed=(), removed=(), version=version)
        found: dict[str, dict[str, Any]] = {
            str(oc.obj._moId): _props(oc)
            for oc in self._objects(session, vim.VirtualMachine, touched, self._vm_paths(session))
        }
        changed = [
            self._convert(session, moid, found[moid])
            for moid in touched
            if moid in found and not found[moid].get("config.template")
        ]
        removed = [m for m in touched if m not in found or found[m].get("config.template")]
        return ServerChanges(changed=tuple(changed), removed=tuple(removed), version=version)


# --- helpers that need no session --------------------------------------------------------------


def _nic_network(nic: Any) -> str | None:
    backing = nic.backing
    if isinstance(backing, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo):
        return str(backing.port.portgroupKey) if backing.port else None
    return _moid(getattr(backing, "network", None))


def _pool_cidr(pool: Any) -> str | None:
    cfg = pool.ipv4Config
    if cfg is None or not cfg.subnetAddress or not cfg.netmask:
        return None
    try:
        return str(ipaddress.ip_network(f"{cfg.subnetAddress}/{cfg.netmask}", strict=False))
    except ValueError:
        return None


def _live_resize_refusal(
    server: Server, vcpu: int, memory_mb: int, cpu_hot_add: Any, memory_hot_add: Any
) -> str | None:
    """Why vCenter would refuse this change on a running VM, or None."""
    if vcpu < server.vcpu or memory_mb < server.memory_mb:
        return "CPU and memory cannot be removed from a powered-on virtual machine"
    if vcpu != server.vcpu and not cpu_hot_add:
        return "CPU hot add is not enabled for this virtual machine"
    if memory_mb != server.memory_mb and not memory_hot_add:
        return "memory hot add is not enabled for this virtual machine"
    return None
