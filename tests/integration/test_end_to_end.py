"""A grid goes from YAML through the real CLI, a real Valkey broker and a real `fitscope worker` process
to rows in a real database: SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import json
import re
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from services.config import Settings
from services.db import session_scope
from services.migrate import upgrade
from services.models import EpochMetric, Experiment, Trial
from services.queue import enqueue_jobs, make_celery
from tests.servers import REPO, WorkerProcess, fitscope, fitscope_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUICKSTART = REPO / "examples" / "quickstart.yaml"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack_database_url(request, tmp_path_factory):
    """A migrated database of each kind that the module's worker writes to (each test reads back its
    own experiment)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('end-to-end') / 'fitscope.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database(f"fitscope_e2e_{uuid.uuid4().hex[:12]}")
    upgrade(url)
    return url


@pytest.fixture(scope="module")
def stack(stack_database_url, module_broker_url, tmp_path_factory):
    """The environment a user would have, plus one running worker, shared by the module's tests of
    each database kind (a worker costs seconds to start)."""
    tmp_path = tmp_path_factory.mktemp("stack")
    env = fitscope_env(database_url=stack_database_url, broker_url=module_broker_url, home=tmp_path / "home")
    worker = WorkerProcess(env, tmp_path / "worker.log", "--name", f"w1@{tmp_path.name}")
    worker.wait_ready()
    yield env, worker
    worker.stop()


def _rows(engine, model):
    with session_scope(engine) as session:
        return session.scalar(select(func.count()).select_from(model))


