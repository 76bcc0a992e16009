"""Sync meters what changes outside govbroker: servers nobody owns are `discovered`, changes of
power or size made at the provider are `changed`, vanished servers are `gone` (once), and servers
that come back are metered again; adoption binds the agency's contract. On SQLite and PostgreSQL,
against the simulator, with changes made "out of band" through a second handle on its state.
"""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func
from sqlmodel import select

from billing import contracts
from billing.models import Contract, LifecycleEvent, ServiceCompany
from billing.schemas import ContractCreate, ContractUpdate
from broker.core import clock
from broker.inventory import sync
from broker.inventory.models import Provider
from broker.provisioning import executor, service
from broker.provisioning.schemas import ServerCreate
from drivers.base import Disk, Driver, ServerSpec
from drivers.base import Server as Listed
from tests.fixtures.auth import Estate
from tests.fixtures.db import TestDatabase
from tests.fixtures.inventory import ADMIN, MakeCloud, SimCloud, room_for_servers
from tests.fixtures.inventory import servers_of as rows
from tests.fixtures.provisioning import Broker


@pytest.fixture
def quota_estate(db: TestDatabase, quota_estate: Estate) -> Estate:
    # the simulator's root disks are SSD, and a server counts against every class it holds
    return room_for_servers(db, quota_estate, "a", "b")


def ok(db: TestDatabase, provider_id: uuid.UUID, **kw: Any) -> sync.Outcome:
    outcome = sync.sync_provider(db, provider_id, **kw)
    assert outcome.status == "ok", outcome.error
    return outcome


def lifecycle(db: TestDatabase, server_id: uuid.UUID) -> list[LifecycleEvent]:
    """The server's lifecycle events, oldest first."""
    with db.unit_of_work(write=False) as s:
        found = list(
            s.execute(select(LifecycleEvent).where(LifecycleEvent.server_id == server_id)).scalars()
        )
        for e in found:
            s.expunge(e)
    return sorted(found, key=lambda e: e.at)


def event_count(db: TestDatabase) -> int:
    with db.unit_of_work(write=False) as s:
        return int(s.execute(select(func.count()).select_from(LifecycleEvent)).scalar_one())


def row_id(db: TestDatabase, cloud: SimCloud, external_id: str) -> uuid.UUID:
    return rows(db, cloud.provider_id)[external_id].id


def held_at_provider(server: Listed, **extra: int) -> dict[str, int]:
    """What the simulator shows a server holding, in resource classes, as sync meters it."""
    out: Counter[str] = Counter({"vcpu": server.vcpu, "memory_mb": server.memory_mb})
    out["instances"] = 1
    for d in server.disks:
        out[f"storage_gb.{d.tier}"] += d.size_gb
    if server.public_ips:
        out["public_ip"] = len(server.public_ips)
    return {**dict(out), **extra}


class EmptyListing:
    """The provider as it answers while its servers are out of sight (a host unreachable)."""

    def __init__(self, driver: Driver) -> None:
        self._driver = driver

    def list_servers(self) -> list[Listed]:
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._driver, name)


def blind(cloud: SimCloud) -> Any:
    return lambda _provider: EmptyListing(cloud.driver)


def company(db: TestDatabase) -> uuid.UUID:
    with db.unit_of_work() as s:
        row = ServiceCompany(code=f"sc-{uuid.uuid4().hex[:6]}", name_zh="华云数据服务有限公司")
        s.add(row)
        s.flush()
        return row.id


def sign(
    db: TestDatabase, estate: Estate, company_id: uuid.UUID, *, status: str = "active"
) -> Contract:
    """Agency a's contract with `company_id`, running since a month ago for a year."""
    today = contracts.local_day(clock.now())
    with db.unit_of_work() as s:
        contract = contracts.create_contract(
            s,
            ADMIN,
            ContractCreate(
                number=f"HT-{uuid.uuid4().hex[:10]}",
                title="政务云服务合同",
                agency_id=estate.tid("a"),
                service_company_id=company_id,
                signed_on=today - timedelta(days=30),
                starts_on=today - timedelta(days=30),
                ends_on=today + timedelta(days=335),
                budget_amount=1_000_000_00,
            ),
        )
        if status != "active":
            contracts.update_contract(s, ADMIN, contract.id, ContractUpdate(status=status))
        s.expunge(contract)
        return contract


