"""Users and their role bindings.

A user belongs to one home tenant; whoever may manage users there manages the user — unless the
user holds roles the manager could not grant, which would make resetting that user's password an
escalation.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from broker.audit import service as audit
from broker.core import clock
from broker.core.authz import GRANTABLE, Principal, Role
from broker.core.errors import Conflict, Forbidden, Invalid, NotFound
from broker.core.pagination import DEFAULT_LIMIT, decode_cursor, encode_cursor
from broker.tenancy.authz import authorize
from broker.tenancy.models import ApiToken, RoleBinding, Tenant, TenantKind, TenantStatus, User
from broker.tenancy.passwords import check_policy, hash_password
from broker.tenancy.schemas import RoleBindingCreate, UserCreate, UserUpdate

# where each role may be bound: center-wide roles at the center, agency roles at agencies
ROLE_TENANT_KINDS: dict[Role, frozenset[str]] = {
    Role.center_admin: frozenset({TenantKind.center}),
    Role.auditor: frozenset({TenantKind.center, TenantKind.agency}),
    Role.finance: frozenset({TenantKind.center, TenantKind.agency}),
    Role.agency_admin: frozenset({TenantKind.agency}),
    Role.member: frozenset({TenantKind.agency, TenantKind.system}),
}


def snapshot(u: User) -> dict[str, Any]:
    return {
        "username": u.username,
        "display_name": u.display_name,
        "email": u.email,
        "phone": u.phone,
        "status": u.status,
        "tenant_id": str(u.tenant_id),
    }


def _tenant(session: Session, tenant_id: uuid.UUID) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"tenant {tenant_id} not found")
    return tenant


def _load_user(
    session: Session, principal: Principal, user_id: uuid.UUID, action: str
) -> tuple[User, Tenant]:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"user {user_id} not found")
    home = _tenant(session, user.tenant_id)
    if principal.user_id == user.id:
        # everyone sees their own account; changing it still takes the right to manage users
        if action != "user.read" and not principal.can(action, home.path):
            raise Forbidden(f"your roles do not allow {action}; use /api/v1/me for your password")
        if action == "user.read":
            return user, home
    authorize(principal, action, home, subject=f"user {user_id}")
    return user, home


def grantable_at(principal: Principal, path: str) -> set[Role]:
    out: set[Role] = set()
    for g in principal.grants:
        if g.covers(path):
            out |= GRANTABLE.get(g.role, frozenset())
    return out


def _bindings_with_paths(session: Session, user_id: uuid.UUID) -> list[tuple[RoleBinding, Tenant]]:
    stmt = (
        select(RoleBinding, Tenant)
        .join(Tenant, col(Tenant.id) == col(RoleBinding.tenant_id))
        .where(RoleBinding.user_id == user_id)
        .order_by(col(RoleBinding.created_at), col(RoleBinding.id))
    )
    return [(b, t) for b, t in session.execute(stmt).all()]


def _ensure_outranks(session: Session, principal: Principal, user: User) -> None:
    if principal.user_id == user.id:
        return
    for binding, tenant in _bindings_with_paths(session, user.id):
        if Role(binding.role) not in grantable_at(principal, tenant.path):
            raise Forbidden(
                f"user {user.username} holds {binding.role} at {tenant.code}, "
                "which you could not grant; ask a center administrator"
            )


def create_user(session: Session, principal: Principal, data: UserCreate) -> User:
    home = session.get(Tenant, data.tenant_id)
    if home is None or not principal.sees(home.path):
        raise Invalid.field("tenant_id", f"no tenant {data.tenant_id}", "not_found")
    authorize(principal, "user.manage", home)
    if home.status == TenantStatus.archived:
        raise Invalid.field("tenant_id", f"{home.kind} {home.code} is archived", "archived")
    if session.execute(select(User.id).where(User.username == data.username)).first():
        raise Conflict.field("username", f"username {data.username!r} is taken", "duplicate")
    user = User(**data.model_dump(exclude={"password"}))
    if data.password is not None:
        check_policy(data.password, username=data.username)
        user.password_hash = hash_password(data.password)
        user.password_changed_at = clock.now()
    session.add(user)
    try:
        session.flush()
    except IntegrityError as exc:
        raise Conflict.field("username", "username is taken", "duplicate") from exc
    audit.record(
        session,
        principal,
        "user.create",
        tenant=home,
        target_type="user",
        target_id=user.id,
        after=snapshot(user) | {"password_set": data.password is not None},
    )
    return user


def get_user(session: Session, principal: Principal, user_id: uuid.UUID) -> User:
    return _load_user(session, principal, user_id, "user.read")[0]


def list_users(
    session: Session,
    principal: Principal,
    *,
    tenant_id: uuid.UUID | None = None,
    status: str | None = None,
    q: str | None = None,
    cursor: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> tuple[list[User], str | None]:
    stmt = (
        select(User)
        .join(Tenant, col(Tenant.id) == col(User.tenant_id))
        .where(principal.scope_filter("user.read", Tenant.path))
    )
    if tenant_id is not None:
        stmt = stmt.where(User.tenant_id == tenant_id)
    if status is not None:
        stmt = stmt.where(User.status == status)
    if q:
        stmt = stmt.where(
            func.lower(User.username).contains(q.lower(), autoescape=True)
            | col(User.display_name).contains(q, autoescape=True)
        )
    if cursor:
        (after,) = decode_cursor(cursor, [str])
        stmt = stmt.where(User.username > after)
    rows = list(session.execute(stmt.order_by(User.username).limit(limit + 1)).scalars())
    next_cursor = encode_cursor(rows[limit - 1].username) if len(rows) > limit else None
    return rows[:limit], next_cursor


def update_user(
    session: Session, principal: Principal, user_id: uuid.UUID, data: UserUpdate
) -> User:
    user, home = _load_user(session, principal, user_id, "user.manage")
    _ensure_outranks(session, principal, user)
    changes = data.model_dump(exclude_unset=True)
    if "tenant_id" in changes and changes["tenant_id"] != user.tenant_id:
        new_home = session.get(Tenant, changes["tenant_id"])
        if new_home is None or not principal.sees(new_home.path):
            raise Invalid.field("tenant_id", f"no tenant {changes['tenant_id']}", "not_found")
        authorize(principal, "user.manage", new_home)
        home = new_home
    if changes.get("status") == "disabled" and principal.user_id == user.id:
        raise Invalid.field("status", "you cannot disable your own account")
    before = snapshot(user)
    for key, value in changes.items():
        setattr(user, key, value)
    after = snapshot(user)
    diff = {k: v for k, v in before.items() if after[k] != v}
    if diff:
        user.updated_at = clock.now()
        session.flush()
        disabled = after["status"] == "disabled" and before["status"] == "active"
        if disabled:
            revoke_all_tokens(session, user)
        action = "user.disable" if disabled else "user.update"
        audit.record(
            session,
            principal,
            action,
            tenant=home,
            target_type="user",
            target_id=user.id,
            before=diff,
            after={k: after[k] for k in diff},
        )
    return user


def set_password(session: Session, principal: Principal, user_id: uuid.UUID, password: str) -> User:
    """An administrator sets a user's password (which also lifts a lock-out)."""
    user, home = _load_user(session, principal, user_id, "user.manage")
    _ensure_outranks(session, principal, user)
    check_policy(password, username=user.username)
    user.password_hash = hash_password(password)
    user.password_changed_at = clock.now()
    user.failed_logins = 0
    user.locked_until = None
    user.updated_at = clock.now()
    session.flush()
    audit.record(
        session,
        principal,
        "user.set_password",
        tenant=home,
        target_type="user",
        target_id=user.id,
        after={"password": "changed"},
    )
    return user


