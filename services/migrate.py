"""Schema migrations: `fitscope db upgrade`, a lock so concurrent upgrades queue up, and the head check
every process runs before touching the database."""

from __future__ import annotations

import fcntl
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError

from services.db import DatabaseUnreachable, SchemaNotAtHead, describe_url

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# A fixed 63-bit key for pg_advisory_lock, derived from the project's name.
_PG_LOCK_KEY = int.from_bytes(hashlib.sha256(b"fitscope-migrations").digest()[:8], "big") >> 1


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision``; safe to run from several processes at once."""
    command.upgrade(alembic_config(url), revision)


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return script.get_current_head()


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except OperationalError as exc:
        raise DatabaseUnreachable(
            f"cannot reach the database at {describe_url(engine)} ({_reason(exc)}); "
            "check FITSCOPE_DATABASE_URL and that the server is running"
        ) from None


def ensure_schema_at_head(engine: Engine) -> None:
    """Refuse to run against a schema that is not at head, naming the command that fixes it."""
    current, head = current_revision(engine), head_revision()
    if current == head:
        return
    where = describe_url(engine)
    if current is None:
        raise SchemaNotAtHead(f"the database at {where} has no fitscope schema yet; run `fitscope db upgrade`")
    raise SchemaNotAtHead(
        f"the database at {where} is at schema revision {current}, this fitscope needs {head}; "
        "run `fitscope db upgrade` (or upgrade fitscope if the database is newer)"
    )


@contextmanager
def migration_lock(connection: Connection) -> Iterator[None]:
    """Serialise migrations: a PostgreSQL advisory lock, or a file lock beside a SQLite database."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
        connection.commit()  # the advisory lock is session-level: it outlives this transaction
        try:
            yield
        finally:
            connection.rollback()
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK_KEY})
            connection.commit()
        return
    database = connection.engine.url.database
    if connection.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _reason(exc: OperationalError) -> str:
    return str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
