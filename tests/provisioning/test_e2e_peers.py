"""Create → resize up and down → stop/start → delete through the broker on real peers: libvirt's
test driver and the vCenter simulator. After every step the quota ledger, the inventory row, the
provider's own view of the server and the next sync agree; the lifecycle events come out in order.

The provider is registered, synced and its catalog imported as the center does it; the image or
template, the network and the storage tiers are whatever that import found on the peer.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from broker.core.authz import Principal
from broker.inventory import providers, sync
from broker.inventory.models import Provider, Server
from broker.inventory.schemas import ProviderCreate
from broker.provisioning.models import CatalogItem, CatalogKind, Job
from drivers.base import Driver, NotFound, PowerState
from tests.fixtures.auth import Estate
from tests.fixtures.db import TestDatabase
from tests.fixtures.inventory import ADMIN, servers_of, used
from tests.fixtures.provisioning import Broker, give_room, offer
from tests.peers.libvirt import DATA
from tests.peers.vcsim import DATASTORE_TIERS, TEMPLATE, VcsimModel, VcsimPeer

PrincipalOf = Callable[[str], Principal]


@dataclass(frozen=True)
class Size:
    vcpu: int
    memory_mb: int


@dataclass
class Run:
    """One provider on a peer, driven through the broker, and the provider's own view of it."""

    broker: Broker
    provider_id: uuid.UUID
    view: Driver  # asks the peer directly, behind the broker's back
    member: Principal
    image: str
    root: dict[str, int]  # {quota class: GB} of the root disk the peer gives a server

    @property
    def db(self) -> TestDatabase:
        return self.broker.db

    @property
    def estate(self) -> Estate:
        return self.broker.estate

    def row(self, server_id: uuid.UUID) -> Server:
        return self.broker.server(server_id)

    def events(self, server_id: uuid.UUID) -> list[str]:
        return self.broker.events(server_id)

    def held(self, code: str) -> dict[str, int]:
        """What tenant `code`'s quota rows hold of every class a server of this peer holds."""
        classes = ("vcpu", "memory_mb", "instances", "storage_gb.ssd", "storage_gb.hdd")
        return {rc: used(self.db, self.estate, code, rc) for rc in classes}

    def sync(self) -> None:
        outcome = sync.sync_provider(
            self.db, self.provider_id, driver_factory=self.broker.driver_factory
        )
        assert outcome.status == "ok", outcome.error

    def create(self, size: Size) -> tuple[uuid.UUID, Job]:
        job = self.broker.request(
            self.member,
            name=f"e2e-{uuid.uuid4().hex[:6]}",
            image=self.image,
            flavor=None,
            vcpu=size.vcpu,
            memory_mb=size.memory_mb,
        )
        assert job.state == "succeeded", f"create: {job.error_type}: {job.error}"
        assert job.server_id is not None
        return job.server_id, job

    def step(self, server_id: uuid.UUID, action: str, **params: Any) -> Job:
        job = self.broker.act(self.member, server_id, action, **params)
        assert job.state == "succeeded", f"{action}: {job.error_type}: {job.error}"
        return job

    def resize(self, server_id: uuid.UUID, to: Size, *, power: str) -> None:
        before = self.row(server_id)
        job = self.step(server_id, "resize", vcpu=to.vcpu, memory_mb=to.memory_mb)
        delta = {"vcpu": to.vcpu - before.vcpu, "memory_mb": to.memory_mb - before.memory_mb}
        assert job.grow == {k: v for k, v in delta.items() if v > 0}
        assert job.shrink == {k: -v for k, v in delta.items() if v < 0}
        self.check(server_id, to, power=power)

    def check(self, server_id: uuid.UUID, size: Size, *, power: str) -> Server:
        """The inventory row, the ledger, the provider and the next sync all say the server is
        this size and in this power state."""
        booked = {"instances": 1, "vcpu": size.vcpu, "memory_mb": size.memory_mb, **self.root}
        nothing = dict.fromkeys(self.held("a1"), 0)
        row = self.row(server_id)
        assert (row.vcpu, row.memory_mb, row.power_state) == (size.vcpu, size.memory_mb, power)
        assert row.gone_at is None and row.tenant_id == self.estate.tid("a1")
        assert row.booked == booked
        # the system's and the agency's quota rows hold this one server and nothing else
        assert self.held("a1") == self.held("a") == {**nothing, **booked}
        at_provider = self.view.get_server(row.external_id)
        assert (at_provider.vcpu, at_provider.memory_mb) == (size.vcpu, size.memory_mb)
        assert at_provider.power_state == PowerState(power)
        assert (at_provider.owner_tag, at_provider.request_tag) == ("a/a1", row.request_tag)
        # what the broker did is no drift to the next sync, and nothing is booked again
        self.sync()
        synced = self.row(server_id)
        assert synced.drift is None, synced.drift
        assert (synced.vcpu, synced.memory_mb, synced.power_state) == (
            size.vcpu,
            size.memory_mb,
            power,
        )
        assert synced.booked == booked and self.held("a1") == {**nothing, **booked}
        return synced

    def delete(self, server_id: uuid.UUID) -> None:
        external_id = self.row(server_id).external_id
        self.step(server_id, "delete")
        gone = self.row(server_id)
        assert gone.gone_at is not None and gone.booked == {}
        assert set(self.held("a1").values()) == set(self.held("a").values()) == {0}
        with pytest.raises(NotFound):
            self.view.get_server(external_id)
        assert external_id not in {s.external_id for s in self.view.list_servers()}
        self.sync()
        assert servers_of(self.db, self.provider_id)[external_id].gone_at is not None
        assert set(self.held("a1").values()) == {0}


