"""Servers are billed under a contract (分签): a request binds the agency's contract with the
service company of the provider it lands on (or the one it names), before anything is held, and
every lifecycle event of the server carries it.

Against the `broker` fixture's provider (tests/fixtures/provisioning.py), run here by a service
company. Refusals go through the API, so that they are seen as the RFC 9457 problem they are, and
the tables a request may write are compared whole before and after.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from sqlmodel import select

from billing import contracts
from billing.models import Contract, LifecycleEvent, ServiceCompany
from billing.schemas import ContractCreate, ContractUpdate
from broker.core import clock
from broker.inventory.models import Provider
from broker.provisioning import service
from broker.provisioning.schemas import ServerCreate
from tests.api.answers import problem, table_rows
from tests.fixtures.db import TestDatabase
from tests.fixtures.provisioning import ADMIN, Broker

# every table a server request may write, compared whole before and after a refusal
STATE_TABLES = (
    "job",
    "idempotency_key",
    "quota",
    "reservation",
    "allocation",
    "server",
    "inventory_host",
    "inventory_storage",
    "lifecycle_event",
    "audit_event",
)


@dataclass
class Signing:
    """The broker's provider run by `company_id`, and contracts signed on days around today."""

    broker: Broker
    company_id: uuid.UUID

    @property
    def db(self) -> TestDatabase:
        return self.broker.db

    def company(self, code: str) -> uuid.UUID:
        with self.db.unit_of_work() as s:
            company = ServiceCompany(code=f"{code}-{uuid.uuid4().hex[:6]}", name_zh="数据服务公司")
            s.add(company)
            s.flush()
            return company.id

    def sign(
        self,
        *,
        agency: str = "a",
        starts: int = -30,
        ends: int = 335,
        status: str = "active",
        company_id: uuid.UUID | None = None,
    ) -> Contract:
        """A contract of `agency` running from `starts` to `ends` days from today."""
        today = contracts.local_day(clock.now())
        with self.db.unit_of_work() as s:
            contract = contracts.create_contract(
                s,
                ADMIN,
                ContractCreate(
                    number=f"HT-{uuid.uuid4().hex[:10]}",
                    title="政务云服务合同",
                    agency_id=self.broker.estate.tid(agency),
                    service_company_id=company_id or self.company_id,
                    signed_on=today + timedelta(days=min(starts, 0)),
                    starts_on=today + timedelta(days=starts),
                    ends_on=today + timedelta(days=ends),
                    budget_amount=1_000_000_00,
                ),
            )
            if status != "active":
                contracts.update_contract(s, ADMIN, contract.id, ContractUpdate(status=status))
            s.expunge(contract)
            return contract


@pytest.fixture
def signing(broker: Broker) -> Signing:
    with broker.db.unit_of_work() as s:
        company = ServiceCompany(code=f"hy-{uuid.uuid4().hex[:6]}", name_zh="华云数据服务有限公司")
        s.add(company)
        s.flush()
        provider = s.get(Provider, broker.cloud.provider_id)
        assert provider is not None
        provider.service_company_id = company.id
        s.add(provider)
        return Signing(broker, company.id)


def events_of(db: TestDatabase, server_id: uuid.UUID) -> list[LifecycleEvent]:
    with db.unit_of_work(write=False) as s:
        rows = list(
            s.execute(select(LifecycleEvent).where(LifecycleEvent.server_id == server_id)).scalars()
        )
        for r in rows:
            s.expunge(r)
    return sorted(rows, key=lambda e: e.at)


def server_body(broker: Broker, **fields: Any) -> dict[str, Any]:
    return {
        "name": f"vm-{uuid.uuid4().hex[:6]}",
        "system_id": str(broker.estate.tid("a1")),
        "image": "centos-7.9",
        "flavor": "s1.small",
        **fields,
    }


def test_a_request_binds_the_agencys_active_contract_and_every_event_carries_it(
    signing: Signing, principal_of: Any
) -> None:
    broker = signing.broker
    signing.sign(starts=-400, ends=-1)  # ended yesterday: passed over for the current one
    current = signing.sign()
    member = principal_of("a-member")

    job = broker.request(member)

    assert job.state == "succeeded", job.error
    assert job.params["contract_id"] == str(current.id)
    sid = job.server_id
    assert broker.server(sid).contract_id == current.id
    assert broker.act(member, sid, "stop").state == "succeeded"
    assert broker.act(member, sid, "delete").state == "succeeded"
    got = events_of(broker.db, sid)
    assert [e.kind for e in got] == ["created", "stopped", "deleted"]
    assert {e.contract_id for e in got} == {current.id}
    assert {e.service_company_id for e in got} == {signing.company_id}
    assert {e.agency_id for e in got} == {broker.estate.tid("a")}


