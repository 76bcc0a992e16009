"""Server requests and lifecycle actions, up to the job: validate, place, reserve, record.

Everything a request can get wrong is found here, before anything is held: an item the agency is
not offered, a size out of bounds, a name the provider would refuse, another agency's system, a
deleted server, a contract (分签) that cannot take the server. What passes is one transaction:
the quota reservation (one ledger call for every class), the job, the idempotency key and the
audit event, together or not at all. The provider is called later, by the executor, outside any
transaction.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, insert, or_
from sqlalchemy import delete as sa_delete
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from billing import contracts
from billing.models import Contract
from broker.audit import service as audit
from broker.core import clock
from broker.core.authz import Principal
from broker.core.db import SessionSource
from broker.core.errors import Conflict, Invalid, NotFound
from broker.core.pagination import DEFAULT_LIMIT, decode_cursor, encode_cursor
from broker.core.settings import get_settings
from broker.inventory import service as inventory
from broker.inventory.models import Provider, Server
from broker.inventory.sync import owner_ref
from broker.provisioning import catalog, executor
from broker.provisioning.models import (
    ACTIVE_STATES,
    AgencyPolicy,
    CatalogItem,
    CatalogKind,
    IdempotencyKey,
    Job,
    JobKind,
    JobState,
)
from broker.provisioning.placement import place
from broker.provisioning.schemas import JobPublic, ServerAction, ServerCreate
from broker.tenancy.authz import authorize
from broker.tenancy.models import Tenant, TenantKind, TenantStatus
from drivers.base import DriverError, driver_class
from quotas import ledger

MANAGE = "server.manage"
APPROVE = "server.approve"
IDEMPOTENCY_FIELD = "Idempotency-Key"


def request_tag(job_id: uuid.UUID) -> str:
    """What the provider-side server carries, to be found again after a crash."""
    return f"gb-{job_id}"


def owner_tag(agency: Tenant, system: Tenant) -> str:
    """The provider-side owner: the tenant's path of codes, as sync resolves it."""
    return f"{agency.code}/{system.code}"


