"""The one Celery task, thin like a web view: it takes a job's trial ids, hands them to worker/jobs.py
(which claims, trains and persists any number of trials) and handles acknowledgement and re-queueing.
A message re-delivered for trials that have ended does nothing."""

from __future__ import annotations

import logging
import os
import socket

from celery import Celery, Task
from sqlalchemy import Engine

from services.checkpoints import checkpoint_store
from services.config import get_settings
from services.db import make_engine
from services.queue import RUN_JOB_TASK
from worker.jobs import DatabaseDown, execute_job

log = logging.getLogger(__name__)
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
    # ConfigError (one sentence naming FITSCOPE_CHECKPOINT_URL) now, not a warning per job later.
    checkpoint_store(get_settings().checkpoint_url).check()
    # max_retries=None: a job re-queued by a database outage is re-queued for as long as it lasts.
    app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)(run_job)


def run_job(task: Task, trial_ids: list[int], takeover: bool = False) -> dict[str, str]:
    """Train a job (one trial or many, as one stack); returns {trial id: final status}: "skipped"
    for trials with nothing to do, "superseded" for those another attempt took over meanwhile."""
    # worker/messages.py has checked the message: 1 to MAX_JOB_TRIALS whole trial ids.
    worker = f"{task.request.hostname or socket.gethostname()}/{os.getpid()}"[:200]
    redelivered = takeover or bool((task.request.delivery_info or {}).get("redelivered"))
    try:
        return execute_job(get_engine(), trial_ids, worker=worker, redelivered=redelivered)
    except DatabaseDown as exc:
        # Acknowledging now would leave trials queued or running for ever: send the job again, as a
        # takeover that resumes from its checkpoint. Each such takeover counts one attempt, so a
        # database down for FITSCOPE_MAX_ATTEMPTS x FITSCOPE_DB_WAIT_S fails the trials, with a message.
        log.error("job of trials %s: %s; re-queueing it", trial_ids, exc)
        raise task.retry(kwargs={"takeover": True}, countdown=get_settings().db_retry_delays_s[-1]) from None
