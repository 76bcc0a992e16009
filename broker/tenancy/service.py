"""The tenant tree: one center → agencies (委办局) → business systems (业务系统).

Center administrators manage agencies; agency administrators create and edit the systems inside
their agency. Suspension blocks the subtree's writes (see authz); archiving is refused while the
tenant still owns something, which other domains report through `register_ownership_check`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from broker.audit import service as audit
from broker.core import clock
from broker.core.authz import Principal
from broker.core.errors import Conflict, Invalid, NotFound
from broker.core.pagination import DEFAULT_LIMIT, decode_cursor, encode_cursor
from broker.tenancy.authz import authorize, authorize_at_parent
from broker.tenancy.models import RoleBinding, Tenant, TenantKind, TenantStatus, User
from broker.tenancy.schemas import TenantCreate, TenantUpdate

PARENT_KIND = {TenantKind.agency: TenantKind.center, TenantKind.system: TenantKind.agency}

# (session, tenant, purpose) -> what the tenant still holds, in words; purpose is "archive" or
# "delete" (deleting also needs the tenant's history gone, archiving only its live resources)
OwnershipCheck = Callable[[Session, Tenant, str], list[str]]
_ownership_checks: list[OwnershipCheck] = []


def register_ownership_check(check: OwnershipCheck) -> None:
    """Other domains (quotas, inventory, billing) say what a tenant still owns."""
    if check not in _ownership_checks:
        _ownership_checks.append(check)


def manage_action(kind: str) -> str:
    return "system.manage" if kind == TenantKind.system else "tenant.manage"


def snapshot(t: Tenant) -> dict[str, Any]:
    return {
        "code": t.code,
        "kind": t.kind,
        "parent_id": str(t.parent_id) if t.parent_id else None,
        "name_zh": t.name_zh,
        "name_en": t.name_en,
        "status": t.status,
        "contact_name": t.contact_name,
        "contact_email": t.contact_email,
        "contact_phone": t.contact_phone,
        "description": t.description,
    }


def get_center(session: Session) -> Tenant | None:
    stmt = select(Tenant).where(Tenant.kind == TenantKind.center.value)
    return session.execute(stmt).scalars().first()


def _load(session: Session, tenant_id: uuid.UUID) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"tenant {tenant_id} not found")
    return tenant


def _load_for(session: Session, principal: Principal, tenant_id: uuid.UUID, action: str) -> Tenant:
    tenant = _load(session, tenant_id)
    authorize(principal, action, tenant)
    return tenant


def create_center(
    session: Session, principal: Principal, *, code: str, name_zh: str, name_en: str | None = None
) -> Tenant:
    if get_center(session) is not None:
        raise Conflict("the center already exists; there is exactly one")
    tid = uuid.uuid4()
    center = Tenant(
        id=tid,
        kind=TenantKind.center.value,
        code=code,
        name_zh=name_zh,
        name_en=name_en,
        path=f"/{tid.hex}/",
    )
    _ensure_code_free(session, code)
    session.add(center)
    session.flush()
    audit.record(
        session,
        principal,
        "tenant.create",
        tenant=center,
        target_type="tenant",
        target_id=center.id,
        after=snapshot(center),
    )
    return center


def _ensure_code_free(session: Session, code: str, *, field: str = "code") -> None:
    taken = session.execute(select(Tenant.id).where(Tenant.code == code)).first()
    if taken is not None:
        raise Conflict.field(field, f"tenant code {code!r} is already used", "duplicate")


def _check_parent(
    session: Session, principal: Principal, parent_id: uuid.UUID, kind: str
) -> Tenant:
    parent = session.get(Tenant, parent_id)
    if parent is None or not principal.sees(parent.path):
        raise Invalid.field("parent_id", f"no tenant {parent_id} to put this under", "not_found")
    want = PARENT_KIND[TenantKind(kind)]
    if parent.kind != want:
        raise Invalid.field(
            "parent_id", f"a {kind} must be placed under a {want}, not a {parent.kind}", "kind"
        )
    if parent.status == TenantStatus.archived:
        raise Invalid.field("parent_id", f"{parent.kind} {parent.code} is archived", "archived")
    return parent


def create_tenant(session: Session, principal: Principal, data: TenantCreate) -> Tenant:
    parent = _check_parent(session, principal, data.parent_id, data.kind)
    authorize(principal, manage_action(data.kind), parent)
    _ensure_code_free(session, data.code)
    tid = uuid.uuid4()
    tenant = Tenant(
        id=tid,
        parent_id=parent.id,
        path=f"{parent.path}{tid.hex}/",
        **data.model_dump(exclude={"parent_id"}),
    )
    session.add(tenant)
    _flush_unique(session)
    audit.record(
        session,
        principal,
        "tenant.create",
        tenant=tenant,
        target_type="tenant",
        target_id=tenant.id,
        after=snapshot(tenant),
    )
    return tenant


def _flush_unique(session: Session) -> None:
    """A concurrent insert of the same code loses here rather than with a 500."""
    try:
        session.flush()
    except IntegrityError as exc:
        raise Conflict.field("code", "tenant code is already used", "duplicate") from exc


def get_tenant(session: Session, principal: Principal, tenant_id: uuid.UUID) -> Tenant:
    return _load_for(session, principal, tenant_id, "tenant.read")


def list_tenants(
    session: Session,
    principal: Principal,
    *,
    kind: str | None = None,
    parent_id: uuid.UUID | None = None,
    status: str | None = None,
    q: str | None = None,
    cursor: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> tuple[list[Tenant], str | None]:
    stmt = select(Tenant).where(principal.scope_filter("tenant.read", Tenant.path))
    if kind is not None:
        stmt = stmt.where(Tenant.kind == kind)
    if parent_id is not None:
        stmt = stmt.where(Tenant.parent_id == parent_id)
    if status is not None:
        stmt = stmt.where(Tenant.status == status)
    if q:
        # autoescape: a "_" or "%" typed by the user is a character, not a wildcard
        stmt = stmt.where(
            func.lower(Tenant.code).contains(q.lower(), autoescape=True)
            | col(Tenant.name_zh).contains(q, autoescape=True)
            | func.lower(func.coalesce(Tenant.name_en, "")).contains(q.lower(), autoescape=True)
        )
    if cursor:
        (after,) = decode_cursor(cursor, [str])
        stmt = stmt.where(Tenant.code > after)
    rows = list(session.execute(stmt.order_by(Tenant.code).limit(limit + 1)).scalars())
    next_cursor = encode_cursor(rows[limit - 1].code) if len(rows) > limit else None
    return rows[:limit], next_cursor


def update_tenant(
    session: Session, principal: Principal, tenant_id: uuid.UUID, data: TenantUpdate
) -> Tenant:
    tenant = _load(session, tenant_id)
    changes = data.model_dump(exclude_unset=True)
    new_status = changes.pop("status", None)
    new_parent = changes.pop("parent_id", None)
    new_status = None if new_status == tenant.status else new_status
    new_parent = None if new_parent == tenant.parent_id else new_parent
    action = manage_action(tenant.kind)
    if tenant.kind == TenantKind.center:
        authorize(principal, "tenant.manage", tenant)
        if new_status or new_parent:
            field = "status" if new_status else "parent_id"
            raise Invalid.field(field, "the center is always active and has no parent")
    elif new_status is not None:
        # status belongs to whoever manages the parent, so a suspended system can be reactivated
        assert tenant.parent_id is not None
        authorize_at_parent(principal, action, tenant, _load(session, tenant.parent_id))
    else:
        authorize(principal, action, tenant)
    if tenant.status == TenantStatus.archived and new_status is None and (changes or new_parent):
        raise Conflict(f"{tenant.kind} {tenant.code} is archived; reactivate it before editing")
    before = snapshot(tenant)
    if new_status is not None:
        _change_status(session, principal, tenant, new_status)
    for key, value in changes.items():
        setattr(tenant, key, value)
    if new_parent is not None:
        _move(session, principal, tenant, new_parent)
    after = snapshot(tenant)
    edited = {k: v for k, v in before.items() if after[k] != v and k != "status"}
    if edited or new_status is not None:
        tenant.updated_at = clock.now()
        session.flush()
    if edited:
        audit.record(
            session,
            principal,
            "tenant.update",
            tenant=tenant,
            target_type="tenant",
            target_id=tenant.id,
            before=edited,
            after={k: after[k] for k in edited},
        )
    return tenant


def _move(session: Session, principal: Principal, tenant: Tenant, parent_id: uuid.UUID) -> None:
    target = session.get(Tenant, parent_id)
    if target is not None and target.path.startswith(tenant.path):
        raise Invalid.field(
            "parent_id", "a tenant cannot be moved under itself or its descendant", "cycle"
        )
    parent = _check_parent(session, principal, parent_id, tenant.kind)
    authorize(principal, manage_action(tenant.kind), parent)
    old_path, new_path = tenant.path, f"{parent.path}{tenant.id.hex}/"
    session.flush()
    session.execute(
        update(Tenant)
        .where(col(Tenant.path).startswith(old_path))
        .values(path=new_path + func.substr(Tenant.path, len(old_path) + 1))
        .execution_options(synchronize_session=False)
    )
    session.expire_all()
    tenant.parent_id = parent.id
    session.flush()


def _change_status(session: Session, principal: Principal, tenant: Tenant, status: str) -> None:
    if status == TenantStatus.archived:
        held = owned_resources(session, tenant, "archive")
        if held:
            raise Conflict(
                f"{tenant.kind} {tenant.code} still owns resources: " + "; ".join(held),
                extra={"owned": held},
            )
    if status != TenantStatus.archived and tenant.parent_id is not None:
        parent = _load(session, tenant.parent_id)
        if parent.status == TenantStatus.archived:
            raise Conflict(
                f"{parent.kind} {parent.code} is archived; reactivate it before its {tenant.kind}s"
            )
    before = tenant.status
    tenant.status = status
    verb = {"active": "activate", "suspended": "suspend", "archived": "archive"}[status]
    audit.record(
        session,
        principal,
        f"tenant.{verb}",
        tenant=tenant,
        target_type="tenant",
        target_id=tenant.id,
        before={"status": before},
        after={"status": status},
    )


def owned_resources(session: Session, tenant: Tenant, purpose: str) -> list[str]:
    """What keeps a tenant from being archived or deleted, in words."""
    held: list[str] = []
    children = session.execute(
        select(func.count())
        .select_from(Tenant)
        .where(Tenant.parent_id == tenant.id, Tenant.status != TenantStatus.archived.value)
    ).scalar_one()
    if children:
        held.append(f"{children} tenant(s) not archived")
    for check in _ownership_checks:
        held.extend(check(session, tenant, purpose))
    return held


def delete_tenant(session: Session, principal: Principal, tenant_id: uuid.UUID) -> None:
    """Only for a tenant created by mistake: anything attached means archive it instead."""
    tenant = _load(session, tenant_id)
    if tenant.kind == TenantKind.center:
        authorize(principal, "tenant.manage", tenant)
        raise Conflict("the center cannot be deleted")
    authorize(principal, manage_action(tenant.kind), tenant)
    held = owned_resources(session, tenant, "delete")
    any_children = session.execute(select(Tenant.id).where(Tenant.parent_id == tenant.id)).first()
    users = session.execute(
        select(func.count()).select_from(User).where(User.tenant_id == tenant.id)
    ).scalar_one()
    bindings = session.execute(
        select(func.count()).select_from(RoleBinding).where(RoleBinding.tenant_id == tenant.id)
    ).scalar_one()
    if any_children and not held:
        held.append("archived child tenants")
    if users:
        held.append(f"{users} user(s)")
    if bindings:
        held.append(f"{bindings} role binding(s)")
    if held:
        raise Conflict(
            f"{tenant.kind} {tenant.code} cannot be deleted while it has: "
            + "; ".join(held)
            + " (archive it instead)",
            extra={"owned": held},
        )
    audit.record(
        session,
        principal,
        "tenant.delete",
        tenant=tenant,
        target_type="tenant",
        target_id=tenant.id,
        before=snapshot(tenant),
    )
    session.delete(tenant)
    session.flush()
