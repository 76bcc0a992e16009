"""HTTP level: providers, service companies, the inventory they report and its servers.

Everything here acts as the center administrator (who may do all of it): who may do what is the
authorization matrix's business (tests/api/test_authorization_matrix.py). Providers are simulators
(tests/fixtures/inventory.py). A refused write is an RFC 9457 problem naming the field at fault,
and leaves the database exactly as it was: inventory rows, the quota ledger and the audit log.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlmodel import select

from broker.audit.models import AuditEvent
from broker.core.authz import Principal
from broker.inventory import providers, sync
from broker.inventory.models import Provider
from quotas import service as quotas
from tests.api.answers import ok, problem, table_rows
from tests.fixtures.auth import Estate
from tests.fixtures.db import TestDatabase
from tests.fixtures.inventory import MakeCloud, SimCloud

MISSING = str(uuid.UUID(int=0xDEAD))
SYSTEM = Principal.system("test-inventory-api")

# every table a request of this domain may write, compared whole before and after a refusal
STATE_TABLES = (
    "service_company",
    "provider",
    "sync_run",
    "inventory_host",
    "inventory_storage",
    "inventory_network",
    "server",
    "quota",
    "reservation",
    "allocation",
    "audit_event",
)


# --- helpers ----------------------------------------------------------------------------------


def database_state(db: TestDatabase) -> dict[str, list[tuple[Any, ...]]]:
    return table_rows(db, STATE_TABLES)


def events(db: TestDatabase, action: str) -> list[AuditEvent]:
    with db.unit_of_work(write=False) as s:
        stmt = select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)
        return list(s.execute(stmt).scalars())


def provider_body(name: str, **fields: Any) -> dict[str, Any]:
    """A simulator provider with its own in-memory cloud (nothing shared, nothing to clean up)."""
    return {
        "kind": "simulator",
        "name": name,
        "endpoint": f"sim://{name}",
        "credentials": {"username": "ops", "password": f"pw-of-{name}"},
        **fields,
    }


def names(page: dict[str, Any]) -> set[str]:
    return {s["name"] for s in page["data"]}


@pytest.fixture
def admin(clients: Any) -> TestClient:
    return clients["admin"]  # type: ignore[no-any-return]


@pytest.fixture
def adopt_estate(db: TestDatabase, quota_estate: Estate) -> Estate:
    """The quota estate plus memory, instance and storage limits for both agencies: a server holds
    every one of those classes, and a class without a limit at the agency does not fit at all."""
    with db.unit_of_work() as s:
        for code in ("a", "b"):
            for rc in ("storage_gb.ssd", "storage_gb.hdd", "memory_mb", "instances"):
                quotas.set_quota(s, SYSTEM, quota_estate.tid(code), rc, limit=100_000)
    return quota_estate


def synced(db: TestDatabase, cloud: SimCloud) -> sync.Outcome:
    outcome = sync.sync_provider(db, cloud.provider_id)
    assert outcome.status == "ok", outcome.error
    return outcome


# --- registering providers and service companies ----------------------------------------------


def test_registering_a_provider_answers_with_credential_fields_never_their_values(admin, db):
    company = ok(
        admin.post(
            "/api/v1/service-companies",
            json={
                "code": "cloud-co",
                "name_zh": "某某云计算有限公司",
                "credit_code": "91110000MA01ABCD1X",
                "contact": "张三 010-12345678",
            },
        ),
        201,
    )
    password = "Pw-only-in-the-request-0001"
    resp = admin.post(
        "/api/v1/providers",
        json=provider_body(
            "sim-north",
            region="north",
            credentials={"username": "ops", "password": password},
            service_company_id=company["id"],
            overcommit={"vcpu": "4.0", "memory_mb": 1.25},
            sync_interval_s=900,
            adopt_by_owner=False,
        ),
    )
    created = ok(resp, 201)

    assert password not in resp.text and "credentials" not in created
    assert created["credential_fields"] == ["password", "username"]
    assert {k: created[k] for k in ("kind", "name", "region", "endpoint")} == {
        "kind": "simulator",
        "name": "sim-north",
        "region": "north",
        "endpoint": "sim://sim-north",
    }
    assert created["service_company_id"] == company["id"]
    assert (created["sync_interval_s"], created["adopt_by_owner"], created["enabled"]) == (
        900,
        False,
        True,
    )
    assert created["last_sync_at"] is None and created["last_sync_status"] is None
    # ratios travel as decimal strings, never as binary floats
    assert all(isinstance(v, str) for v in created["overcommit"].values())
    assert {k: Decimal(v) for k, v in created["overcommit"].items()} == {
        "vcpu": Decimal(4),
        "memory_mb": Decimal("1.25"),
    }
    fetched = admin.get(f"/api/v1/providers/{created['id']}")
    assert ok(fetched) == created and password not in fetched.text
    listed = admin.get("/api/v1/providers")
    assert [p for p in ok(listed) if p["id"] == created["id"]] == [created]
    assert password not in listed.text
    assert created in ok(admin.get("/api/v1/providers", params={"kind": "simulator"}))
    assert created not in ok(admin.get("/api/v1/providers", params={"kind": "openstack"}))
    assert created not in ok(admin.get("/api/v1/providers", params={"enabled": False}))
    [event] = events(db, "provider.create")
    assert event.after is not None and event.after["name"] == "sim-north"
    assert password not in repr(event.after)
    assert ok(admin.get(f"/api/v1/service-companies/{company['id']}")) == company
    assert company in ok(admin.get("/api/v1/service-companies"))


def test_a_service_company_is_edited_field_by_field(admin, db):
    company = ok(
        admin.post("/api/v1/service-companies", json={"code": "co-1", "name_zh": "甲公司"}), 201
    )

    edited = ok(
        admin.patch(
            f"/api/v1/service-companies/{company['id']}",
            json={"name_en": "Jia Co.", "contact": "李四"},
        )
    )

    assert (edited["code"], edited["name_zh"], edited["name_en"], edited["contact"]) == (
        "co-1",
        "甲公司",
        "Jia Co.",
        "李四",
    )
    cleared = ok(admin.patch(f"/api/v1/service-companies/{company['id']}", json={"name_en": None}))
    assert cleared["name_en"] is None and cleared["contact"] == "李四"
    [_, last] = events(db, "service_company.update")
    assert last.before == {**last.after, "name_en": "Jia Co."}  # type: ignore[dict-item]


def test_check_answers_a_refusal_and_patched_credentials_replace_the_stored_ones(admin, db):
    """A provider refusing the credentials is the answer to a check (200, ok false, the
    provider's words), not an error of the request."""
    body = provider_body(
        "sim-check",
        credentials={"username": "ops", "password": "wrong-pass"},
        options={"accept_credentials": {"username": "ops", "password": "right-pass"}},
    )
    pid = ok(admin.post("/api/v1/providers", json=body), 201)["id"]

    def check() -> dict[str, Any]:
        return ok(admin.post(f"/api/v1/providers/{pid}/check"))  # type: ignore[no-any-return]

    refused = check()
    assert refused["ok"] is False and refused["error_type"] == "Unauthorized"
    assert refused["error"].startswith("401 Unauthorized")
    assert isinstance(refused["latency_ms"], int) and refused["latency_ms"] >= 0
    # a PATCH that leaves credentials out keeps them
    ok(admin.patch(f"/api/v1/providers/{pid}", json={"region": "east"}))
    assert check()["ok"] is False

    resp = admin.patch(
        f"/api/v1/providers/{pid}",
        json={"credentials": {"username": "ops", "password": "right-pass"}},
    )
    assert ok(resp)["credential_fields"] == ["password", "username"]
    assert "credentials" not in resp.json()
    accepted = check()
    assert accepted["ok"] is True and accepted["error"] is None and accepted["error_type"] is None

    # replaced as a whole, not merged: nothing of the username and password is left
    patched = ok(admin.patch(f"/api/v1/providers/{pid}", json={"credentials": {"token": "t0k"}}))
    assert patched["credential_fields"] == ["token"]
    with db.unit_of_work(write=False) as s:
        row = s.get(Provider, uuid.UUID(pid))
        assert row is not None and providers.credentials_of(row) == {"token": "t0k"}
    assert check()["ok"] is False

    checks = events(db, "provider.check")
    assert [(e.after or {}).get("ok") for e in checks] == [False, False, True, False]
    assert len(events(db, "provider.update")) == 3


def test_a_disabled_provider_refuses_sync_with_409_until_enabled_again(admin, db, sim_cloud):
    cloud = sim_cloud()
    cloud.spawn()
    pid = str(cloud.provider_id)

    assert ok(admin.patch(f"/api/v1/providers/{pid}", json={"enabled": False}))["enabled"] is False
    assert pid in {p["id"] for p in ok(admin.get("/api/v1/providers", params={"enabled": False}))}
    assert pid not in {
        p["id"] for p in ok(admin.get("/api/v1/providers", params={"enabled": True}))
    }
    before = database_state(db)
    refused = problem(admin.post(f"/api/v1/providers/{pid}/sync"), 409)
    assert "disabled" in refused["detail"] and refused["enabled"] is False
    assert database_state(db) == before

    assert ok(admin.patch(f"/api/v1/providers/{pid}", json={"enabled": True}))["enabled"] is True
    run = ok(admin.post(f"/api/v1/providers/{pid}/sync"))
    assert run["status"] == "ok" and run["counts"]["servers_new"] == 1


# --- sync through the API ---------------------------------------------------------------------


def test_sync_answers_with_the_run_and_its_counts(clock, admin, db, sim_cloud):
    cloud = sim_cloud()
    spawned = [cloud.spawn() for _ in range(3)]
    pid = str(cloud.provider_id)

    first = ok(admin.post(f"/api/v1/providers/{pid}/sync"))

    assert (first["provider_id"], first["status"], first["trigger"]) == (pid, "ok", "api")
    assert first["error"] is None and first["finished_at"] is not None
    assert isinstance(first["duration_ms"], int)
    counts = first["counts"]
    assert (counts["servers_new"], counts["servers_seen"], counts["hosts"]) == (3, 3, 2)
    assert counts["storage"] == 2 and counts["networks"] == 1

    cloud.driver.delete(spawned[0].external_id)
    clock.shift(timedelta(minutes=5))
    second = ok(admin.post(f"/api/v1/providers/{pid}/sync"))

    assert second["counts"]["servers_gone"] == 1 and second["id"] != first["id"]
    runs = ok(admin.get(f"/api/v1/providers/{pid}/sync-runs"))
    assert [r["id"] for r in runs] == [second["id"], first["id"]]
    assert runs[1] == first
    assert [r["id"] for r in ok(admin.get(f"/api/v1/providers/{pid}/sync-runs?limit=1"))] == [
        second["id"]
    ]
    provider = ok(admin.get(f"/api/v1/providers/{pid}"))
    assert provider["last_sync_status"] == "ok"
    assert provider["last_sync_at"] == second["finished_at"]
    hosts = ok(admin.get("/api/v1/inventory/hosts", params={"provider_id": pid}))
    assert sorted(h["name"] for h in hosts) == ["sim-host-01", "sim-host-02"]
    assert all(h["capacity"]["vcpu"] == 64 and h["gone_at"] is None for h in hosts)
    pools = ok(admin.get("/api/v1/inventory/storage", params={"provider_id": pid}))
    assert sorted(p["tier"] for p in pools) == ["hdd", "ssd"]
    assert ok(admin.get("/api/v1/inventory/hosts", params={"provider_id": MISSING})) == []


def test_a_provider_failing_during_sync_is_a_failed_run_not_an_http_error(admin, db, sim_cloud):
    cloud = sim_cloud(options={"fail_operations": {"list_servers": "unavailable"}})
    cloud.spawn()
    pid = str(cloud.provider_id)

    run = ok(admin.post(f"/api/v1/providers/{pid}/sync"))

    assert run["status"] == "failed" and "Unavailable" in run["error"]
    provider = ok(admin.get(f"/api/v1/providers/{pid}"))
    assert provider["last_sync_status"] == "failed"
    assert provider["last_sync_error"] == run["error"]
    assert ok(admin.get("/api/v1/servers", params={"provider_id": pid}))["data"] == []
    [event] = events(db, "provider.sync")
    assert event.after is not None and event.after["status"] == "failed"


# --- the server list ----------------------------------------------------------------------------


@dataclass
class Fleet:
    north: SimCloud
    south: SimCloud
    ids: dict[str, str]  # server name → id


PRESENT = {"app-a1", "app-a2", "app-b1", "legacy-x", "legacy-y", "db-a1"}


@pytest.fixture
def fleet(db: TestDatabase, adopt_estate: Estate, sim_cloud: MakeCloud) -> Fleet:
    """Two providers. north: app-a1, app-a2 and app-b1 owned (by tag) by systems a1, a2 and b1,
    legacy-x and legacy-y unmanaged; south: db-a1 owned by a1. Then, out of band: app-a1 is
    resized (drift), legacy-y stopped, and old-a1 (owned by a1) deleted (gone)."""
    north, south = sim_cloud(), sim_cloud()
    made = {
        name: north.spawn(name=name, owner=owner)
        for name, owner in (
            ("app-a1", "a/a1"),
            ("app-a2", "a/a2"),
            ("app-b1", "b/b1"),
            ("legacy-x", None),
            ("legacy-y", None),
            ("old-a1", "a1"),
        )
    }
    south.spawn(name="db-a1", owner="a1")
    synced(db, north)
    synced(db, south)
    north.driver.resize(made["app-a1"].external_id, vcpu=4, memory_mb=4096)
    north.driver.stop(made["legacy-y"].external_id)
    north.driver.delete(made["old-a1"].external_id)
    synced(db, north)
    with db.unit_of_work(write=False) as s:
        rows = s.execute(text("SELECT name, id FROM server")).all()
    return Fleet(north, south, {name: str(uuid.UUID(str(sid))) for name, sid in rows})


def test_server_list_filters(fleet, admin, estate):
    north, south = str(fleet.north.provider_id), str(fleet.south.provider_id)
    t = {code: str(estate.tid(code)) for code in ("a", "a1", "b")}
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({}, PRESENT),
        # a tenant's servers are its own and its descendants'
        ({"tenant_id": t["a"]}, {"app-a1", "app-a2", "db-a1"}),
        ({"tenant_id": t["a1"]}, {"app-a1", "db-a1"}),
        ({"tenant_id": t["b"]}, {"app-b1"}),
        ({"provider_id": south}, {"db-a1"}),
        ({"provider_id": MISSING}, set()),
        ({"power_state": "stopped"}, {"legacy-y"}),
        ({"power_state": "running"}, PRESENT - {"legacy-y"}),
        ({"managed": "true"}, {"app-a1", "app-a2", "app-b1", "db-a1"}),
        ({"managed": "false"}, {"legacy-x", "legacy-y"}),
        ({"drift": "true"}, {"app-a1"}),
        ({"drift": "false"}, PRESENT - {"app-a1"}),
        ({"include_gone": "true"}, PRESENT | {"old-a1"}),
        ({"include_gone": "true", "tenant_id": t["a1"]}, {"app-a1", "db-a1", "old-a1"}),
        ({"q": "legacy"}, {"legacy-x", "legacy-y"}),
        ({"q": "-a"}, {"app-a1", "app-a2", "db-a1"}),
        # LIKE wildcards in q are literal characters
        ({"q": "p_-"}, set()),
        ({"q": "%"}, set()),
        ({"tenant_id": t["a"], "drift": "false", "provider_id": north}, {"app-a2"}),
    ]
    wrong = []
    for params, expected in cases:
        got = names(ok(admin.get("/api/v1/servers", params=params)))
        if got != expected:
            wrong.append((params, sorted(got), sorted(expected)))
    assert wrong == []