# --- servers nobody owns ------------------------------------------------------------------------


def test_an_unmanaged_server_is_discovered_changed_and_gone_with_what_it_holds(
    db: TestDatabase, sim_cloud: MakeCloud
) -> None:
    sc = company(db)
    cloud = sim_cloud(service_company_id=sc)
    srv = cloud.spawn(vcpu=2, memory_mb=2048, disks=(Disk(30, "hdd"),), public_ip=True)
    ok(db, cloud.provider_id)
    sid = row_id(db, cloud, srv.external_id)

    [found] = lifecycle(db, sid)
    assert (found.kind, found.power_state) == ("discovered", "running")
    assert found.sizes == held_at_provider(srv)
    assert found.sizes["storage_gb.hdd"] == 30 and found.sizes["public_ip"] == 1
    assert (found.tenant_id, found.agency_id, found.contract_id) == (None, None, None)
    assert found.service_company_id == sc and found.provider_id == cloud.provider_id

    cloud.driver.stop(srv.external_id)
    cloud.driver.resize(srv.external_id, vcpu=4, memory_mb=4096)
    ok(db, cloud.provider_id)
    changed = lifecycle(db, sid)[1:]
    assert [(e.kind, e.power_state) for e in changed] == [("changed", "stopped")]
    after = cloud.driver.get_server(srv.external_id)
    assert changed[0].sizes == held_at_provider(after) and changed[0].sizes["vcpu"] == 4
    assert changed[0].tenant_id is None and changed[0].contract_id is None

    cloud.driver.release_public_ip(srv.external_id, after.public_ips[0])
    ok(db, cloud.provider_id)
    released = lifecycle(db, sid)[-1]
    assert released.kind == "changed" and "public_ip" not in released.sizes

    cloud.driver.delete(srv.external_id)
    ok(db, cloud.provider_id)
    ok(db, cloud.provider_id)
    kinds = [e.kind for e in lifecycle(db, sid)]
    assert kinds == ["discovered", "changed", "changed", "gone"]
    assert lifecycle(db, sid)[-1].sizes == {}


