"""Who is calling: password logins with lock-out, session tokens, API tokens and OIDC bearer JWTs.

Three kinds of bearer credential are accepted:
- API tokens `gbk_…`: random, stored as SHA-256, shown once;
- session tokens: HS256 JWTs this service signs at login (issuer `govbroker`);
- OIDC access tokens from the configured issuer, checked against its JWKS and mapped to a user by
  a claim (username by default).
Each resolves to a `Principal` carrying the user's current role bindings.
"""

from __future__ import annotations

import functools
import hashlib
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from sqlalchemy import update
from sqlmodel import Session, col, select

from broker.audit import service as audit
from broker.core import clock
from broker.core.authz import Grant, Principal, Role
from broker.core.errors import Invalid, Locked, NotFound, Unauthenticated
from broker.core.ids import random_secret
from broker.core.memo import Memo
from broker.core.settings import Settings, get_settings
from broker.tenancy.models import ApiToken, RoleBinding, Tenant, TenantStatus, User, UserStatus
from broker.tenancy.passwords import check_policy, hash_password, verify_password

TOKEN_PREFIX = "gbk_"  # noqa: S105 - a marker, not a secret
SESSION_ISSUER = "govbroker"
SESSION_AUDIENCE = "govbroker-session"
_LAST_USED_GRANULARITY = timedelta(minutes=5)
_BAD_LOGIN = "invalid username or password"


def _home(session: Session, user: User) -> Tenant | None:
    return session.get(Tenant, user.tenant_id)


def load_principal(
    session: Session, user: User, *, method: str, token_id: uuid.UUID | None = None
) -> Principal:
    """The user's current grants; bindings on archived tenants grant nothing."""
    stmt = (
        select(RoleBinding.role, RoleBinding.tenant_id, Tenant.path)
        .join(Tenant, col(Tenant.id) == col(RoleBinding.tenant_id))
        .where(RoleBinding.user_id == user.id, Tenant.status != TenantStatus.archived.value)
    )
    grants = tuple(Grant(Role(r), tid, path) for r, tid, path in session.execute(stmt).all())
    return Principal(
        user_id=user.id,
        username=user.username,
        grants=grants,
        auth_method=method,
        token_id=token_id,
        home_tenant_id=user.tenant_id,
    )


# --- password login ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoginOutcome:
    """Failed logins still change state (the counter, the lock) that must be committed."""

    user: User | None
    error: Unauthenticated | Locked | None
    token: str | None = None
    expires_at: datetime | None = None


def login(session: Session, username: str, password: str) -> LoginOutcome:
    settings = get_settings()
    now = clock.now()
    user = session.execute(select(User).where(User.username == username)).scalars().first()
    if user is None:
        verify_password(password, None)
        return LoginOutcome(None, Unauthenticated(_BAD_LOGIN))
    actor = Principal(user_id=user.id, username=user.username, auth_method="password")
    home = _home(session, user)
    if user.locked_until is not None and user.locked_until > now:
        return LoginOutcome(
            user,
            Locked(
                f"too many failed logins; try again after {user.locked_until.isoformat()}",
                extra={"locked_until": user.locked_until.isoformat()},
            ),
        )
    ok, new_hash = verify_password(password, user.password_hash)
    if not ok or user.status != UserStatus.active:
        user.failed_logins += 1
        if user.failed_logins >= settings.lockout_threshold:
            user.locked_until = now + timedelta(minutes=settings.lockout_minutes)
            user.failed_logins = 0
            audit.record(
                session,
                actor,
                "user.lock",
                tenant=home,
                target_type="user",
                target_id=user.id,
                after={"locked_until": user.locked_until.isoformat()},
            )
        else:
            audit.record(
                session,
                actor,
                "auth.login_failed",
                tenant=home,
                target_type="user",
                target_id=user.id,
                after={"failed_logins": user.failed_logins},
            )
        session.flush()
        return LoginOutcome(user, Unauthenticated(_BAD_LOGIN))
    if new_hash is not None:
        user.password_hash = new_hash
    user.failed_logins = 0
    user.locked_until = None
    user.last_login_at = now
    session.flush()
    audit.record(session, actor, "auth.login", tenant=home, target_type="user", target_id=user.id)
    token, expires = issue_session_token(user, settings)
    return LoginOutcome(user, None, token, expires)


def issue_session_token(user: User, settings: Settings | None = None) -> tuple[str, datetime]:
    settings = settings or get_settings()
    now = clock.now()
    expires = now + timedelta(minutes=settings.session_ttl_minutes)
    claims = {
        "iss": SESSION_ISSUER,
        "aud": SESSION_AUDIENCE,
        "sub": str(user.id),
        "iat": int(now.timestamp()),
        "exp": int(expires.timestamp()),
        # a password change ends every session issued before it
        "pwd": _password_epoch(user),
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, settings.session_secret(), algorithm="HS256"), expires


