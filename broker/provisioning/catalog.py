"""The catalog (what each provider offers, and to whom) and each agency's provisioning policy.

The center imports what a provider lists (flavors, images, networks, storage tiers) and curates
it: switches items off, offers them to some agencies only, sets bounds for custom sizes and data
disks. Requests name items by code; an item not offered to the requester's agency does not exist
for it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from broker.audit import service as audit
from broker.core import clock
from broker.core.authz import Principal
from broker.core.db import SessionSource
from broker.core.errors import Conflict, Forbidden, Invalid, NotFound, Unavailable
from broker.core.memo import Memo
from broker.core.settings import get_settings
from broker.inventory import providers
from broker.inventory.models import Provider, ServiceCompany
from broker.provisioning.models import AgencyPolicy, CatalogItem, CatalogKind
from broker.provisioning.schemas import (
    CatalogItemCreate,
    CatalogItemUpdate,
    PolicyUpdate,
)
from broker.tenancy import service as tenancy
from broker.tenancy.authz import authorize
from broker.tenancy.models import Tenant, TenantKind
from drivers.base import Driver, DriverError

MANAGE = "catalog.manage"
# a data disk's size when the center set no bounds for a tier
DEFAULT_TIER_MAX_GB = 4096


def _snapshot(item: CatalogItem) -> dict[str, Any]:
    return {
        "provider_id": str(item.provider_id),
        "kind": item.kind,
        "code": item.code,
        "external_id": item.external_id,
        "spec": item.spec,
        "agency_ids": item.agency_ids,
        "enabled": item.enabled,
    }


def _provider(session: Session, provider_id: uuid.UUID) -> Provider:
    provider = session.get(Provider, provider_id)
    if provider is None:
        raise NotFound(f"provider {provider_id} not found")
    return provider


def list_items(session: Session, principal: Principal, provider_id: uuid.UUID) -> list[CatalogItem]:
    """The whole catalog of one provider, for the center."""
    providers.center_for(session, principal, providers.READ, f"provider {provider_id}")
    _provider(session, provider_id)
    stmt = (
        select(CatalogItem)
        .where(CatalogItem.provider_id == provider_id)
        .order_by(col(CatalogItem.kind), col(CatalogItem.code))
    )
    return list(session.execute(stmt).scalars())


def import_items(
    db: SessionSource, principal: Principal, provider_id: uuid.UUID
) -> tuple[int, int, list[CatalogItem]]:
    """Read the provider's flavors, images, networks and storage tiers and add what the catalog
    lacks (new items are offered to every agency). Existing items keep their curation; their
    provider-side facts (ids, sizes) are refreshed. The provider is asked outside any
    transaction."""
    with db.unit_of_work(write=False) as session:
        providers.center_for(session, principal, MANAGE, f"provider {provider_id}")
        provider = _provider(session, provider_id)
        session.expunge(provider)
    driver: Driver | None = None
    try:
        driver = providers.driver_for(provider)
        found: list[tuple[str, str, str, dict[str, Any]]] = []
        for f in driver.list_flavors():
            spec = {"vcpu": f.vcpu, "memory_mb": f.memory_mb, "disk_gb": f.disk_gb}
            found.append((CatalogKind.flavor, f.name, f.external_id, spec))
        for i in driver.list_images():
            found.append(
                (
                    CatalogKind.image,
                    i.name,
                    i.external_id,
                    {
                        "os": i.os,
                        "min_disk_gb": i.min_disk_gb,
                        # the root disk of a custom size, as the driver will make it
                        "custom_root_gb": max(driver.custom_root_gb(), i.min_disk_gb),
                        # an image some hosts lack (libvirt keeps images per host)
                        "hosts": sorted(i.extra.get("hosts") or []) or None,
                    },
                )
            )
        for n in driver.list_networks():
            found.append((CatalogKind.network, n.name, n.external_id, {"cidr": n.cidr}))
        tiers: list[str] = []
        for pool in driver.list_storage():
            if pool.tier not in tiers:
                tiers.append(pool.tier)
        root_tier = driver.root_tier()
    except DriverError as exc:
        message = providers.scrub(exc.provider_message, providers.credentials_of(provider))
        raise Unavailable(
            f"provider {provider.name} could not list its catalog: {message}"
        ) from exc
    finally:
        if driver is not None:
            driver.close()
    for tier in tiers:
        # where the driver puts root disks, unless the center curates it otherwise
        found.append(
            (
                CatalogKind.tier,
                tier,
                tier,
                {"min_gb": 1, "max_gb": DEFAULT_TIER_MAX_GB, "root": tier == root_tier},
            )
        )
    created = updated = 0
    with db.unit_of_work() as session:
        center = providers.center_for(session, principal, MANAGE, f"provider {provider_id}")
        existing = {
            (i.kind, i.code): i
            for i in session.execute(
                select(CatalogItem).where(CatalogItem.provider_id == provider_id)
            ).scalars()
        }
        for kind, code, external_id, spec in found:
            code = code[:100]
            item = existing.get((kind, code))
            if item is None:
                item = CatalogItem(
                    provider_id=provider_id,
                    kind=kind,
                    code=code,
                    external_id=external_id,
                    spec=spec,
                )
                existing[(kind, code)] = item
                session.add(item)
                created += 1
            elif kind != CatalogKind.tier and (item.external_id, item.spec) != (external_id, spec):
                item.external_id, item.spec = external_id, spec
                item.updated_at = clock.now()
                session.add(item)
                updated += 1
        session.flush()
        audit.record(
            session,
            principal,
            "catalog.import",
            tenant=center,
            target_type="provider",
            target_id=provider_id,
            after={"created": created, "updated": updated},
        )
        items = sorted(existing.values(), key=lambda i: (i.kind, i.code))
        for item in items:
            session.expunge(item)
    return created, updated, items


def _bounds_spec(kind: str, data: CatalogItemCreate | CatalogItemUpdate) -> dict[str, Any] | None:
    if kind == CatalogKind.size and data.size is not None:
        b = data.size
        if b.min_vcpu > b.max_vcpu:
            raise Invalid.field("size.min_vcpu", "must not exceed max_vcpu")
        if b.min_memory_mb > b.max_memory_mb:
            raise Invalid.field("size.min_memory_mb", "must not exceed max_memory_mb")
        return b.model_dump()
    if kind == CatalogKind.tier and data.tier is not None:
        if data.tier.min_gb > data.tier.max_gb:
            raise Invalid.field("tier.min_gb", "must not exceed max_gb")
        return data.tier.model_dump()
    if data.size is not None:
        raise Invalid.field("size", f"only a size item has size bounds, not a {kind}")
    if data.tier is not None:
        raise Invalid.field("tier", f"only a tier item has tier bounds, not a {kind}")
    return None


def _agencies(session: Session, ids: Iterable[uuid.UUID]) -> list[str]:
    out = sorted({str(i) for i in ids})
    if not out:
        return out
    found = {
        str(t)
        for t in session.execute(
            select(Tenant.id).where(
                col(Tenant.id).in_([uuid.UUID(i) for i in out]),
                Tenant.kind == TenantKind.agency.value,
            )
        ).scalars()
    }
    missing = [i for i in out if i not in found]
    if missing:
        raise Invalid.field("agency_ids", f"not agencies: {', '.join(missing)}", "not_found")
    return out


def create_item(
    session: Session, principal: Principal, provider_id: uuid.UUID, data: CatalogItemCreate
) -> CatalogItem:
    center = providers.center_for(session, principal, MANAGE, f"provider {provider_id}")
    _provider(session, provider_id)
    spec = _bounds_spec(data.kind, data)
    if spec is None:
        raise Invalid.field(data.kind, f"a {data.kind} item needs its bounds", "missing")
    taken = session.execute(
        select(CatalogItem.id).where(
            CatalogItem.provider_id == provider_id,
            CatalogItem.kind == data.kind,
            CatalogItem.code == data.code,
        )
    ).first()
    if taken is not None:
        raise Conflict.field("code", f"{data.kind} {data.code!r} exists for this provider", "taken")
    item = CatalogItem(
        provider_id=provider_id,
        kind=data.kind,
        code=data.code,
        external_id=data.code,
        name_zh=data.name_zh,
        spec=spec,
        agency_ids=_agencies(session, data.agency_ids),
        enabled=data.enabled,
    )
    session.add(item)
    session.flush()
    audit.record(
        session,
        principal,
        "catalog.create",
        tenant=center,
        target_type="catalog_item",
        target_id=item.id,
        after=_snapshot(item),
    )
    return item


def update_item(
    session: Session, principal: Principal, item_id: uuid.UUID, data: CatalogItemUpdate
) -> CatalogItem:
    center = providers.center_for(session, principal, MANAGE, f"catalog item {item_id}")
    item = session.get(CatalogItem, item_id, with_for_update=True)
    if item is None:
        raise NotFound(f"catalog item {item_id} not found")
    before = _snapshot(item)
    spec = _bounds_spec(item.kind, data)
    if spec is not None:
        item.spec = spec
    changes = data.model_dump(exclude_unset=True, exclude={"size", "tier"})
    if "agency_ids" in changes:
        item.agency_ids = _agencies(session, data.agency_ids or [])
    if "enabled" in changes:
        item.enabled = bool(data.enabled)
    if "name_zh" in changes:
        item.name_zh = data.name_zh
    item.updated_at = clock.now()
    session.add(item)
    session.flush()
    audit.record(
        session,
        principal,
        "catalog.update",
        tenant=center,
        target_type="catalog_item",
        target_id=item.id,
        before=before,
        after=_snapshot(item),
    )
    return item


def offered(item: CatalogItem, agency_id: uuid.UUID) -> bool:
    return item.enabled and (not item.agency_ids or str(agency_id) in item.agency_ids)


def offered_catalog(
    session: Session,
    agency_id: uuid.UUID,
    *,
    company_id: uuid.UUID | None = None,
    provider_ids: Iterable[uuid.UUID] | None = None,
) -> tuple[dict[uuid.UUID, list[CatalogItem]], dict[uuid.UUID, Provider]]:
    """Per enabled provider (of `company_id`, when given), the items offered to `agency_id`;
    and those providers. One query for both."""
    stmt = (
        select(CatalogItem, Provider)
        .join(Provider, col(Provider.id) == col(CatalogItem.provider_id))
        .where(col(CatalogItem.enabled).is_(True), col(Provider.enabled).is_(True))
        .order_by(col(CatalogItem.kind), col(CatalogItem.code))
    )
    if provider_ids is not None:
        stmt = stmt.where(col(CatalogItem.provider_id).in_(list(provider_ids)))
    if company_id is not None:
        stmt = stmt.where(col(Provider.service_company_id) == company_id)
    items: dict[uuid.UUID, list[CatalogItem]] = {}
    provs: dict[uuid.UUID, Provider] = {}
    for item, provider in session.execute(stmt):
        if offered(item, agency_id):
            items.setdefault(item.provider_id, []).append(item)
            provs[provider.id] = provider
    return items, provs


# --- what an agency is offered, cached --------------------------------------------------------
#
# Every server request reads the agency's policy and offered catalog; both change rarely. They are
# kept per (database, agency) and used while all of these hold:
# - the entry is younger than GOVBROKER_OFFER_MEMORY_SECONDS (5 by default);
# - a stamp read in the request's own transaction is unchanged: the count and latest updated_at
#   of catalog items and providers and the agency policy's updated_at (every writer of those
#   sets updated_at, so a change committed anywhere, by any replica, is seen at once);
# - no catalog item, provider or policy was written through the ORM in this process since: such
#   a commit empties the cache (this also covers writes that leave updated_at alone).
# What the stamp cannot see (a row edited outside govbroker without touching updated_at, or two
# catalog writes committing out of their timestamps' order on two replicas) is seen within the
# memory time. Cached objects are detached copies, shared read-only between threads: never change
# them.
_monotonic = time.monotonic  # the cache's own clock (tests move it; the broker clock is UTC)


@dataclass(frozen=True)
class Offer:
    """What an agency may ask for: its policy, and per enabled provider (of the policy's service
    company, if any) the items offered to it; see `offered_catalog`."""

    policy: AgencyPolicy | None
    items: Mapping[uuid.UUID, list[CatalogItem]]
    providers: Mapping[uuid.UUID, Provider]


_ITEM = CatalogItem.__table__  # type: ignore[attr-defined]
_PROVIDER = Provider.__table__  # type: ignore[attr-defined]
_POLICY = AgencyPolicy.__table__  # type: ignore[attr-defined]
_STAMP = sa_select(
    sa_select(func.count()).select_from(_ITEM).scalar_subquery(),
    sa_select(func.max(_ITEM.c.updated_at)).scalar_subquery(),
    sa_select(func.count()).select_from(_PROVIDER).scalar_subquery(),
    sa_select(func.max(_PROVIDER.c.updated_at)).scalar_subquery(),
    sa_select(_POLICY.c.updated_at)
    .where(_POLICY.c.agency_id == bindparam("agency"))
    .scalar_subquery(),
)
_offers: Memo[tuple[str, uuid.UUID], tuple[float, tuple[Any, ...], Offer]] = Memo(
    "offers", (CatalogItem, Provider, AgencyPolicy)
)


def offer(session: Session, agency_id: uuid.UUID) -> Offer:
    """The agency's policy and offered catalog, as of this transaction (see the notes above)."""
    key = (str(session.get_bind().engine.url), agency_id)
    stamp = tuple(session.connection().execute(_STAMP, {"agency": agency_id}).one())
    hit = _offers.get(key)
    fresh_for = get_settings().offer_memory_seconds
    if hit is not None and hit[1] == stamp and _monotonic() - hit[0] < fresh_for:
        return hit[2]
    since, started = _offers.generation, _monotonic()
    policy = session.get(AgencyPolicy, agency_id)
    items, provs = offered_catalog(
        session, agency_id, company_id=policy.service_company_id if policy else None
    )
    fresh = Offer(
        AgencyPolicy(**policy.model_dump()) if policy is not None else None,
        {pid: [CatalogItem(**i.model_dump()) for i in its] for pid, its in items.items()},
        {pid: Provider(**p.model_dump()) for pid, p in provs.items()},
    )
    _offers.keep(key, (started, stamp, fresh), since=since, session=session)
    return fresh


