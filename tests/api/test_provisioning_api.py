"""HTTP level: asking for servers, acting on them, jobs and their approval.

Requests go through the API as estate users (tests/fixtures/auth.py) against the provider of the
`broker` fixture (tests/fixtures/provisioning.py): a synced simulator, its catalog imported, custom
sizes offered up to 32 vCPU / 131072 MB, quota for agencies a and b on every class a server holds
(vCPU: a 100, a1 40, b 50). The test app runs each job inline once its request has committed. Who
may do what is the authorization matrix's business (tests/api/test_authorization_matrix.py).

A refused request is an RFC 9457 problem naming the field at fault and holds nothing: the quota
rows, the ledger, the jobs, the idempotency keys, the inventory and the audit log are exactly what
they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlmodel import select

from api.routers import provisioning
from broker.provisioning import service
from quotas import service as quotas
from quotas.models import Quota
from tests.api.answers import PROBLEM, ok, problem, table_rows
from tests.fixtures.db import TestDatabase
from tests.fixtures.provisioning import ADMIN, Broker

MISSING = str(uuid.UUID(int=0xDEAD))

# every table a server request or action may write, compared whole before and after a refusal
STATE_TABLES = (
    "job",
    "idempotency_key",
    "quota",
    "reservation",
    "allocation",
    "server",
    "inventory_host",
    "inventory_storage",
    "audit_event",
)


# --- helpers ----------------------------------------------------------------------------------


def accepted(resp: Any) -> dict[str, Any]:
    assert resp.status_code == 202, f"{resp.status_code}, not 202: {resp.text}"
    job: dict[str, Any] = resp.json()
    assert resp.headers["location"] == f"/api/v1/jobs/{job['id']}"
    return job


def database_state(db: TestDatabase) -> dict[str, list[tuple[Any, ...]]]:
    return table_rows(db, STATE_TABLES)


def held(db: TestDatabase, broker: Broker, code: str, rc: str = "vcpu") -> tuple[int, int]:
    """(committed, reserved) of `rc` on tenant `code`'s quota row."""
    with db.unit_of_work(write=False) as s:
        q = s.execute(
            select(Quota).where(
                Quota.tenant_id == broker.estate.tid(code), Quota.resource_class == rc
            )
        ).scalar_one()
        return q.committed, q.reserved


def job_count(db: TestDatabase) -> int:
    return int(db.connection.execute(text("SELECT count(*) FROM job")).scalar_one())


@pytest.fixture
def refs(broker: Broker) -> dict[str, str]:
    est = broker.estate
    return {code: str(est.tid(code)) for code in ("center", "a", "a1", "a2", "b", "b1")}


def server_body(refs: dict[str, str], **fields: Any) -> dict[str, Any]:
    """A request that succeeds as a-member: a small server in system a1."""
    return {
        "name": f"vm-{uuid.uuid4().hex[:6]}",
        "system_id": refs["a1"],
        "image": "centos-7.9",
        "flavor": "s1.small",
        **fields,
    }


def request(client: TestClient, body: dict[str, Any], key: str | None = None) -> Any:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post("/api/v1/servers", json=body, headers=headers)


@pytest.fixture
def member(clients: Any, broker: Broker) -> TestClient:
    return clients["a-member"]  # type: ignore[no-any-return]


# --- a request that succeeds ------------------------------------------------------------------


def test_a_request_is_accepted_and_its_job_builds_the_server(member, clients, broker, refs, db):
    job = accepted(request(member, server_body(refs, name="web-01")))
    assert job["kind"] == "create" and job["tenant_id"] == refs["a1"]
    done = ok(member.get(f"/api/v1/jobs/{job['id']}"))
    assert done["state"] == "succeeded", done["error"]
    server = ok(member.get(f"/api/v1/servers/{done['server_id']}"))
    assert server["name"] == "web-01"
    assert held(db, broker, "a1") == (1, 0)


# --- refused requests: a problem naming the field, nothing held -------------------------------


def refused(change: dict[str, Any], field: str, user: str = "a-member", *, id: str) -> Any:
    """A request changed by `change` that `user` sends; "{code}" in a system_id is the id of that
    tenant. The problem must name `field`."""
    return pytest.param(change, field, user, id=id)


