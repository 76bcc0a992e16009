from __future__ import annotations

import uuid
from typing import Literal

from fastapi import APIRouter, Response

from api.deps import DEFAULT_PAGE, Cursor, Limit, PrincipalDep, SessionDep
from api.schemas import Page
from broker.tenancy import users
from broker.tenancy.schemas import RoleBindingCreate, RoleBindingPublic

router = APIRouter(prefix="/api/v1/role-bindings", tags=["role bindings"])


@router.get("", response_model=Page[RoleBindingPublic])
def list_bindings(
    session: SessionDep,
    principal: PrincipalDep,
    user_id: uuid.UUID | None = None,
    tenant_id: uuid.UUID | None = None,
    role: Literal["center_admin", "agency_admin", "member", "finance", "auditor"] | None = None,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_PAGE,
) -> Page[RoleBindingPublic]:
    rows, nxt = users.list_bindings(
        session,
        principal,
        user_id=user_id,
        tenant_id=tenant_id,
        role=role,
        cursor=cursor,
        limit=limit,
    )
    return Page(
        data=[RoleBindingPublic.model_validate(r) for r in rows], count=len(rows), next_cursor=nxt
    )


@router.post("", status_code=201)
def create_binding(
    body: RoleBindingCreate, session: SessionDep, principal: PrincipalDep
) -> RoleBindingPublic:
    binding = users.create_binding(session, principal, body)
    session.commit()
    return RoleBindingPublic.model_validate(binding)


@router.get("/{binding_id}")
def get_binding(
    binding_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> RoleBindingPublic:
    return RoleBindingPublic.model_validate(users.get_binding(session, principal, binding_id))


@router.delete("/{binding_id}", status_code=204)
def delete_binding(binding_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> Response:
    users.delete_binding(session, principal, binding_id)
    session.commit()
    return Response(status_code=204)
