"""What survives an outage: the broker killed and restarted with queued trials, and the database
stopped for 20 s while a worker trains. Real Valkey, real PostgreSQL, a real `fitscope worker`."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from sqlalchemy import Engine, select
from sqlalchemy.exc import OperationalError

from services.broker import free_port, start_embedded_broker
from services.config import Settings
from services.db import session_scope
from services.migrate import upgrade
from services.models import TERMINAL_STATUSES, EpochMetric, Trial
from services.queue import enqueue_submission, make_celery
from services.spec import parse_spec
from services.submission import submit
from tests.servers import (
    PostgresCluster,
    WorkerProcess,
    fitscope,
    fitscope_env,
    throwaway_postgres,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_S = 20


def _trials(engine: Engine, experiment_id: int | None = None) -> list[Trial]:
    with session_scope(engine) as session:
        query = select(Trial).order_by(Trial.id)
        if experiment_id is not None:
            query = query.where(Trial.experiment_id == experiment_id)
        return list(session.scalars(query))


def _epochs(engine: Engine, trial_id: int) -> list[int]:
    with session_scope(engine) as session:
        return sorted(session.scalars(select(EpochMetric.epoch).where(EpochMetric.trial_id == trial_id)))


def _wait_until(condition: Callable[[], bool], *, timeout: float, worker: WorkerProcess) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s; worker log:\n{worker.log()[-4000:]}"
        time.sleep(0.05)


def _trial_id_of(raw_message: bytes) -> int:
    """The trial id a queued job of one trial carries (its body is base64 JSON: [args, kwargs, embed])."""
    message = json.loads(raw_message)
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    [trial_id] = args[0]
    return trial_id


def _assert_each_ran_once_with_every_epoch(engine: Engine, trials: list[Trial]) -> None:
    for trial in trials:
        epochs = trial.config["epochs"]
        assert (trial.status, trial.attempts, trial.epochs_done) == ("succeeded", 1, epochs), trial.id
        assert _epochs(engine, trial.id) == list(range(1, epochs + 1)), trial.id  # none missing, none twice


def test_trials_queued_when_the_broker_dies_all_run_once_after_it_restarts(migrated_sqlite_url, engine_for,
                                                                           tmp_path: Path):
    data_dir, port = tmp_path / "valkey", free_port()
    broker = start_embedded_broker(data_dir=data_dir, port=port)
    worker = None
    try:
        # Fusing off: this is about one message per trial surviving the broker.
        env = fitscope_env(database_url=migrated_sqlite_url, broker_url=broker.url, home=tmp_path / "home",
                           FITSCOPE_FUSE="false")
        spec = tmp_path / "spec.yaml"
        spec.write_text(f"name: restart\nseeds: {list(range(20))}\nfuse: false\nparameters:\n"
                        "  epochs: {value: 3}\n  n_train: {value: 40}\n  n_val: {value: 40}\n"
                        "  n_test: {value: 20}\n  width: {value: 8}\n")
        submitted = fitscope("submit", str(spec), "--json", env=env)
        assert submitted.returncode == 0, submitted.stderr
        trial_ids = json.loads(submitted.stdout)["trial_ids"]
        assert len(trial_ids) == 20

        broker.kill()  # SIGKILL: no chance to flush anything; the append-only file has every message
        broker = start_embedded_broker(data_dir=data_dir, port=port)
        client = redis.Redis(host=broker.host, port=broker.port)
        queued = [_trial_id_of(raw) for raw in client.lrange("cpu", 0, -1)]
        client.close()
        assert sorted(queued) == trial_ids  # each trial's message, once

        worker = WorkerProcess(env, tmp_path / "worker.log")
        worker.wait_ready()
        engine = engine_for(migrated_sqlite_url)
        _wait_until(lambda: all(t.status in TERMINAL_STATUSES for t in _trials(engine)), timeout=180, worker=worker)
        trials = _trials(engine)
        assert [t.id for t in trials] == trial_ids
        _assert_each_ran_once_with_every_epoch(engine, trials)
        log = worker.log()
        assert log.count("succeeded in") == 20, log[-4000:]  # Celery's line per task: no message ran twice
        assert "'skipped'" not in log
    finally:
        if worker is not None:
            worker.stop()
        broker.stop()


@pytest.fixture
def own_postgres() -> Iterator[PostgresCluster]:
    """A cluster of this test's own: it is stopped and started again, which the shared one must never be."""
    yield from throwaway_postgres()


def _submit_without_sending(engine: Engine, text: str):
    """Write an experiment and its trials, as `fitscope submit` does, but send no message yet."""
    with session_scope(engine) as session:
        return submit(session, spec=parse_spec(text), spec_text=text, submitted_by="test", max_trials=100)