def test_a_grid_runs_end_to_end_through_the_cli(stack, stack_database_url, engine_for, tmp_path):
    env, worker = stack
    database_url = stack_database_url
    validated = fitscope("validate", str(QUICKSTART), env=env)
    assert validated.returncode == 0, validated.stderr
    expected_trials = int(re.search(r"(\d+) trials", validated.stdout).group(1))
    assert expected_trials >= 4

    submitted = fitscope("submit", str(QUICKSTART), "--wait", "--json", "--timeout", "240", env=env)
    assert submitted.returncode == 0, submitted.stderr + worker.log()[-3000:]
    payload = json.loads(submitted.stdout)
    experiment_id = payload["experiment_id"]
    assert len(payload["trial_ids"]) == expected_trials
    assert payload["summary"]["counts"]["succeeded"] == expected_trials
    assert payload["summary"]["finished"] is True

    engine = engine_for(database_url)
    with session_scope(engine) as session:
        trials = session.scalars(select(Trial).where(Trial.experiment_id == experiment_id)).all()
        for trial in trials:
            epochs = [row.epoch for row in session.scalars(
                select(EpochMetric).where(EpochMetric.trial_id == trial.id).order_by(EpochMetric.epoch))]
            assert trial.status == "succeeded", trial.error
            assert epochs == list(range(1, trial.config["epochs"] + 1))
            assert trial.worker and trial.worker.startswith("w1@")
            assert trial.final_metrics["final_val_loss"] > 0
            assert trial.started_at is not None and trial.finished_at is not None
            assert trial.attempts == 1

    status = fitscope("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    [listed] = [e for e in json.loads(status.stdout) if e["id"] == experiment_id]
    assert listed["counts"]["succeeded"] == expected_trials and listed["progress"] == 1.0

    out = tmp_path / "epochs.csv"
    exported = fitscope("export", str(experiment_id), "--what", "epochs", "--format", "csv", "-o", str(out),
                        env=env)
    assert exported.returncode == 0, exported.stderr
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(t.config["epochs"] for t in trials)
    assert {"trial_id", "epoch", "train_loss", "val_loss", "val_accuracy"} <= set(rows[0])


def test_a_redelivered_task_for_a_finished_trial_writes_nothing(stack, stack_database_url, engine_for):
    env, worker = stack
    database_url, broker_url = stack_database_url, env["FITSCOPE_BROKER_URL"]
    submitted = fitscope("submit", str(QUICKSTART), "--wait", "--json", "--timeout", "240", env=env)
    assert submitted.returncode == 0, submitted.stderr
    trial_ids = json.loads(submitted.stdout)["trial_ids"]
    engine = engine_for(database_url)
    before = _snapshot(engine)

    def skipped() -> int:  # in this test's part of the shared worker's log
        return worker.log()[logged:].count("'skipped'")

    logged = len(worker.log())
    producer = make_celery(Settings(broker_url=broker_url, database_url=database_url))
    enqueue_jobs(producer, [([trial_id], "cpu") for trial_id in trial_ids])
    deadline = time.monotonic() + 60
    while skipped() < len(trial_ids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert skipped() == len(trial_ids), worker.log()[-3000:]
    assert _snapshot(engine) == before


def _snapshot(engine):
    with session_scope(engine) as session:
        trials = session.execute(select(Trial.id, Trial.status, Trial.attempts, Trial.finished_at,
                                        Trial.final_metrics).order_by(Trial.id)).all()
        epochs = session.execute(select(EpochMetric.id, EpochMetric.trial_id, EpochMetric.epoch,
                                        EpochMetric.val_loss).order_by(EpochMetric.id)).all()
    return [tuple(row) for row in trials], [tuple(row) for row in epochs]


def test_an_invalid_spec_writes_nothing_and_exits_2(database_url, broker_url, tmp_path, engine_for):
    env = fitscope_env(database_url=database_url, broker_url=broker_url, home=tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmethod: grid\nparameters:\n  lr: {values: [0.1, -1]}\n")
    result = fitscope("submit", str(bad), env=env)
    assert result.returncode == 2
    assert "parameters.lr.values[1]" in result.stderr
    assert "Traceback" not in result.stderr
    engine = engine_for(database_url)
    assert _rows(engine, Experiment) == 0 and _rows(engine, Trial) == 0


def test_a_dead_broker_is_one_sentence_and_writes_nothing(migrated_sqlite_url, tmp_path, engine_for):
    from services.broker import free_port

    env = fitscope_env(database_url=migrated_sqlite_url, broker_url=f"redis://127.0.0.1:{free_port()}/0",
                       home=tmp_path)
    result = fitscope("submit", str(QUICKSTART), env=env, timeout=60)
    assert result.returncode == 2
    assert "cannot reach the broker at redis://127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr
    assert _rows(engine_for(migrated_sqlite_url), Experiment) == 0


def test_a_schema_not_at_head_names_the_fix(sqlite_url, broker_url, tmp_path):
    env = fitscope_env(database_url=sqlite_url, broker_url=broker_url, home=tmp_path)
    result = fitscope("status", env=env)
    assert result.returncode == 2
    assert "run `fitscope db upgrade`" in result.stderr
    assert not Path(sqlite_url.removeprefix("sqlite:///")).exists()  # a command that reads creates nothing


@pytest.mark.parametrize(("make_args", "expected"), [
    (lambda tmp: ("validate", str(tmp)), "is a folder; pass the path of a YAML grid spec"),
    (lambda tmp: ("export", "1", "-o", str(tmp)), "is a folder; give a file name"),
    (lambda tmp: ("export", "1", "-o", str(tmp / "missing" / "x.csv")), "does not exist; create it"),
])
def test_user_errors_on_paths_are_one_sentence(migrated_sqlite_url, broker_url, tmp_path, make_args, expected):
    env = fitscope_env(database_url=migrated_sqlite_url, broker_url=broker_url, home=tmp_path)
    if make_args(tmp_path)[0] == "export":  # an experiment to export
        assert fitscope("submit", str(QUICKSTART), env=env).returncode == 0
    result = fitscope(*make_args(tmp_path), env=env)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_a_sqlite_folder_that_cannot_be_made_is_one_sentence(broker_url, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    env = fitscope_env(database_url=f"sqlite:///{blocker}/sub/x.db", broker_url=broker_url, home=tmp_path)
    result = fitscope("db", "upgrade", env=env)  # the command that creates the database and its folders
    assert result.returncode == 2
    assert "cannot create the folder of the SQLite file" in result.stderr and "Traceback" not in result.stderr


def test_an_over_long_metric_name_is_refused_before_postgresql_would(tmp_path):
    from services.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match="metric.name: must be at most 100 characters"):
        parse_spec("name: m\nmetric: {name: " + "x" * 150 + "}\n")