# fmt: off
REFUSED_REQUESTS = [
    refused({"flavor": "s9.huge"}, "flavor", id="unknown flavor"),
    refused({"image": "beos-5"}, "image", id="unknown image"),
    refused({"network": "dmz"}, "network", id="unknown network"),
    refused({"disks": [{"size_gb": 10, "tier": "nvme"}]}, "disks.0.tier",
                 id="unknown disk tier"),
    refused({"disks": [{"size_gb": 10, "tier": "ssd"}, {"size_gb": 5000, "tier": "hdd"}]},
                 "disks.1.size_gb", id="disk larger than its tier allows"),
    refused({"flavor": None, "vcpu": 33, "memory_mb": 4096}, "vcpu",
                 id="custom vcpu above the bounds"),
    refused({"flavor": None, "vcpu": 2, "memory_mb": 262144}, "memory_mb",
                 id="custom memory above the bounds"),
    refused({"flavor": None, "vcpu": 2, "memory_mb": 256}, "memory_mb",
                 id="custom memory below the bounds"),
    refused({"vcpu": 2, "memory_mb": 4096}, "flavor", id="flavor and custom size"),
    refused({"flavor": None}, "flavor", id="neither flavor nor size"),
    refused({"flavor": None, "vcpu": 2}, "flavor", id="vcpu without memory"),
    refused({"bandwidth_mbps": 100}, "bandwidth_mbps", id="bandwidth without public ip"),
    refused({"system_id": "{b1}"}, "system_id", id="another agency's system"),
    refused({"system_id": "{b1}"}, "system_id", "a-admin",
                 id="another agency's system, as agency admin"),
    refused({"system_id": "{a2}"}, "system_id", id="a system outside the member's scope"),
    refused({"system_id": "{a}"}, "system_id", "a-admin", id="an agency, not a system"),
    refused({"system_id": "{center}"}, "system_id", "admin", id="the center, not a system"),
    refused({"system_id": MISSING}, "system_id", id="a system that exists nowhere"),
    refused({"name": "web/01"}, "name", id="name with a slash"),
    refused({"name": "-web"}, "name", id="name starting with a dash"),
    refused({"name": "x" * 64}, "name", id="name of 64 characters"),
    refused({"name": "web\u000101"}, "name", id="name with a control character"),
    refused({"name": ""}, "name", id="empty name"),
    refused({"provider": "elsewhere"}, "provider", id="a provider not offered"),
    refused({"region": "mars-1"}, "region", id="a region with no provider"),
    refused({"colour": "blue"}, "colour", id="an unknown field"),
]
# fmt: on


@pytest.mark.parametrize(("change", "field", "user"), REFUSED_REQUESTS)
def test_refused_request_names_the_field_and_holds_nothing(
    change, field, user, clients, broker, refs, db
):
    if "system_id" in change:
        change = {**change, "system_id": change["system_id"].format(**refs)}
    before = database_state(db)
    problem(request(clients[user], server_body(refs, **change)), 422, field)
    assert database_state(db) == before
    assert broker.cloud.driver.list_servers() == [], "nothing may reach the provider"


def test_simulator_name_rule_is_checked_before_anything_is_held(member, refs, db):
    """The name rule is the provider's (drivers/simulator.py); the 63-character limit holds."""
    accepted(request(member, server_body(refs, name="a" * 63)))
    before = database_state(db)
    body = problem(request(member, server_body(refs, name="a" * 64)), 422, "name")
    assert "63" in body["errors"][0]["message"]
    assert database_state(db) == before


def test_quota_exceeded_lists_every_shortfall_and_holds_nothing(member, broker, refs, db):
    with db.unit_of_work() as s:
        quotas.set_quota(s, ADMIN, broker.estate.tid("a1"), "vcpu", limit=2)
    before = database_state(db)
    body = problem(request(member, server_body(refs, flavor=None, vcpu=4, memory_mb=131072)), 409)
    assert body["type"] == "urn:govbroker:problem:quota-exceeded"
    short = {(s["resource_class"], s["tenant_code"]): s for s in body["shortfalls"]}
    assert set(short) == {("vcpu", "a1"), ("memory_mb", "a")}, body["shortfalls"]
    assert short[("vcpu", "a1")]["limit"] == 2 and short[("vcpu", "a1")]["requested"] == 4
    assert database_state(db) == before
    assert held(db, broker, "a1") == (0, 0)


# --- lifecycle actions ------------------------------------------------------------------------