def _assert_each_finished_once_with_every_epoch(engine: Engine, trials: list[Trial]) -> None:
    """After an outage that re-queued jobs: every trial succeeded, with each epoch's row once (a
    re-queued job resumes from its checkpoint, at the cost of one attempt)."""
    for trial in trials:
        epochs = trial.config["epochs"]
        assert (trial.status, trial.epochs_done) == ("succeeded", epochs), trial.id
        assert _epochs(engine, trial.id) == list(range(1, epochs + 1)), trial.id


# Retry delays shortened to 1.7 s in all, far below the outage: the waits are settings, and a write
# goes on waiting (FITSCOPE_DB_WAIT_S) past the delays put together. With FITSCOPE_DB_WAIT_S below
# the outage too, jobs are re-queued again and again until the database is back, then resume.
@pytest.mark.parametrize("db_wait_s", [None, "4"], ids=["waits", "re-queues"])
def test_a_worker_waits_out_a_database_outage_and_loses_no_epoch(own_postgres: PostgresCluster, broker_url: str,
                                                                 engine_for, tmp_path: Path, db_wait_s):
    url = own_postgres.create_database("fitscope")
    upgrade(url)
    engine = engine_for(url)
    # Every epoch is written as it ends (flush 0), so the outage falls between epoch writes.
    waits = {"FITSCOPE_DB_WAIT_S": db_wait_s} if db_wait_s else {}
    env = fitscope_env(database_url=url, broker_url=broker_url, home=tmp_path / "home",
                       FITSCOPE_METRICS_FLUSH_S="0", FITSCOPE_DB_RETRY_DELAYS_S="[0.2, 0.5, 1]",
                       FITSCOPE_CHECKPOINT_EVERY_EPOCHS="5", **waits)
    worker = WorkerProcess(env, tmp_path / "worker.log", "--concurrency", "2")
    try:
        worker.wait_ready(processes=2)
        producer = make_celery(Settings(broker_url=broker_url))
        common = "parameters:\n  n_train: {value: 200}\n  width: {value: 16}\n"
        running = _submit_without_sending(engine, "name: running\nfuse: false\n" + common +
                                          "  epochs: {value: 300}\n")
        # One fused job of three trials, sent while the database is down.
        waiting = _submit_without_sending(engine, "name: waiting\nseeds: [0, 1, 2]\n" + common +
                                          "  epochs: {value: 60}\n")
        assert [len(ids) for ids, _ in waiting.jobs] == [3]
        enqueue_submission(producer, running)
        # Past its first checkpoint (epoch 5), so a re-queued attempt has one to resume from.
        _wait_until(lambda: _trials(engine, running.experiment_id)[0].epochs_done >= 6, timeout=60, worker=worker)

        own_postgres.stop("fast")
        stopped = time.monotonic()
        # The idle training process takes the job and must wait to claim it.
        enqueue_submission(producer, waiting)
        client = redis.Redis.from_url(broker_url)
        _wait_until(lambda: client.llen("cpu") == 0, timeout=OUTAGE_S - 5, worker=worker)
        client.close()
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped)))
        assert "database write failed" in worker.log()  # the outage was seen while it lasted
        own_postgres.start()

        _wait_until(lambda: all(t.status in TERMINAL_STATUSES for t in _trials(engine)), timeout=180, worker=worker)
        trials = _trials(engine)
        assert len(trials) == 4
        log = worker.log()
        assert log.count("database write failed") >= 2, log[-4000:]  # both the epoch write and the claim waited
        assert "Traceback" not in log and "raised unexpected" not in log, log[-4000:]
        if db_wait_s is None:  # waited out in place: no job re-queued, no attempt spent
            _assert_each_ran_once_with_every_epoch(engine, trials)
            assert log.count("succeeded in") == 2 and "re-queueing it" not in log, log[-4000:]
        else:
            _assert_each_finished_once_with_every_epoch(engine, trials)
            assert "re-queueing it" in log and "resumes after epoch" in log, log[-4000:]
            assert log.count("succeeded in") >= 2, log[-4000:]
    finally:
        worker.stop()


# --- the claim at the start of a task, with the outage injected (fast, in-process) ---------------


class _Requeued(Exception):
    pass


class _Task:
    """The little of a bound Celery task that run_job reads: its request, and retry() to re-queue."""

    def __init__(self) -> None:
        self.request = SimpleNamespace(hostname="test@host", delivery_info={"redelivered": False})
        self.retries: list[dict] = []

    def retry(self, **kwargs) -> Exception:
        self.retries.append(kwargs)
        return _Requeued()


