"""Service level: password logins and lock-out, session tokens, API tokens and OIDC bearer JWTs.

The OIDC helpers here (`FakeIdP`, the `configure`, `idp` and `oidc` fixtures) are imported by
tests/api/test_identity.py as well: the only shared place would be conftest, which this suite
does not own.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import RSAAlgorithm
from sqlmodel import select

from broker.audit.models import AuditEvent
from broker.core import clock as broker_clock
from broker.core.authz import Principal
from broker.core.errors import Invalid, Locked, Unauthenticated
from broker.core.settings import get_settings
from broker.tenancy import auth, users
from broker.tenancy.models import ApiToken, User
from broker.tenancy.passwords import check_policy, hash_password, verify_password
from broker.tenancy.schemas import UserUpdate
from tests.fixtures.auth import PASSWORD

SYSTEM = Principal.system("test-auth")
NEW_PASSWORD = "Another-Good-Pass-42"
DROP = object()  # a claim override meaning "leave this claim out"


# --- shared helpers ----------------------------------------------------------------------------


def _forget_cached_settings() -> None:
    get_settings.cache_clear()
    auth._jwks_client.cache_clear()


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """`configure(lockout_threshold=3)` sets GOVBROKER_LOCKOUT_THRESHOLD for this test only."""

    def apply(**values: Any) -> None:
        for name, value in values.items():
            monkeypatch.setenv(f"GOVBROKER_{name.upper()}", str(value))
        _forget_cached_settings()

    yield apply
    # undo first, then forget: nothing may cache the test's settings after it ends
    monkeypatch.undo()
    _forget_cached_settings()


@functools.cache
def rsa_key(n: int) -> rsa.RSAPrivateKey:
    """Key 0 is the IdP's; any other is somebody else's. Cached: generating one takes a while."""
    del n
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


class FakeIdP:
    """An identity provider: an RSA key, and its JWKS served over HTTP on 127.0.0.1."""

    issuer = "https://idp.gov.test/realms/govcloud"
    audience = "govbroker-api"
    kid = "idp-key-1"

    def __init__(self) -> None:
        self.key = rsa_key(0)
        self.public_pem = self.key.public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
        )
        jwk = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        jwk.update(kid=self.kid, use="sig", alg="RS256")
        body = json.dumps({"keys": [jwk]}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # a short poll interval: shutdown() waits for the loop to notice
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        self.jwks_url = f"http://127.0.0.1:{self.server.server_port}/protocol/certs"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(broker_clock.now().timestamp())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "8d1f6c1e-idp-subject",
            "preferred_username": "a-member",
            "iat": now,
            "exp": now + 300,
        }
        for name, value in overrides.items():
            if value is DROP:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def token(
        self, *, key: rsa.RSAPrivateKey | None = None, kid: str | None = None, **claims: Any
    ) -> str:
        return jwt.encode(
            self.claims(**claims),
            key or self.key,
            algorithm="RS256",
            headers={"kid": kid or self.kid},
        )

    def _forge(self, alg: str, sign: Callable[[bytes], bytes], **claims: Any) -> str:
        header = {"alg": alg, "typ": "JWT", "kid": self.kid}
        signing_input = (
            _b64url(json.dumps(header).encode())
            + b"."
            + _b64url(json.dumps(self.claims(**claims)).encode())
        )
        return (signing_input + b"." + _b64url(sign(signing_input))).decode()

    def unsigned_token(self, **claims: Any) -> str:
        """`alg: none` with an empty signature."""
        return self._forge("none", lambda _: b"", **claims)

    def hs256_with_public_key(self, **claims: Any) -> str:
        """Algorithm confusion: HMAC keyed with the IdP's public key, which everyone can fetch."""
        return self._forge(
            "HS256", lambda data: hmac.new(self.public_pem, data, hashlib.sha256).digest(), **claims
        )


@pytest.fixture
def idp() -> Iterator[FakeIdP]:
    provider = FakeIdP()
    try:
        yield provider
    finally:
        provider.close()