@pytest.fixture
def running(broker: Broker, principal_of) -> str:  # type: ignore[no-untyped-def]
    """A server of a1 built through the service, running."""
    job = broker.request(principal_of("a-member"))
    assert job.state == "succeeded", job.error
    return str(job.server_id)


def test_actions_on_a_deleted_server_are_conflicts(member, running, db):
    deleting = accepted(member.delete(f"/api/v1/servers/{running}"))
    assert ok(member.get(f"/api/v1/jobs/{deleting['id']}"))["state"] == "succeeded"
    before = database_state(db)
    for action in ({"action": "start"}, {"action": "stop"}, {"action": "resize", "vcpu": 2}):
        problem(member.post(f"/api/v1/servers/{running}/actions", json=action), 409)
    problem(member.delete(f"/api/v1/servers/{running}"), 409)
    assert database_state(db) == before


@pytest.mark.parametrize(
    ("action", "field"),
    [
        ({"action": "attach_disk", "tier": "ssd"}, "size_gb"),
        ({"action": "attach_disk", "size_gb": 10}, "tier"),
        ({"action": "attach_disk", "size_gb": 10, "tier": "nvme"}, "tier"),
        ({"action": "detach_disk"}, "disk_id"),
        ({"action": "detach_disk", "disk_id": "no-such-disk"}, "disk_id"),
        ({"action": "release_public_ip"}, "ip"),
        ({"action": "release_public_ip", "ip": "203.0.113.99"}, "ip"),
        ({"action": "resize"}, "vcpu"),
        ({"action": "resize", "vcpu": 33}, "vcpu"),
        ({"action": "resize", "flavor": "s9.huge"}, "flavor"),
        ({"action": "resize", "flavor": "s1.large", "vcpu": 4}, "flavor"),
        ({"action": "hibernate"}, "action"),
    ],
    ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else v,
)
def test_action_missing_or_wrong_parameter_names_it_and_holds_nothing(
    action, field, member, running, db
):
    before = database_state(db)
    problem(member.post(f"/api/v1/servers/{running}/actions", json=action), 422, field)
    assert database_state(db) == before


def test_action_is_accepted_and_run(member, running, db):
    job = accepted(
        member.post(
            f"/api/v1/servers/{running}/actions",
            json={"action": "attach_disk", "size_gb": 10, "tier": "hdd"},
        )
    )
    done = ok(member.get(f"/api/v1/jobs/{job['id']}"))
    assert done["state"] == "succeeded", done["error"]
    assert done["grow"] == {"storage_gb.hdd": 10}


# --- idempotency ------------------------------------------------------------------------------


def test_same_key_and_body_replays_the_first_answer(member, broker, refs, db):
    body = server_body(refs)
    first = accepted(request(member, body, key="order-7781"))
    again = request(member, body, key="order-7781")
    replay = accepted(again)
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in request(member, server_body(refs), key="order-7782").headers
    assert replay["id"] == first["id"] and replay["server_id"] == first["server_id"]
    named = [s for s in broker.cloud.driver.list_servers() if s.name == body["name"]]
    assert len(named) == 1
    assert job_count(db) == 2  # order-7781 once, order-7782 once


def test_same_key_with_another_body_is_refused_naming_the_key(member, refs, db):
    body = server_body(refs)
    first = accepted(request(member, body, key="order-7781"))
    before = database_state(db)
    problem(
        request(member, {**body, "flavor": "s1.medium"}, key="order-7781"), 422, "Idempotency-Key"
    )
    assert database_state(db) == before
    # the key still answers for the body it was first used with
    assert accepted(request(member, body, key="order-7781"))["id"] == first["id"]


def test_a_key_is_the_callers_own(clients, broker, refs, db):
    """Another user sending the same key makes a request of its own, not a replay of someone
    else's answer."""
    body = server_body(refs)
    mine = accepted(request(clients["a-member"], body, key="k-1"))
    theirs = accepted(request(clients["a-admin"], body, key="k-1"))
    assert mine["id"] != theirs["id"]


# --- approval ---------------------------------------------------------------------------------


