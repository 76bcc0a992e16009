"""Finished jobs are booked in batches (executor.finish_batch, which ThreadRunner uses): several
jobs of several agencies in one unit of work; a batch that cannot be booked as a whole leaves
nothing written, and its jobs are then finished one by one, each with its own outcome.
(ThreadRunner itself, batching included, is exercised against a live server in
test_concurrency.py.)"""

from __future__ import annotations

import uuid

from sqlmodel import select

from broker.audit.service import verify_chain
from broker.inventory import providers
from broker.inventory.models import Server
from broker.provisioning import executor, service
from broker.provisioning.schemas import ServerCreate
from quotas import ledger
from quotas.models import Reservation
from tests.fixtures.inventory import used
from tests.fixtures.provisioning import Broker


def _built(broker: Broker, principal, system: str) -> executor.Outcome:  # type: ignore[no-untyped-def]
    """A request accepted and its server built at the provider, not yet booked."""
    submitted = service.request_server(
        broker.db,
        principal,
        ServerCreate(
            name=f"vm-{uuid.uuid4().hex[:6]}",
            system_id=broker.estate.tid(system),
            image="centos-7.9",
            flavor="s1.small",
        ),
        key=None,
    )
    c = submitted.claimed
    assert c is not None
    driver = providers.driver_for(c.provider)
    try:
        observed = executor._call(driver, c.job, False)
    finally:
        driver.close()
    return c, observed, None


def _servers(broker: Broker) -> list[Server]:
    with broker.db.unit_of_work(write=False) as s:
        return list(
            s.execute(
                select(Server).where(Server.provider_id == broker.cloud.provider_id)
            ).scalars()
        )


def test_jobs_of_several_agencies_are_booked_in_one_batch(broker: Broker, principal_of) -> None:  # type: ignore[no-untyped-def]
    a, b = principal_of("a-member"), principal_of("b-member")
    outcomes = [_built(broker, a, "a1"), _built(broker, b, "b1"), _built(broker, a, "a1")]
    assert executor.finish_batch(broker.db, outcomes) == [True, True, True]
    for c, observed, _ in outcomes:
        job = broker.job(c.job.id)
        assert job.state == "succeeded", job.error
        assert broker.server(job.server_id).booked["instances"] == 1
        assert (
            observed is not None
            and broker.server(job.server_id).external_id == observed.external_id
        )
    assert used(broker.db, broker.estate, "a", "instances") == 2
    assert used(broker.db, broker.estate, "b", "instances") == 1
    with broker.db.unit_of_work(write=False) as s:
        states = set(s.execute(select(Reservation.state)).scalars())
        assert verify_chain(s).ok
    assert states == {"committed"}
    assert sorted(broker.events(c.job.server_id) for c, _, _ in outcomes) == [["created"]] * 3


def test_a_batch_that_cannot_be_booked_leaves_nothing_and_each_job_is_finished_alone(
    broker: Broker, principal_of
) -> None:  # type: ignore[no-untyped-def]
    a = principal_of("a-member")
    outcomes = [_built(broker, a, "a1") for _ in range(3)]
    lapsed = outcomes[1][0]
    with broker.db.unit_of_work() as s:
        assert lapsed.job.reservation_id is not None
        ledger.release(s, lapsed.job.reservation_id)
    held_before = used(broker.db, broker.estate, "a", "instances")

    assert executor.finish_batch(broker.db, outcomes) is None
    assert _servers(broker) == []
    assert {broker.job(c.job.id).state for c, _, _ in outcomes} == {"running"}
    assert used(broker.db, broker.estate, "a", "instances") == held_before

    # alone, each gets its own outcome: the lapsed one's server exists, so it is booked anyway
    for c, observed, _ in outcomes:
        assert executor._conclude(broker.db, c, observed) == "succeeded"
    assert len(_servers(broker)) == 3
    assert used(broker.db, broker.estate, "a", "instances") == 3
    lapsed_job = broker.job(lapsed.job.id)
    assert lapsed_job.state == "succeeded"
    assert broker.server(lapsed_job.server_id).booked["instances"] == 1
    with broker.db.unit_of_work(write=False) as s:
        assert verify_chain(s).ok


def test_a_job_taken_over_meanwhile_is_skipped_and_the_rest_booked(
    broker: Broker, principal_of
) -> None:  # type: ignore[no-untyped-def]
    a = principal_of("a-member")
    outcomes = [_built(broker, a, "a1") for _ in range(2)]
    taken = outcomes[0][0]
    stolen = executor.Claimed(taken.job, taken.provider, uuid.uuid4())  # not the claim held
    booked = executor.finish_batch(broker.db, [(stolen, outcomes[0][1], None), outcomes[1]])
    assert booked == [False, True]
    assert broker.job(taken.job.id).state == "running"
    assert broker.job(outcomes[1][0].job.id).state == "succeeded"


def test_a_job_handed_to_a_runner_already_shut_down_is_left_for_the_reconciler(
    broker: Broker, principal_of
) -> None:  # type: ignore[no-untyped-def]
    # a request finishing while the process stops: the job is written and claimed; the hand-over
    # must not turn the request into an error, and the reconciler resolves the job later
    submitted = service.request_server(
        broker.db,
        principal_of("a-member"),
        ServerCreate(
            name="late", system_id=broker.estate.tid("a1"), image="centos-7.9", flavor="s1.small"
        ),
        key=None,
    )
    assert submitted.claimed is not None
    runner = executor.ThreadRunner(broker.db, workers=1)
    runner.shutdown()
    runner.submit(submitted.claimed)
    assert broker.job(submitted.job_id).state == "running"  # claimed, not run: stale later
