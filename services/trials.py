"""A trial's life in the database: claim, per-epoch rows, finish, cancel, re-queue.

Each helper takes a session and never commits. Claims are single conditional UPDATEs, so two
workers handed the same trial cannot both run it, and a re-delivered message for a trial that has
already ended changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
from sqlalchemy.orm import Session

from services.analysis import diagnose
from services.checkpoints import delete_checkpoints, load_checkpoint
from services.db import insert_ignoring_conflicts
from services.models import TERMINAL_STATUSES, EpochMetric, Trial, TrialArtifact, TrialStatus, utcnow

EPOCH_METRIC_FIELDS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr", "epoch_seconds",
                       "train_rmse", "val_rmse", "train_mae", "val_mae", "train_r2", "val_r2",
                       "grad_norm", "weight_norm")


@dataclass(frozen=True)
class Claim:
    trial_id: int
    config: dict[str, Any]
    attempt: int
    # A takeover that resumes: the checkpoint's last epoch (its rows are kept) and its bytes.
    resume_epoch: int | None = None
    checkpoint: bytes | None = field(default=None, repr=False)


def claim_trial(session: Session, trial_id: int, *, worker: str, max_attempts: int,
                redelivered: bool = False) -> Claim | None:
    """Mark the trial running on ``worker`` and return what to train, or None when there is
    nothing to do (finished, cancelled, unknown, running elsewhere, or out of attempts, which
    marks it failed).

    A trial already ``running`` whose message the broker *re-delivered* was left by a worker that
    died: it is taken over. With a checkpoint, the rows up to the checkpoint's epoch stay and the
    claim carries the checkpoint to resume from; rows after it (and, without one, all rows) are
    removed, so no epoch is written twice. A plain duplicate message for a running trial is ignored;
    a taken-over trial that was asked to stop ends ``cancelled`` with the rows it has.
    """
    trial = session.get(Trial, trial_id)
    if trial is None or trial.status in TERMINAL_STATUSES:
        return None
    if trial.status == TrialStatus.running and not redelivered:
        return None
    takeover = trial.status == TrialStatus.running
    if takeover and trial.cancel_requested:
        # Asked to stop while its worker was dying: it ends now, with the rows it has (complete epochs).
        finish_trial(session, trial_id, status=TrialStatus.cancelled)
        return None
    if trial.attempts >= max_attempts:
        error = (f"gave up after {trial.attempts} attempts (FITSCOPE_MAX_ATTEMPTS={max_attempts}): each one "
                 "ended without a result (its worker killed, out of memory or gone, or the database "
                 "unreachable for minutes); see the worker logs, then `fitscope requeue` it")
        finish_trial(session, trial_id, status=TrialStatus.failed, error=error)
        return None
    previous_status, previous_attempts = trial.status, trial.attempts
    claimed = session.execute(
        update(Trial)
        .where(Trial.id == trial_id, Trial.status == previous_status, Trial.attempts == previous_attempts)
        .values(status=TrialStatus.running, attempts=previous_attempts + 1, worker=worker,
                started_at=utcnow(), epochs_done=0, error=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    if claimed != 1:
        return None  # another worker got there first
    claim = Claim(trial_id=trial_id, config=dict(trial.config), attempt=previous_attempts + 1)
    # Read only now: the UPDATE above locked the trial, so the dead attempt can no longer move its
    # checkpoint (its writes are guarded by its attempt number).
    checkpoint = load_checkpoint(session, trial_id) if takeover else None
    if checkpoint is None:
        session.execute(delete(EpochMetric).where(EpochMetric.trial_id == trial_id))
        delete_checkpoints(session, [trial_id])  # a fresh start leaves nothing stale behind
        return claim
    session.execute(delete(EpochMetric).where(EpochMetric.trial_id == trial_id,
                                              EpochMetric.epoch > checkpoint.epoch))
    session.execute(update(Trial).where(Trial.id == trial_id).values(epochs_done=checkpoint.epoch)
                    .execution_options(synchronize_session=False))
    return replace(claim, resume_epoch=checkpoint.epoch, checkpoint=checkpoint.data)


def restart_trial(session: Session, trial_id: int, *, attempt: int) -> None:
    """The claim's checkpoint turned out unusable: drop every row and the checkpoint so ``attempt``
    trains from epoch 1. Raises TrialSuperseded when the attempt no longer owns the trial."""
    _claim_still_held(session, trial_id, attempt, {"epochs_done": 0})
    session.execute(delete(EpochMetric).where(EpochMetric.trial_id == trial_id))
    delete_checkpoints(session, [trial_id])


# Built once: constructing and cache-keying a select() costs more than running it (~170 us of ~300).
_CANCEL_FLAG = select(Trial.status, Trial.attempts, Trial.cancel_requested).where(Trial.id == bindparam("trial_id"))


def read_cancel_flag(connection: Connection, trial_id: int, *, attempt: int) -> bool:
    """The light per-epoch read: True when the trial has been asked to stop. One SELECT by primary
    key, no write and no lock (~0.1 ms on SQLite). Raises TrialSuperseded when ``attempt`` no longer
    owns the trial, so a stale attempt stops at once rather than at its next write."""
    row = connection.execute(_CANCEL_FLAG, {"trial_id": trial_id}).one_or_none()
    if row is None or row.status != TrialStatus.running or row.attempts != attempt:
        raise TrialSuperseded(f"trial {trial_id}: attempt {attempt} no longer owns it")
    return bool(row.cancel_requested)


class TrialSuperseded(RuntimeError):
    """This worker's attempt no longer owns the trial (a takeover, a cancel-and-requeue, or it ended):
    it must stop without writing anything more."""


def _claim_still_held(session: Session, trial_id: int, attempt: int, values: dict[str, Any]) -> None:
    """Update the trial only while ``attempt`` still runs it; the UPDATE takes the row lock first, so a
    concurrent takeover waits for this transaction and then sees (and deletes) what it wrote."""
    held = session.execute(
        update(Trial)
        .where(Trial.id == trial_id, Trial.status == TrialStatus.running, Trial.attempts == attempt)
        .values(**values).execution_options(synchronize_session=False)
    ).rowcount
    if held != 1:
        raise TrialSuperseded(f"trial {trial_id}: attempt {attempt} no longer owns it")


def record_epochs(session: Session, trial_id: int, rows: list[dict[str, Any]], *,
                  attempt: int | None = None) -> bool:
    """Write epoch rows (one executemany) and advance the trial's progress. Returns True when the
    trial has been asked to stop (cancelled), so the engine ends at this epoch boundary. With
    ``attempt``, raises TrialSuperseded (writing nothing) when that attempt no longer owns the trial."""
    done = {"epochs_done": max(int(row["epoch"]) for row in rows)} if rows else {}
    if attempt is not None:
        _claim_still_held(session, trial_id, attempt, done or {"epochs_done": Trial.epochs_done})
    elif done:
        session.execute(update(Trial).where(Trial.id == trial_id).values(**done)
                        .execution_options(synchronize_session=False))
    if rows:
        # ON CONFLICT DO NOTHING: a write whose COMMIT reached the server but whose reply was lost is
        # retried (worker/tasks.write_with_retry) and must not fail on its own rows. Rows of another
        # attempt cannot be there: a takeover deletes them before the new attempt writes.
        session.execute(insert_ignoring_conflicts(session, EpochMetric), [
            {"trial_id": trial_id, "epoch": int(row["epoch"]),
             **{name: _finite_or_none(row.get(name)) for name in EPOCH_METRIC_FIELDS}}
            for row in rows
        ])
    return bool(session.scalar(select(Trial.cancel_requested).where(Trial.id == trial_id)))


def record_epoch(session: Session, trial_id: int, metrics: dict[str, Any]) -> bool:
    """One epoch's row; see :func:`record_epochs`."""
    return record_epochs(session, trial_id, [metrics])


