"""What a real worker does with trials that are cancelled, ask for a missing GPU, or see W&B keys."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import select

from services.db import session_scope
from services.migrate import upgrade
from services.models import EpochMetric, Trial
from tests.servers import WorkerProcess, fitscope, fitscope_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def env_and_worker(module_broker_url, tmp_path_factory):
    """One worker and database for the module's tests (each reads back its own experiment)."""
    tmp_path = tmp_path_factory.mktemp("worker")
    database_url = f"sqlite:///{tmp_path / 'fitscope.db'}"
    upgrade(database_url)
    env = fitscope_env(database_url=database_url, broker_url=module_broker_url, home=tmp_path,
                       FITSCOPE_METRICS_FLUSH_S="0.2")
    worker = WorkerProcess(env, tmp_path / "worker.log")
    worker.wait_ready()
    yield env, worker
    worker.stop()


def _write(tmp_path, text: str):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return str(path)


def _trials(engine, experiment_id: int):
    with session_scope(engine) as session:
        return session.scalars(select(Trial).where(Trial.experiment_id == experiment_id)
                               .order_by(Trial.ordinal)).all()


def test_cancel_stops_the_running_trial_keeps_its_rows_and_never_starts_the_rest(env_and_worker, engine_for, tmp_path):
    env, worker = env_and_worker
    spec = _write(tmp_path, "name: long\nfuse: false\nseeds: [0, 1, 2]\nparameters:\n  epochs: {value: 3000}\n"
                            "  n_train: {value: 400}\n")
    submitted = fitscope("submit", spec, "--json", env=env)
    assert submitted.returncode == 0, submitted.stderr
    experiment_id = json.loads(submitted.stdout)["experiment_id"]
    engine = engine_for(env["FITSCOPE_DATABASE_URL"])
    deadline = time.monotonic() + 60
    while not any(t.status == "running" and t.epochs_done >= 2 for t in _trials(engine, experiment_id)):
        assert time.monotonic() < deadline, worker.log()[-2000:]
        time.sleep(0.1)

    cancelled = fitscope("cancel", str(experiment_id), env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert "2 queued trials cancelled, 1 running trials asked to stop" in cancelled.stdout
    deadline = time.monotonic() + 30
    while any(t.status == "running" for t in _trials(engine, experiment_id)):
        assert time.monotonic() < deadline, worker.log()[-2000:]
        time.sleep(0.1)

    running, *queued = _trials(engine, experiment_id)
    assert running.status == "cancelled" and 2 <= running.epochs_done < 3000
    with session_scope(engine) as session:
        epochs = session.scalars(select(EpochMetric.epoch).where(EpochMetric.trial_id == running.id)).all()
    assert sorted(epochs) == list(range(1, running.epochs_done + 1))
    assert [(t.status, t.started_at, t.attempts) for t in queued] == [("cancelled", None, 0)] * 2


def test_a_cuda_trial_on_a_worker_without_a_gpu_fails_with_one_sentence(env_and_worker, engine_for, tmp_path):
    env, worker = env_and_worker
    spec = _write(tmp_path, "name: gpu\nparameters:\n  device: {value: auto}\n  epochs: {value: 2}\n")
    submitted = fitscope("submit", spec, "--wait", "--timeout", "120", "--json", env=env)
    assert submitted.returncode == 0, submitted.stderr
    engine = engine_for(env["FITSCOPE_DATABASE_URL"])
    [trial] = _trials(engine, json.loads(submitted.stdout)["experiment_id"])
    assert trial.status == "succeeded"  # auto falls back to the CPU

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the failure path needs one without")
    from worker.jobs import execute_job

    spec = _write(tmp_path, "name: cuda\nparameters:\n  device: {value: cuda}\n")
    submitted = fitscope("submit", spec, "--json", env=env)  # goes to the gpu queue: no worker takes it
    trial_id = json.loads(submitted.stdout)["trial_ids"][0]
    with session_scope(engine) as session:
        assert session.get(Trial, trial_id).queue == "gpu"
    assert execute_job(engine, [trial_id], worker="cpu-only", redelivered=False) == {str(trial_id): "failed"}
    with session_scope(engine) as session:
        error = session.get(Trial, trial_id).error
    assert "cuda" in error.lower() and "\n" not in error.strip()


def test_validate_counts_trials_and_warns_about_wandb_keys(migrated_sqlite_url, broker_url, tmp_path):
    env = fitscope_env(database_url=migrated_sqlite_url, broker_url=broker_url, home=tmp_path)
    spec = _write(tmp_path, "name: w\nprogram: train.py\nmethod: grid\nseeds: [0, 1, 2]\n"
                            "parameters:\n  width: {values: [4, 8]}\n  lr: {values: [0.1, 0.01]}\n")
    result = fitscope("validate", spec, "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["trials"] == 12
    assert "program" in result.stderr and "warning" in result.stderr
    missing = fitscope("validate", str(tmp_path / "nope.yaml"), env=env)
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr


def test_torch_is_loaded_only_in_the_training_processes_never_before_the_fork(env_and_worker):
    _env, worker = env_and_worker
    parent = worker.process.pid
    children = [int(pid) for pid in open(f"/proc/{parent}/task/{parent}/children").read().split()]
    assert children, "the prefork pool has no training process"

    def loads_torch(pid: int) -> bool:
        with open(f"/proc/{pid}/maps") as maps:
            return "libtorch" in maps.read()

    assert not loads_torch(parent), "the worker's parent process loaded torch before forking its pool"
    assert all(loads_torch(child) for child in children)