def body_hash(data: ServerCreate) -> str:
    body = data.model_dump(mode="json")
    if body.get("contract_id") is None:
        # a body that names no contract hashes as it did before the field existed, so a retry
        # of a request sent before an upgrade still replays instead of being refused
        body.pop("contract_id", None)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# --- resolving a request against the catalog -----------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    """What a request means on one provider: the items, the sizes, the quota it needs."""

    provider: Provider
    flavor: CatalogItem | None
    image: CatalogItem
    network: CatalogItem | None
    vcpu: int
    memory_mb: int
    root_gb: int
    root_tier: str | None
    disks: tuple[tuple[int, str], ...]

    @property
    def host_need(self) -> dict[str, int]:
        return {"vcpu": self.vcpu, "memory_mb": self.memory_mb}

    @property
    def able_hosts(self) -> frozenset[str] | None:
        hosts = self.image.spec.get("hosts")
        return frozenset(hosts) if hosts else None

    @property
    def storage(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.root_gb and self.root_tier:
            out[self.root_tier] = self.root_gb
        for size_gb, tier in self.disks:
            out[tier] = out.get(tier, 0) + size_gb
        return out


def _by_code(items: Sequence[CatalogItem], kind: str) -> dict[str, CatalogItem]:
    return {i.code: i for i in items if i.kind == kind}


def _resolve_on(
    provider: Provider, items: Sequence[CatalogItem], data: ServerCreate
) -> tuple[Resolved | None, tuple[str, str, str] | None]:
    """The request on one provider, or the first reason (field, message, code) it cannot be."""
    flavors = _by_code(items, CatalogKind.flavor)
    images = _by_code(items, CatalogKind.image)
    networks = _by_code(items, CatalogKind.network)
    tiers = _by_code(items, CatalogKind.tier)
    sizes = [i for i in items if i.kind == CatalogKind.size]
    flavor: CatalogItem | None = None
    if data.flavor is not None:
        flavor = flavors.get(data.flavor)
        if flavor is None:
            return None, ("flavor", f"no flavor {data.flavor!r} is offered", "unknown")
        vcpu, memory_mb = int(flavor.spec["vcpu"]), int(flavor.spec["memory_mb"])
    else:
        assert data.vcpu is not None and data.memory_mb is not None
        vcpu, memory_mb = data.vcpu, data.memory_mb
        if not sizes:
            return None, ("vcpu", "custom sizes are not offered; choose a flavor", "not_offered")
        fits = [
            b
            for b in sizes
            if b.spec["min_vcpu"] <= vcpu <= b.spec["max_vcpu"]
            and b.spec["min_memory_mb"] <= memory_mb <= b.spec["max_memory_mb"]
        ]
        if not fits:
            b = sizes[0].spec
            if not b["min_vcpu"] <= vcpu <= b["max_vcpu"]:
                return None, (
                    "vcpu",
                    f"must be between {b['min_vcpu']} and {b['max_vcpu']}",
                    "out_of_bounds",
                )
            return None, (
                "memory_mb",
                f"must be between {b['min_memory_mb']} and {b['max_memory_mb']}",
                "out_of_bounds",
            )
    image = images.get(data.image)
    if image is None:
        return None, ("image", f"no image {data.image!r} is offered", "unknown")
    network: CatalogItem | None = None
    if data.network is not None:
        network = networks.get(data.network)
        if network is None:
            return None, ("network", f"no network {data.network!r} is offered", "unknown")
    elif networks:
        network = sorted(networks.values(), key=lambda n: n.code)[0]
    disks: list[tuple[int, str]] = []
    for n, d in enumerate(data.disks):
        tier = tiers.get(d.tier)
        if tier is None:
            return None, (f"disks.{n}.tier", f"no storage tier {d.tier!r} is offered", "unknown")
        low, high = int(tier.spec.get("min_gb", 1)), int(tier.spec.get("max_gb", 1))
        if not low <= d.size_gb <= high:
            return None, (
                f"disks.{n}.size_gb",
                f"{d.tier} disks are {low} to {high} GB",
                "out_of_bounds",
            )
        disks.append((d.size_gb, d.tier))
    roots = [t for t in tiers.values() if t.spec.get("root")] or sorted(
        tiers.values(), key=lambda t: t.code
    )
    least = int(image.spec.get("min_disk_gb") or 0)
    if flavor is not None:
        root_gb = max(int(flavor.spec.get("disk_gb", 0)), least)
    else:
        root_gb = max(int(image.spec.get("custom_root_gb") or 0), least)
    return (
        Resolved(
            provider,
            flavor,
            image,
            network,
            vcpu,
            memory_mb,
            root_gb,
            roots[0].code if roots else None,
            tuple(disks),
        ),
        None,
    )


def _candidates(
    data: ServerCreate, policy: AgencyPolicy | None, offer: catalog.Offer
) -> dict[uuid.UUID, Resolved]:
    offered, provs = offer.items, offer.providers
    if data.provider is not None:
        wanted = [p for p in provs.values() if data.provider in (p.name, str(p.id))]
        if not wanted:
            raise Invalid.field(
                "provider", f"provider {data.provider!r} is not offered to this agency", "unknown"
            )
        provs = {wanted[0].id: wanted[0]}
    elif policy is not None and policy.provider_id is not None and policy.provider_id in provs:
        provs = {policy.provider_id: provs[policy.provider_id]}
    if data.region is not None:
        provs = {k: p for k, p in provs.items() if p.region == data.region}
        if not provs:
            raise Invalid.field("region", f"no provider in region {data.region!r}", "unknown")
    if not provs:
        raise Conflict(
            "no provider offers servers to this agency; the center curates the catalog "
            "(and its service company)"
        )
    resolved: dict[uuid.UUID, Resolved] = {}
    reasons: list[tuple[str, str, str]] = []
    for pid, provider in sorted(provs.items(), key=lambda kv: kv[1].name):
        r, why = _resolve_on(provider, offered.get(pid, []), data)
        if r is None:
            assert why is not None
            reasons.append(why)
            continue
        try:
            refusal = driver_class(provider.kind).invalid_name(data.name)
        except DriverError as exc:  # its SDK is missing on this replica: another may serve
            reasons.append(("provider", f"{provider.name}: {exc.message}", "unavailable"))
            continue
        if refusal is not None:
            reasons.append(("name", refusal, "provider_rule"))
            continue
        resolved[pid] = r
    if not resolved:
        # the reason the most providers agree on is the most useful one
        field, message, code = max(reasons, key=reasons.count)
        raise Invalid.field(field, message, code)
    return resolved


def _company_of(provider: Provider, policy: AgencyPolicy | None) -> uuid.UUID | None:
    """The service company that bills for a server on `provider`: the provider's own, else the
    one the center chose for the agency."""
    if provider.service_company_id is not None:
        return provider.service_company_id
    return policy.service_company_id if policy is not None else None


def _billable(
    session: Session,
    agency: Tenant,
    data: ServerCreate,
    policy: AgencyPolicy | None,
    resolved: Mapping[uuid.UUID, Resolved],
) -> tuple[dict[uuid.UUID, Resolved], dict[uuid.UUID | None, Contract | None]]:
    """The candidates some contract may bill, and per service company the contract a server of
    theirs is bound to (None: the agency signed nothing with it). Decided before placement books
    any room, so a refusal (naming contract_id) leaves nothing held."""
    bound: dict[uuid.UUID | None, Contract | None] = {}
    refused: dict[uuid.UUID | None, Invalid | Conflict] = {}
    kept: dict[uuid.UUID, Resolved] = {}
    for pid, r in sorted(resolved.items(), key=lambda kv: kv[1].provider.name):
        company = _company_of(r.provider, policy)
        if company not in bound and company not in refused:
            try:
                bound[company] = contracts.contract_for_server(
                    session,
                    agency_id=agency.id,
                    service_company_id=company,
                    contract_id=data.contract_id,
                )
            except (Invalid, Conflict) as exc:
                refused[company] = exc
        if company in bound:
            kept[pid] = r
    if not kept:
        # the refusal of the provider the request would have gone to first
        raise next(iter(refused.values()))
    return kept, bound


def quota_of(
    r: Resolved, public_ip: bool, bandwidth_mbps: int | None, classes: Mapping[str, Any]
) -> dict[str, int]:
    """The ledger amounts a server of this shape holds."""
    sizes: dict[str, int] = {"instances": 1, "vcpu": r.vcpu, "memory_mb": r.memory_mb}
    for tier, gb in r.storage.items():
        sizes[f"storage_gb.{tier}"] = gb
    if public_ip:
        sizes["public_ip"] = 1
        if bandwidth_mbps:
            sizes["bandwidth_mbps"] = bandwidth_mbps
    unknown = [k for k in sizes if k not in classes]
    if unknown:
        raise Invalid.field(
            "disks", f"no resource class for {', '.join(sorted(unknown))}", "unknown_class"
        )
    return sizes


_PARENT_OF = select(Tenant.parent_id).where(Tenant.id == bindparam("sid")).scalar_subquery()
_SYSTEM_AND_PARENT = select(Tenant).where(
    or_(col(Tenant.id) == bindparam("sid"), col(Tenant.id) == _PARENT_OF)
)


def _system(session: Session, principal: Principal, system_id: uuid.UUID) -> tuple[Tenant, Tenant]:
    """The system a server is asked for, checked, and its agency: one statement for both."""
    loaded = {t.id: t for t in session.execute(_SYSTEM_AND_PARENT, {"sid": system_id}).scalars()}
    system = loaded.get(system_id)
    # another agency's system must look exactly like a missing one
    if system is None or not principal.sees(system.path):
        raise Invalid.field("system_id", f"no system {system_id}", "not_found")
    if system.kind != TenantKind.system:
        raise Invalid.field("system_id", f"{system.code} is an {system.kind}, not a system", "kind")
    authorize(principal, MANAGE, system, subject=f"system {system_id}")
    if system.status != TenantStatus.active:
        raise Conflict.field("system_id", f"system {system.code} is {system.status}", "inactive")
    # the parent was loaded above (`loaded` keeps it in the identity map): no second query
    return system, catalog.agency_of(session, system)


def _needs_approval(policy: AgencyPolicy | None, vcpu: int, memory_mb: int) -> bool:
    """Whether a server of this size (new, or resized to it) waits for an agency admin."""
    if policy is None:
        return False
    return bool(
        (policy.approval_vcpu is not None and vcpu > policy.approval_vcpu)
        or (policy.approval_memory_mb is not None and memory_mb > policy.approval_memory_mb)
    )


def _approval_window(job: Job, policy: AgencyPolicy) -> timedelta:
    """Make `job` wait for approval; returns how long its reservation must hold."""
    job.state = JobState.pending_approval.value
    job.deadline = clock.now() + timedelta(hours=policy.approval_hours)
    job.log = [{"at": clock.now().isoformat(), "state": job.state}]
    return _approval_ttl(policy)


def _approval_ttl(policy: AgencyPolicy | None) -> timedelta:
    """How long the reservation of a job waiting for approval must hold."""
    assert policy is not None
    return timedelta(hours=policy.approval_hours + get_settings().job_reservation_hours)


def _new_job(
    *,
    kind: JobKind,
    state: JobState,
    tenant: Tenant,
    agency_id: uuid.UUID,
    server_id: uuid.UUID,
    provider_id: uuid.UUID,
    principal: Principal,
    params: dict[str, Any],
    job_id: uuid.UUID | None = None,
) -> Job:
    job_id = job_id or uuid.uuid4()
    now = clock.now()
    return Job(
        id=job_id,
        kind=kind.value,
        state=state.value,
        tenant_id=tenant.id,
        agency_id=agency_id,
        server_id=server_id,
        provider_id=provider_id,
        request_tag=request_tag(job_id),
        params=params,
        created_by=principal.username[:64],
        created_at=now,
        heartbeat_at=now,
        log=[{"at": now.isoformat(), "state": state.value}],
    )


def _reserve(
    session: Session,
    job: Job,
    tenant_id: uuid.UUID,
    principal: Principal,
    *,
    ttl: timedelta | None = None,
    owner: str | None = None,
) -> None:
    if not job.grow:
        return
    job.reservation_id = _hold(
        session, job.id, tenant_id, job.grow, principal, ttl=ttl, owner=owner
    )


def _hold(
    session: Session,
    job_id: uuid.UUID,
    tenant_id: uuid.UUID,
    grow: Mapping[str, int],
    principal: Principal,
    *,
    ttl: timedelta | None = None,
    owner: str | None = None,
) -> uuid.UUID:
    """Reserve what the job `job_id` grows by; the reservation's id."""
    settings = get_settings()
    reservation = ledger.reserve(
        session,
        tenant_id,
        grow,
        ref=f"job:{job_id}",
        actor=principal.username,
        ttl=ttl or timedelta(hours=settings.job_reservation_hours),
        owner_ref=owner,
    )
    return reservation.id


_JOB = Job.__table__  # type: ignore[attr-defined]
_KEY = IdempotencyKey.__table__  # type: ignore[attr-defined]
_INSERT_JOB = insert(_JOB)
_INSERT_KEY = insert(_KEY)
_JOB_COLUMNS = tuple(c.key for c in _JOB.columns)
_KEY_COLUMNS = tuple(c.key for c in _KEY.columns)
# PostgreSQL: the job and its idempotency key in one round trip (the key's foreign key is
# checked at the end of the statement, when the job is there)
_PG_INSERT_JOB_AND_KEY = (
    insert(_KEY)
    .values({c.key: bindparam(f"k_{c.key}", type_=c.type) for c in _KEY.columns})
    .add_cte(
        insert(_JOB)
        .values({c.key: bindparam(f"j_{c.key}", type_=c.type) for c in _JOB.columns})
        .cte("j")
    )
)


def _insert_job(session: Session, job: Job, key: Mapping[str, Any] | None) -> None:
    """Write a new job (and the idempotency key that answers for it) with Core; the job object
    stays out of the session (nothing else in the unit of work changes it, and a worker takes
    it over once committed)."""
    conn = session.connection()
    values = {k: getattr(job, k) for k in _JOB_COLUMNS}
    if key is not None and conn.dialect.name == "postgresql":
        conn.execute(
            _PG_INSERT_JOB_AND_KEY,
            {
                **{f"j_{k}": v for k, v in values.items()},
                **{f"k_{k}": key[k] for k in _KEY_COLUMNS},
            },
        )
        return
    conn.execute(_INSERT_JOB, values)
    if key is not None:
        conn.execute(_INSERT_KEY, dict(key))


def _create(session: Session, principal: Principal, data: ServerCreate) -> tuple[Job, Provider]:
    """Validate, place and reserve a new server; the job that will build it, queued (or waiting
    for an agency admin's approval, with the quota held meanwhile), and its provider. The job is
    for the caller to write (`_insert_job`)."""
    if (data.flavor is None) == (data.vcpu is None or data.memory_mb is None):
        if data.flavor is not None:
            raise Invalid.field("flavor", "give a flavor or vcpu and memory_mb, not both", "both")
        raise Invalid.field("flavor", "give a flavor, or vcpu and memory_mb", "missing")
    if data.bandwidth_mbps is not None and not data.public_ip:
        raise Invalid.field("bandwidth_mbps", "bandwidth is for a public IP; ask for one", "no_ip")
    system, agency = _system(session, principal, data.system_id)
    offer = catalog.offer(session, agency.id)
    policy = offer.policy
    resolved, bound = _billable(session, agency, data, policy, _candidates(data, policy, offer))
    classes = ledger.resource_classes(session)
    amounts: dict[uuid.UUID, dict[str, int]] = {}
    unmetered: Invalid | None = None
    for pid, r in resolved.items():
        try:
            amounts[pid] = quota_of(r, data.public_ip, data.bandwidth_mbps, classes)
        except Invalid as exc:
            # a provider whose tier no quota class counts cannot take it; the others still can
            unmetered = unmetered or exc
    if not amounts:
        assert unmetered is not None
        raise unmetered
    resolved = {pid: r for pid, r in resolved.items() if pid in amounts}
    job_id = uuid.uuid4()
    held: uuid.UUID | None = None
    if len({tuple(sorted(a.items())) for a in amounts.values()}) > 1:
        # what it holds depends on where it goes, so it is reserved after placement; its quota
        # rows are locked now all the same: every request takes quota before hosts (one order)
        ledger.lock_tenants(session, [system.id], classes)
    else:
        # the quota does not depend on where the server goes: it is held before the room on a
        # host is, so that the hosts' row locks (which every request takes) are held briefly
        first = next(iter(resolved.values()))
        approval = _needs_approval(policy, first.vcpu, first.memory_mb)
        held = _hold(
            session,
            job_id,
            system.id,
            amounts[first.provider.id],
            principal,
            ttl=_approval_ttl(policy) if approval else None,
        )
    choice = place(
        session,
        [r.provider for r in resolved.values()],
        {pid: (r.host_need, r.storage, r.able_hosts) for pid, r in resolved.items()},
    )
    r = resolved[choice.provider_id]
    contract = bound[_company_of(r.provider, policy)]
    approval = _needs_approval(policy, r.vcpu, r.memory_mb)
    server_id = uuid.uuid4()
    job = _new_job(
        job_id=job_id,
        kind=JobKind.create,
        state=JobState.pending_approval if approval else JobState.queued,
        tenant=system,
        agency_id=agency.id,
        server_id=server_id,
        provider_id=r.provider.id,
        principal=principal,
        params={
            "name": data.name,
            "request": data.model_dump(mode="json"),
            "image": r.image.external_id,
            "flavor": r.flavor.external_id if r.flavor else None,
            "vcpu": r.vcpu,
            "memory_mb": r.memory_mb,
            "network": r.network.external_id if r.network else None,
            "disks": [{"size_gb": gb, "tier": tier} for gb, tier in r.disks],
            "public_ip": data.public_ip,
            "bandwidth_mbps": data.bandwidth_mbps,
            "host_hint": choice.host.external_id if choice.host else None,
            "storage_hint": {t: p.external_id for t, p in choice.pools.items()},
            "owner_tag": owner_tag(agency, system),
            "scope_code": system.code,
            # bound to the server row when the job finishes
            "contract_id": str(contract.id) if contract is not None else None,
        },
    )
    job.placement = choice.explanation
    job.grow = amounts[choice.provider_id]
    ttl = None
    if approval:
        assert policy is not None
        ttl = _approval_window(job, policy)
    else:
        executor.start(job)  # the worker this process hands it to needs no claim of its own
    # the reservation before the job row, which is then written once, with it (by the caller)
    if held is not None:
        job.reservation_id = held
    else:
        _reserve(session, job, system.id, principal, ttl=ttl)
    audit.record(
        session,
        principal,
        "server.request",
        tenant=system,
        target_type="job",
        target_id=job.id,
        after={
            "name": data.name,
            "provider": r.provider.name,
            "quota": job.grow,
            "state": job.state,
            "server_id": str(server_id),
            "contract": contract.number if contract is not None else None,
        },
    )
    return job, r.provider


@dataclass(frozen=True)
class Submitted:
    job_id: uuid.UUID
    state: str
    response: dict[str, Any]
    replayed: bool
    # the job, claimed, for a worker to run; None when replayed or waiting for approval
    claimed: executor.Claimed | None = None


@dataclass(frozen=True)
class _KeyRow:
    id: uuid.UUID
    request_hash: str
    job_id: uuid.UUID
    response: dict[str, Any]
    expires_at: datetime


_KEY_ROW = sa_select(
    _KEY.c.id, _KEY.c.request_hash, _KEY.c.job_id, _KEY.c.response, _KEY.c.expires_at
).where(_KEY.c.principal == bindparam("principal"), _KEY.c.key == bindparam("key"))
_DELETE_KEY = sa_delete(_KEY).where(_KEY.c.id == bindparam("kid"))


def _key_row(session: Session, principal: Principal, key: str) -> _KeyRow | None:
    found = (
        session.connection()
        .execute(_KEY_ROW, {"principal": principal.username[:64], "key": key})
        .first()
    )
    return _KeyRow(*found) if found is not None else None


def _replay(row: _KeyRow, digest: str) -> Submitted:
    if row.request_hash != digest:
        raise Invalid.field(
            IDEMPOTENCY_FIELD, "was used before with a different request body", "reused"
        )
    return Submitted(row.job_id, str(row.response.get("state")), row.response, True)


def request_server(
    db: SessionSource, principal: Principal, data: ServerCreate, *, key: str | None
) -> Submitted:
    """One unit of work around `_create`, with the Idempotency-Key: the same key and body
    get the first answer again, whoever wins a race between identical requests."""
    if key is not None and (not key.strip() or len(key) > 255 or "\x00" in key):
        raise Invalid.field(IDEMPOTENCY_FIELD, "must be 1 to 255 characters", "invalid")
    digest = body_hash(data) if key is not None else ""  # only a key is ever compared
    for _ in range(3):
        try:
            with db.unit_of_work() as session:
                if key is not None:
                    row = _key_row(session, principal, key)
                    if row is not None and row.expires_at > clock.now():
                        return _replay(row, digest)
                    if row is not None:
                        session.connection().execute(_DELETE_KEY, {"kid": row.id})
                job, provider = _create(session, principal, data)
                response = JobPublic.model_validate(job).model_dump(mode="json")
                remembered = None
                if key is not None:
                    now = clock.now()
                    remembered = {
                        "id": uuid.uuid4(),
                        "principal": principal.username[:64],
                        "key": key,
                        "request_hash": digest,
                        "job_id": job.id,
                        "response": response,
                        "created_at": now,
                        "expires_at": now + timedelta(hours=get_settings().idempotency_hours),
                    }
                _insert_job(session, job, remembered)
                claimed = None
                if job.state == JobState.running and job.claim is not None:
                    claimed = executor.Claimed(job, provider, job.claim)
                return Submitted(job.id, job.state, response, False, claimed)
        except IntegrityError:
            # an identical request committed first (the unique key): answer as it was answered
            if key is None:
                raise
            with db.unit_of_work(write=False) as session:
                row = _key_row(session, principal, key)
                if row is not None:
                    return _replay(row, digest)
    raise Conflict.field(IDEMPOTENCY_FIELD, "is being used by a request still running", "busy")


def purge_idempotency_keys(session: Session) -> int:
    rows = session.execute(
        select(IdempotencyKey).where(col(IdempotencyKey.expires_at) <= clock.now()).limit(1000)
    ).scalars()
    n = 0
    for row in rows:
        session.delete(row)
        n += 1
    return n


# --- lifecycle actions ---------------------------------------------------------------------------


def _managed_server(session: Session, principal: Principal, server_id: uuid.UUID) -> Server:
    server = inventory.get_server(session, principal, server_id)
    if server.tenant_id is None:
        raise Conflict(f"server {server.name} is not managed by govbroker; adopt it first")
    tenant = session.get(Tenant, server.tenant_id)
    assert tenant is not None
    authorize(principal, MANAGE, tenant, subject=f"server {server_id}")
    locked = session.get(Server, server_id, with_for_update=True, populate_existing=True)
    assert locked is not None
    if locked.gone_at is not None:
        raise Conflict(f"server {server.name} is deleted", extra={"gone_at": str(locked.gone_at)})
    busy = session.execute(
        select(Job.id, Job.kind).where(
            Job.server_id == server_id, col(Job.state).in_([s.value for s in ACTIVE_STATES])
        )
    ).first()
    if busy is not None:
        raise Conflict(f"server {server.name} is busy with job {busy[0]} ({busy[1]})")
    return locked


def _resize_target(
    session: Session, server: Server, data: ServerAction, agency_id: uuid.UUID
) -> tuple[int, int, str | None]:
    if data.flavor is not None:
        if data.vcpu is not None or data.memory_mb is not None:
            raise Invalid.field("flavor", "give a flavor or vcpu and memory_mb, not both", "both")
        items = catalog.offered_on(session, agency_id, server.provider_id)
        flavor = _by_code(items, CatalogKind.flavor).get(data.flavor)
        if flavor is None:
            raise Invalid.field("flavor", f"no flavor {data.flavor!r} is offered", "unknown")
        return int(flavor.spec["vcpu"]), int(flavor.spec["memory_mb"]), flavor.external_id
    if data.vcpu is None and data.memory_mb is None:
        raise Invalid.field("vcpu", "give a flavor, or vcpu and/or memory_mb", "missing")
    vcpu = data.vcpu if data.vcpu is not None else server.vcpu
    memory_mb = data.memory_mb if data.memory_mb is not None else server.memory_mb
    items = catalog.offered_on(session, agency_id, server.provider_id)
    bounds = [i.spec for i in items if i.kind == CatalogKind.size]
    if not bounds:
        raise Invalid.field("vcpu", "custom sizes are not offered; choose a flavor", "not_offered")
    b = bounds[0]
    if not b["min_vcpu"] <= vcpu <= b["max_vcpu"]:
        raise Invalid.field(
            "vcpu", f"must be between {b['min_vcpu']} and {b['max_vcpu']}", "out_of_bounds"
        )
    if not b["min_memory_mb"] <= memory_mb <= b["max_memory_mb"]:
        raise Invalid.field(
            "memory_mb",
            f"must be between {b['min_memory_mb']} and {b['max_memory_mb']}",
            "out_of_bounds",
        )
    return vcpu, memory_mb, None


def _split(delta: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    grow = {k: v for k, v in delta.items() if v > 0}
    shrink = {k: -v for k, v in delta.items() if v < 0}
    return grow, shrink


def _plan_action(
    session: Session, server: Server, data: ServerAction, agency_id: uuid.UUID
) -> tuple[dict[str, Any], dict[str, int], dict[str, int]]:
    """The job's parameters and its quota movement: (params, grow now, shrink after)."""
    booked = server.booked or {}
    classes = ledger.resource_classes(session)
    action = data.action
    if action in ("start", "stop", "reboot"):
        want = {"start": "running", "stop": "stopped", "reboot": "running"}[action]
        if action != "reboot" and server.power_state == want:
            raise Conflict(f"server {server.name} is already {want}")
        if action == "reboot" and server.power_state != "running":
            raise Conflict(
                f"server {server.name} is {server.power_state}; only a running one reboots"
            )
        return {}, {}, {}
    if action == "resize":
        vcpu, memory_mb, flavor = _resize_target(session, server, data, agency_id)
        if (vcpu, memory_mb) == (server.vcpu, server.memory_mb):
            raise Conflict(f"server {server.name} already has {vcpu} vCPU / {memory_mb} MB")
        grow, shrink = _split(
            {
                "vcpu": vcpu - int(booked.get("vcpu", 0)),
                "memory_mb": memory_mb - int(booked.get("memory_mb", 0)),
            }
        )
        return {"vcpu": vcpu, "memory_mb": memory_mb, "flavor": flavor}, grow, shrink
    if action == "attach_disk":
        if data.size_gb is None or data.tier is None:
            raise Invalid.field(
                "size_gb" if data.size_gb is None else "tier", "required", "missing"
            )
        items = catalog.offered_on(session, agency_id, server.provider_id)
        tier = _by_code(items, CatalogKind.tier).get(data.tier)
        if tier is None:
            raise Invalid.field("tier", f"no storage tier {data.tier!r} is offered", "unknown")
        low, high = int(tier.spec.get("min_gb", 1)), int(tier.spec.get("max_gb", 1))
        if not low <= data.size_gb <= high:
            raise Invalid.field(
                "size_gb", f"{data.tier} disks are {low} to {high} GB", "out_of_bounds"
            )
        rc = f"storage_gb.{data.tier}"
        if rc not in classes:
            raise Invalid.field("tier", f"no resource class {rc}", "unknown_class")
        return (
            {"size_gb": data.size_gb, "tier": data.tier, "disks_before": len(server.disks)},
            {rc: data.size_gb},
            {},
        )
    if action == "detach_disk":
        if data.disk_id is None:
            raise Invalid.field("disk_id", "required", "missing")
        found = [(n, d) for n, d in enumerate(server.disks) if d.get("external_id") == data.disk_id]
        if not found:
            raise Invalid.field(
                "disk_id", f"server {server.name} has no disk {data.disk_id}", "unknown"
            )
        n, disk = found[0]
        if n == 0:
            raise Invalid.field("disk_id", "the root disk cannot be detached", "root")
        rc = f"storage_gb.{disk['tier']}"
        return (
            {"disk_id": data.disk_id, "size_gb": disk["size_gb"], "tier": disk["tier"]},
            {},
            _held_part(booked, {rc: int(disk["size_gb"])}),
        )
    if action == "add_public_ip":
        grow = {"public_ip": 1}
        if data.bandwidth_mbps:
            grow["bandwidth_mbps"] = data.bandwidth_mbps
        return (
            {"bandwidth_mbps": data.bandwidth_mbps, "public_ips_before": _public_ips(server)},
            grow,
            {},
        )
    if action == "release_public_ip":
        if data.ip is None:
            raise Invalid.field("ip", "required", "missing")
        if data.ip not in _public_ips(server):
            raise Invalid.field("ip", f"{data.ip} is not a public IP of {server.name}", "unknown")
        shrink = {"public_ip": 1}
        # bandwidth is the server's public egress, held while it has any public address
        if len(_public_ips(server)) == 1 and booked.get("bandwidth_mbps"):
            shrink["bandwidth_mbps"] = int(booked["bandwidth_mbps"])
        return {"ip": data.ip}, {}, _held_part(booked, shrink)
    raise Invalid.field("action", f"unknown action {action}", "unknown")  # pragma: no cover


def _held_part(booked: Mapping[str, int], shrink: Mapping[str, int]) -> dict[str, int]:
    """What of a shrink the server really holds: a disk or address it got outside govbroker
    (adopted, drifted) was never booked, so there is nothing of it to give back."""
    out = {k: min(v, int(booked.get(k, 0))) for k, v in shrink.items()}
    return {k: v for k, v in out.items() if v > 0}


def _public_ips(server: Server) -> list[str]:
    return list(server.public_ips or [])


def _submit(
    session: Session,
    principal: Principal,
    server: Server,
    kind: JobKind,
    params: dict[str, Any],
    grow: dict[str, int],
    shrink: dict[str, int],
    approval: AgencyPolicy | None = None,
) -> Job:
    """The job of a lifecycle action; with `approval`, it waits for an agency admin."""
    tenant = session.get(Tenant, server.tenant_id)
    assert tenant is not None
    agency = catalog.agency_of(session, tenant)
    job = _new_job(
        kind=kind,
        state=JobState.queued,
        tenant=tenant,
        agency_id=agency.id,
        server_id=server.id,
        provider_id=server.provider_id,
        principal=principal,
        params={"external_id": server.external_id, "name": server.name, **params},
    )
    job.grow, job.shrink = grow, shrink
    ttl = None
    if approval is not None:
        ttl = _approval_window(job, approval)
    else:
        executor.start(job)
    # the reservation first: the job row is then written once, with its reservation
    _reserve(session, job, tenant.id, principal, ttl=ttl, owner=owner_ref(server.id))
    session.add(job)
    audit.record(
        session,
        principal,
        f"server.{kind.value}",
        tenant=tenant,
        target_type="server",
        target_id=server.id,
        after={
            "job_id": str(job.id),
            **{k: v for k, v in params.items() if k != "external_id"},
            "grow": grow,
            "shrink": shrink,
        },
    )
    session.flush()
    return job


def act(session: Session, principal: Principal, server_id: uuid.UUID, data: ServerAction) -> Job:
    server = _managed_server(session, principal, server_id)
    tenant = session.get(Tenant, server.tenant_id)
    assert tenant is not None
    agency = catalog.agency_of(session, tenant) if tenant.kind != TenantKind.agency else tenant
    params, grow, shrink = _plan_action(session, server, data, agency.id)
    policy = session.get(AgencyPolicy, agency.id)
    # growing past the threshold needs the same approval as asking for that size at once
    wait = (
        policy
        if data.action == "resize"
        and grow
        and _needs_approval(policy, int(params["vcpu"]), int(params["memory_mb"]))
        else None
    )
    return _submit(session, principal, server, JobKind(data.action), params, grow, shrink, wait)


def delete(session: Session, principal: Principal, server_id: uuid.UUID) -> Job:
    server = _managed_server(session, principal, server_id)
    return _submit(session, principal, server, JobKind.delete, {}, {}, {})


# --- jobs ---------------------------------------------------------------------------------------


def _job_scope(principal: Principal) -> Any:
    return col(Job.tenant_id).in_(
        select(Tenant.id).where(principal.scope_filter("server.read", col(Tenant.path)))
    )


def get_job(session: Session, principal: Principal, job_id: uuid.UUID) -> Job:
    """A job the caller may read. One whose tenant it sees without the right to read servers
    there (finance) is 403; one outside its view is 404, like a missing one."""
    job = (
        session.execute(select(Job).where(Job.id == job_id, _job_scope(principal)))
        .scalars()
        .first()
    )
    if job is not None:
        return job
    job = session.get(Job, job_id)
    tenant = session.get(Tenant, job.tenant_id) if job is not None else None
    if tenant is None:
        raise NotFound(f"job {job_id} not found")
    authorize(principal, "server.read", tenant, subject=f"job {job_id}")
    raise NotFound(f"job {job_id} not found")  # the scope and authorize never disagree


def list_jobs(
    session: Session,
    principal: Principal,
    *,
    tenant_id: uuid.UUID | None = None,
    server_id: uuid.UUID | None = None,
    state: str | None = None,
    cursor: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> tuple[list[Job], str | None]:
    stmt = select(Job).where(_job_scope(principal))
    if tenant_id is not None:
        tenant = session.get(Tenant, tenant_id)
        if tenant is None or not principal.sees(tenant.path):
            raise Invalid.field("tenant_id", f"no tenant {tenant_id}", "not_found")
        sub = select(Tenant.id).where(col(Tenant.path).startswith(tenant.path))
        stmt = stmt.where(col(Job.tenant_id).in_(sub))
    if server_id is not None:
        stmt = stmt.where(Job.server_id == server_id)
    if state is not None:
        stmt = stmt.where(Job.state == state)
    if cursor:
        when, jid = decode_cursor(cursor, [datetime, uuid.UUID])
        stmt = stmt.where(
            or_(col(Job.created_at) < when, and_(col(Job.created_at) == when, col(Job.id) < jid))
        )
    rows = list(
        session.execute(
            stmt.order_by(col(Job.created_at).desc(), col(Job.id).desc()).limit(limit + 1)
        ).scalars()
    )
    nxt = None
    if len(rows) > limit:
        last = rows[limit - 1]
        nxt = encode_cursor(last.created_at.isoformat(), last.id)
    return rows[:limit], nxt


def decide(
    session: Session, principal: Principal, job_id: uuid.UUID, *, approve: bool, reason: str | None
) -> Job:
    """An agency admin approves (the job is queued) or rejects (the quota is given back)."""
    job = get_job(session, principal, job_id)
    tenant = session.get(Tenant, job.tenant_id)
    assert tenant is not None
    authorize(principal, APPROVE, tenant, subject=f"job {job_id}")
    locked = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    assert locked is not None
    if locked.state != JobState.pending_approval:
        raise Conflict(f"job {job_id} is {locked.state}, not waiting for approval")
    now = clock.now()
    if locked.deadline is not None and locked.deadline <= now:
        raise Conflict(f"job {job_id} waited past its deadline ({locked.deadline.isoformat()})")
    if approve:
        locked.state = JobState.queued.value
        locked.heartbeat_at = now
    else:
        if locked.reservation_id is not None:
            ledger.release(session, locked.reservation_id)
        locked.state = JobState.rejected.value
        locked.finished_at = now
        locked.error = reason or "rejected"
    locked.decided_by = principal.username[:64]
    locked.log = [
        *locked.log,
        {"at": now.isoformat(), "state": locked.state, "by": principal.username, "reason": reason},
    ]
    session.add(locked)
    audit.record(
        session,
        principal,
        "job.approve" if approve else "job.reject",
        tenant=tenant,
        target_type="job",
        target_id=job_id,
        before={"state": JobState.pending_approval.value},
        after={"state": locked.state, "reason": reason},
    )
    session.flush()
    return locked