def _register(db: TestDatabase, kind: str, endpoint: str, **fields: Any) -> uuid.UUID:
    with db.unit_of_work() as s:
        return providers.create_provider(
            s,
            ADMIN,
            ProviderCreate(
                kind=kind,  # type: ignore[arg-type]
                name=f"{kind}-{uuid.uuid4().hex[:8]}",
                endpoint=endpoint,
                **fields,
            ),
        ).id


def _provider(db: TestDatabase, provider_id: uuid.UUID) -> Provider:
    with db.unit_of_work(write=False) as s:
        p = s.get(Provider, provider_id)
        assert p is not None
        s.expunge(p)
        return p


def _catalog(db: TestDatabase, provider_id: uuid.UUID, kind: str) -> dict[str, CatalogItem]:
    with db.unit_of_work(write=False) as s:
        items = s.execute(
            select(CatalogItem).where(
                CatalogItem.provider_id == provider_id, CatalogItem.kind == kind
            )
        ).scalars()
        return {i.code: i for i in items}


def _reserves_what_it_holds(run: Run, size: Size) -> None:
    """The request's reservation is what the server turns out to hold: nothing is trued up (and
    forced past a limit) after the provider made it."""
    sid, job = run.create(size)
    row = run.row(sid)
    held = {"instances": 1, "vcpu": size.vcpu, "memory_mb": size.memory_mb, **run.root}
    assert row.booked == held
    assert job.grow == row.booked, job.log
    assert not [e for e in job.log if "booked_delta" in e], job.log
    run.delete(sid)


# --- libvirt's test driver -----------------------------------------------------------------------

# the image both host files carry (kylin-v10-sp3 is on host a only), 8 GB; the driver puts root
# disks in the host's ssd pool when it has one (both hosts do)
LIBVIRT_IMAGE = "uos-server-20"
LIBVIRT_ROOT = {"storage_gb.ssd": 8}


@pytest.fixture
def libvirt_run(db: TestDatabase, quota_estate: Estate, principal_of: PrincipalOf) -> Iterator[Run]:
    pytest.importorskip("libvirt")
    endpoint = ", ".join(f"test://{p.resolve()}" for p in sorted(DATA.glob("libvirt-host-*.xml")))
    pid = _register(db, "libvirt", endpoint, credentials={}, options={"retry_max_wait": 0})
    offer(db, pid)
    give_room(db, quota_estate, "a", "b")
    assert LIBVIRT_IMAGE in _catalog(db, pid, CatalogKind.image)
    # Every test-driver connection gets its own private copy of the host files, so the jobs, the
    # syncs and the provider's view all go through one driver, kept open across jobs (the
    # executor closes its driver after each one) and closed at the end.
    shared = providers.driver_for(_provider(db, pid))
    really_close = shared.close
    shared.close = lambda: None  # type: ignore[method-assign]

    def factory(provider: Provider) -> Driver:
        assert provider.id == pid
        return shared

    try:
        yield Run(
            Broker(db, quota_estate, None, factory),  # type: ignore[arg-type]
            pid,
            shared,
            principal_of("a-member"),
            LIBVIRT_IMAGE,
            LIBVIRT_ROOT,
        )
    finally:
        really_close()


@pytest.mark.libvirt
def test_libvirt_create_resize_power_cycle_delete_keeps_quota_inventory_and_host_in_step(
    libvirt_run: Run,
) -> None:
    run = libvirt_run
    small, large, tiny = Size(2, 4096), Size(4, 8192), Size(1, 2048)
    sid, job = run.create(small)
    row = run.check(sid, small, power="running")
    assert row.request_tag == job.request_tag
    assert row.disks[0]["tier"] == "ssd" and row.host in ("libvirt-host-a", "libvirt-host-b")

    # a domain is defined with twice its size as its maximum: both resizes apply while it runs
    run.resize(sid, large, power="running")
    run.resize(sid, tiny, power="running")

    run.step(sid, "stop")
    run.check(sid, tiny, power="stopped")
    run.step(sid, "start")
    run.check(sid, tiny, power="running")

    run.delete(sid)
    assert run.events(sid) == ["created", "resized", "resized", "stopped", "started", "deleted"]