@pytest.fixture
def tasks_on(migrated_sqlite_url, monkeypatch, engine_for):
    """worker.tasks pointed at a fresh database, with its backoff shortened and the training replaced
    by a report of the claims it was given (the claim is what these tests are about)."""
    import worker.jobs as jobs
    import worker.tasks as tasks

    monkeypatch.setenv("FITSCOPE_DATABASE_URL", migrated_sqlite_url)
    monkeypatch.setenv("FITSCOPE_DB_RETRY_DELAYS_S", "[0.01]")
    monkeypatch.setenv("FITSCOPE_DB_WAIT_S", "0.03")
    monkeypatch.setattr(jobs.JobRun, "run", lambda self: {
        trial_id: f"ran attempt {claim.attempt}" for trial_id, claim in self.job.claims.items()})
    tasks.reset_process_state()
    engine = engine_for(migrated_sqlite_url)
    [trial_id] = _submit_without_sending(engine, "name: claim\nparameters:\n  epochs: {value: 2}\n").trial_ids
    from services.config import get_settings

    get_settings.cache_clear()  # the submit read the settings before the test's were set
    yield jobs, tasks, engine, trial_id
    tasks.reset_process_state()


def _outage(jobs, monkeypatch, *, failures: int, commit_first: bool = False) -> list[int]:
    """Make the claim fail ``failures`` times, as a database that is down does; with ``commit_first``
    the first failure happens after the claim committed, as when the connection drops on COMMIT."""
    real_claim, calls = jobs.claim_job, []

    def flaky_claim(session, *args, **kwargs):
        calls.append(1)
        if len(calls) <= failures:
            if commit_first and len(calls) == 1:
                real_claim(session, *args, **kwargs)
                session.commit()
            raise OperationalError("UPDATE trials", {}, Exception("connection refused"))
        return real_claim(session, *args, **kwargs)

    monkeypatch.setattr(jobs, "claim_job", flaky_claim)
    return calls


def test_a_claim_waits_out_a_short_outage(tasks_on, monkeypatch):
    jobs, tasks, engine, trial_id = tasks_on
    calls = _outage(jobs, monkeypatch, failures=2)
    assert tasks.run_job(_Task(), [trial_id]) == {str(trial_id): "ran attempt 1"}
    assert len(calls) == 3
    [trial] = _trials(engine)
    assert (trial.status, trial.attempts) == ("running", 1)


def test_a_claim_that_committed_before_the_connection_dropped_is_taken_over_not_skipped(tasks_on, monkeypatch):
    jobs, tasks, engine, trial_id = tasks_on
    _outage(jobs, monkeypatch, failures=1, commit_first=True)
    assert tasks.run_job(_Task(), [trial_id]) == {str(trial_id): "ran attempt 2"}
    [trial] = _trials(engine)
    assert (trial.status, trial.attempts) == ("running", 2)


def test_a_claim_during_a_long_outage_re_queues_the_message_and_leaves_the_trial_queued(tasks_on, monkeypatch):
    jobs, tasks, engine, trial_id = tasks_on
    _outage(jobs, monkeypatch, failures=100)
    task = _Task()
    with pytest.raises(_Requeued):
        tasks.run_job(task, [trial_id])
    # Re-queued as a takeover, with no limit on how often: the trial is never dropped while the
    # database is down (each takeover that claims counts one attempt).
    assert [r["kwargs"] for r in task.retries] == [{"takeover": True}]
    app = make_celery(Settings())
    tasks.register(app)
    assert app.tasks["fitscope.run_job"].max_retries is None
    [trial] = _trials(engine)
    assert (trial.status, trial.attempts) == ("queued", 0)


def test_loading_a_csv_data_set_at_task_start_waits_out_a_short_outage(tasks_on, monkeypatch, tmp_path):
    import services.datasets as datasets
    from services.trial_config import TrialConfig

    jobs, _tasks, engine, _ = tasks_on
    content = b"a,b,y\n" + b"".join(b"%d,%d,%d\n" % (i, i * 7 % 5, i % 2) for i in range(30))
    (tmp_path / "points.csv").write_bytes(content)
    submitted = _submit_without_sending(
        engine, f"name: csv\nparameters:\n  dataset: {{csv: {tmp_path / 'points.csv'}, target: y}}\n")
    [trial] = _trials(engine, submitted.experiment_id)
    real_load, calls = datasets.load_dataset_content, []

    def flaky_load(session, sha256):
        calls.append(1)
        if len(calls) <= 2:
            raise OperationalError("SELECT datasets", {}, Exception("connection refused"))
        return real_load(session, sha256)

    monkeypatch.setattr(datasets, "load_dataset_content", flaky_load)
    assert jobs.csv_content_of(engine, TrialConfig.model_validate(trial.config)) == content
    assert len(calls) == 3
