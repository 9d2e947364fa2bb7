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

from services.config import get_settings
from services.db import make_engine, session_scope
from services.models import TrialStatus
from services.queue import RUN_TRIAL_TASK
from services.trials import Claim, claim_trial, finish_trial, record_epochs

log = logging.getLogger(__name__)
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


def run_trial(task: Task, trial_id: int) -> str:
    """Train one trial end to end; returns its final status (or "skipped")."""
    engine = _get_engine()
    worker = f"{task.request.hostname or socket.gethostname()}/{os.getpid()}"
    with session_scope(engine) as session:
        claim = claim_trial(session, int(trial_id), worker=worker, max_attempts=get_settings().max_attempts,
                            redelivered=bool((task.request.delivery_info or {}).get("redelivered")))
    if claim is None:
        log.info("trial %s: nothing to do (already ended or taken)", trial_id)
        return "skipped"
    return execute_claim(engine, claim)


class EpochBuffer:
    """The engine's ``on_epoch``: keeps epoch rows and writes them at most every ``flush_s`` seconds
    (one transaction per write, which also reads the cancel flag). One transaction per epoch cost
    ~3.6 ms on SQLite, a third of a small trial's time; the rows still reach the database as the
    trial runs, and the last ones are written with the trial's final status."""

    def __init__(self, engine: Engine, trial_id: int, *, flush_s: float) -> None:
        self.engine, self.trial_id, self.flush_s = engine, trial_id, flush_s
        self.pending: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()

    def __call__(self, metrics) -> bool:
        self.pending.append(asdict(metrics))
        if time.monotonic() - self._last_flush < self.flush_s:
            return False
        with session_scope(self.engine) as session:
            cancel_requested = record_epochs(session, self.trial_id, self.pending)
        self.pending.clear()
        self._last_flush = time.monotonic()
        return cancel_requested


def execute_claim(engine: Engine, claim: Claim) -> str:
    """Run a claimed trial through the engine, writing its epoch rows as it runs."""
    from services.trial_config import TrialConfig
    from worker.training import DeviceUnavailable, train_trial

    buffer = EpochBuffer(engine, claim.trial_id, flush_s=get_settings().metrics_flush_s)
    try:
        config = TrialConfig.model_validate(claim.config)
        result = train_trial(config, on_epoch=buffer, **_csv_content(engine, config))
    except DeviceUnavailable as exc:
        return _fail(engine, claim.trial_id, str(exc), buffer.pending)
    except Exception as exc:  # a bug or bad state in one trial must not take the worker down
        log.exception("trial %s failed", claim.trial_id)
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return _fail(engine, claim.trial_id, f"{detail}\n{traceback.format_exc(limit=8)}", buffer.pending)
    with session_scope(engine) as session:
        record_epochs(session, claim.trial_id, buffer.pending)
        finish_trial(session, claim.trial_id, status=TrialStatus(result.status),
                     final_metrics=result.final_metrics, best_epoch=result.best_epoch, error=result.message,
                     artifacts=result.artifacts)
    return result.status


def _csv_content(engine: Engine, config) -> dict[str, bytes]:
    """``{"csv_content": bytes}`` for a trial on a stored CSV data set, else nothing."""
    from services.datasets import load_dataset_content
    from services.trial_config import CsvDataset

    if not isinstance(config.dataset, CsvDataset) or config.dataset.sha256 is None:
        return {}
    with session_scope(engine) as session:
        return {"csv_content": load_dataset_content(session, config.dataset.sha256)}


def _fail(engine: Engine, trial_id: int, error: str, pending: list[dict[str, Any]]) -> str:
    """Keep the epochs that ran, then mark the trial failed, in one transaction."""
    with session_scope(engine) as session:
        record_epochs(session, trial_id, pending)
        finish_trial(session, trial_id, status=TrialStatus.failed, error=error)
    return TrialStatus.failed.value
