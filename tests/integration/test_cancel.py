"""Cancel on a real worker: the running trial stops within one epoch even when its rows are written
only every few seconds, keeps its rows and ends ``cancelled``; queued trials never start.

The cancel is the same call `fitscope cancel` makes (services.trials.cancel_experiment), made in this
process so the epoch at which it lands is known to within a poll rather than a CLI start-up."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from services.config import Settings
from services.db import session_scope
from services.models import EpochMetric, Trial
from services.queue import enqueue_jobs, make_celery
from services.spec import parse_spec
from services.submission import submit
from services.trials import cancel_experiment
from tests.servers import WorkerProcess, fitscope_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLUSH_S = 3.0
# About 0.15-0.3 s an epoch, so ~10 epochs between two writes of rows: stopping only at a write (as
# the cancel did before it was read every epoch) would overshoot by several epochs. Epochs must also
# outlast the worker's stop-flag reads (every 0.1 s): width 64 took 0.05 s an epoch on a fast machine,
# and two reads fell inside the epoch after the cancel.
SPEC = """name: cancel-me
fuse: false
seeds: [0, 1, 2]
parameters:
  n_train: {value: 10000}
  width: {value: 192}
  epochs: {value: 3000}
"""


@pytest.fixture
def worker(migrated_sqlite_url, broker_url, tmp_path):
    env = fitscope_env(database_url=migrated_sqlite_url, broker_url=broker_url, home=tmp_path,
                       FITSCOPE_METRICS_FLUSH_S=str(FLUSH_S), FITSCOPE_CHECKPOINT_EVERY_EPOCHS="0",
                       FITSCOPE_CHECKPOINT_EVERY_S="0", FITSCOPE_FUSE="false")
    process = WorkerProcess(env, tmp_path / "worker.log")
    process.wait_ready()
    yield process
    process.stop()


def _trials(engine) -> list[Trial]:
    with session_scope(engine) as session:
        return list(session.scalars(select(Trial).order_by(Trial.ordinal)))


def _until(condition, worker: WorkerProcess, timeout: float = 90.0, poll_s: float = 0.01):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(poll_s)
    return found


def test_a_running_trial_stops_within_one_epoch_and_queued_ones_never_start(
        worker, migrated_sqlite_url, broker_url, engine_for):
    engine = engine_for(migrated_sqlite_url)
    with session_scope(engine) as session:
        submitted = submit(session, spec=parse_spec(SPEC), spec_text=SPEC, submitted_by="tester", max_trials=10)
    enqueue_jobs(make_celery(Settings(database_url=migrated_sqlite_url, broker_url=broker_url)),
                 [([trial_id], queue) for trial_id, queue in submitted.trials])

    # Cancel right after the first write of rows, when epochs_done is the epoch just finished.
    running = _until(lambda: next((t for t in _trials(engine) if t.status == "running" and t.epochs_done), None),
                     worker)
    with session_scope(engine) as session:
        asked = cancel_experiment(session, submitted.experiment_id)
    cancelled_at, epochs_at_cancel = time.monotonic(), running.epochs_done
    assert asked == {"cancelled": 2, "stopping": 1}

    _until(lambda: all(t.status != "running" for t in _trials(engine)), worker)
    stopped_after_s = time.monotonic() - cancelled_at
    first, *queued = _trials(engine)
    with session_scope(engine) as session:
        rows = session.scalars(select(EpochMetric).where(EpochMetric.trial_id == first.id)
                               .order_by(EpochMetric.epoch)).all()
    epoch_s = max(row.epoch_seconds for row in rows)
    print(f"cancel landed after epoch {epochs_at_cancel}; the trial stopped after epoch {first.epochs_done}, "
          f"{stopped_after_s:.2f} s later (epochs of up to {epoch_s:.2f} s)")

    assert first.id == running.id and first.status == "cancelled"
    # The epoch running when the cancel landed ends, then the trial stops: one epoch, two at a
    # boundary. Rows were written only every FLUSH_S (about 10 epochs), so this is the per-epoch read.
    assert epochs_at_cancel < first.epochs_done <= epochs_at_cancel + 2, (
        f"cancel at epoch {epochs_at_cancel}, stopped after {first.epochs_done} ({stopped_after_s:.2f} s, "
        f"epochs of {epoch_s:.2f} s)")
    assert FLUSH_S / epoch_s > 4, "epochs must be short next to FLUSH_S for this test to tell the two apart"
    assert [row.epoch for row in rows] == list(range(1, first.epochs_done + 1))
    assert first.final_metrics["final_epoch"] == first.epochs_done

    # The queued trials' messages arrive after the cancel and do nothing.
    _until(lambda: worker.log().count("'skipped'") >= 2, worker)
    assert [(t.status, t.started_at, t.attempts, t.epochs_done) for t in _trials(engine)[1:]] == [
        ("cancelled", None, 0, 0)] * 2
    with session_scope(engine) as session:
        assert session.scalars(select(EpochMetric.id).where(
            EpochMetric.trial_id.in_([t.id for t in queued]))).all() == []
