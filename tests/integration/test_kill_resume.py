"""Checkpoints and resume: the store and the job claim in a real database, then a real worker whose
training process is killed with SIGKILL again and again while it trains one trial, and a fused job
of 16 trials killed three times."""

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
from services.models import EpochMetric, JobCheckpoint, Trial
from services.queue import enqueue_jobs, make_celery
from services.spec import parse_spec
from services.submission import submit
from services.trials import (
    ClaimedJob,
    TrialSuperseded,
    cancel_experiment,
    claim_job,
    finish_trial,
    record_epochs,
    requeue_trials,
)
from tests.servers import WorkerProcess, fitscope_env

pytestmark = pytest.mark.integration

SPEC = "name: r\nfuse: false\nseeds: [0]\nparameters:\n  epochs: {value: 10}\n"
JOB_SPEC = "name: j\nseeds: [0, 1, 2]\nparameters:\n  epochs: {value: 10}\n"


def _submit(engine, spec_text: str = SPEC) -> int:
    return _submit_all(engine, spec_text)[0]


def _submit_all(engine, spec_text: str) -> list[int]:
    with session_scope(engine) as session:
        submitted = submit(session, spec=parse_spec(spec_text), spec_text=spec_text, submitted_by="tester",
                           max_trials=100)
    return submitted.trial_ids


def _claim(engine, trial_ids: list[int], *, worker: str, redelivered: bool = False,
           max_attempts: int = 3) -> ClaimedJob:
    with session_scope(engine) as session:
        return claim_job(session, trial_ids, worker=worker, max_attempts=max_attempts, redelivered=redelivered)


def _epoch(epoch: int) -> dict:
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.2 / epoch, "train_accuracy": 0.5,
            "val_accuracy": 0.4, "lr": 0.01, "epoch_seconds": 0.1}


def _epochs(engine, trial_id: int) -> list[int]:
    with session_scope(engine) as session:
        return list(session.scalars(select(EpochMetric.epoch).where(EpochMetric.trial_id == trial_id)
                                    .order_by(EpochMetric.epoch)))


def _save_with_rows(engine, store, job: ClaimedJob, *, epochs: range, data: bytes) -> None:
    """What the worker does at a checkpoint: every trial's pending rows and the job's checkpoint in one
    transaction, guarded by the attempt's token."""
    with session_scope(engine) as session:
        for trial_id in job.claims:
            record_epochs(session, trial_id, [_epoch(e) for e in epochs], token=job.token)
        store.save(session, trial_ids=job.trial_ids, token=job.token, epoch=epochs[-1], data=data)


def _checkpoint_row(engine, first_trial_id: int) -> JobCheckpoint | None:
    with session_scope(engine) as session:
        return session.get(JobCheckpoint, first_trial_id)


@pytest.fixture
def engine(database_url, engine_for):
    return engine_for(database_url)


