"""Inventory sync against the vCenter simulator (a real vSphere API), on SQLite and PostgreSQL.

VMs are created, resized, re-owned and destroyed with pyvmomi directly, behind govbroker's back,
as an administrator would in the vSphere client; a sync must reflect every change: new servers,
sizes, owners (the `govbroker.tenant` custom field), unmanaged and drift flags, gone servers and
the quota they held. A provider that stops answering fails alone.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from broker.inventory import providers, sync
from broker.inventory.models import Provider
from broker.inventory.schemas import ProviderCreate
from tests.fixtures.auth import Estate
from tests.fixtures.db import TestDatabase
from tests.fixtures.inventory import ADMIN, MakeCloud, room_for_servers, used
from tests.fixtures.inventory import servers_of as rows
from tests.peers.vcsim import DATASTORE_TIERS, OutOfBand, VcsimModel, VcsimPeer

pytestmark = pytest.mark.vcsim
OWNER = "govbroker.tenant"


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VcsimPeer]:
    """A simulator of this module's own, so that VM counts are this module's to reason about."""
    model = VcsimModel(clusters=1, hosts_per_cluster=2, standalone_hosts=0, vms=3)
    with VcsimPeer(tmp_path_factory.mktemp("vcsim-sync"), model=model) as p:
        yield p


@pytest.fixture
def oob(peer: VcsimPeer) -> Iterator[OutOfBand]:
    with peer.out_of_band() as o:
        yield o


def options(**extra: Any) -> dict[str, Any]:
    return {
        "verify_tls": False,
        "timeout_s": 10,
        "retry_max_wait": 0,
        "datastore_tiers": DATASTORE_TIERS,
        **extra,
    }


def register(db: TestDatabase, peer: VcsimPeer, **opts: Any) -> uuid.UUID:
    with db.unit_of_work() as s:
        return providers.create_provider(
            s,
            ADMIN,
            ProviderCreate(
                kind="vmware",
                name=f"vc-{uuid.uuid4().hex[:8]}",
                endpoint=peer.endpoint,
                credentials=peer.credentials,
                options=options(**opts),
            ),
        ).id


@pytest.fixture
def quota_estate(db: TestDatabase, quota_estate: Estate) -> Estate:
    # vcsim's template disks land on the "ssd" datastore; every class a VM holds needs a limit
    return room_for_servers(db, quota_estate, "a", "b")


def synced(db: TestDatabase, provider_id: uuid.UUID) -> sync.Outcome:
    outcome = sync.sync_provider(db, provider_id)
    assert outcome.status == "ok", outcome.error
    return outcome


def test_changes_made_on_vcsim_are_reflected_after_a_sync(
    db: TestDatabase, quota_estate: Estate, peer: VcsimPeer, oob: OutOfBand
) -> None:
    pid = register(db, peer)
    first = synced(db, pid)
    assert first.counts["servers_seen"] == len(oob.vm_ids())
    assert first.counts["hosts"] == 2
    before_a1 = used(db, quota_estate, "a1")

    owned = oob.create_vm(f"tax-{uuid.uuid4().hex[:6]}", vcpu=2, memory_mb=1024)
    oob.set_custom_field(owned, OWNER, "a1")
    loose = oob.create_vm(f"legacy-{uuid.uuid4().hex[:6]}", vcpu=1, memory_mb=512)
    synced(db, pid)

    got = rows(db, pid)
    assert got[owned].tenant_id == quota_estate.tid("a1") and got[owned].owner_tag == "a1"
    assert (got[owned].vcpu, got[owned].memory_mb) == (2, 1024)
    assert got[owned].booked["vcpu"] == 2
    assert used(db, quota_estate, "a1") == before_a1 + 2
    assert got[loose].tenant_id is None and got[loose].owner_tag is None

    # resized and re-owned behind govbroker's back: flagged, not silently re-booked
    oob.reconfigure(owned, vcpu=4, memory_mb=2048)
    oob.set_custom_field(owned, OWNER, "b1")
    synced(db, pid)
    drifted = rows(db, pid)[owned]
    assert (drifted.vcpu, drifted.memory_mb, drifted.owner_tag) == (4, 2048, "b1")
    assert drifted.drift is not None and drifted.drift_at is not None
    assert drifted.drift["size"]["before"]["vcpu"] == 2
    assert drifted.drift["size"]["after"] == {
        **drifted.drift["size"]["before"],
        "vcpu": 4,
        "memory_mb": 2048,
    }
    assert drifted.drift["owner"] == {"before": "a1", "after": "b1"}
    assert used(db, quota_estate, "a1") == before_a1 + 2

    # an unmanaged VM given an owner on the vSphere side is adopted on the next sync
    oob.set_custom_field(loose, OWNER, "a2")
    synced(db, pid)
    assert rows(db, pid)[loose].tenant_id == quota_estate.tid("a2")

    oob.destroy(owned)
    outcome = synced(db, pid)
    assert outcome.counts["servers_gone"] == 1 and outcome.counts["released"] == 1
    gone = rows(db, pid)[owned]
    assert gone.gone_at is not None and gone.booked == {}
    assert used(db, quota_estate, "a1") == before_a1
    oob.destroy(loose)


def test_a_second_sync_of_an_unchanged_vcenter_writes_nothing(
    db: TestDatabase, estate: Estate, peer: VcsimPeer
) -> None:
    pid = register(db, peer)
    synced(db, pid)
    again = synced(db, pid)
    assert not any(again.counts.get(k) for k in ("servers_new", "servers_updated", "servers_gone"))


def test_a_provider_that_times_out_leaves_the_others_sync_intact(
    db: TestDatabase,
    estate: Estate,
    peer: VcsimPeer,
    sim_cloud: MakeCloud,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    model = VcsimModel(clusters=1, hosts_per_cluster=1, standalone_hosts=0, vms=2)
    with VcsimPeer(tmp_path_factory.mktemp("vcsim-hung"), model=model) as hung:
        hung_id = register(db, hung, timeout_s=1)
        healthy_vc = register(db, peer)
        cloud = sim_cloud()
        cloud.spawn()
        first = synced(db, hung_id)
        kept = set(rows(db, hung_id))
        assert len(kept) == first.counts["servers_seen"] > 0

        hung.pause()
        try:
            outcomes = {o.provider_id: o for o in sync.sync_all(db, only_due=False, workers=1)}
        finally:
            hung.resume()

    failed = outcomes[hung_id]
    assert failed.status == "failed" and "Unavailable" in (failed.error or "")
    assert outcomes[healthy_vc].status == "ok" and outcomes[cloud.provider_id].status == "ok"
    assert len(rows(db, healthy_vc)) == outcomes[healthy_vc].counts["servers_seen"]
    assert len(rows(db, cloud.provider_id)) == 1
    # what the hung provider reported before stays, not marked gone
    still = rows(db, hung_id)
    assert set(still) == kept and all(r.gone_at is None for r in still.values())
    with db.unit_of_work(write=False) as s:
        p = s.get(Provider, hung_id)
    assert p is not None and p.last_sync_status == "failed"
