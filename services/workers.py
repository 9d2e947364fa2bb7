"""Who is online. A worker registers when it starts, beats every FITSCOPE_HEARTBEAT_S and marks itself
stopped on a clean shutdown. One that stays silent for FITSCOPE_WORKER_LOST_AFTER_S is *lost*: the
first process to notice (any worker's heartbeat, or the next start of a worker of the same name)
flips it to ``lost`` with one conditional UPDATE, and only that winner re-sends its running trials,
so each is re-sent once.

The trials stay ``running``: they are re-sent as takeovers (``run_job(takeover=True)``), whose claim
removes the dead attempt's rows and counts the attempt against FITSCOPE_MAX_ATTEMPTS. Marking them
``queued`` instead would let a fresh claim collide with the dead attempt's epoch rows.

Until they are re-sent, those trials name ``<sweeper>/pending-takeover`` as their worker (set in
the transaction that declares the worker lost), so if the sweeper itself dies before sending them,
whoever sweeps *it* finds them too: a trial is re-sent at least once, not at most once.

Every timestamp here is the database's clock (services.db.db_now), so workers whose own clocks
drift still agree on who is silent. Helpers take a session and never commit.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from services.db import db_now
from services.models import Trial, TrialStatus, WorkerNode

ONLINE, STOPPED, LOST = "online", "stopped", "lost"
# The worker of a trial a sweeper has taken over but not yet re-sent: f"{sweeper}/{PENDING_TAKEOVER}".
PENDING_TAKEOVER = "pending-takeover"
# Rows of workers gone for this long are deleted when a worker registers, so the list stays short.
FORGET_AFTER = timedelta(days=7)
MAX_LISTED = 500


def register(session: Session, *, name: str, host: str, pid: int, queues: list[str], device: str,
             torch_version: str | None, concurrency: int, started_at: datetime | None = None
             ) -> list[tuple[int, str]]:
    """Announce the worker ``name`` (a Celery node name, unique among running workers) as online.

    A row of that name still ``online`` was left by a previous process that died without stopping
    cleanly: if this call wins the flip of that row to ``lost``, it returns that process's running
    trials (trial id, queue), which the caller re-sends as takeovers after the commit.
    ``started_at`` is when this process started; trials claimed since then are its own.
    """
    now = db_now(session)
    started_at = started_at or now
    orphans = _declare_lost(session, name, sweeper=name, started_before=started_at)
    session.execute(delete(WorkerNode).where(WorkerNode.status != ONLINE, WorkerNode.heartbeat_at < now - FORGET_AFTER)
                    .execution_options(synchronize_session=False))
    values = {"host": host[:200], "pid": pid, "queues": list(queues), "device": device[:200],
              "torch_version": torch_version, "concurrency": concurrency, "status": ONLINE,
              "started_at": started_at, "heartbeat_at": now, "stopped_at": None}
    updated = session.execute(update(WorkerNode).where(WorkerNode.name == name).values(**values)
                              .execution_options(synchronize_session=False)).rowcount
    if not updated:
        session.execute(insert(WorkerNode).values(name=name, **values))
    return orphans


def heartbeat(session: Session, name: str) -> str | None:
    """Record that ``name`` is alive now. Returns its status before this beat (``lost`` when others had
    given it up and taken its trials over), or None when it has no row and must register again.
    A ``stopped`` row stays stopped: a beat racing the worker's own shutdown must not revive it."""
    previous = session.scalar(select(WorkerNode.status).where(WorkerNode.name == name))
    if previous is not None:
        session.execute(update(WorkerNode).where(WorkerNode.name == name, WorkerNode.status != STOPPED)
                        .values(heartbeat_at=db_now(session), status=ONLINE, stopped_at=None)
                        .execution_options(synchronize_session=False))
    return previous


def mark_stopped(session: Session, name: str) -> None:
    """A clean shutdown: the worker is shown as stopped, and nobody re-sends its trials."""
    session.execute(update(WorkerNode).where(WorkerNode.name == name)
                    .values(status=STOPPED, stopped_at=db_now(session))
                    .execution_options(synchronize_session=False))


def sweep_stale(session: Session, *, lost_after_s: float, sweeper: str) -> list[tuple[int, str]]:
    """Flip every online worker silent for more than ``lost_after_s`` seconds to ``lost`` and return the
    running trials (trial id, queue) of those whose flip this session won; they now name
    ``<sweeper>/pending-takeover`` as their worker until the takeover claims them. Two sessions
    sweeping at once never both get a trial: the flip is one conditional UPDATE, and only the winner
    reads on. Workers are flipped in name order, so two sweepers lock rows in the same order."""
    cutoff = db_now(session) - timedelta(seconds=lost_after_s)
    silent = session.scalars(
        select(WorkerNode.name).where(WorkerNode.status == ONLINE, WorkerNode.heartbeat_at < cutoff)
        .order_by(WorkerNode.name)
    ).all()
    trials: list[tuple[int, str]] = []
    for name in silent:
        trials += _declare_lost(session, name, sweeper=sweeper, silent_since=cutoff)
    return trials


