"""Checkpoints and resume: the store and the claim in a real database, then a real worker whose
training process is killed with SIGKILL again and again while it trains one trial."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest
from sqlalchemy import select

from services.checkpoints import (
    CheckpointNotSaved,
    DatabaseStore,
    DirectoryStore,
    checkpoint_store,
    load_checkpoint,
)
from services.config import ConfigError, Settings
from services.db import session_scope
from services.models import EpochMetric, Trial, TrialCheckpoint
from services.queue import enqueue_trials, make_celery
from services.spec import parse_spec
from services.submission import submit
from services.trials import (
    TrialSuperseded,
    cancel_experiment,
    claim_trial,
    finish_trial,
    record_epochs,
    requeue_trials,
)
from tests.servers import WorkerProcess, fitscope_env

pytestmark = pytest.mark.integration

SPEC = "name: r\nfuse: false\nseeds: [0]\nparameters:\n  epochs: {value: 10}\n"


def _submit(engine, spec_text: str = SPEC) -> int:
    with session_scope(engine) as session:
        submitted = submit(session, spec=parse_spec(spec_text), spec_text=spec_text, submitted_by="tester",
                           max_trials=100)
    return submitted.trial_ids[0]


def _epoch(epoch: int) -> dict:
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.2 / epoch, "train_accuracy": 0.5,
            "val_accuracy": 0.4, "lr": 0.01, "epoch_seconds": 0.1}


def _epochs(engine, trial_id: int) -> list[int]:
    with session_scope(engine) as session:
        return list(session.scalars(select(EpochMetric.epoch).where(EpochMetric.trial_id == trial_id)
                                    .order_by(EpochMetric.epoch)))


def _save_with_rows(engine, store, trial_id: int, *, attempt: int, epochs: range, data: bytes) -> None:
    """What the worker does at a checkpoint: the pending rows and the checkpoint in one transaction."""
    with session_scope(engine) as session:
        record_epochs(session, trial_id, [_epoch(e) for e in epochs], attempt=attempt)
        store.save(session, trial_id=trial_id, attempt=attempt, epoch=epochs[-1], data=data)


@pytest.fixture
def engine(database_url, engine_for):
    return engine_for(database_url)


@pytest.mark.parametrize("store_kind", ["database", "folder"])
def test_a_takeover_keeps_the_rows_up_to_the_checkpoint_and_resumes_from_it(engine, store_kind, tmp_path):
    store = DatabaseStore() if store_kind == "database" else DirectoryStore(tmp_path / "checkpoints")
    trial_id = _submit(engine)
    with session_scope(engine) as session:
        first = claim_trial(session, trial_id, worker="w1", max_attempts=3)
    _save_with_rows(engine, store, trial_id, attempt=1, epochs=range(1, 4), data=b"state after 3")
    with session_scope(engine) as session:
        record_epochs(session, trial_id, [_epoch(4), _epoch(5)], attempt=1)  # then the worker died

    with session_scope(engine) as session:
        second = claim_trial(session, trial_id, worker="w2", max_attempts=3, redelivered=True)
    assert (first.resume_epoch, first.checkpoint) == (None, None)
    assert (second.attempt, second.resume_epoch, second.checkpoint) == (2, 3, b"state after 3")
    assert _epochs(engine, trial_id) == [1, 2, 3]
    with session_scope(engine) as session:
        assert session.get(Trial, trial_id).epochs_done == 3
        row = session.get(TrialCheckpoint, trial_id)
        assert (row.attempt, row.epoch, row.size_bytes) == (1, 3, len(b"state after 3"))
        assert (row.data is None) == (store_kind == "folder")

    # The resumed attempt writes on from epoch 4, and ending the trial removes its checkpoint.
    _save_with_rows(engine, store, trial_id, attempt=2, epochs=range(4, 7), data=b"state after 6")
    if store_kind == "folder":  # what a worker killed in the middle of writing a checkpoint leaves
        (tmp_path / "checkpoints" / f"trial-{trial_id}" / ".attempt-2-epoch-9.pt.4242.tmp").write_bytes(b"half")
    with session_scope(engine) as session:
        record_epochs(session, trial_id, [_epoch(e) for e in range(7, 11)], attempt=2)
        finish_trial(session, trial_id, status="succeeded", attempt=2)
    assert _epochs(engine, trial_id) == list(range(1, 11))
    with session_scope(engine) as session:
        assert session.get(TrialCheckpoint, trial_id) is None
    assert not (tmp_path / "checkpoints" / f"trial-{trial_id}").exists()


def test_a_folder_store_keeps_exactly_the_file_its_committed_row_names(engine, tmp_path):
    store = DirectoryStore(tmp_path / "checkpoints")
    trial_id = _submit(engine)
    folder = tmp_path / "checkpoints" / f"trial-{trial_id}"
    with session_scope(engine) as session:
        claim_trial(session, trial_id, worker="w1", max_attempts=3)
    _save_with_rows(engine, store, trial_id, attempt=1, epochs=range(1, 3), data=b"two")
    _save_with_rows(engine, store, trial_id, attempt=1, epochs=range(3, 5), data=b"four")
    assert sorted(p.name for p in folder.iterdir()) == ["attempt-1-epoch-4.pt"]

    with pytest.raises(RuntimeError, match="rolled back"):
        with session_scope(engine) as session:
            store.save(session, trial_id=trial_id, attempt=1, epoch=6, data=b"six")
            raise RuntimeError("rolled back")
    assert sorted(p.name for p in folder.iterdir()) == ["attempt-1-epoch-4.pt"]
    with session_scope(engine) as session:
        stored = load_checkpoint(session, trial_id)
    assert (stored.epoch, stored.data) == (4, b"four")

    (folder / "attempt-1-epoch-4.pt").write_bytes(b"fourteen")  # changed behind the store's back
    with session_scope(engine) as session:
        assert load_checkpoint(session, trial_id) is None  # sized first: never read as the checkpoint
    (folder / "attempt-1-epoch-4.pt").unlink()  # a folder not shared with this worker, say
    with session_scope(engine) as session:
        assert load_checkpoint(session, trial_id) is None
        takeover = claim_trial(session, trial_id, worker="w2", max_attempts=3, redelivered=True)
    assert takeover.resume_epoch is None and _epochs(engine, trial_id) == []


def test_a_stale_attempt_cannot_save_a_checkpoint(engine):
    trial_id = _submit(engine)
    with session_scope(engine) as session:
        claim_trial(session, trial_id, worker="w1", max_attempts=3)
    with session_scope(engine) as session:
        claim_trial(session, trial_id, worker="w2", max_attempts=3, redelivered=True)

    with pytest.raises(TrialSuperseded):
        _save_with_rows(engine, DatabaseStore(), trial_id, attempt=1, epochs=range(1, 3), data=b"stale")
    with session_scope(engine) as session:
        assert session.get(TrialCheckpoint, trial_id) is None
    assert _epochs(engine, trial_id) == []


def test_a_trial_cancelled_while_its_worker_died_ends_cancelled_at_the_takeover(engine):
    trial_id = _submit(engine)
    with session_scope(engine) as session:
        claim_trial(session, trial_id, worker="w1", max_attempts=3)
    _save_with_rows(engine, DatabaseStore(), trial_id, attempt=1, epochs=range(1, 4), data=b"three")
    with session_scope(engine) as session:
        record_epochs(session, trial_id, [_epoch(4)], attempt=1)
        cancel_experiment(session, session.get(Trial, trial_id).experiment_id)

    with session_scope(engine) as session:
        assert claim_trial(session, trial_id, worker="w2", max_attempts=3, redelivered=True) is None
    with session_scope(engine) as session:
        trial = session.get(Trial, trial_id)
        assert (trial.status, trial.attempts) == ("cancelled", 1)
        assert session.get(TrialCheckpoint, trial_id) is None
    assert _epochs(engine, trial_id) == [1, 2, 3, 4]


def test_a_checkpoint_over_the_cap_is_not_saved(engine, monkeypatch):
    monkeypatch.setattr("services.checkpoints.MAX_CHECKPOINT_BYTES", 100)
    trial_id = _submit(engine)
    with session_scope(engine) as session:
        claim_trial(session, trial_id, worker="w1", max_attempts=3)

    with pytest.raises(CheckpointNotSaved, match="over the .* cap"):
        _save_with_rows(engine, DatabaseStore(), trial_id, attempt=1, epochs=range(1, 3), data=b"x" * 101)
    with session_scope(engine) as session:
        assert session.get(TrialCheckpoint, trial_id) is None
    assert _epochs(engine, trial_id) == []  # the rows stay pending for the next write


def test_requeue_drops_the_checkpoint_and_a_trial_out_of_attempts_says_why(engine):
    trial_id = _submit(engine)
    with session_scope(engine) as session:
        claim_trial(session, trial_id, worker="w1", max_attempts=2)
    _save_with_rows(engine, DatabaseStore(), trial_id, attempt=1, epochs=range(1, 3), data=b"two")
    with session_scope(engine) as session:
        assert claim_trial(session, trial_id, worker="w2", max_attempts=2, redelivered=True).resume_epoch == 2
    with session_scope(engine) as session:
        assert claim_trial(session, trial_id, worker="w3", max_attempts=2, redelivered=True) is None
    with session_scope(engine) as session:
        trial = session.get(Trial, trial_id)
        assert trial.status == "failed" and trial.attempts == 2
        assert "gave up after 2 attempts (FITSCOPE_MAX_ATTEMPTS=2)" in trial.error
        assert session.get(TrialCheckpoint, trial_id) is None

    _save_checkpoint_directly(engine, trial_id)
    with session_scope(engine) as session:
        requeue_trials(session, session.get(Trial, trial_id).experiment_id)
    with session_scope(engine) as session:
        assert session.get(TrialCheckpoint, trial_id) is None


def _save_checkpoint_directly(engine, trial_id: int) -> None:
    with session_scope(engine) as session:
        DatabaseStore().save(session, trial_id=trial_id, attempt=9, epoch=1, data=b"left over")


@pytest.mark.parametrize("url", ["s3://bucket/checkpoints", "file://otherhost/dir", "file:relative/dir",
                                 "/just/a/path"])
def test_an_unknown_checkpoint_url_is_one_sentence_naming_the_setting(url):
    with pytest.raises(ConfigError) as raised:
        checkpoint_store(url)
    message = str(raised.value)
    assert message.startswith(f"FITSCOPE_CHECKPOINT_URL={url!r}") and "\n" not in message
    assert "file:///" in message


def test_a_checkpoint_folder_that_cannot_be_written_is_one_sentence(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert isinstance(checkpoint_store(None), DatabaseStore)
    with pytest.raises(ConfigError, match="FITSCOPE_CHECKPOINT_URL names the folder .* cannot be written"):
        checkpoint_store(f"file://{blocker}/checkpoints").check()


# --- a real worker, killed ------------------------------------------------------------------------

# About 40-50 ms an epoch here (kills are aimed ~11 epochs apart: an attempt must not run past
# its kill's target before the test sees it; 1500 rows at ~13 ms an epoch did, once in CI);
# dropout and a cosine schedule so that a resume has every kind of state to put back.
# Checkpoints every 3 epochs, so a kill loses at most 2 epochs of work.
LONG_SPEC = """name: killed
fuse: false
seeds: [3]
parameters:
  n_train: {value: 5000}
  width: {value: 32}
  dropout: {value: 0.1}
  schedule: {value: cosine}
  epochs: {value: 70}
