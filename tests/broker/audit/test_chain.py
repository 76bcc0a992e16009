"""The audit trail is a hash chain: any edited, deleted or reordered row is found."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select, text

from broker.audit import service as audit
from broker.audit.models import AuditEvent
from broker.core.authz import Principal
from broker.core.errors import Conflict
from broker.tenancy import service as tenancy
from broker.tenancy.schemas import TenantCreate

SYSTEM = Principal.system("test")


def _write_events(db, n: int) -> None:  # type: ignore[no-untyped-def]
    with db.unit_of_work() as s:
        center = tenancy.create_center(s, SYSTEM, code="center", name_zh="中心")
    for i in range(n - 1):
        with db.unit_of_work() as s:
            tenancy.create_tenant(
                s,
                SYSTEM,
                TenantCreate(parent_id=center.id, kind="agency", code=f"ag{i}", name_zh=f"局{i}"),
            )


def _verify(db):  # type: ignore[no-untyped-def]
    with db.unit_of_work(write=False) as s:
        return audit.verify_chain(s)


def test_intact_chain_verifies(db):
    _write_events(db, 5)
    report = _verify(db)
    assert report.ok and report.checked == 5


def test_events_link_each_to_the_previous_hash(db):
    _write_events(db, 3)
    with db.unit_of_work(write=False) as s:
        rows = s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars().all()
    assert [r.seq for r in rows] == [1, 2, 3]
    assert rows[0].prev_hash == "0" * 64
    assert rows[1].prev_hash == rows[0].hash and rows[2].prev_hash == rows[1].hash


def test_edited_row_is_detected(db):
    _write_events(db, 4)
    db.connection.execute(text("UPDATE audit_event SET actor_name = 'mallory' WHERE seq = 2"))
    report = _verify(db)
    assert not report.ok and report.broken_at == 2 and "hash" in report.reason


def test_edited_json_payload_is_detected(db):
    _write_events(db, 3)
    db.connection.execute(
        text("UPDATE audit_event SET after = :a WHERE seq = 3"), {"a": '{"code": "forged"}'}
    )
    report = _verify(db)
    assert not report.ok and report.broken_at == 3


def test_deleted_row_is_detected(db):
    _write_events(db, 4)
    db.connection.execute(text("DELETE FROM audit_event WHERE seq = 2"))
    report = _verify(db)
    assert not report.ok and report.broken_at == 2 and "missing" in report.reason


def test_deleted_last_row_is_detected_by_the_chain_head(db):
    _write_events(db, 4)
    db.connection.execute(text("DELETE FROM audit_event WHERE seq = 4"))
    report = _verify(db)
    assert not report.ok and report.broken_at == 4


def test_reordered_rows_are_detected(db):
    _write_events(db, 4)
    c = db.connection
    c.execute(text("UPDATE audit_event SET seq = -2 WHERE seq = 2"))
    c.execute(text("UPDATE audit_event SET seq = 2 WHERE seq = 3"))
    c.execute(text("UPDATE audit_event SET seq = 3 WHERE seq = -2"))
    report = _verify(db)
    assert not report.ok and report.broken_at == 2


def test_recomputed_hash_after_edit_still_breaks_the_next_link(db):
    """Re-hashing an edited row is not enough: its successor's prev_hash no longer matches."""
    _write_events(db, 3)
    with db.unit_of_work() as s:
        ev = s.get(AuditEvent, 2)
        ev.actor_name = "mallory"
        ev.hash = audit.compute_hash(audit.fields_of(ev))
    report = _verify(db)
    assert not report.ok and report.broken_at == 3 and "prev_hash" in report.reason


def test_secrets_are_redacted_before_hashing():
    data = {"password": "p", "nested": {"api_token": "t", "ok": 1}, "list": [{"secret_key": "s"}]}
    assert audit.redact(data) == {
        "password": "***",
        "nested": {"api_token": "***", "ok": 1},
        "list": [{"secret_key": "***"}],
    }


def test_rolled_back_unit_of_work_writes_no_event(db):
    with db.unit_of_work() as s:
        tenancy.create_center(s, SYSTEM, code="center", name_zh="中心")
    with pytest.raises(Conflict), db.unit_of_work() as s:
        tenancy.create_center(s, SYSTEM, code="center2", name_zh="第二中心")
    with db.unit_of_work(write=False) as s:
        assert s.execute(select(func.count()).select_from(AuditEvent)).scalar_one() == 1
    assert _verify(db).ok


def test_concurrent_writers_keep_one_linear_chain(committed_db):
    """Separate connections committing at once still produce seq 1..n with no fork."""
    _write_events(committed_db, 1)
    with committed_db.unit_of_work(write=False) as s:
        center = tenancy.get_center(s)
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for i in range(5):
                with committed_db.unit_of_work() as s:
                    tenancy.create_tenant(
                        s,
                        SYSTEM,
                        TenantCreate(
                            parent_id=center.id, kind="agency", code=f"w{w}-{i}", name_zh="并发"
                        ),
                    )
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    report = _verify(committed_db)
    assert report.ok and report.checked == 1 + 8 * 5