@pytest.mark.parametrize("store_kind", ["database", "folder"])
def test_a_takeover_keeps_the_rows_up_to_the_checkpoint_and_resumes_from_it(engine, store_kind, tmp_path):
    store = DatabaseStore() if store_kind == "database" else DirectoryStore(tmp_path / "checkpoints")
    trial_id = _submit(engine)
    first = _claim(engine, [trial_id], worker="w1")
    _save_with_rows(engine, store, first, epochs=range(1, 4), data=b"state after 3")
    with session_scope(engine) as session:
        record_epochs(session, trial_id, [_epoch(4), _epoch(5)], token=first.token)  # then the worker died

    second = _claim(engine, [trial_id], worker="w2", redelivered=True)
    assert first.checkpoint is None and second.claims[trial_id].attempt == 2
    assert (second.checkpoint.epoch, second.checkpoint.data, second.trial_ids) == (3, b"state after 3", [trial_id])
    assert _epochs(engine, trial_id) == [1, 2, 3]
    with session_scope(engine) as session:
        assert session.get(Trial, trial_id).epochs_done == 3
        row = session.get(JobCheckpoint, trial_id)
        # The resuming attempt owns it now: its saves replace it, and its end removes it.
        assert (row.attempt_token, row.epoch, row.size_bytes) == (second.token, 3, len(b"state after 3"))
        assert (row.data is None) == (store_kind == "folder")

    # The resumed attempt writes on from epoch 4; the job's end removes its checkpoint.
    _save_with_rows(engine, store, second, epochs=range(4, 7), data=b"state after 6")
    if store_kind == "folder":  # what a worker killed in the middle of writing a checkpoint leaves
        (tmp_path / "checkpoints" / f"job-{trial_id}" / ".attempt-2-epoch-9.pt.4242.tmp").write_bytes(b"half")
    with session_scope(engine) as session:
        record_epochs(session, trial_id, [_epoch(e) for e in range(7, 11)], token=second.token)
        finish_trial(session, trial_id, status="succeeded", token=second.token)
        from services.checkpoints import delete_checkpoints

        delete_checkpoints(session, [trial_id], token=first.token)  # not the stale attempt's any more
        assert session.get(JobCheckpoint, trial_id) is not None
        delete_checkpoints(session, [trial_id], token=second.token)
    assert _epochs(engine, trial_id) == list(range(1, 11))
    assert _checkpoint_row(engine, trial_id) is None
    assert not (tmp_path / "checkpoints" / f"job-{trial_id}").exists()


def test_a_job_takeover_resumes_only_the_job_its_checkpoint_holds(engine):
    """Rows after the checkpoint go for every trial taken over; a trial that ended after it stays
    ended (it is in the stack to train again, unwritten); a job that is not the checkpoint's, or a
    claim that is not a takeover, starts over."""
    a, b, c = _submit_all(engine, JOB_SPEC)
    first = _claim(engine, [a, b, c], worker="w1")
    assert first.trial_ids == [a, b, c] and len({claim.token for claim in first.claims.values()}) == 1
    _save_with_rows(engine, DatabaseStore(), first, epochs=range(1, 4), data=b"three")
    with session_scope(engine) as session:
        for trial_id in (a, b, c):
            record_epochs(session, trial_id, [_epoch(4), _epoch(5)], token=first.token)
        finish_trial(session, b, status="succeeded", final_metrics={}, token=first.token)  # ended at 5

    second = _claim(engine, [a, b, c], worker="w2", redelivered=True)
    assert sorted(second.claims) == [a, c] and second.trial_ids == [a, b, c]
    assert second.checkpoint.epoch == 3 and sorted(second.configs) == [a, b, c]
    assert [_epochs(engine, t) for t in (a, b, c)] == [[1, 2, 3], [1, 2, 3, 4, 5], [1, 2, 3]]

    third = _claim(engine, [a, c], worker="w3", redelivered=True)  # another plan: not this checkpoint's job
    assert third.checkpoint is None and third.trial_ids == [a, c]
    assert [_epochs(engine, t) for t in (a, b, c)] == [[], [1, 2, 3, 4, 5], []]
    assert _checkpoint_row(engine, a) is None


def test_a_job_whose_first_trial_had_ended_still_finds_its_checkpoint(engine):
    """The checkpoint is found by the message's first trial, whether or not that one trains."""
    a, b, c = _submit_all(engine, JOB_SPEC)
    with session_scope(engine) as session:
        finish_trial(session, a, status="cancelled")
    first = _claim(engine, [a, b, c], worker="w1")
    assert (first.first_trial_id, first.trial_ids) == (a, [b, c])
    with session_scope(engine) as session:
        for trial_id in (b, c):
            record_epochs(session, trial_id, [_epoch(1), _epoch(2)], token=first.token)
        DatabaseStore().save(session, trial_ids=first.trial_ids, token=first.token, epoch=2, data=b"two",
                             first_trial_id=first.first_trial_id)
    second = _claim(engine, [a, b, c], worker="w2", redelivered=True)
    assert (second.checkpoint.epoch, second.trial_ids, sorted(second.claims)) == (2, [b, c], [b, c])
    assert _epochs(engine, b) == _epochs(engine, c) == [1, 2]


