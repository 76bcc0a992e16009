"""Service level: quota change requests — an agency asks, the center decides, approval applies.

Limits of `quota_estate` (tests/fixtures/quota.py): center 1 000 000 of every class; agency a:
vcpu 100, memory_mb 204800, instances 20; agency b: vcpu 50; system a1: vcpu 40. Audit events are
linked at commit, so tests reading the trail `session.commit()` first; a refused step is followed
by `session.rollback()`, as the API's unit of work would do, before looking at what remains.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func
from sqlmodel import Session, select

from broker.audit.models import AuditEvent
from broker.core.authz import Principal
from broker.core.errors import Conflict, Forbidden, GovbrokerError, Invalid, NotFound
from broker.core.settings import get_settings
from quotas import requests
from quotas import service as quotas
from quotas.models import Quota, QuotaRequest, QuotaRequestAttachment
from tests.fixtures.quota import SYSTEM

WHY = "the tax system goes live in December"

# --- helpers ----------------------------------------------------------------------------------


def limit_of(session: Session, tenant_id: uuid.UUID, rc: str = "vcpu") -> int | None:
    q = (
        session.execute(
            select(Quota)
            .where(Quota.tenant_id == tenant_id, Quota.resource_class == rc)
            .execution_options(populate_existing=True)
        )
        .scalars()
        .first()
    )
    return q.hard_limit if q is not None else None


def stored(session: Session, request_id: uuid.UUID) -> QuotaRequest:
    session.expire_all()
    req = session.get(QuotaRequest, request_id)
    assert req is not None
    return req


def last_seq(session: Session) -> int:
    return int(session.execute(select(func.coalesce(func.max(AuditEvent.seq), 0))).scalar_one())


def actions_since(session: Session, seq: int) -> list[str]:
    stmt = select(AuditEvent.action).where(AuditEvent.seq > seq).order_by(AuditEvent.seq)  # type: ignore[arg-type]
    return list(session.execute(stmt).scalars())


def field_of(error: GovbrokerError) -> tuple[str, str]:
    (only,) = error.errors
    return only.field, only.code


@pytest.fixture
def who(principal_of: Any) -> dict[str, Principal]:
    return {u: principal_of(u) for u in ("admin", "a-admin", "b-admin", "a-member", "a-finance")}


def ask(
    session: Session, principal: Principal, tenant_id: uuid.UUID, **changes: int
) -> QuotaRequest:
    return requests.create(
        session, principal, tenant_id=tenant_id, changes=changes, justification=WHY
    )


@pytest.fixture
def small_attachments(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Attachments limited to 1024 bytes (the smallest setting allowed) for this test only."""
    monkeypatch.setenv("GOVBROKER_QUOTA_ATTACHMENT_MAX_BYTES", "1024")
    get_settings.cache_clear()
    yield 1024
    monkeypatch.undo()
    get_settings.cache_clear()


# --- asking -----------------------------------------------------------------------------------


def test_an_agency_admin_asks_for_more_and_less_for_its_agency(session, quota_estate, who):
    e = quota_estate
    req = ask(session, who["a-admin"], e.tid("a"), vcpu=20, memory_mb=-4800)
    session.commit()
    req = stored(session, req.id)
    assert (req.state, req.tenant_id, req.requested) == (
        "pending",
        e.tid("a"),
        {"vcpu": 20, "memory_mb": -4800},
    )
    assert (req.justification, req.requested_by, req.approved) == (WHY, e.uid("a-admin"), None)
    assert limit_of(session, e.tid("a")) == 100  # asking changes nothing yet


def test_requests_go_from_agencies_not_systems(session, quota_estate, who):
    with pytest.raises(Invalid) as info:
        ask(session, who["a-admin"], quota_estate.tid("a1"), vcpu=5)
    assert field_of(info.value) == ("tenant_id", "kind")


