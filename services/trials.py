"""A trial's life in the database: claim (alone or as a job), per-epoch rows, finish, cancel, re-queue.

Each helper takes a session and never commits. Claims are single conditional UPDATEs, so two
workers handed the same trial cannot both run it, and a re-delivered message for a trial that has
already ended changes nothing. Each claim stamps the trial with its attempt's random token, and every
later write of that attempt (rows, checkpoint, status) is an UPDATE guarded by it: an attempt that a
takeover or a re-queue superseded can never write again, whatever its attempt number.
"""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
from sqlalchemy.orm import Session

from services.analysis import diagnose
from services.checkpoints import StoredCheckpoint, adopt_checkpoint, delete_checkpoints, load_checkpoint
from services.db import insert_ignoring_conflicts
from services.models import TERMINAL_STATUSES, EpochMetric, Trial, TrialArtifact, TrialStatus, utcnow

EPOCH_METRIC_FIELDS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr", "epoch_seconds",
                       "train_rmse", "val_rmse", "train_mae", "val_mae", "train_r2", "val_r2",
                       "grad_norm", "weight_norm")
# Per-epoch lists, one JSON column each: the gradient norm of each Linear layer, first layer first.
EPOCH_SERIES_FIELDS = ("layer_grad_norms",)


@dataclass(frozen=True)
class Claim:
    trial_id: int
    config: dict[str, Any]
    attempt: int  # how many times the trial has been claimed, this one included
    token: str  # this attempt's token: every write it makes is guarded by it
    takeover: bool = False  # it was left running by an attempt that died


@dataclass(frozen=True)
class ClaimedJob:
    """What one attempt at a job claimed. ``trial_ids`` are the trials to train, in the engine's order:
    the claimed ones, or, when resuming, every trial of the checkpoint (those that ended since it
    train again, unwritten, so the stack stays the one that was checkpointed)."""

    token: str
    first_trial_id: int  # the message's first trial: where the job's checkpoint is found
    trial_ids: list[int]
    configs: dict[int, dict[str, Any]]
    claims: dict[int, Claim]
    checkpoint: StoredCheckpoint | None = None


def new_token() -> str:
    return uuid.uuid4().hex


def claim_job(session: Session, trial_ids: Sequence[int], *, worker: str, max_attempts: int,
              redelivered: bool = False, token: str | None = None) -> ClaimedJob:
    """Claim a job's trials (see :func:`claim_trial`) for one attempt, all with one token.

    A job whose trials were all taken over resumes from the checkpoint anchored at its first trial when
    that checkpoint covers every claimed trial: each keeps its rows up to the checkpoint's epoch (later
    ones are removed, so no epoch is written twice) and the checkpoint becomes this attempt's. Anything
    else starts the claimed trials from epoch 1, with no rows and no stale checkpoint."""
    token = token or new_token()
    claims = {}
    for trial_id in trial_ids:
        claim = claim_trial(session, trial_id, worker=worker, max_attempts=max_attempts, redelivered=redelivered,
                            token=token)
        if claim is not None:
            claims[trial_id] = claim
    if not claims:
        statuses = session.scalars(select(Trial.status).where(Trial.id.in_(list(trial_ids)))).all()
        if all(status in TERMINAL_STATUSES for status in statuses):  # left by an attempt killed as it ended
            delete_checkpoints(session, list(trial_ids[:1]))
        return ClaimedJob(token=token, first_trial_id=trial_ids[0], trial_ids=[], configs={}, claims={})
    anchor = trial_ids[0]
    # Read only now: the UPDATEs above locked the trials, so the dead attempt can no longer move its
    # checkpoint (its writes are guarded by its token and by the trials it holds).
    stored = load_checkpoint(session, anchor) if all(c.takeover for c in claims.values()) else None
    if stored is not None and set(claims) <= set(stored.trial_ids) <= set(trial_ids):
        for trial_id in claims:
            session.execute(delete(EpochMetric).where(EpochMetric.trial_id == trial_id,
                                                      EpochMetric.epoch > stored.epoch))
        session.execute(update(Trial).where(Trial.id.in_(list(claims))).values(epochs_done=stored.epoch)
                        .execution_options(synchronize_session=False))
        adopt_checkpoint(session, anchor, token=token)
        configs = dict(session.execute(select(Trial.id, Trial.config).where(Trial.id.in_(stored.trial_ids))).all())
        return ClaimedJob(token=token, first_trial_id=anchor, trial_ids=list(stored.trial_ids), configs=configs,
                          claims=claims, checkpoint=stored)
    session.execute(_DELETE_EPOCH_ROWS, {"trial_ids": list(claims)})
    delete_checkpoints(session, [anchor])  # a fresh start leaves nothing stale behind
    ids = [trial_id for trial_id in trial_ids if trial_id in claims]
    return ClaimedJob(token=token, first_trial_id=anchor, trial_ids=ids, configs={i: claims[i].config for i in ids},
                      claims=claims)