@pytest.fixture
def oidc(idp: FakeIdP, configure: Callable[..., None]) -> FakeIdP:
    """The IdP, with govbroker configured to trust it."""
    configure(oidc_issuer=idp.issuer, oidc_jwks_url=idp.jwks_url, oidc_audience=idp.audience)
    return idp


# OIDC tokens that must be refused: id → (how the IdP fixture makes it, what the refusal says)
REJECTED_OIDC: dict[str, tuple[Callable[[FakeIdP], str], str]] = {
    "signed-by-another-key-with-the-same-kid": (
        lambda p: p.token(key=rsa_key(1)),
        "Signature verification failed",
    ),
    "signed-by-a-key-not-in-the-jwks": (
        lambda p: p.token(key=rsa_key(1), kid="stranger"),
        "Unable to find a signing key",
    ),
    "wrong-issuer": (lambda p: p.token(iss="https://idp.evil.test/realms/x"), "Invalid issuer"),
    "wrong-audience": (lambda p: p.token(aud="some-other-app"), "Audience doesn't match"),
    "no-audience": (lambda p: p.token(aud=DROP), 'missing the "aud" claim'),
    "expired": (
        lambda p: p.token(iat=_now_ts() - 600, exp=_now_ts() - 1),
        "Signature has expired",
    ),
    "no-expiry": (lambda p: p.token(exp=DROP), 'missing the "exp" claim'),
    "no-username-claim": (lambda p: p.token(preferred_username=DROP), "no 'preferred_username'"),
    "empty-username": (lambda p: p.token(preferred_username=""), "no 'preferred_username'"),
    "username-of-no-user": (
        lambda p: p.token(preferred_username="nobody-here"),
        "no active govbroker user",
    ),
    "alg-none": (lambda p: p.unsigned_token(), "alg value is not allowed"),
    "hs256-signed-with-the-public-key": (
        lambda p: p.hs256_with_public_key(),
        "alg value is not allowed",
    ),
    "pretends-to-be-a-session-token": (
        lambda p: p.token(iss=auth.SESSION_ISSUER),
        "session token is not valid",
    ),
}


def _now_ts() -> int:
    return int(broker_clock.now().timestamp())


# --- local helpers -----------------------------------------------------------------------------


def _login(db, username: str, password: str) -> auth.LoginOutcome:  # type: ignore[no-untyped-def]
    with db.unit_of_work() as s:
        return auth.login(s, username, password)


def _authenticate(db, credential: str | None) -> auth.Authenticated:  # type: ignore[no-untyped-def]
    assert credential is not None
    with db.unit_of_work(write=False) as s:
        return auth.authenticate(s, credential)


def _user(db, username: str) -> User:  # type: ignore[no-untyped-def]
    with db.unit_of_work(write=False) as s:
        return s.execute(select(User).where(User.username == username)).scalar_one()


def _audit(db, user: User) -> list[tuple[str, dict[str, Any] | None]]:  # type: ignore[no-untyped-def]
    with db.unit_of_work(write=False) as s:
        stmt = (
            select(AuditEvent.action, AuditEvent.after)
            .where(AuditEvent.target_id == str(user.id))
            .order_by(AuditEvent.seq)  # type: ignore[arg-type]
        )
        return [(a, after) for a, after in s.execute(stmt).all()]


@pytest.fixture
def give_password(db, estate):  # type: ignore[no-untyped-def]
    def give(username: str, password: str = PASSWORD) -> None:
        with db.unit_of_work() as s:
            users.set_password(s, SYSTEM, estate.uid(username), password)

    return give


@pytest.fixture
def member(clock, db, estate, give_password):  # type: ignore[no-untyped-def]
    """a-member with a password, logged in once; returns that login's outcome."""
    give_password("a-member")
    outcome = _login(db, "a-member", PASSWORD)
    assert outcome.error is None
    return outcome


def _principal(db, estate, username: str) -> Principal:  # type: ignore[no-untyped-def]
    with db.unit_of_work(write=False) as s:
        user = s.get(User, estate.uid(username))
        return auth.load_principal(s, user, method="session")


def _disable(db, estate, username: str) -> None:  # type: ignore[no-untyped-def]
    with db.unit_of_work() as s:
        users.update_user(s, SYSTEM, estate.uid(username), UserUpdate(status="disabled"))