"""


@pytest.fixture
def killable_worker(migrated_sqlite_url, broker_url, tmp_path, request):
    max_attempts = request.param
    env = fitscope_env(database_url=migrated_sqlite_url, broker_url=broker_url, home=tmp_path,
                       FITSCOPE_MAX_ATTEMPTS=str(max_attempts), FITSCOPE_CHECKPOINT_EVERY_EPOCHS="3",
                       FITSCOPE_CHECKPOINT_EVERY_S="0", FITSCOPE_METRICS_FLUSH_S="0.2", FITSCOPE_FUSE="false")
    worker = WorkerProcess(env, tmp_path / "worker.log")
    worker.wait_ready()
    yield worker
    worker.stop()


def _start(migrated_sqlite_url, broker_url, engine) -> int:
    trial_id = _submit(engine, LONG_SPEC)
    producer = make_celery(Settings(database_url=migrated_sqlite_url, broker_url=broker_url))
    enqueue_trials(producer, [(trial_id, "cpu")])
    return trial_id


def _wait_for(engine, trial_id: int, worker: WorkerProcess, ready, timeout: float = 120) -> Trial:
    deadline = time.monotonic() + timeout
    while True:
        with session_scope(engine) as session:
            trial = session.get(Trial, trial_id)
        if ready(trial):
            return trial
        assert time.monotonic() < deadline, (
            f"trial {trial_id}: {trial.status}, attempt {trial.attempts} on {trial.worker}, "
            f"{trial.epochs_done} epochs; training processes waiting in {_waiting_in(worker)}:\n"
            f"{worker.log()[-3000:]}")
        time.sleep(0.02)


def _waiting_in(worker: WorkerProcess) -> dict[int, str]:
    """Where each training process sleeps in the kernel (pipe_read: idle, waiting for a job;
    futex: blocked on a lock), to tell a stuck pool from a stuck trial when a wait times out."""
    parent = worker.process.pid
    try:
        children = open(f"/proc/{parent}/task/{parent}/children").read().split()
        return {int(pid): open(f"/proc/{pid}/wchan").read() for pid in children}
    except OSError as exc:
        return {parent: f"unknown ({exc})"}


def _checkpointed(engine, trial_id: int, *, attempt: int) -> int:
    """The epoch of the trial's checkpoint when ``attempt`` wrote it, else 0."""
    with session_scope(engine) as session:
        row = session.get(TrialCheckpoint, trial_id)
    return row.epoch if row is not None and row.attempt == attempt else 0


