"""Workers announce themselves, beat, stop; a worker that dies has its running trial re-sent once,
to one live worker, and the trial still ends with one row per epoch."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from services.db import session_scope
from services.models import EpochMetric, Experiment, Trial, WorkerNode, utcnow
from services.workers import heartbeat, list_workers, mark_stopped, register, sweep_stale
from tests.servers import WorkerProcess, fitscope, fitscope_env

pytestmark = pytest.mark.integration


def _register(session, name: str, **overrides):
    values = {"host": "h1", "pid": 4242, "queues": ["cpu"], "device": "cpu", "torch_version": "2.13.0",
              "concurrency": 1, **overrides}
    return register(session, name=name, **values)


def _running_trials(session, worker: str, count: int, *, started_ago_s: float = 30) -> list[int]:
    """An experiment whose ``count`` trials are running on ``worker`` (a node name)."""
    experiment = Experiment(name="x", method="grid", metric_name="val_loss", metric_goal="minimize", spec={},
                            spec_text="", epochs_planned=count, tags=[])
    session.add(experiment)
    session.flush()
    trials = [Trial(experiment_id=experiment.id, ordinal=i, config={}, seed=0, queue="cpu", status="running",
                    attempts=1, worker=f"{worker}/{1000 + i}", started_at=utcnow() - timedelta(seconds=started_ago_s))
              for i in range(count)]
    session.add_all(trials)
    session.flush()
    return [trial.id for trial in trials]


def _silence(session, name: str, seconds: float) -> None:
    session.execute(update(WorkerNode).where(WorkerNode.name == name)
                    .values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))


def test_list_workers_reports_online_lost_and_stopped_with_their_trials(database_url, engine_for):
    engine = engine_for(database_url)
    with session_scope(engine) as session:
        for name in ("a@h1", "b@h1", "c_%@h1"):
            assert _register(session, name) == []
        trial_ids = _running_trials(session, "a@h1", 2)
        _running_trials(session, "c_x@h1", 1)  # a trial of a worker that never registered
        _silence(session, "b@h1", 120)
    with session_scope(engine) as session:
        assert heartbeat(session, "a@h1") == "online"
        mark_stopped(session, "c_%@h1")
        assert heartbeat(session, "nobody@h1") is None
    with session_scope(engine) as session:
        rows = {row["name"]: row for row in list_workers(session, lost_after_s=60)}
    assert {name: row["status"] for name, row in rows.items()} == {
        "a@h1": "online", "b@h1": "lost", "c_%@h1": "stopped"}
    assert rows["a@h1"]["current_trials"] == trial_ids
    assert rows["c_%@h1"]["current_trials"] == []
    assert rows["b@h1"]["seconds_since_heartbeat"] >= 119
    assert rows["a@h1"]["seconds_since_heartbeat"] < 30
    assert set(rows["a@h1"]) == {"name", "host", "pid", "queues", "device", "torch_version", "concurrency", "status",
                                 "started_at", "heartbeat_at", "seconds_since_heartbeat", "current_trials"}
    assert rows["a@h1"]["queues"] == ["cpu"] and rows["a@h1"]["heartbeat_at"].endswith("+00:00")


def test_two_sessions_sweeping_at_once_re_send_a_lost_workers_trials_once(database_url, engine_for):
    engine = engine_for(database_url)
    with session_scope(engine) as session:
        # LIKE wildcards in the dead worker's name must not reach the live worker's trials.
        _register(session, "dead_%@h1")
        _register(session, "deadxx@h1")
        trial_ids = _running_trials(session, "dead_%@h1", 3)
        _running_trials(session, "deadxx@h1", 1)
        _silence(session, "dead_%@h1", 10)

    # The first sweep holds its flip uncommitted while the second one runs: the second must wait for
    # it and then find the worker already lost.
    first_flipped, results = threading.Event(), {}

    def second_sweeper() -> None:
        first_flipped.wait(10)
        with session_scope(engine_for(database_url)) as session:
            results["second"] = sweep_stale(session, lost_after_s=5)

    thread = threading.Thread(target=second_sweeper)
    thread.start()
    with session_scope(engine) as session:
        results["first"] = sweep_stale(session, lost_after_s=5)
        first_flipped.set()
        time.sleep(0.5)  # the second sweep is now blocked on the row (PostgreSQL) or the write lock (SQLite)
    thread.join(30)
    assert not thread.is_alive()
    assert sorted(results["first"]) == [(trial_id, "cpu") for trial_id in trial_ids]
    assert results["second"] == []
    with session_scope(engine) as session:
        assert sweep_stale(session, lost_after_s=5) == []  # and never again
        statuses = dict(session.execute(select(WorkerNode.name, WorkerNode.status)).all())
        # The trials are left running: the takeover's claim cleans up the dead attempt.
        assert set(session.scalars(select(Trial.status).where(Trial.id.in_(trial_ids)))) == {"running"}
    assert statuses == {"dead_%@h1": "lost", "deadxx@h1": "online"}


def test_a_worker_restarted_under_its_name_takes_over_its_previous_process_trials_once(database_url, engine_for):
    engine = engine_for(database_url)
    with session_scope(engine) as session:
        _register(session, "w@h1", pid=1)
        old = _running_trials(session, "w@h1", 2)
    with session_scope(engine) as session:
        # Same name, new process (a container restarted after a crash): the old one never stopped.
        restarted_at = utcnow()
        assert sorted(_register(session, "w@h1", pid=2, started_at=restarted_at)) == [(i, "cpu") for i in old]
        assert _register(session, "w@h1", pid=2, started_at=restarted_at) == []  # itself, registering again
        row = session.get(WorkerNode, "w@h1")
        assert (row.status, row.pid) == ("online", 2)
    with session_scope(engine) as session:
        mark_stopped(session, "w@h1")
        _running_trials(session, "w@h1", 1)
        assert _register(session, "w@h1", pid=3) == []  # a clean stop leaves nothing behind


def test_a_worker_name_too_long_for_the_trials_column_is_refused(migrated_sqlite_url, tmp_path):
    env = fitscope_env(database_url=migrated_sqlite_url, broker_url="redis://127.0.0.1:1/0", home=tmp_path)
    refused = fitscope("worker", "--name", "w" * 151, env=env)
    assert refused.returncode == 2 and refused.stderr.startswith("error: --name is 151 characters"), refused.stderr


@pytest.mark.slow
def test_a_real_worker_registers_beats_is_listed_and_stops_cleanly(migrated_sqlite_url, broker_url, tmp_path,
                                                                   engine_for):
    env = fitscope_env(database_url=migrated_sqlite_url, broker_url=broker_url, home=tmp_path,
                       FITSCOPE_HEARTBEAT_S="0.5")
    worker = WorkerProcess(env, tmp_path / "worker.log", "--queues", "cpu,gpu", "--concurrency", "1")
    try:
        worker.wait_ready()
        name = f"fitscope-{worker.process.pid}@{os.uname().nodename}"
        engine = engine_for(migrated_sqlite_url)
        first = _wait_for_row(engine, name)
        time.sleep(1.5)
        with session_scope(engine) as session:
            later = session.get(WorkerNode, name)
        assert later.heartbeat_at > first.heartbeat_at, "the heartbeat did not advance"

        listed = fitscope("workers", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        [row] = json.loads(listed.stdout)
        assert (row["name"], row["status"], row["queues"], row["pid"]) == (name, "online", ["cpu", "gpu"],
                                                                             worker.process.pid)
        assert row["device"] == "cuda" and row["torch_version"].startswith("2.")
        table = fitscope("workers", env=env)
        assert name[:36] in table.stdout and "online" in table.stdout
    finally:
        worker.stop()
    with session_scope(engine) as session:
        row = session.get(WorkerNode, name)
        assert (row.status, row.stopped_at is not None) == ("stopped", True), worker.log()[-2000:]


@pytest.mark.slow
def test_a_killed_workers_trial_is_re_sent_once_and_finished_by_another(migrated_sqlite_url, broker_url, tmp_path,
                                                                         engine_for):
    env = fitscope_env(database_url=migrated_sqlite_url, broker_url=broker_url, home=tmp_path,
                       FITSCOPE_HEARTBEAT_S="1", FITSCOPE_WORKER_LOST_AFTER_S="3", FITSCOPE_METRICS_FLUSH_S="0.2",
                       FITSCOPE_CHECKPOINT_EVERY_EPOCHS="0", FITSCOPE_CHECKPOINT_EVERY_S="0")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: long\nfuse: false\nparameters:\n  epochs: {value: 1500}\n")
    engine = engine_for(migrated_sqlite_url)
    doomed = WorkerProcess(env, tmp_path / "doomed.log", "--name", "doomed@test")
    survivor = None
    try:
        doomed.wait_ready()
        submitted = fitscope("submit", str(spec), "--json", env=env)
        assert submitted.returncode == 0, submitted.stderr
        [trial_id] = json.loads(submitted.stdout)["trial_ids"]
        _wait(lambda: _trial(engine, trial_id).epochs_done >= 2, 60, doomed.log)
        survivor = WorkerProcess(env, tmp_path / "survivor.log", "--name", "survivor@test")
        survivor.wait_ready()
        assert _trial(engine, trial_id).worker.startswith("doomed@test/")

        os.killpg(doomed.process.pid, signal.SIGKILL)  # the worker and its training process, no goodbye
        doomed.process.wait()
        _wait(lambda: _trial(engine, trial_id).status == "succeeded", 120, survivor.log)
    finally:
        doomed.stop()
        if survivor is not None:
            survivor.stop()

    trial = _trial(engine, trial_id)
    assert trial.worker.startswith("survivor@test/") and trial.attempts == 2
    with session_scope(engine) as session:
        epochs = session.scalars(select(EpochMetric.epoch).where(EpochMetric.trial_id == trial_id)
                                 .order_by(EpochMetric.epoch)).all()
        assert session.get(WorkerNode, "doomed@test").status == "lost"
        assert session.scalar(select(func.count()).select_from(WorkerNode)) == 2
    assert epochs == list(range(1, 1501))
    assert survivor.log().count("as takeovers") == 1, survivor.log()[-3000:]


def _trial(engine, trial_id: int) -> Trial:
    with session_scope(engine) as session:
        return session.get(Trial, trial_id)


def _wait_for_row(engine, name: str, timeout_s: float = 20) -> WorkerNode:
    deadline = time.monotonic() + timeout_s
    while True:
        with session_scope(engine) as session:
            row = session.get(WorkerNode, name)
        if row is not None:
            return row
        assert time.monotonic() < deadline, f"worker {name} never registered"
        time.sleep(0.1)


def _wait(condition, timeout_s: float, log) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, log()[-3000:]
        time.sleep(0.1)
