"""Fused jobs through the real system: the CLI submits, a real Valkey broker carries one run_job
message per group of trials that share a fusion key, a real `fitscope worker` trains each as one stack
and writes SQLite rows. Every trial must end once, with one row per epoch."""

from __future__ import annotations

import json
import re
import time

import pytest
from sqlalchemy import select

from services.db import session_scope
from services.models import EpochMetric, Trial
from tests.servers import WorkerProcess, fitscope, fitscope_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS = 4
# Three seeds x two norms: the three trials of each norm share a fusion key (the layers differ between
# norms), so two jobs of three; batch norm keeps each trial's running statistics in the stack.
SPEC = f"""name: fused-and-not
seeds: [0, 1, 2]
parameters:
  norm: {{values: [none, batch]}}
  lr: {{value: 0.02}}
  width: {{value: 8}}
  n_train: {{value: 64}}
  n_val: {{value: 32}}
  n_test: {{value: 32}}
  epochs: {{value: {EPOCHS}}}
"""


def _job_sizes(log: str) -> list[int]:
    """How many trials each finished job trained (from Celery's "succeeded in" line and its result)."""
    return sorted(result.count(":") for result in
                  re.findall(r"Task fitscope\.run_job\[[^\]]+\] succeeded in [\d.]+s: (\{[^}]*\})", log))


@pytest.fixture
def env_and_worker(request, migrated_sqlite_url, broker_url, tmp_path):
    """A worker whose metrics flush every ``flush_s`` seconds (indirect parameter, default 0: every
    epoch goes through the job's batched write)."""
    flush_s = getattr(request, "param", "0")
    env = fitscope_env(database_url=migrated_sqlite_url, broker_url=broker_url, home=tmp_path,
                       FITSCOPE_METRICS_FLUSH_S=flush_s)
    worker = WorkerProcess(env, tmp_path / "worker.log", "--name", f"fused@{tmp_path.name}")
    worker.wait_ready()
    yield env, worker
    worker.stop()


def test_a_fusable_grid_runs_as_one_job_and_every_trial_ends_once(env_and_worker, migrated_sqlite_url,
                                                                  engine_for, tmp_path):
    env, worker = env_and_worker
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    submitted = fitscope("submit", str(spec), "--wait", "--timeout", "180", "--json", env=env)
    assert submitted.returncode == 0, submitted.stderr + worker.log()[-3000:]
    trial_ids = json.loads(submitted.stdout)["trial_ids"]

    engine = engine_for(migrated_sqlite_url)
    with session_scope(engine) as session:
        trials = session.scalars(select(Trial).where(Trial.id.in_(trial_ids)).order_by(Trial.ordinal)).all()
        epochs = {trial.id: sorted(session.scalars(select(EpochMetric.epoch).where(EpochMetric.trial_id == trial.id)))
                  for trial in trials}
    assert [(t.status, t.attempts, t.epochs_done) for t in trials] == [("succeeded", 1, EPOCHS)] * 6
    assert all(rows == list(range(1, EPOCHS + 1)) for rows in epochs.values()), epochs
    fused = [t for t in trials if t.config["norm"] == "none"]
    batch_norm = [t for t in trials if t.config["norm"] == "batch"]
    assert len(fused) == len(batch_norm) == 3
    # Same result shape both ways: every final metric, a verdict, the prediction artifact's data.
    assert all(t.final_metrics.keys() == batch_norm[0].final_metrics.keys() and t.verdict for t in trials)
    assert len({t.final_metrics["final_val_loss"] for t in fused}) == 3  # three seeds, three models
    assert len({t.final_metrics["final_val_loss"] for t in batch_norm}) == 3
    # How many trials shared the model each trial trained in: shown on its dashboard page.
    assert [t.final_metrics["trained_with"] for t in trials] == [3] * 6

    log = worker.log()
    assert len(re.findall(r"Task fitscope\.run_job\[[^\]]+\] received", log)) == 2, log[-3000:]
    assert _job_sizes(log) == [3, 3], log[-3000:]
    assert "job of 3 trials trained" in log
    assert len({t.worker for t in fused}) == 1

    # `fitscope requeue` plans the re-run as the submission did: two jobs of three again.
    experiment_id = json.loads(submitted.stdout)["experiment_id"]
    requeued = fitscope("requeue", str(experiment_id), "--status", "succeeded", env=env)
    assert requeued.returncode == 0 and "6 trials re-queued" in requeued.stdout, requeued.stderr
    deadline = time.monotonic() + 120
    while True:
        with session_scope(engine) as session:
            again = session.scalars(select(Trial).where(Trial.id.in_(trial_ids))).all()
        if all(t.status == "succeeded" for t in again):
            break
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.2)
    log = worker.log()
    assert len(re.findall(r"Task fitscope\.run_job\[[^\]]+\] received", log)) == 4, log[-3000:]
    assert _job_sizes(log) == [3, 3, 3, 3], log[-3000:]