def offered_on(session: Session, agency_id: uuid.UUID, provider_id: uuid.UUID) -> list[CatalogItem]:
    """The items of one provider offered to `agency_id`."""
    items, _ = offered_catalog(session, agency_id, provider_ids=[provider_id])
    return items.get(provider_id, [])


def agency_of(session: Session, tenant: Tenant, field: str = "system_id") -> Tenant:
    """The agency a tenant belongs to (itself, for an agency); `field` names the input."""
    if tenant.kind == TenantKind.agency:
        return tenant
    if tenant.kind == TenantKind.system and tenant.parent_id is not None:
        agency = session.get(Tenant, tenant.parent_id)
        if agency is not None:
            return agency
    raise Invalid.field(field, f"{tenant.kind} {tenant.code} is not in an agency", "kind")


def catalog_for(
    session: Session, principal: Principal, tenant_id: uuid.UUID
) -> tuple[Tenant, dict[uuid.UUID, list[CatalogItem]], dict[uuid.UUID, Provider]]:
    """What the caller may ask for in `tenant_id` (a system or agency): per provider, the items."""
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"tenant {tenant_id} not found")
    authorize(principal, "server.read", tenant)
    agency = agency_of(session, tenant, "tenant_id")
    policy = session.get(AgencyPolicy, agency.id)
    items, provs = offered_catalog(
        session, agency.id, company_id=policy.service_company_id if policy else None
    )
    return tenant, items, provs


