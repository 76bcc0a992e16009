"""The one source of "now". Tests move time with time-machine, which patches what this reads."""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> datetime:
    return datetime.now(UTC)
