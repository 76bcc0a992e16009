"""Quota change requests: an agency asks the center for more (or less), with a justification and an
optional attachment; a center administrator approves it fully or partially, or rejects it.

Approval applies the approved changes through `quotas.service.set_quota`, so every invariant is
checked again at that moment, and either all classes change or none do.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Any

from sqlmodel import Session, col, select

from broker.audit import service as audit
from broker.core import clock
from broker.core.authz import Principal
from broker.core.errors import Conflict, FieldError, Forbidden, Invalid, NotFound
from broker.core.pagination import DEFAULT_LIMIT, decode_cursor, encode_cursor
from broker.core.settings import get_settings
from broker.tenancy.authz import authorize
from broker.tenancy.models import Tenant, TenantKind, TenantStatus
from quotas import ledger
from quotas import service as quotas
from quotas.models import Quota, QuotaRequest, QuotaRequestAttachment

PENDING = "pending"
DECIDED = ("approved", "partially_approved", "rejected", "withdrawn")
_SAFE_NAME = re.compile(r"[^\w.\- ()\u4e00-\u9fff]+")


def _snapshot(r: QuotaRequest) -> dict[str, Any]:
    return {
        "state": r.state,
        "requested": r.requested,
        "approved": r.approved,
        "decision_reason": r.decision_reason,
    }


def _tenant(session: Session, tenant_id: uuid.UUID) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"tenant {tenant_id} not found")
    return tenant


def _load(
    session: Session, principal: Principal, request_id: uuid.UUID, action: str
) -> tuple[QuotaRequest, Tenant]:
    req = session.get(QuotaRequest, request_id)
    if req is None:
        raise NotFound(f"quota request {request_id} not found")
    tenant = _tenant(session, req.tenant_id)
    authorize(principal, action, tenant, subject=f"quota request {request_id}")
    return req, tenant


def create(
    session: Session,
    principal: Principal,
    *,
    tenant_id: uuid.UUID,
    changes: dict[str, int],
    justification: str,
) -> QuotaRequest:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None or not principal.sees(tenant.path):
        raise Invalid.field("tenant_id", f"no tenant {tenant_id}", "not_found")
    if tenant.kind != TenantKind.agency:
        raise Invalid.field(
            "tenant_id",
            "requests go from an agency to the center; systems are split by the "
            "agency's administrators",
            "kind",
        )
    authorize(principal, "quota.request", tenant)
    if tenant.status == TenantStatus.archived:
        raise Invalid.field("tenant_id", f"agency {tenant.code} is archived", "archived")
    clean = ledger.validate_deltas(session, changes, field="changes")
    req = QuotaRequest(
        tenant_id=tenant.id,
        requested=clean,
        justification=justification,
        requested_by=principal.user_id,
        created_at=clock.now(),
    )
    session.add(req)
    session.flush()
    audit.record(
        session,
        principal,
        "quota_request.create",
        tenant=tenant,
        target_type="quota_request",
        target_id=req.id,
        after=_snapshot(req),
    )
    return req


def attach(
    session: Session,
    principal: Principal,
    request_id: uuid.UUID,
    *,
    filename: str,
    content_type: str,
    content: bytes,
) -> QuotaRequest:
    req, tenant = _load(session, principal, request_id, "quota.request")
    if req.state != PENDING:
        raise Conflict(f"the request is {req.state}; attachments can change only while pending")
    limit = get_settings().quota_attachment_max_bytes
    errors: list[FieldError] = []
    if not content:
        errors.append(FieldError("file", "is empty", "empty"))
    if len(content) > limit:
        errors.append(FieldError("file", f"is larger than {limit} bytes", "too_large"))
    name = _SAFE_NAME.sub("_", filename).strip(" .")[:255] or "attachment"
    if errors:
        raise Invalid("; ".join(f"{e.field}: {e.message}" for e in errors), errors)
    stored = session.get(QuotaRequestAttachment, req.id)
    if stored is None:
        session.add(QuotaRequestAttachment(request_id=req.id, content=content))
    else:
        stored.content = content
    req.attachment_name = name
    req.attachment_type = (content_type or "application/octet-stream")[:100]
    req.attachment_size = len(content)
    req.attachment_sha256 = hashlib.sha256(content).hexdigest()
    session.flush()
    audit.record(
        session,
        principal,
        "quota_request.attach",
        tenant=tenant,
        target_type="quota_request",
        target_id=req.id,
        after={"name": name, "size": len(content), "sha256": req.attachment_sha256},
    )
    return req


def attachment(
    session: Session, principal: Principal, request_id: uuid.UUID
) -> tuple[QuotaRequest, bytes]:
    req, _ = _load(session, principal, request_id, "quota.read")
    stored = session.get(QuotaRequestAttachment, req.id)
    if stored is None:
        raise NotFound("this request has no attachment")
    return req, stored.content


def get(session: Session, principal: Principal, request_id: uuid.UUID) -> QuotaRequest:
    return _load(session, principal, request_id, "quota.read")[0]


def list_requests(
    session: Session,
    principal: Principal,
    *,
    state: str | None = None,
    tenant_id: uuid.UUID | None = None,
    cursor: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> tuple[list[QuotaRequest], str | None]:
    """Newest first, within the caller's quota-reading scope."""
    stmt = (
        select(QuotaRequest)
        .join(Tenant, col(Tenant.id) == col(QuotaRequest.tenant_id))
        .where(principal.scope_filter("quota.read", col(Tenant.path)))
    )
    if state is not None:
        stmt = stmt.where(QuotaRequest.state == state)
    if tenant_id is not None:
        stmt = stmt.where(QuotaRequest.tenant_id == tenant_id)
    if cursor:
        ts, rid = decode_cursor(cursor, [type(clock.now()), uuid.UUID])
        stmt = stmt.where(
            (col(QuotaRequest.created_at) < ts)
            | ((col(QuotaRequest.created_at) == ts) & (col(QuotaRequest.id) < rid))
        )
    stmt = stmt.order_by(col(QuotaRequest.created_at).desc(), col(QuotaRequest.id).desc())
    rows = list(session.execute(stmt.limit(limit + 1)).scalars())
    nxt = (
        encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
    )
    return rows[:limit], nxt


