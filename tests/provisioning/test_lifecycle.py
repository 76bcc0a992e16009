"""Create → resize up and down → stop/start → delete through the broker on the simulator, with
the quota ledger and the inventory checked after every step."""

from __future__ import annotations

from tests.fixtures.inventory import servers_of, used
from tests.fixtures.provisioning import Broker


def test_create_resize_power_cycle_delete_keeps_quota_and_inventory_in_step(
    broker: Broker, principal_of
) -> None:  # type: ignore[no-untyped-def]
    member = principal_of("a-member")
    est = broker.estate
    job = broker.request(member, flavor=None, vcpu=2, memory_mb=4096)
    assert job.state == "succeeded", job.error
    sid = job.server_id
    row = broker.server(sid)
    assert row.tenant_id == est.tid("a1") and row.power_state == "running"
    assert row.booked["vcpu"] == 2 and row.booked["memory_mb"] == 4096
    assert used(broker.db, est, "a1") == 2 and used(broker.db, est, "a", "memory_mb") == 4096
    assert row.external_id in servers_of(broker.db, broker.cloud.provider_id)
    at_provider = broker.cloud.driver.get_server(row.external_id)
    assert at_provider.request_tag == job.request_tag and at_provider.owner_tag == "a/a1"

    job = broker.act(member, sid, "resize", vcpu=4, memory_mb=8192)
    assert job.state == "succeeded", job.error
    assert job.grow == {"vcpu": 2, "memory_mb": 4096} and job.shrink == {}
    assert used(broker.db, est, "a1") == 4 and used(broker.db, est, "a", "memory_mb") == 8192
    assert broker.cloud.driver.get_server(row.external_id).vcpu == 4

    job = broker.act(member, sid, "resize", vcpu=1, memory_mb=2048)
    assert job.state == "succeeded", job.error
    assert job.shrink == {"vcpu": 3, "memory_mb": 6144}
    assert used(broker.db, est, "a1") == 1 and used(broker.db, est, "a", "memory_mb") == 2048
    assert broker.server(sid).booked["vcpu"] == 1

    assert broker.act(member, sid, "stop").state == "succeeded"
    assert broker.server(sid).power_state == "stopped"
    assert broker.act(member, sid, "start").state == "succeeded"
    assert broker.server(sid).power_state == "running"
    assert used(broker.db, est, "a1") == 1

    job = broker.act(member, sid, "delete")
    assert job.state == "succeeded", job.error
    gone = broker.server(sid)
    assert gone.gone_at is not None and gone.booked == {}
    assert used(broker.db, est, "a1") == 0 and used(broker.db, est, "a", "memory_mb") == 0
    assert used(broker.db, est, "a", "instances") == 0
    assert broker.cloud.driver.list_servers() == []
    assert broker.events(sid) == [
        "created",
        "resized",
        "resized",
        "stopped",
        "started",
        "deleted",
    ]