def test_server_search_ignores_case_alike_on_every_backend(fleet, admin):
    """People type names as they remember them: like the user list's q, a server search must not
    depend on case — and must not answer differently on SQLite (LIKE ignores ASCII case) and
    PostgreSQL (LIKE respects it)."""
    assert names(ok(admin.get("/api/v1/servers", params={"q": "LEGACY"}))) == {
        "legacy-x",
        "legacy-y",
    }
    assert names(ok(admin.get("/api/v1/servers", params={"q": "App-A"}))) == {"app-a1", "app-a2"}


def test_the_managed_flag_agrees_with_the_managed_filter(fleet, admin):
    """old-a1 was owned by a1 and is gone (its quota given back): listing managed=true must not
    return a server that itself says managed=false, nor the other way round."""
    for managed in (True, False):
        rows = ok(
            admin.get(
                "/api/v1/servers",
                params={"managed": str(managed).lower(), "include_gone": "true"},
            )
        )["data"]
        assert rows and {(r["name"], r["managed"]) for r in rows} == {
            (r["name"], managed) for r in rows
        }


def test_servers_show_drift_ownership_and_departure(fleet, admin, estate):
    resized = ok(admin.get(f"/api/v1/servers/{fleet.ids['app-a1']}"))
    assert resized["tenant_id"] == str(estate.tid("a1")) and resized["managed"] is True
    assert (resized["vcpu"], resized["memory_mb"]) == (4, 4096)
    assert resized["booked"]["vcpu"] == 1 and resized["drift_at"] is not None
    assert resized["drift"]["size"]["before"]["vcpu"] == 1
    assert resized["drift"]["size"]["after"]["vcpu"] == 4
    loose = ok(admin.get(f"/api/v1/servers/{fleet.ids['legacy-y']}"))
    assert loose["tenant_id"] is None and loose["managed"] is False and loose["booked"] == {}
    assert loose["power_state"] == "stopped"
    gone = ok(admin.get(f"/api/v1/servers/{fleet.ids['old-a1']}"))
    assert gone["gone_at"] is not None and gone["booked"] == {}
    problem(admin.get(f"/api/v1/servers/{MISSING}"), 404)


