"""Alembic migrations, driven programmatically (no alembic.ini to find at run time)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, MetaData

HERE = Path(__file__).parent


def all_metadata() -> MetaData:
    """Import every domain's tables so the metadata is complete, and return it."""
    import billing.models  # noqa: F401
    import broker.audit.models
    import broker.inventory.models
    import broker.jobs.models
    import broker.provisioning.models
    import broker.tenancy.models  # noqa: F401
    import quotas.models  # noqa: F401
    from broker.core.db import metadata

    return metadata


def config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(config(url), revision)


def head_revisions() -> set[str]:
    return set(ScriptDirectory.from_config(config("sqlite://")).get_heads())


def current_revisions(bind: Engine | Connection) -> set[str]:
    if isinstance(bind, Connection):
        return set(MigrationContext.configure(bind).get_current_heads())
    with bind.connect() as conn:
        return set(MigrationContext.configure(conn).get_current_heads())


def is_at_head(engine: Engine) -> bool:
    return current_revisions(engine) == head_revisions()
