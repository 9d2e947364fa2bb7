"""Celery tasks: thin, like web views. They take a trial id, claim it, call the training engine and
persist what it reports. A message re-delivered for a trial that has ended does nothing."""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError

from services.checkpoints import CheckpointNotSaved, CheckpointStore, checkpoint_store
from services.config import get_settings
from services.db import make_engine, session_scope
from services.models import TrialStatus
from services.queue import RUN_TRIAL_TASK
from services.trials import (
    Claim,
    TrialSuperseded,
    claim_trial,
    finish_trial,
    read_cancel_flag,
    record_epochs,
    restart_trial,
)

if TYPE_CHECKING:  # the main process never imports torch: it forks the training processes
    from worker.training.loop import TrainingState

log = logging.getLogger(__name__)
# A database that stops answering is waited for (about a minute in all) before a write gives up.
DB_RETRY_DELAYS_S = (1, 2, 4, 8, 15, 30)
# A trial whose results could not be written is re-queued, as a takeover, this many times.
PERSIST_RETRIES = 3
_engine: Engine | None = None


def get_engine() -> Engine:
    global _engine
    if _engine is None:
        _engine = make_engine(get_settings().effective_database_url)
    return _engine


def reset_process_state() -> None:
    """Called in each new pool process: never reuse connections inherited through a fork."""
    global _engine
    if _engine is not None:
        _engine.dispose(close=False)
    _engine = None


def register(app: Celery) -> None:
    # In the worker's main process, at start: a checkpoint folder that cannot be written is a
    # ConfigError (one sentence naming FITSCOPE_CHECKPOINT_URL) now, not a warning per trial later.
    checkpoint_store(get_settings().checkpoint_url).check()
    app.task(name=RUN_TRIAL_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)(run_trial)


class DatabaseDown(RuntimeError):
    """A write kept failing for about a minute; the trial's work so far could not be kept."""


def run_trial(task: Task, trial_id: int, takeover: bool = False) -> str:
    """Train one trial end to end; returns its final status ("skipped" when there is nothing to do,
    "superseded" when another attempt took the trial over meanwhile)."""
    engine = get_engine()
    try:
        [claim] = claim_with_retry(engine, task, [int(trial_id)], takeover=takeover)
    except DatabaseDown as exc:
        # Acknowledging now would leave the trial "queued" for ever with no message: send it again.
        log.error("trial %s: cannot claim it, %s; re-queueing it", trial_id, exc)
        raise task.retry(kwargs={"takeover": True}, countdown=DB_RETRY_DELAYS_S[-1],
                         max_retries=PERSIST_RETRIES) from None
    if claim is None:
        log.info("trial %s: nothing to do (already ended or taken)", trial_id)
        return "skipped"
    try:
        return execute_claim(engine, claim)
    except DatabaseDown as exc:
        # Acknowledging now would leave the trial "running" for ever: send it again as a takeover.
        log.error("trial %s: %s; re-queueing it", trial_id, exc)
        raise task.retry(kwargs={"takeover": True}, countdown=DB_RETRY_DELAYS_S[-1],
                         max_retries=PERSIST_RETRIES) from None


def claim_with_retry(engine: Engine, task: Task, trial_ids: list[int], *, takeover: bool) -> list[Claim | None]:
    """Claim the trials for this task's training process, in one transaction waited out like any
    write (raises DatabaseDown); a claim is None where there is nothing to do."""
    worker = f"{task.request.hostname or socket.gethostname()}/{os.getpid()}"[:200]
    redelivered = takeover or bool((task.request.delivery_info or {}).get("redelivered"))
    max_attempts = get_settings().max_attempts
    tries = 0

    def claim_all(session) -> list[Claim | None]:
        # A failed try may have committed before the connection dropped; then the trials are already
        # ours, "running", so a later try takes them over rather than skipping them for ever.
        nonlocal tries
        tries += 1
        return [claim_trial(session, trial_id, worker=worker, max_attempts=max_attempts,
                            redelivered=redelivered or tries > 1) for trial_id in trial_ids]

    return write_with_retry(engine, claim_all)


def write_with_retry(engine: Engine, write):
    """Run ``write(session)`` in its own transaction, waiting out a database outage with backoff."""
    delays_s = DB_RETRY_DELAYS_S
    for delay in (*delays_s, None):
        try:
            with session_scope(engine) as session:
                return write(session)
        except (OperationalError, InterfaceError) as exc:
            if delay is None:
                raise DatabaseDown(f"the database did not answer for {sum(delays_s)} s ({exc.orig})") from None
            log.warning("database write failed (%s); retrying in %s s", exc.orig, delay)
            time.sleep(delay)


