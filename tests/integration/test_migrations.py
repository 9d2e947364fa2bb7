"""The schema is made only by the migrations, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import inspect, text

from services.db import SchemaNotAtHead
from services.migrate import current_revision, ensure_schema_at_head, head_revision, upgrade
from tests.servers import REPO, fitscope_env

pytestmark = pytest.mark.integration

TABLES = {"experiments", "trials", "epoch_metrics", "trial_artifacts", "datasets", "alembic_version"}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_empty_to_head_creates_every_table(kind, request, engine_for):
    url = request.getfixturevalue("sqlite_url" if kind == "sqlite" else "postgres_url")
    engine = engine_for(url)
    with pytest.raises(SchemaNotAtHead, match="fitscope db upgrade"):
        ensure_schema_at_head(engine)
    upgrade(url)
    assert TABLES <= set(inspect(engine).get_table_names())
    assert current_revision(engine) == head_revision()
    ensure_schema_at_head(engine)
    uniques = {tuple(u["column_names"]) for u in inspect(engine).get_unique_constraints("epoch_metrics")}
    assert ("trial_id", "epoch") in uniques


def test_sqlite_runs_in_wal_mode_with_busy_timeout(migrated_sqlite_url, engine_for):
    engine = engine_for(migrated_sqlite_url)
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() >= 10_000
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_alembic_check_finds_no_drift_between_models_and_migrations(kind, request):
    url = request.getfixturevalue("sqlite_url" if kind == "sqlite" else "postgres_url")
    upgrade(url)
    env = {"FITSCOPE_DATABASE_URL": url, "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "alembic", "check"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No new upgrade operations detected" in result.stdout + result.stderr


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_two_db_upgrades_started_at_once_both_succeed(kind, request, engine_for, tmp_path):
    url = request.getfixturevalue("sqlite_url" if kind == "sqlite" else "postgres_url")
    env = fitscope_env(database_url=url, broker_url="redis://127.0.0.1:1/0", home=tmp_path)
    processes = [subprocess.Popen([sys.executable, "-m", "services.cli", "db", "upgrade"], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    engine = engine_for(url)
    assert current_revision(engine) == head_revision()
    assert TABLES <= set(inspect(engine).get_table_names())


def test_old_schema_is_refused_with_the_command_that_fixes_it(migrated_sqlite_url, engine_for):
    engine = engine_for(migrated_sqlite_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'older'"))
    with pytest.raises(SchemaNotAtHead, match=r"revision older.*fitscope db upgrade"):
        ensure_schema_at_head(engine)
