"""The worker's presence in the database, kept by a daemon thread in the worker's main process.

Each beat (every FITSCOPE_HEARTBEAT_S) records that this worker is alive, then sweeps for workers
that stopped beating and re-sends their running trials as takeovers (services.workers), so a dead
worker's trials are picked up by whichever live worker notices first. A database or broker blip is
logged and tried again at the next beat; takeovers that could not be sent are kept and sent then.

A worker sweeps only once the database has answered it for FITSCOPE_WORKER_LOST_AFTER_S without a
break: after an outage every worker's last beat predates it, and the first to get through must not
declare the others lost before they have had the time to beat again.

The main process never imports torch (it forks the training processes): the torch version comes
from the installed package's metadata, the device from the queues.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from importlib import metadata

from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from services.checkpoints import checkpointed_jobs
from services.config import Settings
from services.db import make_engine, session_scope
from services.models import utcnow
from services.queue import enqueue_jobs, make_celery
from services.submission import plan_requeue
from services.workers import LOST, heartbeat, mark_stopped, register, sweep_stale

log = logging.getLogger(__name__)

# The pool forks training processes from this process while the heartbeat thread may be inside
# SQLite, psycopg or redis-py. A fork in the middle of a beat copies whatever lock that library then
# holds, locked, into the child, whose first query then waits for ever (seen: a re-forked training
# process stuck in futex_wait after a kill -9). So a fork waits for the beat in progress to end, and
# a beat never starts while a fork is under way.
_FORK_GUARD = threading.Lock()
os.register_at_fork(before=_FORK_GUARD.acquire, after_in_parent=_FORK_GUARD.release,
                    after_in_child=_FORK_GUARD.release)


def installed_torch_version() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


class Presence:
    """Register, beat and sweep from a daemon thread; :meth:`stop` marks the worker stopped."""

    def __init__(self, settings: Settings, *, name: str, queues: list[str], concurrency: int,
                 started_at: datetime | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.name, self.queues, self.concurrency = settings, name, queues, concurrency
        self.started_at = started_at or utcnow()
        self.engine = _heartbeat_engine(settings.effective_database_url)
        self.producer = make_celery(settings, name="fitscope-presence")
        self._registered = False
        self._unsent: list[tuple[list[int], str]] = []  # takeover jobs owed: (trial ids, queue)
        self._clock = clock
        # Since when (clock seconds) every beat has reached the database; None until one has.
        self._db_ok_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fitscope-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop beating and mark this worker stopped (best effort: a dead database is only logged).
        Takeovers it still owes stay marked pending under its name; the row is then left online, so
        that whoever finds it silent re-sends them."""
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout_s)
        if not self._thread.is_alive():  # a beat stuck on a dead database still owns the list
            self._send_takeovers()
        if self._unsent:
            log.warning("worker %s stops owing the takeover of trials %s; left online so that another worker "
                        "re-sends them once it finds this one silent", self.name,
                        [trial_id for ids, _ in self._unsent for trial_id in ids])
            self.engine.dispose()
            return
        try:
            with session_scope(self.engine) as session:
                mark_stopped(session, self.name)
            log.info("worker %s marked stopped", self.name)
        except Exception as exc:
            log.warning("worker %s: could not mark itself stopped (%s)", self.name, _reason(exc))
        finally:
            self.engine.dispose()

    def _run(self) -> None:
        while True:
            self.beat()
            if self._stop.wait(self.settings.heartbeat_s):
                return

    def beat(self) -> None:
        """One heartbeat and one sweep; never raises, so the thread outlives any outage."""
        with _FORK_GUARD:
            self._beat()

    def _beat(self) -> None:
        try:
            orphans: list[tuple[list[int], str]] = []
            with session_scope(self.engine) as session:
                previous = heartbeat(session, self.name) if self._registered else None
                if previous is None:
                    orphans = self._as_jobs(session, register(
                        session, name=self.name, host=socket.gethostname(), pid=os.getpid(), queues=self.queues,
                        device="cuda" if "gpu" in self.queues else "cpu", torch_version=installed_torch_version(),
                        concurrency=self.concurrency, started_at=self.started_at))
            self._unsent += orphans  # only once committed: a rolled-back flip sends nothing
            if previous == LOST:
                log.warning("worker %s had been given up as lost; its running trials were re-sent to others",
                            self.name)
            if not self._registered:
                log.info("worker %s registered (beats every %g s)", self.name, self.settings.heartbeat_s)
                self._registered = True
            now = self._clock()
            if self._db_ok_since is None:
                self._db_ok_since = now
            if now - self._db_ok_since >= self.settings.worker_lost_after_s:
                with session_scope(self.engine) as session:
                    stale = self._as_jobs(session, sweep_stale(
                        session, lost_after_s=self.settings.worker_lost_after_s, sweeper=self.name))
                self._unsent += stale
        except Exception as exc:
            self._db_ok_since = None
            log.warning("worker %s: heartbeat failed (%s); trying again in %g s", self.name, _reason(exc),
                        self.settings.heartbeat_s)
        self._send_takeovers()

    def _as_jobs(self, session, trials: list[tuple[int, str]]) -> list[tuple[list[int], str]]:
        """A lost worker's trials: each job that has a checkpoint as the very job, so it resumes; the
        rest planned as a submission plans them, so a lost fused job comes back fused, not one trial
        per message; one per message if planning fails."""
        resumable, trials = checkpointed_jobs(session, trials)
        try:
            return resumable + plan_requeue(session, trials, fuse=self.settings.fuse,
                                            fuse_max_trials=self.settings.fuse_max_trials)
        except ValueError as exc:  # a stored config that no longer validates (a database error propagates)
            log.warning("could not plan the takeover of trials %s as fused jobs (%s); sending them one by one",
                        [trial_id for trial_id, _ in trials], _reason(exc))
            return resumable + [([trial_id], queue) for trial_id, queue in trials]

    def _send_takeovers(self) -> None:
        """One message at a time, each dropped from the list once sent: a broker that fails half-way
        through leaves only the unsent ones to send at the next beat."""
        sent = []
        try:
            while self._unsent:
                enqueue_jobs(self.producer, self._unsent[:1], takeover=True)
                sent.extend(self._unsent.pop(0)[0])
        except Exception as exc:
            log.warning("could not re-send %d trials of lost workers (%s); trying again at the next beat",
                        len(self._unsent), _reason(exc))
        if sent:
            log.warning("re-sent trials %s of lost workers as takeovers", sent)


def _heartbeat_engine(url: str):
    """No pool: a connection lives only for one beat, so nothing is shared with forked pool processes.
    On PostgreSQL a connection attempt gives up after 5 s, so a dead server costs one beat, not minutes."""
    if make_url(url).get_backend_name() == "postgresql":
        return make_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
    return make_engine(url, poolclass=NullPool)


def _reason(exc: Exception) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
