"""Remembered API tokens: the principal of a token checked a moment ago is answered from memory
(auth.remembered), and it is forgotten at once when this process commits a change to a token,
user, role binding or tenant; a change made elsewhere (another replica, SQL by hand) is seen once
GOVBROKER_TOKEN_MEMORY_SECONDS have passed. The memory's clock is moved by hand: no test waits."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlmodel import select

from broker.core import clock as broker_clock
from broker.core.authz import Principal
from broker.core.errors import Unauthenticated
from broker.core.settings import get_settings
from broker.tenancy import auth, users
from broker.tenancy.models import ApiToken, RoleBinding, User
from broker.tenancy.schemas import RoleBindingCreate, UserUpdate
from tests.fixtures.clock import move_monotonic

SYSTEM = Principal.system("test-auth-memory")
DATABASE = "the-test-database"


def _token(db, estate, username: str = "a-member", days: int = 30) -> tuple[ApiToken, str]:  # type: ignore[no-untyped-def]
    with db.unit_of_work(write=False) as s:
        user = s.get(User, estate.uid(username))
        me = auth.load_principal(s, user, method="session")
    with db.unit_of_work() as s:
        return auth.create_token(s, me, name="ci", expires_in_days=days)


def _check(db, raw: str) -> Principal:  # type: ignore[no-untyped-def]
    """A full check, remembered: what api.deps does when memory has no answer."""
    with db.unit_of_work(write=False) as s:
        return auth.authenticate_remembering(s, DATABASE, raw).principal


@pytest.fixture
def later(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """`later(seconds)` moves the memory's clock forward."""
    return move_monotonic(monkeypatch, auth)


def test_a_token_checked_a_moment_ago_is_answered_from_memory(clock, db, estate):
    _, raw = _token(db, estate)
    assert auth.remembered(DATABASE, raw) is None
    checked = _check(db, raw)
    assert auth.remembered(DATABASE, raw) == checked
    assert checked.auth_method == "token" and checked.username == "a-member"


def test_memory_is_kept_per_database(clock, db, estate):
    _, raw = _token(db, estate)
    _check(db, raw)
    assert auth.remembered("another-database", raw) is None


def test_memory_lasts_at_most_the_cache_seconds(clock, db, estate, later):
    _, raw = _token(db, estate)
    _check(db, raw)
    later(get_settings().token_memory_seconds - 0.5)
    assert auth.remembered(DATABASE, raw) is not None
    later(0.5)
    assert auth.remembered(DATABASE, raw) is None


def test_a_token_revoked_here_is_refused_at_once(clock, db, estate):
    token, raw = _token(db, estate)
    _check(db, raw)
    with db.unit_of_work(write=False) as s:
        me = auth.load_principal(s, s.get(User, estate.uid("a-member")), method="session")
    with db.unit_of_work() as s:
        auth.revoke_token(s, me, token.id)
    assert auth.remembered(DATABASE, raw) is None
    with pytest.raises(Unauthenticated, match="revoked"):
        _check(db, raw)


def test_a_role_binding_removed_here_is_seen_at_once(clock, db, estate):
    _, raw = _token(db, estate)
    assert _check(db, raw).grants
    with db.unit_of_work(write=False) as s:
        (binding,) = s.execute(
            select(RoleBinding).where(RoleBinding.user_id == estate.uid("a-member"))
        ).scalars()
    with db.unit_of_work() as s:
        users.delete_binding(s, SYSTEM, binding.id)
    assert auth.remembered(DATABASE, raw) is None
    assert _check(db, raw).grants == ()


def test_a_role_binding_added_here_is_seen_at_once(clock, db, estate):
    _, raw = _token(db, estate)
    before = _check(db, raw).grants
    with db.unit_of_work() as s:
        users.create_binding(
            s,
            SYSTEM,
            RoleBindingCreate(
                user_id=estate.uid("a-member"), role="member", tenant_id=estate.tid("a2")
            ),
        )
    assert auth.remembered(DATABASE, raw) is None
    assert len(_check(db, raw).grants) == len(before) + 1


