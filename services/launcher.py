"""`fitscope up`: start the broker (embedded Valkey unless one is configured), migrate, then one worker
and the dashboard as child processes; stop them all on Ctrl-C or when one of them dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from services.config import Settings, redact_url

DASHBOARD_APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"


class LaunchError(RuntimeError):
    """Something `fitscope up` needs could not start; the message says what to change."""


def run_stack(settings: Settings, *, echo: Callable[[str], None] = print) -> int:
    from services.broker import BrokerStartError, start_embedded_broker
    from services.db import DatabaseUnreachable, make_engine
    from services.migrate import current_revision, upgrade
    from services.queue import BrokerUnreachable, check_broker, make_celery

    stop = _StopSignals()  # before anything starts, so a signal during start-up still cleans up
    broker = None
    if settings.uses_embedded_broker:
        try:
            broker = start_embedded_broker(data_dir=settings.home / "broker", port=settings.embedded_broker_port,
                                           host=settings.bind_host)
        except BrokerStartError as exc:
            raise LaunchError(str(exc)) from None
        echo(f"broker     {broker.url} (embedded Valkey, append-only file in {broker.data_dir})")
    children: list[tuple[str, subprocess.Popen]] = []
    try:
        if broker is None:
            try:
                check_broker(make_celery(settings))
            except BrokerUnreachable as exc:
                raise LaunchError(str(exc)) from None
            echo(f"broker     {settings.effective_broker_url}")
        try:
            current_revision(make_engine(settings.effective_database_url))
        except DatabaseUnreachable as exc:
            raise LaunchError(str(exc)) from None
        upgrade(settings.effective_database_url)
        echo(f"database   {redact_url(settings.effective_database_url)} (schema at head)")
        env = {**os.environ, "FITSCOPE_BROKER_URL": settings.effective_broker_url,
               "FITSCOPE_DATABASE_URL": settings.effective_database_url}
        children.append(("worker", _spawn([sys.executable, "-m", "services.cli", "worker"], env)))
        children.append(("dashboard", _spawn(dashboard_command(settings), env)))
        echo(f"dashboard  http://{settings.bind_host}:{settings.dashboard_port}")
        echo("worker     1 process on queue cpu (add more with `fitscope worker` in another shell)")
        echo("Ctrl-C stops everything.")
        return _supervise(children, stop, echo)
    finally:
        for _name, process in reversed(children):
            _stop(process)
        if broker is not None:
            broker.stop()
        stop.restore()


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


def _supervise(children: list[tuple[str, subprocess.Popen]], stop: _StopSignals,
               echo: Callable[[str], None]) -> int:
    try:
        while True:
            for name, process in children:
                if process.poll() is not None:
                    echo(f"{name} exited with code {process.returncode}; stopping the rest")
                    return 1
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

