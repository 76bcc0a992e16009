"""The vCenter simulator peer: govmomi's vcsim, served by peers/vcsim/ (built on first use).

Starting one::

    with VcsimPeer(tmp_dir, model=VcsimModel(vms=3), username="admin", password="s3cret") as peer:
        driver = peer.driver(retry_max_wait=0)      # a VMwareDriver (not yet connected)
        peer.endpoint, peer.credentials             # "http://127.0.0.1:PORT/sdk", {...}
        peer.templates                              # {"centos-7-template": "vm-80"}
        peer.ip_pools                               # [(2, "dvportgroup-13", "10.100.0.0/24"), ...]
        peer.vm_count                               # VMs at start, templates excluded
        peer.pause(); peer.resume()                 # SIGSTOP / SIGCONT: a hung vCenter

``peer.driver(**options)`` defaults to ``verify_tls=False``, ``timeout_s=10`` and the tiers in
``DATASTORE_TIERS`` (LocalDS_0 "ssd", LocalDS_1 "hdd"); ``credentials=`` overrides the login.

The VM count is ``vms`` × (clusters + standalone hosts) × datacenters, plus the templates; e.g.
``VcsimModel(clusters=5, hosts_per_cluster=2, standalone_hosts=0, vms=1000)`` has 5,000 VMs and
starts in about 15 s. A pass over VMs with ``config.hardware.device`` costs pyVmomi about 4 ms of
CPU per VM to deserialize, so compare CPU time (``time.process_time``) on a busy machine. The
process runs with ``TMPDIR`` inside the given directory (its datastores live there) and is
stopped by its PID with SIGTERM, then waited for. A peer that does not start raises.

Fixtures: ``vcsim`` (one small simulator per xdist worker, for the whole session),
``contract_vmware`` (a fresh VMwareDriver connected to it, closed afterwards) and ``vcsim_oob``
(an OutOfBand client on it).

Out-of-band changes, made with pyvmomi directly as an administrator would in the vSphere client,
behind govbroker's back (``peer.out_of_band()`` or the ``vcsim_oob`` fixture; ids are MoRef
values such as "vm-42")::

    oob.create_vm(name, vcpu=1, memory_mb=512, folder=None, power_on=True) -> str
    oob.reconfigure(vm_id, vcpu=None, memory_mb=None)
    oob.power_off(vm_id); oob.power_on(vm_id)
    oob.set_custom_field(vm_id, field_name, value)     # creates the field definition if needed
    oob.move_to_folder(vm_id, "govbroker/agency-x")    # a path under the vmFolder, created
    oob.destroy(vm_id)                                 # powers off first when needed
    oob.vm_ids() -> set[str]                           # every VM, templates excluded
    oob.retrieve_vms(paths, page_size) -> int          # one raw paged PropertyCollector pass
    oob.close()

vcsim differs from vCenter in ways these helpers do not hide: it reports no WaitForUpdatesEx
change for a custom field set with SetField (a full listing sees it), and it keeps every value
a field was ever set to (the last one is current).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "peers" / "vcsim" / "build.sh"
BINARY = ROOT / ".peers" / "bin" / "govbroker-vcsim"
TEMPLATE = "centos-7-template"
# the contract runs against two tiers; the simulator's datastores are named LocalDS_<n>
DATASTORE_TIERS = {"LocalDS_0": "ssd", "LocalDS_1": "hdd"}


class PeerError(RuntimeError):
    """The simulator could not be built or started."""


@dataclass(frozen=True)
class VcsimModel:
    datacenters: int = 1
    clusters: int = 1
    hosts_per_cluster: int = 3
    standalone_hosts: int = 1
    vms: int = 2  # per cluster and per standalone host
    datastores: int = 2
    portgroups: int = 1
    templates: tuple[str, ...] = (TEMPLATE,)
    template_disk_gb: int = 10

    def args(self) -> list[str]:
        return [
            f"-dc={self.datacenters}",
            f"-cluster={self.clusters}",
            f"-host={self.hosts_per_cluster}",
            f"-standalone-host={self.standalone_hosts}",
            f"-vm={self.vms}",
            f"-ds={self.datastores}",
            f"-pg={self.portgroups}",
            f"-template={','.join(self.templates)}",
            f"-template-disk-gb={self.template_disk_gb}",
        ]

    @property
    def vm_count(self) -> int:
        """VMs the model starts with, templates excluded."""
        return self.vms * (self.clusters + self.standalone_hosts) * self.datacenters


def build() -> Path:
    """Build the simulator binary if main.go changed (build.sh decides and locks)."""
    result = subprocess.run(
        [str(BUILD)], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    if result.returncode != 0 or not BINARY.exists():
        raise PeerError(f"building the vcsim peer failed:\n{result.stdout}{result.stderr}")
    return BINARY


class VcsimPeer:
    """One simulator process. Use as a context manager, or start() and stop()."""

    def __init__(
        self,
        workdir: Path,
        *,
        model: VcsimModel | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        start_timeout_s: float = 120.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.model = model or VcsimModel()
        self.username = username
        self.password = password
        self.tls = tls
        self.start_timeout_s = start_timeout_s
        self.url = ""
        self.templates: dict[str, str] = {}
        self.ip_pools: list[tuple[int, str, str]] = []  # (pool id, network id, cidr)
        self.vm_count = 0
        self._process: subprocess.Popen[str] | None = None
        self._stopped_by_us = False

    # -- life cycle --

    def start(self) -> VcsimPeer:
        binary = build()
        tmp = self.workdir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        args = [str(binary), "-listen=127.0.0.1:0", *self.model.args()]
        if self.username is not None:
            args += [f"-username={self.username}", f"-password={self.password or ''}"]
        if self.tls:
            args.append("-tls")
        stderr_path = self.workdir / "vcsim.stderr"
        with stderr_path.open("w") as stderr:
            self._process = subprocess.Popen(
                args,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env={**os.environ, "TMPDIR": str(tmp)},
                cwd=self.workdir,
            )
        try:
            self._read_banner()
        except BaseException:
            self.stop()
            raise
        return self

    def _read_banner(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        lines: list[str] = []
        done = threading.Event()

        def read() -> None:
            assert self._process is not None and self._process.stdout is not None
            for line in self._process.stdout:
                lines.append(line.rstrip("\n"))
                if line.startswith("ready"):
                    break
            done.set()

        # a thread, so a silent process cannot block the test run past the deadline
        threading.Thread(target=read, daemon=True).start()
        if not done.wait(self.start_timeout_s) or not lines or not lines[-1].startswith("ready"):
            stderr = (self.workdir / "vcsim.stderr").read_text(errors="replace")
            raise PeerError(
                f"vcsim did not become ready in {self.start_timeout_s:.0f} s "
                f"(exit code {self._process.poll()}):\n" + "\n".join(lines) + "\n" + stderr
            )
        for line in lines:
            key, _, value = line.partition("=")
            if key == "url":
                self.url = value
            elif key == "template":
                name, moid = value.split(" ")
                self.templates[name] = moid
            elif key == "ippool":
                pool_id, network, cidr = value.split(" ")
                self.ip_pools.append((int(pool_id), network, cidr))
            elif line.startswith("ready"):
                self.vm_count = int(line.split("vms=")[1]) - len(self.templates)
        if not self.url:
            raise PeerError("vcsim printed no URL:\n" + "\n".join(lines))

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        pid = process.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # a paused peer would never see SIGTERM
            os.kill(pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            process.wait(timeout=15)
        if process.stdout is not None:
            process.stdout.close()

    def __enter__(self) -> VcsimPeer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        if self._process is None:
            raise PeerError("vcsim is not running")
        return self._process.pid

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections are accepted by the kernel, never answered."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    # -- how to reach it --

    @property
    def endpoint(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port}{parts.path}"

    @property
    def credentials(self) -> dict[str, str]:
        parts = urlsplit(self.url)
        return {"username": parts.username or "", "password": parts.password or ""}

    @property
    def template(self) -> str:
        """The MoRef id of the first template."""
        return next(iter(self.templates.values()))

    def driver(self, **options: Any) -> Any:
        """A VMwareDriver for this peer; options default to the contract's."""
        from drivers.vmware import VMwareDriver

        merged: dict[str, Any] = {
            "verify_tls": False,
            "timeout_s": 10,
            "datastore_tiers": DATASTORE_TIERS,
            **options,
        }
        credentials = merged.pop("credentials", None) or self.credentials
        return VMwareDriver(self.endpoint, credentials, merged)

    def out_of_band(self) -> OutOfBand:
        return OutOfBand(self)


