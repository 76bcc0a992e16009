"""Self-service provisioning: server requests, lifecycle actions, jobs, the catalog, policies."""

from __future__ import annotations

import asyncio
import uuid
import weakref
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.deps import DEFAULT_PAGE, Cursor, DatabaseDep, Limit, PrincipalDep, SessionDep
from api.schemas import Page
from broker.core.authz import Principal
from broker.core.db import SessionSource
from broker.provisioning import catalog, executor, service
from broker.provisioning.executor import JobRunner
from broker.provisioning.schemas import (
    CatalogImport,
    CatalogItemCreate,
    CatalogItemPublic,
    CatalogItemUpdate,
    JobDecision,
    JobPublic,
    OfferedProvider,
    PolicyPublic,
    PolicyUpdate,
    ServerAction,
    ServerCreate,
)

router = APIRouter(tags=["provisioning"])
JobStateIn = Literal[
    "pending_approval", "queued", "running", "succeeded", "failed", "rejected", "expired"
]


async def runner(request: Request) -> JobRunner:
    # async: a plain attribute read must not cost a hop to the thread pool
    return request.app.state.jobs  # type: ignore[no-any-return]


RunnerDep = Annotated[JobRunner, Depends(runner)]


def _accepted(job: dict[str, Any], *, replayed: bool = False) -> JSONResponse:
    headers = {"Location": f"/api/v1/jobs/{job['id']}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(job, status_code=202, headers=headers)


# How many server requests are worked on at once per process; the rest wait their turn, first
# come first served, in the event loop. Every request writes to the same few rows (the chosen
# host, the audit chain's head; on SQLite, the whole database), so more at once only adds
# threads contending for those locks (and for the interpreter), and lets a late request
# overtake one waiting since long before.
REQUESTS_AT_ONCE = 2
_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def _turn() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    turn = _turns.get(loop)
    if turn is None:
        turn = _turns[loop] = asyncio.Semaphore(REQUESTS_AT_ONCE)
    return turn


@router.post(
    "/api/v1/servers",
    status_code=202,
    response_model=JobPublic,
    responses={202: {"description": "the job that builds the server"}},
)
async def request_server(
    body: ServerCreate,
    db: DatabaseDep,
    principal: PrincipalDep,
    jobs: RunnerDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JSONResponse:
    """Ask for a server. Send an `Idempotency-Key` to retry safely: the same key with the same
    body answers as the first time; with another body it is refused (422)."""
    async with _turn():
        submitted = await run_in_threadpool(_request, db, principal, body, idempotency_key, jobs)
    return _accepted(submitted.response, replayed=submitted.replayed)


def _request(
    db: SessionSource, principal: Principal, body: ServerCreate, key: str | None, jobs: JobRunner
) -> service.Submitted:
    submitted = service.request_server(db, principal, body, key=key)
    # handed to a worker in this thread, which goes on when the request is cancelled (the
    # client gone, a shutdown): a committed job is never left for the reconciler to find
    if submitted.claimed is not None:
        jobs.submit(submitted.claimed)
    return submitted


@router.post("/api/v1/servers/{server_id}/actions", status_code=202, response_model=JobPublic)
def act(
    server_id: uuid.UUID,
    body: ServerAction,
    session: SessionDep,
    principal: PrincipalDep,
    jobs: RunnerDep,
) -> JSONResponse:
    job = service.act(session, principal, server_id, body)
    response = JobPublic.model_validate(job).model_dump(mode="json")
    claimed = executor.handover(session, job)
    session.commit()
    if claimed is not None:
        jobs.submit(claimed)
    return _accepted(response)


@router.delete("/api/v1/servers/{server_id}", status_code=202, response_model=JobPublic)
def delete_server(
    server_id: uuid.UUID, session: SessionDep, principal: PrincipalDep, jobs: RunnerDep
) -> JSONResponse:
    job = service.delete(session, principal, server_id)
    response = JobPublic.model_validate(job).model_dump(mode="json")
    claimed = executor.handover(session, job)
    session.commit()
    if claimed is not None:
        jobs.submit(claimed)
    return _accepted(response)


@router.get("/api/v1/jobs", response_model=Page[JobPublic])
def list_jobs(
    session: SessionDep,
    principal: PrincipalDep,
    tenant_id: uuid.UUID | None = None,
    server_id: uuid.UUID | None = None,
    state: JobStateIn | None = None,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_PAGE,
) -> Page[JobPublic]:
    rows, nxt = service.list_jobs(
        session,
        principal,
        tenant_id=tenant_id,
        server_id=server_id,
        state=state,
        cursor=cursor,
        limit=limit,
    )
    return Page(data=[JobPublic.model_validate(j) for j in rows], count=len(rows), next_cursor=nxt)


@router.get("/api/v1/jobs/{job_id}")
def get_job(job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> JobPublic:
    return JobPublic.model_validate(service.get_job(session, principal, job_id))


def _decide(
    job_id: uuid.UUID,
    body: JobDecision | None,
    session: SessionDep,
    principal: PrincipalDep,
    jobs: JobRunner,
    approve: bool,
) -> JobPublic:
    job = service.decide(
        session, principal, job_id, approve=approve, reason=body.reason if body else None
    )
    out = JobPublic.model_validate(job)
    session.commit()
    if approve:
        jobs.submit(job_id)
    return out


@router.post("/api/v1/jobs/{job_id}/approve")
def approve_job(
    job_id: uuid.UUID,
    session: SessionDep,
    principal: PrincipalDep,
    jobs: RunnerDep,
    body: JobDecision | None = None,
) -> JobPublic:
    return _decide(job_id, body, session, principal, jobs, True)


@router.post("/api/v1/jobs/{job_id}/reject")
def reject_job(
    job_id: uuid.UUID,
    session: SessionDep,
    principal: PrincipalDep,
    jobs: RunnerDep,
    body: JobDecision | None = None,
) -> JobPublic:
    return _decide(job_id, body, session, principal, jobs, False)


# --- catalog ------------------------------------------------------------------------------------


@router.get("/api/v1/catalog")
def offered_catalog(
    tenant_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> list[OfferedProvider]:
    """What the caller may ask for in a system (or agency), per provider."""
    _, items, provs = catalog.catalog_for(session, principal, tenant_id)
    return [
        OfferedProvider(
            provider_id=pid,
            provider=provs[pid].name,
            region=provs[pid].region,
            items=[CatalogItemPublic.model_validate(i) for i in items[pid]],
        )
        for pid in sorted(items, key=lambda p: provs[p].name)
    ]


@router.get("/api/v1/providers/{provider_id}/catalog")
def provider_catalog(
    provider_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> list[CatalogItemPublic]:
    return [
        CatalogItemPublic.model_validate(i)
        for i in catalog.list_items(session, principal, provider_id)
    ]


@router.post("/api/v1/providers/{provider_id}/catalog/import")
def import_catalog(
    provider_id: uuid.UUID, db: DatabaseDep, principal: PrincipalDep
) -> CatalogImport:
    created, updated, items = catalog.import_items(db, principal, provider_id)
    return CatalogImport(
        created=created,
        updated=updated,
        items=[CatalogItemPublic.model_validate(i) for i in items],
    )


@router.post("/api/v1/providers/{provider_id}/catalog", status_code=201)
def create_catalog_item(
    provider_id: uuid.UUID, body: CatalogItemCreate, session: SessionDep, principal: PrincipalDep
) -> CatalogItemPublic:
    item = catalog.create_item(session, principal, provider_id, body)
    out = CatalogItemPublic.model_validate(item)
    session.commit()
    return out


@router.patch("/api/v1/catalog/{item_id}")
def update_catalog_item(
    item_id: uuid.UUID, body: CatalogItemUpdate, session: SessionDep, principal: PrincipalDep
) -> CatalogItemPublic:
    item = catalog.update_item(session, principal, item_id, body)
    out = CatalogItemPublic.model_validate(item)
    session.commit()
    return out


@router.get("/api/v1/agencies/{agency_id}/provisioning-policy")
def get_policy(agency_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> PolicyPublic:
    return PolicyPublic.model_validate(catalog.get_policy(session, principal, agency_id))


@router.put("/api/v1/agencies/{agency_id}/provisioning-policy")
def set_policy(
    agency_id: uuid.UUID, body: PolicyUpdate, session: SessionDep, principal: PrincipalDep
) -> PolicyPublic:
    policy = catalog.set_policy(session, principal, agency_id, body)
    out = PolicyPublic.model_validate(policy)
    session.commit()
    return out