def _ensure_pending(req: QuotaRequest) -> None:
    if req.state != PENDING:
        raise Conflict(f"the request is already {req.state}")


def approve(
    session: Session,
    principal: Principal,
    request_id: uuid.UUID,
    *,
    approved: dict[str, int] | None = None,
    reason: str | None = None,
) -> QuotaRequest:
    """Apply the requested (or amended) changes to the agency's limits, all or nothing."""
    req, tenant = _load(session, principal, request_id, "quota.read")
    if not principal.is_center_admin:
        raise Forbidden("only center administrators decide quota requests")
    # lock the request so that two administrators cannot both approve it
    req = session.execute(
        select(QuotaRequest)
        .where(QuotaRequest.id == req.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one()
    _ensure_pending(req)
    final = (
        dict(req.requested)
        if approved is None
        else ledger.validate_deltas(session, approved, field="approved")
    )
    extra = sorted(set(final) - set(req.requested))
    if extra:
        raise Invalid.field(f"approved.{extra[0]}", "was not requested", "not_requested")
    for code, amount in final.items():
        asked = req.requested[code]
        if (amount > 0) != (asked > 0) or abs(amount) > abs(asked):
            raise Invalid.field(
                f"approved.{code}",
                f"may grant part of the requested {asked}, not {amount}",
                "exceeds_request",
            )
    partial = final != req.requested
    reason = (reason or "").strip() or None
    if partial and not reason:
        raise Invalid.field("reason", "say why the request is only partly approved", "required")
    before = _snapshot(req)
    for code, change in sorted(final.items()):
        current = (
            session.execute(
                select(Quota)
                .where(Quota.tenant_id == tenant.id, Quota.resource_class == code)
                .execution_options(populate_existing=True)
            )
            .scalars()
            .first()
        )
        base = current.hard_limit if current is not None and current.hard_limit is not None else 0
        if base + change < 0:
            raise Invalid.field(
                f"approved.{code}", f"would make the limit {base + change}", "below_zero"
            )
        quotas.set_quota(session, principal, tenant.id, code, limit=base + change)
    req.state = "partially_approved" if partial else "approved"
    req.approved = final
    req.decision_reason = reason
    req.decided_by = principal.user_id
    req.decided_at = clock.now()
    session.flush()
    audit.record(
        session,
        principal,
        f"quota_request.{req.state}",
        tenant=tenant,
        target_type="quota_request",
        target_id=req.id,
        before=before,
        after=_snapshot(req),
    )
    return req


def reject(
    session: Session, principal: Principal, request_id: uuid.UUID, *, reason: str
) -> QuotaRequest:
    req, tenant = _load(session, principal, request_id, "quota.read")
    if not principal.is_center_admin:
        raise Forbidden("only center administrators decide quota requests")
    _ensure_pending(req)
    reason = reason.strip()
    if len(reason) < 2:
        raise Invalid.field("reason", "say why the request is rejected", "required")
    before = _snapshot(req)
    req.state, req.decision_reason = "rejected", reason
    req.decided_by, req.decided_at = principal.user_id, clock.now()
    session.flush()
    audit.record(
        session,
        principal,
        "quota_request.rejected",
        tenant=tenant,
        target_type="quota_request",
        target_id=req.id,
        before=before,
        after=_snapshot(req),
    )
    return req


def withdraw(session: Session, principal: Principal, request_id: uuid.UUID) -> QuotaRequest:
    req, tenant = _load(session, principal, request_id, "quota.request")
    _ensure_pending(req)
    before = _snapshot(req)
    req.state = "withdrawn"
    req.decided_by, req.decided_at = principal.user_id, clock.now()
    session.flush()
    audit.record(
        session,
        principal,
        "quota_request.withdrawn",
        tenant=tenant,
        target_type="quota_request",
        target_id=req.id,
        before=before,
        after=_snapshot(req),
    )
    return req
