"""Attempts that cannot collide: an attempt superseded by a re-queue (which resets the attempt count, so
the next claim is attempt 1 again) never writes again - not rows, not a checkpoint, not a status - even
while its process keeps running. In a real database, then with real `fitscope` processes."""

from __future__ import annotations

import json
import re
import time

import pytest
from sqlalchemy import select, update

from services.config import Settings
from services.db import session_scope
from services.models import EpochMetric, JobCheckpoint, Trial
from services.queue import enqueue_jobs, make_celery
from services.spec import parse_spec
from services.submission import submit
from services.trials import claim_job, requeue_trials
from tests.servers import WorkerProcess, fitscope, fitscope_env

pytestmark = pytest.mark.integration

SPEC = "name: a\nseeds: [0, 1]\nparameters:\n  epochs: {value: 10}\n"


def _submit(engine, text: str) -> tuple[int, list[int]]:
    with session_scope(engine) as session:
        submitted = submit(session, spec=parse_spec(text), spec_text=text, submitted_by="tester", max_trials=100)
    return submitted.experiment_id, submitted.trial_ids


def _rows(engine, trial_id: int) -> list[int]:
    with session_scope(engine) as session:
        return list(session.scalars(select(EpochMetric.epoch).where(EpochMetric.trial_id == trial_id)
                                    .order_by(EpochMetric.epoch)))


def _supersede_by_requeue(engine, experiment_id: int) -> None:
    """The trials end behind the running attempt's back (as when its worker was declared lost and a
    takeover failed them), then `fitscope requeue` resets them: attempts 0, no rows, queued."""
    with session_scope(engine) as session:
        session.execute(update(Trial).where(Trial.experiment_id == experiment_id).values(status="failed"))
    with session_scope(engine) as session:
        requeue_trials(session, experiment_id)


def test_a_requeued_attempt_whose_process_goes_on_writes_nothing(database_url, engine_for):
    from worker.jobs import JobRun
    from worker.training.results import EpochMetrics, TrialResult

    engine = engine_for(database_url)
    experiment_id, (a, b) = _submit(engine, SPEC)
    settings = Settings(metrics_flush_s=0, checkpoint_every_epochs=1, checkpoint_every_s=0)
    with session_scope(engine) as session:
        stale_job = claim_job(session, [a, b], worker="stale", max_attempts=3)
    stale = JobRun(engine, stale_job, settings=settings)
    row = EpochMetrics(epoch=1, train_loss=1.0, val_loss=1.0, train_accuracy=0.5, val_accuracy=0.5, lr=0.1,
                       epoch_seconds=0.01)
    assert stale.on_epoch({0: row, 1: row}) == set()
    assert _rows(engine, a) == _rows(engine, b) == [1]

    _supersede_by_requeue(engine, experiment_id)
    with session_scope(engine) as session:
        fresh_job = claim_job(session, [a, b], worker="fresh", max_attempts=3)
    assert {claim.attempt for claim in fresh_job.claims.values()} == {1}  # the stale one's number, too

    # The stale attempt goes on as a process that never looks would: every write it can make.
    time.sleep(0.01)
    row2 = EpochMetrics(**{**row.__dict__, "epoch": 2})
    assert stale.on_epoch({0: row2, 1: row2}) == {0, 1}  # told to stop both
    stale.live = {a, b}  # and a zombie that does not listen
    stale.pending = {a: [row2.__dict__], b: [row2.__dict__]}
    stale._last_checkpoint_epoch = 0
    stale.checkpoint(2, lambda: b"zombie state")
    result = TrialResult(status="succeeded", epochs_run=2, best_epoch=2, final_metrics={"final_val_loss": 0.0},
                         message=None)
    stale.on_trials_end({0: result, 1: result})
    stale.live = {a, b}
    stale._fail("the zombie failed")

    with session_scope(engine) as session:
        trials = [session.get(Trial, trial_id) for trial_id in (a, b)]
        assert [(t.status, t.worker, t.attempts, t.attempt_token, t.epochs_done, t.final_metrics, t.error)
                for t in trials] == [("running", "fresh", 1, fresh_job.token, 0, None, None)] * 2
        assert session.get(JobCheckpoint, a) is None
    assert _rows(engine, a) == _rows(engine, b) == []
    assert stale.statuses == {a: "superseded", b: "superseded"}

    # The fresh attempt writes as usual.
    fresh = JobRun(engine, fresh_job, settings=settings)
    assert fresh.on_epoch({0: row, 1: row}) == set()
    fresh.on_trials_end({0: result, 1: result})
    assert _rows(engine, a) == _rows(engine, b) == [1]
    assert fresh.statuses == {a: "succeeded", b: "succeeded"}


