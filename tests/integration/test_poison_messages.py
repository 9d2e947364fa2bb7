"""Messages a local process (or a bug) could push into the queue: a real worker on the real broker
logs each once, keeps an excerpt in ``fitscope.dead`` and drops it, then trains a valid grid."""

from __future__ import annotations

import base64
import json
import time
import uuid

import pytest
import redis
from sqlalchemy import select

from services.db import session_scope
from services.models import Trial
from tests.servers import WorkerProcess, fitscope, fitscope_env
from worker.messages import DEAD_LETTER_KEY, MAX_MESSAGE_BYTES, BadMessage, check_envelope

pytestmark = pytest.mark.integration


def envelope(body: bytes | str, *, task: str = "fitscope.run_job", encoding: str = "base64",
             content_type: str = "application/json") -> dict:
    """A well-formed kombu/Celery protocol-2 envelope, as `celery send_task` would push it."""
    task_id = str(uuid.uuid4())
    if isinstance(body, bytes):
        body = base64.b64encode(body).decode() if encoding == "base64" else body.decode()
    return {"body": body, "content-encoding": "utf-8", "content-type": content_type,
            "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "retries": 0},
            "properties": {"correlation_id": task_id, "delivery_mode": 2, "priority": 0,
                           "delivery_info": {"exchange": "", "routing_key": "cpu"}, "body_encoding": encoding,
                           "delivery_tag": str(uuid.uuid4())}}


OPTIONS = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def body(args, kwargs=None) -> bytes:
    return json.dumps([args, kwargs or {}, OPTIONS]).encode()


# (id, what is pushed onto the list, the reason the worker logs)
POISON = [
    ("wrong-shape", envelope(b'{"x": 1}'), "the body is not [args, kwargs, options]"),
    ("not-json", b"\xff\x00 not json at all", "the envelope is not JSON"),
    ("json-list", [1, 2, 3], "the envelope is a JSON list, not an object"),
    ("json-string", "hello", "the envelope is a JSON str, not an object"),
    ("bad-base64", {**envelope(b""), "body": "!!!not*base64"}, "the body is not valid base64"),
    ("body-not-json", envelope(b"\xff\xfegarbage"), "the body is not JSON"),
    ("huge", envelope(b"[" + b"1," * MAX_MESSAGE_BYTES + b"1]"), "over the cap of"),
    ("huge-headers", {**envelope(body([[1]])), "headers": {"task": "fitscope.run_job", "pad": "x" * 2**20}},
     "bytes, over the cap of 524288"),
    ("unknown-task", envelope(body([1]), task="celery.chord_unlock"), "unknown task 'celery.chord_unlock'"),
    ("no-headers", {**envelope(body([[1]])), "headers": None}, "the envelope has no headers"),
    ("no-delivery-tag", {**envelope(body([[1]])), "properties": {}}, "the envelope has no properties.delivery_tag"),
    ("pickle", envelope(b"\x80\x04garbage", content_type="application/x-python-serialize"),
     "content type 'application/x-python-serialize' is not application/json"),
    ("ids-as-text", envelope(body([["1; DROP TABLE trials"]])), "a trial id must be a whole number, got str"),
    ("id-zero", envelope(body([[0]])), "a trial id must be from 1 to"),
    ("id-too-big", envelope(body([[10**30]])), "a trial id must be from 1 to"),
    ("id-bool", envelope(body([[True]])), "a trial id must be a whole number, got bool"),
    ("no-ids", envelope(body([[]])), "takes 1 to 4096 trial ids, got 0"),
    ("takeover-text", envelope(body([[1]], {"takeover": "yes"})), "argument 'takeover' must be bool, got str"),
    ("extra-kwarg", envelope(body([[1]], {"shell": "rm -rf /"})), "takes no argument 'shell'"),
    ("retired-run-trial", envelope(body([5]), task="fitscope.run_trial"),
     "unknown task 'fitscope.run_trial'; this worker runs fitscope.run_job"),
]


@pytest.mark.parametrize(("pushed", "reason"), [(p, r) for _, p, r in POISON], ids=[i for i, _, _ in POISON])
def test_check_envelope_names_what_is_wrong(pushed, reason):
    if isinstance(pushed, bytes):
        pytest.skip("not JSON at all: refused before check_envelope (by the transport's channel)")
    with pytest.raises(BadMessage, match=None) as caught:
        check_envelope(pushed)
    assert reason in str(caught.value)


@pytest.mark.parametrize("message", [envelope(body([[1, 2, 3]])), envelope(body([[7]], {"takeover": True}))])
def test_check_envelope_accepts_what_fitscope_sends(message):
    check_envelope(message)


