"""The `govbroker` command."""

from __future__ import annotations

import getpass
import os
import sys
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from broker import __version__, migrations
from broker.core.authz import Principal, Role
from broker.core.db import Database
from broker.core.errors import GovbrokerError
from broker.core.settings import Settings, get_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="govbroker control plane")
audit_app = typer.Typer(no_args_is_help=True, help="Audit trail")
app.add_typer(audit_app, name="audit")
quota_app = typer.Typer(no_args_is_help=True, help="Quota limits and usage")
app.add_typer(quota_app, name="quota")
jobs_app = typer.Typer(no_args_is_help=True, help="Periodic jobs")
app.add_typer(jobs_app, name="jobs")
statements_app = typer.Typer(no_args_is_help=True, help="Monthly billing statements (统采分签)")
app.add_typer(statements_app, name="statements")


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _database() -> Database:
    settings = get_settings()
    try:
        return Database(settings.effective_database_url)
    except (SQLAlchemyError, ValueError) as exc:
        raise _fail(f"bad database URL: {exc}") from exc


def _migrate(db: Database) -> None:
    try:
        migrations.upgrade(db.url)
    except OperationalError as exc:
        raise _fail(
            f"database unreachable ({db.engine.url.render_as_string()}): {exc.orig}"
        ) from exc


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


@app.command()
def migrate() -> None:
    """Bring the database schema to the newest revision."""
    db = _database()
    _migrate(db)
    typer.echo(f"database at {sorted(migrations.head_revisions())[0]}")


@app.command()
def serve(
    bind: Annotated[str | None, typer.Option(help="HOST:PORT; default from settings")] = None,
    workers: Annotated[int, typer.Option(min=1, max=64)] = 1,
) -> None:
    """Serve the API (the schema must be migrated first)."""
    settings = get_settings()
    if bind:
        os.environ["GOVBROKER_BIND"] = bind
        get_settings.cache_clear()
        settings = get_settings()
    db = _database()
    try:
        at_head = migrations.is_at_head(db.engine)
    except OperationalError as exc:
        raise _fail(f"database unreachable: {exc.orig}") from exc
    if not at_head:
        raise _fail("the database schema is not at the newest revision; run `govbroker migrate`")
    _run_server(settings, workers)


def _run_server(settings: Settings, workers: int) -> None:
    import uvicorn

    # generated keys are written once, here, before uvicorn starts workers that all read them
    settings.session_secret()
    settings.fernet_keys()
    # by import string: the CLI sits below the API layer and must not import it
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        proxy_headers=False,
        log_level=settings.log_level.lower(),
        access_log=settings.access_log,
    )


@app.command("create-admin")
def create_admin(
    username: Annotated[str, typer.Option(help="login name")] = "admin",
    display_name: Annotated[str, typer.Option(help="name shown in the console")] = "云中心管理员",
    password: Annotated[
        str | None, typer.Option(help="password; prompted for (or GOVBROKER_ADMIN_PASSWORD)")
    ] = None,
    center_code: Annotated[
        str, typer.Option(help="code of the center, created if missing")
    ] = "center",
    center_name: Annotated[str, typer.Option(help="Chinese name of the center")] = "电子政务云中心",
) -> None:
    """Create the center (if missing) and a center administrator."""
    from broker.tenancy import service as tenancy
    from broker.tenancy import users
    from broker.tenancy.schemas import RoleBindingCreate, UserCreate

    password = password or os.environ.get("GOVBROKER_ADMIN_PASSWORD")
    if not password:
        if not sys.stdin.isatty():
            raise _fail("give --password or GOVBROKER_ADMIN_PASSWORD when not on a terminal")
        password = getpass.getpass("password: ")
        if password != getpass.getpass("again: "):
            raise _fail("the passwords differ")
    db = _database()
    actor = Principal.system("create-admin")
    try:
        with db.unit_of_work() as session:
            center = tenancy.get_center(session) or tenancy.create_center(
                session, actor, code=center_code, name_zh=center_name
            )
            user = users.create_user(
                session,
                actor,
                UserCreate(
                    username=username,
                    display_name=display_name,
                    tenant_id=center.id,
                    password=password,
                ),
            )
            users.create_binding(
                session,
                actor,
                RoleBindingCreate(
                    user_id=user.id, role=Role.center_admin.value, tenant_id=center.id
                ),
            )
    except GovbrokerError as exc:
        raise _fail(exc.detail) from exc
    except OperationalError as exc:
        raise _fail(f"database unreachable or not migrated: {exc.orig}") from exc
    typer.echo(f"created center administrator {username!r} at {center.code}")


