"""Providers, service companies, the unified inventory and its servers."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api.deps import DEFAULT_PAGE, NO_NUL, Cursor, DatabaseDep, Limit, PrincipalDep, SessionDep
from api.schemas import Page
from broker.inventory import providers, service, sync
from broker.inventory.models import SyncRun
from broker.inventory.schemas import (
    Adopt,
    ConnectionCheck,
    HostPublic,
    ProviderCapacity,
    ProviderCreate,
    ProviderPublic,
    ProviderUpdate,
    ServerPublic,
    ServiceCompanyCreate,
    ServiceCompanyPublic,
    ServiceCompanyUpdate,
    StoragePublic,
    SyncRunPublic,
)

router = APIRouter(tags=["inventory"])
PowerState = Literal["running", "stopped", "suspended", "building", "error", "unknown"]


# --- service companies ----------------------------------------------------------------------


@router.get("/api/v1/service-companies")
def list_companies(session: SessionDep, principal: PrincipalDep) -> list[ServiceCompanyPublic]:
    return [
        ServiceCompanyPublic.model_validate(c) for c in providers.list_companies(session, principal)
    ]


@router.post("/api/v1/service-companies", status_code=201)
def create_company(
    body: ServiceCompanyCreate, session: SessionDep, principal: PrincipalDep
) -> ServiceCompanyPublic:
    company = providers.create_company(session, principal, body)
    session.commit()
    return ServiceCompanyPublic.model_validate(company)


@router.get("/api/v1/service-companies/{company_id}")
def get_company(
    company_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> ServiceCompanyPublic:
    return ServiceCompanyPublic.model_validate(
        providers.get_company(session, principal, company_id)
    )


@router.patch("/api/v1/service-companies/{company_id}")
def update_company(
    company_id: uuid.UUID, body: ServiceCompanyUpdate, session: SessionDep, principal: PrincipalDep
) -> ServiceCompanyPublic:
    company = providers.update_company(session, principal, company_id, body)
    session.commit()
    return ServiceCompanyPublic.model_validate(company)


# --- providers --------------------------------------------------------------------------------


@router.get("/api/v1/providers")
def list_providers(
    session: SessionDep,
    principal: PrincipalDep,
    enabled: bool | None = None,
    kind: Literal["openstack", "vmware", "libvirt", "simulator"] | None = None,
) -> list[ProviderPublic]:
    rows = providers.list_providers(session, principal, enabled=enabled, kind=kind)
    return [providers.public(p) for p in rows]


@router.post("/api/v1/providers", status_code=201)
def create_provider(
    body: ProviderCreate, session: SessionDep, principal: PrincipalDep
) -> ProviderPublic:
    provider = providers.create_provider(session, principal, body)
    session.commit()
    return providers.public(provider)


@router.get("/api/v1/providers/{provider_id}")
def get_provider(
    provider_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> ProviderPublic:
    return providers.public(providers.get_provider(session, principal, provider_id))


@router.patch("/api/v1/providers/{provider_id}")
def update_provider(
    provider_id: uuid.UUID, body: ProviderUpdate, session: SessionDep, principal: PrincipalDep
) -> ProviderPublic:
    provider = providers.update_provider(session, principal, provider_id, body)
    session.commit()
    return providers.public(provider)


@router.post("/api/v1/providers/{provider_id}/check")
def check_provider(
    provider_id: uuid.UUID, db: DatabaseDep, principal: PrincipalDep
) -> ConnectionCheck:
    return providers.check_connection(db, principal, provider_id)


@router.post("/api/v1/providers/{provider_id}/sync")
def sync_provider(
    provider_id: uuid.UUID, db: DatabaseDep, principal: PrincipalDep
) -> SyncRunPublic:
    """Sync now and answer with the run (status ok or failed, counts, duration). Runs in its own
    units of work: no transaction stays open while the provider is being read."""
    with db.unit_of_work(write=False) as session:
        providers.center_for(session, principal, "inventory.sync", f"provider {provider_id}")
    outcome = sync.sync_provider(db, provider_id, trigger="api")
    with db.unit_of_work(write=False) as session:
        run = session.get(SyncRun, outcome.run_id)
        return SyncRunPublic.model_validate(run)


@router.get("/api/v1/providers/{provider_id}/sync-runs")
def list_sync_runs(
    provider_id: uuid.UUID,
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> list[SyncRunPublic]:
    return [
        SyncRunPublic.model_validate(r)
        for r in service.sync_runs(session, principal, provider_id, limit=limit)
    ]


# --- inventory --------------------------------------------------------------------------------


@router.get("/api/v1/inventory/hosts")
def list_hosts(
    session: SessionDep,
    principal: PrincipalDep,
    provider_id: uuid.UUID | None = None,
    include_gone: bool = False,
) -> list[HostPublic]:
    rows = service.list_hosts(
        session, principal, provider_id=provider_id, include_gone=include_gone
    )
    return [HostPublic.model_validate(h) for h in rows]


@router.get("/api/v1/inventory/storage")
def list_storage(
    session: SessionDep, principal: PrincipalDep, provider_id: uuid.UUID | None = None
) -> list[StoragePublic]:
    rows = service.list_storage(session, principal, provider_id=provider_id)
    return [StoragePublic.model_validate(p) for p in rows]


@router.get("/api/v1/inventory/capacity")
def capacity(
    session: SessionDep, principal: PrincipalDep, provider_id: uuid.UUID | None = None
) -> list[ProviderCapacity]:
    """Per provider, and last the total over every enabled provider (provider_id null)."""
    return service.capacity(session, principal, provider_id=provider_id)


@router.get("/api/v1/servers", response_model=Page[ServerPublic])
def list_servers(
    session: SessionDep,
    principal: PrincipalDep,
    tenant_id: uuid.UUID | None = None,
    provider_id: uuid.UUID | None = None,
    power_state: PowerState | None = None,
    managed: bool | None = None,
    drift: bool | None = None,
    include_gone: bool = False,
    q: Annotated[str | None, Query(pattern=NO_NUL, max_length=100)] = None,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_PAGE,
) -> Page[ServerPublic]:
    rows, nxt = service.list_servers(
        session,
        principal,
        tenant_id=tenant_id,
        provider_id=provider_id,
        power_state=power_state,
        managed=managed,
        drift=drift,
        include_gone=include_gone,
        q=q,
        cursor=cursor,
        limit=limit,
    )
    return Page(data=[service.public(s) for s in rows], count=len(rows), next_cursor=nxt)


@router.get("/api/v1/servers/{server_id}")
def get_server(server_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> ServerPublic:
    return service.public(service.get_server(session, principal, server_id))


@router.post("/api/v1/servers/{server_id}/adopt")
def adopt_server(
    server_id: uuid.UUID, body: Adopt, session: SessionDep, principal: PrincipalDep
) -> ServerPublic:
    server = service.adopt(session, principal, server_id, body)
    session.commit()
    return service.public(server)
