"""Concurrent requests against a live API server (uvicorn on 127.0.0.1, a real database whose
commits other connections see, jobs on the server's worker threads):

- 50 identical POSTs with one Idempotency-Key create exactly one server, and every one of them
  is answered with that one job;
- 40 requests racing for room for 10 never over-allocate: exactly 10 servers, and the ledger,
  the inventory and the provider agree.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from sqlmodel import select

from api.app import create_app
from broker.core.db import Database
from broker.inventory.models import Server
from broker.provisioning.executor import ThreadRunner
from broker.provisioning.models import Job
from drivers.simulator import SimulatorDriver
from quotas import service as quotas
from quotas.models import Quota
from tests.fixtures.auth import PASSWORD, Estate, build_estate
from tests.fixtures.inventory import register_simulator
from tests.fixtures.provisioning import ADMIN, give_room, offer
from tests.fixtures.quota import set_limits

N_IDENTICAL = 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Live:
    url: str
    db: Database
    estate: Estate
    sim: SimulatorDriver
    runner: ThreadRunner
    provider_id: uuid.UUID

    def client(self, username: str) -> httpx.Client:
        c = httpx.Client(base_url=self.url, timeout=60)
        r = c.post("/api/v1/auth/login", json={"username": username, "password": PASSWORD})
        r.raise_for_status()
        c.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
        return c


@pytest.fixture
def live(committed_db: Database) -> Iterator[Live]:
    db = Database(committed_db.url, pool_size=60, max_overflow=10, pool_timeout=120)
    name = f"live-{uuid.uuid4().hex[:8]}"
    with db.unit_of_work() as s:
        estate = build_estate(s, with_passwords=True)
        set_limits(s, estate)
    give_room(db, estate, "a", "b")  # type: ignore[arg-type]
    opts = {"state": f"shared:{name}", "retry_max_wait": 0}
    provider_id = register_simulator(db, name, opts)  # type: ignore[arg-type]
    offer(db, provider_id)  # type: ignore[arg-type]
    runner = ThreadRunner(db, workers=4)
    app = create_app(db, jobs=runner)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the API server did not start"
        time.sleep(0.05)
    try:
        yield Live(
            f"http://127.0.0.1:{port}",
            db,
            estate,
            SimulatorDriver(f"sim://{name}", {}, opts),
            runner,
            provider_id,
        )
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        SimulatorDriver.ex_reset_shared(name)
        db.dispose()


def _in_parallel(n: int, fn: Any) -> list[Any]:
    barrier = threading.Barrier(n)

    def one(i: int) -> Any:
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def _settled(live: Live) -> None:
    live.runner.drain(timeout=120)


def test_50_identical_posts_with_one_key_create_exactly_one_server(live: Live) -> None:
    body = {
        "name": "web-01",
        "system_id": str(live.estate.tid("a1")),
        "image": "centos-7.9",
        "flavor": "s1.small",
    }
    clients = [live.client("a-member") for _ in range(N_IDENTICAL)]
    key = f"key-{uuid.uuid4()}"
    responses = _in_parallel(
        N_IDENTICAL,
        lambda i: clients[i].post("/api/v1/servers", json=body, headers={"Idempotency-Key": key}),
    )
    _settled(live)
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {202: N_IDENTICAL}, [r.text for r in responses if r.status_code != 202]
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == N_IDENTICAL - 1
    assert len(live.sim.list_servers()) == 1
    with live.db.unit_of_work(write=False) as s:
        assert len(list(s.execute(select(Job)).scalars())) == 1
        servers = list(s.execute(select(Server)).scalars())
        assert len(servers) == 1 and servers[0].tenant_id == live.estate.tid("a1")
    job = clients[0].get(f"/api/v1/jobs/{responses[0].json()['id']}").json()
    assert job["state"] == "succeeded", job
    for c in clients:
        c.close()


def test_racing_requests_never_over_allocate(live: Live) -> None:
    # a1 may hold 10 instances, and 40 requests race for them
    with live.db.unit_of_work() as s:
        quotas.set_quota(s, ADMIN, live.estate.tid("a1"), "instances", limit=10)
    body = {"system_id": str(live.estate.tid("a1")), "image": "centos-7.9", "flavor": "s1.small"}
    clients = [live.client("a-member") for _ in range(8)]
    responses = _in_parallel(
        40,
        lambda i: clients[i % 8].post("/api/v1/servers", json={**body, "name": f"race-{i:02d}"}),
    )
    _settled(live)
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {202: 10, 409: 30}, statuses
    refused = next(r for r in responses if r.status_code == 409)
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert len(live.sim.list_servers()) == 10
    with live.db.unit_of_work(write=False) as s:
        jobs = list(s.execute(select(Job)).scalars())
        assert Counter(j.state for j in jobs) == {"succeeded": 10}
        live_rows = list(
            s.execute(select(Server).where(Server.tenant_id == live.estate.tid("a1"))).scalars()
        )
        assert len(live_rows) == 10
        q = s.execute(
            select(Quota).where(
                Quota.tenant_id == live.estate.tid("a1"), Quota.resource_class == "instances"
            )
        ).scalar_one()
        assert (q.committed, q.reserved) == (10, 0)
    for c in clients:
        c.close()