class OutOfBand:
    """A separate pyvmomi session that changes the inventory behind govbroker's back."""

    def __init__(self, peer: VcsimPeer) -> None:
        from pyVim.connect import SmartConnect

        parts = urlsplit(peer.url)
        self._si = SmartConnect(
            protocol=parts.scheme,
            host=parts.hostname,
            port=parts.port,
            user=parts.username,
            pwd=parts.password,
            disableSslCertValidation=True,
            httpConnectionTimeout=30,
        )
        self._content = self._si.RetrieveContent()
        self._dc = sorted(self._content.rootFolder.childEntity, key=lambda d: d.name)[0]

    def close(self) -> None:
        from pyVim.connect import Disconnect

        with contextlib.suppress(Exception):
            Disconnect(self._si)

    def __enter__(self) -> OutOfBand:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _vm(self, vm_id: str) -> Any:
        from pyVmomi import vim

        return vim.VirtualMachine(vm_id, self._si._stub)

    @staticmethod
    def _wait(task: Any) -> Any:
        deadline = time.monotonic() + 60
        while task.info.state in ("queued", "running"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {task} did not finish")
            time.sleep(0.01)
        if task.info.state == "error":
            raise task.info.error
        return task.info.result

    def create_vm(
        self,
        name: str,
        *,
        vcpu: int = 1,
        memory_mb: int = 512,
        folder: str | None = None,
        power_on: bool = True,
    ) -> str:
        """A new VM (one 1 GB disk, no NIC) in the first compute resource; its MoRef id."""
        from pyVmomi import vim

        compute = next(
            c for c in self._dc.hostFolder.childEntity if isinstance(c, vim.ComputeResource)
        )
        datastore = sorted(self._dc.datastore, key=lambda d: d.name)[0]
        scsi = vim.vm.device.ParaVirtualSCSIController(key=-1, busNumber=0, sharedBus="noSharing")
        disk = vim.vm.device.VirtualDisk(
            key=-2,
            controllerKey=-1,
            unitNumber=0,
            capacityInKB=1024 * 1024,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=f"[{datastore.name}]", diskMode="persistent", thinProvisioned=True
            ),
        )
        config = vim.vm.ConfigSpec(
            name=name,
            numCPUs=vcpu,
            memoryMB=memory_mb,
            guestId="otherGuest",
            files=vim.vm.FileInfo(vmPathName=f"[{datastore.name}]"),
            deviceChange=[
                vim.vm.device.VirtualDeviceSpec(operation="add", device=scsi),
                vim.vm.device.VirtualDeviceSpec(
                    operation="add", fileOperation="create", device=disk
                ),
            ],
        )
        target = self._folder(folder) if folder else self._dc.vmFolder
        vm = self._wait(target.CreateVM_Task(config=config, pool=compute.resourcePool))
        if power_on:
            self._wait(vm.PowerOnVM_Task())
        return str(vm._moId)

    def reconfigure(
        self, vm_id: str, *, vcpu: int | None = None, memory_mb: int | None = None
    ) -> None:
        from pyVmomi import vim

        spec = vim.vm.ConfigSpec()
        if vcpu is not None:
            spec.numCPUs = vcpu
        if memory_mb is not None:
            spec.memoryMB = memory_mb
        self._wait(self._vm(vm_id).ReconfigVM_Task(spec=spec))

    def power_off(self, vm_id: str) -> None:
        self._wait(self._vm(vm_id).PowerOffVM_Task())

    def power_on(self, vm_id: str) -> None:
        self._wait(self._vm(vm_id).PowerOnVM_Task())

    def destroy(self, vm_id: str) -> None:
        vm = self._vm(vm_id)
        if vm.runtime.powerState != "poweredOff":
            self._wait(vm.PowerOffVM_Task())
        self._wait(vm.Destroy_Task())

    def set_custom_field(self, vm_id: str, field_name: str, value: str) -> None:
        from pyVmomi import vim

        manager = self._content.customFieldsManager
        key = next((f.key for f in manager.field or () if f.name == field_name), None)
        if key is None:
            key = manager.AddFieldDefinition(name=field_name, moType=vim.VirtualMachine).key
        manager.SetField(entity=self._vm(vm_id), key=key, value=value)

    def move_to_folder(self, vm_id: str, folder: str) -> None:
        self._wait(self._folder(folder).MoveIntoFolder_Task(list=[self._vm(vm_id)]))

    def _folder(self, path: str) -> Any:
        """The folder at `path` under the datacenter's vmFolder, created as needed."""
        folder = self._dc.vmFolder
        index = self._content.searchIndex
        for name in [p for p in path.split("/") if p]:
            child = index.FindChild(entity=folder, name=name)
            folder = child if child is not None else folder.CreateFolder(name=name)
        return folder

    def vm_ids(self) -> set[str]:
        return {
            str(oc.obj._moId)
            for oc in self._vm_pass(["config.template"], 1000)
            if not any(p.name == "config.template" and p.val for p in oc.propSet)
        }

    def retrieve_vms(self, paths: Sequence[str], page_size: int = 500) -> int:
        """One raw RetrievePropertiesEx/ContinueRetrievePropertiesEx pass over every VM (the
        baseline a full sync is measured against); the number of objects received."""
        return sum(1 for _ in self._vm_pass(paths, page_size))

    def _vm_pass(self, paths: Sequence[str], page_size: int) -> Iterator[Any]:
        from pyVmomi import vim, vmodl

        pc = vmodl.query.PropertyCollector
        view = self._content.viewManager.CreateContainerView(self._dc, [vim.VirtualMachine], True)
        try:
            spec = pc.FilterSpec(
                objectSet=[
                    pc.ObjectSpec(
                        obj=view,
                        skip=True,
                        selectSet=[pc.TraversalSpec(type=vim.view.ContainerView, path="view")],
                    )
                ],
                propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=list(paths))],
            )
            collector = self._content.propertyCollector
            result = collector.RetrievePropertiesEx(
                specSet=[spec], options=pc.RetrieveOptions(maxObjects=page_size)
            )
            while result is not None:
                yield from result.objects or ()
                if not result.token:
                    break
                result = collector.ContinueRetrievePropertiesEx(token=result.token)
        finally:
            view.DestroyView()


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VcsimPeer]:
    """One small simulator per xdist worker: 4 hosts, 2 datastores, 4 VMs and a template."""
    with VcsimPeer(tmp_path_factory.mktemp("vcsim")) as peer:
        yield peer


@pytest.fixture
def contract_vmware(vcsim: VcsimPeer) -> Iterator[Any]:
    driver = vcsim.driver(retry_max_wait=0)
    driver.check()
    try:
        yield driver
    finally:
        driver.close()


@pytest.fixture
def vcsim_oob(vcsim: VcsimPeer) -> Iterator[OutOfBand]:
    with vcsim.out_of_band() as oob:
        yield oob
