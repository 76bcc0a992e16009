"""Price catalogs (统一采购 price lists): versioned per service company by effective dates.

A new version starts on a calendar day of the billing zone and runs until the next version
starts; the version before it is closed on that day. Versions never overlap, and a version may
not start inside time that has already been rated (that would change what was billed).
"""

from __future__ import annotations

import uuid

from sqlalchemy import String, column, func, table
from sqlmodel import Session, col, select

from billing import rating
from billing.models import Contract, PriceCatalog, PriceItem, ServiceCompany, UsageInterval
from billing.schemas import PriceCatalogCreate, PriceCatalogPublic, PriceItemPublic
from broker.audit import service as audit
from broker.core.authz import Principal
from broker.core.errors import Conflict, Forbidden, Invalid, NotFound
from broker.tenancy import service as tenancy

MANAGE = "billing.manage"
# the quota domain's catalogue of resource classes, read by name (billing sits beside quotas)
_RESOURCE_CLASS = table("resource_class", column("code", String))


def require_center(session: Session, principal: Principal, action: str) -> None:
    center = tenancy.get_center(session)
    if center is None or not principal.can(action, center.path):
        raise Forbidden(f"your roles here do not allow {action}")


def _company(session: Session, company_id: uuid.UUID, *, lock: bool = False) -> ServiceCompany:
    company = session.get(
        ServiceCompany, company_id, with_for_update=lock or None, populate_existing=lock
    )
    if company is None:
        raise NotFound(f"service company {company_id} not found")
    return company


def create_catalog(
    session: Session, principal: Principal, company_id: uuid.UUID, data: PriceCatalogCreate
) -> PriceCatalog:
    require_center(session, principal, MANAGE)
    # locked: two first versions of one company's list must not both become version 1
    company = _company(session, company_id, lock=True)
    known = set(session.execute(select(_RESOURCE_CLASS.c.code)).scalars())
    for i, item in enumerate(data.items):
        if item.resource_class not in known:
            raise Invalid.field(
                f"items.{i}.resource_class", f"no resource class {item.resource_class}", "unknown"
            )
        if (
            item.monthly_cap_amount is not None
            and item.monthly_min_amount is not None
            and item.monthly_min_amount > item.monthly_cap_amount
        ):
            raise Invalid.field(f"items.{i}.monthly_min_amount", "is above the monthly cap")
    start = rating.local_midnight(data.effective_from)
    versions = list(
        session.execute(
            select(PriceCatalog)
            .where(PriceCatalog.service_company_id == company.id)
            .order_by(col(PriceCatalog.effective_from))
            .with_for_update()
        ).scalars()
    )
    for v in versions:
        if v.effective_from >= start or (
            v.effective_until is not None and v.effective_until > start
        ):
            raise Conflict.field(
                "effective_from",
                f"overlaps version {v.version} (in force from {v.effective_from.date()}"
                + (f" to {v.effective_until.date()})" if v.effective_until else ")")
                + "; a new version must start after every existing one",
                "overlap",
            )
    # rating has passed over this time already (priced or, before any price list, not): new
    # prices there would never be applied. Rated usage alone misses unpriced time.
    billed_by = func.coalesce(
        col(Contract.service_company_id), col(UsageInterval.service_company_id)
    )
    rated_past = session.execute(
        select(func.max(UsageInterval.rated_until))
        .select_from(UsageInterval)
        .outerjoin(Contract, col(Contract.id) == col(UsageInterval.contract_id))
        .where(
            billed_by == company.id,
            col(UsageInterval.rated_until) > col(UsageInterval.started_at),
        )
    ).scalar_one()
    if rated_past is not None and rated_past > start:
        raise Conflict.field(
            "effective_from",
            f"usage up to {rated_past.isoformat()} is already rated at the old prices; "
            "a price change can only start after it",
            "already_rated",
        )
    previous = versions[-1] if versions else None
    catalog = PriceCatalog(
        service_company_id=company.id,
        version=(previous.version + 1) if previous else 1,
        name=data.name,
        effective_from=start,
        bill_compute_when_off=data.bill_compute_when_off,
        created_by=principal.username[:64],
    )
    session.add(catalog)
    if previous is not None and previous.effective_until is None:
        previous.effective_until = start
        session.add(previous)
    session.flush()
    for item in data.items:
        session.add(
            PriceItem(
                catalog_id=catalog.id,
                resource_class=item.resource_class,
                unit_price=item.unit_price,
                monthly_cap_amount=item.monthly_cap_amount,
                monthly_min_amount=item.monthly_min_amount,
            )
        )
    session.flush()
    audit.record(
        session,
        principal,
        "price_catalog.create",
        tenant=tenancy.get_center(session),
        target_type="price_catalog",
        target_id=catalog.id,
        after={
            "service_company": company.code,
            "version": catalog.version,
            "effective_from": catalog.effective_from,
            "items": {i.resource_class: str(i.unit_price) for i in data.items},
        },
    )
    return catalog


def public(session: Session, catalog: PriceCatalog) -> PriceCatalogPublic:
    items = session.execute(
        select(PriceItem)
        .where(PriceItem.catalog_id == catalog.id)
        .order_by(col(PriceItem.resource_class))
    ).scalars()
    return PriceCatalogPublic(
        id=catalog.id,
        service_company_id=catalog.service_company_id,
        version=catalog.version,
        name=catalog.name,
        currency=catalog.currency,
        effective_from=catalog.effective_from,
        effective_until=catalog.effective_until,
        bill_compute_when_off=catalog.bill_compute_when_off,
        items=[PriceItemPublic.model_validate(i) for i in items],
        created_at=catalog.created_at,
        created_by=catalog.created_by,
    )


def list_catalogs(session: Session, company_id: uuid.UUID) -> list[PriceCatalog]:
    """Price lists are public inside the government cloud: anyone signed in may read them."""
    _company(session, company_id)
    return list(
        session.execute(
            select(PriceCatalog)
            .where(PriceCatalog.service_company_id == company_id)
            .order_by(col(PriceCatalog.version))
        ).scalars()
    )


def get_catalog(session: Session, catalog_id: uuid.UUID) -> PriceCatalog:
    catalog = session.get(PriceCatalog, catalog_id)
    if catalog is None:
        raise NotFound(f"price catalog {catalog_id} not found")
    return catalog
