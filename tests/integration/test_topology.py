"""The compose topology, run as local processes (there is no Docker engine here): a throwaway
PostgreSQL cluster with the compose file's role and password, a Valkey started with the redis
service's own command line (append-only, noeviction, password), the migrate service's command, TWO
workers and the dashboard, each with the environment compose gives its container; compose's host
names and container ports are mapped to 127.0.0.1 and free ports. A grid then runs across both."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from services.broker import free_port, valkey_binary
from services.db import session_scope
from services.models import EpochMetric, Trial
from tests.compose import interpolate, load_compose, read_env_file, service_environment
from tests.servers import REPO, WorkerProcess, fitscope

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.postgres]

EPOCHS = 40
GRID = f"""name: team-grid
fuse: false            # one message per trial, so the trials can spread over the workers
seeds: [0, 1]
parameters:
  width: {{values: [8, 16, 32, 64]}}
  epochs: {{value: {EPOCHS}}}
"""


@pytest.fixture
def dot_env() -> dict[str, str]:
    """A user's .env: .env.example with the two passwords set and one training process per worker
    (this machine has two cores for two workers)."""
    return {**read_env_file(), "POSTGRES_PASSWORD": secrets.token_hex(12), "REDIS_PASSWORD": secrets.token_hex(12),
            "WORKER_CPUS": "1", "FITSCOPE_WORKER_CONCURRENCY": "1"}


@pytest.fixture
def valkey(dot_env, tmp_path):
    """The redis service's command and environment, with valkey for redis-server, on a free port of
    127.0.0.1 (the script passes extra arguments on to the server)."""
    compose = load_compose()
    command = interpolate(compose["services"]["redis"]["command"], dot_env)
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "redis-server").symlink_to(valkey_binary())
    port = free_port()
    environment = {**os.environ, **service_environment(compose, "redis", dot_env),
                   "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen([*command, "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                "--dir", str(tmp_path), "--save", ""], env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = redis.Redis(host="127.0.0.1", port=port, password=dot_env["REDIS_PASSWORD"])
    try:
        _wait(lambda: _answers(client), 15, lambda: "valkey did not answer")
        # The password works, yet no process's command line shows it (the shell exec'd the server).
        command_line = Path(f"/proc/{process.pid}/cmdline").read_bytes()
        assert b"valkey" in command_line or b"redis-server" in command_line
        assert dot_env["REDIS_PASSWORD"].encode() not in command_line
        yield port, client
    finally:
        client.close()
        process.terminate()
        process.wait(10)


@pytest.fixture
def fitscope_database(postgres, dot_env):
    """The compose postgres service's role and password, in the throwaway cluster."""
    import psycopg

    database = f"fitscope_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=postgres dbname=postgres",
                         autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'fitscope'").fetchone():
            conn.execute("CREATE ROLE fitscope LOGIN")
        conn.execute(f"ALTER ROLE fitscope PASSWORD '{dot_env['POSTGRES_PASSWORD']}'")
        conn.execute(f'CREATE DATABASE "{database}" OWNER fitscope')
    return postgres.port, database


@pytest.fixture
def container_env(dot_env, valkey, fitscope_database, tmp_path):
    """``env(service)``: what compose gives that service's container, with hosts mapped to 127.0.0.1."""
    compose = load_compose()
    redis_port, _ = valkey
    postgres_port, database = fitscope_database

    def env(service: str, **overrides: str) -> dict[str, str]:
        environment = service_environment(compose, service, dot_env)
        url = make_url(environment["FITSCOPE_DATABASE_URL"])
        assert (url.host, url.port, url.username) == ("postgres", 5432, "fitscope")
        environment["FITSCOPE_DATABASE_URL"] = url.set(host="127.0.0.1", port=postgres_port, database=database
                                                       ).render_as_string(hide_password=False)
        assert "@redis:6379/" in environment["FITSCOPE_BROKER_URL"]
        environment["FITSCOPE_BROKER_URL"] = environment["FITSCOPE_BROKER_URL"].replace(
            "@redis:6379/", f"@127.0.0.1:{redis_port}/")
        base = {k: v for k, v in os.environ.items() if not k.startswith("FITSCOPE_")}
        # FITSCOPE_HOME stands for the container's own working folder.
        return {**base, **environment, "FITSCOPE_HOME": str(tmp_path / service), "PYTHONUNBUFFERED": "1",
                **overrides}

    return compose, env