# Rows are written only every 600 s, so the cancel must come from the job's per-epoch flag read.
@pytest.mark.parametrize("env_and_worker", ["600"], indirect=True)
def test_a_cancel_stops_every_trial_of_a_running_fused_job_within_an_epoch(env_and_worker, migrated_sqlite_url,
                                                                          engine_for, tmp_path):
    env, worker = env_and_worker
    spec = tmp_path / "long.yaml"
    spec.write_text("name: long-fused\nseeds: [0, 1, 2]\nparameters:\n  epochs: {value: 5000}\n"
                    "  width: {value: 8}\n  n_train: {value: 64}\n")
    submitted = fitscope("submit", str(spec), "--json", env=env)
    assert submitted.returncode == 0, submitted.stderr
    experiment_id = json.loads(submitted.stdout)["experiment_id"]
    engine = engine_for(migrated_sqlite_url)

    def trials():
        with session_scope(engine) as session:
            return session.scalars(select(Trial).where(Trial.experiment_id == experiment_id)).all()

    deadline = time.monotonic() + 60
    while not all(t.status == "running" for t in trials()):
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.1)
    time.sleep(1.0)  # a few epochs (no rows reach the database before the job ends: flush is 600 s)
    assert fitscope("cancel", str(experiment_id), env=env).returncode == 0
    deadline = time.monotonic() + 30
    while any(t.status == "running" for t in trials()):
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.1)
    ended = trials()
    assert [t.status for t in ended] == ["cancelled"] * 3 and all(1 <= t.epochs_done < 5000 for t in ended)
    with session_scope(engine) as session:
        for trial in ended:
            epochs = session.scalars(select(EpochMetric.epoch).where(EpochMetric.trial_id == trial.id)).all()
            assert sorted(epochs) == list(range(1, trial.epochs_done + 1))
    assert len(re.findall(r"Task fitscope\.run_job\[[^\]]+\] received", worker.log())) == 1


# Rows are written every epoch, so a kill leaves each trial some rows that its takeover must replace.
@pytest.mark.parametrize("env_and_worker", ["0"], indirect=True)
def test_a_fused_job_whose_training_process_is_killed_ends_every_trial_once_as_if_uninterrupted(
        env_and_worker, migrated_sqlite_url, engine_for, tmp_path):
    from services.trial_config import TrialConfig
    from tests.integration.test_kill_resume import _kill_training_process
    from worker.training.fused import train_fused

    env, worker = env_and_worker
    epochs = 400
    spec = tmp_path / "killed.yaml"
    spec.write_text(f"name: killed-fused\nseeds: [0, 1, 2]\nparameters:\n  epochs: {{value: {epochs}}}\n"
                    "  width: {value: 8}\n  n_train: {value: 64}\n  dropout: {value: 0.1}\n")
    submitted = fitscope("submit", str(spec), "--json", env=env)
    assert submitted.returncode == 0, submitted.stderr
    trial_ids = json.loads(submitted.stdout)["trial_ids"]
    engine = engine_for(migrated_sqlite_url)

    def trials() -> list[Trial]:
        with session_scope(engine) as session:
            return session.scalars(select(Trial).where(Trial.id.in_(trial_ids)).order_by(Trial.ordinal)).all()

    deadline = time.monotonic() + 60
    while not all(t.status == "running" and t.epochs_done >= 20 for t in trials()):
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.02)
    _kill_training_process(trials()[0], worker)  # the job's one training process: all three die

    deadline = time.monotonic() + 120
    while not all(t.status == "succeeded" for t in trials()):
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.1)
    ended = trials()
    assert [t.attempts for t in ended] == [2, 2, 2]
    with session_scope(engine) as session:
        for trial in ended:
            rows = sorted(session.scalars(select(EpochMetric.epoch).where(EpochMetric.trial_id == trial.id)))
            assert rows == list(range(1, epochs + 1)), trial.id
    # The re-delivered job starts its trials over, with the same companions: as if never killed.
    uninterrupted = train_fused([TrialConfig.model_validate(t.config) for t in ended])
    for trial, expected in zip(ended, uninterrupted, strict=True):
        assert trial.final_metrics["final_val_loss"] == pytest.approx(
            expected.final_metrics["final_val_loss"], rel=1e-6)