def test_a_server_back_after_being_gone_is_discovered_again(
    db: TestDatabase, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud()
    srv = cloud.spawn(vcpu=2)
    ok(db, cloud.provider_id)
    sid = row_id(db, cloud, srv.external_id)

    ok(db, cloud.provider_id, driver_factory=blind(cloud))
    ok(db, cloud.provider_id)

    got = lifecycle(db, sid)
    assert [e.kind for e in got] == ["discovered", "gone", "discovered"]
    assert got[-1].sizes == held_at_provider(srv) and got[-1].tenant_id is None


def test_an_unchanged_second_sync_emits_nothing(
    db: TestDatabase, quota_estate: Estate, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud(service_company_id=company(db))
    cloud.spawn(owner="a1")  # adopted
    cloud.spawn(public_ip=True)
    stopped = cloud.spawn()
    cloud.driver.stop(stopped.external_id)
    ok(db, cloud.provider_id)
    before = event_count(db)
    assert before == 4  # three discovered, one adopted

    outcome = ok(db, cloud.provider_id)

    assert event_count(db) == before
    assert outcome.counts.get("lifecycle_events", 0) == 0


def test_servers_listed_before_metering_existed_are_discovered_once(
    db: TestDatabase, sim_cloud: MakeCloud
) -> None:
    """A row that billing never heard of (inventoried before lifecycle events were written for
    servers nobody owns) is recorded by the next sync, and only by that one."""
    cloud = sim_cloud()
    srv = cloud.spawn()
    ok(db, cloud.provider_id)
    sid = row_id(db, cloud, srv.external_id)
    with db.unit_of_work() as s:
        for e in s.execute(select(LifecycleEvent).where(LifecycleEvent.server_id == sid)).scalars():
            s.delete(e)

    ok(db, cloud.provider_id)
    ok(db, cloud.provider_id)

    assert [e.kind for e in lifecycle(db, sid)] == ["discovered"]


# --- managed servers ----------------------------------------------------------------------------


def test_adoption_binds_the_agencys_contract_and_the_adopted_event_carries_it(
    db: TestDatabase, quota_estate: Estate, sim_cloud: MakeCloud
) -> None:
    sc = company(db)
    contract = sign(db, quota_estate, sc)
    cloud = sim_cloud(service_company_id=sc)
    srv = cloud.spawn(owner="a1", vcpu=2)

    ok(db, cloud.provider_id)

    row = rows(db, cloud.provider_id)[srv.external_id]
    assert row.tenant_id == quota_estate.tid("a1") and row.contract_id == contract.id
    got = lifecycle(db, row.id)
    assert [e.kind for e in got] == ["discovered", "adopted"]
    adopted = got[-1]
    assert adopted.contract_id == contract.id and adopted.service_company_id == sc
    assert (adopted.tenant_id, adopted.agency_id) == (quota_estate.tid("a1"), quota_estate.tid("a"))
    assert adopted.sizes == row.booked


def test_adoption_goes_on_without_a_contract_when_the_agencys_refuses_servers(
    db: TestDatabase, quota_estate: Estate, sim_cloud: MakeCloud
) -> None:
    sc = company(db)
    sign(db, quota_estate, sc, status="suspended")
    cloud = sim_cloud(service_company_id=sc)
    srv = cloud.spawn(owner="a1")

    outcome = ok(db, cloud.provider_id)

    row = rows(db, cloud.provider_id)[srv.external_id]
    assert outcome.counts["adopted"] == 1 and row.tenant_id == quota_estate.tid("a1")
    assert row.contract_id is None
    assert lifecycle(db, row.id)[-1].kind == "adopted"
    assert lifecycle(db, row.id)[-1].contract_id is None


@pytest.fixture
def contracted(broker: Broker) -> Contract:
    """The broker's provider run by a service company that agency a has signed with."""
    sc = company(broker.db)
    with broker.db.unit_of_work() as s:
        provider = s.get(Provider, broker.cloud.provider_id)
        assert provider is not None
        provider.service_company_id = sc
        s.add(provider)
    return sign(broker.db, broker.estate, sc)


def test_a_managed_server_stopped_and_resized_outside_govbroker_is_changed_under_its_contract(
    broker: Broker, contracted: Contract, principal_of: Any
) -> None:
    db, cloud, est = broker.db, broker.cloud, broker.estate
    job = broker.request(principal_of("a-member"), public_ip=True, bandwidth_mbps=50)
    assert job.state == "succeeded", job.error
    sid = job.server_id
    booked = broker.server(sid).booked
    assert booked["bandwidth_mbps"] == 50 and broker.server(sid).contract_id == contracted.id
    ext = broker.server(sid).external_id

    cloud.driver.stop(ext)
    cloud.driver.resize(ext, vcpu=3, memory_mb=3072)
    ok(db, cloud.provider_id)

    got = lifecycle(db, sid)
    assert [e.kind for e in got] == ["created", "changed"]
    changed = got[-1]
    assert changed.power_state == "stopped"
    assert (changed.tenant_id, changed.agency_id) == (est.tid("a1"), est.tid("a"))
    assert changed.contract_id == contracted.id
    # drift is billed as it is; what sync cannot see (bandwidth) as the ledger holds it
    seen = cloud.driver.get_server(ext)
    assert changed.sizes == held_at_provider(seen, bandwidth_mbps=50)
    assert changed.sizes["vcpu"] == 3 and changed.sizes["memory_mb"] == 3072
    assert broker.server(sid).booked == booked, "the ledger keeps what was booked (drift)"
    assert broker.server(sid).drift is not None

    cloud.driver.release_public_ip(ext, seen.public_ips[0])
    ok(db, cloud.provider_id)
    ok(db, cloud.provider_id)
    got = lifecycle(db, sid)
    assert [e.kind for e in got] == ["created", "changed", "changed"]
    # the bandwidth was the egress of the address that is gone
    assert "public_ip" not in got[-1].sizes and "bandwidth_mbps" not in got[-1].sizes


def test_a_vanished_managed_server_is_gone_exactly_once(
    db: TestDatabase, quota_estate: Estate, sim_cloud: MakeCloud
) -> None:
    sc = company(db)
    contract = sign(db, quota_estate, sc)
    cloud = sim_cloud(service_company_id=sc)
    srv = cloud.spawn(owner="a1", vcpu=2)
    ok(db, cloud.provider_id)
    sid = row_id(db, cloud, srv.external_id)

    # a crash after writing the rows, before settling the ledger: the next syncs finish it
    cloud.driver.delete(srv.external_id)
    with db.unit_of_work() as s:
        provider = s.get(Provider, cloud.provider_id)
        assert provider is not None
        sync.apply(s, provider, sync.observe(cloud.driver))
    ok(db, cloud.provider_id)
    ok(db, cloud.provider_id)

    got = lifecycle(db, sid)
    assert [e.kind for e in got] == ["discovered", "adopted", "gone"]
    gone = got[-1]
    assert gone.sizes == {} and gone.contract_id == contract.id
    assert gone.tenant_id == quota_estate.tid("a1") and gone.agency_id == quota_estate.tid("a")


def test_a_managed_server_back_after_being_gone_is_changed_then_booked_again(
    db: TestDatabase, quota_estate: Estate, sim_cloud: MakeCloud
) -> None:
    sc = company(db)
    contract = sign(db, quota_estate, sc)
    cloud = sim_cloud(service_company_id=sc)
    srv = cloud.spawn(owner="a1", vcpu=2)
    ok(db, cloud.provider_id)
    sid = row_id(db, cloud, srv.external_id)

    ok(db, cloud.provider_id, driver_factory=blind(cloud))
    ok(db, cloud.provider_id)

    got = lifecycle(db, sid)
    assert [e.kind for e in got] == ["discovered", "adopted", "gone", "changed", "adopted"]
    back = got[3]
    assert back.tenant_id == quota_estate.tid("a1") and back.contract_id == contract.id
    assert back.sizes == held_at_provider(srv)
    assert got[-1].contract_id == contract.id
    assert rows(db, cloud.provider_id)[srv.external_id].contract_id == contract.id


def test_a_server_a_running_job_is_building_is_left_to_the_job(
    broker: Broker, principal_of: Any
) -> None:
    db, cloud = broker.db, broker.cloud
    data = ServerCreate(
        name="vm-building",
        system_id=broker.estate.tid("a1"),
        image="centos-7.9",
        flavor="s1.small",
    )
    submitted = service.request_server(db, principal_of("a-member"), data, key=None)
    assert submitted.claimed is not None
    job = submitted.claimed.job
    # the provider has built it; the job has not heard back yet
    p = job.params
    built = cloud.driver.create_server(
        ServerSpec(
            name=p["name"],
            image=p["image"],
            network=p["network"],
            owner_tag=p["owner_tag"],
            request_tag=job.request_tag,
            flavor=p["flavor"],
        )
    )

    ok(db, cloud.provider_id)
    ok(db, cloud.provider_id, driver_factory=blind(cloud))
    ok(db, cloud.provider_id)

    # the job writes its server's row and records it (sync inserting the row too would race
    # the job's insert of it)
    assert built.external_id not in rows(db, cloud.provider_id)
    assert event_count(db) == 0

    assert executor.run(db, submitted.claimed) == "succeeded"
    ok(db, cloud.provider_id)
    sid = row_id(db, cloud, built.external_id)
    assert [e.kind for e in lifecycle(db, sid)] == ["created"]