@pytest.mark.parametrize("code", ["b", "center"])
def test_an_agency_admin_cannot_ask_for_another_tenant(code, session, quota_estate, who):
    with pytest.raises((Invalid, NotFound)) as info:
        ask(session, who["a-admin"], quota_estate.tid(code), vcpu=5)
    if isinstance(info.value, Invalid):
        assert info.value.errors[0].field == "tenant_id"
    assert session.execute(select(QuotaRequest)).first() is None


def test_an_unknown_tenant_names_tenant_id(session, quota_estate, who):
    with pytest.raises(Invalid) as info:
        ask(session, who["a-admin"], uuid.UUID(int=0xDEAD), vcpu=5)
    assert info.value.errors[0].field == "tenant_id"


def test_roles_without_the_right_to_ask_are_refused(session, quota_estate, who):
    with pytest.raises(Forbidden):  # sees agency a, may only read
        ask(session, who["a-finance"], quota_estate.tid("a"), vcpu=5)
    with pytest.raises((Invalid, NotFound)):  # does not even see agency a
        ask(session, who["a-member"], quota_estate.tid("a"), vcpu=5)


def test_bad_changes_name_the_class(session, quota_estate, who):
    with pytest.raises(Invalid) as info:
        ask(session, who["a-admin"], quota_estate.tid("a"), gpu=1, vcpu=10**12)
    assert {err.field for err in info.value.errors} == {"changes.gpu", "changes.vcpu"}
    with pytest.raises(Invalid) as info:
        ask(session, who["a-admin"], quota_estate.tid("a"), vcpu=0)
    assert field_of(info.value) == ("changes", "empty")


# --- deciding ---------------------------------------------------------------------------------


def test_full_approval_applies_every_requested_change(session, quota_estate, who):
    e = quota_estate
    req = ask(session, who["a-admin"], e.tid("a"), vcpu=20, memory_mb=-4800, public_ip=4)
    session.commit()
    requests.approve(session, who["admin"], req.id)
    session.commit()
    req = stored(session, req.id)
    assert (req.state, req.approved, req.decision_reason) == (
        "approved",
        {"vcpu": 20, "memory_mb": -4800, "public_ip": 4},
        None,
    )
    assert (req.decided_by, req.decided_at is not None) == (e.uid("admin"), True)
    assert limit_of(session, e.tid("a")) == 120
    assert limit_of(session, e.tid("a"), "memory_mb") == 200000
    assert limit_of(session, e.tid("a"), "public_ip") == 4  # a class the agency had no limit of


def test_partial_approval_needs_a_reason_and_applies_the_amended_amounts(
    session, quota_estate, who
):
    e = quota_estate
    req = ask(session, who["a-admin"], e.tid("a"), vcpu=20, instances=5)
    session.commit()
    with pytest.raises(Invalid) as info:
        requests.approve(session, who["admin"], req.id, approved={"vcpu": 10})
    assert field_of(info.value) == ("reason", "required")
    session.rollback()
    assert (stored(session, req.id).state, limit_of(session, e.tid("a"))) == ("pending", 100)

    requests.approve(
        session, who["admin"], req.id, approved={"vcpu": 10}, reason="half now, more in Q2"
    )
    session.commit()
    req = stored(session, req.id)
    assert (req.state, req.approved, req.decision_reason) == (
        "partially_approved",
        {"vcpu": 10},
        "half now, more in Q2",
    )
    assert req.requested == {"vcpu": 20, "instances": 5}  # what was asked stays on record
    assert limit_of(session, e.tid("a")) == 110
    assert limit_of(session, e.tid("a"), "instances") == 20


def test_partial_approval_with_a_blank_reason_is_refused(session, quota_estate, who):
    req = ask(session, who["a-admin"], quota_estate.tid("a"), vcpu=20)
    with pytest.raises(Invalid) as info:
        requests.approve(session, who["admin"], req.id, approved={"vcpu": 10}, reason="   ")
    assert field_of(info.value) == ("reason", "required")