# --- password hashing and policy (pure) --------------------------------------------------------


def test_password_hash_is_not_the_password_and_verifies():
    stored = hash_password(PASSWORD)
    assert PASSWORD not in stored and stored.startswith("$argon2id$")
    assert verify_password(PASSWORD, stored)[0] is True
    assert verify_password(PASSWORD + "x", stored)[0] is False


def test_verify_password_without_a_stored_hash_never_matches():
    assert verify_password(PASSWORD, None) == (False, None)


def test_policy_accepts_a_long_mixed_password():
    check_policy(PASSWORD, username="a-member")


@pytest.mark.parametrize(
    ("password", "says"),
    [
        ("Ab1!xyz", "at least 12 characters"),
        ("onlylowercaseletters", "at least 3 of"),
        ("lowercaseandUPPERCASE", "at least 3 of"),
        ("Xx9!A-MEMBERzz", "must not contain the username"),
    ],
    ids=["too-short", "one-class", "two-classes", "contains-username-any-case"],
)
def test_policy_refuses_weak_passwords_naming_the_field(password, says):
    with pytest.raises(Invalid) as err:
        check_policy(password, username="a-member", field="new_password")
    assert [(e.field, e.code) for e in err.value.errors] == [("new_password", "password_policy")]
    assert says in err.value.errors[0].message


def test_policy_follows_configured_minimums(configure):
    configure(password_min_length=20, password_min_classes=4)
    with pytest.raises(Invalid):
        check_policy("Abcdefgh1234!xyz", username="u")  # 16 characters
    with pytest.raises(Invalid):
        check_policy("Abcdefghijkl1234567890", username="u")  # no symbol
    check_policy("Abcdefghijkl1234567890!", username="u")


# --- password login ----------------------------------------------------------------------------


def test_login_returns_a_session_token_that_authenticates_the_user(
    clock, db, estate, give_password
):
    give_password("a-member")
    outcome = _login(db, "a-member", PASSWORD)
    assert outcome.error is None and outcome.token is not None
    assert outcome.expires_at == broker_clock.now() + timedelta(minutes=480)
    result = _authenticate(db, outcome.token)
    assert result.principal.user_id == estate.uid("a-member")
    assert result.principal.auth_method == "session"
    assert [(g.role, g.tenant_id) for g in result.principal.grants] == [
        ("member", estate.tid("a1"))
    ]
    user = _user(db, "a-member")
    assert user.last_login_at == broker_clock.now()
    assert [a for a, _ in _audit(db, user)][-1] == "auth.login"


def test_wrong_password_and_unknown_user_fail_alike(db, estate, give_password):
    give_password("a-member")
    wrong = _login(db, "a-member", "Wrong-Password-123")
    unknown = _login(db, "nobody", "Wrong-Password-123")
    assert type(wrong.error) is type(unknown.error) is Unauthenticated
    assert str(wrong.error) == str(unknown.error)
    assert wrong.token is None and unknown.token is None


def test_disabled_user_cannot_log_in_even_with_the_right_password(db, estate, give_password):
    give_password("a-member")
    _disable(db, estate, "a-member")
    outcome = _login(db, "a-member", PASSWORD)
    assert isinstance(outcome.error, Unauthenticated) and outcome.token is None


def test_user_without_a_password_cannot_log_in(db, estate):
    outcome = _login(db, "a-member", "")
    assert isinstance(outcome.error, Unauthenticated)


def test_session_expires_after_its_lifetime(clock, member, db):
    clock.shift(timedelta(minutes=480) - timedelta(seconds=1))
    _authenticate(db, member.token)
    clock.shift(timedelta(seconds=1))
    with pytest.raises(Unauthenticated, match="expired"):
        _authenticate(db, member.token)


def test_session_token_signed_with_another_secret_is_refused(clock, member, db):
    claims = jwt.decode(member.token, options={"verify_signature": False})
    forged = jwt.encode(
        claims, "not-the-server-secret-but-long-enough-0123456789", algorithm="HS256"
    )
    with pytest.raises(Unauthenticated):
        _authenticate(db, forged)