def unlock(session: Session, principal: Principal, user_id: uuid.UUID) -> User:
    user, home = _load_user(session, principal, user_id, "user.manage")
    before = {"locked_until": user.locked_until, "failed_logins": user.failed_logins}
    user.failed_logins = 0
    user.locked_until = None
    user.updated_at = clock.now()
    session.flush()
    audit.record(
        session,
        principal,
        "user.unlock",
        tenant=home,
        target_type="user",
        target_id=user.id,
        before=before,
        after={"locked_until": None, "failed_logins": 0},
    )
    return user


# --- role bindings -----------------------------------------------------------------------------


def create_binding(session: Session, principal: Principal, data: RoleBindingCreate) -> RoleBinding:
    user, _ = _load_user(session, principal, data.user_id, "user.read")
    tenant = session.get(Tenant, data.tenant_id)
    if tenant is None or not principal.sees(tenant.path):
        raise Invalid.field("tenant_id", f"no tenant {data.tenant_id}", "not_found")
    authorize(principal, "rolebinding.manage", tenant)
    role = Role(data.role)
    if role not in grantable_at(principal, tenant.path):
        raise Forbidden(f"you cannot grant {role} at {tenant.code}")
    if tenant.kind not in ROLE_TENANT_KINDS[role]:
        kinds = " or ".join(sorted(ROLE_TENANT_KINDS[role]))
        raise Invalid.field(
            "role", f"{role} is bound at a {kinds}, not at a {tenant.kind}", "scope"
        )
    if tenant.status == TenantStatus.archived:
        raise Invalid.field("tenant_id", f"{tenant.kind} {tenant.code} is archived", "archived")
    dup = session.execute(
        select(RoleBinding.id).where(
            RoleBinding.user_id == user.id,
            RoleBinding.role == role.value,
            RoleBinding.tenant_id == tenant.id,
        )
    ).first()
    if dup is not None:
        raise Conflict.field(
            "role", f"{user.username} already holds {role} at {tenant.code}", "duplicate"
        )
    binding = RoleBinding(user_id=user.id, role=role.value, tenant_id=tenant.id)
    session.add(binding)
    try:
        session.flush()
    except IntegrityError as exc:
        raise Conflict.field("role", "this binding already exists", "duplicate") from exc
    audit.record(
        session,
        principal,
        "rolebinding.create",
        tenant=tenant,
        target_type="role_binding",
        target_id=binding.id,
        after={"user": user.username, "role": role.value, "tenant": tenant.code},
    )
    return binding


