from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Query

from api.deps import PrincipalDep, SessionDep
from api.schemas import Page
from broker.core import clock
from broker.tenancy.models import Tenant
from quotas import ledger, service
from quotas.models import Quota
from quotas.schemas import (
    CheckRequest,
    CheckResult,
    QuotaPublic,
    QuotaSet,
    ResourceClassPublic,
    Shortfall,
    TenantUsage,
    UsageLine,
    UsageReport,
)

router = APIRouter(tags=["quotas"])
ClassPath = Annotated[str, Path(min_length=1, max_length=32)]


def _public(q: Quota, tenant: Tenant) -> QuotaPublic:
    now = clock.now()
    usage = q.committed + q.reserved
    return QuotaPublic(
        id=q.id,
        tenant_id=tenant.id,
        tenant_code=tenant.code,
        resource_class=q.resource_class,
        limit=q.hard_limit,
        valid_from=q.valid_from,
        valid_until=q.valid_until,
        days_remaining=service.days_remaining(q.valid_until, now),
        status=service.quota_status(q, usage, now),
        committed=q.committed,
        reserved=q.reserved,
    )


@router.get("/api/v1/resource-classes", response_model=Page[ResourceClassPublic])
def list_resource_classes(session: SessionDep, _: PrincipalDep) -> Page[ResourceClassPublic]:
    rows = [
        ResourceClassPublic.model_validate(rc) for rc in ledger.resource_classes(session).values()
    ]
    return Page(data=rows, count=len(rows))


@router.get("/api/v1/quotas", response_model=Page[QuotaPublic])
def list_quotas(
    session: SessionDep,
    principal: PrincipalDep,
    tenant_id: uuid.UUID | None = None,
    resource_class: Annotated[str | None, Query(max_length=32)] = None,
) -> Page[QuotaPublic]:
    rows = service.list_quotas(
        session, principal, tenant_id=tenant_id, resource_class=resource_class
    )
    data = [_public(q, t) for q, t in rows]
    return Page(data=data, count=len(data))


@router.get("/api/v1/quotas/{tenant_id}/{resource_class}")
def get_quota(
    tenant_id: uuid.UUID, resource_class: ClassPath, session: SessionDep, principal: PrincipalDep
) -> QuotaPublic:
    q, tenant = service.get_quota(session, principal, tenant_id, resource_class)
    return _public(q, tenant)


@router.put("/api/v1/quotas/{tenant_id}/{resource_class}")
def set_quota(
    tenant_id: uuid.UUID,
    resource_class: ClassPath,
    body: QuotaSet,
    session: SessionDep,
    principal: PrincipalDep,
) -> QuotaPublic:
    q = service.set_quota(
        session,
        principal,
        tenant_id,
        resource_class,
        limit=body.limit,
        valid_from=body.valid_from,
        valid_until=body.valid_until,
        force=body.force,
    )
    session.commit()
    tenant = session.get(Tenant, tenant_id)
    assert tenant is not None
    return _public(q, tenant)


@router.post("/api/v1/quotas/check")
def check_quota(body: CheckRequest, session: SessionDep, principal: PrincipalDep) -> CheckResult:
    over = service.check_fit(session, principal, body.tenant_id, body.deltas)
    return CheckResult(
        fits=not over,
        shortfalls=[
            Shortfall(
                resource_class=o.resource_class,
                tenant_id=o.tenant_id,
                tenant_code=o.tenant_code,
                level=o.level,
                limit=o.limit,
                usage=o.usage,
                requested=o.requested,
                shortfall=o.shortfall,
                reason=o.reason,
            )
            for o in over
        ],
    )


def _usage(tenant: Tenant, lines: list[service.UsageLine]) -> TenantUsage:
    return TenantUsage(
        tenant_id=tenant.id,
        tenant_code=tenant.code,
        tenant_name=tenant.name_zh,
        kind=tenant.kind,
        lines=[UsageLine(**line.__dict__) for line in lines],
    )


@router.get("/api/v1/tenants/{tenant_id}/usage")
def tenant_usage(tenant_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> UsageReport:
    tenant, lines, children = service.usage_report(session, principal, tenant_id)
    return UsageReport(tenant=_usage(tenant, lines), children=[_usage(c, ls) for c, ls in children])