class EpochBuffer:
    """The engine's ``on_epoch`` and ``checkpoint`` hooks for one claimed trial.

    Rows: kept and written at most every ``flush_s`` seconds (one transaction per write). One
    transaction per epoch cost ~3.6 ms on SQLite, a third of a small trial's time; the rows still
    reach the database as the trial runs, and the last ones are written with the trial's final status.

    Cancel: read at every epoch boundary, by the flush's transaction or else by one light SELECT
    (~0.1 ms on SQLite), so a cancelled trial stops within one epoch whatever ``flush_s`` is.

    Checkpoints: every ``every_epochs`` epochs or ``every_s`` seconds since the last one (0 turns
    either off), but no more often than ``flush_s``, the pending rows and the checkpoint of their
    last epoch are written in ONE transaction, guarded by the attempt: a takeover then finds rows
    exactly up to the checkpoint. A save costs ~4 ms on SQLite: every 10 epochs of 8 ms would be 5%
    of the training time, and a trial shorter than ``flush_s`` loses less than that to a kill.
    """

    def __init__(self, engine: Engine, claim: Claim, *, flush_s: float, store: CheckpointStore | None = None,
                 every_epochs: int = 0, every_s: float = 0.0) -> None:
        self.engine, self.claim, self.flush_s = engine, claim, flush_s
        self.store, self.every_epochs, self.every_s = store, every_epochs, every_s
        self.pending: list[dict[str, Any]] = []
        self._last_flush = self._last_checkpoint_at = time.monotonic()
        self._last_checkpoint_epoch = claim.resume_epoch or 0

    def __call__(self, metrics) -> bool:
        self.pending.append(asdict(metrics))
        if time.monotonic() - self._last_flush < self.flush_s:
            return self._cancel_requested()
        cancel_requested = write_with_retry(self.engine, lambda session: record_epochs(
            session, self.claim.trial_id, self.pending, attempt=self.claim.attempt))
        self.pending.clear()
        self._last_flush = time.monotonic()
        return cancel_requested

    def checkpoint(self, epoch: int, capture) -> None:
        """The engine's checkpoint hook: save when due, with the rows up to ``epoch``."""
        if self.store is None or not self._checkpoint_due(epoch):
            return
        from worker.training.checkpoint import state_to_bytes

        data = state_to_bytes(capture())

        def save(session) -> None:
            record_epochs(session, self.claim.trial_id, self.pending, attempt=self.claim.attempt)
            self.store.save(session, trial_id=self.claim.trial_id, attempt=self.claim.attempt, epoch=epoch,
                            data=data)

        self._last_checkpoint_epoch, self._last_checkpoint_at = epoch, time.monotonic()
        try:
            write_with_retry(self.engine, save)
        except CheckpointNotSaved as exc:  # rolled back; the rows stay pending for the next write
            log.warning("%s", exc)
            return
        self.pending.clear()
        self._last_flush = time.monotonic()

    def _checkpoint_due(self, epoch: int) -> bool:
        since_s = time.monotonic() - self._last_checkpoint_at
        by_count = self.every_epochs and epoch - self._last_checkpoint_epoch >= self.every_epochs
        by_time = self.every_s and since_s >= self.every_s
        return bool(by_count or by_time) and since_s >= self.flush_s

    def _cancel_requested(self) -> bool:
        # Not retried: a database that does not answer now is waited out by the next write.
        try:
            with self.engine.connect() as connection:
                return read_cancel_flag(connection, self.claim.trial_id, attempt=self.claim.attempt)
        except (OperationalError, InterfaceError) as exc:
            log.warning("trial %s: cannot read its cancel flag (%s); trying again next epoch",
                        self.claim.trial_id, exc.orig)
            return False