def test_a_folder_store_keeps_exactly_the_file_its_committed_row_names(engine, tmp_path):
    store = DirectoryStore(tmp_path / "checkpoints")
    trial_id = _submit(engine)
    folder = tmp_path / "checkpoints" / f"job-{trial_id}"
    job = _claim(engine, [trial_id], worker="w1")
    _save_with_rows(engine, store, job, epochs=range(1, 3), data=b"two")
    _save_with_rows(engine, store, job, epochs=range(3, 5), data=b"four")
    assert sorted(p.name for p in folder.iterdir()) == [f"attempt-{job.token}-epoch-4.pt"]

    with pytest.raises(RuntimeError, match="rolled back"):
        with session_scope(engine) as session:
            store.save(session, trial_ids=[trial_id], token=job.token, epoch=6, data=b"six")
            raise RuntimeError("rolled back")
    assert sorted(p.name for p in folder.iterdir()) == [f"attempt-{job.token}-epoch-4.pt"]
    with session_scope(engine) as session:
        stored = load_checkpoint(session, trial_id)
    assert (stored.epoch, stored.data) == (4, b"four")

    (folder / f"attempt-{job.token}-epoch-4.pt").write_bytes(b"fourteen")  # changed behind the store's back
    with session_scope(engine) as session:
        assert load_checkpoint(session, trial_id) is None  # sized first: never read as the checkpoint
    (folder / f"attempt-{job.token}-epoch-4.pt").unlink()  # a folder not shared with this worker, say
    with session_scope(engine) as session:
        assert load_checkpoint(session, trial_id) is None
    takeover = _claim(engine, [trial_id], worker="w2", redelivered=True)
    assert takeover.checkpoint is None and _epochs(engine, trial_id) == []


def test_a_stale_attempt_cannot_save_a_checkpoint(engine):
    trial_id = _submit(engine)
    stale = _claim(engine, [trial_id], worker="w1")
    _claim(engine, [trial_id], worker="w2", redelivered=True)

    with pytest.raises(TrialSuperseded):
        _save_with_rows(engine, DatabaseStore(), stale, epochs=range(1, 3), data=b"stale")
    assert _checkpoint_row(engine, trial_id) is None
    assert _epochs(engine, trial_id) == []


def test_a_trial_cancelled_while_its_worker_died_ends_cancelled_at_the_takeover(engine):
    trial_id = _submit(engine)
    job = _claim(engine, [trial_id], worker="w1")
    _save_with_rows(engine, DatabaseStore(), job, epochs=range(1, 4), data=b"three")
    with session_scope(engine) as session:
        record_epochs(session, trial_id, [_epoch(4)], token=job.token)
        cancel_experiment(session, session.get(Trial, trial_id).experiment_id)

    assert _claim(engine, [trial_id], worker="w2", redelivered=True).claims == {}
    with session_scope(engine) as session:
        trial = session.get(Trial, trial_id)
        assert (trial.status, trial.attempts) == ("cancelled", 1)
    assert _checkpoint_row(engine, trial_id) is None  # every trial of the job has ended: it goes
    assert _epochs(engine, trial_id) == [1, 2, 3, 4]


def test_a_checkpoint_over_the_cap_is_not_saved(engine, monkeypatch):
    monkeypatch.setattr("services.checkpoints.MAX_CHECKPOINT_BYTES", 100)
    trial_id = _submit(engine)
    job = _claim(engine, [trial_id], worker="w1")

    with pytest.raises(CheckpointNotSaved, match="over the .* cap"):
        _save_with_rows(engine, DatabaseStore(), job, epochs=range(1, 3), data=b"x" * 101)
    assert _checkpoint_row(engine, trial_id) is None
    assert _epochs(engine, trial_id) == []  # the rows stay pending for the next write