@pytest.mark.libvirt
def test_libvirt_create_reserves_the_root_disk_on_the_tier_it_lands_on(libvirt_run: Run) -> None:
    _reserves_what_it_holds(libvirt_run, Size(1, 2048))


@pytest.mark.libvirt
def test_libvirt_places_a_server_on_the_host_that_has_its_image(libvirt_run: Run) -> None:
    # windows-server-2019 is on host b only; best fit prefers host a, which cannot boot it
    run = libvirt_run
    run.image = "windows-server-2019"
    job = run.broker.request(
        run.member, name="win-e2e", image=run.image, flavor=None, vcpu=2, memory_mb=4096
    )
    assert job.state == "succeeded", f"{job.error_type}: {job.error} / {job.placement}"
    assert job.server_id is not None
    assert run.row(job.server_id).host == "libvirt-host-b"
    run.root = {"storage_gb.ssd": 40}
    run.delete(job.server_id)


# --- the vCenter simulator -----------------------------------------------------------------------

# clones keep the template's disk: 10 GB (VcsimModel.template_disk_gb) on LocalDS_0, an "ssd"
VCSIM_ROOT = {"storage_gb.ssd": VcsimModel().template_disk_gb}


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VcsimPeer]:
    """A simulator of this module's own: nothing else creates or owns VMs on it."""
    model = VcsimModel(clusters=1, hosts_per_cluster=2, standalone_hosts=0, vms=1)
    with VcsimPeer(Path(tmp_path_factory.mktemp("vcsim-e2e")), model=model) as p:
        yield p


@pytest.fixture
def vcsim_run(
    db: TestDatabase, quota_estate: Estate, principal_of: PrincipalOf, peer: VcsimPeer
) -> Iterator[Run]:
    options = {
        "verify_tls": False,
        "timeout_s": 10,
        "retry_max_wait": 0,
        "datastore_tiers": DATASTORE_TIERS,
    }
    pid = _register(db, "vmware", peer.endpoint, credentials=peer.credentials, options=options)
    offer(db, pid)
    give_room(db, quota_estate, "a", "b")
    images = _catalog(db, pid, CatalogKind.image)
    assert images[TEMPLATE].external_id == peer.templates[TEMPLATE]
    view = peer.driver(retry_max_wait=0)
    try:
        # vCenter keeps the state: the broker opens a driver of its own per job, as in production
        yield Run(
            Broker(db, quota_estate, None),  # type: ignore[arg-type]
            pid,
            view,
            principal_of("a-member"),
            TEMPLATE,
            VCSIM_ROOT,
        )
    finally:
        view.close()


@pytest.mark.vcsim
def test_vcsim_create_resize_power_cycle_delete_keeps_quota_inventory_and_vcenter_in_step(
    vcsim_run: Run,
) -> None:
    run = vcsim_run
    small, large, tiny = Size(1, 1024), Size(2, 2048), Size(1, 512)  # vcsim hosts have 4 GB
    sid, job = run.create(small)
    row = run.check(sid, small, power="running")
    assert row.request_tag == job.request_tag
    assert row.disks[0]["tier"] == "ssd"

    # vCenter changes a running VM's CPU and memory only with hot add enabled (clones of the
    # template have none) and never shrinks one; the driver has no resize_live. So the resize of
    # the running VM is refused, with nothing held or changed, and the VM is resized while off.
    refused = run.broker.act(run.member, sid, "resize", vcpu=large.vcpu, memory_mb=large.memory_mb)
    assert (refused.state, refused.error_type) == ("failed", "Conflict")
    assert "hot add" in (refused.error or "")
    run.check(sid, small, power="running")

    run.step(sid, "stop")
    run.check(sid, small, power="stopped")
    run.resize(sid, large, power="stopped")
    run.resize(sid, tiny, power="stopped")
    run.step(sid, "start")
    run.check(sid, tiny, power="running")

    run.delete(sid)
    assert run.events(sid) == ["created", "stopped", "resized", "resized", "started", "deleted"]


@pytest.mark.vcsim
def test_vcsim_create_reserves_the_root_disk_on_the_tier_it_lands_on(vcsim_run: Run) -> None:
    _reserves_what_it_holds(vcsim_run, Size(1, 1024))
