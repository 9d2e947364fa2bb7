"""`fitscope up` among other local processes: its broker wants a password only its home holds, it
never prints that password, and a worker that dies is started again while broker and dashboard stay."""

from __future__ import annotations

import json
import os
import signal
import stat
import time

import pytest
import redis

from services.broker import broker_password, free_port, read_broker_password, start_embedded_broker
from services.config import Settings
from services.queue import BrokerUnreachable, check_broker, make_celery
from tests.integration.test_up import _health, _start_up, _wait_for
from tests.servers import REPO, fitscope, fitscope_env

pytestmark = [pytest.mark.integration]


def test_the_password_is_made_once_private_and_kept(tmp_path):
    home = tmp_path / "home"
    assert read_broker_password(home) is None
    assert not home.exists()  # reading creates nothing
    first = broker_password(home)
    path = home / "broker.password"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) >= 40 and broker_password(home) == first == read_broker_password(home)
    path.chmod(0o644)  # a careless copy
    assert broker_password(home) == first and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_embedded_broker_with_a_password_refuses_clients_without_it(tmp_path):
    password = broker_password(tmp_path / "home")
    broker = start_embedded_broker(data_dir=tmp_path / "broker", port=free_port(), password=password)
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=broker.host, port=broker.port).lpush("cpu", b"poison")
        with pytest.raises(BrokerUnreachable) as refused:
            check_broker(make_celery(Settings(broker_url=f"redis://{broker.host}:{broker.port}/0")), timeout_s=3)
        assert password not in str(refused.value)
        # Every command started from the same home finds the password there.
        settings = Settings(home=tmp_path / "home", embedded_broker_port=broker.port)
        assert settings.effective_broker_url == broker.url
        check_broker(make_celery(settings), timeout_s=3)
        assert password not in (tmp_path / "broker" / "valkey.log").read_text()
        with open(f"/proc/{broker.process.pid}/cmdline", "rb") as cmdline:
            assert password.encode() not in cmdline.read()  # `ps` shows every local user the command line
        assert stat.S_IMODE((tmp_path / "broker" / "valkey.conf").stat().st_mode) == 0o600
    finally:
        broker.stop()


@pytest.mark.slow
def test_up_starts_a_dead_worker_again_and_keeps_broker_and_dashboard(tmp_path):
    up, env, log_path, broker_port, dashboard_port = _start_up(tmp_path)
    try:
        _wait_for(lambda: "Ctrl-C stops everything." in log_path.read_text(), 120, log_path)
        password = (tmp_path / "home" / "broker.password").read_text().strip()
        assert stat.S_IMODE((tmp_path / "home" / "broker.password").stat().st_mode) == 0o600
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=broker_port).ping()

        def online_worker_pids():
            listed = fitscope("workers", "--json", env=env, timeout=60)
            return [row["pid"] for row in json.loads(listed.stdout or "[]") if row["status"] == "online"]

        _wait_for(lambda: len(online_worker_pids()) == 1, 120, log_path)
        [first_pid] = online_worker_pids()
        os.kill(first_pid, signal.SIGKILL)  # as the kernel's OOM killer would
        _wait_for(lambda: "worker exited with code" in log_path.read_text(), 30, log_path)
        _wait_for(lambda: "worker started again" in log_path.read_text(), 30, log_path)
        assert up.poll() is None and _health(dashboard_port) == "ok"
        assert redis.Redis(host="127.0.0.1", port=broker_port, password=password).ping()

        submitted = fitscope("submit", str(REPO / "examples" / "quickstart.yaml"), "--wait", "--json",
                             "--timeout", "240", env=env)
        assert submitted.returncode == 0, submitted.stderr + log_path.read_text()[-3000:]
        assert json.loads(submitted.stdout)["summary"]["counts"]["succeeded"] == 8
        for output in (submitted.stdout, submitted.stderr, log_path.read_text()):
            assert password not in output
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)


def test_binding_beyond_loopback_names_the_risk(tmp_path):
    from services.launcher import exposure_warning

    assert exposure_warning(Settings(home=tmp_path)) is None
    assert exposure_warning(Settings(home=tmp_path, bind_host="localhost")) is None
    warning = exposure_warning(Settings(home=tmp_path, bind_host="0.0.0.0"))
    assert warning.startswith("warning: FITSCOPE_BIND_HOST=0.0.0.0 opens the dashboard on port 8501")
    assert "plain HTTP" in warning and "embedded broker on port 6479" in warning
    assert exposure_warning(Settings(home=tmp_path, bind_host="[::1]")) is None


@pytest.fixture
def silent_server():
    """A port that accepts connections and never says a word (a stuck proxy, a black hole)."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield server.getsockname()[1]
    server.close()


def _timed(*args, env):
    started = time.monotonic()
    result = fitscope(*args, env=env, timeout=120)
    return result, time.monotonic() - started


def test_a_tls_broker_url_to_a_plain_valkey_fails_within_the_broker_check(broker, migrated_sqlite_url, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: t\nparameters:\n  epochs: {value: 1}\n")
    env = fitscope_env(database_url=migrated_sqlite_url, broker_url=f"rediss://:sekrit@{broker.host}:{broker.port}/0",
                       home=tmp_path)
    result, took_s = _timed("submit", str(spec), env=env)
    assert result.returncode == 2 and took_s < 30, (took_s, result.stderr)
    assert result.stderr.count("\n") == 1 and "over TLS within 5 s" in result.stderr, result.stderr
    assert "use redis:// for one that does not" in result.stderr and "sekrit" not in result.stderr


def test_a_database_that_never_answers_fails_within_its_connect_timeout(silent_server, broker_url, tmp_path):
    url = f"postgresql://u:sekrit@127.0.0.1:{silent_server}/x?sslmode=require&password=sekrit2"
    env = fitscope_env(database_url=url, broker_url=broker_url, home=tmp_path)
    result, took_s = _timed("status", env=env)
    assert result.returncode == 2 and took_s < 40, (took_s, result.stderr)
    assert "cannot reach the database at postgresql+psycopg://u:***@127.0.0.1" in result.stderr, result.stderr
    assert "sekrit" not in result.stderr and "Traceback" not in result.stderr