def test_server_list_pages_through_every_server_exactly_once(fleet, admin):
    for params in ({"include_gone": "true"}, {"managed": "true"}, {"q": "a"}):
        whole = ok(admin.get("/api/v1/servers", params=params))
        assert whole["next_cursor"] is None
        seen: list[str] = []
        cursor: str | None = None
        while True:
            page = ok(
                admin.get(
                    "/api/v1/servers",
                    params={**params, "limit": 1} | ({"cursor": cursor} if cursor else {}),
                )
            )
            if page["next_cursor"] is not None:
                assert page["count"] == 1, page
            seen += [s["id"] for s in page["data"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [s["id"] for s in whole["data"]] and len(seen) == whole["count"] > 1


# --- capacity -----------------------------------------------------------------------------------


def lines_of(capacity: dict[str, Any]) -> dict[str, tuple[int, int, int, Decimal]]:
    """{class: (physical, allocated, effective, overcommit)}; ratios arrive as decimal strings."""
    out = {}
    for line in capacity["lines"]:
        assert isinstance(line["overcommit"], str), line
        out[line["resource_class"]] = (
            line["physical"],
            line["allocated"],
            line["effective"],
            Decimal(line["overcommit"]),
        )
    return out


def test_capacity_per_provider_and_in_total_applies_the_overcommit(admin, db, sim_cloud):
    """north's own ratios (vcpu 4.0, memory 1.5) win over what its hypervisor reports (vcpu 2.0);
    south has none and keeps its hypervisor's (vcpu 1.25); a disabled provider counts nowhere.
    Effective capacity is physical × ratio, rounded down host by host."""
    north = sim_cloud(
        options={
            "hosts": [
                {"name": "n1", "vcpu": 10, "memory_mb": 1000},
                {"name": "n2", "vcpu": 7, "memory_mb": 999},
            ],
            "storage": {"ssd": 100},
            "overcommit": {"vcpu": 2.0},
        },
        overcommit={"vcpu": Decimal("4.0"), "memory_mb": Decimal("1.5")},
    )
    south = sim_cloud(
        options={
            "hosts": [{"name": "s1", "vcpu": 8, "memory_mb": 512}],
            "storage": {"ssd": 50, "hdd": 10},
            "overcommit": {"vcpu": 1.25},
        }
    )
    spare = sim_cloud(options={"hosts": [{"name": "x1", "vcpu": 100, "memory_mb": 100}]})
    server = north.spawn(vcpu=3, memory_mb=256)
    disk = sum(d.size_gb for d in server.disks if d.tier == "ssd")
    for cloud in (north, south, spare):
        synced(db, cloud)
    ok(admin.patch(f"/api/v1/providers/{spare.provider_id}", json={"enabled": False}))

    caps = ok(admin.get("/api/v1/inventory/capacity"))

    assert caps[-1]["provider_id"] is None and caps[-1]["provider_name"] is None
    by_name = {c["provider_name"]: c for c in caps}
    assert set(by_name) == {north.name, south.name, None}
    assert (by_name[north.name]["hosts"], by_name[south.name]["hosts"], caps[-1]["hosts"]) == (
        2,
        1,
        3,
    )
    assert lines_of(by_name[north.name]) == {
        "vcpu": (17, 3, 68, Decimal(4)),
        # 1000 × 1.5 + ⌊999 × 1.5⌋
        "memory_mb": (1999, 256, 2998, Decimal("1.50")),
        "storage_gb.ssd": (100, disk, 100, Decimal(1)),
    }
    assert lines_of(by_name[south.name]) == {
        "vcpu": (8, 0, 10, Decimal("1.25")),
        "memory_mb": (512, 0, 512, Decimal(1)),
        "storage_gb.ssd": (50, 0, 50, Decimal(1)),
        "storage_gb.hdd": (10, 0, 10, Decimal(1)),
    }
    assert lines_of(caps[-1]) == {
        "vcpu": (25, 3, 78, Decimal("3.12")),
        "memory_mb": (2511, 256, 3510, Decimal("1.40")),
        "storage_gb.ssd": (150, disk, 150, Decimal(1)),
        "storage_gb.hdd": (10, 0, 10, Decimal(1)),
    }

    only_north = ok(
        admin.get("/api/v1/inventory/capacity", params={"provider_id": north.provider_id})
    )
    assert [c["provider_name"] for c in only_north] == [north.name, None]
    assert lines_of(only_north[1]) == lines_of(by_name[north.name])

    # a changed ratio applies at once, no sync needed: ⌊10 × 2.5⌋ + ⌊7 × 2.5⌋ = 25 + 17
    ok(admin.patch(f"/api/v1/providers/{north.provider_id}", json={"overcommit": {"vcpu": "2.5"}}))
    north_now = ok(
        admin.get("/api/v1/inventory/capacity", params={"provider_id": north.provider_id})
    )
    assert lines_of(north_now[0])["vcpu"] == (17, 3, 42, Decimal("2.47"))
    # without a ratio of its own, the provider's hypervisors are believed (vcpu 2.0)
    ok(admin.patch(f"/api/v1/providers/{north.provider_id}", json={"overcommit": {}}))
    north_now = ok(
        admin.get("/api/v1/inventory/capacity", params={"provider_id": north.provider_id})
    )
    assert lines_of(north_now[0])["vcpu"] == (17, 3, 34, Decimal(2))
    assert lines_of(north_now[0])["memory_mb"] == (1999, 256, 1999, Decimal(1))


# --- adopting -----------------------------------------------------------------------------------


def quota_used(admin: TestClient, tenant_id: uuid.UUID, rc: str = "vcpu") -> int:
    q = ok(admin.get(f"/api/v1/quotas/{tenant_id}/{rc}"))
    return int(q["committed"]) + int(q["reserved"])


def test_adopting_counts_the_server_and_refuses_what_does_not_fit_unless_forced(
    admin, db, adopt_estate, sim_cloud
):
    cloud = sim_cloud()
    small, big = cloud.spawn(name="small", vcpu=2), cloud.spawn(name="big", vcpu=45)
    gone = cloud.spawn(name="gone", vcpu=1)
    synced(db, cloud)
    cloud.driver.delete(gone.external_id)
    synced(db, cloud)
    ids = {s["name"]: s["id"] for s in ok(admin.get("/api/v1/servers?include_gone=true"))["data"]}
    a1 = adopt_estate.tid("a1")

    adopted = ok(admin.post(f"/api/v1/servers/{ids['small']}/adopt", json={"tenant_id": str(a1)}))

    assert adopted["tenant_id"] == str(a1) and adopted["managed"] is True
    assert adopted["booked"]["vcpu"] == 2 and adopted["booked"]["instances"] == 1
    assert adopted["adopted_at"] is not None
    assert quota_used(admin, a1) == 2
    assert small.external_id == adopted["external_id"]

    # a1's own vcpu limit is 40: 2 used + 45 asked
    before = database_state(db)
    refused = problem(
        admin.post(f"/api/v1/servers/{ids['big']}/adopt", json={"tenant_id": str(a1)}), 409
    )
    assert refused["type"] == "urn:govbroker:problem:quota-exceeded"
    [short] = [
        s
        for s in refused["shortfalls"]
        if (s["resource_class"], s["tenant_code"]) == ("vcpu", "a1")
    ]
    assert (short["limit"], short["usage"], short["requested"], short["shortfall"]) == (
        40,
        2,
        45,
        7,
    )
    assert "vcpu" in refused["detail"]
    assert database_state(db) == before
    assert ok(admin.get(f"/api/v1/servers/{ids['big']}"))["tenant_id"] is None

    forced = ok(
        admin.post(
            f"/api/v1/servers/{ids['big']}/adopt",
            json={"tenant_id": str(a1), "force": True, "reason": "legacy tax system"},
        )
    )
    assert forced["managed"] is True and forced["booked"]["vcpu"] == 45 == big.vcpu
    assert quota_used(admin, a1) == 47
    event = events(db, "server.adopt")[-1]
    assert event.after is not None and event.after["forced"] is True
    assert event.after["reason"] == "legacy tax system" and event.after["over_limit"]

    # counted once only; and what is gone from its provider cannot be taken in
    before = database_state(db)
    b1 = str(adopt_estate.tid("b1"))
    problem(admin.post(f"/api/v1/servers/{ids['small']}/adopt", json={"tenant_id": b1}), 409)
    gone_refused = problem(
        admin.post(f"/api/v1/servers/{ids['gone']}/adopt", json={"tenant_id": b1}), 409
    )
    assert "gone" in gone_refused["detail"]
    assert database_state(db) == before


# --- bad input ----------------------------------------------------------------------------------


@pytest.fixture
def refs(admin: TestClient, estate: Estate) -> dict[str, Any]:
    """Two providers (sim-one, sim-two) and a service company (co-1) to edit and collide with."""
    co = ok(
        admin.post("/api/v1/service-companies", json={"code": "co-1", "name_zh": "甲公司"}), 201
    )
    p1 = ok(admin.post("/api/v1/providers", json=provider_body("sim-one")), 201)
    ok(admin.post("/api/v1/providers", json=provider_body("sim-two")), 201)
    return {
        "p": p1["id"],
        "co": co["id"],
        "a1": str(estate.tid("a1")),
        "missing": MISSING,
    }


def fill(value: Any, refs: dict[str, Any]) -> Any:
    if isinstance(value, str):
        return value.format(**refs)
    if isinstance(value, dict):
        return {k: fill(v, refs) for k, v in value.items()}
    return value


NEW = provider_body("sim-new")


def new(**fields: Any) -> dict[str, Any]:
    return {**NEW, **fields}


@dataclass(frozen=True)
class Bad:
    method: str
    path: str
    body: Any
    status: int
    field: str


# fmt: off
BAD_INPUT = [
    Bad("POST", "/api/v1/providers", new(kind="hyperv"), 422, "kind"),
    Bad("POST", "/api/v1/providers", new(kind="openstack"), 422, "endpoint"),
    Bad("POST", "/api/v1/providers", new(kind="vmware", endpoint="vcenter.example.gov.cn"), 422,
        "endpoint"),
    Bad("POST", "/api/v1/providers", new(kind="libvirt", endpoint="kvm-host-01"), 422, "endpoint"),
    Bad("POST", "/api/v1/providers", new(endpoint="https://sim.example.gov.cn"), 422, "endpoint"),
    Bad("POST", "/api/v1/providers", new(overcommit={"vcpu": "0.99"}), 422, "overcommit.vcpu"),
    Bad("POST", "/api/v1/providers", new(overcommit={"vcpu": 0}), 422, "overcommit.vcpu"),
    Bad("POST", "/api/v1/providers", new(overcommit={"vcpu": "64.01"}), 422, "overcommit.vcpu"),
    Bad("POST", "/api/v1/providers", new(overcommit={"vcpu": 65}), 422, "overcommit.vcpu"),
    Bad("POST", "/api/v1/providers", new(overcommit={"memory_mb": "1.255"}), 422,
        "overcommit.memory_mb"),
    Bad("POST", "/api/v1/providers", new(overcommit={"vcpu": "lots"}), 422, "overcommit.vcpu"),
    Bad("POST", "/api/v1/providers", new(sync_interval_s=59), 422, "sync_interval_s"),
    Bad("POST", "/api/v1/providers", new(sync_interval_s=86401), 422, "sync_interval_s"),
    Bad("POST", "/api/v1/providers", new(secret="x"), 422, "secret"),
    Bad("POST", "/api/v1/providers", new(credential={"password": "x"}), 422, "credential"),
    Bad("POST", "/api/v1/providers", new(name="sim new"), 422, "name"),
    Bad("POST", "/api/v1/providers", new(name="sim\x00new"), 422, "name"),
    Bad("POST", "/api/v1/providers", new(region="north\x00"), 422, "region"),
    Bad("POST", "/api/v1/providers", new(credentials={"password": "pw\x00"}), 422, "credentials"),
    Bad("POST", "/api/v1/providers", new(options={"note": "a\x00b"}), 422, "options"),
    Bad("POST", "/api/v1/providers", new(service_company_id="{missing}"), 422,
        "service_company_id"),
    Bad("POST", "/api/v1/providers", new(service_company_id="co-1"), 422, "service_company_id"),
    Bad("POST", "/api/v1/providers", new(name="sim-one"), 409, "name"),
    Bad("PATCH", "/api/v1/providers/{p}", {"name": "sim-two"}, 409, "name"),
    # the valid new credentials in a refused PATCH must not be stored either
    Bad("PATCH", "/api/v1/providers/{p}", {"credentials": {"token": "new"}, "name": "sim-two"},
        409, "name"),
    Bad("PATCH", "/api/v1/providers/{p}", {"credentials": {"token": "new"}, "sync_interval_s": 1},
        422, "sync_interval_s"),
    Bad("PATCH", "/api/v1/providers/{p}", {"enabled": None}, 422, "enabled"),
    Bad("PATCH", "/api/v1/providers/{p}", {"credentials": None}, 422, "credentials"),
    Bad("PATCH", "/api/v1/providers/{p}", {"kind": "openstack"}, 422, "kind"),
    Bad("PATCH", "/api/v1/providers/{p}", {"credentials_enc": "gAAAA"}, 422, "credentials_enc"),
    Bad("PATCH", "/api/v1/providers/{p}", {"endpoint": "https://sim.example"}, 422, "endpoint"),
    Bad("PATCH", "/api/v1/providers/{p}", {"overcommit": {"vcpu": "100"}}, 422,
        "overcommit.vcpu"),
    Bad("PATCH", "/api/v1/providers/{p}", {"sync_interval_s": 0}, 422, "sync_interval_s"),
    Bad("PATCH", "/api/v1/providers/{p}", {"service_company_id": "{missing}"}, 422,
        "service_company_id"),
    Bad("PATCH", "/api/v1/providers/{p}", {"region": "\x00"}, 422, "region"),
    Bad("PATCH", "/api/v1/providers/not-an-id", {"region": "east"}, 422, "provider_id"),
    Bad("POST", "/api/v1/providers/not-an-id/sync", None, 422, "provider_id"),
    Bad("POST", "/api/v1/service-companies", {"code": "co-1", "name_zh": "重复"}, 409, "code"),
    Bad("POST", "/api/v1/service-companies", {"code": "co-2", "name_zh": "乙", "fax": "1"}, 422,
        "fax"),
    Bad("POST", "/api/v1/service-companies", {"code": "co-2", "name_zh": "乙\x00"}, 422,
        "name_zh"),
    Bad("POST", "/api/v1/service-companies", {"code": "co-2", "name_zh": "乙",
                                              "credit_code": "123"}, 422, "credit_code"),
    Bad("POST", "/api/v1/service-companies", {"code": "co-2"}, 422, "name_zh"),
    Bad("PATCH", "/api/v1/service-companies/{co}", {"name_zh": None}, 422, "name_zh"),
    Bad("PATCH", "/api/v1/service-companies/{co}", {"code": "co-9"}, 422, "code"),
    Bad("PATCH", "/api/v1/service-companies/{co}", {"contact": "x\x00"}, 422, "contact"),
    Bad("POST", "/api/v1/servers/{missing}/adopt", {}, 422, "tenant_id"),
    Bad("POST", "/api/v1/servers/{missing}/adopt", {"tenant_id": "{a1}", "force": "perhaps"},
        422, "force"),
    Bad("POST", "/api/v1/servers/{missing}/adopt", {"tenant_id": "{a1}", "reason": "   "}, 422,
        "reason"),
    Bad("POST", "/api/v1/servers/{missing}/adopt", {"tenant_id": "{a1}", "owner": "a1"}, 422,
        "owner"),
    Bad("GET", "/api/v1/servers?power_state=asleep", None, 422, "power_state"),
    Bad("GET", "/api/v1/servers?managed=perhaps", None, 422, "managed"),
    Bad("GET", "/api/v1/servers?limit=0", None, 422, "limit"),
    Bad("GET", "/api/v1/servers?limit=501", None, 422, "limit"),
    Bad("GET", "/api/v1/servers?cursor=not-a-cursor", None, 422, "cursor"),
    Bad("GET", "/api/v1/servers?q=a%00b", None, 422, "q"),
    Bad("GET", "/api/v1/servers?tenant_id={missing}", None, 422, "tenant_id"),
    Bad("GET", "/api/v1/servers/not-an-id", None, 422, "server_id"),
    Bad("GET", "/api/v1/providers?kind=hyperv", None, 422, "kind"),
    Bad("GET", "/api/v1/providers/{p}/sync-runs?limit=0", None, 422, "limit"),
    Bad("GET", "/api/v1/inventory/capacity?provider_id=north", None, 422, "provider_id"),
]
# fmt: on


@pytest.mark.parametrize(
    "case",
    BAD_INPUT,
    ids=[f"{c.method} {c.path} {c.field} {c.body!r}"[:120] for c in BAD_INPUT],
)
def test_bad_input_is_a_problem_naming_the_field_and_changes_nothing(case, admin, refs, db):
    before = database_state(db)
    resp = admin.request(case.method, fill(case.path, refs), json=fill(case.body, refs))
    problem(resp, case.status, case.field)
    assert database_state(db) == before


def test_ratios_and_intervals_at_their_bounds_are_accepted(admin):
    for name, fields in (
        ("sim-low", {"overcommit": {"vcpu": 1, "memory_mb": "1.00"}, "sync_interval_s": 60}),
        ("sim-high", {"overcommit": {"vcpu": "64", "memory_mb": 63.99}, "sync_interval_s": 86400}),
    ):
        created = ok(admin.post("/api/v1/providers", json=provider_body(name, **fields)), 201)
        assert {k: Decimal(v) for k, v in created["overcommit"].items()} == {
            k: Decimal(str(v)) for k, v in fields["overcommit"].items()
        }
        assert created["sync_interval_s"] == fields["sync_interval_s"]
