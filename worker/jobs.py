"""One job, any number of trials: claim, epoch rows, checkpoints, finish and fail, in one place.

The task (worker/tasks.py) hands a job's trial ids here; a job of one trial is a stack of one.

- claim: all trials in one transaction, under one attempt token (services.trials.claim_job); trials
  with nothing to do (ended, taken) are skipped. A re-delivered job whose trials were all taken over
  resumes from its checkpoint, and trials that ended since it stay ended (they train again in the
  stack, so it is the very stack that was checkpointed, but nothing of theirs is written).
- rows: kept and written every ``FITSCOPE_METRICS_FLUSH_S`` in ONE transaction for all trials, each
  trial's guarded by the attempt's token: a trial another attempt took over is dropped from the job
  alone, and a trial whose cancel flag is set is stopped alone, at that epoch boundary. Between
  writes, at an epoch boundary at least ``STOP_FLAGS_EVERY_S`` after the last read, one light SELECT
  reads every trial's cancel flag and owner, so a cancel stops a trial within one epoch (within that
  long, for shorter epochs) whatever the flush interval. One transaction per epoch cost ~3.6 ms on
  SQLite, a third of a small trial's time; the read at every epoch still cost ~0.5 ms of 7 ms.
- checkpoints: every ``FITSCOPE_CHECKPOINT_EVERY_EPOCHS`` epochs or ``_EVERY_S`` seconds (but no more
  often than the flush), the pending rows and the job's checkpoint go in ONE transaction, so a takeover
  finds rows exactly up to the checkpoint; saved only while the attempt still holds one of the trials.
- end: a trial's last rows and final status right after the epoch it ended in; the job's checkpoint
  goes with the last of them. A failure (a bug, a device that is not there) fails the trials still
  training, keeping their rows; trials that ended stay as they ended.
- the database: every write waits out an outage (``FITSCOPE_DB_RETRY_DELAYS_S``, up to
  ``FITSCOPE_DB_WAIT_S`` in all) while the engine waits for it; past that, DatabaseDown re-queues the
  job, which then resumes from its checkpoint.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError

from services.checkpoints import CheckpointNotSaved, checkpoint_store, delete_checkpoints
from services.config import Settings, get_settings
from services.db import session_scope
from services.models import TrialStatus
from services.trials import (
    ClaimedJob,
    Ending,
    TrialSuperseded,
    claim_job,
    finish_trial,
    finish_trials,
    new_token,
    read_stop_flags,
    record_epochs,
    record_job_epochs,
    restart_job,
)

log = logging.getLogger(__name__)


# Between two writes of rows, the cancel flags are read at an epoch boundary at most this often: under
# the ~0.2 s epochs that tests/integration/test_cancel.py times, so a cancel still stops a trial within one
# epoch (0.25 s let a read fall two epochs after the last and the trial ran a third epoch), while a job of
# 7 ms epochs reads once in ~14 epochs instead of at each.
STOP_FLAGS_EVERY_S = 0.1


class DatabaseDown(RuntimeError):
    """A write kept failing for FITSCOPE_DB_WAIT_S; the job must be sent again (it resumes)."""


class CannotResume(ValueError):
    """The job's checkpoint cannot be resumed from (unreadable, or not this job's); nothing ran."""


def write_with_retry(engine: Engine, write: Callable[[Any], Any], *, settings: Settings | None = None):
    """Run ``write(session)`` in its own transaction, waiting out a database outage: tries again after
    each of FITSCOPE_DB_RETRY_DELAYS_S (the last repeating) until FITSCOPE_DB_WAIT_S have passed, then
    raises DatabaseDown."""
    settings = settings or get_settings()
    delays, waited_s, tries = settings.db_retry_delays_s, 0.0, 0
    while True:
        try:
            with session_scope(engine) as session:
                return write(session)
        except (OperationalError, InterfaceError) as exc:
            delay = delays[min(tries, len(delays) - 1)]
            if waited_s + delay > settings.db_wait_s:
                raise DatabaseDown(f"the database did not answer for {waited_s:.0f} s ({exc.orig})") from None
            log.warning("database write failed (%s); retrying in %s s", exc.orig, delay)
            time.sleep(delay)
            waited_s, tries = waited_s + delay, tries + 1


def execute_job(engine: Engine, trial_ids: list[int], *, worker: str, redelivered: bool) -> dict[str, str]:
    """Claim and train a job; returns {trial id: final status} ("skipped" for trials with nothing to
    do, "superseded" for those another attempt took over meanwhile). Raises DatabaseDown."""
    settings = get_settings()
    cpu_started = time.process_time()
    token, tries = new_token(), 0

    def claim(session) -> ClaimedJob:
        # A failed try may have committed before the connection dropped; then the trials are already
        # ours, "running", so a later try takes them over rather than skipping them for ever.
        nonlocal tries
        tries += 1
        return claim_job(session, trial_ids, worker=worker, max_attempts=settings.max_attempts,
                         redelivered=redelivered or tries > 1, token=token)

    job = write_with_retry(engine, claim, settings=settings)
    statuses = {str(trial_id): "skipped" for trial_id in trial_ids}
    if job.claims:
        run = JobRun(engine, job, settings=settings, cpu_started=cpu_started)
        statuses.update({str(k): v for k, v in run.run().items()})
    return statuses


class JobRun:
    """One attempt at a claimed job: the engine's hooks and every write the attempt makes."""

    def __init__(self, engine: Engine, job: ClaimedJob, *, settings: Settings, cpu_started: float | None = None
                 ) -> None:
        self.engine, self.job, self.settings = engine, job, settings
        # This process's CPU seconds since the job's claim began, and those spent training in the engine
        # (its calls into the hooks below excluded): what the service costs around the engine, per job.
        self.cpu_started = time.process_time() if cpu_started is None else cpu_started
        self.engine_cpu_s = 0.0
        self.store = checkpoint_store(settings.checkpoint_url)
        self.live = set(job.claims)  # claimed trials not ended and not superseded
        self.pending: dict[int, list[dict[str, Any]]] = {trial_id: [] for trial_id in job.claims}
        self.statuses: dict[int, str] = {}
        # Trials some of whose rows this attempt has written; a trial's rows are all in memory until then
        # (its claim removed any earlier ones), unless it resumed from a checkpoint.
        self.rows_written: set[int] = set()
        # Whether a checkpoint of this job may be this attempt's (adopted, or saved): else there is none to delete.
        self.holds_checkpoint = job.checkpoint is not None
        self.stack = list(job.trial_ids)  # engine index -> trial id
        self._last_flush = self._last_checkpoint_at = self._last_read = time.monotonic()
        self._last_checkpoint_epoch = job.checkpoint.epoch if job.checkpoint else 0

    def run(self) -> dict[int, str]:
        """Train the job through the engine; returns {trial id: status} for every claimed trial."""
        from pydantic import ValidationError

        from services.trial_config import TrialConfig
        from worker.training import DeviceUnavailable

        started = time.perf_counter()
        try:
            try:
                configs = [TrialConfig.model_validate(self.job.configs[i]) for i in self.stack]
            except ValidationError as exc:
                return self._fail(f"a stored trial config is not valid: {exc}")
            resume = self.job.checkpoint.data if self.job.checkpoint else None
            if resume is None and (configs := self._admitted(configs)) == []:
                return {trial_id: self.statuses.get(trial_id, "superseded") for trial_id in self.job.claims}
            if resume is not None:
                log.info("job of trials %s: attempt %s resumes after epoch %s", sorted(self.job.claims),
                         self.job.token[:8], self.job.checkpoint.epoch)
            try:
                self._train(configs, resume=resume)
            except CannotResume as exc:  # nothing ran: start over, without the trials that ended
                self._start_over(exc)
                if self.stack:
                    self._train([TrialConfig.model_validate(self.job.configs[i]) for i in self.stack], resume=None)
        except DatabaseDown:
            raise
        except DeviceUnavailable as exc:
            return self._fail(str(exc))
        except Exception as exc:  # a bug or bad state must fail these trials, not take the worker down
            log.exception("job of trials %s failed", sorted(self.job.claims))
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            return self._fail(f"{detail}\n{traceback.format_exc(limit=8)}")
        if self.live:  # the engine returned without a result for them: never expected, never silent
            self._fail("the engine ended without a result for this trial")
        log.info("job of %d trials trained in %.1f s; CPU %.4f s in the engine, %.4f s around it", len(self.stack),
                 time.perf_counter() - started, self.engine_cpu_s,
                 time.process_time() - self.cpu_started - self.engine_cpu_s)
        return {trial_id: self.statuses.get(trial_id, "superseded") for trial_id in self.job.claims}

    def _admitted(self, configs: list) -> list:
        """The configs this worker can hold; a trial it cannot (services/admission.py) fails alone, before
        anything is allocated, and leaves the stack."""
        from services.admission import claim_problem, csv_shape, job_problem

        # A CSV data set's size, as submit measured it (a fused job's trials share their data); none to
        # read for a generated one (a transaction of nothing still cost ~0.3 ms a job).
        shape = (write_with_retry(self.engine, lambda session: csv_shape(session, configs[0]), settings=self.settings)
                 if getattr(configs[0].dataset, "sha256", None) else None)
        refused = {self.stack[i]: problem for i, config in enumerate(configs)
                   if (problem := claim_problem(config, csv_shape=shape))}
        for trial_id, problem in refused.items():
            self._fail(problem, trials={trial_id})
        kept = [i for i, trial_id in enumerate(self.stack) if trial_id not in refused]
        self.stack = [self.stack[i] for i in kept]
        configs = [configs[i] for i in kept]
        if problem := job_problem(configs, csv_shape=shape):
            self._fail(problem)
            return []
        return configs

    def _train(self, configs: list, *, resume: bytes | None) -> None:
        """THE call into the engine, for every job: a job of one trial is a stack of one."""
        from worker.training.checkpoint import CheckpointUnreadable, job_state_from_bytes, job_state_to_bytes
        from worker.training.fused import train_fused
        from worker.training.results import CannotResume as EngineCannotResume

        csv_content = self._csv_content(configs[0])
        parents = parents_of(self.engine, configs, settings=self.settings)
        try:
            state = job_state_from_bytes(resume) if resume is not None else None
            if state is not None and state.epoch != self.job.checkpoint.epoch:
                raise CannotResume(f"it holds epoch {state.epoch}, its row says {self.job.checkpoint.epoch}")
            hooks, cpu_started = _HookClock(), time.process_time()
            try:
                train_fused(configs, on_epoch=hooks.timed(self.on_epoch),
                            on_trials_end=hooks.timed(self.on_trials_end),
                            checkpoint=hooks.timed(lambda epoch, capture: self.checkpoint(
                                epoch, lambda: job_state_to_bytes(capture()))),
                            resume=state, csv_content=csv_content, parents=parents)
            finally:
                self.engine_cpu_s += time.process_time() - cpu_started - hooks.cpu_s
        except (CheckpointUnreadable, EngineCannotResume) as exc:
            raise CannotResume(str(exc)) from None

    # --- the engine's hooks ------------------------------------------------------------------------

    def on_epoch(self, rows: dict[int, Any]) -> set[int]:
        """Keep the epoch's rows; write them when due. Returns the engine indices to stop: trials
        cancelled or superseded, and every trial once none of the claimed ones is left."""
        for index, metrics in rows.items():
            trial_id = self.stack[index]
            if trial_id in self.live:
                # A shallow copy: dataclasses.asdict deep-copies each value, ~0.1 ms an epoch for nothing
                # (the engine makes a new row, and a new list in it, every epoch).
                self.pending[trial_id].append(dict(vars(metrics)))
        now = time.monotonic()
        if now - self._last_flush >= self.settings.metrics_flush_s:
            cancelled = self._write(lambda session: None)
        elif now - self._last_read >= STOP_FLAGS_EVERY_S:
            cancelled = self._read_flags()
        else:
            cancelled = set()
        if not self.live:
            return set(rows)
        return {i for i in rows if self.stack[i] in cancelled or self.statuses.get(self.stack[i]) == "superseded"}

    def checkpoint(self, epoch: int, capture: Callable[[], bytes]) -> None:
        """Save the job's checkpoint when due, with the rows up to ``epoch``, in one transaction."""
        since_s = time.monotonic() - self._last_checkpoint_at
        by_count = self.settings.checkpoint_every_epochs and (
            epoch - self._last_checkpoint_epoch >= self.settings.checkpoint_every_epochs)
        by_time = self.settings.checkpoint_every_s and since_s >= self.settings.checkpoint_every_s
        if not (by_count or by_time) or since_s < self.settings.metrics_flush_s or not self.live:
            return
        data = capture()
        self._last_checkpoint_epoch, self._last_checkpoint_at = epoch, time.monotonic()

        def save(session) -> None:
            if self.live:  # still holding one trial of the job, checked (and locked) by the rows' writes
                self.holds_checkpoint = True  # set even if this rolls back: a needless delete costs nothing
                self.store.save(session, trial_ids=self.stack, token=self.job.token, epoch=epoch, data=data,
                                first_trial_id=self.job.first_trial_id)

        try:
            self._write(save)
        except CheckpointNotSaved as exc:  # rolled back; the rows stay pending for the next write
            log.warning("%s", exc)

    def on_trials_end(self, results: dict[int, Any]) -> None:
        """Write the last rows and the final status of the claimed trials that just ended, in one
        transaction (with the job's checkpoint once none is left)."""
        ended = {self.stack[i]: result for i, result in results.items() if self.stack[i] in self.live}
        if not ended:
            return

        endings = [Ending(trial_id=trial_id, status=TrialStatus(result.status),
                          final_metrics={**result.final_metrics, "trained_with": len(self.stack)},
                          best_epoch=result.best_epoch, error=result.message,
                          artifacts=_with_weights(result.artifacts, result.best_weights),
                          range_test=self.job.configs[trial_id].get("schedule") == "lr_range_test",
                          rows=self.pending[trial_id],
                          rows_stored=self.job.checkpoint is not None or trial_id in self.rows_written)
                   for trial_id, result in ended.items()]

        def finish(session) -> set[int]:
            # Rows, progress and status of all of them in one guarded UPDATE a trial and a few statements
            # (services.trials.finish_trials).
            superseded = finish_trials(session, endings, token=self.job.token)
            for trial_id in sorted(superseded):
                log.warning("trial %s: attempt %s no longer owns it; its results are dropped", trial_id,
                            self.job.token[:8])
            if not self.live - set(ended) and self.holds_checkpoint:
                delete_checkpoints(session, [self.job.first_trial_id], token=self.job.token)
            return superseded

        superseded = write_with_retry(self.engine, finish, settings=self.settings)
        for trial_id, result in ended.items():
            self.pending[trial_id] = []
            self.statuses[trial_id] = "superseded" if trial_id in superseded else result.status
        self.live -= set(ended)

    # --- writes ------------------------------------------------------------------------------------

    def _write(self, also: Callable[[Any], None]) -> set[int]:
        """The pending rows of every live trial, then ``also(session)``, in one transaction; trials
        another attempt took over are dropped from the job. Returns the trials asked to stop."""

        def write(session) -> tuple[set[int], set[int]]:
            cancelled, superseded = record_job_epochs(
                session, {trial_id: self.pending[trial_id] for trial_id in sorted(self.live)}, token=self.job.token)
            for trial_id in sorted(superseded):  # nothing was written for it; the others go on
                log.warning("trial %s: attempt %s no longer owns it; dropping it from its job", trial_id,
                            self.job.token[:8])
            self.live -= superseded  # read by ``also``; restored below if this transaction rolls back
            try:
                also(session)
            except BaseException:
                self.live |= superseded
                raise
            return cancelled, superseded

        live_before = set(self.live)
        try:
            cancelled, superseded = write_with_retry(self.engine, write, settings=self.settings)
        except BaseException:
            self.live = live_before
            raise
        for trial_id in live_before:
            if self.pending[trial_id]:
                self.rows_written.add(trial_id)
            self.pending[trial_id] = []
        self._drop(superseded)
        self._last_flush = self._last_read = time.monotonic()
        return cancelled

    def _read_flags(self) -> set[int]:
        """Trials asked to stop, in one SELECT outside any transaction; those no longer this attempt's
        are dropped. Not retried: a database that does not answer now is waited out by the next write."""
        try:
            with self.engine.connect() as connection:
                cancelled, superseded = read_stop_flags(connection, dict.fromkeys(self.live, self.job.token))
        except (OperationalError, InterfaceError) as exc:
            log.warning("cannot read the cancel flags of a job (%s); trying again next epoch", exc.orig)
            return set()
        self._last_read = time.monotonic()
        for trial_id in superseded:
            log.warning("trial %s: attempt %s no longer owns it; dropping it from its job", trial_id,
                        self.job.token[:8])
        self._drop(superseded)
        return cancelled

    def _drop(self, superseded: set[int]) -> None:
        self.live -= superseded
        for trial_id in superseded:
            self.statuses[trial_id] = "superseded"
            self.pending[trial_id] = []

    def _fail(self, error: str, *, trials: set[int] | None = None) -> dict[int, str]:
        """Keep each live trial's rows that ran, then mark it failed with ``error``, all in one
        transaction with the job's checkpoint; trials that ended stay as they ended. ``trials``: only
        these (the job goes on without them), and the checkpoint stays."""
        failing = set(self.live) if trials is None else set(trials) & self.live

        def fail(session) -> set[int]:
            superseded = set()
            for trial_id in sorted(failing):
                try:
                    record_epochs(session, trial_id, self.pending[trial_id], token=self.job.token)
                    finish_trial(session, trial_id, status=TrialStatus.failed, error=error, token=self.job.token)
                except TrialSuperseded:
                    superseded.add(trial_id)
            if trials is None:
                delete_checkpoints(session, [self.job.first_trial_id], token=self.job.token)
            return superseded

        superseded = write_with_retry(self.engine, fail, settings=self.settings)
        self._drop(superseded)
        for trial_id in failing - superseded:
            self.statuses[trial_id] = TrialStatus.failed.value
        self.live -= failing
        return {trial_id: self.statuses.get(trial_id, "superseded") for trial_id in self.job.claims}

    def _start_over(self, reason: Exception) -> None:
        """The checkpoint cannot be used: the claimed trials train from epoch 1, alone in the stack."""
        log.warning("job of trials %s: %s; starting over from epoch 1", sorted(self.job.claims), reason)
        superseded = write_with_retry(self.engine, lambda session: restart_job(session, self.job),
                                      settings=self.settings)
        self._drop(superseded)
        self.stack = [trial_id for trial_id in self.stack if trial_id in self.live]
        self._last_checkpoint_epoch = 0

    def _csv_content(self, config) -> bytes | None:
        return csv_content_of(self.engine, config, settings=self.settings)


