"""Sync at its edges: races with the center's own adoptions, servers that come back, providers
that misreport, and what a sync of an unchanged provider writes (nothing)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, select

from broker.core import clock as broker_clock
from broker.core.errors import Invalid, QuotaExceeded
from broker.inventory import providers, service, sync
from broker.inventory.models import Provider, Server, SyncRun
from broker.inventory.schemas import Adopt, ProviderCreate
from tests.fixtures.auth import Estate
from tests.fixtures.db import TestDatabase
from tests.fixtures.inventory import ADMIN, MakeCloud, room_for_servers, used
from tests.fixtures.inventory import servers_of as rows


@pytest.fixture
def quota_estate(db: TestDatabase, quota_estate: Estate) -> Estate:
    # agency a only: b keeps its vCPU-only quota, for the missing-quota cases
    return room_for_servers(db, quota_estate, "a")


def ok(db: TestDatabase, provider_id: uuid.UUID) -> sync.Outcome:
    outcome = sync.sync_provider(db, provider_id)
    assert outcome.status == "ok", outcome.error
    return outcome


def test_a_server_adopted_by_hand_is_left_alone_by_a_refused_owner_mapping(
    db: TestDatabase, quota_estate: Estate, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud()
    srv = cloud.spawn(owner="b1", vcpu=60)  # b cannot hold it: sync leaves it unmanaged
    assert ok(db, cloud.provider_id).counts["adopt_failed"] == 1
    sid = rows(db, cloud.provider_id)[srv.external_id].id
    with db.unit_of_work() as s:
        service.adopt(s, ADMIN, sid, Adopt(tenant_id=quota_estate.tid("a"), force=True))
    assert used(db, quota_estate, "a") == 60

    again = ok(db, cloud.provider_id)

    row = rows(db, cloud.provider_id)[srv.external_id]
    assert row.tenant_id == quota_estate.tid("a") and row.booked["vcpu"] == 60
    assert not again.counts.get("adopt_failed") and used(db, quota_estate, "a") == 60


def test_book_refuses_a_booked_server_whatever_its_owner_column_says(
    db: TestDatabase, quota_estate: Estate, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud()
    srv = cloud.spawn(owner="a1", vcpu=2)
    ok(db, cloud.provider_id)
    with db.unit_of_work() as s:
        row = s.execute(select(Server).where(Server.external_id == srv.external_id)).scalar_one()
        row.tenant_id = None  # as a half-finished write would have left it
        s.add(row)
    sid = rows(db, cloud.provider_id)[srv.external_id].id
    with pytest.raises(Exception, match="already managed"), db.unit_of_work() as s:
        service.adopt(s, ADMIN, sid, Adopt(tenant_id=quota_estate.tid("a2")))
    assert used(db, quota_estate, "a") == 2


def test_a_server_back_after_being_gone_counts_again_for_its_owner(
    db: TestDatabase, quota_estate: Estate, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud()
    srv = cloud.spawn(vcpu=3)  # no provider-side owner: adopted by hand
    ok(db, cloud.provider_id)
    sid = rows(db, cloud.provider_id)[srv.external_id].id
    with db.unit_of_work() as s:
        service.adopt(s, ADMIN, sid, Adopt(tenant_id=quota_estate.tid("a1")))
    # one listing without it, as when its host was briefly unreachable
    with db.unit_of_work() as s:
        provider = s.get(Provider, cloud.provider_id)
        assert provider is not None
        observed = sync.Observed(
            cloud.driver.list_hosts(), cloud.driver.list_storage(), cloud.driver.list_networks(), []
        )
        sync.apply(s, provider, observed)
    ok(db, cloud.provider_id)  # releases what the gone server held, then sees it back
    row = rows(db, cloud.provider_id)[srv.external_id]
    assert row.gone_at is None and row.tenant_id == quota_estate.tid("a1")
    assert row.booked["vcpu"] == 3 and used(db, quota_estate, "a1") == 3
    assert service.is_managed(row)


def test_forcing_past_a_missing_quota_is_refused_not_a_server_error(
    db: TestDatabase, quota_estate: Estate, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud()
    srv = cloud.spawn(vcpu=1)
    ok(db, cloud.provider_id)
    sid = rows(db, cloud.provider_id)[srv.external_id].id
    # agency b holds a vcpu limit only: memory, storage and instances were never assigned
    with pytest.raises(QuotaExceeded) as refused, db.unit_of_work() as s:
        service.adopt(s, ADMIN, sid, Adopt(tenant_id=quota_estate.tid("b1"), force=True))
    assert {o.reason for o in refused.value.over} == {"no_quota"}
    assert rows(db, cloud.provider_id)[srv.external_id].tenant_id is None


def test_adopting_by_hand_is_not_owner_drift(
    db: TestDatabase, quota_estate: Estate, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud()
    srv = cloud.spawn(vcpu=1)
    ok(db, cloud.provider_id)
    sid = rows(db, cloud.provider_id)[srv.external_id].id
    with db.unit_of_work() as s:
        service.adopt(s, ADMIN, sid, Adopt(tenant_id=quota_estate.tid("a1")))
    ok(db, cloud.provider_id)
    assert rows(db, cloud.provider_id)[srv.external_id].drift is None


def test_an_owner_path_must_be_the_tenants_real_ancestry(
    db: TestDatabase, quota_estate: Estate, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud()
    wrong = cloud.spawn(owner="b/a1")
    right = cloud.spawn(owner="a/a1")
    ok(db, cloud.provider_id)
    got = rows(db, cloud.provider_id)
    assert got[wrong.external_id].tenant_id is None
    assert got[right.external_id].tenant_id == quota_estate.tid("a1")


def test_undecryptable_credentials_fail_the_run_instead_of_leaving_it_running(
    db: TestDatabase, sim_cloud: MakeCloud
) -> None:
    broken, healthy = sim_cloud(), sim_cloud()
    with db.unit_of_work() as s:
        p = s.get(Provider, broken.provider_id)
        assert p is not None
        p.credentials_enc = "gAAAAA-not-a-token-of-our-keys"
        s.add(p)

    outcomes = {o.provider_id: o for o in sync.sync_all(db, only_due=False, workers=1)}

    assert outcomes[broken.provider_id].status == "failed"
    assert "decrypted" in (outcomes[broken.provider_id].error or "")
    assert outcomes[healthy.provider_id].status == "ok"
    with db.unit_of_work(write=False) as s:
        runs = s.execute(select(SyncRun.status)).scalars().all()
    assert "running" not in runs


def test_a_listing_missing_most_servers_is_not_believed(
    db: TestDatabase, sim_cloud: MakeCloud
) -> None:
    cloud = sim_cloud()
    spawned = [cloud.spawn() for _ in range(12)]
    ok(db, cloud.provider_id)
    for srv in spawned[1:]:
        cloud.driver.delete(srv.external_id)

    refused = sync.sync_provider(db, cloud.provider_id)

    assert refused.status == "failed" and "11 of 12 servers vanished" in (refused.error or "")
    assert all(r.gone_at is None for r in rows(db, cloud.provider_id).values())
    with db.unit_of_work() as s:
        p = s.get(Provider, cloud.provider_id)
        assert p is not None
        p.options = {**p.options, "allow_mass_gone": True}
        s.add(p)
    accepted = ok(db, cloud.provider_id)
    assert accepted.counts["servers_gone"] == 11


@pytest.fixture
def writes(db: TestDatabase) -> Iterator[list[str]]:
    """Every INSERT/UPDATE/DELETE on the test's connection that changed a row, as text."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        verb = statement.lstrip().split(" ", 1)[0].upper()
        if verb in {"INSERT", "UPDATE", "DELETE"} and cursor.rowcount != 0:
            seen.append(statement)

    event.listen(db.connection, "after_cursor_execute", record)
    yield seen
    event.remove(db.connection, "after_cursor_execute", record)