# The statements every job runs are built once, on the tables (Core): building an UPDATE with its
# values cost more than running it (~0.1 ms each), and the ORM's DML path adds as much again.
_TRIALS = Trial.__table__
_EPOCH_ROWS = EpochMetric.__table__

# What a claim reads: loading the whole ORM object (its final metrics' and diagnosis' JSON too) cost
# more than the claim's UPDATE.
_CLAIM_READ = select(_TRIALS.c.status, _TRIALS.c.attempts, _TRIALS.c.cancel_requested, _TRIALS.c.config).where(
    _TRIALS.c.id == bindparam("trial_id"))
# The usual claim, a queued trial with attempts left, in one statement instead of _CLAIM_READ and an
# UPDATE; any other trial takes claim_trial's full path.
_CLAIM_QUEUED = (
    update(_TRIALS)
    .where(_TRIALS.c.id == bindparam("trial_id"), _TRIALS.c.status == TrialStatus.queued,
           _TRIALS.c.attempts < bindparam("max_attempts"))
    .values(status=TrialStatus.running, attempts=_TRIALS.c.attempts + 1, epochs_done=0, error=None,
            attempt_token=bindparam("new_token", type_=_TRIALS.c.attempt_token.type),
            worker=bindparam("new_worker", type_=_TRIALS.c.worker.type),
            started_at=bindparam("new_started_at", type_=_TRIALS.c.started_at.type))
    .returning(_TRIALS.c.attempts, _TRIALS.c.config)
)
_DELETE_EPOCH_ROWS = delete(_EPOCH_ROWS).where(_EPOCH_ROWS.c.trial_id.in_(bindparam("trial_ids", expanding=True)))
_DELETE_ARTIFACTS = delete(TrialArtifact.__table__).where(
    TrialArtifact.__table__.c.trial_id.in_(bindparam("trial_ids", expanding=True)))
# What finish_trials reads to diagnose the trials that end: their stored losses, in epoch order.
_LOSS_ROWS = (
    select(_EPOCH_ROWS.c.trial_id, _EPOCH_ROWS.c.epoch, _EPOCH_ROWS.c.train_loss, _EPOCH_ROWS.c.val_loss)
    .where(_EPOCH_ROWS.c.trial_id.in_(bindparam("trial_ids", expanding=True)))
    .order_by(_EPOCH_ROWS.c.trial_id, _EPOCH_ROWS.c.epoch)
)


