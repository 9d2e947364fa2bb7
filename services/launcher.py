"""`fitscope up`: start the broker (embedded Valkey unless one is configured), migrate, then one worker
and the dashboard as child processes; start a child again when it dies; stop them all on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.config import Settings, redact_url

DASHBOARD_APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
# A child that exits is started again after these delays, growing while it keeps exiting within
# RESTART_RESET_S of its start (a crash loop must not spin), back to the first once it ran longer.
RESTART_DELAYS_S = (1, 2, 5, 10, 30, 60)
RESTART_RESET_S = 60.0


class LaunchError(RuntimeError):
    """Something `fitscope up` needs could not start; the message says what to change."""


def run_stack(settings: Settings, *, echo: Callable[[str], None] = print) -> int:
    from services.broker import PASSWORD_FILE, BrokerStartError, broker_password, start_embedded_broker
    from services.db import DatabaseUnreachable, make_engine
    from services.migrate import current_revision, upgrade
    from services.queue import BrokerUnreachable, check_broker, make_celery

    stop = _StopSignals()  # before anything starts, so a signal during start-up still cleans up
    if warning := exposure_warning(settings):
        echo(warning)
    broker = None
    if settings.uses_embedded_broker:
        try:
            broker = start_embedded_broker(data_dir=settings.home / "broker", port=settings.embedded_broker_port,
                                           host=settings.bind_host, password=broker_password(settings.home))
        except BrokerStartError as exc:
            raise LaunchError(str(exc)) from None
        echo(f"broker     {redact_url(broker.url)} (embedded Valkey, password in "
             f"{settings.home / PASSWORD_FILE}, append-only file in {broker.data_dir})")
    children: list[_Child] = []
    try:
        if broker is None:
            try:
                check_broker(make_celery(settings))
            except BrokerUnreachable as exc:
                raise LaunchError(str(exc)) from None
            echo(f"broker     {redact_url(settings.effective_broker_url)}")
        try:
            current_revision(make_engine(settings.effective_database_url))
        except DatabaseUnreachable as exc:
            raise LaunchError(str(exc)) from None
        upgrade(settings.effective_database_url)
        echo(f"database   {redact_url(settings.effective_database_url)} (schema at head)")
        env = {**os.environ, "FITSCOPE_BROKER_URL": settings.effective_broker_url,
               "FITSCOPE_DATABASE_URL": settings.effective_database_url}
        for name, command in (("worker", [sys.executable, "-m", "services.cli", "worker"]),
                              ("dashboard", dashboard_command(settings))):
            children.append(_Child(name, command, env, _spawn(command, env)))
        echo(f"dashboard  http://{settings.bind_host}:{settings.dashboard_port}")
        echo(f"worker     {worker_banner(settings)} on queue cpu (add more with `fitscope worker` in another shell)")
        echo("Ctrl-C stops everything.")
        return _supervise(children, stop, echo)
    finally:
        for child in reversed(children):
            _stop(child.process)
        if broker is not None:
            broker.stop()
        stop.restore()


def worker_banner(settings: Settings) -> str:
    """How many training processes the worker of `fitscope up` starts, and why that many."""
    processes = settings.effective_worker_concurrency
    why = "FITSCOPE_WORKER_CONCURRENCY" if settings.worker_concurrency is not None else "one per usable CPU"
    return f"{processes} training process{'es' if processes != 1 else ''} ({why})"


def exposure_warning(settings: Settings) -> str | None:
    """The exact risk of FITSCOPE_BIND_HOST beyond this machine, or None on a loopback address. The
    dashboard itself refuses to listen there without sign-in (services/signin.py), so what is left is
    the unencrypted traffic and, with the embedded broker, a queue guarded by a password alone."""
    from services.broker import PASSWORD_FILE
    from services.signin import is_loopback

    host = settings.bind_host
    if is_loopback(host):
        return None
    broker = (f"; the embedded broker on port {settings.embedded_broker_port} is reachable too, guarded only by "
              f"the password in {settings.home / PASSWORD_FILE}, which travels unencrypted"
              if settings.uses_embedded_broker else "")
    return (f"warning: FITSCOPE_BIND_HOST={host} opens the dashboard on port {settings.dashboard_port} to other "
            f"machines over plain HTTP (sign-in cookies and every page unencrypted){broker}; bind 127.0.0.1 and "
            "put a TLS proxy in front, or reach it through an SSH tunnel")


def dashboard_command(settings: Settings) -> list[str]:
    """The streamlit command line that serves the dashboard on FITSCOPE_BIND_HOST:FITSCOPE_DASHBOARD_PORT,
    with sign-in when FITSCOPE_OIDC_* is set (services.signin writes its private secrets file now).
    Raises ConfigError beyond loopback without sign-in."""
    from services.signin import streamlit_args

    return [sys.executable, "-m", "streamlit", "run", str(DASHBOARD_APP),
            "--server.address", settings.bind_host, "--server.port", str(settings.dashboard_port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false", *streamlit_args(settings)]


def _spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    # Own process group, so that Ctrl-C reaches us once and we stop the children in order.
    return subprocess.Popen(command, env=env, start_new_session=True)


class _StopSignals:
    """Ctrl-C, SIGTERM and SIGHUP (the terminal closed) all ask for an orderly stop. The children run
    in their own sessions, so without this a hang-up would leave them running."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._request) for sig in self.SIGNALS}

    def _request(self, _signum, _frame) -> None:
        if self.requested:
            return
        self.requested = True
        raise KeyboardInterrupt  # interrupts a start-up step; the finally blocks stop what started

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class _Child:
    name: str
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen
    started_at: float = field(default_factory=time.monotonic)
    quick_exits: int = 0  # exits in a row within RESTART_RESET_S of a start
    restart_at: float | None = None


def _supervise(children: list[_Child], stop: _StopSignals, echo: Callable[[str], None]) -> int:
    """Keep every child running: one that exits is started again, after a delay that grows while it
    keeps exiting soon after its start; the broker and the other children keep running meanwhile."""
    try:
        while True:
            now = time.monotonic()
            for child in children:
                if child.restart_at is None and child.process.poll() is not None:
                    ran_s = now - child.started_at
                    child.quick_exits = child.quick_exits + 1 if ran_s < RESTART_RESET_S else 1
                    delay = RESTART_DELAYS_S[min(child.quick_exits, len(RESTART_DELAYS_S)) - 1]
                    child.restart_at = now + delay
                    echo(f"{child.name} exited with code {child.process.returncode} after {ran_s:.0f} s; "
                         f"starting it again in {delay} s (the broker and the rest keep running)")
                elif child.restart_at is not None and now >= child.restart_at:
                    child.process, child.started_at, child.restart_at = _spawn(child.command, child.env), now, None
                    echo(f"{child.name} started again (pid {child.process.pid})")
            time.sleep(0.5)
    except KeyboardInterrupt:
        echo("stopping ...")
        return 0


def _stop(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM to the child's whole process group. A worker's training process dies at once and
    Celery puts its trial straight back in the queue (it costs one of the trial's attempts); a warm
    shutdown would instead wait for a trial that may run for hours."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass

