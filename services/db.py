"""Engine, sessions and the schema check. Every dialect difference lives in this module.

``session_scope`` is the only place that commits: helpers take a session and never commit, so
several writes (an experiment and all its trials) share one transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, MetaData, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Session

# Stable constraint names, so migrations can refer to them on every dialect.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SQLITE_BUSY_TIMEOUT_MS = 30_000
PG_CONNECT_TIMEOUT_S = 10


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class SchemaNotAtHead(RuntimeError):
    """The database schema is older (or newer) than this code; the message names the fix."""


class DatabaseUnreachable(RuntimeError):
    """The database URL does not answer; the message names the URL and what to check."""


def dumps_json(value) -> str:
    """JSON columns' text: orjson where it can (a trial's artifacts, ~100 KB of floats, took the
    standard encoder ~1.7 ms, 1% of a small trial's time; orjson ~0.2 ms), else the standard encoder,
    so anything orjson refuses (a numpy scalar, a huge int) is written as before. Non-finite floats,
    which JSON does not have, become null (callers store them as None already)."""
    import orjson

    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # orjson.JSONEncodeError is one
        return json.dumps(value)


def make_engine(url: str, **kwargs) -> Engine:
    """An engine for ``url`` with fitscope's pragmas: SQLite gets WAL and a busy timeout. JSON columns
    are written by :func:`dumps_json`."""
    kwargs.setdefault("json_serializer", dumps_json)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            try:
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatabaseUnreachable(
                    f"cannot create the folder of the SQLite file {database} ({exc.strerror}); "
                    "check FITSCOPE_DATABASE_URL or FITSCOPE_HOME"
                ) from None
        engine = create_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}, **kwargs
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # A server that does not answer (a dropped packet, a TLS handshake with a plain port) fails
    # within PG_CONNECT_TIMEOUT_S instead of hanging; the URL's own connect_timeout wins.
    connect_args = {} if "connect_timeout" in parsed.query else {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    connect_args.update(kwargs.pop("connect_args", {}))  # a caller's own (worker/presence.py: 5 s) win
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args, **kwargs)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL is durable across application crashes in WAL mode; only an OS crash can lose the tail.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception."""
    session = Session(bind=engine, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def insert_ignoring_conflicts(session: Session, model: type[Base]):
    """INSERT ... ON CONFLICT DO NOTHING for this session's dialect (SQLite or PostgreSQL): a row whose
    unique key is already there is skipped, not an error. Execute it with one dict or a list of them."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    # On the Table, not the ORM class: the ORM's bulk INSERT compiles the statement anew at every call
    # (~0.5 ms, as much as running it). A plain Core INSERT is compiled once and cached, but SQLAlchemy
    # 2.0 cannot cache the dialects' ON CONFLICT clause ("[no key]" in its echo log), so this one is
    # still compiled at each execution (~0.3 ms).
    return dialect_insert(model.__table__).on_conflict_do_nothing()


def insert_if_absent(session: Session, model: type[Base], values: dict) -> None:
    """Two transactions storing the same content-addressed row at the same moment both succeed, and
    one row remains."""
    session.execute(insert_ignoring_conflicts(session, model).values(**values))


def db_now(session: Session) -> datetime:
    """The database server's clock, as an aware UTC datetime. Workers on several machines compare
    heartbeats against this one clock, so their own clocks may drift. (PostgreSQL's now() is the
    transaction's start; SQLite's clock is the local one, to the millisecond.)"""
    if session.get_bind().dialect.name == "postgresql":
        return session.scalar(text("SELECT now()")).astimezone(UTC)
    value = session.scalar(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')"))
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def describe_url(engine: Engine) -> str:
    """The engine's URL without its secrets (password, secret query values), for messages."""
    from services.safe_text import redact_url

    return redact_url(engine.url.render_as_string(hide_password=False))