@audit_app.command("verify")
def audit_verify() -> None:
    """Recompute the audit hash chain; exit 1 at the first broken link."""
    from broker.audit.service import verify_chain

    db = _database()
    try:
        with db.unit_of_work(write=False) as session:
            report = verify_chain(session)
    except OperationalError as exc:
        raise _fail(f"database unreachable or not migrated: {exc.orig}") from exc
    if report.ok:
        typer.echo(f"audit chain intact: {report.checked} events verified")
        return
    typer.secho(
        f"audit chain BROKEN at event {report.broken_at}: {report.reason} "
        f"({report.checked} events verified before it)",
        fg=typer.colors.RED,
        err=True,
    )
    raise typer.Exit(1)


def _tenant_by_code(session: Any, code: str) -> Any:
    from sqlmodel import select

    from broker.tenancy.models import Tenant

    tenant = session.execute(select(Tenant).where(Tenant.code == code)).scalars().first()
    if tenant is None:
        raise _fail(f"no tenant with code {code!r}")
    return tenant


@quota_app.command("show")
def quota_show(
    tenant: Annotated[str | None, typer.Argument(help="tenant code; default: the center")] = None,
) -> None:
    """Limits and usage of a tenant and of each of its children."""
    from broker.tenancy import service as tenancy
    from quotas import service as quotas

    db = _database()
    try:
        with db.unit_of_work(write=False) as session:
            target = _tenant_by_code(session, tenant) if tenant else tenancy.get_center(session)
            if target is None:
                raise _fail("there is no center yet; run `govbroker create-admin`")
            me, lines, children = quotas.usage_report(session, Principal.system("cli"), target.id)
    except OperationalError as exc:
        raise _fail(f"database unreachable or not migrated: {exc.orig}") from exc
    for t, ls in [(me, lines), *children]:
        typer.echo(f"{t.code} ({t.kind}) {t.name_zh}")
        for line in ls:
            if line.limit is None and line.committed == 0 and line.reserved == 0:
                continue
            limit = "-" if line.limit is None else str(line.limit)
            until = line.valid_until.date().isoformat() if line.valid_until else "open"
            typer.echo(
                f"  {line.resource_class:<16} limit {limit:>10}  committed {line.committed:>10}"
                f"  reserved {line.reserved:>8}  {line.status:<13} until {until}"
            )


@quota_app.command("set")
def quota_set(
    tenant: Annotated[str, typer.Argument(help="tenant code")],
    resource_class: Annotated[str, typer.Argument(help="e.g. vcpu, memory_mb, storage_gb.ssd")],
    limit: Annotated[str, typer.Argument(help="the new limit, or 'none' to unset a system's")],
    valid_from: Annotated[datetime | None, typer.Option(help="start of the window (UTC)")] = None,
    valid_until: Annotated[datetime | None, typer.Option(help="end of the window (UTC)")] = None,
    force: Annotated[bool, typer.Option(help="allow a limit below current usage")] = False,
) -> None:
    """Set a tenant's limit for one resource class (as a center administrator)."""
    from quotas import service as quotas

    if limit.lower() == "none":
        value = None
    elif limit.isdigit():
        value = int(limit)
    else:
        raise _fail("LIMIT must be a whole number or 'none'")
    db = _database()
    try:
        with db.unit_of_work() as session:
            target = _tenant_by_code(session, tenant)
            q = quotas.set_quota(
                session,
                Principal.system("cli"),
                target.id,
                resource_class,
                limit=value,
                valid_from=_utc(valid_from),
                valid_until=_utc(valid_until),
                force=force,
            )
            shown = f"{q.hard_limit}" if q.hard_limit is not None else "none"
    except GovbrokerError as exc:
        raise _fail(exc.detail) from exc
    except OperationalError as exc:
        raise _fail(f"database unreachable or not migrated: {exc.orig}") from exc
    typer.echo(f"{tenant} {resource_class} limit {shown}")


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


@jobs_app.command("run")
def jobs_run(name: Annotated[str, typer.Argument(help="job name (see `jobs list`)")]) -> None:
    """Run one periodic job now."""
    from broker.jobs.registry import JOBS, run_job

    if name not in JOBS:
        raise _fail(f"no job {name!r}; known: {', '.join(sorted(JOBS))}")
    try:
        done = run_job(_database(), name)
    except OperationalError as exc:
        raise _fail(f"database unreachable or not migrated: {exc.orig}") from exc
    typer.echo(f"{name}: {done} processed")


