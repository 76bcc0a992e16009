"""Login, the caller's own account, and the caller's API tokens."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response

from api.deps import PrincipalDep, SessionDep
from api.schemas import Page
from broker.core.errors import NotFound
from broker.tenancy import auth, users
from broker.tenancy.models import User
from broker.tenancy.schemas import (
    BindingView,
    LoginRequest,
    LoginResponse,
    MePublic,
    PasswordChange,
    TokenCreate,
    TokenCreated,
    TokenPublic,
    UserPublic,
)

router = APIRouter(prefix="/api/v1", tags=["identity"])


@router.post("/auth/login")
def login(body: LoginRequest, session: SessionDep) -> LoginResponse:
    outcome = auth.login(session, body.username, body.password)
    # failed attempts are committed too: the lock-out counter must survive the refusal
    session.commit()
    if outcome.error is not None:
        raise outcome.error
    assert outcome.token is not None and outcome.expires_at is not None
    return LoginResponse(access_token=outcome.token, expires_at=outcome.expires_at)


@router.get("/me")
def me(session: SessionDep, principal: PrincipalDep) -> MePublic:
    user = session.get(User, principal.user_id) if principal.user_id else None
    if user is None:
        raise NotFound("the system principal has no account")
    return MePublic(
        user=UserPublic.model_validate(user),
        auth_method=principal.auth_method,
        bindings=[BindingView(**b) for b in users.bindings_view(session, user.id)],
    )


@router.post("/me/password", status_code=204)
def change_password(body: PasswordChange, session: SessionDep, principal: PrincipalDep) -> Response:
    auth.change_own_password(session, principal, body.current_password, body.new_password)
    session.commit()
    return Response(status_code=204)


@router.get("/tokens", response_model=Page[TokenPublic])
def list_tokens(session: SessionDep, principal: PrincipalDep) -> Page[TokenPublic]:
    rows = auth.list_tokens(session, principal)
    return Page(data=[TokenPublic.model_validate(r) for r in rows], count=len(rows))


@router.post("/tokens", status_code=201)
def create_token(body: TokenCreate, session: SessionDep, principal: PrincipalDep) -> TokenCreated:
    token, raw = auth.create_token(
        session, principal, name=body.name, expires_in_days=body.expires_in_days
    )
    session.commit()
    return TokenCreated(**TokenPublic.model_validate(token).model_dump(), token=raw)


@router.delete("/tokens/{token_id}", status_code=204)
def revoke_token(token_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> Response:
    auth.revoke_token(session, principal, token_id)
    session.commit()
    return Response(status_code=204)
