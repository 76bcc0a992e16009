"""The govbroker command: clear messages and exit codes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import func, select, text
from typer.testing import CliRunner

from broker import migrations
from broker.cli import app
from broker.core.db import Database
from broker.core.settings import get_settings
from broker.inventory.models import Server
from broker.provisioning.models import Job
from broker.tenancy.models import RoleBinding, User

runner = CliRunner()


@pytest.fixture
def use_database(monkeypatch, tmp_path) -> Iterator:  # type: ignore[type-arg]
    def point_at(url: str) -> None:
        monkeypatch.setenv("GOVBROKER_DATABASE_URL", url)
        # local state (keys, the demo's simulated clouds) stays out of the working tree
        monkeypatch.setenv("GOVBROKER_VAR_DIR", str(tmp_path / "var"))
        get_settings.cache_clear()

    yield point_at
    get_settings.cache_clear()


def test_migrate_brings_a_new_database_to_head(tmp_path, use_database):
    url = f"sqlite:///{tmp_path}/new.db"
    use_database(url)
    result = runner.invoke(app, ["migrate"])
    assert result.exit_code == 0, result.output
    assert migrations.is_at_head(Database(url).engine)


def test_create_admin_creates_center_user_and_binding(committed_db, use_database):
    use_database(committed_db.url)
    result = runner.invoke(
        app, ["create-admin", "--username", "root1", "--password", "Str0ng-Passw0rd!"]
    )
    assert result.exit_code == 0, result.output
    with committed_db.unit_of_work(write=False) as s:
        user = s.execute(select(User).where(User.username == "root1")).scalar_one()
        roles = s.execute(select(RoleBinding.role).where(RoleBinding.user_id == user.id)).scalars()
        assert list(roles) == ["center_admin"]
    again = runner.invoke(
        app, ["create-admin", "--username", "root1", "--password", "Str0ng-Passw0rd!"]
    )
    assert again.exit_code == 2
    assert "taken" in again.output


def test_create_admin_refuses_a_weak_password(tmp_path, use_database):
    use_database(f"sqlite:///{tmp_path}/w.db")
    assert runner.invoke(app, ["migrate"]).exit_code == 0
    result = runner.invoke(app, ["create-admin", "--password", "short"])
    assert result.exit_code == 2
    assert "at least 12 characters" in result.output


def test_audit_verify_passes_then_names_the_tampered_event(committed_db, use_database):
    use_database(committed_db.url)
    assert runner.invoke(app, ["create-admin", "--password", "Str0ng-Passw0rd!"]).exit_code == 0
    ok = runner.invoke(app, ["audit", "verify"])
    assert ok.exit_code == 0
    assert "intact: 3 events" in ok.output
    with committed_db.unit_of_work() as s:
        s.execute(text("UPDATE audit_event SET action = 'tenant.nothing' WHERE seq = 2"))
    broken = runner.invoke(app, ["audit", "verify"])
    assert broken.exit_code == 1
    assert "BROKEN at event 2" in broken.output


def test_unreachable_database_is_a_clear_error(use_database):
    use_database("postgresql://nobody@127.0.0.1:1/none")
    result = runner.invoke(app, ["migrate"])
    assert result.exit_code == 2
    assert "database unreachable" in result.output


def test_serve_refuses_an_unmigrated_database(tmp_path, use_database):
    use_database(f"sqlite:///{tmp_path}/empty.db")
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2
    assert "govbroker migrate" in result.output


def test_serve_hands_uvicorn_the_bind_and_the_log_settings(tmp_path, use_database, monkeypatch):
    import uvicorn

    url = f"sqlite:///{tmp_path}/served.db"
    use_database(url)
    migrations.upgrade(url)
    monkeypatch.setenv("GOVBROKER_LOG_LEVEL", "warning")
    monkeypatch.setenv("GOVBROKER_ACCESS_LOG", "false")
    get_settings.cache_clear()
    given: dict[str, object] = {}
    monkeypatch.setattr(uvicorn, "run", lambda target, **kw: given.update(kw, target=target))
    result = runner.invoke(app, ["serve", "--bind", "127.0.0.1:8765"])
    assert result.exit_code == 0, result.output
    assert given["target"] == "api.app:create_app"
    assert (given["host"], given["port"], given["workers"]) == ("127.0.0.1", 8765, 1)
    assert (given["log_level"], given["access_log"]) == ("warning", False)


def test_bad_arguments_exit_non_zero():
    assert runner.invoke(app, ["serve", "--workers", "0"]).exit_code == 2
    assert runner.invoke(app, ["no-such-command"]).exit_code == 2


def test_demo_seeds_once_and_reports_users(tmp_path, use_database):
    url = f"sqlite:///{tmp_path}/demo.db"
    use_database(url)
    first = runner.invoke(app, ["demo", "--no-serve"])
    assert first.exit_code == 0, first.output
    assert "市公安局" in first.output
    assert "Demo@2026-gov" in first.output
    with Database(url).unit_of_work(write=False) as s:
        users = s.execute(select(func.count()).select_from(User)).scalar_one()
    lines = first.output.splitlines()
    table = lines[lines.index(next(ln for ln in lines if ln.startswith("user "))) + 1 :]
    roles_seen = {ln.split()[1] for ln in table[: table.index("")]}
    assert {"center_admin", "agency_admin", "member", "finance", "auditor"} <= roles_seen
    # the inventory: two simulated providers synced, servers adopted, unmanaged and drifted
    assert "provider kvm-region-1: ok" in first.output
    with Database(url).unit_of_work(write=False) as s:
        servers = s.execute(select(Server)).scalars().all()
    assert sum(1 for v in servers if v.tenant_id is None) == 3
    assert [v.name for v in servers if v.drift] == ["qmjk-etl-01"]
    # self-service: two servers built through the broker, one waiting for approval
    assert "self-service request xmsp-web-02: succeeded" in first.output
    assert "self-service request hjgl-ai-01: pending_approval" in first.output
    with Database(url).unit_of_work(write=False) as s:
        jobs = {j.params["name"]: j.state for j in s.execute(select(Job)).scalars()}
    assert jobs == {
        "xmsp-web-02": "succeeded",
        "zsxt-app-02": "succeeded",
        "hjgl-ai-01": "pending_approval",
    }
    assert sorted(p.name for p in (tmp_path / "var").glob("sim-*.json")) == [
        "sim-kvm-region-1.json",
        "sim-vsphere-dr.json",
    ]
    second = runner.invoke(app, ["demo", "--no-serve"])
    assert second.exit_code == 0
    assert "already present" in second.output
    assert "provider " not in second.output
    assert "self-service" not in second.output
    with Database(url).unit_of_work(write=False) as s:
        assert s.execute(select(func.count()).select_from(User)).scalar_one() == users


def test_statements_generate_finalize_export_from_the_command_line(
    committed_db, use_database, tmp_path
):
    from datetime import date

    from openpyxl import load_workbook

    from billing.models import LifecycleKind, Statement
    from tests.fixtures.auth import build_estate
    from tests.fixtures.billing import local, make_world

    with committed_db.unit_of_work() as s:
        estate = build_estate(s)
    w = make_world(committed_db, estate)
    w.catalog(date(2026, 10, 1), {"vcpu": "10", "memory_mb": "5"})
    contract = w.contract("HT-CLI-1", starts_on=date(2026, 10, 1), ends_on=date(2026, 12, 31))
    w.server("cli-1")
    sizes = {"vcpu": 2, "memory_mb": 2048}
    w.event("cli-1", LifecycleKind.created, local(2026, 10, 5, 8), sizes, contract=contract)
    w.event("cli-1", LifecycleKind.deleted, local(2026, 10, 5, 18), {}, contract=contract)
    use_database(committed_db.url)

    # 10 h: vCPU 2 × 10 × 10 = 200, memory 2 GiB × 5 × 10 = 100
    made = runner.invoke(app, ["statements", "generate", "--month", "2026-10", "--agency", "a"])
    assert made.exit_code == 0, made.output
    assert "total           3.00" in made.output
    final = runner.invoke(app, ["statements", "finalize", "--month", "2026-10"])
    assert final.exit_code == 0, final.output
    assert "1 statement(s) finalized" in final.output
    with committed_db.unit_of_work(write=False) as s:
        (st,) = s.execute(select(Statement)).scalars()
        assert st.state == "final" and st.content_hash in final.output
    out = tmp_path / "oct.xlsx"
    exported = runner.invoke(
        app, ["statements", "export", "--month", "2026-10", "--format", "xlsx", "-o", str(out)]
    )
    assert exported.exit_code == 0, exported.output
    assert [ws.title for ws in load_workbook(out).worksheets] == ["HT-CLI-1"]
    future = runner.invoke(app, ["statements", "generate", "--month", "2031-01"])
    assert future.exit_code == 2
    assert "has not begun" in future.output