def test_session_token_for_a_disabled_user_is_refused(clock, member, db, estate):
    _disable(db, estate, "a-member")
    with pytest.raises(Unauthenticated):
        _authenticate(db, member.token)


def test_garbage_bearer_is_refused_as_malformed(db):
    with pytest.raises(Unauthenticated, match="malformed"):
        _authenticate(db, "not-a-jwt-at-all")


# --- lock-out ----------------------------------------------------------------------------------


def test_failed_logins_count_and_are_audited(db, estate, give_password):
    give_password("a-member")
    for _ in range(3):
        assert isinstance(_login(db, "a-member", "Wrong-Password-123").error, Unauthenticated)
    user = _user(db, "a-member")
    assert user.failed_logins == 3 and user.locked_until is None
    failed = [after for action, after in _audit(db, user) if action == "auth.login_failed"]
    assert failed == [{"failed_logins": 1}, {"failed_logins": 2}, {"failed_logins": 3}]


def test_account_locks_at_the_threshold_even_for_the_right_password(
    clock, db, estate, give_password
):
    give_password("a-member")
    for _ in range(4):
        _login(db, "a-member", "Wrong-Password-123")
    # the fifth failure still answers "bad login"; it is what locks the account
    assert isinstance(_login(db, "a-member", "Wrong-Password-123").error, Unauthenticated)
    user = _user(db, "a-member")
    until = broker_clock.now() + timedelta(minutes=15)
    assert user.locked_until == until
    assert _audit(db, user)[-1] == ("user.lock", {"locked_until": until.isoformat()})
    outcome = _login(db, "a-member", PASSWORD)
    assert isinstance(outcome.error, Locked) and outcome.token is None
    assert outcome.error.extra == {"locked_until": until.isoformat()}


def test_successful_login_resets_the_failure_count(db, estate, give_password):
    give_password("a-member")
    for _ in range(4):
        _login(db, "a-member", "Wrong-Password-123")
    assert _login(db, "a-member", PASSWORD).error is None
    assert _user(db, "a-member").failed_logins == 0
    for _ in range(4):
        _login(db, "a-member", "Wrong-Password-123")
    assert _login(db, "a-member", PASSWORD).error is None


def test_lock_lifts_after_lockout_minutes(clock, db, estate, give_password):
    give_password("a-member")
    for _ in range(5):
        _login(db, "a-member", "Wrong-Password-123")
    clock.shift(timedelta(minutes=15) - timedelta(seconds=1))
    assert isinstance(_login(db, "a-member", PASSWORD).error, Locked)
    clock.shift(timedelta(seconds=1))
    outcome = _login(db, "a-member", PASSWORD)
    assert outcome.error is None and outcome.token is not None
    user = _user(db, "a-member")
    assert user.locked_until is None and user.failed_logins == 0


def test_lockout_follows_configured_threshold_and_minutes(
    clock, configure, db, estate, give_password
):
    configure(lockout_threshold=2, lockout_minutes=60)
    give_password("a-member")
    _login(db, "a-member", "Wrong-Password-123")
    assert _login(db, "a-member", PASSWORD).error is None  # one failure is not enough
    _login(db, "a-member", "Wrong-Password-123")
    _login(db, "a-member", "Wrong-Password-123")
    assert _user(db, "a-member").locked_until == broker_clock.now() + timedelta(minutes=60)
    clock.shift(timedelta(minutes=59))
    assert isinstance(_login(db, "a-member", PASSWORD).error, Locked)


def test_admin_unlock_lifts_the_lock_at_once(clock, db, estate, give_password):
    give_password("a-member")
    for _ in range(5):
        _login(db, "a-member", "Wrong-Password-123")
    a_admin = _principal(db, estate, "a-admin")
    with db.unit_of_work() as s:
        users.unlock(s, a_admin, estate.uid("a-member"))
    assert _login(db, "a-member", PASSWORD).error is None
    user = _user(db, "a-member")
    assert _audit(db, user)[-2][0] == "user.unlock"


def test_admin_set_password_lifts_the_lock(clock, db, estate, give_password):
    give_password("a-member")
    for _ in range(5):
        _login(db, "a-member", "Wrong-Password-123")
    give_password("a-member", NEW_PASSWORD)
    assert _login(db, "a-member", NEW_PASSWORD).error is None


