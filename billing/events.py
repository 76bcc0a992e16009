"""Writing lifecycle events: the one door, so every writer records the same facts."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from sqlmodel import Session

from billing.models import LifecycleEvent, LifecycleKind
from broker.core import clock


def emit(
    session: Session,
    kind: LifecycleKind,
    *,
    server_id: uuid.UUID,
    tenant_id: uuid.UUID | None,
    agency_id: uuid.UUID | None,
    provider_id: uuid.UUID,
    power_state: str,
    sizes: Mapping[str, int],
    actor: str,
    service_company_id: uuid.UUID | None = None,
    contract_id: uuid.UUID | None = None,
    job_id: uuid.UUID | None = None,
    detail: Mapping[str, Any] | None = None,
) -> LifecycleEvent:
    """Record one state change of a server, in the caller's transaction. Servers no tenant owns
    (tenant_id None) are metered to the unassigned bucket."""
    event = LifecycleEvent(
        server_id=server_id,
        tenant_id=tenant_id,
        agency_id=agency_id,
        provider_id=provider_id,
        service_company_id=service_company_id,
        contract_id=contract_id,
        kind=kind.value,
        power_state=power_state,
        sizes=dict(sizes),
        detail=dict(detail or {}),
        job_id=job_id,
        actor=actor[:64],
        at=clock.now(),
    )
    session.add(event)
    return event