# Long enough that the re-queue lands mid-run; every epoch written as it ends (flush 0).
LONG = "name: long\nseeds: [0, 1]\nparameters:\n  n_train: {value: 2000}\n  width: {value: 32}\n" \
       "  epochs: {value: 150}\n"


@pytest.mark.slow
def test_a_requeue_mid_run_stops_the_running_attempt_without_a_row_and_the_trials_run_once_more(
        migrated_sqlite_url, broker_url, engine_for, tmp_path):
    """Real processes: the running attempt 1 is superseded by a re-queue; it stops at its next epoch
    and writes nothing, and the fresh attempt 1 (on whichever training process is free) trains each
    trial once from epoch 1."""
    env = fitscope_env(database_url=migrated_sqlite_url, broker_url=broker_url, home=tmp_path,
                       FITSCOPE_METRICS_FLUSH_S="0")
    worker = WorkerProcess(env, tmp_path / "worker.log", "--concurrency", "2")
    try:
        worker.wait_ready(processes=2)
        engine = engine_for(migrated_sqlite_url)
        experiment_id, trial_ids = _submit(engine, LONG)
        enqueue_jobs(make_celery(Settings(broker_url=broker_url)), [(trial_ids, "cpu")])
        deadline = time.monotonic() + 120
        while True:
            with session_scope(engine) as session:
                trials = [session.get(Trial, trial_id) for trial_id in trial_ids]
            if all(t.status == "running" and t.epochs_done >= 5 for t in trials):
                break
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.05)
        stale_token = trials[0].attempt_token

        with session_scope(engine) as session:
            session.execute(update(Trial).where(Trial.experiment_id == experiment_id).values(status="failed"))
        requeued = fitscope("requeue", str(experiment_id), "--status", "failed", env=env)
        assert requeued.returncode == 0, requeued.stderr
        deadline = time.monotonic() + 240
        while True:
            with session_scope(engine) as session:
                trials = [session.get(Trial, trial_id) for trial_id in trial_ids]
            assert stale_token not in {t.attempt_token for t in trials}
            for t in trials:  # queued, not yet claimed again: no row may appear
                assert t.status != "queued" or _rows(engine, t.id) == [], "the stale attempt wrote a row"
            if all(t.status == "succeeded" for t in trials):
                break
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.05)
        log = worker.log()
        assert all((t.attempts, t.epochs_done, t.error) == (1, 150, None) for t in trials)
        assert all(_rows(engine, t.id) == list(range(1, 151)) for t in trials)
        # The stale attempt said so and returned; the fresh one trained both trials from epoch 1.
        assert "no longer owns it" in log, log[-3000:]
        results = re.findall(r"Task fitscope\.run_job\[[^\]]+\] succeeded in [\d.]+s: (\{[^}]*\})", log)
        assert sorted(results) == sorted([
            json.dumps({str(i): "superseded" for i in trial_ids}).replace('"', "'"),
            json.dumps({str(i): "succeeded" for i in trial_ids}).replace('"', "'")]), log[-3000:]
    finally:
        worker.stop()