# --- password change ends sessions -------------------------------------------------------------


def test_password_change_ends_earlier_sessions(clock, member, db, estate):
    clock.shift(timedelta(minutes=1))
    other = _login(db, "a-member", PASSWORD)
    clock.shift(timedelta(minutes=1))
    me = _principal(db, estate, "a-member")
    with db.unit_of_work() as s:
        auth.change_own_password(s, me, PASSWORD, NEW_PASSWORD)
    for old in (member.token, other.token):
        with pytest.raises(Unauthenticated, match="password changed"):
            _authenticate(db, old)
    fresh = _login(db, "a-member", NEW_PASSWORD)
    assert _authenticate(db, fresh.token).principal.username == "a-member"
    assert isinstance(_login(db, "a-member", PASSWORD).error, Unauthenticated)


def test_password_change_ends_sessions_begun_within_the_same_second(
    clock, db, estate, give_password
):
    # an admin sets a password, the user logs in and changes it, all inside one second:
    # the session begun before the change must end like any other
    give_password("a-member")
    clock.shift(timedelta(milliseconds=200))
    before = _login(db, "a-member", PASSWORD)
    clock.shift(timedelta(milliseconds=200))
    me = _principal(db, estate, "a-member")
    with db.unit_of_work() as s:
        auth.change_own_password(s, me, PASSWORD, NEW_PASSWORD)
    with pytest.raises(Unauthenticated):
        _authenticate(db, before.token)


def test_admin_set_password_ends_the_users_sessions(clock, member, db, give_password):
    clock.shift(timedelta(minutes=1))
    give_password("a-member", NEW_PASSWORD)
    with pytest.raises(Unauthenticated):
        _authenticate(db, member.token)


def test_password_change_needs_the_current_password(member, db, estate):
    me = _principal(db, estate, "a-member")
    with pytest.raises(Invalid) as err, db.unit_of_work() as s:
        auth.change_own_password(s, me, "Wrong-Pass-123", NEW_PASSWORD)
    assert err.value.errors[0].field == "current_password"


def test_password_change_applies_the_policy_to_the_new_password(member, db, estate):
    me = _principal(db, estate, "a-member")
    with pytest.raises(Invalid) as err, db.unit_of_work() as s:
        auth.change_own_password(s, me, PASSWORD, "short")
    assert [(e.field, e.code) for e in err.value.errors] == [("new_password", "password_policy")]


# --- API tokens --------------------------------------------------------------------------------


def _create_token(  # type: ignore[no-untyped-def]
    db, estate, username: str = "a-member", days: int = 30
) -> tuple[ApiToken, str]:
    me = _principal(db, estate, username)
    with db.unit_of_work() as s:
        return auth.create_token(s, me, name="ci", expires_in_days=days)


def test_api_token_is_stored_only_as_its_hash(clock, db, estate):
    token, raw = _create_token(db, estate)
    assert raw.startswith("gbk_") and len(raw) > 40
    assert token.prefix == raw[:10]
    with db.unit_of_work(write=False) as s:
        stored = s.get(ApiToken, token.id)
    assert stored.token_hash == hashlib.sha256(raw.encode()).hexdigest()
    assert raw not in stored.token_hash and raw[4:] not in stored.prefix
    assert stored.expires_at == broker_clock.now() + timedelta(days=30)


def test_api_token_authenticates_its_owner(clock, db, estate):
    token, raw = _create_token(db, estate)
    result = _authenticate(db, raw)
    assert result.principal.user_id == estate.uid("a-member")
    assert result.principal.auth_method == "token" and result.principal.token_id == token.id


def test_api_token_last_use_is_recorded_at_most_every_five_minutes(clock, db, estate):
    token, raw = _create_token(db, estate)
    first = _authenticate(db, raw)
    assert first.touch_token == token.id
    with db.unit_of_work() as s:
        auth.touch_token(s, token.id)
    with db.unit_of_work(write=False) as s:
        assert s.get(ApiToken, token.id).last_used_at == broker_clock.now()
    clock.shift(timedelta(minutes=4))
    assert _authenticate(db, raw).touch_token is None
    clock.shift(timedelta(minutes=2))
    assert _authenticate(db, raw).touch_token == token.id


