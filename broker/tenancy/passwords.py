"""Password hashing (argon2id via pwdlib) and the password policy."""

from __future__ import annotations

import functools

from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from broker.core.errors import FieldError, Invalid
from broker.core.settings import Settings, get_settings


@functools.cache
def _hasher(time_cost: int, memory_kib: int) -> PasswordHash:
    return PasswordHash((Argon2Hasher(time_cost=time_cost, memory_cost=memory_kib),))


def hasher(settings: Settings | None = None) -> PasswordHash:
    s = settings or get_settings()
    return _hasher(s.argon2_time_cost, s.argon2_memory_kib)


def hash_password(password: str) -> str:
    return hasher().hash(password)


def verify_password(password: str, stored: str | None) -> tuple[bool, str | None]:
    """(matches, a new hash when the stored one used older parameters)."""
    if stored is None:
        # spend the same time as a real check so unknown users cannot be told apart
        hasher().verify(password, _dummy_hash())
        return False, None
    return hasher().verify_and_update(password, stored)


@functools.cache
def _dummy_hash() -> str:
    return hasher().hash("govbroker-no-such-user")


def check_policy(password: str, *, username: str, field: str = "password") -> None:
    """Length, character classes, and not built on the username."""
    s = get_settings()
    problems: list[str] = []
    if len(password) < s.password_min_length:
        problems.append(f"must be at least {s.password_min_length} characters")
    if len(password) > 256:
        problems.append("must be at most 256 characters")
    classes = sum(
        [
            any(c.islower() for c in password),
            any(c.isupper() for c in password),
            any(c.isdigit() for c in password),
            any(not c.isalnum() for c in password),
        ]
    )
    if classes < s.password_min_classes:
        problems.append(
            f"must mix at least {s.password_min_classes} of: "
            "lower case, upper case, digits, symbols"
        )
    if username and username.lower() in password.lower():
        problems.append("must not contain the username")
    if problems:
        raise Invalid(
            f"{field}: " + "; ".join(problems),
            [FieldError(field, "; ".join(problems), "password_policy")],
        )
