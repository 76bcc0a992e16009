"""`authorize(principal, action, tenant)`: the one gate every service passes through.

Outside the caller's scope an object does not exist (NotFound, never Forbidden), so probing
another agency's ids tells nothing. Inside it, a missing right is Forbidden. Writes into a
suspended or archived subtree are refused to everyone but center administrators.
"""

from __future__ import annotations

import uuid

from sqlalchemy.orm import object_session
from sqlmodel import col, select

from broker.core.authz import Principal, is_write
from broker.core.errors import Forbidden, NotFound
from broker.tenancy.models import Tenant, TenantStatus


def ancestor_ids(path: str) -> list[uuid.UUID]:
    """Ids on a tenant's path, root first, the tenant itself last."""
    return [uuid.UUID(part) for part in path.strip("/").split("/") if part]


def authorize(
    principal: Principal, action: str, tenant: Tenant, *, subject: str | None = None
) -> None:
    """Raise unless `principal` may do `action` on (something owned by) `tenant`.

    `subject` names the object for the NotFound message ("user 1234…"), defaulting to the tenant.
    """
    if not principal.sees(tenant.path):
        raise NotFound(f"{subject or f'tenant {tenant.id}'} not found")
    if not principal.can(action, tenant.path):
        raise Forbidden(f"your roles here do not allow {action}")
    if is_write(action) and not principal.is_center_admin:
        blocked = _inactive_on_path(tenant)
        if blocked is not None:
            raise Forbidden(
                f"{blocked.kind} {blocked.code} is {blocked.status}: changes are blocked",
                extra={"tenant_status": blocked.status},
            )


def authorize_at_parent(principal: Principal, action: str, tenant: Tenant, parent: Tenant) -> None:
    """For rights over a tenant that are held at its parent (its status, its quota): a caller who
    can see the tenant but not its parent lacks the right (403) rather than the object (404)."""
    if not principal.sees(tenant.path):
        raise NotFound(f"tenant {tenant.id} not found")
    if not principal.sees(parent.path):
        raise Forbidden(f"your roles here do not allow {action}")
    authorize(principal, action, parent)


def _inactive_on_path(tenant: Tenant) -> Tenant | None:
    if tenant.status != TenantStatus.active:
        return tenant
    session = object_session(tenant)
    ids = ancestor_ids(tenant.path)[:-1]
    if session is None or not ids:
        return None
    stmt = (
        select(Tenant)
        .where(col(Tenant.id).in_(ids), Tenant.status != TenantStatus.active.value)
        .order_by(Tenant.path)
    )
    return session.execute(stmt).scalars().first()