def execute_claim(engine: Engine, claim: Claim) -> str:
    """Run a claimed trial through the engine, writing its epoch rows as it runs."""
    from services.admission import claim_problem
    from services.trial_config import TrialConfig
    from worker.training import DeviceUnavailable, train_trial
    from worker.training.loop import CannotResume

    settings = get_settings()
    try:
        claim, resume_from = _resume_state(engine, claim)
        buffer = _epoch_buffer(engine, claim, settings)
        try:
            config = TrialConfig.model_validate(claim.config)
            if problem := claim_problem(config):  # refused before it allocates anything (services/admission.py)
                raise DeviceUnavailable(problem)
            csv = csv_content_of(engine, config)
            try:
                result = train_trial(config, on_epoch=buffer, checkpoint=buffer.checkpoint, resume_from=resume_from,
                                     **csv)
            except CannotResume as exc:  # nothing ran: start over, as with an unreadable checkpoint
                claim = _start_over(engine, claim, exc)
                buffer = _epoch_buffer(engine, claim, settings)
                result = train_trial(config, on_epoch=buffer, checkpoint=buffer.checkpoint, **csv)
        except (TrialSuperseded, DatabaseDown):
            raise
        except DeviceUnavailable as exc:
            return _fail(engine, claim, str(exc), buffer.pending)
        except Exception as exc:  # a bug or bad state in one trial must not take the worker down
            log.exception("trial %s failed", claim.trial_id)
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            return _fail(engine, claim, f"{detail}\n{traceback.format_exc(limit=8)}", buffer.pending)

        def finish(session) -> None:
            record_epochs(session, claim.trial_id, buffer.pending, attempt=claim.attempt)
            finish_trial(session, claim.trial_id, status=TrialStatus(result.status),
                         final_metrics={**result.final_metrics, "trained_with": 1}, best_epoch=result.best_epoch,
                         error=result.message, artifacts=result.artifacts, attempt=claim.attempt)

        write_with_retry(engine, finish)
        return result.status
    except TrialSuperseded as exc:
        log.warning("%s; stopping without writing more", exc)
        return "superseded"


def _epoch_buffer(engine: Engine, claim: Claim, settings) -> EpochBuffer:
    return EpochBuffer(engine, claim, flush_s=settings.metrics_flush_s, store=checkpoint_store(settings.checkpoint_url),
                       every_epochs=settings.checkpoint_every_epochs, every_s=settings.checkpoint_every_s)


def _resume_state(engine: Engine, claim: Claim) -> tuple[Claim, TrainingState | None]:
    """The claim to run and the TrainingState it resumes from: None for a fresh start, or when the
    checkpoint cannot be read (then the trial starts over, see :func:`_start_over`)."""
    if claim.checkpoint is None:
        return replace(claim, resume_epoch=None), None
    from worker.training.checkpoint import CheckpointUnreadable, state_from_bytes

    try:
        state = state_from_bytes(claim.checkpoint)
        if state.epoch != claim.resume_epoch:
            raise CheckpointUnreadable(f"it holds epoch {state.epoch}, its row says {claim.resume_epoch}")
    except CheckpointUnreadable as exc:
        return _start_over(engine, claim, exc), None
    log.info("trial %s: attempt %s resumes after epoch %s", claim.trial_id, claim.attempt, state.epoch)
    return claim, state


def _start_over(engine: Engine, claim: Claim, reason: Exception) -> Claim:
    """The claim's checkpoint cannot be used: drop it and the trial's rows (one transaction) and run
    this attempt from epoch 1."""
    log.warning("trial %s: %s; starting over from epoch 1", claim.trial_id, reason)
    write_with_retry(engine, lambda session: restart_trial(session, claim.trial_id, attempt=claim.attempt))
    return replace(claim, resume_epoch=None, checkpoint=None)


def csv_content_of(engine: Engine, config) -> dict[str, bytes]:
    """``{"csv_content": bytes}`` for a trial on a stored CSV data set, else nothing."""
    from services.datasets import load_dataset_content
    from services.trial_config import CsvDataset

    if not isinstance(config.dataset, CsvDataset) or config.dataset.sha256 is None:
        return {}
    # Retried like a write: a database outage here must re-queue the trial, not fail it.
    sha256 = config.dataset.sha256
    return {"csv_content": write_with_retry(engine, lambda session: load_dataset_content(session, sha256))}


def _fail(engine: Engine, claim: Claim, error: str, pending: list[dict[str, Any]]) -> str:
    """Keep the epochs that ran, then mark the trial failed, in one transaction."""

    def fail(session) -> None:
        record_epochs(session, claim.trial_id, pending, attempt=claim.attempt)
        finish_trial(session, claim.trial_id, status=TrialStatus.failed, error=error, attempt=claim.attempt)

    write_with_retry(engine, fail)
    return TrialStatus.failed.value
