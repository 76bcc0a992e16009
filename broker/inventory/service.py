"""Reading the inventory (scoped by role) and adopting unmanaged servers.

Hosts, storage, networks and capacity are the center's business: center administrators and
auditors read them. Servers are read wherever `server.read` holds; unmanaged servers belong to no
tenant, so only those who may read the center's inventory see them.
"""

from __future__ import annotations

import math
import uuid
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, and_, false, func, or_, true
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from broker.core.authz import Principal
from broker.core.errors import Invalid, NotFound
from broker.core.pagination import DEFAULT_LIMIT, decode_cursor, encode_cursor
from broker.inventory import providers
from broker.inventory.models import InventoryHost, InventoryStorage, Provider, Server, SyncRun
from broker.inventory.schemas import Adopt, CapacityLine, ProviderCapacity, ServerPublic
from broker.inventory.sync import book
from broker.tenancy import service as tenancy
from broker.tenancy.authz import authorize
from broker.tenancy.models import Tenant
from quotas import service as quota_service

CAPACITY_CLASSES = ("vcpu", "memory_mb")


def _provider_filter(provider_id: uuid.UUID | None, column: Any) -> ColumnElement[bool]:
    return column == provider_id if provider_id is not None else true()


def list_hosts(
    session: Session,
    principal: Principal,
    *,
    provider_id: uuid.UUID | None = None,
    include_gone: bool = False,
) -> list[InventoryHost]:
    providers.center_for(session, principal, providers.READ, "hosts")
    stmt = select(InventoryHost).where(_provider_filter(provider_id, InventoryHost.provider_id))
    if not include_gone:
        stmt = stmt.where(col(InventoryHost.gone_at).is_(None))
    stmt = stmt.order_by(col(InventoryHost.provider_id), col(InventoryHost.name))
    return list(session.execute(stmt).scalars())


def list_storage(
    session: Session, principal: Principal, *, provider_id: uuid.UUID | None = None
) -> list[InventoryStorage]:
    providers.center_for(session, principal, providers.READ, "storage")
    stmt = (
        select(InventoryStorage)
        .where(
            _provider_filter(provider_id, InventoryStorage.provider_id),
            col(InventoryStorage.gone_at).is_(None),
        )
        .order_by(col(InventoryStorage.provider_id), col(InventoryStorage.name))
    )
    return list(session.execute(stmt).scalars())


def overcommit_ratio(provider: Provider, host: InventoryHost, resource_class: str) -> Decimal:
    # the center's setting on the provider wins over what the hypervisor reports
    value = provider.overcommit.get(resource_class) or host.overcommit.get(resource_class) or "1"
    return Decimal(value)


