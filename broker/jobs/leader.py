"""Leader election for the periodic jobs: of every scheduler on one database (the `govbroker
scheduler` process and each `serve` replica with the embedded scheduler), one leads and runs the
jobs; the others keep trying, so one of them takes over when the leader goes.

PostgreSQL: a session-level `pg_try_advisory_lock` on a connection of its own that stays open for
as long as the process leads. The server drops the lock when that connection ends, so a leader
that crashes, is killed or loses the network is replaced without waiting for any lease.

SQLite (one host, no advisory locks): a row in `scheduler_lease` that the leader renews; it lapses
`scheduler_lease_seconds` after the last renewal. Taking it is one upsert whose condition (absent,
lapsed, or already ours) is evaluated by the database, so two contenders can never both win.

Leadership keeps the jobs from running twice at once in the normal case; it is not a fence. A
leader cut off from the database may finish a job it started after a successor began, which is
why every job is also safe to run twice (see registry.py).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, Table, case, create_engine, delete, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from broker.core import clock
from broker.core.settings import get_settings
from broker.jobs.models import SchedulerLease

log = structlog.get_logger(__name__)

DEFAULT_NAME = "scheduler"
_LEASES: Table = SchedulerLease.__table__  # type: ignore[attr-defined]

LeadershipListener = Callable[[bool], None]


def advisory_key(name: str) -> int:
    """The bigint PostgreSQL advisory-lock key for a leadership name: fixed for a name, so every
    replica of every version contends for the same lock."""
    digest = hashlib.blake2b(f"govbroker:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def holder_id() -> str:
    """hostname:pid:random. The random part tells apart two processes that reuse a pid (a
    restarted container), so a newcomer never mistakes a predecessor's lease for its own."""
    host = socket.gethostname()[:100]
    return f"{host}:{os.getpid()}:{secrets.token_hex(4)}"


class Leadership(ABC):
    """Whether this process leads the jobs on one database.

    `acquire()` is the only call a scheduler needs on each tick: it takes leadership if it is
    free, confirms (PostgreSQL) or renews (SQLite) it if already held, and answers whether this
    process leads now. It never blocks waiting for the leader to go. Thread-safe: the scheduler's
    worker threads share one instance.
    """

    def __init__(
        self,
        *,
        name: str = DEFAULT_NAME,
        holder: str | None = None,
        on_change: LeadershipListener | None = None,
    ) -> None:
        self.name = name
        self.holder = holder or holder_id()
        self._on_change = on_change
        self._leading = False
        self._lock = threading.Lock()

    @property
    def is_leader(self) -> bool:
        """What the last `acquire()` found; no database round trip."""
        return self._leading

    def acquire(self) -> bool:
        with self._lock:
            try:
                leading = self._try_acquire()
            except SQLAlchemyError as exc:
                # a database we cannot reach cannot tell us we lead: stop running jobs until it can
                log.warning("leadership check failed", leadership=self.name, error=str(exc))
                self._after_failure()
                leading = False
            self._record(leading)
            return leading

    def release(self) -> None:
        """Give up leadership (if held) so a follower takes over at its next try, and free the
        resources held for it. The instance may acquire again afterwards."""
        with self._lock:
            try:
                self._release()
            except SQLAlchemyError as exc:
                # PostgreSQL frees the lock with the connection and a lease lapses on its own
                log.warning("leadership release failed", leadership=self.name, error=str(exc))
            self._record(False, released=True)

    def _record(self, leading: bool, *, released: bool = False) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        if leading:
            log.info("leadership gained", leadership=self.name, holder=self.holder)
        elif released:
            log.info("leadership released", leadership=self.name, holder=self.holder)
        else:
            log.warning("leadership lost", leadership=self.name, holder=self.holder)
        if self._on_change is not None:
            self._on_change(leading)

    @abstractmethod
    def _try_acquire(self) -> bool:
        """Take, confirm or renew leadership; raise SQLAlchemyError if the database cannot say."""

    @abstractmethod
    def _release(self) -> None:
        """Give leadership up in the database and free what was held for it."""

    def _after_failure(self) -> None:  # noqa: B027 - a lease keeps no state to forget
        """Forget state that the failure may have made stale."""


