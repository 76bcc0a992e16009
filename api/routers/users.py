from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api.deps import DEFAULT_PAGE, NO_NUL, Cursor, Limit, PrincipalDep, SessionDep
from api.schemas import Page
from broker.tenancy import users
from broker.tenancy.schemas import PasswordSet, UserCreate, UserPublic, UserUpdate

router = APIRouter(prefix="/api/v1/users", tags=["users"])


@router.get("", response_model=Page[UserPublic])
def list_users(
    session: SessionDep,
    principal: PrincipalDep,
    tenant_id: uuid.UUID | None = None,
    status: Literal["active", "disabled"] | None = None,
    q: Annotated[str | None, Query(pattern=NO_NUL, max_length=100)] = None,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_PAGE,
) -> Page[UserPublic]:
    rows, nxt = users.list_users(
        session, principal, tenant_id=tenant_id, status=status, q=q, cursor=cursor, limit=limit
    )
    return Page(data=[UserPublic.model_validate(r) for r in rows], count=len(rows), next_cursor=nxt)


@router.post("", status_code=201)
def create_user(body: UserCreate, session: SessionDep, principal: PrincipalDep) -> UserPublic:
    user = users.create_user(session, principal, body)
    session.commit()
    return UserPublic.model_validate(user)


@router.get("/{user_id}")
def get_user(user_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> UserPublic:
    return UserPublic.model_validate(users.get_user(session, principal, user_id))


@router.patch("/{user_id}")
def update_user(
    user_id: uuid.UUID, body: UserUpdate, session: SessionDep, principal: PrincipalDep
) -> UserPublic:
    user = users.update_user(session, principal, user_id, body)
    session.commit()
    return UserPublic.model_validate(user)


@router.post("/{user_id}/password")
def set_password(
    user_id: uuid.UUID, body: PasswordSet, session: SessionDep, principal: PrincipalDep
) -> UserPublic:
    user = users.set_password(session, principal, user_id, body.password)
    session.commit()
    return UserPublic.model_validate(user)


@router.post("/{user_id}/unlock")
def unlock_user(user_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> UserPublic:
    user = users.unlock(session, principal, user_id)
    session.commit()
    return UserPublic.model_validate(user)