def _kill_training_process(trial: Trial, worker: WorkerProcess) -> int:
    """SIGKILL the pool child named by the trial's ``worker`` column ("node/pid"), after checking that
    it is a child of the worker this test started."""
    pid = int(trial.worker.rsplit("/", 1)[1])
    with open(f"/proc/{pid}/stat") as stat:
        parent = int(stat.read().rsplit(")", 1)[1].split()[1])
    assert parent == worker.process.pid, f"pid {pid} is not a training process of the test's worker"
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.mark.slow
@pytest.mark.parametrize("killable_worker", [10], indirect=True)
def test_a_trial_killed_five_times_resumes_to_the_uninterrupted_result(
        killable_worker, migrated_sqlite_url, broker_url, engine_for):
    engine = engine_for(migrated_sqlite_url)
    trial_id = _start(migrated_sqlite_url, broker_url, engine)
    killed: list[tuple[int, int]] = []  # (pid, epochs done in the database when killed)
    for kill, target_epoch in enumerate((7, 18, 28, 39, 51), start=1):
        # Killed once this attempt has saved a checkpoint at or past the target epoch, so every
        # kill lands at a different epoch and every next attempt has a checkpoint to resume from.
        trial = _wait_for(engine, trial_id, killable_worker, lambda t, kill=kill, target=target_epoch: (
            t.status == "running" and t.attempts == kill and _checkpointed(engine, t.id, attempt=kill) >= target))
        killed.append((_kill_training_process(trial, killable_worker), trial.epochs_done))
    trial = _wait_for(engine, trial_id, killable_worker, lambda t: t.status != "running", timeout=180)

    import torch

    from services.trial_config import TrialConfig
    from worker.training.loop import train_trial

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker's training processes
    try:
        reference_rows = []
        reference = train_trial(TrialConfig.model_validate(trial.config), on_epoch=reference_rows.append)
    finally:
        torch.set_num_threads(threads)

    log = killable_worker.log()
    assert trial.status == "succeeded", f"{trial.error}\n{log[-3000:]}"
    assert trial.attempts == 6 and len({pid for pid, _ in killed}) == 5
    assert log.count("resumes after epoch") == 5, log[-3000:]
    with session_scope(engine) as session:
        rows = session.scalars(select(EpochMetric).where(EpochMetric.trial_id == trial_id)
                               .order_by(EpochMetric.epoch)).all()
        assert session.get(TrialCheckpoint, trial_id) is None
    assert [row.epoch for row in rows] == list(range(1, 71)) and trial.epochs_done == 70
    fields = [f.name for f in dataclasses.fields(reference_rows[0]) if not f.name.endswith("_seconds")]
    assert [[getattr(row, name) for name in fields] for row in rows] == [
        [getattr(row, name) for name in fields] for row in reference_rows]
    without_timings = {k: v for k, v in reference.final_metrics.items() if not k.endswith("_seconds")}
    without_timings["trained_with"] = 1  # the task records it: trained alone, not fused
    assert {k: v for k, v in trial.final_metrics.items() if not k.endswith("_seconds")} == without_timings
    assert trial.best_epoch == reference.best_epoch


