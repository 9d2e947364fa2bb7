"""The fused-job task: several trial ids, claimed one by one and trained as one batched model.

Like worker/tasks.py's run_trial, it is thin: it claims, calls the engine (worker/training/fused.py)
and persists what it reports, and each trial keeps its own life in the database:

- claim: each id with claim_trial; ids with nothing to do (ended, taken) are skipped. A trial whose
  claim carries a checkpoint (a one-trial run that died) resumes through the one-trial path.
- rows: every ``FITSCOPE_METRICS_FLUSH_S`` the rows of all trials go in ONE transaction, each trial's
  guarded by its attempt: a trial taken over meanwhile (TrialSuperseded) is dropped from the job
  alone, and a trial whose cancel flag is set is stopped alone, at that epoch boundary. At the
  other epoch boundaries one light SELECT reads every trial's cancel flag (and ownership), so a
  cancel stops a fused trial within one epoch too.
- end: a trial's last rows and final status right after the epoch it ended in (early stopping,
  its own number of epochs, divergence, cancel), one transaction for all that ended together.
- trials that cannot be fused together after all (a re-queue mixed them) run as their own groups,
  single trials through the one-trial path.

A re-delivered job (its worker died) claims again with ``redelivered``: trials that ended are
skipped, running ones are taken over and restart from epoch 1 (fused jobs do not checkpoint).
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import asdict
from typing import Any

from celery import Celery, Task
from sqlalchemy import Engine, select
from sqlalchemy.exc import InterfaceError, OperationalError

from services.config import get_settings
from services.models import Trial, TrialStatus
from services.planner import plan_jobs
from services.queue import RUN_JOB_TASK
from services.trials import Claim, TrialSuperseded, finish_trial, record_epochs
from worker.tasks import (
    DB_RETRY_DELAYS_S,
    PERSIST_RETRIES,
    DatabaseDown,
    claim_with_retry,
    csv_content_of,
    execute_claim,
    get_engine,
    write_with_retry,
)

log = logging.getLogger(__name__)
MAX_JOB_TRIALS = 4096  # the most ids one message may carry (FITSCOPE_FUSE_MAX_TRIALS is at most this)


def register(app: Celery) -> None:
    app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)(run_job)


def run_job(task: Task, trial_ids: list[int], takeover: bool = False) -> dict[str, str]:
    """Train these trials fused; returns {trial id: final status} ("skipped" for those with nothing
    to do, "superseded" for those another attempt took over meanwhile)."""
    if len(trial_ids) > MAX_JOB_TRIALS:  # never sent by fitscope (jobs are capped at submit): say so
        log.error("a job message carried %d trial ids; training the first %d, the rest (%s...) stay queued: "
                  "`fitscope requeue EXPERIMENT --status queued` sends them again", len(trial_ids),
                  MAX_JOB_TRIALS, trial_ids[MAX_JOB_TRIALS:MAX_JOB_TRIALS + 5])
    trial_ids = [int(trial_id) for trial_id in trial_ids[:MAX_JOB_TRIALS]]
    engine = get_engine()
    try:
        claims = [claim for claim in claim_with_retry(engine, task, trial_ids, takeover=takeover) if claim is not None]
        statuses = {str(trial_id): "skipped" for trial_id in trial_ids}
        statuses.update({str(k): v for k, v in execute_job(engine, claims).items()})
    except DatabaseDown as exc:
        # Acknowledging now would leave trials queued or running for ever: send the job again.
        log.error("job of trials %s: %s; re-queueing it", trial_ids, exc)
        raise task.retry(kwargs={"takeover": True}, countdown=DB_RETRY_DELAYS_S[-1],
                         max_retries=PERSIST_RETRIES) from None
    return statuses


def execute_job(engine: Engine, claims: list[Claim]) -> dict[int, str]:
    """Run claimed trials: compatible ones fused, the rest one at a time. Returns {trial id: status}."""
    from pydantic import ValidationError

    from services.admission import claim_problem
    from services.trial_config import TrialConfig

    statuses: dict[int, str] = {}
    fusable: list[tuple[Claim, TrialConfig]] = []
    for claim in claims:
        if getattr(claim, "checkpoint", None) is not None:  # a one-trial run's checkpoint: resume it
            statuses[claim.trial_id] = _one_trial(engine, claim)
            continue
        try:
            config = TrialConfig.model_validate(claim.config)
        except ValidationError as exc:
            statuses.update(_fail_all(engine, [claim], f"its stored config is not valid: {exc}"))
            continue
        if problem := claim_problem(config):  # refused before it allocates anything (services/admission.py)
            statuses.update(_fail_all(engine, [claim], problem))
            continue
        fusable.append((claim, config))
    groups = plan_jobs([config for _, config in fusable], max_trials=MAX_JOB_TRIALS)
    for group in groups:
        members = [fusable[i] for i in group]
        if len(members) == 1:
            statuses[members[0][0].trial_id] = _one_trial(engine, members[0][0])
        else:
            statuses.update(_train_group(engine, [c for c, _ in members], [config for _, config in members]))
    return statuses


def _one_trial(engine: Engine, claim: Claim) -> str:
    try:
        return execute_claim(engine, claim)
    except TrialSuperseded as exc:
        log.warning("%s; stopping without writing more", exc)
        return "superseded"


class JobBuffer:
    """train_fused's ``on_epoch`` for a job: keeps each trial's epoch rows and writes all of them at
    most every ``flush_s`` seconds, in one transaction that also reads their cancel flags. Returns
    the trial indices to stop: cancelled ones, and superseded ones (dropped from the job)."""

    def __init__(self, engine: Engine, claims: list[Claim], *, flush_s: float) -> None:
        self.engine, self.claims, self.flush_s = engine, claims, flush_s
        self.pending: list[list[dict[str, Any]]] = [[] for _ in claims]
        self.superseded: set[int] = set()
        self._last_flush = time.monotonic()

    def __call__(self, rows) -> set[int]:
        for index, metrics in rows.items():
            self.pending[index].append(asdict(metrics))
        if time.monotonic() - self._last_flush < self.flush_s:
            return self._read_flags([i for i in rows if i not in self.superseded])
        live = [i for i in range(len(self.claims)) if self.pending[i] and i not in self.superseded]

        def write(session) -> tuple[set[int], set[int]]:
            cancelled, superseded = set(), set()
            for i in live:
                claim = self.claims[i]
                try:
                    if record_epochs(session, claim.trial_id, self.pending[i], attempt=claim.attempt):
                        cancelled.add(i)
                except TrialSuperseded as exc:  # nothing was written for it; the others go on
                    log.warning("%s; dropping it from its fused job", exc)
                    superseded.add(i)
            return cancelled, superseded

        cancelled, superseded = write_with_retry(self.engine, write)
        for i in live:
            self.pending[i] = []
        self.superseded |= superseded
        self._last_flush = time.monotonic()
        return cancelled | superseded

    def _read_flags(self, indices: list[int]) -> set[int]:
        """Trials asked to stop or no longer owned by their attempt, in one SELECT outside any
        transaction. Not retried: a database that does not answer now is waited out by the next write."""
        if not indices:
            return set()
        ids = {self.claims[i].trial_id: i for i in indices}
        try:
            with self.engine.connect() as connection:
                found = connection.execute(select(Trial.id, Trial.status, Trial.attempts, Trial.cancel_requested)
                                           .where(Trial.id.in_(list(ids)))).all()
        except (OperationalError, InterfaceError) as exc:
            log.warning("cannot read the cancel flags of a fused job (%s); trying again next epoch", exc.orig)
            return set()
        stop = set()
        for row in found:
            i = ids[row.id]
            if row.status != TrialStatus.running or row.attempts != self.claims[i].attempt:
                log.warning("trial %s: attempt %s no longer owns it; dropping it from its fused job",
                            row.id, self.claims[i].attempt)
                self.superseded.add(i)
                stop.add(i)
            elif row.cancel_requested:
                stop.add(i)
        return stop


def _train_group(engine: Engine, claims: list[Claim], configs: list) -> dict[int, str]:
    from worker.training import DeviceUnavailable
    from worker.training.fused import train_fused

    buffer = JobBuffer(engine, claims, flush_s=get_settings().metrics_flush_s)
    started = time.perf_counter()
    finished: dict[int, str] = {}

    def on_trials_end(results) -> None:
        finished.update(_finish(engine, buffer, results))

    try:
        train_fused(configs, on_epoch=buffer, on_trials_end=on_trials_end, **csv_content_of(engine, configs[0]))
    except DatabaseDown:
        raise
    except Exception as exc:  # a bug or bad state must fail these trials, not take the worker down
        if isinstance(exc, DeviceUnavailable):
            error = str(exc)
        else:
            log.exception("fused job of trials %s failed", [claim.trial_id for claim in claims])
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            error = f"{detail}\n{traceback.format_exc(limit=8)}"
        failed = _fail_all(engine, claims, error, buffer=buffer, skip=set(finished))  # those that ended stay
        return {**{claims[i].trial_id: status for i, status in finished.items()}, **failed}
    log.info("fused job of %d trials trained in %.1f s", len(claims), time.perf_counter() - started)
    return {claim.trial_id: finished.get(i, "superseded") for i, claim in enumerate(claims)}


def _finish(engine: Engine, buffer: JobBuffer, results) -> dict[int, str]:
    """Write the last rows and the final status of trials that just ended ({index: TrialResult}),
    in one transaction; a trial another attempt took over is left alone. Returns {index: status}."""
    claims = buffer.claims
    ended = {i: result for i, result in results.items() if i not in buffer.superseded}

    def finish(session) -> set[int]:
        superseded = set()
        for i, result in ended.items():
            claim = claims[i]
            try:
                record_epochs(session, claim.trial_id, buffer.pending[i], attempt=claim.attempt)
                finish_trial(session, claim.trial_id, status=TrialStatus(result.status),
                             final_metrics={**result.final_metrics, "trained_with": len(claims)},
                             best_epoch=result.best_epoch,
                             error=result.message, artifacts=result.artifacts, attempt=claim.attempt)
            except TrialSuperseded as exc:
                log.warning("%s; its results are dropped", exc)
                superseded.add(i)
        return superseded

    superseded = write_with_retry(engine, finish) if ended else set()
    for i in ended:
        buffer.pending[i] = []
    buffer.superseded |= superseded
    return {i: "superseded" if i in superseded else result.status for i, result in ended.items()}


def _fail_all(engine: Engine, claims: list[Claim], error: str, *, buffer: JobBuffer | None = None,
              skip: set[int] = frozenset()) -> dict[int, str]:
    """Keep each trial's epochs that ran (those ``buffer`` still holds), then mark it failed with
    ``error``, all in one transaction; trials at indices in ``skip`` are left alone."""
    superseded_before = buffer.superseded if buffer is not None else set()

    def fail(session) -> set[int]:
        superseded = set()
        for i, claim in enumerate(claims):
            if i in superseded_before or i in skip:
                continue
            try:
                pending = buffer.pending[i] if buffer is not None else []
                record_epochs(session, claim.trial_id, pending, attempt=claim.attempt)
                finish_trial(session, claim.trial_id, status=TrialStatus.failed, error=error, attempt=claim.attempt)
            except TrialSuperseded:
                superseded.add(i)
        return superseded

    superseded = superseded_before | write_with_retry(engine, fail)
    return {claim.trial_id: "superseded" if i in superseded else TrialStatus.failed.value
            for i, claim in enumerate(claims) if i not in skip}
