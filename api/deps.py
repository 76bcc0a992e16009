"""Dependencies: the request's unit of work and the calling principal."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlmodel import Session

from broker.core.authz import Principal
from broker.core.db import SessionSource
from broker.core.errors import Unauthenticated
from broker.core.pagination import DEFAULT_LIMIT, MAX_LIMIT
from broker.tenancy import auth

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# query strings may carry anything but NUL, which PostgreSQL cannot compare or store
NO_NUL = r"^[^\x00]*$"


def database(request: Request) -> SessionSource:
    return request.app.state.db  # type: ignore[no-any-return]


async def _database(request: Request) -> SessionSource:
    # as a dependency, async: a plain attribute read must not cost a hop to the thread pool
    return database(request)


def db_session(request: Request) -> Iterator[Session]:
    """One unit of work per request. Routers commit after the service call succeeds; anything
    not committed (an error, a read) is rolled back when the session closes."""
    session = database(request).session(write=request.method not in SAFE_METHODS)
    try:
        yield session
    finally:
        session.close()


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


async def current_principal(request: Request) -> Principal:
    """The caller. An API token checked a moment ago is answered from memory, in the event loop
    (see auth.remembered for how stale that may be); anything else is looked up in a thread."""
    credential = _bearer(request)
    if credential is None:
        raise Unauthenticated("send 'Authorization: Bearer <token>' (log in or use an API token)")
    db = database(request)
    key = str(getattr(db, "url", ""))
    principal = auth.remembered(key, credential)
    if principal is not None:
        return principal
    return await run_in_threadpool(_authenticate, db, key, credential)


def _authenticate(db: SessionSource, key: str, credential: str) -> Principal:
    with db.unit_of_work(write=False) as session:
        result = auth.authenticate_remembering(session, key, credential)
    if result.touch_token is not None:
        with db.unit_of_work() as session:
            auth.touch_token(session, result.touch_token)
    return result.principal


SessionDep = Annotated[Session, Depends(db_session)]
DatabaseDep = Annotated[SessionSource, Depends(_database)]
PrincipalDep = Annotated[Principal, Depends(current_principal)]
Cursor = Annotated[
    str | None,
    Query(pattern=NO_NUL, max_length=512, description="next_cursor of the previous page"),
]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
DEFAULT_PAGE = DEFAULT_LIMIT
