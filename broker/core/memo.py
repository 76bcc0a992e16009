"""Short-lived process memories of what the database says, forgotten on this process's own writes.

A `Memo` keeps values read from the database (a token's principal, an agency's catalog) for the
callers to reuse while they judge them fresh enough (each caller bounds the staleness it allows,
and documents it). What the memo adds is that nothing survives a change this process makes:
- after any commit of a session that inserted, updated or deleted a row of a watched class
  through the ORM, every value is forgotten;
- a value read before such a forget is not kept (`keep` compares generations), nor one read in a
  session that has written a watched row it has not committed yet.
Bulk statements (`update(...)`, Core) are not seen: use them only for writes that cannot change
what the memo holds.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable
from typing import Any, Generic, TypeVar

from sqlalchemy import event
from sqlalchemy.orm import Mapper, object_session
from sqlalchemy.orm import Session as SASession

_WRITE_EVENTS = ("after_insert", "after_update", "after_delete")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    def __init__(self, name: str, watched: Iterable[type], *, most: int = 10_000) -> None:
        self._values: dict[K, V] = {}
        self._lock = threading.Lock()
        self._generation = 0
        self._most = most
        self._flag = f"govbroker.memo.{name}.written"
        for cls in watched:
            for name_ in _WRITE_EVENTS:
                event.listen(cls, name_, self._wrote)
        event.listen(SASession, "after_commit", self._after_commit)

    @property
    def generation(self) -> int:
        """Taken before reading what is to be kept, and handed to `keep`."""
        return self._generation

    def get(self, key: K) -> V | None:
        return self._values.get(key)

    def keep(self, key: K, value: V, *, since: int, session: SASession | None = None) -> None:
        """Remember `value`, read from the database after `generation` was `since` (in
        `session`), unless something was forgotten meanwhile or `session` has uncommitted
        writes to a watched class."""
        if session is not None and session.info.get(self._flag):
            return
        with self._lock:
            if since != self._generation:
                return
            if len(self._values) >= self._most:
                self._values.clear()  # a bound on memory, not on staleness: start over
            self._values[key] = value

    def forget(self) -> None:
        with self._lock:
            self._generation += 1
            self._values.clear()

    def _wrote(self, _mapper: Mapper[Any], _conn: Any, target: Any) -> None:
        session = object_session(target)
        if session is not None:
            session.info[self._flag] = True

    def _after_commit(self, session: SASession) -> None:
        if session.info.pop(self._flag, False):
            self.forget()
