"""`fitscope up` and its embedded broker, as a user runs them: nothing configured but FITSCOPE_HOME."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import redis

from services.broker import free_port, port_in_use, start_embedded_broker
from services.config import Settings
from services.cpus import usable_cpus
from services.queue import enqueue_jobs, make_celery
from tests.servers import REPO, fitscope

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_queued_messages_survive_an_embedded_broker_restart(tmp_path):
    data_dir, port = tmp_path / "broker", free_port()
    broker = start_embedded_broker(data_dir=data_dir, port=port)
    try:
        producer = make_celery(Settings(broker_url=broker.url))
        enqueue_jobs(producer, [([trial_id], "cpu") for trial_id in range(1, 21)])
    finally:
        broker.stop()
    assert (data_dir / "appendonlydir").is_dir()
    restarted = start_embedded_broker(data_dir=data_dir, port=port)
    try:
        client = redis.Redis(host=restarted.host, port=restarted.port)
        messages = [json.loads(raw) for raw in client.lrange("cpu", 0, -1)]
        assert len(messages) == 20
        assert {m["headers"]["task"] for m in messages} == {"fitscope.run_job"}
    finally:
        restarted.stop()


def test_a_taken_port_is_one_clear_sentence(broker, tmp_path):
    from services.broker import BrokerStartError

    with pytest.raises(BrokerStartError, match=f"port {broker.port} on 127.0.0.1 is already taken"):
        start_embedded_broker(data_dir=tmp_path, port=broker.port)


def _start_up(tmp_path):
    """`fitscope up` with nothing configured but its home and free ports, as a user would run it."""
    broker_port, dashboard_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FITSCOPE_")}
    env.update({"FITSCOPE_HOME": str(tmp_path / "home"), "FITSCOPE_EMBEDDED_BROKER_PORT": str(broker_port),
                "FITSCOPE_DASHBOARD_PORT": str(dashboard_port), "PYTHONUNBUFFERED": "1"})
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        up = subprocess.Popen([sys.executable, "-m", "services.cli", "up"], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    return up, env, log_path, broker_port, dashboard_port


def test_up_runs_broker_worker_and_dashboard_and_ctrl_c_stops_them_all(tmp_path):
    up, env, log_path, broker_port, dashboard_port = _start_up(tmp_path)
    try:
        _wait_for(lambda: "Ctrl-C stops everything." in log_path.read_text(), 120, log_path)
        _wait_for(lambda: _health(dashboard_port) == "ok", 90, log_path)
        # The same defaults reach the embedded broker and the SQLite file under FITSCOPE_HOME.
        submitted = fitscope("submit", str(REPO / "examples" / "quickstart.yaml"), "--wait", "--json",
                             "--timeout", "240", env=env)
        assert submitted.returncode == 0, submitted.stderr + log_path.read_text()[-3000:]
        assert json.loads(submitted.stdout)["summary"]["counts"]["succeeded"] == 8
        assert (tmp_path / "home" / "fitscope.db").exists()
        # One training process per usable CPU, said in the banner and by `fitscope workers`.
        cpus = usable_cpus()
        plural = "es" if cpus != 1 else ""
        assert f"worker     {cpus} training process{plural} (one per usable CPU)" in log_path.read_text()
        listed = fitscope("workers", "--json", env=env)
        assert [row["concurrency"] for row in json.loads(listed.stdout)] == [cpus], listed.stdout + listed.stderr
        password = (tmp_path / "home" / "broker.password").read_text().strip()
        assert f"redis://:***@127.0.0.1:{broker_port}/0" in log_path.read_text()
        assert password not in log_path.read_text()
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(60)
    assert code == 0, log_path.read_text()[-3000:]
    assert not port_in_use("127.0.0.1", broker_port)
    assert not port_in_use("127.0.0.1", dashboard_port)


def _health(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
            return response.read().decode()
    except OSError:
        return None


def _wait_for(condition, timeout: float, log_path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s:\n{log_path.read_text()[-3000:]}")


def test_a_hang_up_stops_everything_up_started(tmp_path):
    up, _env, log_path, broker_port, dashboard_port = _start_up(tmp_path)
    try:
        _wait_for(lambda: "Ctrl-C stops everything." in log_path.read_text(), 120, log_path)
        up.send_signal(signal.SIGHUP)  # the terminal closed
        up.wait(60)
    finally:
        if up.poll() is None:
            up.kill()
    deadline = time.monotonic() + 30
    while (port_in_use("127.0.0.1", broker_port) or port_in_use("127.0.0.1", dashboard_port)) \
            and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not port_in_use("127.0.0.1", broker_port), log_path.read_text()[-2000:]
    assert not port_in_use("127.0.0.1", dashboard_port), log_path.read_text()[-2000:]