def test_the_compose_topology_runs_a_grid_across_two_workers(container_env, valkey, tmp_path, engine_for):
    compose, env = container_env
    services = compose["services"]
    _, broker = valkey
    assert broker.config_get("appendonly")["appendonly"] == "yes"
    assert broker.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"

    # Before the migrate step every process refuses the database, naming the fix.
    refused = fitscope("workers", env=env("worker"))
    assert refused.returncode == 2 and "fitscope db upgrade" in refused.stderr, refused.stderr
    migrate = services["migrate"]["command"]
    migrated = fitscope(*migrate[1:], env=env("migrate"), timeout=120)
    assert migrated.returncode == 0, migrated.stderr

    worker_args = services["worker"]["command"][2:]
    assert services["worker"]["command"][:2] == ["fitscope", "worker"]
    workers = [WorkerProcess(env("worker"), tmp_path / f"worker{i}.log", *worker_args) for i in (1, 2)]
    dashboard_port = free_port()
    dashboard = _start(services["dashboard"]["command"], tmp_path / "dashboard.log",
                       env("dashboard", FITSCOPE_BIND_HOST="127.0.0.1", FITSCOPE_DASHBOARD_PORT=str(dashboard_port)))
    try:
        for worker in workers:
            worker.wait_ready(timeout=120)
        _wait(lambda: _health(dashboard_port) == "ok", 90, lambda: (tmp_path / "dashboard.log").read_text())

        spec = tmp_path / "grid.yaml"
        spec.write_text(GRID)
        user = env("worker", FITSCOPE_SUBMITTED_BY="alice")
        submitted = fitscope("submit", str(spec), "--wait", "--json", "--timeout", "240", "--tag", "team",
                             "--note", "two workers, one database", env=user)
        assert submitted.returncode == 0, submitted.stderr + "".join(w.log()[-2000:] for w in workers)
        payload = json.loads(submitted.stdout)
        assert payload["summary"]["counts"]["succeeded"] == 8

        listed = fitscope("workers", "--json", env=user)
        assert listed.returncode == 0, listed.stderr
        online = {row["name"]: row for row in json.loads(listed.stdout) if row["status"] == "online"}
        names = {f"fitscope-{worker.process.pid}@{os.uname().nodename}" for worker in workers}
        assert set(online) == names
        assert all(row["queues"] == ["cpu"] and row["concurrency"] == 1 for row in online.values())

        found = fitscope("status", "--search", "ALICE", "--json", env=user)
        [summary] = json.loads(found.stdout)
        assert (summary["id"], summary["tags"], summary["note"]) == (payload["experiment_id"], ["team"],
                                                                      "two workers, one database")

        # `docker compose stop`: SIGTERM to each container's main process, which compose's environment
        # (REMAP_SIGTERM) turns into a cold shutdown that ends within stop_grace_period, marked stopped.
        assert env("worker")["REMAP_SIGTERM"] == "SIGQUIT"
        grace_s = float(services["worker"]["stop_grace_period"].removesuffix("s"))
        for worker in workers:
            worker.process.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.process.wait(grace_s)
        stopped = {row["name"]: row["status"] for row in json.loads(fitscope("workers", "--json", env=user).stdout)}
        assert stopped == dict.fromkeys(names, "stopped")
    finally:
        for worker in workers:
            worker.stop()
        _stop(dashboard)

    engine = engine_for(env("worker")["FITSCOPE_DATABASE_URL"])
    with session_scope(engine) as session:
        ran_on = session.scalars(select(Trial.worker).where(Trial.experiment_id == payload["experiment_id"])).all()
        rows_per_trial = session.execute(
            select(EpochMetric.trial_id, func.count(), func.count(func.distinct(EpochMetric.epoch)))
            .group_by(EpochMetric.trial_id)).all()
    assert {worker.rpartition("/")[0] for worker in ran_on} == names, "the trials did not spread over both workers"
    assert sorted(trial_id for trial_id, _, _ in rows_per_trial) == sorted(payload["trial_ids"])
    assert {(count, distinct) for _, count, distinct in rows_per_trial} == {(EPOCHS, EPOCHS)}


def _start(command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    assert command[0] == "fitscope"
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "services.cli", *command[1:]], env=env, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _health(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
            return response.read().decode()
    except OSError:
        return None


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


def _wait(condition, timeout_s: float, describe) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, describe()[-3000:]
        time.sleep(0.2)
