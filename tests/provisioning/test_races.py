"""Races between a job and the rest: a sync whose listing is older than a job's result, the
reconciler taking a job that waited for a worker, a shrink of what the server never booked,
a resize past the approval threshold, and a provider the ledger cannot count."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest
from sqlmodel import select

from broker.core.errors import Invalid
from broker.core.settings import get_settings
from broker.inventory import sync
from broker.inventory.models import Provider, Server
from broker.provisioning import catalog, executor, service
from broker.provisioning.schemas import PolicyUpdate, ServerCreate
from drivers.base import Disk
from tests.fixtures.inventory import used
from tests.fixtures.provisioning import ADMIN, Broker, offer


def _apply(broker: Broker, observed: sync.Observed) -> dict[str, int]:
    with broker.db.unit_of_work() as s:
        provider = s.get(Provider, broker.cloud.provider_id)
        assert provider is not None
        return sync.apply(s, provider, observed)


def test_a_listing_older_than_a_new_server_does_not_mark_it_gone(
    clock, broker: Broker, principal_of
) -> None:  # type: ignore[no-untyped-def]
    observed = sync.observe(broker.cloud.driver)  # read before the server exists
    clock.shift(timedelta(seconds=5))
    job = broker.request(principal_of("a-member"))
    clock.shift(timedelta(seconds=5))
    counts = _apply(broker, observed)
    assert counts.get("servers_gone", 0) == 0
    row = broker.server(job.server_id)
    assert row.gone_at is None and row.booked["instances"] == 1
    assert used(broker.db, broker.estate, "a1") == 1


def test_a_listing_older_than_a_delete_does_not_bring_the_server_back(
    clock, broker: Broker, principal_of
) -> None:  # type: ignore[no-untyped-def]
    member = principal_of("a-member")
    job = broker.request(member)
    clock.shift(timedelta(seconds=5))
    observed = sync.observe(broker.cloud.driver)  # still lists the server
    clock.shift(timedelta(seconds=5))
    assert broker.act(member, job.server_id, "delete").state == "succeeded"
    clock.shift(timedelta(seconds=5))
    _apply(broker, observed)
    assert broker.server(job.server_id).gone_at is not None  # the older listing changed nothing
    outcome = sync.sync_provider(broker.db, broker.cloud.provider_id)
    assert not outcome.counts.get("rebooked") and not outcome.counts.get("servers_back")
    row = broker.server(job.server_id)
    assert row.gone_at is not None and row.booked == {}
    assert used(broker.db, broker.estate, "a1") == 0


def test_a_job_taken_over_while_it_waited_for_a_worker_never_reaches_the_provider(
    clock, broker: Broker, principal_of
) -> None:  # type: ignore[no-untyped-def]
    data = ServerCreate(
        name="waited", system_id=broker.estate.tid("a1"), image="centos-7.9", flavor="s1.small"
    )
    submitted = service.request_server(broker.db, principal_of("a-member"), data, key=None)
    assert submitted.claimed is not None
    clock.shift(timedelta(seconds=get_settings().job_stale_seconds + 1))
    assert executor.reconcile(broker.db)["resolved"] == 1  # nothing at the provider: released
    assert executor.run(broker.db, submitted.claimed) is None
    assert broker.cloud.driver.list_servers() == []
    assert broker.job(submitted.job_id).state == "failed"
    assert used(broker.db, broker.estate, "a1") == 0


def test_detaching_a_disk_added_outside_govbroker_gives_back_nothing_and_ends(
    broker: Broker, principal_of
) -> None:  # type: ignore[no-untyped-def]
    member = principal_of("a-member")
    job = broker.request(member)
    row = broker.server(job.server_id)
    held = used(broker.db, broker.estate, "a", "storage_gb.hdd")
    # an operator adds a disk at the hypervisor; sync records it (and flags the drift)
    broker.cloud.driver.attach_disk(row.external_id, Disk(50, "hdd"))
    assert sync.sync_provider(broker.db, broker.cloud.provider_id).status == "ok"
    disk_id = broker.server(job.server_id).disks[-1]["external_id"]
    done = broker.act(member, job.server_id, "detach_disk", disk_id=disk_id)
    assert done.state == "succeeded", done.error
    assert done.shrink == {}
    assert used(broker.db, broker.estate, "a", "storage_gb.hdd") == held


def test_resizing_past_the_approval_threshold_waits_for_the_agency_admin(
    broker: Broker, principal_of
) -> None:  # type: ignore[no-untyped-def]
    member = principal_of("a-member")
    job = broker.request(member, flavor=None, vcpu=2, memory_mb=2048)
    with broker.db.unit_of_work() as s:
        catalog.set_policy(s, ADMIN, broker.estate.tid("a"), PolicyUpdate(approval_vcpu=2))
    waiting = broker.act(member, job.server_id, "resize", vcpu=4, memory_mb=4096)
    assert waiting.state == "pending_approval" and waiting.deadline is not None
    assert used(broker.db, broker.estate, "a1") == 4  # the growth is held while it waits
    with broker.db.unit_of_work() as s:
        service.decide(s, principal_of("a-admin"), waiting.id, approve=True, reason=None)
    assert executor.run(broker.db, waiting.id) == "succeeded"
    assert broker.server(job.server_id).vcpu == 4
    # shrinking needs nobody's approval
    assert broker.act(member, job.server_id, "resize", vcpu=1, memory_mb=1024).state == "succeeded"


def test_an_approval_window_longer_than_a_reservation_can_hold_is_refused(
    broker: Broker,
) -> None:
    with broker.db.unit_of_work() as s, pytest.raises(Invalid) as refused:
        catalog.set_policy(s, ADMIN, broker.estate.tid("a"), PolicyUpdate(approval_hours=700))
    assert refused.value.errors[0].field == "approval_hours"


def test_a_forged_job_cursor_is_invalid_input(broker: Broker, principal_of) -> None:  # type: ignore[no-untyped-def]
    forged = base64.urlsafe_b64encode(
        json.dumps(["x", "00000000-0000-0000-0000-000000000000"]).encode()
    )
    with broker.db.unit_of_work(write=False) as s, pytest.raises(Invalid):
        service.list_jobs(s, principal_of("a-member"), cursor=forged.decode().rstrip("="))
    with broker.db.unit_of_work(write=False) as s:
        assert list(s.execute(select(Server.id)).scalars()) == []


def test_a_provider_whose_tier_no_quota_class_counts_is_passed_over_not_fatal(
    broker: Broker, principal_of, sim_cloud
) -> None:  # type: ignore[no-untyped-def]
    # offered too, with its only tier (nvme) unknown to the ledger: it cannot take a server, and
    # used to refuse every request that did not name a provider
    odd = sim_cloud(options={"storage": {"nvme": 10000}})
    offer(broker.db, odd.provider_id)
    member = principal_of("a-member")
    job = broker.request(member)
    assert job.provider_id == broker.cloud.provider_id
    assert broker.server(job.server_id).booked["storage_gb.ssd"] == 20
    # asked for by name, it is refused with why, and nothing is held
    with pytest.raises(Invalid, match=r"no resource class for storage_gb\.nvme"):
        broker.request(member, provider=odd.name)
    assert used(broker.db, broker.estate, "a1") == 1