def test_a_large_request_waits_for_the_agency_admin_holding_its_quota(
    clients, member, broker, refs, db
):
    admin, a_admin = clients["admin"], clients["a-admin"]
    policy = ok(
        admin.put(f"/api/v1/agencies/{refs['a']}/provisioning-policy", json={"approval_vcpu": 2})
    )
    assert policy["approval_vcpu"] == 2
    # at the threshold: runs at once
    small = accepted(request(member, server_body(refs, flavor="s1.medium")))
    assert ok(member.get(f"/api/v1/jobs/{small['id']}"))["state"] == "succeeded"
    assert held(db, broker, "a1") == (2, 0)

    big = accepted(request(member, server_body(refs, flavor=None, vcpu=4, memory_mb=8192)))
    assert big["state"] == "pending_approval" and big["deadline"] is not None
    assert held(db, broker, "a1") == (2, 4), "the quota is held while the job waits"
    assert len(broker.cloud.driver.list_servers()) == 1
    # the member who asked cannot approve its own request
    before = database_state(db)
    problem(member.post(f"/api/v1/jobs/{big['id']}/approve", json={}), 403)
    assert database_state(db) == before
    approved = ok(a_admin.post(f"/api/v1/jobs/{big['id']}/approve", json={"reason": "budgeted"}))
    assert approved["decided_by"] == "a-admin"
    done = ok(member.get(f"/api/v1/jobs/{big['id']}"))
    assert done["state"] == "succeeded", done["error"]
    assert held(db, broker, "a1") == (6, 0)
    assert len(broker.cloud.driver.list_servers()) == 2
    # decided once
    problem(a_admin.post(f"/api/v1/jobs/{big['id']}/reject", json={}), 409)

    other = accepted(request(member, server_body(refs, flavor="s1.large")))
    assert other["state"] == "pending_approval"
    assert held(db, broker, "a1") == (6, 4)
    rejected = ok(
        a_admin.post(f"/api/v1/jobs/{other['id']}/reject", json={"reason": "use two smalls"})
    )
    assert rejected["state"] == "rejected" and rejected["error"] == "use two smalls"
    assert held(db, broker, "a1") == (6, 0), "a rejected request gives its quota back"
    assert held(db, broker, "a", "memory_mb") == (4096 + 8192, 0)
    problem(a_admin.post(f"/api/v1/jobs/{other['id']}/approve", json={}), 409)
    assert len(broker.cloud.driver.list_servers()) == 2


# --- jobs are listed in the caller's scope ----------------------------------------------------


def test_job_list_shows_only_the_callers_scope(clients, broker, refs):
    a_job = accepted(request(clients["a-member"], server_body(refs)))
    b_job = accepted(request(clients["b-member"], server_body(refs, system_id=refs["b1"])))
    a_seen = {j["id"] for j in ok(clients["a-member"].get("/api/v1/jobs"))["data"]}
    b_seen = {j["id"] for j in ok(clients["b-member"].get("/api/v1/jobs"))["data"]}
    assert a_seen == {a_job["id"]} and b_seen == {b_job["id"]}
    everything = {j["id"] for j in ok(clients["admin"].get("/api/v1/jobs"))["data"]}
    assert everything == {a_job["id"], b_job["id"]}
    problem(clients["b-member"].get(f"/api/v1/jobs/{a_job['id']}"), 404)
    problem(
        clients["b-member"].get("/api/v1/jobs", params={"tenant_id": refs["a1"]}), 422, "tenant_id"
    )
    filtered = ok(clients["admin"].get("/api/v1/jobs", params={"server_id": b_job["server_id"]}))
    assert [j["id"] for j in filtered["data"]] == [b_job["id"]]


# --- random bodies ----------------------------------------------------------------------------