def finish_trial(session: Session, trial_id: int, *, status: TrialStatus, final_metrics: dict | None = None,
                 best_epoch: int | None = None, error: str | None = None,
                 artifacts: dict[str, dict] | None = None, attempt: int | None = None) -> None:
    """Record how a trial ended: status, final metrics, the fit verdict (diagnosed from the epoch rows
    already written in this session) and the prediction artifacts, which replace any earlier ones.
    ``error`` is kept short enough to show in a table. With ``attempt``, raises TrialSuperseded
    (writing nothing) when that attempt no longer owns the trial."""
    values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "error": _clip(error)}
    if final_metrics is not None:
        values["final_metrics"] = {key: _finite_or_none(value) for key, value in final_metrics.items()}
        values["best_epoch"] = best_epoch
        values["parameter_count"] = final_metrics.get("parameter_count")
    diagnosis = diagnose(_loss_rows(session, trial_id), final_metrics or {}, status=TrialStatus(status).value)
    values["verdict"] = diagnosis.verdict
    values["diagnosis"] = {"reasons": diagnosis.reasons,
                           "numbers": {k: _finite_or_none(v) for k, v in diagnosis.numbers.items()}}
    if attempt is not None:
        _claim_still_held(session, trial_id, attempt, values)
    else:
        session.execute(update(Trial).where(Trial.id == trial_id).values(**values)
                        .execution_options(synchronize_session=False))
    delete_checkpoints(session, [trial_id])  # an ended trial is never resumed
    session.execute(delete(TrialArtifact).where(TrialArtifact.trial_id == trial_id))
    if artifacts:
        session.execute(insert(TrialArtifact), [
            {"trial_id": trial_id, "kind": kind, "data": data} for kind, data in artifacts.items()
        ])


