"""Contracts (分签): each agency signs with a centrally selected service company and pays its
own bills. A managed server is bound to one contract when it is created; a contract refuses new
servers outside its period or when it is not active."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any, TypeVar

from sqlalchemy import func
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from billing import rating
from billing.models import Contract, ContractStatus, ServiceCompany, UsageInterval
from billing.prices import MANAGE, require_center
from billing.schemas import ContractCreate, ContractUpdate
from broker.audit import service as audit
from broker.core import clock
from broker.core.authz import Principal
from broker.core.errors import Conflict, Invalid, NotFound
from broker.tenancy.authz import authorize
from broker.tenancy.models import Tenant, TenantKind, TenantStatus

READ = "billing.read"
T = TypeVar("T")


def _snapshot(c: Contract) -> dict[str, Any]:
    return {
        "number": c.number,
        "title": c.title,
        "starts_on": c.starts_on.isoformat(),
        "ends_on": c.ends_on.isoformat(),
        "budget_amount": c.budget_amount,
        "discount_pct": str(c.discount_pct),
        "status": c.status,
        "billing_contact": c.billing_contact,
    }


def create_contract(session: Session, principal: Principal, data: ContractCreate) -> Contract:
    require_center(session, principal, MANAGE)
    agency = session.get(Tenant, data.agency_id)
    if agency is None or agency.kind != TenantKind.agency:
        raise Invalid.field("agency_id", "no such agency", "not_found")
    if agency.status != TenantStatus.active:
        raise Conflict.field(
            "agency_id", f"agency {agency.code} is {agency.status}: it cannot sign", "inactive"
        )
    if session.get(ServiceCompany, data.service_company_id) is None:
        raise Invalid.field("service_company_id", "no such service company", "not_found")
    if data.ends_on < data.starts_on:
        raise Invalid.field("ends_on", "is before starts_on")
    if data.signed_on > data.ends_on:
        raise Invalid.field("signed_on", "is after the contract has ended")
    taken = session.execute(select(Contract.id).where(Contract.number == data.number)).first()
    if taken is not None:
        raise Conflict.field("number", f"contract number {data.number} is taken", "taken")
    contract = Contract(**data.model_dump())
    session.add(contract)
    session.flush()
    audit.record(
        session,
        principal,
        "contract.create",
        tenant=agency,
        target_type="contract",
        target_id=contract.id,
        after=_snapshot(contract),
    )
    return contract


def _load(session: Session, principal: Principal, contract_id: uuid.UUID, action: str) -> Contract:
    contract = session.get(Contract, contract_id)
    if contract is None:
        raise NotFound(f"contract {contract_id} not found")
    agency = session.get(Tenant, contract.agency_id)
    assert agency is not None
    authorize(principal, action, agency, subject=f"contract {contract_id}")
    return contract


def get_contract(session: Session, principal: Principal, contract_id: uuid.UUID) -> Contract:
    return _load(session, principal, contract_id, READ)


def update_contract(
    session: Session, principal: Principal, contract_id: uuid.UUID, data: ContractUpdate
) -> Contract:
    contract = _load(session, principal, contract_id, READ)
    require_center(session, principal, MANAGE)
    before = _snapshot(contract)
    changes = data.model_dump(exclude_unset=True)
    if "ends_on" in changes and changes["ends_on"] < contract.starts_on:
        raise Invalid.field("ends_on", "is before the contract starts")
    if contract.status == ContractStatus.terminated and changes.get("status", "terminated") != (
        "terminated"
    ):
        raise Conflict.field("status", "a terminated contract stays terminated", "terminated")
    if "ends_on" in changes and changes["ends_on"] != contract.ends_on:
        _check_period_change(session, contract, changes["ends_on"])
    for name, value in changes.items():
        setattr(contract, name, value)
    contract.updated_at = clock.now()
    session.add(contract)
    session.flush()
    audit.record(
        session,
        principal,
        "contract.update",
        tenant=session.get(Tenant, contract.agency_id),
        target_type="contract",
        target_id=contract.id,
        before=before,
        after=_snapshot(contract),
    )
    return contract


def in_scope(stmt: SelectOfScalar[T], principal: Principal, agency_id: Any) -> SelectOfScalar[T]:
    """Billing objects whose agency lies where the principal may read billing: filtered in
    SQL, by the agencies' materialised paths (no right anywhere: nothing)."""
    return stmt.join(Tenant, col(Tenant.id) == agency_id).where(
        principal.scope_filter(READ, col(Tenant.path))
    )