def _binding_for(
    session: Session, principal: Principal, binding_id: uuid.UUID, action: str
) -> tuple[RoleBinding, Tenant]:
    binding = session.get(RoleBinding, binding_id)
    if binding is None:
        raise NotFound(f"role binding {binding_id} not found")
    tenant = _tenant(session, binding.tenant_id)
    if action == "rolebinding.read" and binding.user_id == principal.user_id:
        return binding, tenant  # everybody may see their own bindings
    authorize(principal, action, tenant, subject=f"role binding {binding_id}")
    return binding, tenant


def get_binding(session: Session, principal: Principal, binding_id: uuid.UUID) -> RoleBinding:
    return _binding_for(session, principal, binding_id, "rolebinding.read")[0]


def delete_binding(session: Session, principal: Principal, binding_id: uuid.UUID) -> None:
    binding, tenant = _binding_for(session, principal, binding_id, "rolebinding.manage")
    if Role(binding.role) not in grantable_at(principal, tenant.path):
        raise Forbidden(f"you cannot revoke {binding.role} at {tenant.code}")
    if binding.role == Role.center_admin:
        remaining = session.execute(
            select(func.count())
            .select_from(RoleBinding)
            .join(User, col(User.id) == col(RoleBinding.user_id))
            .where(
                RoleBinding.role == Role.center_admin.value,
                User.status == "active",
                RoleBinding.id != binding.id,
            )
        ).scalar_one()
        if remaining == 0:
            raise Conflict("this is the last active center_admin binding; grant another first")
    user = session.get(User, binding.user_id)
    audit.record(
        session,
        principal,
        "rolebinding.delete",
        tenant=tenant,
        target_type="role_binding",
        target_id=binding.id,
        before={
            "user": user.username if user else str(binding.user_id),
            "role": binding.role,
            "tenant": tenant.code,
        },
    )
    session.delete(binding)
    session.flush()


def list_bindings(
    session: Session,
    principal: Principal,
    *,
    user_id: uuid.UUID | None = None,
    tenant_id: uuid.UUID | None = None,
    role: str | None = None,
    cursor: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> tuple[list[RoleBinding], str | None]:
    visible = principal.scope_filter("rolebinding.read", Tenant.path)
    if principal.user_id is not None:
        visible = visible | (RoleBinding.user_id == principal.user_id)  # one's own, always
    stmt = (
        select(RoleBinding)
        .join(Tenant, col(Tenant.id) == col(RoleBinding.tenant_id))
        .where(visible)
    )
    if user_id is not None:
        stmt = stmt.where(RoleBinding.user_id == user_id)
    if tenant_id is not None:
        stmt = stmt.where(RoleBinding.tenant_id == tenant_id)
    if role is not None:
        stmt = stmt.where(RoleBinding.role == role)
    if cursor:
        after_ts, after_id = decode_cursor(cursor, [datetime, uuid.UUID])
        stmt = stmt.where(
            (RoleBinding.created_at > after_ts)
            | ((RoleBinding.created_at == after_ts) & (RoleBinding.id > after_id))
        )
    stmt = stmt.order_by(col(RoleBinding.created_at), col(RoleBinding.id)).limit(limit + 1)
    rows = list(session.execute(stmt).scalars())
    nxt = None
    if len(rows) > limit:
        last = rows[limit - 1]
        nxt = encode_cursor(last.created_at, last.id)
    return rows[:limit], nxt


def bindings_view(session: Session, user_id: uuid.UUID) -> list[dict[str, Any]]:
    return [
        {
            "id": b.id,
            "role": b.role,
            "tenant_id": t.id,
            "tenant_code": t.code,
            "tenant_name": t.name_zh,
            "tenant_kind": t.kind,
        }
        for b, t in _bindings_with_paths(session, user_id)
    ]


def revoke_all_tokens(session: Session, user: User) -> int:
    """Used when a user is disabled: their tokens stop working at once and stay revoked."""
    now = clock.now()
    tokens = (
        session.execute(
            select(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))  # type: ignore[union-attr]
        )
        .scalars()
        .all()
    )
    for t in tokens:
        t.revoked_at = now
    return len(tokens)