class _HookClock:
    """The CPU seconds this process spends in the hooks it times: the service's work inside the engine's call."""

    def __init__(self) -> None:
        self.cpu_s = 0.0

    def timed(self, hook: Callable) -> Callable:
        def run(*args):
            started = time.process_time()
            try:
                return hook(*args)
            finally:
                self.cpu_s += time.process_time() - started

        return run


def _with_weights(artifacts: dict, best_weights: dict | None) -> dict:
    """The pictures, and the best weights a fine-tuned trial may start from (init_from)."""
    from services.fine_tuning import WEIGHTS_KIND

    return artifacts if best_weights is None else {**artifacts, WEIGHTS_KIND: best_weights}


def parents_of(engine: Engine, configs: list, *, settings: Settings | None = None) -> list[dict | None] | None:
    """Per config, the best-epoch weights its ``init_from`` trial kept (None: it starts from its own
    draw); None when no config fine-tunes. Read like a write, retried through an outage. Raises
    ValueError (the job fails, saying why) when a parent's weights are gone since submit (re-queued)."""
    from sqlalchemy import select

    from services.fine_tuning import WEIGHTS_KIND
    from services.models import TrialArtifact

    wanted = sorted({config.init_from for config in configs if config.init_from is not None})
    if not wanted:
        return None
    found = write_with_retry(engine, lambda session: dict(session.execute(
        select(TrialArtifact.trial_id, TrialArtifact.data).where(
            TrialArtifact.trial_id.in_(wanted), TrialArtifact.kind == WEIGHTS_KIND)).all()), settings=settings)
    if missing := [trial_id for trial_id in wanted if trial_id not in found]:
        raise ValueError(f"init_from: trial {missing[0]} no longer keeps its best weights (re-queued since this "
                         "trial was submitted?); re-queue this trial once it has succeeded again")
    return [found.get(config.init_from) if config.init_from is not None else None for config in configs]


def csv_content_of(engine: Engine, config, *, settings: Settings | None = None) -> bytes | None:
    """The stored CSV a trial trains on, or None for a generated data set. Retried like a write: a
    database outage here must re-queue the job, not fail it."""
    from services.datasets import load_dataset_content
    from services.trial_config import CsvDataset

    if not isinstance(config.dataset, CsvDataset) or config.dataset.sha256 is None:
        return None
    sha256 = config.dataset.sha256
    return write_with_retry(engine, lambda session: load_dataset_content(session, sha256), settings=settings)
