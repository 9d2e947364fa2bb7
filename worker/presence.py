"""The worker's presence in the database, kept by a daemon thread in the worker's main process.

Each beat (every FITSCOPE_HEARTBEAT_S) records that this worker is alive, then sweeps for workers
that stopped beating and re-sends their running trials as takeovers (services.workers), so a dead
worker's trials are picked up by whichever live worker notices first. A database or broker blip is
logged and tried again at the next beat; takeovers that could not be sent are kept and sent then.

The main process never imports torch (it forks the training processes): the torch version comes
from the installed package's metadata, the device from the queues.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import datetime
from importlib import metadata

from sqlalchemy.pool import NullPool

from services.config import Settings
from services.db import make_engine, session_scope
from services.models import utcnow
from services.queue import enqueue_takeovers, make_celery
from services.workers import LOST, heartbeat, mark_stopped, register, sweep_stale

log = logging.getLogger(__name__)


def installed_torch_version() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


class Presence:
    """Register, beat and sweep from a daemon thread; :meth:`stop` marks the worker stopped."""

    def __init__(self, settings: Settings, *, name: str, queues: list[str], concurrency: int,
                 started_at: datetime | None = None) -> None:
        self.settings, self.name, self.queues, self.concurrency = settings, name, queues, concurrency
        self.started_at = started_at or utcnow()
        # No pool: a connection lives only for one beat, so nothing is shared with forked pool processes.
        self.engine = make_engine(settings.effective_database_url, poolclass=NullPool)
        self.producer = make_celery(settings, name="fitscope-presence")
        self._registered = False
        self._unsent: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fitscope-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop beating and mark this worker stopped (best effort: a dead database is only logged)."""
        self._stop.set()
        self._thread.join(timeout_s)
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
        try:
            orphans: list[tuple[int, str]] = []
            with session_scope(self.engine) as session:
                previous = heartbeat(session, self.name) if self._registered else None
                if previous is None:
                    orphans = register(
                        session, name=self.name, host=socket.gethostname(), pid=os.getpid(), queues=self.queues,
                        device="cuda" if "gpu" in self.queues else "cpu", torch_version=installed_torch_version(),
                        concurrency=self.concurrency, started_at=self.started_at)
            self._unsent += orphans  # only once committed: a rolled-back flip sends nothing
            if previous == LOST:
                log.warning("worker %s had been given up as lost; its running trials were re-sent to others",
                            self.name)
            if not self._registered:
                log.info("worker %s registered (beats every %g s)", self.name, self.settings.heartbeat_s)
                self._registered = True
            with session_scope(self.engine) as session:
                stale = sweep_stale(session, lost_after_s=self.settings.worker_lost_after_s)
            self._unsent += stale
        except Exception as exc:
            log.warning("worker %s: heartbeat failed (%s); trying again in %g s", self.name, _reason(exc),
                        self.settings.heartbeat_s)
        self._send_takeovers()

    def _send_takeovers(self) -> None:
        if not self._unsent:
            return
        try:
            enqueue_takeovers(self.producer, self._unsent)
        except Exception as exc:
            log.warning("could not re-send %d trials of lost workers (%s); trying again at the next beat",
                        len(self._unsent), _reason(exc))
            return
        log.warning("re-sent trials %s of lost workers as takeovers", [trial_id for trial_id, _ in self._unsent])
        self._unsent = []


def _reason(exc: Exception) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