def test_the_checkpoint_cap_fits_the_largest_job_the_planner_makes():
    from services.checkpoints import MAX_CHECKPOINT_BYTES
    from services.planner import FUSED_WEIGHT_BUDGET

    # Weights, best weights and Adam's two moments of every stacked weight, as float32.
    assert MAX_CHECKPOINT_BYTES >= 4 * 4 * FUSED_WEIGHT_BUDGET


def test_requeue_drops_the_checkpoint_and_a_trial_out_of_attempts_says_why(engine):
    trial_id = _submit(engine)
    job = _claim(engine, [trial_id], worker="w1", max_attempts=2)
    _save_with_rows(engine, DatabaseStore(), job, epochs=range(1, 3), data=b"two")
    assert _claim(engine, [trial_id], worker="w2", redelivered=True, max_attempts=2).checkpoint.epoch == 2
    assert _claim(engine, [trial_id], worker="w3", redelivered=True, max_attempts=2).claims == {}
    with session_scope(engine) as session:
        trial = session.get(Trial, trial_id)
        assert trial.status == "failed" and trial.attempts == 2
        assert "gave up after 2 attempts (FITSCOPE_MAX_ATTEMPTS=2)" in trial.error

    _save_checkpoint_directly(engine, trial_id)
    with session_scope(engine) as session:
        requeue_trials(session, session.get(Trial, trial_id).experiment_id)
    assert _checkpoint_row(engine, trial_id) is None


def _save_checkpoint_directly(engine, trial_id: int) -> None:
    with session_scope(engine) as session:
        DatabaseStore().save(session, trial_ids=[trial_id], token="f" * 32, epoch=1, data=b"left over")


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


def _start(migrated_sqlite_url, broker_url, engine, spec_text: str = LONG_SPEC) -> list[int]:
    """Submit the spec and send its trials as ONE job (the planner is not what this is about)."""
    trial_ids = _submit_all(engine, spec_text)
    producer = make_celery(Settings(database_url=migrated_sqlite_url, broker_url=broker_url))
    enqueue_jobs(producer, [(trial_ids, "cpu")])
    return trial_ids


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


def _checkpointed(engine, first_trial_id: int, trial: Trial) -> int:
    """The epoch of the job's checkpoint when the attempt now running ``trial`` owns it, else 0."""
    row = _checkpoint_row(engine, first_trial_id)
    return row.epoch if row is not None and row.attempt_token == trial.attempt_token else 0


def _kill_training_process(trial: Trial, worker: WorkerProcess) -> int:
    """SIGKILL the pool child named by the trial's ``worker`` column ("node/pid"), after checking that
    it is a child of the worker this test started."""
    pid = int(trial.worker.rsplit("/", 1)[1])
    with open(f"/proc/{pid}/stat") as stat:
        parent = int(stat.read().rsplit(")", 1)[1].split()[1])
    assert parent == worker.process.pid, f"pid {pid} is not a training process of the test's worker"
    os.kill(pid, signal.SIGKILL)
    return pid


def _kill_at(engine, trial_ids: list[int], worker: WorkerProcess, targets: tuple[int, ...]) -> list[int]:
    """Kill the job's training process once per target: when the attempt running the job's last trial
    without early stopping has saved a checkpoint at or past the target epoch, so every kill lands at
    a different epoch and every next attempt has a checkpoint to resume from. Returns the killed pids."""
    with session_scope(engine) as session:
        watched = [trial_id for trial_id in trial_ids if session.get(Trial, trial_id).config["early_stopping"] is None]
    killed = []
    for kill, target in enumerate(targets, start=1):
        trial = _wait_for(engine, watched[-1], worker, lambda t, kill=kill, target=target: (
            t.status == "running" and t.attempts == kill and _checkpointed(engine, trial_ids[0], t) >= target))
        killed.append(_kill_training_process(trial, worker))
    return killed