@jobs_app.command("list")
def jobs_list() -> None:
    """The periodic jobs and how often they run."""
    from broker.jobs.registry import JOBS

    for job in JOBS.values():
        typer.echo(f"{job.name:<24} every {job.every_seconds:>5}s  {job.description}")


@app.command("scheduler")
def run_scheduler(
    once: Annotated[
        bool, typer.Option("--once", help="run every job once if no other scheduler leads; exit")
    ] = False,
) -> None:
    """Run the periodic jobs until SIGTERM/SIGINT; of all schedulers on one database (this
    command and `serve` with the embedded scheduler) only the elected leader runs them."""
    from broker.core.logging import configure_logging
    from broker.jobs import scheduler as jobs
    from broker.jobs.leader import holder_id, leadership_for

    configure_logging()
    db = _database()
    try:
        at_head = migrations.is_at_head(db.engine)
    except OperationalError as exc:
        raise _fail(f"database unreachable: {exc.orig}") from exc
    if not at_head:
        raise _fail("the database schema is not at the newest revision; run `govbroker migrate`")
    holder = holder_id()

    def announce(leading: bool) -> None:
        typer.echo(f"scheduler {holder}: {'leading' if leading else 'not leading'}")

    leadership = leadership_for(db.engine, holder=holder, on_change=announce)
    if once:
        done = jobs.run_once(db, leadership)
        if done is None:
            announce(False)
            return
        for name, processed in done.items():
            typer.echo(f"{name}: {processed} processed")
        return
    if not leadership.acquire():
        # gaining leadership announces itself; following is said once here, then on each loss
        announce(False)
    jobs.run_until_stopped(db, leadership)
    typer.echo(f"scheduler {holder}: stopped")


def _stage_ticker(bar: Any) -> Any:
    """A sync progress callback that moves the bar one step per stage (hosts, storage, ...)."""
    stages: set[str] = set()

    def tick(stage: str, done: int, total: int) -> None:
        if stage not in stages:
            stages.add(stage)
            bar.update(1)

    return tick


@app.command()
def sync(
    provider: Annotated[
        str | None, typer.Argument(help="provider name or id; every enabled one when left out")
    ] = None,
) -> None:
    """Sync providers' inventory now, with progress; exit 1 if any provider failed."""
    from broker.inventory import providers as provider_service
    from broker.inventory import sync as inventory_sync

    # registers which servers running jobs are still building, so that sync leaves them be
    from broker.provisioning import executor  # noqa: F401

    db = _database()
    try:
        with db.unit_of_work(write=False) as session:
            if provider is None:
                chosen = provider_service.list_providers(session, Principal.system(), enabled=True)
            else:
                chosen = [provider_service.by_name_or_id(session, provider)]
            targets = [(p.id, p.name) for p in chosen]
    except OperationalError as exc:
        raise _fail(f"database unreachable or not migrated: {exc.orig}") from exc
    except GovbrokerError as exc:
        raise _fail(exc.detail) from exc
    if not targets:
        typer.echo("no enabled providers")
        return
    failed = 0
    for pid, name in targets:
        with typer.progressbar(length=4, label=f"{name:<20}", show_pos=True) as bar:
            try:
                outcome = inventory_sync.sync_provider(
                    db, pid, trigger="cli", progress=_stage_ticker(bar)
                )
            except GovbrokerError as exc:
                typer.secho(f"\n{name}: {exc.detail}", fg=typer.colors.RED, err=True)
                failed += 1
                continue
        counts = ", ".join(f"{k}={v}" for k, v in sorted(outcome.counts.items()) if v)
        if outcome.status == "ok":
            typer.echo(f"{name}: ok in {outcome.duration_ms} ms ({counts})")
        else:
            failed += 1
            typer.secho(
                f"{name}: FAILED after {outcome.duration_ms} ms: {outcome.error}",
                fg=typer.colors.RED,
                err=True,
            )
    if failed:
        raise typer.Exit(1)