def capacity(
    session: Session, principal: Principal, *, provider_id: uuid.UUID | None = None
) -> list[ProviderCapacity]:
    """Per enabled provider, then the total: physical, allocated and effective (× overcommit)
    capacity per class; storage per tier from the pools."""
    providers.center_for(session, principal, providers.READ, "capacity")
    stmt = select(Provider).where(col(Provider.enabled).is_(True))
    if provider_id is not None:
        stmt = select(Provider).where(Provider.id == provider_id)
    chosen = list(session.execute(stmt.order_by(Provider.name)).scalars())
    if provider_id is not None and not chosen:
        raise NotFound(f"provider {provider_id} not found")
    ids = [p.id for p in chosen]
    hosts = session.execute(
        select(InventoryHost).where(
            col(InventoryHost.provider_id).in_(ids), col(InventoryHost.gone_at).is_(None)
        )
    ).scalars()
    pools = session.execute(
        select(InventoryStorage).where(
            col(InventoryStorage.provider_id).in_(ids), col(InventoryStorage.gone_at).is_(None)
        )
    ).scalars()
    by_provider = {p.id: p for p in chosen}
    # provider id -> class -> [physical, allocated, effective]
    sums: dict[uuid.UUID, dict[str, list[int]]] = {pid: {} for pid in ids}
    host_count: dict[uuid.UUID, int] = dict.fromkeys(ids, 0)
    for h in hosts:
        host_count[h.provider_id] += 1
        for rc in CAPACITY_CLASSES:
            physical = int(h.capacity.get(rc, 0))
            line = sums[h.provider_id].setdefault(rc, [0, 0, 0])
            line[0] += physical
            line[1] += int(h.allocated.get(rc, 0))
            line[2] += math.floor(physical * overcommit_ratio(by_provider[h.provider_id], h, rc))
    for pool in pools:
        rc = f"storage_gb.{pool.tier}"
        line = sums[pool.provider_id].setdefault(rc, [0, 0, 0])
        line[0] += pool.capacity_gb
        line[1] += pool.capacity_gb - pool.free_gb
        line[2] += pool.capacity_gb

    def lines(per_class: dict[str, list[int]]) -> list[CapacityLine]:
        return [
            CapacityLine(
                resource_class=rc,
                physical=v[0],
                allocated=v[1],
                effective=v[2],
                overcommit=(Decimal(v[2]) / Decimal(v[0])).quantize(Decimal("0.01"))
                if v[0]
                else Decimal(1),
            )
            for rc, v in sorted(per_class.items())
        ]

    out = [
        ProviderCapacity(
            provider_id=pid,
            provider_name=by_provider[pid].name,
            hosts=host_count[pid],
            lines=lines(sums[pid]),
        )
        for pid in ids
    ]
    total: dict[str, list[int]] = {}
    for per_class in sums.values():
        for rc, v in per_class.items():
            acc = total.setdefault(rc, [0, 0, 0])
            for i in range(3):
                acc[i] += v[i]
    out.append(
        ProviderCapacity(
            provider_id=None,
            provider_name=None,
            hosts=sum(host_count.values()),
            lines=lines(total),
        )
    )
    return out


def center_capacity(session: Session, resource_class: str) -> int | None:
    """For the quota service: what the center may hand out of a class, across enabled
    providers (None when no provider reports it, so that quotas can be set before any sync)."""
    total = [
        line.effective
        for cap in capacity(session, Principal.system(), provider_id=None)
        if cap.provider_id is None
        for line in cap.lines
        if line.resource_class == resource_class
    ]
    return total[0] if total and total[0] > 0 else None


def sync_runs(
    session: Session, principal: Principal, provider_id: uuid.UUID, *, limit: int = 20
) -> list[SyncRun]:
    providers.get_provider(session, principal, provider_id)
    stmt = (
        select(SyncRun)
        .where(SyncRun.provider_id == provider_id)
        .order_by(col(SyncRun.started_at).desc())
        .limit(limit)
    )
    return list(session.execute(stmt).scalars())


# --- servers ----------------------------------------------------------------------------------


def _server_scope(session: Session, principal: Principal) -> ColumnElement[bool]:
    """Servers the caller may read: those of tenants in `server.read` scope, and the unmanaged
    ones for readers of the center's inventory."""
    prefixes = principal.prefixes("server.read")
    if "/" in prefixes:
        owned: ColumnElement[bool] = col(Server.tenant_id).is_not(None)
    elif prefixes:
        in_scope = sa_select(col(Tenant.id)).where(
            or_(*[col(Tenant.path).startswith(p) for p in prefixes])
        )
        owned = col(Server.tenant_id).in_(in_scope)
    else:
        owned = false()
    unmanaged = (
        col(Server.tenant_id).is_(None)
        if providers.can_read_inventory(session, principal)
        else false()
    )
    return or_(owned, unmanaged)


def is_managed(server: Server) -> bool:
    """Counted in a tenant's quota: owned and still there (a gone server has given it back)."""
    return server.tenant_id is not None and server.gone_at is None


def public(server: Server) -> ServerPublic:
    data: dict[str, Any] = {
        k: getattr(server, k) for k in ServerPublic.model_fields if k != "managed"
    }
    return ServerPublic(**data, managed=is_managed(server))