def _loss_rows(session: Session, trial_id: int) -> list[dict[str, Any]]:
    result = session.execute(
        select(EpochMetric.epoch, EpochMetric.train_loss, EpochMetric.val_loss)
        .where(EpochMetric.trial_id == trial_id).order_by(EpochMetric.epoch)
    )
    return [dict(row._mapping) for row in result]


def cancel_experiment(session: Session, experiment_id: int) -> dict[str, int]:
    """Queued trials become ``cancelled`` at once (they will never start); running ones are asked to
    stop at their next epoch boundary. Returns how many of each."""
    queued = session.execute(
        update(Trial)
        .where(Trial.experiment_id == experiment_id, Trial.status == TrialStatus.queued)
        .values(status=TrialStatus.cancelled, cancel_requested=True, finished_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount
    running = session.execute(
        update(Trial)
        .where(Trial.experiment_id == experiment_id, Trial.status == TrialStatus.running)
        .values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    ).rowcount
    return {"cancelled": queued, "stopping": running}


def requeue_trials(session: Session, experiment_id: int, *, statuses: tuple[str, ...] = (
        TrialStatus.failed, TrialStatus.cancelled)) -> list[tuple[int, str]]:
    """Put ended trials of the given statuses back in the queue with a fresh attempt count and no
    rows; returns (trial id, queue) to send after the commit."""
    trials = session.execute(
        select(Trial.id, Trial.queue).where(Trial.experiment_id == experiment_id, Trial.status.in_(statuses))
    ).all()
    ids = [row.id for row in trials]
    if ids:
        session.execute(delete(EpochMetric).where(EpochMetric.trial_id.in_(ids)))
        delete_checkpoints(session, ids)
        session.execute(delete(TrialArtifact).where(TrialArtifact.trial_id.in_(ids)))
        session.execute(
            update(Trial).where(Trial.id.in_(ids))
            .values(status=TrialStatus.queued, attempts=0, cancel_requested=False, worker=None, error=None,
                    epochs_done=0, best_epoch=None, final_metrics=None, started_at=None, finished_at=None,
                    verdict=None, diagnosis=None, parameter_count=None)
            .execution_options(synchronize_session=False)
        )
    return [(row.id, row.queue) for row in trials]


def count_epoch_rows(session: Session, trial_id: int) -> int:
    return session.scalar(select(func.count()).select_from(EpochMetric).where(EpochMetric.trial_id == trial_id))


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _clip(text: str | None, limit: int = 4000) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 20] + " ... (truncated)"
