"""structlog set-up: key-value lines for people, JSON for log collectors."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import structlog

from broker.core import context
from broker.core.settings import get_settings


def _add_request_id(
    _logger: object, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event.setdefault("request_id", context.current().request_id)
    return event


def configure_logging() -> None:
    settings = get_settings()
    level = logging.getLevelName(settings.log_level)
    logging.basicConfig(level=level, format="%(message)s")
    # alembic narrates every MigrationContext (readiness probes create one per call)
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
    renderer = (
        structlog.processors.JSONRenderer()
        if settings.log_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_request_id,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            level if isinstance(level, int) else 20
        ),
        cache_logger_on_first_use=False,
    )
