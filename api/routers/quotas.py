from __future__ import annotations

import uuid
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from api.deps import DEFAULT_PAGE, NO_NUL, Cursor, Limit, PrincipalDep, SessionDep
from api.schemas import Page
from broker.core.settings import get_settings
from broker.tenancy.models import Tenant
from quotas import ledger, requests, service
from quotas.schemas import (
    CheckRequest,
    CheckResult,
    QuotaPublic,
    QuotaRequestCreate,
    QuotaRequestDecision,
    QuotaRequestPublic,
    QuotaRequestReject,
    QuotaSet,
    ResourceClassPublic,
    Shortfall,
    TenantUsage,
    UsageLine,
    UsageReport,
)

router = APIRouter(tags=["quotas"])
ClassPath = Annotated[str, Path(min_length=1, max_length=32)]


def _public(v: service.QuotaView) -> QuotaPublic:
    q = v.quota
    return QuotaPublic(
        id=q.id,
        tenant_id=v.tenant.id,
        tenant_code=v.tenant.code,
        resource_class=q.resource_class,
        limit=q.hard_limit,
        valid_from=q.valid_from,
        valid_until=q.valid_until,
        days_remaining=v.days_remaining,
        status=v.status,
        committed=q.committed,
        reserved=v.reserved,
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
    resource_class: Annotated[str | None, Query(pattern=NO_NUL, max_length=32)] = None,
) -> Page[QuotaPublic]:
    rows = service.list_quotas(
        session, principal, tenant_id=tenant_id, resource_class=resource_class
    )
    data = [_public(v) for v in service.views(session, rows)]
    return Page(data=data, count=len(data))


@router.get("/api/v1/quotas/{tenant_id}/{resource_class}")
def get_quota(
    tenant_id: uuid.UUID, resource_class: ClassPath, session: SessionDep, principal: PrincipalDep
) -> QuotaPublic:
    q, tenant = service.get_quota(session, principal, tenant_id, resource_class)
    return _public(service.views(session, [(q, tenant)])[0])


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
    return _public(service.views(session, [(q, tenant)])[0])


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


def _usage(tenant: Tenant, lines: list[UsageLine]) -> TenantUsage:
    return TenantUsage(
        tenant_id=tenant.id,
        tenant_code=tenant.code,
        tenant_name=tenant.name_zh,
        kind=tenant.kind,
        lines=lines,
    )


@router.get("/api/v1/tenants/{tenant_id}/usage")
def tenant_usage(tenant_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> UsageReport:
    tenant, lines, children = service.usage_report(session, principal, tenant_id)
    return UsageReport(tenant=_usage(tenant, lines), children=[_usage(c, ls) for c, ls in children])


# --- quota change requests ---------------------------------------------------------------------

requests_router = APIRouter(prefix="/api/v1/quota-requests", tags=["quota requests"])


@requests_router.get("", response_model=Page[QuotaRequestPublic])
def list_requests(
    session: SessionDep,
    principal: PrincipalDep,
    state: Literal["pending", "approved", "partially_approved", "rejected", "withdrawn"]
    | None = None,
    tenant_id: uuid.UUID | None = None,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_PAGE,
) -> Page[QuotaRequestPublic]:
    rows, nxt = requests.list_requests(
        session, principal, state=state, tenant_id=tenant_id, cursor=cursor, limit=limit
    )
    data = [QuotaRequestPublic.model_validate(r) for r in rows]
    return Page(data=data, count=len(data), next_cursor=nxt)


@requests_router.post("", status_code=201)
def create_request(
    body: QuotaRequestCreate, session: SessionDep, principal: PrincipalDep
) -> QuotaRequestPublic:
    req = requests.create(
        session,
        principal,
        tenant_id=body.tenant_id,
        changes=body.changes,
        justification=body.justification,
    )
    session.commit()
    return QuotaRequestPublic.model_validate(req)


@requests_router.get("/{request_id}")
def get_request(
    request_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> QuotaRequestPublic:
    return QuotaRequestPublic.model_validate(requests.get(session, principal, request_id))


@requests_router.put("/{request_id}/attachment")
async def put_attachment(
    request_id: uuid.UUID,
    file: UploadFile,
    session: SessionDep,
    principal: PrincipalDep,
) -> QuotaRequestPublic:
    # read at most one byte past the limit: enough to refuse an oversize upload
    content = await file.read(get_settings().quota_attachment_max_bytes + 1)
    req = await run_in_threadpool(
        requests.attach,
        session,
        principal,
        request_id,
        filename=file.filename or "attachment",
        content_type=file.content_type or "application/octet-stream",
        content=content,
    )
    await run_in_threadpool(session.commit)
    return QuotaRequestPublic.model_validate(req)


@requests_router.get("/{request_id}/attachment")
def get_attachment(request_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> Response:
    req, content = requests.attachment(session, principal, request_id)
    return Response(
        content,
        media_type=req.attachment_type or "application/octet-stream",
        headers={
            "Content-Disposition": "attachment; filename*=UTF-8''"
            + quote(req.attachment_name or "attachment"),
            "X-Content-Type-Options": "nosniff",
        },
    )


@requests_router.post("/{request_id}/approve")
def approve_request(
    request_id: uuid.UUID, body: QuotaRequestDecision, session: SessionDep, principal: PrincipalDep
) -> QuotaRequestPublic:
    req = requests.approve(
        session, principal, request_id, approved=body.approved, reason=body.reason
    )
    session.commit()
    return QuotaRequestPublic.model_validate(req)


@requests_router.post("/{request_id}/reject")
def reject_request(
    request_id: uuid.UUID, body: QuotaRequestReject, session: SessionDep, principal: PrincipalDep
) -> QuotaRequestPublic:
    req = requests.reject(session, principal, request_id, reason=body.reason)
    session.commit()
    return QuotaRequestPublic.model_validate(req)


@requests_router.post("/{request_id}/withdraw")
def withdraw_request(
    request_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> QuotaRequestPublic:
    req = requests.withdraw(session, principal, request_id)
    session.commit()
    return QuotaRequestPublic.model_validate(req)
