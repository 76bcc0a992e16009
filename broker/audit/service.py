"""Writing, reading and verifying the audit trail.

`record()` stages an event on the session; the session's `before_commit` hook then takes the chain
head's lock, links the staged events (seq, prev_hash, hash) and inserts them in the same
transaction as the change they describe. Taking the lock at commit time, not at the first write,
keeps the serialised section as short as possible. A rolled-back unit of work writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import bindparam, event, insert, update
from sqlalchemy.orm import Session as SASession
from sqlmodel import Session, select

from broker.audit.models import GENESIS_HASH, AuditChainHead, AuditEvent
from broker.core import clock, context
from broker.core.authz import Principal
from broker.core.errors import Forbidden

_PENDING = "govbroker.audit.pending"
_SECRET_WORDS = ("password", "secret", "token", "credential", "private_key", "fernet", "api_key")
REDACTED = "***"


class TenantLike(Protocol):
    @property
    def id(self) -> uuid.UUID: ...
    @property
    def path(self) -> str: ...


def redact(data: Any) -> Any:
    """Replace values of secret-looking keys, at any depth."""
    if isinstance(data, dict):
        return {
            k: (REDACTED if any(w in k.lower() for w in _SECRET_WORDS) else redact(v))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [redact(v) for v in data]
    return data


def _jsonable(data: Any) -> Any:
    """Plain JSON values only, so that what is hashed is exactly what the database returns."""
    if data is None:
        return None
    return json.loads(json.dumps(data, default=str, ensure_ascii=False))


def record(
    session: Session,
    principal: Principal,
    action: str,
    *,
    tenant: TenantLike | None,
    target_type: str,
    target_id: Any,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> None:
    ctx = context.current()
    session.info.setdefault(_PENDING, []).append(
        {
            "occurred_at": clock.now(),
            "actor_id": principal.user_id,
            "actor_name": principal.username,
            "tenant_id": tenant.id if tenant is not None else None,
            "tenant_path": tenant.path if tenant is not None else None,
            "action": action,
            "target_type": target_type,
            "target_id": str(target_id),
            "before": _jsonable(redact(before)),
            "after": _jsonable(redact(after)),
            "request_id": ctx.request_id,
            "client_ip": ctx.client_ip,
        }
    )


def canonical(event_fields: dict[str, Any]) -> bytes:
    """The bytes the hash covers: every field but the hash, keys sorted, no whitespace."""
    doc = {k: v for k, v in event_fields.items() if k != "hash"}
    for key in ("occurred_at",):
        if isinstance(doc.get(key), datetime):
            doc[key] = doc[key].isoformat(timespec="microseconds")
    for key in ("actor_id", "tenant_id"):
        if doc.get(key) is not None:
            doc[key] = str(doc[key])
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def compute_hash(event_fields: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(event_fields)).hexdigest()


_HASHED_FIELDS = (
    "seq",
    "occurred_at",
    "actor_id",
    "actor_name",
    "tenant_id",
    "tenant_path",
    "action",
    "target_type",
    "target_id",
    "before",
    "after",
    "request_id",
    "client_ip",
    "prev_hash",
)


def fields_of(ev: AuditEvent) -> dict[str, Any]:
    return {k: getattr(ev, k) for k in _HASHED_FIELDS}


# The chain is appended with Core statements built once: every writing unit of work passes here,
# inside the serialised section, so its cost bounds the whole system's write rate.
_HEAD = AuditChainHead.__table__  # type: ignore[attr-defined]
_EVENT = AuditEvent.__table__  # type: ignore[attr-defined]
# takes the head's row lock and claims `n` sequence numbers in one round trip; last_hash is
# still the previous link's (the RETURNING of an UPDATE shows the new row, and it is unchanged)
_CLAIM_SEQS = (
    update(_HEAD)
    .where(_HEAD.c.id == 1)
    .values(last_seq=_HEAD.c.last_seq + bindparam("n"))
    .returning(_HEAD.c.last_seq, _HEAD.c.last_hash)
)
_SET_LAST_HASH = update(_HEAD).where(_HEAD.c.id == 1).values(last_hash=bindparam("h"))
_INSERT_HEAD = insert(_HEAD)
_INSERT_EVENTS = insert(_EVENT)


def _claim_seqs(session: SASession, n: int) -> tuple[int, str]:
    """Lock the chain head and take `n` sequence numbers: (the last one taken before, its hash)."""
    conn = session.connection()
    row = conn.execute(_CLAIM_SEQS, {"n": n}).first()
    if row is None:  # a database created without migrations' seed row
        conn.execute(_INSERT_HEAD, {"id": 1, "last_seq": n, "last_hash": GENESIS_HASH})
        return 0, GENESIS_HASH
    return int(row[0]) - n, str(row[1])


@event.listens_for(SASession, "before_commit")
def _link_pending(session: SASession) -> None:
    pending = session.info.pop(_PENDING, None)
    if not pending:
        return
    session.flush()  # the unit of work's own changes first (Core statements do not autoflush)
    seq, prev = _claim_seqs(session, len(pending))
    rows = []
    for staged in pending:
        seq += 1
        fields = {**staged, "seq": seq, "prev_hash": prev}
        prev = compute_hash(fields)
        rows.append({**fields, "hash": prev})
    conn = session.connection()
    conn.execute(_INSERT_EVENTS, rows)
    conn.execute(_SET_LAST_HASH, {"h": prev})
    # a head this session loaded as an object must not show the old link
    loaded = session.identity_map.get(session.identity_key(AuditChainHead, 1))
    if loaded is not None:
        session.expire(loaded)


@event.listens_for(SASession, "after_soft_rollback")
def _drop_pending(session: SASession, _previous: Any) -> None:
    session.info.pop(_PENDING, None)


@dataclass(frozen=True)
class ChainReport:
    checked: int
    ok: bool
    broken_at: int | None = None
    reason: str | None = None


def verify_chain(session: Session, batch: int = 2000) -> ChainReport:
    """Walk the chain in order; report the first link that is missing, altered or out of place."""
    expected_seq, prev, checked = 1, GENESIS_HASH, 0
    for ev in _iter_events(session, batch):
        if ev.seq != expected_seq:
            return ChainReport(checked, False, expected_seq, f"event {expected_seq} is missing")
        if ev.prev_hash != prev:
            return ChainReport(
                checked, False, ev.seq, "prev_hash does not match the previous event's hash"
            )
        if compute_hash(fields_of(ev)) != ev.hash:
            return ChainReport(checked, False, ev.seq, "content does not match its hash")
        prev, expected_seq, checked = ev.hash, expected_seq + 1, checked + 1
    head = session.get(AuditChainHead, 1)
    if head is not None and (head.last_seq != checked or head.last_hash != prev):
        return ChainReport(
            checked,
            False,
            checked + 1,
            f"chain head records {head.last_seq} events but the log ends at {checked}",
        )
    return ChainReport(checked, True)


def _iter_events(session: Session, batch: int) -> Iterator[AuditEvent]:
    last = 0
    while True:
        stmt = select(AuditEvent).where(AuditEvent.seq > last).order_by(AuditEvent.seq).limit(batch)  # type: ignore[arg-type]
        rows = session.execute(stmt).scalars().all()
        if not rows:
            return
        yield from rows
        last = rows[-1].seq


@dataclass(frozen=True)
class AuditFilter:
    since: datetime | None = None
    until: datetime | None = None
    actor_id: uuid.UUID | None = None
    actor_name: str | None = None
    tenant_id: uuid.UUID | None = None
    tenant_path: str | None = None
    action: str | None = None
    target_type: str | None = None
    target_id: str | None = None


def list_events(
    session: Session,
    principal: Principal,
    flt: AuditFilter,
    *,
    after_seq: int | None,
    limit: int,
) -> list[AuditEvent]:
    """Newest first, keyset-paginated by seq, filtered to the principal's audit scope in SQL."""
    if not principal.prefixes("audit.read"):
        raise Forbidden("reading the audit trail needs the center_admin or auditor role")
    stmt = select(AuditEvent).where(principal.scope_filter("audit.read", AuditEvent.tenant_path))
    if flt.since is not None:
        stmt = stmt.where(AuditEvent.occurred_at >= flt.since)
    if flt.until is not None:
        stmt = stmt.where(AuditEvent.occurred_at < flt.until)
    if flt.actor_id is not None:
        stmt = stmt.where(AuditEvent.actor_id == flt.actor_id)
    if flt.actor_name is not None:
        stmt = stmt.where(AuditEvent.actor_name == flt.actor_name)
    if flt.tenant_path is not None:
        stmt = stmt.where(AuditEvent.tenant_path.startswith(flt.tenant_path))  # type: ignore[union-attr]
    if flt.action is not None:
        # "tenant." matches every tenant action; "tenant.create" exactly that one
        if flt.action.endswith("."):
            stmt = stmt.where(AuditEvent.action.startswith(flt.action))  # type: ignore[attr-defined]
        else:
            stmt = stmt.where(AuditEvent.action == flt.action)
    if flt.target_type is not None:
        stmt = stmt.where(AuditEvent.target_type == flt.target_type)
    if flt.target_id is not None:
        stmt = stmt.where(AuditEvent.target_id == flt.target_id)
    if after_seq is not None:
        stmt = stmt.where(AuditEvent.seq < after_seq)
    stmt = stmt.order_by(AuditEvent.seq.desc()).limit(limit)  # type: ignore[attr-defined]
    return list(session.execute(stmt).scalars().all())
