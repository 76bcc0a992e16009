"""What an agency is offered is cached between requests (catalog.offer), and every change is seen:
at once when made through govbroker (in this process, or committed by another one: the stamp
read in each request's transaction changes), within GOVBROKER_OFFER_MEMORY_SECONDS when made
behind its back. The cache's clock is moved by hand: no test waits."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlmodel import select

from broker.core import clock as broker_clock
from broker.core.authz import Principal
from broker.core.errors import Invalid
from broker.core.settings import get_settings
from broker.inventory.models import Provider
from broker.provisioning import catalog
from broker.provisioning.models import CatalogItem, CatalogKind
from broker.provisioning.schemas import CatalogItemUpdate, PolicyUpdate
from tests.fixtures.clock import move_monotonic
from tests.fixtures.provisioning import Broker

ADMIN = Principal.system("test-offer-cache")


@pytest.fixture
def later(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """`later(seconds)` moves the cache's clock forward."""
    return move_monotonic(monkeypatch, catalog)


def _item(broker: Broker, kind: str, code: str) -> CatalogItem:
    with broker.db.unit_of_work(write=False) as s:
        return s.execute(
            select(CatalogItem).where(
                CatalogItem.provider_id == broker.cloud.provider_id,
                CatalogItem.kind == kind,
                CatalogItem.code == code,
            )
        ).scalar_one()


def _offered_images(broker: Broker) -> set[str]:
    with broker.db.unit_of_work(write=False) as s:
        offer = catalog.offer(s, broker.estate.tid("a"))
    return {i.code for i in offer.items.get(broker.cloud.provider_id, []) if i.kind == "image"}


def _refused_image(broker: Broker, principal: Principal, image: str) -> Invalid:
    with pytest.raises(Invalid) as refused:
        broker.request(principal, image=image)
    return refused.value


def test_the_offer_is_kept_between_requests(broker: Broker, principal_of) -> None:  # type: ignore[no-untyped-def]
    member = principal_of("a-member")
    assert broker.request(member).state == "succeeded"
    with broker.db.unit_of_work(write=False) as s:
        first = catalog.offer(s, broker.estate.tid("a"))
    with broker.db.unit_of_work(write=False) as s:
        assert catalog.offer(s, broker.estate.tid("a")) is first


def test_an_offer_memory_of_zero_reads_the_catalog_every_time(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOVBROKER_OFFER_MEMORY_SECONDS", "0")
    get_settings.cache_clear()
    try:
        with broker.db.unit_of_work(write=False) as s:
            first = catalog.offer(s, broker.estate.tid("a"))
        with broker.db.unit_of_work(write=False) as s:
            assert catalog.offer(s, broker.estate.tid("a")) is not first
    finally:
        monkeypatch.delenv("GOVBROKER_OFFER_MEMORY_SECONDS")
        get_settings.cache_clear()


def test_an_item_switched_off_is_not_offered_to_the_next_request(
    broker: Broker, principal_of
) -> None:  # type: ignore[no-untyped-def]
    member = principal_of("a-member")
    assert broker.request(member, image="centos-7.9").state == "succeeded"
    image = _item(broker, CatalogKind.image, "centos-7.9")
    with broker.db.unit_of_work() as s:
        catalog.update_item(s, ADMIN, image.id, CatalogItemUpdate(enabled=False))
    refused = _refused_image(broker, member, "centos-7.9")
    assert refused.errors[0].field == "image"


def test_an_item_offered_to_another_agency_only_is_gone_at_once(
    broker: Broker, principal_of
) -> None:  # type: ignore[no-untyped-def]
    member = principal_of("a-member")
    assert "centos-7.9" in _offered_images(broker)
    image = _item(broker, CatalogKind.image, "centos-7.9")
    with broker.db.unit_of_work() as s:
        catalog.update_item(
            s, ADMIN, image.id, CatalogItemUpdate(agency_ids=[broker.estate.tid("b")])
        )
    assert "centos-7.9" not in _offered_images(broker)
    _refused_image(broker, member, "centos-7.9")


def test_a_policy_set_is_seen_by_the_next_request(broker: Broker, principal_of) -> None:  # type: ignore[no-untyped-def]
    member = principal_of("a-member")
    assert broker.request(member, flavor=None, vcpu=4, memory_mb=4096).state == "succeeded"
    with broker.db.unit_of_work() as s:
        catalog.set_policy(s, ADMIN, broker.estate.tid("a"), PolicyUpdate(approval_vcpu=2))
    job = broker.request(member, flavor=None, vcpu=4, memory_mb=4096)
    assert job.state == "pending_approval"


def test_a_provider_switched_off_by_another_process_is_seen_at_once(
    broker: Broker, principal_of
) -> None:  # type: ignore[no-untyped-def]
    member = principal_of("a-member")
    assert broker.request(member).state == "succeeded"
    # as another replica would write it: no event of this process sees it, its stamp does
    providers = Provider.__table__  # type: ignore[attr-defined]
    broker.db.connection.execute(
        update(providers)
        .where(providers.c.id == broker.cloud.provider_id)
        .values(enabled=False, updated_at=broker_clock.now() + timedelta(seconds=1))
    )
    assert _offered_images(broker) == set()


def test_an_item_added_by_another_process_is_offered_at_once(broker: Broker) -> None:
    assert "debian-13" not in _offered_images(broker)
    items = CatalogItem.__table__  # type: ignore[attr-defined]
    broker.db.connection.execute(
        items.insert().values(
            id=uuid.uuid4(),
            provider_id=broker.cloud.provider_id,
            kind="image",
            code="debian-13",
            external_id="img-debian-13",
            spec={"os": "linux", "min_disk_gb": 0},
            agency_ids=[],
            enabled=True,
            created_at=broker_clock.now(),
            updated_at=broker_clock.now(),
        )
    )
    assert "debian-13" in _offered_images(broker)


def test_a_change_no_stamp_shows_is_seen_within_the_ttl(broker: Broker, later) -> None:  # type: ignore[no-untyped-def]
    assert "centos-7.9" in _offered_images(broker)
    image = _item(broker, CatalogKind.image, "centos-7.9")
    # edited behind govbroker's back, updated_at left as it was
    items = CatalogItem.__table__  # type: ignore[attr-defined]
    broker.db.connection.execute(update(items).where(items.c.id == image.id).values(enabled=False))
    assert "centos-7.9" in _offered_images(broker)  # the documented bound
    later(get_settings().offer_memory_seconds)
    assert "centos-7.9" not in _offered_images(broker)


def test_cached_objects_are_copies_outside_any_session(broker: Broker) -> None:
    with broker.db.unit_of_work(write=False) as s:
        offer = catalog.offer(s, broker.estate.tid("a"))
        provider = offer.providers[broker.cloud.provider_id]
        assert provider not in s
        assert all(i not in s for items in offer.items.values() for i in items)


def test_a_provider_changed_here_without_its_stamp_is_seen_at_once(broker: Broker) -> None:
    assert _offered_images(broker)
    with broker.db.unit_of_work() as s:
        provider = s.get(Provider, broker.cloud.provider_id)
        assert provider is not None
        provider.enabled = False  # updated_at left alone: the commit in this process is seen
        s.add(provider)
    assert _offered_images(broker) == set()