@app.command()
def demo(
    serve_after: Annotated[
        bool, typer.Option("--serve/--no-serve", help="serve when seeded")
    ] = True,
) -> None:
    """Create and migrate the database, seed a demo estate, and serve it."""
    from sqlmodel import select

    from broker import demo as demo_data
    from broker.inventory.models import Provider
    from broker.provisioning.models import CatalogItem
    from broker.tenancy import service as tenancy

    settings = get_settings()
    db = _database()
    _migrate(db)
    with db.unit_of_work() as session:
        seeded = tenancy.get_center(session) is not None
        people = [] if seeded else demo_data.seed(session)
    with db.unit_of_work(write=False) as session:
        # its own step: a run that stopped after the estate still gets its providers
        has_providers = session.execute(select(Provider.id).limit(1)).first() is not None
    if not has_providers:
        for outcome in demo_data.seed_inventory(db, settings.var_dir):
            typer.echo(
                f"provider {outcome.provider_name}: {outcome.status}, "
                f"{outcome.counts.get('servers_seen', 0)} servers, "
                f"{outcome.counts.get('adopted', 0)} adopted"
            )
    with db.unit_of_work(write=False) as session:
        has_catalog = session.execute(select(CatalogItem.id).limit(1)).first() is not None
    if not has_catalog:
        for line in demo_data.seed_self_service(db):
            typer.echo(f"self-service request {line}")
    if seeded:
        typer.echo("demo data already present; users as before")
    else:
        typer.echo(f"{'user':<16} {'role':<14} scope")
        for p in people:
            typer.echo(f"{p.username:<16} {p.role:<14} {p.scope}")
    typer.echo(f"\nevery demo user's password: {demo_data.DEMO_PASSWORD}")
    typer.echo(
        f"API: http://{settings.bind}/api/v1   OpenAPI: http://{settings.bind}/api/openapi.json"
    )
    if serve_after:
        _run_server(settings, 1)


MonthOpt = Annotated[str, typer.Option("--month", help="billing month, e.g. 2026-10")]
AgencyOpt = Annotated[str | None, typer.Option("--agency", help="agency code; default: all")]


def _statements_of(session: Any, month: str, agency: str | None) -> tuple[Any, list[Any]]:
    from billing import statements

    target = _tenant_by_code(session, agency) if agency else None
    rows = statements.list_statements(
        session,
        Principal.system("cli"),
        month=month,
        agency_id=target.id if target is not None else None,
    )
    return target, rows


@statements_app.command("generate")
def statements_generate(month: MonthOpt, agency: AgencyOpt = None) -> None:
    """Meter and rate up to the month's end, then draft (or redraft) its statements; finalized
    ones stay as they are."""
    from billing import statements

    db = _database()
    try:
        with db.unit_of_work() as session:
            target = _tenant_by_code(session, agency) if agency else None
            rows = statements.generate(
                session,
                Principal.system("cli"),
                month=month,
                agency_id=target.id if target is not None else None,
            )
            summary = [(s.contract_id, s.state, s.line_count, s.total_amount) for s in rows]
    except GovbrokerError as exc:
        raise _fail(exc.detail) from exc
    for contract_id, state, lines, total in summary:
        typer.echo(f"{contract_id}  {state:<5}  {lines:>6} lines  total {total / 100:>14,.2f}")
    typer.echo(f"{len(summary)} statement(s) for {month}")


@statements_app.command("finalize")
def statements_finalize(month: MonthOpt, agency: AgencyOpt = None) -> None:
    """Freeze the month's draft statements (each gets its content hash)."""
    from billing import statements

    db = _database()
    done: list[tuple[str, str]] = []
    try:
        with db.unit_of_work() as session:
            _, rows = _statements_of(session, month, agency)
            for s in rows:
                if s.state == "final":
                    continue
                final = statements.finalize(session, Principal.system("cli"), s.id)
                done.append((str(final.id), final.content_hash or ""))
    except GovbrokerError as exc:
        raise _fail(exc.detail) from exc
    for sid, digest in done:
        typer.echo(f"{sid}  final  sha256 {digest}")
    typer.echo(f"{len(done)} statement(s) finalized for {month}")


@statements_app.command("export")
def statements_export(
    month: MonthOpt,
    agency: AgencyOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="xlsx, csv or pdf")] = "xlsx",
    output: Annotated[str | None, typer.Option("--output", "-o", help="file to write")] = None,
) -> None:
    """Write the month's statements to one file (XLSX: a sheet per contract)."""
    from billing import documents

    if fmt not in documents.FORMATS:
        raise _fail(f"--format must be one of {', '.join(sorted(documents.FORMATS))}")
    db = _database()
    try:
        with db.unit_of_work(write=False) as session:
            target = _tenant_by_code(session, agency) if agency else None
            docs = documents.for_export(
                session,
                Principal.system("cli"),
                month=month,
                agency_id=target.id if target is not None else None,
            )
            _, body = documents.render(session, docs, fmt)
    except GovbrokerError as exc:
        raise _fail(exc.detail) from exc
    path = output or f"statements-{month}{'-' + agency if agency else ''}.{fmt}"
    with open(path, "wb") as fh:
        fh.write(body)
    typer.echo(f"wrote {len(docs)} statement(s) to {path}")


def main() -> None:  # pragma: no cover - console-script shim
    app()