def test_an_amended_approval_may_not_grant_a_class_that_was_not_requested(
    session, quota_estate, who
):
    req = ask(session, who["a-admin"], quota_estate.tid("a"), vcpu=20)
    with pytest.raises(Invalid) as info:
        requests.approve(
            session, who["admin"], req.id, approved={"vcpu": 20, "public_ip": 2}, reason="x"
        )
    assert field_of(info.value) == ("approved.public_ip", "not_requested")


@pytest.mark.parametrize("amended", [30, -10])
def test_a_partial_approval_grants_no_more_than_was_requested(amended, session, quota_estate, who):
    """Partly approving +20 means granting between 1 and 20: not 30, and not a decrease."""
    e = quota_estate
    req = ask(session, who["a-admin"], e.tid("a"), vcpu=20)
    session.commit()
    with pytest.raises(Invalid) as info:
        requests.approve(
            session, who["admin"], req.id, approved={"vcpu": amended}, reason="amended"
        )
    assert info.value.errors[0].field == "approved.vcpu"
    session.rollback()
    assert (stored(session, req.id).state, limit_of(session, e.tid("a"))) == ("pending", 100)


def test_a_decrease_below_zero_is_refused_at_approval(session, quota_estate, who):
    req = ask(session, who["a-admin"], quota_estate.tid("a"), instances=-21)
    with pytest.raises(Invalid) as info:
        requests.approve(session, who["admin"], req.id)
    assert field_of(info.value) == ("approved.instances", "below_zero")


def test_rejection_records_the_reason_and_changes_no_limit(session, quota_estate, who):
    e = quota_estate
    req = ask(session, who["a-admin"], e.tid("a"), vcpu=20)
    session.commit()
    requests.reject(session, who["admin"], req.id, reason="no capacity this year")
    session.commit()
    req = stored(session, req.id)
    assert (req.state, req.decision_reason, req.decided_by, req.approved) == (
        "rejected",
        "no capacity this year",
        e.uid("admin"),
        None,
    )
    assert limit_of(session, e.tid("a")) == 100


@pytest.mark.parametrize("reason", ["", "   "])
def test_rejection_needs_a_reason(reason, session, quota_estate, who):
    req = ask(session, who["a-admin"], quota_estate.tid("a"), vcpu=20)
    session.commit()
    with pytest.raises(Invalid) as info:
        requests.reject(session, who["admin"], req.id, reason=reason)
    assert info.value.errors[0].field == "reason"
    session.rollback()
    assert stored(session, req.id).state == "pending"


def test_the_requester_may_withdraw_a_pending_request(session, quota_estate, who):
    e = quota_estate
    req = ask(session, who["a-admin"], e.tid("a"), vcpu=20)
    session.commit()
    requests.withdraw(session, who["a-admin"], req.id)
    session.commit()
    req = stored(session, req.id)
    assert (req.state, req.decided_by) == ("withdrawn", e.uid("a-admin"))
    assert limit_of(session, e.tid("a")) == 100


def test_only_center_admins_decide(session, quota_estate, who):
    req = ask(session, who["a-admin"], quota_estate.tid("a"), vcpu=20)
    with pytest.raises(Forbidden):
        requests.approve(session, who["a-admin"], req.id)
    with pytest.raises(Forbidden):
        requests.reject(session, who["a-admin"], req.id, reason="not mine to decide")
    assert stored(session, req.id).state == "pending"


def test_another_agency_sees_no_request_of_ours(session, quota_estate, who):
    req = ask(session, who["a-admin"], quota_estate.tid("a"), vcpu=20)
    with pytest.raises(NotFound):
        requests.get(session, who["b-admin"], req.id)
    with pytest.raises(NotFound):
        requests.withdraw(session, who["b-admin"], req.id)
    with pytest.raises(NotFound):
        requests.attach(
            session,
            who["b-admin"],
            req.id,
            filename="x.txt",
            content_type="text/plain",
            content=b"x",
        )
    rows, _ = requests.list_requests(session, who["b-admin"])
    assert rows == []
    rows, _ = requests.list_requests(session, who["a-admin"])
    assert [r.id for r in rows] == [req.id]