@pytest.fixture
def tolerant(clients: Any, broker: Broker) -> Iterator[TestClient]:
    """a-admin, with server errors answered (500) rather than raised."""
    with TestClient(clients.app, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = clients["a-admin"].headers["Authorization"]
        yield c


SERVER_FIELDS = [
    "name", "system_id", "image", "flavor", "vcpu", "memory_mb", "network", "disks",
    "public_ip", "bandwidth_mbps", "provider", "region",
]  # fmt: skip
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


def plausible(refs: dict[str, str]) -> dict[str, st.SearchStrategy[Any]]:
    """Per field, values that pass some checks, so random bodies also reach the service."""
    disk = st.fixed_dictionaries(
        {
            "size_gb": st.integers(min_value=-1, max_value=70_000),
            "tier": st.sampled_from(["ssd", "hdd", "nvme", "SSD", ""]),
        }
    )
    return {
        "name": st.from_regex(r"[a-z0-9][a-z0-9._-]{0,70}", fullmatch=True)
        | st.sampled_from(["web/01", "-x", "网站", " ", "a\tb"]),
        "system_id": st.sampled_from([*refs.values(), MISSING, "not-a-uuid"]),
        "image": st.sampled_from(["centos-7.9", "kylin-v10-sp3", "windows-server-2019", "beos"]),
        "flavor": st.sampled_from(["s1.small", "s1.xlarge", "s9.huge", ""]) | st.none(),
        "vcpu": st.integers(min_value=-1, max_value=2000) | st.none(),
        "memory_mb": st.integers(min_value=0, max_value=300_000) | st.none(),
        "network": st.sampled_from(["default", "dmz"]) | st.none(),
        "disks": st.lists(disk, max_size=17),
        "public_ip": st.booleans(),
        "bandwidth_mbps": st.integers(min_value=-1, max_value=200_000) | st.none(),
        "provider": st.sampled_from(["elsewhere", ""]) | st.none(),
        "region": st.sampled_from(["cn-north", ""]) | st.none(),
    }


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_server_requests_never_get_a_server_error(data, tolerant, refs, db):
    """Junk, or the real field names with junk or plausible values: a 202 or a problem+json 4xx
    that held nothing, never a 5xx. Accepted requests use up quota; the rule holds throughout."""
    values = plausible(refs)
    shaped = st.fixed_dictionaries(
        {},
        optional={f: values[f] | JSON_VALUES for f in SERVER_FIELDS},
    )
    body = data.draw(JSON_VALUES | shaped, label="body")
    key = data.draw(st.none() | st.sampled_from(["k1", "k2", " ", "x" * 300]), label="key")
    before = database_state(db)
    resp = request(tolerant, body, key)
    assert resp.status_code < 500, f"{body!r} {key!r}: {resp.status_code} {resp.text}"
    if resp.status_code >= 400:
        assert resp.headers["content-type"].startswith(PROBLEM), resp.headers
        assert database_state(db) == before, f"{body!r}: refused but wrote"
    else:
        assert resp.status_code == 202, resp.text


# --- the catalog offered in a tenant ----------------------------------------------------------


def test_catalog_offered_in_a_system_lists_the_imported_items(member, broker, refs):
    offered = ok(member.get("/api/v1/catalog", params={"tenant_id": refs["a1"]}))
    assert [p["provider_id"] for p in offered] == [str(broker.cloud.provider_id)]
    codes = {(i["kind"], i["code"]) for i in offered[0]["items"]}
    assert {("flavor", "s1.small"), ("image", "centos-7.9"), ("size", "custom")} <= codes


def test_catalog_of_a_tenant_outside_any_agency_names_the_query_parameter(clients, refs):
    """The center is in no agency: the problem names the parameter the caller sent."""
    resp = clients["admin"].get("/api/v1/catalog", params={"tenant_id": refs["center"]})
    problem(resp, 422, "tenant_id")


class _Recorder:
    """A job runner that only notes what it was handed."""

    def __init__(self) -> None:
        self.handed: list[Any] = []
        self.done = threading.Event()

    def submit(self, job: Any) -> None:
        self.handed.append(job)
        self.done.set()


def test_a_request_cancelled_while_its_job_is_written_still_hands_the_job_over(monkeypatch):
    # a request task cancelled (client gone, shutdown) after its thread committed the job used to
    # drop it on the floor: claimed, never run, until the reconciler found it stale
    writing, written = threading.Event(), threading.Event()
    claimed = object()

    def request_server(db, principal, body, key=None):  # type: ignore[no-untyped-def]
        writing.set()
        assert written.wait(10)
        return service.Submitted(uuid.uuid4(), "queued", {}, False, claimed=claimed)  # type: ignore[arg-type]

    monkeypatch.setattr(service, "request_server", request_server)
    runner = _Recorder()

    async def cancel_mid_write() -> None:
        task = asyncio.create_task(provisioning.request_server(None, None, None, runner, None))  # type: ignore[arg-type]
        assert await asyncio.to_thread(writing.wait, 10)
        task.cancel()
        written.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.to_thread(runner.done.wait, 10)

    asyncio.run(cancel_mid_write())
    assert runner.handed == [claimed]
