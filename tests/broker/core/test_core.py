"""Settings, time storage, encryption at rest, cursors, principals."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography.fernet import Fernet
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import Column, MetaData, Table, insert, select

from broker.core import crypto
from broker.core.authz import Grant, Principal, Role
from broker.core.db import UTCDateTime
from broker.core.errors import Invalid, Unavailable
from broker.core.pagination import decode_cursor, encode_cursor
from broker.core.settings import Settings


def test_settings_defaults_match_the_documentation(monkeypatch, tmp_path):
    for var in ("GOVBROKER_DATABASE_URL", "GOVBROKER_BIND", "GOVBROKER_DISPLAY_TIMEZONE"):
        monkeypatch.delenv(var, raising=False)
    s = Settings(var_dir=tmp_path)
    assert s.bind == "127.0.0.1:8000"
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.display_timezone == "Asia/Shanghai"
    assert s.effective_database_url == f"sqlite:///{tmp_path.as_posix()}/govbroker.db"


def test_settings_read_the_govbroker_prefix(monkeypatch):
    monkeypatch.setenv("GOVBROKER_BIND", "0.0.0.0:9000")
    monkeypatch.setenv("GOVBROKER_DATABASE_URL", "postgresql://x@db/gb")
    s = Settings()
    assert s.port == 9000
    assert s.effective_database_url == "postgresql://x@db/gb"


@pytest.mark.parametrize("bind", ["8000", "localhost", ":80", "host:0", "host:70000", "h:x"])
def test_settings_refuse_a_bind_without_a_valid_port(bind):
    with pytest.raises(ValidationError, match="bind"):
        Settings(bind=bind)


def test_log_levels_are_checked_and_read_in_any_case():
    assert Settings(log_level=" warning ").log_level == "WARNING"
    with pytest.raises(ValidationError, match="log_level"):
        Settings(log_level="verbose")


def test_missing_keys_are_generated_once_into_var_with_private_mode(tmp_path):
    s = Settings(var_dir=tmp_path, secret_key=None, fernet_key=None)
    first = s.fernet_keys()
    assert s.fernet_keys() == first
    Fernet(first[0].encode())
    key_file = tmp_path / "fernet.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert s.session_secret() == s.session_secret()
    assert (tmp_path / "secret.key").exists()


def test_credentials_encrypt_to_ciphertext_and_back(tmp_path):
    s = Settings(var_dir=tmp_path, fernet_key=Fernet.generate_key().decode())
    token = crypto.encrypt("vcenter-password", s)
    assert "vcenter-password" not in token
    assert crypto.decrypt(token, s) == "vcenter-password"


def test_key_rotation_decrypts_old_ciphertext(tmp_path):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    before = crypto.encrypt("s3cret", Settings(var_dir=tmp_path, fernet_key=old))
    rotated = Settings(var_dir=tmp_path, fernet_key=f"{new},{old}")
    assert crypto.decrypt(before, rotated) == "s3cret"


def test_decrypting_with_the_wrong_key_is_a_clear_error(tmp_path):
    token = crypto.encrypt(
        "x", Settings(var_dir=tmp_path, fernet_key=Fernet.generate_key().decode())
    )
    other = Settings(var_dir=tmp_path, fernet_key=Fernet.generate_key().decode())
    with pytest.raises(Unavailable, match="cannot be decrypted"):
        crypto.decrypt(token, other)


def test_utc_datetime_round_trips_aware_utc_on_every_backend(engine):
    table = Table("tz_probe", MetaData(), Column("at", UTCDateTime()))
    shanghai = timezone(timedelta(hours=8))
    moment = datetime(2026, 10, 31, 23, 30, 15, 123456, tzinfo=shanghai)
    with engine.connect() as conn:
        trans = conn.begin()
        table.create(conn)
        conn.execute(insert(table).values(at=moment))
        stored = conn.execute(select(table.c.at)).scalar_one()
        trans.rollback()
    assert stored == moment
    assert stored.tzinfo is not None
    assert stored.utcoffset() == timedelta(0)


def test_naive_datetimes_are_refused(engine):
    table = Table("tz_probe2", MetaData(), Column("at", UTCDateTime()))
    with engine.connect() as conn:
        trans = conn.begin()
        table.create(conn)
        with pytest.raises(Exception, match="naive datetime"):
            conn.execute(insert(table).values(at=datetime(2026, 1, 1)))  # noqa: DTZ001
        trans.rollback()


@given(
    st.lists(
        st.one_of(
            # keys come from rows, and no stored string holds NUL (PostgreSQL cannot)
            st.text(st.characters(blacklist_characters="\x00"), max_size=40),
            st.integers(min_value=-(2**62), max_value=2**62),
            st.uuids(),
            st.datetimes(timezones=st.just(UTC)),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_cursor_round_trips_its_values(values):
    kinds = [type(v) if not isinstance(v, uuid.UUID) else uuid.UUID for v in values]
    assert decode_cursor(encode_cursor(*values), kinds) == values


@pytest.mark.parametrize(
    "garbage",
    ["", "!!!", "bm90IGpzb24", encode_cursor("a", "b"), encode_cursor(1), encode_cursor("a\x00")],
)
def test_cursor_garbage_is_an_invalid_cursor_field(garbage):
    with pytest.raises(Invalid) as info:
        decode_cursor(garbage, [str])
    assert info.value.errors[0].field == "cursor"


def test_binding_covers_its_tenant_and_descendants_only():
    p = Principal(
        user_id=uuid.uuid4(), username="u", grants=(Grant(Role.agency_admin, None, "/c/a/"),)
    )
    assert p.can("system.manage", "/c/a/")
    assert p.can("system.manage", "/c/a/s1/")
    assert not p.can("system.manage", "/c/b/")
    assert not p.sees("/c/")
    assert not p.can("tenant.manage", "/c/a/")


def test_prefixes_drop_nested_scopes():
    p = Principal(
        user_id=uuid.uuid4(),
        username="u",
        grants=(
            Grant(Role.auditor, None, "/c/a/"),
            Grant(Role.member, None, "/c/a/s/"),
            Grant(Role.auditor, None, "/c/b/"),
        ),
    )
    assert p.prefixes("tenant.read") == ["/c/a/", "/c/b/"]
    assert p.prefixes("audit.read") == ["/c/a/", "/c/b/"]
    assert p.prefixes("server.manage") == ["/c/a/s/"]
