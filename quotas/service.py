"""Setting quota limits and windows, and reading usage.

Who sets what: center administrators set the center's and the agencies' limits; agency
administrators split their agency's limit among its business systems. Every write keeps, per
resource class: the children's limits sum to at most the parent's; the center's limit stays within
registered capacity (a hook the inventory fills in); a limit is not lowered below usage unless a
center administrator forces it.
"""

from __future__ import annotations

import math
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from broker.audit import service as audit
from broker.core import clock
from broker.core.authz import Principal
from broker.core.errors import Conflict, Forbidden, Invalid, NotFound
from broker.tenancy import service as tenancy
from broker.tenancy.authz import authorize, authorize_at_parent
from broker.tenancy.models import Tenant, TenantKind, TenantStatus
from quotas import ledger
from quotas.models import Allocation, Quota, QuotaNotice, ResourceClass
from quotas.schemas import UsageLine

# (session, resource class) -> the most the center may hand out, or None when unknown
CapacityProvider = Callable[[Session, str], int | None]
_capacity_providers: list[CapacityProvider] = []


def register_capacity_provider(provider: CapacityProvider) -> None:
    if provider not in _capacity_providers:
        _capacity_providers.append(provider)


def _capacity(session: Session, resource_class: str) -> int | None:
    known = [c for p in _capacity_providers if (c := p(session, resource_class)) is not None]
    return min(known) if known else None


def _load_tenant(session: Session, tenant_id: uuid.UUID) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"tenant {tenant_id} not found")
    return tenant


def _authorize_set(session: Session, principal: Principal, tenant: Tenant) -> Tenant | None:
    """Center: center admins; agency: whoever manages the center (center admins); system: its
    agency's administrators. Returns the parent (None for the center)."""
    if not principal.sees(tenant.path):
        raise NotFound(f"tenant {tenant.id} not found")
    if tenant.parent_id is None:
        authorize(principal, "quota.manage", tenant)
        return None
    parent = _load_tenant(session, tenant.parent_id)
    action = "quota.split" if tenant.kind == TenantKind.system else "quota.manage"
    authorize_at_parent(principal, action, tenant, parent)
    return parent