def test_a_sync_of_an_unchanged_provider_writes_only_its_run_record(
    db: TestDatabase, quota_estate: Estate, sim_cloud: MakeCloud, writes: list[str]
) -> None:
    cloud = sim_cloud()
    cloud.spawn(owner="a1")
    for _ in range(4):
        cloud.spawn()
    ok(db, cloud.provider_id)
    writes.clear()

    ok(db, cloud.provider_id)

    tables = {w.split()[1 if w.upper().startswith("UPDATE") else 2].strip('"') for w in writes}
    assert tables <= {"sync_run", "provider", "audit_event", "audit_chain_head"}, writes


def test_an_hour_later_every_row_is_refreshed_locked_a_chunk_at_a_time(
    clock: Any, db: TestDatabase, sim_cloud: MakeCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    # rows are locked by lists of at most _LOCK_CHUNK ids (a driver bounds the parameters of one
    # statement: 65,535 on PostgreSQL, and a big provider's hourly refresh touches every row);
    # here 2, for 5 servers
    monkeypatch.setattr(sync, "_LOCK_CHUNK", 2)
    cloud = sim_cloud()
    for _ in range(5):
        cloud.spawn()
    ok(db, cloud.provider_id)
    clock.shift(sync.LAST_SEEN_PRECISION + timedelta(minutes=1))
    lock_sizes: list[int] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "server.id IN" in statement:
            lock_sizes.append(len(params))

    event.listen(db.connection, "before_cursor_execute", record)
    try:
        ok(db, cloud.provider_id)
    finally:
        event.remove(db.connection, "before_cursor_execute", record)

    assert sorted(lock_sizes) == [1, 2, 2]
    assert {r.last_seen for r in rows(db, cloud.provider_id).values()} == {broker_clock.now()}


def test_a_url_carrying_a_password_is_refused_as_endpoint(db: TestDatabase, estate: Estate) -> None:
    with pytest.raises(Invalid) as refused, db.unit_of_work() as s:
        providers.create_provider(
            s,
            ADMIN,
            ProviderCreate(
                kind="vmware", name="vc-bad", endpoint="https://root:hunter2@vc.example/sdk"
            ),
        )
    assert refused.value.errors[0].field == "endpoint"
