"""Providers and service companies: registration, connection checks, enable/disable.

Credentials are encrypted with the configured Fernet keys before they touch the database, are
decrypted only to open a driver, and are scrubbed from every message a driver passes back (a
provider that echoes a password in an error must not leak it into the API, the audit log or logs).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import structlog
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from broker.audit import service as audit
from broker.core import clock
from broker.core.authz import Principal
from broker.core.crypto import decrypt, encrypt
from broker.core.db import SessionSource
from broker.core.errors import Conflict, Invalid, NotFound
from broker.inventory.models import Provider, ServiceCompany
from broker.inventory.schemas import (
    ConnectionCheck,
    ProviderCreate,
    ProviderPublic,
    ProviderUpdate,
    ServiceCompanyCreate,
    ServiceCompanyUpdate,
    check_endpoint,
)
from broker.tenancy import service as tenancy
from broker.tenancy.authz import authorize
from broker.tenancy.models import Tenant
from drivers.base import Driver, DriverError, open_driver

log = structlog.get_logger(__name__)

READ = "inventory.read"
MANAGE = "provider.manage"


def center_for(session: Session, principal: Principal, action: str, subject: str) -> Tenant:
    """The center, once `principal` may do `action` there; others learn nothing (404/403)."""
    center = tenancy.get_center(session)
    if center is None:
        raise NotFound(f"{subject} not found")
    authorize(principal, action, center, subject=subject)
    return center


def can_read_inventory(session: Session, principal: Principal) -> bool:
    center = tenancy.get_center(session)
    return center is not None and principal.can(READ, center.path)


# --- service companies -----------------------------------------------------------------------


def _company_snapshot(c: ServiceCompany) -> dict[str, Any]:
    return {
        "code": c.code,
        "name_zh": c.name_zh,
        "name_en": c.name_en,
        "credit_code": c.credit_code,
        "contact": c.contact,
    }


def _company_code_free(session: Session, code: str, but: uuid.UUID | None = None) -> None:
    stmt = select(ServiceCompany.id).where(ServiceCompany.code == code)
    found = session.execute(stmt).scalar()
    if found is not None and found != but:
        raise Conflict.field("code", f"service company code {code!r} is already used", "duplicate")


def create_company(
    session: Session, principal: Principal, data: ServiceCompanyCreate
) -> ServiceCompany:
    center = center_for(session, principal, MANAGE, "service companies")
    _company_code_free(session, data.code)
    company = ServiceCompany(**data.model_dump())
    session.add(company)
    _flush_unique(session, "code", f"service company code {data.code!r}")
    audit.record(
        session,
        principal,
        "service_company.create",
        tenant=center,
        target_type="service_company",
        target_id=company.id,
        after=_company_snapshot(company),
    )
    return company


def get_company(session: Session, principal: Principal, company_id: uuid.UUID) -> ServiceCompany:
    center_for(session, principal, READ, f"service company {company_id}")
    company = session.get(ServiceCompany, company_id)
    if company is None:
        raise NotFound(f"service company {company_id} not found")
    return company


def list_companies(session: Session, principal: Principal) -> list[ServiceCompany]:
    center_for(session, principal, READ, "service companies")
    return list(session.execute(select(ServiceCompany).order_by(ServiceCompany.code)).scalars())


def update_company(
    session: Session, principal: Principal, company_id: uuid.UUID, data: ServiceCompanyUpdate
) -> ServiceCompany:
    center = center_for(session, principal, MANAGE, f"service company {company_id}")
    company = session.get(ServiceCompany, company_id, with_for_update=True)
    if company is None:
        raise NotFound(f"service company {company_id} not found")
    before = _company_snapshot(company)
    for key, value in data.model_dump(exclude_unset=True).items():
        setattr(company, key, value)
    company.updated_at = clock.now()
    session.flush()
    audit.record(
        session,
        principal,
        "service_company.update",
        tenant=center,
        target_type="service_company",
        target_id=company.id,
        before=before,
        after=_company_snapshot(company),
    )
    return company


# --- providers -------------------------------------------------------------------------------


def credentials_of(provider: Provider) -> dict[str, str]:
    plain = json.loads(decrypt(provider.credentials_enc))
    assert isinstance(plain, dict)
    return {str(k): str(v) for k, v in plain.items()}


def _seal(credentials: Mapping[str, str]) -> str:
    return encrypt(json.dumps(dict(credentials), sort_keys=True))


def scrub(message: str | None, credentials: Mapping[str, str]) -> str | None:
    """Remove every credential value (of 4+ characters) from a provider's message."""
    if message is None:
        return None
    for value in sorted(credentials.values(), key=len, reverse=True):
        if len(value) >= 4:
            message = message.replace(value, "***")
    return message


