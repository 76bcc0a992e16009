"""Inventory sync against the simulator, on SQLite and PostgreSQL: what appears, changes, vanishes
and changes hands at the provider is reflected after a sync, and the quota ledger follows."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from broker.audit.models import AuditEvent
from broker.core import clock
from broker.core.errors import Conflict, QuotaExceeded
from broker.inventory import service, sync
from broker.inventory.models import InventoryHost, Provider, SyncRun
from broker.inventory.schemas import Adopt
from drivers.base import Disk
from tests.fixtures.auth import Estate
from tests.fixtures.db import TestDatabase
from tests.fixtures.inventory import ADMIN, SECRET, MakeCloud, room_for_servers, used
from tests.fixtures.inventory import servers_of as servers


def events(db: TestDatabase, action: str) -> list[AuditEvent]:
    with db.unit_of_work(write=False) as s:
        stmt = select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)
        return list(s.execute(stmt).scalars())


@pytest.fixture
def quota_estate(db: TestDatabase, quota_estate: Estate) -> Estate:
    # the simulator's root disks are SSD, and a server counts against every class it holds
    return room_for_servers(db, quota_estate, "a", "b")


def run(db: TestDatabase, provider_id: uuid.UUID, **kw: Any) -> sync.Outcome:
    outcome = sync.sync_provider(db, provider_id, **kw)
    assert outcome.status == "ok", outcome.error
    return outcome


def test_first_sync_records_the_whole_estate_and_the_run(
    db: TestDatabase, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud()
    a = cloud.spawn(vcpu=2, memory_mb=2048, disks=(Disk(size_gb=30, tier="hdd"),))
    cloud.spawn()

    outcome = run(db, cloud.provider_id, trigger="manual")

    assert outcome.counts["servers_new"] == 2 and outcome.counts["servers_seen"] == 2
    assert outcome.counts["hosts"] == len(cloud.driver.list_hosts())
    rows = servers(db, cloud.provider_id)
    got = rows[a.external_id]
    assert (got.vcpu, got.memory_mb, got.power_state) == (2, 2048, "running")
    assert {"size_gb": 30, "tier": "hdd"} in [
        {k: d[k] for k in ("size_gb", "tier")} for d in got.disks
    ]
    assert got.ips == list(a.ips) and got.tenant_id is None and got.gone_at is None
    with db.unit_of_work(write=False) as s:
        run_row = s.get(SyncRun, outcome.run_id)
        provider = s.get(Provider, cloud.provider_id)
        hosts = s.execute(select(InventoryHost)).scalars().all()
    assert run_row is not None and run_row.status == "ok" and run_row.duration_ms is not None
    assert run_row.counts == outcome.counts and run_row.trigger == "manual"
    assert provider is not None and provider.last_sync_status == "ok"
    assert provider.last_sync_at is not None
    assert all(h.capacity["vcpu"] > 0 for h in hosts)


def test_a_second_sync_changes_nothing(db: TestDatabase, sim_cloud: MakeCloud) -> None:
    cloud = sim_cloud()
    for _ in range(3):
        cloud.spawn()
    run(db, cloud.provider_id)
    before = {
        k: (v.name, v.vcpu, v.disks, v.ips, v.drift)
        for k, v in servers(db, cloud.provider_id).items()
    }

    again = run(db, cloud.provider_id)

    assert not any(again.counts.get(k) for k in ("servers_new", "servers_updated", "servers_gone"))
    after = {
        k: (v.name, v.vcpu, v.disks, v.ips, v.drift)
        for k, v in servers(db, cloud.provider_id).items()
    }
    assert after == before
    assert [e.action for e in events(db, "server.drift")] == []


def test_owner_tag_naming_a_tenant_adopts_the_server_into_its_quota(
    db: TestDatabase, quota_estate: Estate, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud()
    before = used(db, quota_estate, "a1", "vcpu"), used(db, quota_estate, "a", "vcpu")
    srv = cloud.spawn(owner="a/a1", vcpu=4, memory_mb=4096)
    cloud.spawn()  # no owner: stays unmanaged

    outcome = run(db, cloud.provider_id)

    assert outcome.counts.get("adopted") == 1, servers(db, cloud.provider_id)
    row = servers(db, cloud.provider_id)[srv.external_id]
    assert row.tenant_id == quota_estate.tid("a1") and row.adopted_at is not None
    assert row.booked["vcpu"] == 4 and row.booked["memory_mb"] == 4096
    assert row.booked["instances"] == 1
    assert used(db, quota_estate, "a1", "vcpu") == before[0] + 4
    assert used(db, quota_estate, "a", "vcpu") == before[1] + 4
    unmanaged = [r for r in servers(db, cloud.provider_id).values() if r.tenant_id is None]
    assert len(unmanaged) == 1
    [event] = events(db, "server.adopt")
    assert event.after["tenant"] == "a1" and event.actor_name == "inventory-sync"
    # a second sync neither books it twice nor touches the ledger
    run(db, cloud.provider_id)
    assert used(db, quota_estate, "a1", "vcpu") == before[0] + 4


def test_an_owner_whose_quota_is_full_stays_unmanaged_with_the_reason_until_it_fits(
    db: TestDatabase, quota_estate: Estate, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud()
    big = cloud.spawn(owner="b1", vcpu=60, memory_mb=1024)  # b's vcpu limit is 50

    outcome = run(db, cloud.provider_id)

    assert outcome.counts["adopt_failed"] == 1
    row = servers(db, cloud.provider_id)[big.external_id]
    assert row.tenant_id is None and not row.booked
    assert row.adopt_error is not None and "vcpu" in row.adopt_error and "b1" in row.adopt_error
    assert used(db, quota_estate, "b", "vcpu") == 0

    from quotas import service as quotas

    with db.unit_of_work() as s:
        quotas.set_quota(s, ADMIN, quota_estate.tid("b"), "vcpu", limit=64)
    run(db, cloud.provider_id)
    row = servers(db, cloud.provider_id)[big.external_id]
    assert row.tenant_id == quota_estate.tid("b1") and row.adopt_error is None
    assert used(db, quota_estate, "b", "vcpu") == 60


def test_resize_outside_govbroker_is_drift_with_before_and_after(
    db: TestDatabase, quota_estate: Estate, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud()
    srv = cloud.spawn(owner="a1", vcpu=2, memory_mb=2048)
    run(db, cloud.provider_id)

    cloud.driver.resize(srv.external_id, vcpu=8, memory_mb=8192)
    run(db, cloud.provider_id)

    row = servers(db, cloud.provider_id)[srv.external_id]
    assert (row.vcpu, row.memory_mb) == (8, 8192)
    assert row.drift is not None and row.drift_at is not None
    assert row.drift["size"]["before"]["vcpu"] == 2 and row.drift["size"]["after"]["vcpu"] == 8
    assert row.drift["size"]["after"]["memory_mb"] == 8192
    assert "owner" not in row.drift
    # the ledger keeps what was booked: drift is flagged, not silently booked
    assert row.booked["vcpu"] == 2
    [event] = events(db, "server.drift")
    assert event.after["drift"]["size"]["after"]["vcpu"] == 8
    first_flagged = row.drift_at

    run(db, cloud.provider_id)  # still drifted: same flag, same time, no new event
    again = servers(db, cloud.provider_id)[srv.external_id]
    assert again.drift == row.drift and again.drift_at == first_flagged
    assert len(events(db, "server.drift")) == 1

    cloud.driver.resize(srv.external_id, vcpu=2, memory_mb=2048)
    run(db, cloud.provider_id)
    back = servers(db, cloud.provider_id)[srv.external_id]
    assert back.drift is None and back.drift_at is None


def test_owner_changed_outside_govbroker_is_drift_and_unmanaged_re_owning_adopts(
    db: TestDatabase, quota_estate: Estate, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud()
    managed = cloud.spawn(owner="a1")
    loose = cloud.spawn()
    run(db, cloud.provider_id)

    cloud.driver.set_owner(managed.external_id, "b1")
    cloud.driver.set_owner(loose.external_id, "a2")
    run(db, cloud.provider_id)

    rows = servers(db, cloud.provider_id)
    moved = rows[managed.external_id]
    assert moved.owner_tag == "b1" and moved.tenant_id == quota_estate.tid("a1")
    assert moved.drift == {"owner": {"before": "a1", "after": "b1"}}
    adopted = rows[loose.external_id]
    assert adopted.tenant_id == quota_estate.tid("a2") and adopted.drift is None


def test_deleted_at_the_provider_is_gone_and_its_quota_is_given_back(
    db: TestDatabase, quota_estate: Estate, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud()
    srv = cloud.spawn(owner="a1", vcpu=3)
    run(db, cloud.provider_id)
    assert used(db, quota_estate, "a1", "vcpu") == 3

    cloud.driver.delete(srv.external_id)
    outcome = run(db, cloud.provider_id)

    assert outcome.counts["servers_gone"] == 1 and outcome.counts["released"] == 1
    row = servers(db, cloud.provider_id)[srv.external_id]
    assert row.gone_at is not None and row.booked == {}
    assert used(db, quota_estate, "a1", "vcpu") == 0
    [event] = events(db, "server.gone")
    assert event.before["booked"]["vcpu"] == 3
    again = run(db, cloud.provider_id)
    assert not again.counts.get("servers_gone") and not again.counts.get("released")


def test_a_crash_between_writing_rows_and_settling_the_ledger_is_repaired_by_the_next_sync(
    db: TestDatabase, quota_estate: Estate, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud()
    srv = cloud.spawn(owner="a1", vcpu=3)
    run(db, cloud.provider_id)
    cloud.driver.delete(srv.external_id)
    # step 2 only, as if the process died before step 3
    with db.unit_of_work() as s:
        provider = s.get(Provider, cloud.provider_id)
        assert provider is not None
        sync.apply(s, provider, sync.observe(cloud.driver))
    assert servers(db, cloud.provider_id)[srv.external_id].gone_at is not None
    assert used(db, quota_estate, "a1", "vcpu") == 3

    run(db, cloud.provider_id)

    assert used(db, quota_estate, "a1", "vcpu") == 0


def test_a_failing_provider_records_the_failure_and_changes_nothing(
    db: TestDatabase, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud(options={"fail_operations": {"list_servers": "unavailable"}})
    healthy = sim_cloud()
    cloud.spawn()
    healthy.spawn()

    outcomes = {o.provider_name: o for o in sync.sync_all(db, only_due=False, workers=1)}

    failed = outcomes[cloud.name]
    assert failed.status == "failed" and failed.error and "Unavailable" in failed.error
    assert servers(db, cloud.provider_id) == {}
    assert outcomes[healthy.name].status == "ok"
    assert len(servers(db, healthy.provider_id)) == 1
    with db.unit_of_work(write=False) as s:
        p = s.get(Provider, cloud.provider_id)
    assert p is not None and p.last_sync_status == "failed" and p.last_sync_error


def test_a_provider_failing_after_a_good_sync_keeps_its_servers(
    db: TestDatabase, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud()
    srv = cloud.spawn()
    run(db, cloud.provider_id)
    with db.unit_of_work() as s:
        p = s.get(Provider, cloud.provider_id)
        assert p is not None
        p.options = {**p.options, "timeout_on": ["list_servers"]}
        s.add(p)

    outcome = sync.sync_provider(db, cloud.provider_id)

    assert outcome.status == "failed" and "timed out" in (outcome.error or "")
    assert servers(db, cloud.provider_id)[srv.external_id].gone_at is None


def test_secrets_in_provider_messages_are_scrubbed(db: TestDatabase, sim_cloud: MakeCloud) -> None:
    cloud = sim_cloud()

    def leaky(provider: Provider) -> Any:
        from drivers.base import Unauthorized

        class Leaky:
            def list_hosts(self) -> list[Any]:
                raise Unauthorized("no", provider_message=f"bad password {SECRET} for sync")

            def close(self) -> None:
                pass

        return Leaky()

    outcome = sync.sync_provider(db, cloud.provider_id, driver_factory=leaky)

    assert outcome.status == "failed" and SECRET not in (outcome.error or "")
    assert "***" in (outcome.error or "")


def test_only_one_sync_of_a_provider_at_a_time_and_stale_runs_are_abandoned(
    db: TestDatabase, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud()
    with db.unit_of_work() as s:
        s.add(SyncRun(provider_id=cloud.provider_id, trigger="manual", started_at=clock.now()))
    with pytest.raises(Conflict, match="being synced"):
        sync.sync_provider(db, cloud.provider_id)

    with db.unit_of_work() as s:
        for r in s.execute(select(SyncRun)).scalars():
            r.started_at = clock.now() - timedelta(hours=2)
            s.add(r)
    run(db, cloud.provider_id)
    with db.unit_of_work(write=False) as s:
        statuses = sorted(r.status for r in s.execute(select(SyncRun)).scalars())
    assert statuses == ["failed", "ok"]


def test_a_disabled_provider_is_not_synced(db: TestDatabase, sim_cloud: MakeCloud) -> None:
    cloud = sim_cloud(enabled=False)
    with pytest.raises(Conflict, match="disabled"):
        sync.sync_provider(db, cloud.provider_id)
    assert sync.sync_all(db, only_due=False, workers=1) == []


def test_due_providers_follow_their_interval(db: TestDatabase, sim_cloud: MakeCloud) -> None:
    cloud = sim_cloud(sync_interval_s=600)
    with db.unit_of_work(write=False) as s:
        assert cloud.provider_id in sync.due_providers(s, clock.now())
    run(db, cloud.provider_id)
    with db.unit_of_work(write=False) as s:
        assert cloud.provider_id not in sync.due_providers(s, clock.now())
        assert cloud.provider_id in sync.due_providers(s, clock.now() + timedelta(seconds=601))


def test_center_adopts_an_unmanaged_server_refused_when_over_quota_unless_forced(
    db: TestDatabase, quota_estate: Estate, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud()
    small = cloud.spawn(vcpu=2)
    big = cloud.spawn(vcpu=45)  # a1's own vcpu limit is 40
    run(db, cloud.provider_id)
    ids = {k: v.id for k, v in servers(db, cloud.provider_id).items()}
    target = Adopt(tenant_id=quota_estate.tid("a1"))

    with db.unit_of_work() as s:
        service.adopt(s, ADMIN, ids[small.external_id], target)
    assert used(db, quota_estate, "a1", "vcpu") == 2
    with pytest.raises(Conflict, match="already managed"), db.unit_of_work() as s:
        service.adopt(s, ADMIN, ids[small.external_id], target)

    with pytest.raises(QuotaExceeded) as refused, db.unit_of_work() as s:
        service.adopt(s, ADMIN, ids[big.external_id], target)
    assert any(o.resource_class == "vcpu" for o in refused.value.over)
    assert servers(db, cloud.provider_id)[big.external_id].tenant_id is None

    forced = Adopt(tenant_id=quota_estate.tid("a1"), force=True, reason="legacy tax system")
    with db.unit_of_work() as s:
        service.adopt(s, ADMIN, ids[big.external_id], forced)
    assert used(db, quota_estate, "a1", "vcpu") == 47
    event = events(db, "server.adopt")[-1]
    assert event.after["forced"] is True and event.after["over_limit"]
    assert event.after["reason"] == "legacy tax system"


def test_sync_writes_only_summary_audit_events_for_plain_changes(
    db: TestDatabase, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud()
    for _ in range(5):
        cloud.spawn()
    with db.unit_of_work(write=False) as s:
        before = s.execute(select(func.count()).select_from(AuditEvent)).scalar_one()
    run(db, cloud.provider_id)
    with db.unit_of_work(write=False) as s:
        after = s.execute(select(func.count()).select_from(AuditEvent)).scalar_one()
    assert after == before + 1
    [event] = events(db, "provider.sync")
    assert event.after["counts"]["servers_new"] == 5


def test_owner_tags_map_to_the_last_code_of_a_path() -> None:
    assert sync.tenant_code_of("a/a1") == "a1"
    assert sync.tenant_code_of("a1") == "a1"
    assert sync.tenant_code_of("a/a1/") == "a1"
    assert sync.tenant_code_of("") is None and sync.tenant_code_of(None) is None


def test_size_counts_disks_per_known_tier() -> None:
    classes = ["vcpu", "memory_mb", "instances", "storage_gb.ssd"]
    disks = [
        {"size_gb": 20, "tier": "ssd"},
        {"size_gb": 5, "tier": "ssd"},
        {"size_gb": 9, "tier": "tape"},
    ]
    assert sync.size_of(2, 512, disks, classes) == {
        "vcpu": 2,
        "memory_mb": 512,
        "instances": 1,
        "storage_gb.ssd": 25,
    }
    assert sync.unknown_tiers(disks, classes) == ["tape"]