class AdvisoryLockLeadership(Leadership):
    """PostgreSQL: leading = holding a session advisory lock on our own connection."""

    def __init__(
        self,
        engine: Engine,
        *,
        liveness_seconds: int,
        name: str = DEFAULT_NAME,
        holder: str | None = None,
        on_change: LeadershipListener | None = None,
    ) -> None:
        super().__init__(name=name, holder=holder, on_change=on_change)
        self.key = advisory_key(name)
        # Outside the application's pool: a pooled connection handed back with the lock still
        # held would make some unrelated request the silent owner of leadership. With NullPool,
        # closing the connection ends the session and so frees the lock.
        self._engine = create_engine(
            engine.url,
            poolclass=NullPool,
            connect_args=_keepalive_args(liveness_seconds, self.holder),
        )
        self._liveness_seconds = liveness_seconds
        self._connection: Connection | None = None

    def _try_acquire(self) -> bool:
        if self._connection is not None and not self._alive(self._connection):
            self._drop_connection()
            # the lock went with the session; a new connection has to win it again
            self._record(False)
        if self._connection is None:
            self._connection = self._connect()
        if self._leading:
            # the lock lives as long as the session that took it, which we just saw alive
            return True
        got = self._connection.execute(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}
        ).scalar_one()
        return bool(got)

    def _connect(self) -> Connection:
        connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        # Have the server, too, notice a leader that vanished without closing its socket (a
        # host that lost power), so its lock goes within about this long instead of the
        # kernel's default two hours.
        seconds = self._liveness_seconds
        connection.exec_driver_sql(f"SET tcp_keepalives_idle = {seconds}")
        connection.exec_driver_sql(f"SET tcp_keepalives_interval = {max(1, seconds // 3)}")
        connection.exec_driver_sql("SET tcp_keepalives_count = 3")
        return connection

    def _alive(self, connection: Connection) -> bool:
        try:
            connection.exec_driver_sql("SELECT 1")
        except SQLAlchemyError as exc:
            log.warning("leadership connection lost", leadership=self.name, error=str(exc))
            return False
        return True

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            # the connection is gone or going: do not try to talk to the server on the way out
            connection.invalidate()
            connection.close()
        except SQLAlchemyError:
            log.debug("closing a dead leadership connection failed", exc_info=True)

    def _after_failure(self) -> None:
        self._drop_connection()

    def _release(self) -> None:
        try:
            if self._connection is not None and self._leading:
                self._connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
        finally:
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.close()


class LeaseLeadership(Leadership):
    """SQLite (works on any backend with INSERT … ON CONFLICT): leading = holding an unexpired
    row in `scheduler_lease`, renewed on every acquire()."""

    def __init__(
        self,
        engine: Engine,
        *,
        lease_seconds: int,
        name: str = DEFAULT_NAME,
        holder: str | None = None,
        on_change: LeadershipListener | None = None,
    ) -> None:
        super().__init__(name=name, holder=holder, on_change=on_change)
        # BEGIN IMMEDIATE on SQLite, like every writing session: contenders queue on the write
        # lock instead of one failing on a snapshot that another's takeover made stale
        self._engine = engine.execution_options(sqlite_begin="IMMEDIATE")
        self.lease = timedelta(seconds=lease_seconds)

    def _try_acquire(self) -> bool:
        table = _LEASES
        insert = (sqlite if self._engine.dialect.name == "sqlite" else postgresql).insert
        at = clock.now()
        statement = insert(table).values(
            name=self.name, holder=self.holder, acquired_at=at, expires_at=at + self.lease
        )
        ours = table.c.holder == statement.excluded.holder
        statement = statement.on_conflict_do_update(
            index_elements=[table.c.name],
            set_={
                "holder": statement.excluded.holder,
                # a renewal keeps the time leadership began; a takeover starts it anew
                "acquired_at": case(
                    (ours, table.c.acquired_at), else_=statement.excluded.acquired_at
                ),
                "expires_at": statement.excluded.expires_at,
            },
            # the whole decision is in this condition, evaluated under the write lock
            where=ours | (table.c.expires_at <= at),
        )
        with self._engine.begin() as connection:
            connection.execute(statement)
            holder = connection.execute(
                select(table.c.holder).where(table.c.name == self.name)
            ).scalar_one()
        return bool(holder == self.holder)

    def _release(self) -> None:
        table = _LEASES
        with self._engine.begin() as connection:
            connection.execute(
                delete(table).where(table.c.name == self.name, table.c.holder == self.holder)
            )


def _keepalive_args(seconds: int, holder: str) -> dict[str, Any]:
    """libpq options for the leadership connection: a dead server or network shows up as an
    error within about `seconds` rather than as a query that hangs, and pg_stat_activity names
    the leader (application_name is cut at 63 bytes by the server)."""
    return {
        "application_name": f"govbroker-scheduler {holder}"[:63],
        "connect_timeout": max(2, seconds),
        "keepalives": 1,
        "keepalives_idle": seconds,
        "keepalives_interval": max(1, seconds // 3),
        "keepalives_count": 3,
        "tcp_user_timeout": seconds * 1000,
    }


def leadership_for(
    engine: Engine,
    *,
    name: str = DEFAULT_NAME,
    lease_seconds: int | None = None,
    holder: str | None = None,
    on_change: LeadershipListener | None = None,
) -> Leadership:
    """The leadership that fits the engine's database: an advisory lock on PostgreSQL, a lease
    row elsewhere. `lease_seconds` defaults to the scheduler_lease_seconds setting; on
    PostgreSQL it bounds how long a dead connection goes unnoticed."""
    seconds = lease_seconds if lease_seconds is not None else get_settings().scheduler_lease_seconds
    if engine.dialect.name == "postgresql":
        return AdvisoryLockLeadership(
            engine, liveness_seconds=seconds, name=name, holder=holder, on_change=on_change
        )
    return LeaseLeadership(
        engine, lease_seconds=seconds, name=name, holder=holder, on_change=on_change
    )