def public(provider: Provider) -> ProviderPublic:
    fields = sorted(credentials_of(provider))
    return ProviderPublic(
        id=provider.id,
        kind=provider.kind,
        name=provider.name,
        region=provider.region,
        endpoint=provider.endpoint,
        credential_fields=fields,
        service_company_id=provider.service_company_id,
        overcommit={k: Decimal(v) for k, v in provider.overcommit.items()},
        options=provider.options,
        enabled=provider.enabled,
        sync_interval_s=provider.sync_interval_s,
        adopt_by_owner=provider.adopt_by_owner,
        last_sync_at=provider.last_sync_at,
        last_sync_status=provider.last_sync_status,
        last_sync_error=provider.last_sync_error,
        created_at=provider.created_at,
        updated_at=provider.updated_at,
    )


def _snapshot(p: Provider) -> dict[str, Any]:
    """For the audit log: everything but the credentials, of which only the field names."""
    return {
        "kind": p.kind,
        "name": p.name,
        "region": p.region,
        "endpoint": p.endpoint,
        # named so the audit redaction (which hides values of credential-like keys) keeps them
        "login_fields": sorted(credentials_of(p)),
        "service_company_id": str(p.service_company_id) if p.service_company_id else None,
        "overcommit": dict(p.overcommit),
        "options": p.options,
        "enabled": p.enabled,
        "sync_interval_s": p.sync_interval_s,
        "adopt_by_owner": p.adopt_by_owner,
    }


def _check_refs(session: Session, kind: str, endpoint: str, company_id: uuid.UUID | None) -> None:
    try:
        check_endpoint(kind, endpoint)
    except ValueError as exc:
        raise Invalid.field("endpoint", str(exc), "format") from exc
    if company_id is not None and session.get(ServiceCompany, company_id) is None:
        raise Invalid.field("service_company_id", f"no service company {company_id}", "not_found")


def _flush_unique(session: Session, field: str, what: str) -> None:
    """A concurrent insert of the same name loses here with a 409, not a 500."""
    try:
        session.flush()
    except IntegrityError as exc:
        raise Conflict.field(field, f"{what} is already used", "duplicate") from exc


def _name_free(session: Session, name: str, but: uuid.UUID | None = None) -> None:
    found = session.execute(select(Provider.id).where(Provider.name == name)).scalar()
    if found is not None and found != but:
        raise Conflict.field("name", f"provider name {name!r} is already used", "duplicate")


def _ratios(overcommit: Mapping[str, Decimal]) -> dict[str, str]:
    return {k: str(v) for k, v in sorted(overcommit.items())}


def create_provider(session: Session, principal: Principal, data: ProviderCreate) -> Provider:
    center = center_for(session, principal, MANAGE, "providers")
    _check_refs(session, data.kind, data.endpoint, data.service_company_id)
    _name_free(session, data.name)
    provider = Provider(
        kind=data.kind,
        name=data.name,
        region=data.region,
        endpoint=data.endpoint,
        credentials_enc=_seal(data.credentials),
        service_company_id=data.service_company_id,
        overcommit=_ratios(data.overcommit),
        options=data.options,
        enabled=data.enabled,
        sync_interval_s=data.sync_interval_s,
        adopt_by_owner=data.adopt_by_owner,
    )
    session.add(provider)
    _flush_unique(session, "name", f"provider name {data.name!r}")
    audit.record(
        session,
        principal,
        "provider.create",
        tenant=center,
        target_type="provider",
        target_id=provider.id,
        after=_snapshot(provider),
    )
    log.info("provider registered", provider=provider.name, kind=provider.kind)
    return provider