def name_in_use(session: Session, name: str, *, host: str, pid: int, lost_after_s: float) -> dict[str, Any] | None:
    """The row of another live process (a different host or pid) that goes by ``name`` and beat within
    ``lost_after_s`` seconds, or None. A row of this very host and pid is a previous life of this
    process (a container restarted as PID 1), which register() takes over."""
    row = session.get(WorkerNode, name)
    if row is None or row.status != ONLINE or (row.host, row.pid) == (host[:200], pid):
        return None
    silent_s = (db_now(session) - _aware(row.heartbeat_at)).total_seconds()
    if silent_s > lost_after_s:
        return None
    return {"host": row.host, "pid": row.pid, "seconds_since_heartbeat": max(0.0, silent_s)}


def training_processes(session: Session, queue: str, *, lost_after_s: float) -> int:
    """How many jobs of ``queue`` the fleet can run at once: the sum of ``concurrency`` (training
    processes) over online workers that consume ``queue`` and beat within ``lost_after_s`` seconds
    by the database's clock; 0 when none is online. A submission splits fused jobs until there are
    this many (services.planner.plan_jobs ``slots``), so fusing leaves no process idle. An upper
    bound: a worker of several queues counts in each, and busy processes count too, so a grid may
    be cut into more (smaller) jobs than the free processes need: slower, never wrong."""
    cutoff = db_now(session) - timedelta(seconds=lost_after_s)
    workers = session.execute(
        select(WorkerNode.queues, WorkerNode.concurrency)
        .where(WorkerNode.status == ONLINE, WorkerNode.heartbeat_at >= cutoff)
    ).all()
    # queues is a JSON list: filtered here, since JSON containment is spelled differently per dialect.
    return sum(max(0, worker.concurrency or 0) for worker in workers if queue in (worker.queues or []))


def list_workers(session: Session, *, lost_after_s: float) -> list[dict[str, Any]]:
    """Every known worker, online ones first, as plain dicts: name, host, pid, queues, device,
    torch_version, concurrency, status (an online worker silent for more than ``lost_after_s``
    seconds reads ``lost``), started_at and heartbeat_at (ISO 8601), seconds_since_heartbeat, and
    current_trials (ids of the running trials it claimed; a trial a sweeper has taken over but not
    yet re-sent is nobody's)."""
    now = db_now(session)
    workers = session.scalars(select(WorkerNode).order_by(WorkerNode.heartbeat_at.desc()).limit(MAX_LISTED)).all()
    running: dict[str, list[int]] = {}
    for trial_id, claimed_by in session.execute(
        select(Trial.id, Trial.worker).where(Trial.status == TrialStatus.running).order_by(Trial.id)
    ):
        # Trials name their worker "<node name>/<pid of the training process>".
        node, _, process = (claimed_by or "").rpartition("/")
        if process != PENDING_TAKEOVER:
            running.setdefault(node, []).append(trial_id)
    rows = []
    for worker in workers:
        silent_s = max(0.0, (now - _aware(worker.heartbeat_at)).total_seconds())
        status = LOST if worker.status == ONLINE and silent_s > lost_after_s else worker.status
        rows.append({
            "name": worker.name, "host": worker.host, "pid": worker.pid, "queues": list(worker.queues or []),
            "device": worker.device, "torch_version": worker.torch_version, "concurrency": worker.concurrency,
            "status": status, "started_at": _aware(worker.started_at).isoformat(),
            "heartbeat_at": _aware(worker.heartbeat_at).isoformat(),
            "seconds_since_heartbeat": round(silent_s, 3),
            "current_trials": running.get(worker.name, []),
        })
    rows.sort(key=lambda row: row["status"] != ONLINE)  # stable: newest heartbeat first within each group
    return rows


def _declare_lost(session: Session, name: str, *, sweeper: str, silent_since: datetime | None = None,
                  started_before: datetime | None = None) -> list[tuple[int, str]]:
    """Flip ``name`` from online to lost (only if its heartbeat is older than ``silent_since``, or it
    was started before ``started_before``, when given) and, if this UPDATE did it, return its running
    trials (claimed before ``started_before``, when given), marked as pending takeover by ``sweeper``.
    On PostgreSQL a concurrent flip waits for the row lock and then matches nothing; on SQLite
    writers are serialised, with the same result."""
    condition = [WorkerNode.name == name, WorkerNode.status == ONLINE]
    if silent_since is not None:
        condition.append(WorkerNode.heartbeat_at < silent_since)
    if started_before is not None:  # an earlier process of that name, not this one registering again
        condition.append(WorkerNode.started_at < started_before)
    flipped = session.execute(update(WorkerNode).where(*condition).values(status=LOST)
                              .execution_options(synchronize_session=False)).rowcount
    if flipped != 1:
        return []
    query = select(Trial.id, Trial.queue).where(
        Trial.status == TrialStatus.running, Trial.worker.startswith(f"{name}/", autoescape=True))
    if started_before is not None:
        query = query.where(Trial.started_at < started_before)
    trials = [(row.id, row.queue) for row in session.execute(query.order_by(Trial.id))]
    if trials:
        # In the same transaction as the flip: should the sweeper die before re-sending them, the
        # sweep that finds the sweeper lost finds these trials under its name too.
        session.execute(update(Trial).where(Trial.id.in_([trial_id for trial_id, _ in trials]))
                        .values(worker=f"{sweeper}/{PENDING_TAKEOVER}"[:200])
                        .execution_options(synchronize_session=False))
    return trials


def _aware(value: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; every stored time is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