def test_a_contract_named_in_the_request_is_the_one_bound(
    signing: Signing, principal_of: Any
) -> None:
    broker = signing.broker
    older = signing.sign(starts=-200)
    newer = signing.sign(starts=-10)

    named = broker.request(principal_of("a-member"), contract_id=older.id)
    default = broker.request(principal_of("a-member"))

    assert named.state == "succeeded" and default.state == "succeeded"
    assert broker.server(named.server_id).contract_id == older.id
    assert events_of(broker.db, named.server_id)[0].contract_id == older.id
    # without a name, the most recently started of the agency's contracts
    assert broker.server(default.server_id).contract_id == newer.id


def test_an_agency_without_a_contract_gets_servers_billed_to_none(
    signing: Signing, principal_of: Any
) -> None:
    broker = signing.broker
    signing.sign(agency="b")  # another agency's contract is not a's

    job = broker.request(principal_of("a-member"))

    assert job.state == "succeeded", job.error
    assert job.params["contract_id"] is None
    assert broker.server(job.server_id).contract_id is None
    assert [(e.kind, e.contract_id) for e in events_of(broker.db, job.server_id)] == [
        ("created", None)
    ]


def test_a_provider_of_no_service_company_binds_no_contract(
    broker: Broker, principal_of: Any
) -> None:
    job = broker.request(principal_of("a-member"))

    assert job.state == "succeeded", job.error
    assert broker.server(job.server_id).contract_id is None


Case = Callable[[Signing], dict[str, Any]]


def _outside_period(s: Signing) -> dict[str, Any]:
    return {"contract_id": str(s.sign(starts=-400, ends=-1).id)}


def _not_yet_started(s: Signing) -> dict[str, Any]:
    return {"contract_id": str(s.sign(starts=1, ends=400).id)}


def _suspended(s: Signing) -> dict[str, Any]:
    return {"contract_id": str(s.sign(status="suspended").id)}


def _only_contract_suspended(s: Signing) -> dict[str, Any]:
    s.sign(status="suspended")
    return {}  # none named: the agency's only contract with the company refuses


def _another_agencys(s: Signing) -> dict[str, Any]:
    return {"contract_id": str(s.sign(agency="b").id)}


def _another_companys(s: Signing) -> dict[str, Any]:
    return {"contract_id": str(s.sign(company_id=s.company("other")).id)}


def _no_such_contract(s: Signing) -> dict[str, Any]:
    return {"contract_id": str(uuid.uuid4())}


@pytest.mark.parametrize(
    ("case", "status"),
    [
        pytest.param(_outside_period, 409, id="ended"),
        pytest.param(_not_yet_started, 409, id="not started"),
        pytest.param(_suspended, 409, id="suspended"),
        pytest.param(_only_contract_suspended, 409, id="the only one suspended"),
        pytest.param(_another_agencys, 422, id="another agency's"),
        pytest.param(_another_companys, 422, id="another company's"),
        pytest.param(_no_such_contract, 422, id="missing"),
    ],
)
def test_a_contract_that_cannot_take_the_server_is_refused_naming_it_and_holds_nothing(
    case: Case, status: int, signing: Signing, clients: Any, db: TestDatabase
) -> None:
    change = case(signing)
    before = table_rows(db, STATE_TABLES)

    resp = clients["a-member"].post("/api/v1/servers", json=server_body(signing.broker, **change))

    problem(resp, status, "contract_id")
    assert table_rows(db, STATE_TABLES) == before, "no job, no reservation, no ledger row"
    assert signing.broker.cloud.driver.list_servers() == [], "nothing may reach the provider"


def test_the_contract_is_part_of_what_an_idempotency_key_answers_for(
    signing: Signing, clients: Any, db: TestDatabase
) -> None:
    first, second = signing.sign(starts=-20), signing.sign(starts=-10)
    member = clients["a-member"]
    body = server_body(signing.broker, contract_id=str(first.id))
    headers = {"Idempotency-Key": "contract-key"}

    made = member.post("/api/v1/servers", json=body, headers=headers)
    again = member.post("/api/v1/servers", json=body, headers=headers)
    other = member.post(
        "/api/v1/servers", json={**body, "contract_id": str(second.id)}, headers=headers
    )

    assert made.status_code == 202 and again.status_code == 202, (made.text, again.text)
    assert again.json()["id"] == made.json()["id"]
    assert again.headers.get("idempotent-replayed") == "true"
    problem(other, 422, "Idempotency-Key")


def test_a_request_naming_no_contract_hashes_as_before_the_field_existed(broker: Broker) -> None:
    """Keys sent before an upgrade must still replay: the absent field does not enter the hash."""
    data = ServerCreate.model_validate(server_body(broker, name="vm-hash"))
    legacy = {k: v for k, v in data.model_dump(mode="json").items() if k != "contract_id"}
    digest = hashlib.sha256(
        json.dumps(legacy, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()

    assert service.body_hash(data) == digest
    named = data.model_copy(update={"contract_id": uuid.uuid4()})
    assert service.body_hash(named) != digest