# --- agency policy -----------------------------------------------------------------------------


def _agency(session: Session, principal: Principal, agency_id: uuid.UUID, action: str) -> Tenant:
    agency = session.get(Tenant, agency_id)
    if agency is None or agency.kind != TenantKind.agency:
        raise NotFound(f"agency {agency_id} not found")
    authorize(principal, action, agency, subject=f"agency {agency_id}")
    return agency


def get_policy(session: Session, principal: Principal, agency_id: uuid.UUID) -> AgencyPolicy:
    _agency(session, principal, agency_id, "tenant.read")
    policy = session.get(AgencyPolicy, agency_id)
    return policy if policy is not None else AgencyPolicy(agency_id=agency_id)


def _policy_snapshot(p: AgencyPolicy) -> dict[str, Any]:
    return {
        "service_company_id": p.service_company_id,
        "provider_id": p.provider_id,
        "approval_vcpu": p.approval_vcpu,
        "approval_memory_mb": p.approval_memory_mb,
        "approval_hours": p.approval_hours,
    }


def set_policy(
    session: Session, principal: Principal, agency_id: uuid.UUID, data: PolicyUpdate
) -> AgencyPolicy:
    """Which company and provider serve the agency are the center's call (统采); approval
    thresholds too, since an agency admin must not be able to waive its own approvals."""
    agency = _agency(session, principal, agency_id, "tenant.read")
    center = tenancy.get_center(session)
    # the agency is in view, so a missing right is 403 (not the center's 404)
    if center is None or not principal.can(MANAGE, center.path):
        raise Forbidden(f"your roles here do not allow {MANAGE}")
    if (
        data.service_company_id is not None
        and session.get(ServiceCompany, data.service_company_id) is None
    ):
        raise Invalid.field("service_company_id", "no such service company", "not_found")
    if data.provider_id is not None:
        provider = session.get(Provider, data.provider_id)
        if provider is None:
            raise Invalid.field("provider_id", "no such provider", "not_found")
        if (
            data.service_company_id is not None
            and provider.service_company_id != data.service_company_id
        ):
            raise Invalid.field(
                "provider_id", "the provider is run by another service company", "mismatch"
            )
    settings = get_settings()
    most = settings.reservation_max_ttl_seconds // 3600 - settings.job_reservation_hours
    if data.approval_hours > most:
        # a waiting request holds its quota for the window plus the job's own time
        raise Invalid.field("approval_hours", f"must be at most {most}", "too_long")
    policy = session.get(AgencyPolicy, agency_id, with_for_update=True)
    before = _policy_snapshot(policy) if policy is not None else None
    if policy is None:
        policy = AgencyPolicy(agency_id=agency_id)
    for key, value in data.model_dump().items():
        setattr(policy, key, value)
    policy.updated_at = clock.now()
    policy.updated_by = principal.username[:64]
    session.add(policy)
    session.flush()
    audit.record(
        session,
        principal,
        "provisioning_policy.set",
        tenant=agency,
        target_type="agency",
        target_id=agency.id,
        before=before,
        after=_policy_snapshot(policy),
    )
    return policy
