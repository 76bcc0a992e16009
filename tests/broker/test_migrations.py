"""Alembic migrations and the SQLModel models describe the same schema."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from broker import migrations


def test_autogenerate_finds_no_difference_between_migrations_and_models(engine):
    metadata = migrations.all_metadata()
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, metadata)
    assert diff == []


def test_migrated_database_is_at_head(engine):
    assert migrations.is_at_head(engine)


def test_there_is_exactly_one_head():
    assert len(migrations.head_revisions()) == 1