def _password_epoch(user: User) -> int:
    """Microseconds, so that a change within the same second as a login still ends it."""
    if user.password_changed_at is None:
        return 0
    delta = user.password_changed_at - datetime(1970, 1, 1, tzinfo=UTC)
    return delta // timedelta(microseconds=1)


def change_own_password(session: Session, principal: Principal, current: str, new: str) -> User:
    if principal.user_id is None:
        raise Invalid.field("current_password", "only users have passwords")
    user = session.get(User, principal.user_id)
    if user is None:
        raise NotFound("user not found")
    ok, _ = verify_password(current, user.password_hash)
    if not ok:
        raise Invalid.field("current_password", "does not match", "mismatch")
    if current == new:
        raise Invalid.field("new_password", "must differ from the current password")
    check_policy(new, username=user.username, field="new_password")
    user.password_hash = hash_password(new)
    user.password_changed_at = clock.now()
    user.updated_at = clock.now()
    session.flush()
    audit.record(
        session,
        principal,
        "user.change_password",
        tenant=_home(session, user),
        target_type="user",
        target_id=user.id,
        after={"password": "changed"},
    )
    return user


# --- API tokens --------------------------------------------------------------------------------


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def create_token(
    session: Session, principal: Principal, *, name: str, expires_in_days: int
) -> tuple[ApiToken, str]:
    """Returns the row and the raw secret; only the hash is stored."""
    if principal.user_id is None:
        raise Invalid.field("name", "tokens belong to users; the system principal has none")
    settings = get_settings()
    if expires_in_days > settings.api_token_max_days:
        raise Invalid.field(
            "expires_in_days", f"at most {settings.api_token_max_days} days", "too_long"
        )
    raw = TOKEN_PREFIX + random_secret(32)
    token = ApiToken(
        user_id=principal.user_id,
        name=name,
        token_hash=hash_token(raw),
        prefix=raw[: len(TOKEN_PREFIX) + 6],
        expires_at=clock.now() + timedelta(days=expires_in_days),
    )
    session.add(token)
    session.flush()
    user = session.get(User, principal.user_id)
    audit.record(
        session,
        principal,
        "token.create",
        tenant=_home(session, user) if user else None,
        target_type="api_token",
        target_id=token.id,
        after={"name": name, "prefix": token.prefix, "expires_at": token.expires_at},
    )
    return token, raw


def list_tokens(session: Session, principal: Principal) -> list[ApiToken]:
    stmt = (
        select(ApiToken)
        .where(ApiToken.user_id == principal.user_id)
        .order_by(col(ApiToken.created_at).desc(), col(ApiToken.id))
    )
    return list(session.execute(stmt).scalars())


def revoke_token(session: Session, principal: Principal, token_id: uuid.UUID) -> ApiToken:
    token = session.get(ApiToken, token_id)
    if token is None or token.user_id != principal.user_id:
        raise NotFound(f"token {token_id} not found")
    if token.revoked_at is None:
        token.revoked_at = clock.now()
        session.flush()
        user = session.get(User, token.user_id)
        audit.record(
            session,
            principal,
            "token.revoke",
            tenant=_home(session, user) if user else None,
            target_type="api_token",
            target_id=token.id,
            after={"name": token.name, "prefix": token.prefix},
        )
    return token


# --- resolving a bearer credential -------------------------------------------------------------


@dataclass(frozen=True)
class Authenticated:
    principal: Principal
    # API tokens whose last-used time is stale; the caller records it in its own short write
    touch_token: uuid.UUID | None = None