def claim_trial(session: Session, trial_id: int, *, worker: str, max_attempts: int,
                redelivered: bool = False, token: str | None = None) -> Claim | None:
    """Mark the trial running on ``worker`` under the attempt ``token`` (a new one by default) and
    return what to train, or None when there is nothing to do (finished, cancelled, unknown, running
    elsewhere, or out of attempts, which marks it failed).

    A trial already ``running`` whose message the broker *re-delivered* was left by a worker that
    died: it is taken over (``Claim.takeover``; :func:`claim_job` decides what of its rows to keep).
    A plain duplicate message for a running trial is ignored; a taken-over trial that was asked to
    stop ends ``cancelled`` with the rows it has.
    """
    token = token or new_token()
    claimed = session.execute(_CLAIM_QUEUED, {"trial_id": trial_id, "max_attempts": max_attempts, "new_token": token,
                                              "new_worker": worker, "new_started_at": utcnow()}).one_or_none()
    if claimed is not None:
        return Claim(trial_id=trial_id, config=dict(claimed.config), attempt=claimed.attempts, token=token)
    trial = session.execute(_CLAIM_READ, {"trial_id": trial_id}).one_or_none()
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
                 "unreachable for longer than FITSCOPE_DB_WAIT_S); see the worker logs, then `fitscope requeue` it")
        finish_trial(session, trial_id, status=TrialStatus.failed, error=error)
        return None
    previous_status, previous_attempts = trial.status, trial.attempts
    claimed = session.execute(
        update(Trial)
        .where(Trial.id == trial_id, Trial.status == previous_status, Trial.attempts == previous_attempts)
        .values(status=TrialStatus.running, attempts=previous_attempts + 1, attempt_token=token, worker=worker,
                started_at=utcnow(), epochs_done=0, error=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    if claimed != 1:
        return None  # another worker got there first
    return Claim(trial_id=trial_id, config=dict(trial.config), attempt=previous_attempts + 1, token=token,
                 takeover=takeover)


def restart_job(session: Session, job: ClaimedJob) -> set[int]:
    """The job's checkpoint turned out unusable: drop its claimed trials' rows and the checkpoint so the
    attempt trains them from epoch 1. Returns the trials this attempt no longer holds (left alone)."""
    superseded = set()
    for trial_id in job.claims:
        try:
            _claim_still_held(session, trial_id, job.token, {"epochs_done": 0})
        except TrialSuperseded:
            superseded.add(trial_id)
            continue
        session.execute(delete(EpochMetric).where(EpochMetric.trial_id == trial_id))
    delete_checkpoints(session, [job.first_trial_id], token=job.token)
    return superseded


# Built once: constructing and cache-keying a select() costs more than running it (~170 us of ~300).
_STOP_FLAGS = select(_TRIALS.c.id, _TRIALS.c.status, _TRIALS.c.attempt_token, _TRIALS.c.cancel_requested).where(
    _TRIALS.c.id.in_(bindparam("trial_ids", expanding=True)))


def read_stop_flags(connection: Connection, tokens: dict[int, str]) -> tuple[set[int], set[int]]:
    """The light per-epoch read for ``{trial id: attempt token}``: (trials asked to stop, trials that
    attempt no longer owns). One SELECT by primary keys, no write and no lock (~0.1 ms on SQLite)."""
    if not tokens:
        return set(), set()
    rows = {row.id: row for row in connection.execute(_STOP_FLAGS, {"trial_ids": list(tokens)})}
    superseded = {trial_id for trial_id, token in tokens.items()
                  if trial_id not in rows or rows[trial_id].status != TrialStatus.running
                  or rows[trial_id].attempt_token != token}
    cancelled = {trial_id for trial_id in tokens if trial_id not in superseded and rows[trial_id].cancel_requested}
    return cancelled, superseded


class TrialSuperseded(RuntimeError):
    """This worker's attempt no longer owns the trial (a takeover, a cancel-and-requeue, or it ended):
    it must stop without writing anything more."""


def _claim_still_held(session: Session, trial_id: int, token: str, values: dict[str, Any]) -> None:
    """Update the trial's columns ``values`` (none: just lock it) only while the attempt ``token`` still
    runs it; the UPDATE takes the row lock first, so a concurrent takeover waits for this transaction and
    then sees (and deletes) what it wrote."""
    params = {f"new_{name}": value for name, value in values.items()}
    held = session.execute(_guarded_update(tuple(values)), {"trial_id": trial_id, "token": token, **params}).rowcount
    if held != 1:
        raise TrialSuperseded(f"trial {trial_id}: attempt {token[:8]} no longer owns it")


@functools.cache
def _guarded_update(columns: tuple[str, ...]):
    """_claim_still_held's UPDATE of these columns, built once for each set of them."""
    values = {name: bindparam(f"new_{name}", type_=_TRIALS.c[name].type) for name in columns}
    return update(_TRIALS).where(
        _TRIALS.c.id == bindparam("trial_id"), _TRIALS.c.status == TrialStatus.running,
        _TRIALS.c.attempt_token == bindparam("token"),
    ).values(values or {"epochs_done": _TRIALS.c.epochs_done})


def record_epochs(session: Session, trial_id: int, rows: list[dict[str, Any]], *,
                  token: str | None = None) -> bool:
    """Write epoch rows (one executemany) and advance the trial's progress. Returns True when the
    trial has been asked to stop (cancelled), so the engine ends at this epoch boundary. With
    ``token``, raises TrialSuperseded (writing nothing) when that attempt no longer owns the trial."""
    done = {"epochs_done": max(int(row["epoch"]) for row in rows)} if rows else {}
    if token is not None:
        _claim_still_held(session, trial_id, token, done)
    elif done:
        session.execute(update(Trial).where(Trial.id == trial_id).values(**done)
                        .execution_options(synchronize_session=False))
    if rows:
        # ON CONFLICT DO NOTHING: a write whose COMMIT reached the server but whose reply was lost is
        # retried (worker/jobs.write_with_retry) and must not fail on its own rows. Rows of another
        # attempt cannot be there: a takeover deletes them before the new attempt writes.
        session.execute(insert_ignoring_conflicts(session, EpochMetric), [_epoch_row(trial_id, row) for row in rows])
    return bool(session.scalar(select(Trial.cancel_requested).where(Trial.id == trial_id)))


def record_job_epochs(session: Session, rows: dict[int, list[dict[str, Any]]], *, token: str
                      ) -> tuple[set[int], set[int]]:
    """:func:`record_epochs` with ``token`` for every trial of ``{trial id: rows}`` at once, in a few
    statements whatever the number of trials (one each took ~3 statements a trial: a fused job of 32
    paid ~100 per write). Returns (trials asked to stop, trials that attempt no longer owns: nothing
    written for them)."""
    if not rows:
        return set(), set()
    by_done: dict[int | None, list[int]] = {}
    for trial_id, trial_rows in rows.items():
        by_done.setdefault(max((int(row["epoch"]) for row in trial_rows), default=None), []).append(trial_id)
    mine = (Trial.status == TrialStatus.running) & (Trial.attempt_token == token)
    updated = 0
    for done, trial_ids in by_done.items():  # the UPDATEs take the row locks first, as _claim_still_held
        updated += session.execute(
            update(Trial).where(Trial.id.in_(trial_ids), mine)
            .values(epochs_done=Trial.epochs_done if done is None else done)
            .execution_options(synchronize_session=False)).rowcount
    held = set(rows) if updated == len(rows) else set(
        session.scalars(select(Trial.id).where(Trial.id.in_(list(rows)), mine)))
    if inserts := [_epoch_row(trial_id, row) for trial_id in sorted(held) for row in rows[trial_id]]:
        session.execute(insert_ignoring_conflicts(session, EpochMetric), inserts)  # as record_epochs
    cancelled = set(session.scalars(select(Trial.id).where(Trial.id.in_(sorted(held)), Trial.cancel_requested)))
    return cancelled, set(rows) - held


def _epoch_row(trial_id: int, row: dict[str, Any]) -> dict[str, Any]:
    """One epoch_metrics row as written: non-finite numbers stored as NULL."""
    return {"trial_id": trial_id, "epoch": int(row["epoch"]),
            **{name: _finite_or_none(row.get(name)) for name in EPOCH_METRIC_FIELDS},
            **{name: _finite_list_or_none(row.get(name)) for name in EPOCH_SERIES_FIELDS}}


def record_epoch(session: Session, trial_id: int, metrics: dict[str, Any]) -> bool:
    """One epoch's row; see :func:`record_epochs`."""
    return record_epochs(session, trial_id, [metrics])


@dataclass
class Ending:
    """How one trial ended, as :func:`finish_trials` records it (:func:`finish_trial`'s arguments)."""

    trial_id: int
    status: TrialStatus
    final_metrics: dict | None = None
    best_epoch: int | None = None
    error: str | None = None
    artifacts: dict[str, dict] | None = None
    rows: list[dict[str, Any]] | None = None
    rows_stored: bool = True
    range_test: bool = False


def finish_trial(session: Session, trial_id: int, *, status: TrialStatus, final_metrics: dict | None = None,
                 best_epoch: int | None = None, error: str | None = None,
                 artifacts: dict[str, dict] | None = None, token: str | None = None,
                 rows: list[dict[str, Any]] | None = None, rows_stored: bool = True,
                 range_test: bool = False) -> None:
    """Record how a trial ended: status, final metrics, the fit verdict (diagnosed from its epoch rows)
    and the prediction artifacts, which replace any earlier ones. ``rows``: its last epoch rows, not
    yet written; they are written here, and its progress moves with its status (what
    :func:`record_epochs` would do, in fewer statements). ``rows_stored=False`` says that none of its
    rows are in the database yet (its attempt started from epoch 1 and has written none), so the
    verdict comes from ``rows`` without reading any; ``range_test``: it was a learning-rate range test
    (schedule lr_range_test), which gets no verdict. ``error`` is kept short enough to show in a
    table. With ``token``, raises TrialSuperseded (writing nothing) when that attempt no longer owns
    the trial. Its job's checkpoint stays: the job's other trials may still resume from it (the job
    removes it when it ends)."""
    ending = Ending(trial_id=trial_id, status=status, final_metrics=final_metrics, best_epoch=best_epoch, error=error,
                    artifacts=artifacts, rows=rows, rows_stored=rows_stored, range_test=range_test)
    if finish_trials(session, [ending], token=token):
        raise TrialSuperseded(f"trial {trial_id}: attempt {token[:8]} no longer owns it")


def finish_trials(session: Session, endings: Sequence[Ending], *, token: str | None = None) -> set[int]:
    """:func:`finish_trial` for several trials (a fused job's trials that ended together) in one
    UPDATE a trial and four statements for all of them (one each took five: ~0.66 ms a trial, 21 ms
    for a job of 32 here). With ``token``, returns the trials that attempt no longer owns: nothing
    is written for them."""
    # The stored rows, read before the guarded UPDATEs below: an attempt that took a trial over
    # meanwhile deleted them, but then its UPDATE finds the trial no longer this attempt's.
    stored = _loss_rows(session, [ending.trial_id for ending in endings if ending.rows_stored])
    superseded: set[int] = set()
    held, inserts, artifacts = [], [], []
    for ending in endings:
        trial_id = ending.trial_id
        values: dict[str, Any] = {"status": ending.status, "finished_at": utcnow(), "error": _clip(ending.error)}
        if ending.final_metrics is not None:
            values["final_metrics"] = {key: _finite_or_none(value) for key, value in ending.final_metrics.items()}
            values["best_epoch"] = ending.best_epoch
            values["parameter_count"] = ending.final_metrics.get("parameter_count")
        rows = [_epoch_row(trial_id, row) for row in ending.rows or ()]
        if rows:
            values["epochs_done"] = max(row["epoch"] for row in rows)
        # The rows as stored (non-finite numbers as NULL): stored ones first, then these, in epoch order.
        loss_rows = stored.get(trial_id, []) + [
            {"epoch": row["epoch"], "train_loss": row["train_loss"], "val_loss": row["val_loss"]} for row in rows]
        diagnosis = diagnose(loss_rows, ending.final_metrics or {}, status=TrialStatus(ending.status).value,
                             range_test=ending.range_test)
        values["verdict"] = diagnosis.verdict
        values["diagnosis"] = {"reasons": diagnosis.reasons,
                               "numbers": {k: _finite_or_none(v) for k, v in diagnosis.numbers.items()}}
        if token is not None:
            try:
                _claim_still_held(session, trial_id, token, values)
            except TrialSuperseded:
                superseded.add(trial_id)
                continue
        else:
            session.execute(update(Trial).where(Trial.id == trial_id).values(**values)
                            .execution_options(synchronize_session=False))
        held.append(trial_id)
        inserts += rows
        artifacts += [{"trial_id": trial_id, "kind": kind, "data": data}
                      for kind, data in (ending.artifacts or {}).items()]
    if inserts:  # as record_epochs: a retried write must not fail on its own rows
        session.execute(insert_ignoring_conflicts(session, EpochMetric), inserts)
    if held:
        session.execute(_DELETE_ARTIFACTS, {"trial_ids": held})
    if artifacts:  # Core, on the Table: compiled once and cached
        session.execute(insert(TrialArtifact.__table__), artifacts)
    return superseded


def _loss_rows(session: Session, trial_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """{trial id: its stored (epoch, train loss, validation loss) rows, in epoch order}, in one SELECT."""
    if not trial_ids:
        return {}
    by_trial: dict[int, list[dict[str, Any]]] = {}
    for row in session.execute(_LOSS_ROWS, {"trial_ids": trial_ids}):
        by_trial.setdefault(row.trial_id, []).append(
            {"epoch": row.epoch, "train_loss": row.train_loss, "val_loss": row.val_loss})
    return by_trial


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
            .values(status=TrialStatus.queued, attempts=0, attempt_token=None, cancel_requested=False, worker=None,
                    error=None,
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


def _finite_list_or_none(values: Any) -> list | None:
    # JSON has no NaN or inf (PostgreSQL refuses them): each becomes null.
    return None if values is None else [_finite_or_none(float(v)) if v is not None else None for v in values]


def _clip(text: str | None, limit: int = 4000) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 20] + " ... (truncated)"
