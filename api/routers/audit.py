from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import AwareDatetime, BaseModel

from api.deps import DEFAULT_PAGE, NO_NUL, Cursor, Limit, PrincipalDep, SessionDep
from api.schemas import Page
from broker.audit import service as audit
from broker.core.errors import Invalid, NotFound
from broker.core.pagination import decode_cursor, encode_cursor
from broker.tenancy import service as tenancy

router = APIRouter(prefix="/api/v1/audit-events", tags=["audit"])


class AuditEventPublic(BaseModel):
    seq: int
    occurred_at: datetime
    actor_id: uuid.UUID | None
    actor_name: str
    tenant_id: uuid.UUID | None
    action: str
    target_type: str
    target_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    request_id: str
    client_ip: str | None
    prev_hash: str
    hash: str

    model_config = {"from_attributes": True}


@router.get("", response_model=Page[AuditEventPublic])
def list_events(
    session: SessionDep,
    principal: PrincipalDep,
    since: AwareDatetime | None = None,
    until: AwareDatetime | None = None,
    actor_id: uuid.UUID | None = None,
    actor: Annotated[
        str | None, Query(pattern=NO_NUL, max_length=64, description="actor's username")
    ] = None,
    tenant_id: uuid.UUID | None = None,
    action: Annotated[
        str | None,
        Query(pattern=NO_NUL, max_length=64, description="exact action, or a prefix ending in '.'"),
    ] = None,
    target_type: Annotated[str | None, Query(pattern=NO_NUL, max_length=64)] = None,
    target_id: Annotated[str | None, Query(pattern=NO_NUL, max_length=64)] = None,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_PAGE,
) -> Page[AuditEventPublic]:
    if since and until and until <= since:
        raise Invalid.field("until", "must be later than since")
    tenant_path = None
    if tenant_id is not None:
        try:
            tenant_path = tenancy.get_tenant(session, principal, tenant_id).path
        except NotFound as exc:
            raise Invalid.field("tenant_id", f"no tenant {tenant_id}", "not_found") from exc
    after_seq = decode_cursor(cursor, [int])[0] if cursor else None
    flt = audit.AuditFilter(
        since=since,
        until=until,
        actor_id=actor_id,
        actor_name=actor,
        tenant_path=tenant_path,
        action=action,
        target_type=target_type,
        target_id=target_id,
    )
    rows = audit.list_events(session, principal, flt, after_seq=after_seq, limit=limit + 1)
    nxt = encode_cursor(rows[limit - 1].seq) if len(rows) > limit else None
    rows = rows[:limit]
    return Page(
        data=[AuditEventPublic.model_validate(r) for r in rows], count=len(rows), next_cursor=nxt
    )