def authenticate(session: Session, credential: str) -> Authenticated:
    if credential.startswith(TOKEN_PREFIX):
        return _check_api_token(session, credential)[0]
    try:
        unverified = jwt.decode(credential, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise Unauthenticated("the bearer token is malformed") from exc
    if unverified.get("iss") == SESSION_ISSUER:
        return Authenticated(_by_session_token(session, credential))
    return Authenticated(_by_oidc(session, credential))


def _active_user(session: Session, user_id: Any) -> User:
    try:
        uid = uuid.UUID(str(user_id))
    except ValueError as exc:
        raise Unauthenticated("the token names no user") from exc
    user = session.get(User, uid)
    if user is None or user.status != UserStatus.active:
        raise Unauthenticated("the account is disabled or gone")
    return user


def _check_api_token(session: Session, raw: str) -> tuple[Authenticated, ApiToken]:
    token = (
        session.execute(select(ApiToken).where(ApiToken.token_hash == hash_token(raw)))
        .scalars()
        .first()
    )
    now = clock.now()
    if token is None or token.revoked_at is not None:
        raise Unauthenticated("unknown or revoked API token")
    if token.expires_at <= now:
        raise Unauthenticated("the API token has expired")
    user = _active_user(session, token.user_id)
    stale = token.last_used_at is None or now - token.last_used_at > _LAST_USED_GRANULARITY
    authenticated = Authenticated(
        load_principal(session, user, method="token", token_id=token.id),
        touch_token=token.id if stale else None,
    )
    return authenticated, token


# --- API tokens checked a moment ago -------------------------------------------------------------
#
# An API token's principal is remembered for GOVBROKER_TOKEN_MEMORY_SECONDS (3 by default) after
# a full check, so that a client sending many requests is not looked up (token, user, role
# bindings) for every one.
# Bound on what it may miss: a change committed by this process to any token, user, role binding
# or tenant empties the memory at once (after its commit); one committed by another process
# (another API replica, the CLI) or edited outside govbroker is seen within that time.
# The token's own expiry is checked on every use. Session and OIDC tokens are always checked.
_monotonic = time.monotonic  # the memory's own clock (tests move it; the broker clock is UTC)


@dataclass(frozen=True)
class _Remembered:
    principal: Principal
    token_expires_at: datetime
    last_used_at: datetime | None
    checked: float  # _monotonic() of the full check


_remembered: Memo[tuple[str, str], _Remembered] = Memo(
    "principals", (ApiToken, User, RoleBinding, Tenant)
)


def remembered(database: str, credential: str) -> Principal | None:
    """The principal of an API token fully checked less than token_memory_seconds ago (in
    `database`, a key naming the database), or None: then `authenticate_remembering`."""
    if not credential.startswith(TOKEN_PREFIX):
        return None
    entry = _remembered.get((database, hash_token(credential)))
    if entry is None or _monotonic() - entry.checked >= get_settings().token_memory_seconds:
        return None
    now = clock.now()
    if entry.token_expires_at <= now:
        return None  # the full check says why
    if entry.last_used_at is None or now - entry.last_used_at > _LAST_USED_GRANULARITY:
        return None  # due for its last-used time: the full check asks for it
    return entry.principal


def authenticate_remembering(session: Session, database: str, credential: str) -> Authenticated:
    """`authenticate`, remembering an API token's principal for `remembered`."""
    if not credential.startswith(TOKEN_PREFIX):
        return authenticate(session, credential)
    since = _remembered.generation
    checked = _monotonic()
    authenticated, token = _check_api_token(session, credential)
    last_used = clock.now() if authenticated.touch_token is not None else token.last_used_at
    entry = _Remembered(authenticated.principal, token.expires_at, last_used, checked)
    _remembered.keep((database, token.token_hash), entry, since=since)
    return authenticated


def touch_token(session: Session, token_id: uuid.UUID) -> None:
    """Record a token's use. A bulk UPDATE, which the ORM's write hooks do not see: when a token
    was last used changes nobody's rights, so it must not forget every remembered principal (as
    any other write to a token does), which with many tokens would happen every few moments."""
    session.execute(
        update(ApiToken)
        .where(col(ApiToken.id) == token_id)
        .values(last_used_at=clock.now())
        .execution_options(synchronize_session="fetch")
    )


def _by_session_token(session: Session, raw: str) -> Principal:
    settings = get_settings()
    try:
        claims = jwt.decode(
            raw,
            settings.session_secret(),
            algorithms=["HS256"],
            audience=SESSION_AUDIENCE,
            issuer=SESSION_ISSUER,
            options={"require": ["exp", "iat", "sub"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthenticated("the session has expired; log in again") from exc
    except jwt.PyJWTError as exc:
        raise Unauthenticated("the session token is not valid") from exc
    user = _active_user(session, claims["sub"])
    if claims.get("pwd") != _password_epoch(user):
        raise Unauthenticated("the password changed since this session began; log in again")
    return load_principal(session, user, method="session")


@functools.cache
def _jwks_client(url: str) -> jwt.PyJWKClient:
    return jwt.PyJWKClient(url, cache_keys=True, lifespan=300, timeout=5)


def _by_oidc(session: Session, raw: str) -> Principal:
    settings = get_settings()
    if not settings.oidc_jwks_url or not settings.oidc_issuer:
        raise Unauthenticated("the bearer token is not one this service issued")
    try:
        key = _jwks_client(settings.oidc_jwks_url).get_signing_key_from_jwt(raw)
        claims = jwt.decode(
            raw,
            key.key,
            algorithms=settings.oidc_algorithms,
            audience=settings.oidc_audience,
            issuer=settings.oidc_issuer,
            options={"require": ["exp", "iss"], "verify_aud": settings.oidc_audience is not None},
        )
    except jwt.PyJWKClientConnectionError as exc:
        raise Unauthenticated("the identity provider's keys cannot be fetched") from exc
    except jwt.PyJWTError as exc:
        raise Unauthenticated(f"the OIDC token is not valid: {exc}") from exc
    name = claims.get(settings.oidc_username_claim)
    if not isinstance(name, str) or not name:
        raise Unauthenticated(f"the OIDC token has no {settings.oidc_username_claim!r} claim")
    user = session.execute(select(User).where(User.username == name)).scalars().first()
    if user is None or user.status != UserStatus.active:
        raise Unauthenticated(f"no active govbroker user is mapped to {name!r}")
    return load_principal(session, user, method="oidc")