def test_approving_twice_is_a_conflict(session, quota_estate, who):
    e = quota_estate
    req = ask(session, who["a-admin"], e.tid("a"), vcpu=20)
    requests.approve(session, who["admin"], req.id)
    session.commit()
    with pytest.raises(Conflict):
        requests.approve(session, who["admin"], req.id)
    with pytest.raises(Conflict):
        requests.reject(session, who["admin"], req.id, reason="changed my mind")
    with pytest.raises(Conflict):
        requests.withdraw(session, who["a-admin"], req.id)
    session.rollback()
    assert limit_of(session, e.tid("a")) == 120  # applied once, not twice


def test_a_withdrawn_request_cannot_be_decided(session, quota_estate, who):
    e = quota_estate
    req = ask(session, who["a-admin"], e.tid("a"), vcpu=20)
    requests.withdraw(session, who["a-admin"], req.id)
    session.commit()
    with pytest.raises(Conflict):
        requests.approve(session, who["admin"], req.id)
    with pytest.raises(Conflict):
        requests.reject(session, who["admin"], req.id, reason="too late")
    session.rollback()
    assert (stored(session, req.id).state, limit_of(session, e.tid("a"))) == ("withdrawn", 100)


def test_approval_rechecks_the_invariants_and_changes_nothing_when_they_fail(
    session, quota_estate, who
):
    """The center's vcpu is lowered to what the agencies already hold after the request was
    made: the increase no longer fits, and none of the request's classes change."""
    e = quota_estate
    req = ask(session, who["a-admin"], e.tid("a"), instances=5, vcpu=10)
    session.commit()
    quotas.set_quota(session, SYSTEM, e.tid("center"), "vcpu", limit=150)
    session.commit()
    seq = last_seq(session)
    with pytest.raises(Invalid) as info:
        requests.approve(session, who["admin"], req.id)
    assert "vcpu" in info.value.detail
    session.rollback()
    req = stored(session, req.id)
    assert (req.state, req.approved, req.decided_by) == ("pending", None, None)
    assert limit_of(session, e.tid("a")) == 100
    assert limit_of(session, e.tid("a"), "instances") == 20  # applied before vcpu failed: undone
    assert actions_since(session, seq) == []


def test_approval_may_not_lower_a_limit_below_usage(session, quota_estate, who):
    from quotas import ledger

    e = quota_estate
    r = ledger.reserve(session, e.tid("a1"), {"instances": 15}, ref="busy", actor="test")
    ledger.commit(session, r.id)
    req = ask(session, who["a-admin"], e.tid("a"), instances=-10)
    session.commit()
    with pytest.raises(Conflict):
        requests.approve(session, who["admin"], req.id)
    session.rollback()
    assert (stored(session, req.id).state, limit_of(session, e.tid("a"), "instances")) == (
        "pending",
        20,
    )


# --- attachments ------------------------------------------------------------------------------


def test_an_attachment_is_stored_with_its_name_type_size_and_digest(session, quota_estate, who):
    req = ask(session, who["a-admin"], quota_estate.tid("a"), vcpu=20)
    content = b"%PDF-1.4 capacity plan"
    requests.attach(
        session,
        who["a-admin"],
        req.id,
        filename="../../扩容计划/plan v2.pdf",
        content_type="application/pdf",
        content=content,
    )
    session.commit()
    req = stored(session, req.id)
    assert "/" not in req.attachment_name and req.attachment_name.endswith("plan v2.pdf")
    assert (req.attachment_type, req.attachment_size, req.attachment_sha256) == (
        "application/pdf",
        len(content),
        hashlib.sha256(content).hexdigest(),
    )
    got, body = requests.attachment(session, who["admin"], req.id)
    assert (got.id, body) == (req.id, content)
    # replacing keeps one attachment
    requests.attach(
        session, who["a-admin"], req.id, filename="v3.txt", content_type="", content=b"v3"
    )
    session.commit()
    assert requests.attachment(session, who["admin"], req.id)[1] == b"v3"
    assert stored(session, req.id).attachment_type == "application/octet-stream"
    count = session.execute(select(func.count()).select_from(QuotaRequestAttachment)).scalar_one()
    assert count == 1


