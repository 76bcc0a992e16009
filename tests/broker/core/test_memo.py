"""broker.core.memo: values forgotten after this process commits a write to a watched class."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Integer, String, create_engine, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from broker.core.memo import Memo


class _Base(DeclarativeBase):
    pass


class Watched(_Base):
    __tablename__ = "watched"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(20))


class Other(_Base):
    __tablename__ = "other"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)


memo: Memo[str, str] = Memo("test-memo", (Watched,), most=3)


@pytest.fixture
def session() -> Iterator[Session]:
    engine = create_engine("sqlite://")
    _Base.metadata.create_all(engine)
    memo.forget()
    with Session(engine) as s:
        yield s
    engine.dispose()


def test_a_commit_writing_a_watched_row_forgets_everything(session: Session) -> None:
    memo.keep("k", "v", since=memo.generation)
    session.add(Other(id=1))
    session.commit()
    assert memo.get("k") == "v"  # another class: nothing forgotten
    session.add(Watched(id=1, name="a"))
    session.flush()
    assert memo.get("k") == "v"  # not before the commit
    session.commit()
    assert memo.get("k") is None


def test_updates_and_deletes_forget_too_but_bulk_statements_do_not(session: Session) -> None:
    session.add(Watched(id=1, name="a"))
    session.commit()
    memo.keep("k", "v", since=memo.generation)
    session.execute(update(Watched).where(Watched.id == 1).values(name="b"))
    session.commit()
    assert memo.get("k") == "v"
    row = session.get(Watched, 1)
    assert row is not None
    row.name = "c"
    session.commit()
    assert memo.get("k") is None
    memo.keep("k", "v", since=memo.generation)
    session.delete(row)
    session.commit()
    assert memo.get("k") is None


def test_a_value_read_before_a_forget_is_not_kept(session: Session) -> None:
    since = memo.generation
    memo.forget()  # another thread's commit, while this one was reading
    memo.keep("k", "stale", since=since)
    assert memo.get("k") is None


def test_a_value_read_in_a_session_with_uncommitted_writes_is_not_kept(session: Session) -> None:
    session.add(Watched(id=1, name="a"))
    session.flush()
    memo.keep("k", "uncommitted", since=memo.generation, session=session)
    assert memo.get("k") is None
    session.rollback()


def test_the_number_of_values_is_bounded(session: Session) -> None:
    for i in range(3):
        memo.keep(str(i), "v", since=memo.generation)
    memo.keep("3", "v", since=memo.generation)
    assert memo.get("3") == "v" and memo.get("0") is None