def _lock_one(session: Session, tenant_id: uuid.UUID, rc: str) -> Quota | None:
    stmt = (
        select(Quota)
        .where(Quota.tenant_id == tenant_id, Quota.resource_class == rc)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return session.execute(stmt).scalars().first()


def _lock(session: Session, tenant_ids: list[uuid.UUID], rc: str) -> dict[uuid.UUID, Quota]:
    """Parent first, each in its own statement: a statement that waited for the parent's lock
    would not see a child row created meanwhile (PostgreSQL read committed)."""
    found = {tid: _lock_one(session, tid, rc) for tid in tenant_ids}
    return {tid: q for tid, q in found.items() if q is not None}


def _children_limit_sum(
    session: Session, parent_id: uuid.UUID, rc: str, *, excluding: uuid.UUID | None = None
) -> int:
    stmt = (
        select(func.coalesce(func.sum(Quota.hard_limit), 0))
        .join(Tenant, col(Tenant.id) == col(Quota.tenant_id))
        .where(Tenant.parent_id == parent_id, Quota.resource_class == rc)
    )
    if excluding is not None:
        stmt = stmt.where(col(Tenant.id) != excluding)
    return int(session.execute(stmt).scalar_one())


def _usage_of(session: Session, tenant: Tenant, rc: str, q: Quota | None, now: datetime) -> int:
    """Committed + unexpired reserved of the tenant's subtree (the center: all agencies)."""
    if tenant.kind == TenantKind.center:
        stmt = select(func.coalesce(func.sum(Quota.committed + Quota.reserved), 0)).where(
            Quota.depth == 1, Quota.resource_class == rc
        )
        counted = int(session.execute(stmt).scalar_one())
    elif q is None:
        return 0
    else:
        counted = q.committed + q.reserved
    return counted - _lapsed_by_tenant(session, tenant, now).get((tenant.id, rc), 0)


def snapshot(q: Quota) -> dict[str, Any]:
    return {
        "resource_class": q.resource_class,
        "limit": q.hard_limit,
        "valid_from": q.valid_from.isoformat(),
        "valid_until": q.valid_until.isoformat() if q.valid_until else None,
    }


def set_quota(
    session: Session,
    principal: Principal,
    tenant_id: uuid.UUID,
    resource_class: str,
    *,
    limit: int | None,
    valid_from: datetime | None = None,
    valid_until: datetime | None = None,
    force: bool = False,
) -> Quota:
    tenant = _load_tenant(session, tenant_id)
    parent = _authorize_set(session, principal, tenant)
    classes = ledger.resource_classes(session)
    rc = classes.get(resource_class)
    if rc is None:
        raise Invalid.field(
            "resource_class", f"unknown resource class {resource_class!r}", "unknown_class"
        )
    if tenant.status == TenantStatus.archived:
        raise Invalid.field("tenant_id", f"{tenant.kind} {tenant.code} is archived", "archived")
    if limit is None and tenant.kind != TenantKind.system:
        raise Invalid.field(
            "limit",
            f"a {tenant.kind} needs a limit; only systems may share their agency's pool",
            "required",
        )
    if limit is not None and not 0 <= limit <= rc.max_amount:
        raise Invalid.field(
            "limit", f"must be between 0 and {rc.max_amount} {rc.unit}", "out_of_range"
        )
    if force and not principal.is_center_admin:
        raise Forbidden("only center administrators may force a limit below usage")
    levels = [parent.id, tenant.id] if parent is not None else [tenant.id]
    locked = _lock(session, levels, resource_class)
    now = clock.now()  # after the wait for the locks: what expired meanwhile is not counted
    current = locked.get(tenant.id)
    start = valid_from or (current.valid_from if current else now)
    end = valid_until if valid_until is not None else (current.valid_until if current else None)
    if end is not None and end <= start:
        raise Invalid.field("valid_until", "must be later than valid_from", "window")

    usage = _usage_of(session, tenant, resource_class, current, now)
    if limit is not None:
        _check_hierarchy(session, tenant, parent, locked, rc, limit)
        if limit < usage and not force:
            raise Conflict.field(
                "limit",
                f"{usage} {rc.unit} of {resource_class} is in use at {tenant.code}; lowering the "
                f"limit to {limit} needs force=true (center administrators)",
                "below_usage",
            )
    before = snapshot(current) if current and current.hard_limit is not None else None
    if current is None:
        # insert-or-keep, then lock: a concurrent first writer of this row must not make us fail
        ledger.insert_quota_rows(session, [(tenant.id, resource_class, ledger.DEPTH[tenant.kind])])
        current = _lock_one(session, tenant.id, resource_class)
        assert current is not None
    current.hard_limit, current.valid_from, current.valid_until = limit, start, end
    current.updated_at = now
    session.flush()
    after = snapshot(current)
    if before == after:
        return current
    window_only = before is not None and before["limit"] == after["limit"]
    action = "quota.renew" if window_only else "quota.set"
    audit.record(
        session,
        principal,
        action,
        tenant=tenant,
        target_type="quota",
        target_id=current.id,
        before=before,
        after=after,
    )
    if limit is not None and limit < usage:
        audit.record(
            session,
            principal,
            "quota.force_below_usage",
            tenant=tenant,
            target_type="quota",
            target_id=current.id,
            after={"limit": limit, "usage": usage},
        )
    return current


def _check_hierarchy(
    session: Session,
    tenant: Tenant,
    parent: Tenant | None,
    locked: dict[uuid.UUID, Quota],
    rc: ResourceClass,
    limit: int,
) -> None:
    code = rc.code
    if parent is not None:
        parent_q = locked.get(parent.id)
        if parent_q is None or parent_q.hard_limit is None:
            raise Invalid.field(
                "limit",
                f"{parent.kind} {parent.code} has no {code} limit to divide yet",
                "parent_unset",
            )
        siblings = _children_limit_sum(session, parent.id, code, excluding=tenant.id)
        if siblings + limit > parent_q.hard_limit:
            raise Invalid.field(
                "limit",
                f"{parent.code}'s {code} limit is {parent_q.hard_limit}; its other children hold "
                f"{siblings}, so at most {max(parent_q.hard_limit - siblings, 0)} is left",
                "exceeds_parent",
            )
    children = _children_limit_sum(session, tenant.id, code)
    if limit < children:
        raise Invalid.field(
            "limit",
            f"the children of {tenant.code} already hold {children} {rc.unit} of {code}",
            "below_children",
        )
    if tenant.kind == TenantKind.center:
        capacity = _capacity(session, code)
        if capacity is not None and limit > capacity:
            raise Invalid.field(
                "limit",
                f"registered capacity after overcommit allows at most {capacity}",
                "exceeds_capacity",
            )


# --- reading -----------------------------------------------------------------------------------


def days_remaining(valid_until: datetime | None, now: datetime) -> int | None:
    if valid_until is None:
        return None
    return max(0, math.ceil((valid_until - now) / timedelta(days=1)))


def quota_status(q: Quota | None, usage: int, now: datetime) -> str:
    if q is None or q.hard_limit is None:
        return "unlimited"
    window = ledger.window_state(q, now, required=True)
    if window != "valid":
        return window
    return "over_quota" if usage > q.hard_limit else "valid"


def utilization(usage: int, limit: int | None) -> Decimal | None:
    if limit is None:
        return None
    if limit == 0:
        return Decimal(0) if usage == 0 else Decimal(100)
    return (Decimal(usage) * 100 / Decimal(limit)).quantize(Decimal("0.1"), ROUND_HALF_UP)


def compute_line(rc: ResourceClass, q: Quota | None, lapsed: int, now: datetime) -> UsageLine:
    committed = q.committed if q else 0
    reserved = (q.reserved - lapsed) if q else 0
    usage = committed + reserved
    limit = q.hard_limit if q else None
    return UsageLine(
        resource_class=rc.code,
        unit=rc.unit,
        limit=limit,
        committed=committed,
        reserved=reserved,
        available=max(limit - usage, 0) if limit is not None else None,
        utilization_percent=utilization(usage, limit),
        valid_from=q.valid_from if q and limit is not None else None,
        valid_until=q.valid_until if q and limit is not None else None,
        days_remaining=days_remaining(q.valid_until, now) if q and limit is not None else None,
        status=quota_status(q, usage, now),
    )


def usage_report(
    session: Session, principal: Principal, tenant_id: uuid.UUID
) -> tuple[Tenant, list[UsageLine], list[tuple[Tenant, list[UsageLine]]]]:
    """The tenant's lines and each visible child's, in a fixed number of queries."""
    tenant = _load_tenant(session, tenant_id)
    authorize(principal, "quota.read", tenant)
    now = clock.now()
    classes = list(ledger.resource_classes(session).values())
    children = list(
        session.execute(
            select(Tenant)
            .where(
                Tenant.parent_id == tenant.id,
                principal.scope_filter("quota.read", col(Tenant.path)),
            )
            .order_by(col(Tenant.code))
        ).scalars()
    )
    ids = [tenant.id, *[c.id for c in children]]
    rows = {
        (q.tenant_id, q.resource_class): q
        for q in session.execute(
            select(Quota)
            .where(col(Quota.tenant_id).in_(ids))
            .execution_options(populate_existing=True)
        ).scalars()
    }
    lapsed = _lapsed_by_tenant(session, tenant, now)
    if tenant.kind == TenantKind.center:
        rows.update(_center_rollup(session, tenant, rows))

    def lines(t: Tenant) -> list[UsageLine]:
        return [
            compute_line(rc, rows.get((t.id, rc.code)), lapsed.get((t.id, rc.code), 0), now)
            for rc in classes
        ]

    return tenant, lines(tenant), [(c, lines(c)) for c in children]


def _center_rollup(
    session: Session, center: Tenant, rows: dict[tuple[uuid.UUID, str], Quota]
) -> dict[tuple[uuid.UUID, str], Quota]:
    """The center keeps no counters of its own: its usage is the sum of the agencies'."""
    sums = session.execute(
        select(Quota.resource_class, func.sum(Quota.committed), func.sum(Quota.reserved))
        .where(Quota.depth == 1)
        .group_by(col(Quota.resource_class))
    ).all()
    out: dict[tuple[uuid.UUID, str], Quota] = {}
    for rc, committed, reserved in sums:
        own = rows.get((center.id, rc))
        out[(center.id, rc)] = Quota(
            id=own.id if own else uuid.uuid4(),
            tenant_id=center.id,
            resource_class=rc,
            depth=0,
            hard_limit=own.hard_limit if own else None,
            valid_from=own.valid_from if own else clock.now(),
            valid_until=own.valid_until if own else None,
            committed=int(committed or 0),
            reserved=int(reserved or 0),
        )
    return out


def _lapsed_by_tenant(
    session: Session, tenant: Tenant | None, now: datetime
) -> dict[tuple[uuid.UUID, str], int]:
    """Expired-but-unswept reserved amounts, attributed to every level whose counter holds them
    (the system, its agency, and — when `tenant` is the center or None — the center)."""
    stmt = (
        select(
            Allocation.agency_id,
            Allocation.tenant_id,
            Allocation.resource_class,
            func.sum(Allocation.amount),
        )
        .where(
            Allocation.state == ledger.RESERVED,
            col(Allocation.expires_at) <= now,
            col(Allocation.amount) > 0,
        )
        .group_by(
            col(Allocation.agency_id), col(Allocation.tenant_id), col(Allocation.resource_class)
        )
    )
    if tenant is not None and tenant.kind == TenantKind.agency:
        stmt = stmt.where(Allocation.agency_id == tenant.id)
    elif tenant is not None and tenant.kind == TenantKind.system:
        stmt = stmt.where(Allocation.tenant_id == tenant.id)
    out: dict[tuple[uuid.UUID, str], int] = defaultdict(int)
    center_id = tenant.id if tenant is not None and tenant.kind == TenantKind.center else None
    for agency_id, tenant_id, rc, amount in session.execute(stmt).all():
        out[(agency_id, rc)] += int(amount)
        if tenant_id != agency_id:
            out[(tenant_id, rc)] += int(amount)
        if center_id is not None:
            out[(center_id, rc)] += int(amount)
    return out


def list_quotas(
    session: Session,
    principal: Principal,
    *,
    tenant_id: uuid.UUID | None = None,
    resource_class: str | None = None,
    limit: int = 500,
) -> list[tuple[Quota, Tenant]]:
    stmt = (
        select(Quota, Tenant)
        .join(Tenant, col(Tenant.id) == col(Quota.tenant_id))
        .where(
            principal.scope_filter("quota.read", col(Tenant.path)),
            col(Quota.hard_limit).is_not(None),
        )
    )
    if tenant_id is not None:
        stmt = stmt.where(Quota.tenant_id == tenant_id)
    if resource_class is not None:
        stmt = stmt.where(Quota.resource_class == resource_class)
    stmt = (
        stmt.order_by(col(Tenant.path), col(Quota.resource_class))
        .limit(limit)
        .execution_options(populate_existing=True)
    )
    return [(q, t) for q, t in session.execute(stmt).all()]


@dataclass(frozen=True)
class QuotaView:
    """A quota row as callers see it: expired reservations are not counted."""

    quota: Quota
    tenant: Tenant
    reserved: int
    days_remaining: int | None
    status: str


def views(session: Session, rows: list[tuple[Quota, Tenant]]) -> list[QuotaView]:
    now = clock.now()
    lapsed = _lapsed_by_tenant(session, None, now) if rows else {}
    out = []
    for q, t in rows:
        reserved = q.reserved - lapsed.get((t.id, q.resource_class), 0)
        out.append(
            QuotaView(
                quota=q,
                tenant=t,
                reserved=reserved,
                days_remaining=days_remaining(q.valid_until, now),
                status=quota_status(q, q.committed + reserved, now),
            )
        )
    return out


def get_quota(
    session: Session, principal: Principal, tenant_id: uuid.UUID, resource_class: str
) -> tuple[Quota, Tenant]:
    tenant = _load_tenant(session, tenant_id)
    authorize(principal, "quota.read", tenant)
    q = (
        session.execute(
            select(Quota)
            .where(Quota.tenant_id == tenant_id, Quota.resource_class == resource_class)
            .execution_options(populate_existing=True)
        )
        .scalars()
        .first()
    )
    if q is None or q.hard_limit is None:
        raise NotFound(f"{tenant.code} has no {resource_class} quota")
    return q, tenant


def check_fit(
    session: Session, principal: Principal, tenant_id: uuid.UUID, deltas: dict[str, int]
) -> list[Any]:
    tenant = _load_tenant(session, tenant_id)
    authorize(principal, "quota.read", tenant)
    return ledger.check(session, tenant_id, deltas)


# --- expiry notices ----------------------------------------------------------------------------

NOTICE_HORIZONS = (("expiry_7d", timedelta(days=7)), ("expiry_1d", timedelta(days=1)))


def emit_expiry_notices(session: Session) -> int:
    """One notice per quota, window and horizon (7 days, 1 day before expiry); idempotent."""
    now = clock.now()
    emitted = 0
    for kind, horizon in NOTICE_HORIZONS:
        already = select(QuotaNotice.id).where(
            QuotaNotice.quota_id == Quota.id,
            QuotaNotice.kind == kind,
            QuotaNotice.valid_until == Quota.valid_until,
        )
        due = (
            session.execute(
                select(Quota).where(
                    col(Quota.hard_limit).is_not(None),
                    col(Quota.valid_until).is_not(None),
                    col(Quota.valid_until) > now,
                    col(Quota.valid_until) <= now + horizon,
                    ~already.exists(),
                )
            )
            .scalars()
            .all()
        )
        for q in due:
            assert q.valid_until is not None
            session.add(
                QuotaNotice(
                    quota_id=q.id,
                    tenant_id=q.tenant_id,
                    resource_class=q.resource_class,
                    kind=kind,
                    valid_until=q.valid_until,
                    created_at=now,
                )
            )
            emitted += 1
    session.flush()
    return emitted


# --- what a tenant holds, for archiving and deleting -------------------------------------------


def _held_quota(session: Session, tenant: Tenant, purpose: str) -> list[str]:
    rows = session.execute(
        select(Quota.resource_class, Quota.committed, Quota.reserved, Quota.hard_limit).where(
            Quota.tenant_id == tenant.id
        )
    ).all()
    held = [f"{c + r} {rc} in use" for rc, c, r, _ in rows if c + r > 0]
    if purpose == "delete":
        if rows:
            held.append("quota settings")
        history = session.execute(
            select(func.count()).select_from(Allocation).where(Allocation.tenant_id == tenant.id)
        ).scalar_one()
        if history:
            held.append("quota ledger history")
    return held


tenancy.register_ownership_check(_held_quota)