def test_an_attachment_larger_than_the_setting_is_refused_naming_file(
    small_attachments, session, quota_estate, who
):
    req = ask(session, who["a-admin"], quota_estate.tid("a"), vcpu=20)
    requests.attach(
        session,
        who["a-admin"],
        req.id,
        filename="fits.bin",
        content_type="application/octet-stream",
        content=b"x" * small_attachments,
    )
    with pytest.raises(Invalid) as info:
        requests.attach(
            session,
            who["a-admin"],
            req.id,
            filename="big.bin",
            content_type="application/octet-stream",
            content=b"x" * (small_attachments + 1),
        )
    assert field_of(info.value) == ("file", "too_large")
    assert stored(session, req.id).attachment_name == "fits.bin"


def test_an_empty_attachment_is_refused_naming_file(session, quota_estate, who):
    req = ask(session, who["a-admin"], quota_estate.tid("a"), vcpu=20)
    with pytest.raises(Invalid) as info:
        requests.attach(
            session,
            who["a-admin"],
            req.id,
            filename="e.txt",
            content_type="text/plain",
            content=b"",
        )
    assert field_of(info.value) == ("file", "empty")
    with pytest.raises(NotFound):
        requests.attachment(session, who["a-admin"], req.id)


def test_a_decided_request_takes_no_new_attachment(session, quota_estate, who):
    req = ask(session, who["a-admin"], quota_estate.tid("a"), vcpu=20)
    requests.reject(session, who["admin"], req.id, reason="no budget")
    with pytest.raises(Conflict):
        requests.attach(
            session,
            who["a-admin"],
            req.id,
            filename="x.txt",
            content_type="text/plain",
            content=b"x",
        )


# --- the audit trail --------------------------------------------------------------------------


def test_every_step_of_a_request_is_audited(session, quota_estate, who):
    e = quota_estate
    session.commit()
    seq = last_seq(session)
    approved = ask(session, who["a-admin"], e.tid("a"), vcpu=20, instances=2)
    requests.attach(
        session,
        who["a-admin"],
        approved.id,
        filename="p.txt",
        content_type="text/plain",
        content=b"p",
    )
    requests.approve(session, who["admin"], approved.id, approved={"vcpu": 10}, reason="half")
    rejected = ask(session, who["a-admin"], e.tid("a"), vcpu=5)
    requests.reject(session, who["admin"], rejected.id, reason="enough for now")
    withdrawn = ask(session, who["a-admin"], e.tid("a"), vcpu=1)
    requests.withdraw(session, who["a-admin"], withdrawn.id)
    full = ask(session, who["a-admin"], e.tid("a"), instances=1)
    requests.approve(session, who["admin"], full.id)
    session.commit()
    assert actions_since(session, seq) == [
        "quota_request.create",
        "quota_request.attach",
        "quota.set",
        "quota_request.partially_approved",
        "quota_request.create",
        "quota_request.rejected",
        "quota_request.create",
        "quota_request.withdrawn",
        "quota_request.create",
        "quota.set",
        "quota_request.approved",
    ]
    events = session.execute(
        select(AuditEvent).where(AuditEvent.seq > seq).order_by(AuditEvent.seq)  # type: ignore[arg-type]
    ).scalars()
    decided = next(ev for ev in events if ev.action == "quota_request.partially_approved")
    assert (decided.target_id, decided.actor_name, decided.tenant_id) == (
        str(approved.id),
        "admin",
        e.tid("a"),
    )
    assert decided.before["state"] == "pending"
    assert decided.after == {
        "state": "partially_approved",
        "requested": {"vcpu": 20, "instances": 2},
        "approved": {"vcpu": 10},
        "decision_reason": "half",
    }
