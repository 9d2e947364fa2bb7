"""Celery tasks: thin, like web views. They take a trial id, claim it, call the training engine and
persist what it reports. A message re-delivered for a trial that has ended does nothing."""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from dataclasses import asdict
from typing import Any

from celery import Celery, Task
from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError

from services.config import get_settings
from services.db import make_engine, session_scope
from services.models import TrialStatus
from services.queue import RUN_TRIAL_TASK
from services.trials import Claim, TrialSuperseded, claim_trial, finish_trial, record_epochs

log = logging.getLogger(__name__)
# A database that stops answering is waited for (about a minute in all) before a write gives up.
DB_RETRY_DELAYS_S = (1, 2, 4, 8, 15, 30)
# A trial whose results could not be written is re-queued, as a takeover, this many times.
PERSIST_RETRIES = 3
_engine: Engine | None = None


def _get_engine() -> Engine:
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
    app.task(name=RUN_TRIAL_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)(run_trial)


class DatabaseDown(RuntimeError):
    """A write kept failing for about a minute; the trial's work so far could not be kept."""


def run_trial(task: Task, trial_id: int, takeover: bool = False) -> str:
    """Train one trial end to end; returns its final status ("skipped" when there is nothing to do,
    "superseded" when another attempt took the trial over meanwhile)."""
    engine = _get_engine()
    worker = f"{task.request.hostname or socket.gethostname()}/{os.getpid()}"[:200]
    redelivered = takeover or bool((task.request.delivery_info or {}).get("redelivered"))
    with session_scope(engine) as session:
        claim = claim_trial(session, int(trial_id), worker=worker, max_attempts=get_settings().max_attempts,
                            redelivered=redelivered)
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
    """The engine's ``on_epoch``: keeps epoch rows and writes them at most every ``flush_s`` seconds
    (one transaction per write, which also reads the cancel flag). One transaction per epoch cost
    ~3.6 ms on SQLite, a third of a small trial's time; the rows still reach the database as the
    trial runs, and the last ones are written with the trial's final status."""

    def __init__(self, engine: Engine, claim: Claim, *, flush_s: float) -> None:
        self.engine, self.claim, self.flush_s = engine, claim, flush_s
        self.pending: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()

    def __call__(self, metrics) -> bool:
        self.pending.append(asdict(metrics))
        if time.monotonic() - self._last_flush < self.flush_s:
            return False
        cancel_requested = write_with_retry(self.engine, lambda session: record_epochs(
            session, self.claim.trial_id, self.pending, attempt=self.claim.attempt))
        self.pending.clear()
        self._last_flush = time.monotonic()
        return cancel_requested


def execute_claim(engine: Engine, claim: Claim) -> str:
    """Run a claimed trial through the engine, writing its epoch rows as it runs."""
    from services.trial_config import TrialConfig
    from worker.training import DeviceUnavailable, train_trial

    buffer = EpochBuffer(engine, claim, flush_s=get_settings().metrics_flush_s)
    try:
        try:
            config = TrialConfig.model_validate(claim.config)
            result = train_trial(config, on_epoch=buffer, **_csv_content(engine, config))
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
                         final_metrics=result.final_metrics, best_epoch=result.best_epoch, error=result.message,
                         artifacts=result.artifacts, attempt=claim.attempt)

        write_with_retry(engine, finish)
        return result.status
    except TrialSuperseded as exc:
        log.warning("%s; stopping without writing more", exc)
        return "superseded"


def _csv_content(engine: Engine, config) -> dict[str, bytes]:
    """``{"csv_content": bytes}`` for a trial on a stored CSV data set, else nothing."""
    from services.datasets import load_dataset_content
    from services.trial_config import CsvDataset

    if not isinstance(config.dataset, CsvDataset) or config.dataset.sha256 is None:
        return {}
    with session_scope(engine) as session:
        return {"csv_content": load_dataset_content(session, config.dataset.sha256)}


def _fail(engine: Engine, claim: Claim, error: str, pending: list[dict[str, Any]]) -> str:
    """Keep the epochs that ran, then mark the trial failed, in one transaction."""

    def fail(session) -> None:
        record_epochs(session, claim.trial_id, pending, attempt=claim.attempt)
        finish_trial(session, claim.trial_id, status=TrialStatus.failed, error=error, attempt=claim.attempt)

    write_with_retry(engine, fail)
    return TrialStatus.failed.value
