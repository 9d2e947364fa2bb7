"""Fused jobs fill the fleet: a submission (and a re-queue) reads how many training processes the
online workers of each queue have, in its own session, and splits a big fused job so that none of
them sits idle. Real databases; the workers are rows registered as a worker registers itself."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from services.db import session_scope
from services.models import Trial, WorkerNode, utcnow
from services.spec import parse_spec
from services.submission import plan_requeue, submit
from services.trials import requeue_trials
from services.workers import mark_stopped, register, training_processes

pytestmark = pytest.mark.integration

# 16 learning rates x 4 seeds: one fusion key, 64 trials (bench/fused.py's grid (a)).
GRID = """name: spread
seeds: [0, 1, 2, 3]
parameters:
  dataset: {value: moons}
  width: {value: 64}
  depth: {value: 2}
  epochs: {value: 2}
  lr: {values: [0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008,
                0.009, 0.01, 0.011, 0.012, 0.013, 0.014, 0.015, 0.016]}
"""


def _register(session, name: str, *, queues: list[str], concurrency: int) -> None:
    register(session, name=name, host="h1", pid=4242, queues=queues, device="cpu", torch_version="2.13.0",
             concurrency=concurrency)


def _silence(session, name: str, seconds: float) -> None:
    session.execute(update(WorkerNode).where(WorkerNode.name == name)
                    .values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))


def _submit(session, text: str = GRID):
    return submit(session, spec=parse_spec(text), spec_text=text, submitted_by="t", max_trials=1000)


def test_training_processes_counts_online_workers_of_the_queue(database_url, engine_for):
    engine = engine_for(database_url)
    with session_scope(engine) as session:
        assert training_processes(session, "cpu", lost_after_s=60) == 0
        _register(session, "a@h1", queues=["cpu"], concurrency=2)
        _register(session, "b@h1", queues=["cpu", "gpu"], concurrency=3)
        _register(session, "c@h1", queues=["gpu"], concurrency=1)
        _register(session, "silent@h1", queues=["cpu"], concurrency=4)
        _register(session, "stopped@h1", queues=["cpu"], concurrency=8)
        _register(session, "lost@h1", queues=["cpu"], concurrency=16)
        _silence(session, "silent@h1", 120)  # still "online" in its row, but past lost_after_s
        mark_stopped(session, "stopped@h1")
        session.execute(update(WorkerNode).where(WorkerNode.name == "lost@h1").values(status="lost"))
    with session_scope(engine) as session:
        assert training_processes(session, "cpu", lost_after_s=60) == 5
        assert training_processes(session, "gpu", lost_after_s=60) == 4
        assert training_processes(session, "cpu", lost_after_s=600) == 9  # silent for 120 s only
        assert training_processes(session, "tpu", lost_after_s=60) == 0


def test_a_64_trial_grid_is_one_job_with_nobody_online_and_two_with_two_processes(migrated_sqlite_url,
                                                                                   engine_for):
    engine = engine_for(migrated_sqlite_url)
    with session_scope(engine) as session:
        alone = _submit(session)
    assert [len(ids) for ids, _ in alone.jobs] == [64]
    with session_scope(engine) as session:
        _register(session, "two@h1", queues=["cpu"], concurrency=2)
        _register(session, "gpu@h1", queues=["gpu"], concurrency=4)  # consumes another queue: not counted
        spread = _submit(session)
    assert [len(ids) for ids, _ in spread.jobs] == [32, 32]
    assert [i for ids, _ in spread.jobs for i in ids] == spread.trial_ids  # halves of the grid, in order
    assert {queue for _, queue in spread.jobs} == {"cpu"}


def test_min_trials_stops_the_split_and_fuse_off_sends_every_trial_alone(migrated_sqlite_url, engine_for,
                                                                         monkeypatch):
    engine = engine_for(migrated_sqlite_url)
    with session_scope(engine) as session:
        _register(session, "many@h1", queues=["cpu"], concurrency=16)
        assert [len(ids) for ids, _ in _submit(session).jobs] == [8] * 8  # FITSCOPE_FUSE_MIN_TRIALS=8
    monkeypatch.setenv("FITSCOPE_FUSE_MIN_TRIALS", "32")
    from services.config import get_settings

    get_settings.cache_clear()
    with session_scope(engine) as session:
        assert [len(ids) for ids, _ in _submit(session).jobs] == [32, 32]
        unfused = _submit(session, GRID + "fuse: false\n")
    assert [len(ids) for ids, _ in unfused.jobs] == [1] * 64


def test_each_queue_is_split_for_its_own_workers_and_a_job_never_mixes_queues(migrated_sqlite_url, engine_for):
    text = GRID.replace("  depth: {value: 2}\n", "  depth: {value: 2}\n  device: {values: [cpu, cuda]}\n")
    engine = engine_for(migrated_sqlite_url)
    with session_scope(engine) as session:
        _register(session, "cpu@h1", queues=["cpu"], concurrency=4)
        submitted = _submit(session, text)
    queue_of = dict(submitted.trials)
    assert sorted(queue_of.values()).count("gpu") == 64
    for ids, queue in submitted.jobs:
        assert {queue_of[trial_id] for trial_id in ids} == {queue}
    sizes = {queue: sorted(len(ids) for ids, q in submitted.jobs if q == queue) for queue in ("cpu", "gpu")}
    assert sizes == {"cpu": [16, 16, 16, 16], "gpu": [64]}  # no GPU worker online: one job, as before


def test_a_requeue_fills_the_online_processes_too(migrated_sqlite_url, engine_for):
    engine = engine_for(migrated_sqlite_url)
    with session_scope(engine) as session:
        submitted = _submit(session)
        session.execute(update(Trial).where(Trial.experiment_id == submitted.experiment_id).values(status="failed"))
    with session_scope(engine) as session:
        trials = requeue_trials(session, submitted.experiment_id)
        assert [len(ids) for ids, _ in plan_requeue(session, trials, fuse=True, fuse_max_trials=64)] == [64]
        _register(session, "four@h1", queues=["cpu"], concurrency=4)
        jobs = plan_requeue(session, trials, fuse=True, fuse_max_trials=64)
    assert [len(ids) for ids, _ in jobs] == [16, 16, 16, 16]
    assert sorted(i for ids, _ in jobs for i in ids) == sorted(submitted.trial_ids)