def get_provider(session: Session, principal: Principal, provider_id: uuid.UUID) -> Provider:
    center_for(session, principal, READ, f"provider {provider_id}")
    provider = session.get(Provider, provider_id)
    if provider is None:
        raise NotFound(f"provider {provider_id} not found")
    return provider


def list_providers(
    session: Session, principal: Principal, *, enabled: bool | None = None, kind: str | None = None
) -> list[Provider]:
    center_for(session, principal, READ, "providers")
    stmt = select(Provider).order_by(Provider.name)
    if enabled is not None:
        stmt = stmt.where(Provider.enabled == enabled)
    if kind is not None:
        stmt = stmt.where(Provider.kind == kind)
    return list(session.execute(stmt).scalars())


def update_provider(
    session: Session, principal: Principal, provider_id: uuid.UUID, data: ProviderUpdate
) -> Provider:
    center = center_for(session, principal, MANAGE, f"provider {provider_id}")
    provider = session.get(Provider, provider_id, with_for_update=True)
    if provider is None:
        raise NotFound(f"provider {provider_id} not found")
    before = _snapshot(provider)
    changes = data.model_dump(exclude_unset=True)
    endpoint = changes.get("endpoint", provider.endpoint)
    company = changes.get("service_company_id", provider.service_company_id)
    _check_refs(session, provider.kind, endpoint, company)
    if "name" in changes:
        _name_free(session, changes["name"], provider.id)
    if "credentials" in changes:
        provider.credentials_enc = _seal(changes.pop("credentials"))
    if "overcommit" in changes:
        provider.overcommit = _ratios(changes.pop("overcommit"))
    for key, value in changes.items():
        setattr(provider, key, value)
    provider.updated_at = clock.now()
    _flush_unique(session, "name", f"provider name {provider.name!r}")
    audit.record(
        session,
        principal,
        "provider.update",
        tenant=center,
        target_type="provider",
        target_id=provider.id,
        before=before,
        after=_snapshot(provider),
    )
    return provider


def driver_for(provider: Provider) -> Driver:
    """Open the provider's driver; only inventory and provisioning ever hold the plaintext."""
    return open_driver(provider.kind, provider.endpoint, credentials_of(provider), provider.options)


def check_connection(
    db: SessionSource, principal: Principal, provider_id: uuid.UUID
) -> ConnectionCheck:
    """Connect and authenticate now. A refusal is an answer (ok false with the provider's
    reason, credentials scrubbed), not an error of this request. No transaction is open while
    the provider is being asked: a slow or hung one must not hold a database lock."""
    with db.unit_of_work(write=False) as session:
        center_for(session, principal, MANAGE, f"provider {provider_id}")
        provider = session.get(Provider, provider_id)
        if provider is None:
            raise NotFound(f"provider {provider_id} not found")
        session.expunge(provider)
    creds = credentials_of(provider)
    started = time.monotonic()
    error: str | None = None
    error_type: str | None = None
    try:
        driver = driver_for(provider)
        try:
            driver.check()
        finally:
            driver.close()
    except DriverError as exc:
        error, error_type = scrub(exc.provider_message, creds), type(exc).__name__
    except Exception as exc:  # a driver bug is still an answer about this provider, scrubbed
        error = scrub(f"{type(exc).__name__}: {exc}", creds)
        error_type = type(exc).__name__
        log.error("provider check crashed", provider=provider.name, error=error)
    result = ConnectionCheck(
        ok=error is None,
        latency_ms=int((time.monotonic() - started) * 1000),
        error=error,
        error_type=error_type,
    )
    with db.unit_of_work() as session:
        audit.record(
            session,
            principal,
            "provider.check",
            tenant=tenancy.get_center(session),
            target_type="provider",
            target_id=provider.id,
            after=result.model_dump(),
        )
    log.info("provider connection checked", provider=provider.name, ok=result.ok, error=error)
    return result


def by_name_or_id(session: Session, ref: str) -> Provider:
    try:
        provider = session.get(Provider, uuid.UUID(ref))
    except ValueError:
        provider = None
    if provider is None:
        stmt = select(Provider).where(col(Provider.name) == ref)
        provider = session.execute(stmt).scalars().first()
    if provider is None:
        raise NotFound(f"provider {ref} not found")
    return provider
