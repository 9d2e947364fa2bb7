"""Real servers for the tests: a throwaway PostgreSQL cluster and fitscope worker processes.

The broker is fitscope's own embedded Valkey (services.broker), started on a free port.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from services.broker import free_port

REPO = Path(__file__).resolve().parent.parent


def postgres_bin_dir() -> Path | None:
    """Debian's server binaries (initdb, pg_ctl, postgres), newest version first; or on PATH."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists() and Path(candidate, "pg_ctl").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


@dataclass
class PostgresCluster:
    bin_dir: Path
    data_dir: Path
    port: int
    run_as: str | None

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(args, check=check, capture_output=True, text=True, user=self.run_as,
                              group=self.run_as and "nogroup", cwd=self.data_dir.parent)

    def start(self) -> None:
        log = self.data_dir.parent / "postgres.log"
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(log), "-w", "-t", "60",
                  "-o", f"-p {self.port} -k {self.data_dir.parent} -c listen_addresses=127.0.0.1 "
                        "-c fsync=off -c max_connections=200", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop", check=False)


MEMORY_FOLDER = "/dev/shm"  # noqa: S108 - mkdtemp makes a private (0700) folder of its own in it


def memory_folder(room_bytes: int = 4 * 2**30) -> str | None:
    """The in-memory folder where it has room for the suite's databases (each test creates one, ~8 MB):
    a cluster there creates, migrates and removes them without waiting on a disk the other jobs of a
    busy machine share. None (the usual temp folder) elsewhere, or where it is small (Docker gives
    64 MB by default)."""
    try:
        stats = os.statvfs(MEMORY_FOLDER)
    except OSError:
        return None
    roomy = stats.f_bavail * stats.f_frsize >= room_bytes and os.access(MEMORY_FOLDER, os.W_OK)
    return MEMORY_FOLDER if roomy else None


def start_postgres() -> PostgresCluster:
    """initdb + pg_ctl start in a temp dir, as an unprivileged user when we are root (initdb refuses root)."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    root = Path(tempfile.mkdtemp(prefix="fitscope-pg-", dir=memory_folder()))
    run_as = "nobody" if os.geteuid() == 0 else None
    if run_as:
        shutil.chown(root, user="nobody", group="nogroup")
    cluster = PostgresCluster(bin_dir=bin_dir, data_dir=root / "data", port=free_port(), run_as=run_as)
    cluster._run(str(bin_dir / "initdb"), "-D", str(cluster.data_dir), "-U", "postgres", "-A", "trust",
                 "-E", "UTF8", "--no-sync")
    cluster.start()
    return cluster


def remove_postgres(cluster: PostgresCluster) -> None:
    cluster.stop("immediate")
    shutil.rmtree(cluster.data_dir.parent, ignore_errors=True)


def throwaway_postgres() -> Iterator[PostgresCluster]:
    """A fixture body: a fresh cluster for the test (or session) and its removal afterwards; skips,
    saying what to install, where Debian's server binaries are absent."""
    import pytest

    if postgres_bin_dir() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed; "
                    "apt-get install postgresql to run the PostgreSQL tests")
    cluster = start_postgres()
    yield cluster
    remove_postgres(cluster)


def fitscope_env(*, database_url: str, broker_url: str, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FITSCOPE_")}
    # One training process unless a test asks for more: the default (one per usable CPU) differs from
    # machine to machine, and so would the plans of fused jobs and the load of the suite.
    env.update({"FITSCOPE_DATABASE_URL": database_url, "FITSCOPE_BROKER_URL": broker_url,
                "FITSCOPE_HOME": str(home), "PYTHONUNBUFFERED": "1", "FITSCOPE_WORKER_CONCURRENCY": "1"})
    env.update(extra)
    return env


def fitscope(*args: str, env: dict[str, str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=kwargs.pop("cwd", REPO), **kwargs)


class WorkerProcess:
    """A real `fitscope worker` in its own process group, with its log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, *extra_args: str):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "services.cli", "worker", *extra_args], env=env,
                                        cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def wait_ready(self, timeout: float = 90, processes: int = 1) -> None:
        """Until the worker consumes and its training processes have warmed up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            log = self.log()
            if "ready." in log and log.count("training process") >= processes:
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