@pytest.mark.slow
def test_poison_is_dropped_once_and_a_valid_grid_then_finishes_on_the_same_worker(
        migrated_sqlite_url, broker, broker_url, engine_for, tmp_path):
    env = fitscope_env(database_url=migrated_sqlite_url, broker_url=broker_url, home=tmp_path,
                       FITSCOPE_METRICS_FLUSH_S="0.2")
    client = redis.Redis(host=broker.host, port=broker.port)
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        for _, pushed, _ in POISON:
            client.lpush("cpu", pushed if isinstance(pushed, bytes) else json.dumps(pushed))
        deadline = time.monotonic() + 60
        while client.llen("cpu"):
            assert worker.process.poll() is None, worker.log()[-3000:]
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.1)

        spec = tmp_path / "spec.yaml"
        spec.write_text("name: after poison\nseeds: [0, 1]\nparameters:\n  width: {values: [4, 8]}\n"
                        "  epochs: {value: 3}\n")
        submitted = fitscope("submit", str(spec), "--wait", "--timeout", "120", env=env)
        assert submitted.returncode == 0, submitted.stderr + worker.log()[-3000:]
        assert worker.process.poll() is None, "the worker stopped"
    finally:
        worker.stop()
    with session_scope(engine_for(migrated_sqlite_url)) as session:
        trials = session.scalars(select(Trial)).all()
    assert [t.status for t in trials] == ["succeeded"] * 4
    assert len({t.worker.split("/")[0] for t in trials}) == 1

    log = worker.log()
    assert "Unrecoverable error" not in log and "Traceback" not in log
    for case_id, _, reason in POISON:
        assert log.count(reason) >= 1, case_id
    dropped = log.count("dropped a message from queue")
    assert dropped == len(POISON), log[-3000:]  # each one logged once, never re-delivered
    dead = [json.loads(item) for item in client.lrange(DEAD_LETTER_KEY, 0, -1)]
    assert len(dead) == len(POISON)
    assert all(len(item["excerpt"]) <= 2000 for item in dead)
    assert client.hlen("unacked") == 0  # nothing left half-taken for a restart to re-deliver


@pytest.mark.slow
def test_a_worker_refuses_a_trial_it_cannot_hold_and_goes_on(migrated_sqlite_url, broker_url, engine_for, tmp_path):
    """Admitted under a generous cap at submit; the worker's own cap is lower: it fails that trial with
    one sentence, before allocating it, and trains the next one."""
    env = fitscope_env(database_url=migrated_sqlite_url, broker_url=broker_url, home=tmp_path,
                       FITSCOPE_MAX_TRIAL_MEMORY_MB="200", FITSCOPE_FUSE="false")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: too big here\nparameters:\n  width: {values: [1024, 8]}\n  depth: {value: 4}\n"
                    "  n_train: {value: 20000}\n  epochs: {value: 1}\n")
    submitted = fitscope("submit", str(spec), env={**env, "FITSCOPE_MAX_TRIAL_MEMORY_MB": "4096"})
    assert submitted.returncode == 0, submitted.stderr
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        deadline = time.monotonic() + 120
        while True:
            with session_scope(engine_for(migrated_sqlite_url)) as session:
                trials = session.scalars(select(Trial).order_by(Trial.ordinal)).all()
            if all(t.status not in ("queued", "running") for t in trials):
                break
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.3)
        assert worker.process.poll() is None
    finally:
        worker.stop()
    big, small = trials
    assert big.status == "failed" and big.error.startswith(
        "this worker refuses the trial: a trial with width 1024, depth 4")
    assert "over FITSCOPE_MAX_TRIAL_MEMORY_MB=200" in big.error and "Traceback" not in big.error
    assert small.status == "succeeded"


WITHOUT_THE_CHECK = """
import os, sys
from services.config import get_settings
from worker.celery_app import create_app, run_worker
app = create_app(get_settings())
app.conf.broker_transport = None  # kombu's own Redis transport: the poison reaches Celery unchecked
sys.exit(run_worker(app, ["worker", "--queues=cpu", "--concurrency=1", "--without-gossip", "--without-mingle",
                          f"--hostname=unchecked-{os.getpid()}@test"]))
"""


@pytest.mark.slow
def test_a_worker_that_stops_on_an_error_exits_non_zero(migrated_sqlite_url, broker, broker_url, tmp_path):
    """The exit code the `fitscope worker` command passes on (worker_main used to drop it: 0 after a
    crash, so a supervisor that restarts on failure never did). Provoked the way the issue saw it:
    the {"x": 1} body, with the message check taken out."""
    import subprocess
    import sys

    from tests.servers import REPO

    redis.Redis(host=broker.host, port=broker.port).lpush("cpu", json.dumps(POISON[0][1]))
    env = fitscope_env(database_url=migrated_sqlite_url, broker_url=broker_url, home=tmp_path)
    run = subprocess.run([sys.executable, "-c", WITHOUT_THE_CHECK], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=180)
    assert "Unrecoverable error: ValueError" in run.stdout + run.stderr
    assert run.returncode == 1