def _uninterrupted(configs: list, parents: list | None = None) -> tuple[list, dict[int, list]]:
    """The job trained in this process, as the worker's training processes train it (one thread);
    ``parents``: the weights artifacts its fine-tuned trials start from."""
    import torch

    from worker.training.fused import train_fused

    rows: dict[int, list] = {index: [] for index in range(len(configs))}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = train_fused(configs, parents=parents, on_epoch=lambda epoch_rows: [
            rows[index].append(metrics) for index, metrics in epoch_rows.items()] and None)
    finally:
        torch.set_num_threads(threads)
    return results, rows


def _assert_as_uninterrupted(engine, trial_ids: list[int], parents: list | None = None) -> None:
    """Every trial: its status, every epoch row (once) and its final metrics bitwise those of the same
    job trained without a kill; timings aside."""
    from services.trial_config import TrialConfig

    with session_scope(engine) as session:
        trials = [session.get(Trial, trial_id) for trial_id in trial_ids]
        stored = {trial_id: session.scalars(select(EpochMetric).where(EpochMetric.trial_id == trial_id)
                                            .order_by(EpochMetric.epoch)).all() for trial_id in trial_ids}
    results, reference_rows = _uninterrupted([TrialConfig.model_validate(trial.config) for trial in trials], parents)
    fields = [f.name for f in dataclasses.fields(reference_rows[0][0]) if not f.name.endswith("_seconds")]
    for index, (trial, result) in enumerate(zip(trials, results, strict=True)):
        assert (trial.status, trial.best_epoch) == (result.status, result.best_epoch), trial.id
        assert [row.epoch for row in stored[trial.id]] == list(range(1, len(reference_rows[index]) + 1)), trial.id
        assert trial.epochs_done == len(reference_rows[index])
        assert [[getattr(row, name) for name in fields] for row in stored[trial.id]] == [
            [getattr(row, name) for name in fields] for row in reference_rows[index]], trial.id
        without_timings = {k: v for k, v in result.final_metrics.items() if not k.endswith("_seconds")}
        without_timings["trained_with"] = len(trial_ids)  # the job records it: trained in a stack of that many
        assert {k: v for k, v in trial.final_metrics.items() if not k.endswith("_seconds")} == without_timings
    assert _checkpoint_row(engine, trial_ids[0]) is None  # the job's end removed it


@pytest.mark.slow
@pytest.mark.parametrize("killable_worker", [10], indirect=True)
def test_a_trial_killed_five_times_resumes_to_the_uninterrupted_result(
        killable_worker, migrated_sqlite_url, broker_url, engine_for):
    engine = engine_for(migrated_sqlite_url)
    trial_ids = _start(migrated_sqlite_url, broker_url, engine)
    killed = _kill_at(engine, trial_ids, killable_worker, (7, 18, 28, 39, 51))
    trial = _wait_for(engine, trial_ids[0], killable_worker, lambda t: t.status != "running", timeout=180)

    log = killable_worker.log()
    assert trial.status == "succeeded", f"{trial.error}\n{log[-3000:]}"
    assert trial.attempts == 6 and len(set(killed)) == 5
    assert log.count("resumes after epoch") == 5, log[-3000:]
    _assert_as_uninterrupted(engine, trial_ids)


# 16 trials in one stack: four learning rates (the largest bounces or diverges), early stopping on
# half of them (those end early, some before a kill, some between two), dropout and a cosine schedule.
JOB_KILL_SPEC = """name: killed-job
seeds: [0, 1]
parameters:
  n_train: {value: 3000}
  width: {value: 32}
  dropout: {value: 0.1}
  schedule: {value: cosine}
  lr: {values: [1.0, 0.1, 0.01, 0.001]}
  early_stopping: {values: [null, {patience: 4}]}
  epochs: {value: 60}
"""