def test_unknown_api_token_is_refused(db, estate):
    with pytest.raises(Unauthenticated):
        _authenticate(db, "gbk_" + "A" * 43)


def test_revoked_api_token_is_refused(clock, db, estate):
    token, raw = _create_token(db, estate)
    me = _principal(db, estate, "a-member")
    with db.unit_of_work() as s:
        auth.revoke_token(s, me, token.id)
    with pytest.raises(Unauthenticated):
        _authenticate(db, raw)


def test_api_token_expires(clock, db, estate):
    _, raw = _create_token(db, estate, days=1)
    clock.shift(timedelta(days=1) - timedelta(seconds=1))
    _authenticate(db, raw)
    clock.shift(timedelta(seconds=1))
    with pytest.raises(Unauthenticated, match="expired"):
        _authenticate(db, raw)


def test_api_token_of_a_disabled_user_is_refused_even_if_not_revoked(clock, db, estate):
    token, raw = _create_token(db, estate)
    # flip the status directly, skipping the revocation the service does on disable
    with db.unit_of_work() as s:
        s.get(User, estate.uid("a-member")).status = "disabled"
    with db.unit_of_work(write=False) as s:
        assert s.get(ApiToken, token.id).revoked_at is None
    with pytest.raises(Unauthenticated):
        _authenticate(db, raw)


def test_api_token_lifetime_is_capped(clock, configure, db, estate):
    with pytest.raises(Invalid) as err:
        _create_token(db, estate, days=366)
    assert err.value.errors[0].field == "expires_in_days"
    configure(api_token_max_days=30)
    _create_token(db, estate, days=30)
    with pytest.raises(Invalid) as err:
        _create_token(db, estate, days=31)
    assert err.value.errors[0].field == "expires_in_days"


def test_list_tokens_shows_only_the_callers_tokens(clock, db, estate):
    mine, _ = _create_token(db, estate, "a-member")
    _create_token(db, estate, "b-member")
    with db.unit_of_work(write=False) as s:
        listed = auth.list_tokens(s, _principal(db, estate, "a-member"))
    assert [t.id for t in listed] == [mine.id]


# --- OIDC bearer JWTs --------------------------------------------------------------------------


def test_oidc_token_from_the_trusted_issuer_authenticates_the_mapped_user(clock, oidc, db, estate):
    result = _authenticate(db, oidc.token())
    assert result.principal.user_id == estate.uid("a-member")
    assert result.principal.auth_method == "oidc"
    assert result.touch_token is None


@pytest.mark.parametrize(("make", "says"), list(REJECTED_OIDC.values()), ids=list(REJECTED_OIDC))
def test_oidc_token_is_refused(clock, oidc, db, estate, make, says):
    token = make(oidc)
    with pytest.raises(Unauthenticated) as err:
        _authenticate(db, token)
    assert says in str(err.value)


def test_oidc_token_is_refused_once_it_expires(clock, oidc, db, estate):
    token = oidc.token()
    _authenticate(db, token)
    clock.shift(timedelta(seconds=300))
    with pytest.raises(Unauthenticated):
        _authenticate(db, token)


def test_oidc_token_for_a_disabled_user_is_refused(clock, oidc, db, estate):
    _disable(db, estate, "a-member")
    with pytest.raises(Unauthenticated):
        _authenticate(db, oidc.token())


def test_oidc_token_is_refused_when_oidc_is_not_configured(clock, idp, db, estate):
    token = idp.token()
    with pytest.raises(Unauthenticated, match="not one this service issued"):
        _authenticate(db, token)


def test_oidc_username_comes_from_the_configured_claim(clock, oidc, configure, db, estate):
    configure(oidc_username_claim="gov_uid")
    result = _authenticate(db, oidc.token(gov_uid="b-member", preferred_username="admin"))
    assert result.principal.username == "b-member"
    with pytest.raises(Unauthenticated):
        _authenticate(db, oidc.token())  # preferred_username alone no longer maps anyone