def _check_period_change(session: Session, contract: Contract, ends_on: date) -> None:
    """A contract's end may move only where nothing has been rated yet: time already rated was
    paid by this contract or by none according to the old end, and moving the end behind it
    would leave that time on no statement, or unassigned for ever."""
    old_end = rating.contract_window(contract.id, contract.starts_on, contract.ends_on).end
    new_end = rating.contract_window(contract.id, contract.starts_on, ends_on).end
    rated = session.execute(
        select(func.max(col(UsageInterval.rated_until))).where(
            UsageInterval.agency_id == contract.agency_id,
            UsageInterval.service_company_id == contract.service_company_id,
        )
    ).scalar_one()
    if rated is not None and min(old_end, new_end) < rated:
        raise Conflict.field(
            "ends_on",
            f"usage up to {rated.isoformat()} is already rated under the current period; the "
            "end can move only ahead of that (sign a renewal contract to continue)",
            "already_rated",
        )


def list_contracts(
    session: Session,
    principal: Principal,
    *,
    agency_id: uuid.UUID | None = None,
    status: str | None = None,
) -> list[Contract]:
    stmt = in_scope(select(Contract), principal, col(Contract.agency_id)).order_by(
        col(Contract.number)
    )
    if agency_id is not None:
        stmt = stmt.where(Contract.agency_id == agency_id)
    if status is not None:
        stmt = stmt.where(Contract.status == status)
    return list(session.execute(stmt).scalars())


def local_day(at: datetime) -> date:
    return at.astimezone(rating.zone()).date()


def contract_for_server(
    session: Session,
    *,
    agency_id: uuid.UUID,
    service_company_id: uuid.UUID | None,
    contract_id: uuid.UUID | None = None,
    at: datetime | None = None,
) -> Contract | None:
    """The contract a new server of `agency_id` is billed under: the one asked for, or the
    agency's active contract with the service company serving it on that day. None when the
    agency has signed nothing with that company (its usage shows as unassigned to the center);
    refused when contracts exist but none may take new servers today."""
    today = local_day(at or clock.now())
    if contract_id is not None:
        contract = session.get(Contract, contract_id)
        if contract is None or contract.agency_id != agency_id:
            raise Invalid.field("contract_id", "no such contract for this agency", "not_found")
        _check_open(contract, today, "contract_id")
        if service_company_id is not None and contract.service_company_id != service_company_id:
            raise Invalid.field(
                "contract_id", "is signed with another service company than the provider's"
            )
        return contract
    if service_company_id is None:
        return None
    candidates = list(
        session.execute(
            select(Contract)
            .where(
                Contract.agency_id == agency_id,
                Contract.service_company_id == service_company_id,
                Contract.status != ContractStatus.terminated.value,
            )
            .order_by(col(Contract.starts_on).desc(), col(Contract.number))
        ).scalars()
    )
    if not candidates:
        return None
    for contract in candidates:
        if contract.status == ContractStatus.active and contract.starts_on <= today <= (
            contract.ends_on
        ):
            return contract
    _check_open(candidates[0], today, "contract_id")
    return None  # unreachable: _check_open raised


def _check_open(contract: Contract, today: date, field: str) -> None:
    if contract.status != ContractStatus.active:
        raise Conflict.field(
            field, f"contract {contract.number} is {contract.status}: no new servers", "inactive"
        )
    if not contract.starts_on <= today <= contract.ends_on:
        raise Conflict.field(
            field,
            f"contract {contract.number} runs {contract.starts_on} to {contract.ends_on}; "
            f"today ({today}) is outside it: no new servers",
            "outside_period",
        )
