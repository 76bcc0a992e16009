from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response

from api.deps import DEFAULT_PAGE, NO_NUL, Cursor, Limit, PrincipalDep, SessionDep
from api.schemas import Page
from broker.tenancy import service
from broker.tenancy.schemas import TenantCreate, TenantPublic, TenantUpdate

router = APIRouter(prefix="/api/v1/tenants", tags=["tenants"])


@router.get("", response_model=Page[TenantPublic])
def list_tenants(
    session: SessionDep,
    principal: PrincipalDep,
    kind: Literal["center", "agency", "system"] | None = None,
    parent_id: uuid.UUID | None = None,
    status: Literal["active", "suspended", "archived"] | None = None,
    q: Annotated[str | None, Query(pattern=NO_NUL, max_length=100)] = None,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_PAGE,
) -> Page[TenantPublic]:
    rows, nxt = service.list_tenants(
        session,
        principal,
        kind=kind,
        parent_id=parent_id,
        status=status,
        q=q,
        cursor=cursor,
        limit=limit,
    )
    return Page(
        data=[TenantPublic.model_validate(r) for r in rows], count=len(rows), next_cursor=nxt
    )


@router.post("", status_code=201)
def create_tenant(body: TenantCreate, session: SessionDep, principal: PrincipalDep) -> TenantPublic:
    tenant = service.create_tenant(session, principal, body)
    session.commit()
    return TenantPublic.model_validate(tenant)


@router.get("/{tenant_id}")
def get_tenant(tenant_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> TenantPublic:
    return TenantPublic.model_validate(service.get_tenant(session, principal, tenant_id))


@router.patch("/{tenant_id}")
def update_tenant(
    tenant_id: uuid.UUID, body: TenantUpdate, session: SessionDep, principal: PrincipalDep
) -> TenantPublic:
    tenant = service.update_tenant(session, principal, tenant_id, body)
    session.commit()
    return TenantPublic.model_validate(tenant)


@router.delete("/{tenant_id}", status_code=204)
def delete_tenant(tenant_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> Response:
    service.delete_tenant(session, principal, tenant_id)
    session.commit()
    return Response(status_code=204)
