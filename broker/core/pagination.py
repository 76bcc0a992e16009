"""Opaque keyset cursors: the sort key of the last row seen, base64url-encoded JSON."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from broker.core.errors import Invalid

DEFAULT_LIMIT = 50
MAX_LIMIT = 500


def encode_cursor(*values: Any) -> str:
    plain = [
        v.isoformat() if isinstance(v, datetime) else str(v) if isinstance(v, UUID) else v
        for v in values
    ]
    raw = json.dumps(plain, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, kinds: Sequence[type]) -> list[Any]:
    """Decode a cursor into values of the given kinds (str, int, datetime, UUID)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = json.loads(raw)
        if not isinstance(values, list) or len(values) != len(kinds):
            raise ValueError("wrong shape")
        out: list[Any] = []
        for kind, value in zip(kinds, values, strict=True):
            if kind is datetime:
                if not isinstance(value, str):
                    raise ValueError("not a string")
                parsed = datetime.fromisoformat(value)
                if parsed.tzinfo is None:
                    raise ValueError("naive time")
                out.append(parsed)
            elif kind is UUID:
                if not isinstance(value, str):
                    raise ValueError("not a string")
                out.append(UUID(value))
            elif kind is int:
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError("not an integer")
                if not -(2**63) <= value < 2**63:
                    raise ValueError("out of range")
                out.append(value)
            else:
                if not isinstance(value, str) or "\x00" in value:
                    raise ValueError("not a plain string")
                out.append(value)
        return out
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError) as exc:
        raise Invalid.field("cursor", "is not a cursor this list returned") from exc