@pytest.mark.slow
@pytest.mark.parametrize("killable_worker", [10], indirect=True)
def test_a_fused_job_killed_three_times_resumes_to_the_uninterrupted_result(
        killable_worker, migrated_sqlite_url, broker_url, engine_for):
    engine = engine_for(migrated_sqlite_url)
    trial_ids = _start(migrated_sqlite_url, broker_url, engine, JOB_KILL_SPEC)
    assert len(trial_ids) == 16
    killed = _kill_at(engine, trial_ids, killable_worker, (9, 24, 39))
    for trial_id in trial_ids:
        _wait_for(engine, trial_id, killable_worker, lambda t: t.status != "running", timeout=240)

    log = killable_worker.log()
    assert len(set(killed)) == 3 and log.count("resumes after epoch") == 3, log[-3000:]
    with session_scope(engine) as session:
        trials = [session.get(Trial, trial_id) for trial_id in trial_ids]
    # Trials that ended before a kill stayed ended: fewer attempts than those that ran to the end.
    attempts = sorted({trial.attempts for trial in trials})
    assert attempts[-1] == 4 and attempts[0] < 4, attempts
    assert {trial.status for trial in trials} <= {"succeeded", "diverged"}
    _assert_as_uninterrupted(engine, trial_ids)


@pytest.mark.slow
@pytest.mark.parametrize("killable_worker", [2], indirect=True)
def test_a_trial_whose_worker_keeps_dying_ends_failed_naming_the_limit(
        killable_worker, migrated_sqlite_url, broker_url, engine_for):
    engine = engine_for(migrated_sqlite_url)
    [trial_id] = _start(migrated_sqlite_url, broker_url, engine)
    for attempt in (1, 2):
        trial = _wait_for(engine, trial_id, killable_worker, lambda t, attempt=attempt: (
            t.status == "running" and t.attempts == attempt and t.epochs_done >= 4))
        _kill_training_process(trial, killable_worker)
    trial = _wait_for(engine, trial_id, killable_worker, lambda t: t.status != "running")

    assert trial.status == "failed" and trial.attempts == 2
    assert trial.error.startswith("gave up after 2 attempts (FITSCOPE_MAX_ATTEMPTS=2): each one ended without "
                                  "a result")
    assert _checkpoint_row(engine, trial_id) is None
    assert _epochs(engine, trial_id) == list(range(1, trial.epochs_done + 1))


def test_a_checkpoint_that_does_not_fit_the_run_starts_the_job_over_instead_of_failing_it(
        migrated_sqlite_url, engine_for, monkeypatch):
    """A GPU generator's state (a device: auto trial that ran on a GPU) reaching a CPU worker."""
    import torch

    from services.config import get_settings
    from services.trial_config import TrialConfig
    from worker.jobs import execute_job
    from worker.training.checkpoint import job_state_from_bytes, job_state_to_bytes
    from worker.training.fused import train_fused

    monkeypatch.setenv("FITSCOPE_DATABASE_URL", migrated_sqlite_url)
    get_settings.cache_clear()
    engine = engine_for(migrated_sqlite_url)
    trial_id = _submit(engine)
    with session_scope(engine) as session:
        config = TrialConfig.model_validate(session.get(Trial, trial_id).config)
    first = _claim(engine, [trial_id], worker="w1")
    saved = []
    train_fused([config], checkpoint=lambda epoch, capture: epoch == 4 and saved.append(job_state_to_bytes(capture())))
    state = job_state_from_bytes(saved[0])
    alien = dataclasses.replace(state, trials=[dataclasses.replace(state.trials[0],
                                                                   noise_generator=torch.zeros(16, dtype=torch.uint8))])
    _save_with_rows(engine, DatabaseStore(), first, epochs=range(1, 5), data=job_state_to_bytes(alien))

    try:
        assert execute_job(engine, [trial_id], worker="w2", redelivered=True) == {str(trial_id): "succeeded"}
    finally:
        get_settings.cache_clear()
    with session_scope(engine) as session:
        trial = session.get(Trial, trial_id)
        assert (trial.status, trial.attempts) == ("succeeded", 2)
    assert _epochs(engine, trial_id) == list(range(1, 11))  # rows 1-4 of the dead attempt replaced
    assert trial.final_metrics["final_val_loss"] == train_fused([config])[0].final_metrics["final_val_loss"]
