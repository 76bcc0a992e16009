"""RFC 9457 problem details: the one place where errors become HTTP responses."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker.core import context
from broker.core.errors import (
    Conflict,
    Forbidden,
    GovbrokerError,
    Invalid,
    Locked,
    NotFound,
    QuotaExceeded,
    Unauthenticated,
    Unavailable,
)

log = structlog.get_logger(__name__)

MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:govbroker:problem:"

STATUS: dict[type[GovbrokerError], int] = {
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    QuotaExceeded: 409,
    Invalid: 422,
    Locked: 423,
    Unavailable: 503,
}


def status_of(exc: GovbrokerError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]  # type: ignore[index]
    return 400


def problem(
    request: Request,
    status: int,
    slug: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    **members: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        "request_id": getattr(request.state, "request_id", None) or context.current().request_id,
    }
    body.update({k: v for k, v in members.items() if v is not None})
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GovbrokerError)
    status = status_of(exc)
    members: dict[str, Any] = dict(exc.extra)
    if exc.errors:
        members["errors"] = [
            {"field": e.field, "message": e.message, "code": e.code} for e in exc.errors
        ]
    if isinstance(exc, QuotaExceeded):
        members["shortfalls"] = [
            {
                "resource_class": o.resource_class,
                "tenant_id": o.tenant_id,
                "tenant_code": o.tenant_code,
                "level": o.level,
                "limit": o.limit,
                "usage": o.usage,
                "requested": o.requested,
                "shortfall": o.shortfall,
                "reason": o.reason,
            }
            for o in exc.over
        ]
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return problem(request, status, exc.slug, exc.title, exc.detail, headers, **members)


def _field_of(loc: tuple[Any, ...]) -> tuple[str, str]:
    where = str(loc[0]) if loc else "body"
    rest = [str(p) for p in loc[1:]]
    return ".".join(rest) or where, where


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = []
    for err in exc.errors():
        field, where = _field_of(tuple(err.get("loc", ())))
        if err.get("type") == "json_invalid":
            field = "body"  # the location is a character offset, not a field
        errors.append(
            {
                "field": field,
                "in": where,
                "message": err.get("msg", ""),
                "code": err.get("type", "invalid"),
            }
        )
    fields = ", ".join(sorted({e["field"] for e in errors}))
    return problem(
        request, 422, "invalid", "Invalid input", f"invalid fields: {fields}", errors=errors
    )


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and "parsing the body" in str(exc.detail):
        # e.g. a body that is not UTF-8: as unreadable as malformed JSON, and answered alike
        return problem(
            request,
            422,
            "invalid",
            "Invalid input",
            "the body cannot be read as JSON",
            errors=[
                {
                    "field": "body",
                    "in": "body",
                    "message": "is not valid UTF-8 JSON",
                    "code": "json_invalid",
                }
            ],
        )
    titles = {404: "Not found", 405: "Method not allowed", 401: "Authentication required"}
    return problem(
        request,
        exc.status_code,
        f"http-{exc.status_code}",
        titles.get(exc.status_code, "HTTP error"),
        str(exc.detail),
        dict(exc.headers) if exc.headers else None,
    )


def _database_down(request: Request, exc: Exception) -> JSONResponse:
    log.error("database unavailable", error=str(exc))
    return problem(
        request,
        503,
        "unavailable",
        "Service unavailable",
        "the database cannot be reached; try again shortly",
        {"Retry-After": "5"},
    )


def _bad_value(request: Request, exc: Exception) -> JSONResponse:
    # the database refused a value that validation let through (out of range, bad encoding):
    # still the caller's input, so a 422 rather than a 500
    log.warning("database refused a value", error=str(exc).splitlines()[0])
    return problem(
        request, 422, "invalid", "Invalid input", "a value is out of range or cannot be stored"
    )


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette may call this handler outside the except block: pass the exception explicitly
    log.error("unhandled error", path=request.url.path, exc_info=exc)
    return problem(
        request,
        500,
        "internal",
        "Internal error",
        "an unexpected error occurred; quote the request id when reporting it",
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(GovbrokerError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DataError, _bad_value)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(PoolTimeout, _database_down)
    app.add_exception_handler(Exception, _unexpected)