def test_a_user_disabled_here_is_refused_at_once(clock, db, estate):
    _, raw = _token(db, estate)
    _check(db, raw)
    with db.unit_of_work() as s:
        users.update_user(s, SYSTEM, estate.uid("a-member"), UserUpdate(status="disabled"))
    assert auth.remembered(DATABASE, raw) is None
    with pytest.raises(Unauthenticated):
        _check(db, raw)


def test_a_change_rolled_back_forgets_nothing_it_need_not(clock, db, estate):
    _, raw = _token(db, estate)
    checked = _check(db, raw)

    def disable_then_fail() -> None:
        with db.unit_of_work() as s:
            users.update_user(s, SYSTEM, estate.uid("a-member"), UserUpdate(status="disabled"))
            raise RuntimeError("the request failed")

    with pytest.raises(RuntimeError):
        disable_then_fail()
    assert auth.remembered(DATABASE, raw) == checked


def test_a_revocation_made_elsewhere_is_seen_within_the_cache_seconds(clock, db, estate, later):
    token, raw = _token(db, estate)
    _check(db, raw)
    # another replica (or SQL by hand): no event of this process sees it
    tokens = ApiToken.__table__  # type: ignore[attr-defined]
    db.connection.execute(
        update(tokens).where(tokens.c.id == token.id).values(revoked_at=broker_clock.now())
    )
    assert auth.remembered(DATABASE, raw) is not None  # the documented bound
    later(get_settings().token_memory_seconds)
    assert auth.remembered(DATABASE, raw) is None
    with pytest.raises(Unauthenticated, match="revoked"):
        _check(db, raw)


def test_a_remembered_token_still_expires_on_time(clock, db, estate):
    _, raw = _token(db, estate, days=1)
    _check(db, raw)
    clock.shift(timedelta(days=1))
    assert auth.remembered(DATABASE, raw) is None
    with pytest.raises(Unauthenticated, match="expired"):
        _check(db, raw)


def test_a_token_due_for_its_last_use_is_checked_in_full(clock, db, estate):
    token, raw = _token(db, estate)
    with db.unit_of_work(write=False) as s:
        first = auth.authenticate_remembering(s, DATABASE, raw)
    assert first.touch_token == token.id  # never used: the full check asks for the touch
    with db.unit_of_work() as s:
        auth.touch_token(s, token.id)
    _check(db, raw)
    assert auth.remembered(DATABASE, raw) is not None
    clock.shift(timedelta(minutes=6))
    assert auth.remembered(DATABASE, raw) is None


def test_recording_a_tokens_use_forgets_nobody(clock, db, estate):
    _, raw = _token(db, estate)
    other, _ = _token(db, estate, username="b-member")
    _check(db, raw)
    with db.unit_of_work() as s:
        auth.touch_token(s, other.id)
    assert auth.remembered(DATABASE, raw) is not None
    with db.unit_of_work(write=False) as s:
        assert s.get(ApiToken, other.id).last_used_at == broker_clock.now()
    # a real change to a token still forgets them all
    with db.unit_of_work() as s:
        owner = auth.load_principal(s, s.get(User, estate.uid("b-member")), method="session")
        auth.revoke_token(s, owner, other.id)
    assert auth.remembered(DATABASE, raw) is None


def test_a_token_memory_of_zero_checks_every_request(clock, db, estate, monkeypatch):
    monkeypatch.setenv("GOVBROKER_TOKEN_MEMORY_SECONDS", "0")
    get_settings.cache_clear()
    try:
        _, raw = _token(db, estate)
        _check(db, raw)
        assert auth.remembered(DATABASE, raw) is None
    finally:
        monkeypatch.delenv("GOVBROKER_TOKEN_MEMORY_SECONDS")
        get_settings.cache_clear()


def test_session_tokens_are_never_remembered(clock, db, estate):
    with db.unit_of_work(write=False) as s:
        user = s.get(User, estate.uid("a-member"))
    session_token, _ = auth.issue_session_token(user)
    _check(db, session_token)
    assert auth.remembered(DATABASE, session_token) is None
