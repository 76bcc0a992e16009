"""Encryption of secrets at rest (provider credentials) with Fernet.

MultiFernet allows key rotation: the first configured key encrypts, every configured key decrypts.
"""

from __future__ import annotations

import functools

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from broker.core.errors import Unavailable
from broker.core.settings import Settings, get_settings


@functools.cache
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([Fernet(k.encode()) for k in keys])


def encrypt(plaintext: str, settings: Settings | None = None) -> str:
    keys = tuple((settings or get_settings()).fernet_keys())
    return _fernet(keys).encrypt(plaintext.encode()).decode()


def decrypt(token: str, settings: Settings | None = None) -> str:
    keys = tuple((settings or get_settings()).fernet_keys())
    try:
        return _fernet(keys).decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise Unavailable("stored secret cannot be decrypted with the configured keys") from exc