@pytest.mark.slow
@pytest.mark.parametrize("killable_worker", [2], indirect=True)
def test_a_trial_whose_worker_keeps_dying_ends_failed_naming_the_limit(
        killable_worker, migrated_sqlite_url, broker_url, engine_for):
    engine = engine_for(migrated_sqlite_url)
    trial_id = _start(migrated_sqlite_url, broker_url, engine)
    for attempt in (1, 2):
        trial = _wait_for(engine, trial_id, killable_worker, lambda t, attempt=attempt: (
            t.status == "running" and t.attempts == attempt and t.epochs_done >= 4))
        _kill_training_process(trial, killable_worker)
    trial = _wait_for(engine, trial_id, killable_worker, lambda t: t.status != "running")

    assert trial.status == "failed" and trial.attempts == 2
    assert trial.error.startswith("gave up after 2 attempts (FITSCOPE_MAX_ATTEMPTS=2): each one ended without "
                                  "a result")
    with session_scope(engine) as session:
        assert session.get(TrialCheckpoint, trial_id) is None
    assert _epochs(engine, trial_id) == list(range(1, trial.epochs_done + 1))


def test_a_checkpoint_that_does_not_fit_the_run_starts_the_trial_over_instead_of_failing_it(
        migrated_sqlite_url, engine_for, monkeypatch):
    """A GPU generator's state (a device: auto trial that ran on a GPU) reaching a CPU worker."""
    import torch

    from services.config import get_settings
    from services.trial_config import TrialConfig
    from worker import tasks
    from worker.training import train_trial
    from worker.training.checkpoint import state_from_bytes, state_to_bytes

    monkeypatch.setenv("FITSCOPE_DATABASE_URL", migrated_sqlite_url)
    get_settings.cache_clear()
    engine = engine_for(migrated_sqlite_url)
    trial_id = _submit(engine)
    with session_scope(engine) as session:
        config = TrialConfig.model_validate(session.get(Trial, trial_id).config)
        claim_trial(session, trial_id, worker="w1", max_attempts=3)
    saved = []
    train_trial(config, checkpoint=lambda epoch, capture: epoch == 4 and saved.append(state_to_bytes(capture())))
    state = state_from_bytes(saved[0])  # a job's state of one trial
    alien = dataclasses.replace(state, trials=[dataclasses.replace(state.trials[0],
                                                                   noise_generator=torch.zeros(16, dtype=torch.uint8))])
    _save_with_rows(engine, DatabaseStore(), trial_id, attempt=1, epochs=range(1, 5), data=state_to_bytes(alien))
    with session_scope(engine) as session:
        takeover = claim_trial(session, trial_id, worker="w2", max_attempts=3, redelivered=True)
    assert takeover.resume_epoch == 4 and _epochs(engine, trial_id) == [1, 2, 3, 4]

    try:
        assert tasks.execute_claim(engine, takeover) == "succeeded"
    finally:
        get_settings.cache_clear()
    with session_scope(engine) as session:
        trial = session.get(Trial, trial_id)
        assert (trial.status, trial.attempts) == ("succeeded", 2)
    assert _epochs(engine, trial_id) == list(range(1, 11))  # rows 1-4 of the dead attempt replaced
    assert trial.final_metrics["final_val_loss"] == train_trial(config).final_metrics["final_val_loss"]