def list_servers(
    session: Session,
    principal: Principal,
    *,
    tenant_id: uuid.UUID | None = None,
    provider_id: uuid.UUID | None = None,
    power_state: str | None = None,
    managed: bool | None = None,
    drift: bool | None = None,
    include_gone: bool = False,
    q: str | None = None,
    cursor: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> tuple[list[Server], str | None]:
    stmt = select(Server).where(_server_scope(session, principal))
    if tenant_id is not None:
        # a tenant's servers are its own and its descendants'
        tenant = session.get(Tenant, tenant_id)
        if tenant is None or not principal.sees(tenant.path):
            raise Invalid.field("tenant_id", f"no tenant {tenant_id}", "not_found")
        sub = sa_select(col(Tenant.id)).where(col(Tenant.path).startswith(tenant.path))
        stmt = stmt.where(col(Server.tenant_id).in_(sub))
    if provider_id is not None:
        stmt = stmt.where(Server.provider_id == provider_id)
    if power_state is not None:
        stmt = stmt.where(Server.power_state == power_state)
    if managed is True:
        stmt = stmt.where(col(Server.tenant_id).is_not(None), col(Server.gone_at).is_(None))
    elif managed is False:
        stmt = stmt.where(or_(col(Server.tenant_id).is_(None), col(Server.gone_at).is_not(None)))
    if drift is True:
        stmt = stmt.where(col(Server.drift_at).is_not(None))
    elif drift is False:
        stmt = stmt.where(col(Server.drift_at).is_(None))
    if not include_gone:
        stmt = stmt.where(col(Server.gone_at).is_(None))
    if q:
        # lower() on both sides: LIKE ignores case on SQLite but not on PostgreSQL
        stmt = stmt.where(func.lower(col(Server.name)).contains(q.lower(), autoescape=True))
    if cursor:
        name, sid = decode_cursor(cursor, [str, uuid.UUID])
        stmt = stmt.where(or_(Server.name > name, and_(Server.name == name, col(Server.id) > sid)))
    rows = list(
        session.execute(stmt.order_by(col(Server.name), col(Server.id)).limit(limit + 1)).scalars()
    )
    nxt = encode_cursor(rows[limit - 1].name, rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], nxt


def get_server(session: Session, principal: Principal, server_id: uuid.UUID) -> Server:
    """A server the caller may read. One it can see but not read (its tenant is in view but the
    role lacks server.read, as finance's) is 403; one outside its view is 404."""
    stmt = select(Server).where(Server.id == server_id, _server_scope(session, principal))
    server = session.execute(stmt).scalars().first()
    if server is not None:
        return server
    server = session.get(Server, server_id)
    if server is None:
        raise NotFound(f"server {server_id} not found")
    owner = (
        session.get(Tenant, server.tenant_id) if server.tenant_id else tenancy.get_center(session)
    )
    if owner is None:
        raise NotFound(f"server {server_id} not found")
    action = "server.read" if server.tenant_id else providers.READ
    authorize(principal, action, owner, subject=f"server {server_id}")
    # authorize raised for every caller the scope excludes; should they ever disagree, the
    # narrower answer wins
    raise NotFound(f"server {server_id} not found")


def adopt(session: Session, principal: Principal, server_id: uuid.UUID, data: Adopt) -> Server:
    """The center takes an unmanaged server into a tenant: counted against its quota."""
    get_server(session, principal, server_id)
    server = session.get(Server, server_id, with_for_update=True, populate_existing=True)
    assert server is not None
    tenant = session.get(Tenant, data.tenant_id)
    if tenant is None or not principal.sees(tenant.path):
        raise Invalid.field("tenant_id", f"no tenant {data.tenant_id}", "not_found")
    authorize(principal, "server.adopt", tenant)
    book(session, server, tenant, actor=principal, force=data.force, reason=data.reason)
    return server


def _owned_servers(session: Session, tenant: Tenant, purpose: str) -> list[str]:
    stmt = sa_select(col(Server.gone_at)).where(col(Server.tenant_id) == tenant.id)
    gone_flags = [g is None for g in session.execute(stmt).scalars()]
    held = [f"{sum(gone_flags)} server(s)"] if any(gone_flags) else []
    if purpose == "delete" and gone_flags and not any(gone_flags):
        held.append("server history")
    return held


tenancy.register_ownership_check(_owned_servers)
quota_service.register_capacity_provider(center_capacity)
