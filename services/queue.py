"""The Celery side that both the submitter and the worker share: configuration, queue names, and
sending jobs. Messages carry ids only (JSON); workers re-fetch state from the database."""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery
from kombu import Queue

from services.config import Settings, redact_url

# The one task: args [trial ids] (one or more, trained as one stack), kwargs {"takeover": bool}.
RUN_JOB_TASK = "fitscope.run_job"
MAX_JOB_TRIALS = 4096  # the most ids one message may carry (FITSCOPE_FUSE_MAX_TRIALS is at most this)
QUEUES = ("cpu", "gpu")
SOFT_SHUTDOWN_S = 20.0  # docker-compose.yml's stop_grace_period must outlast it
# Every socket to the broker gives up after this many seconds: without it a TLS handshake with a
# server that does not speak TLS (rediss:// to a plain Valkey) waits for ever.
BROKER_SOCKET_TIMEOUTS = {"socket_connect_timeout": 5.0, "socket_timeout": 5.0}


class BrokerUnreachable(RuntimeError):
    """The broker URL does not answer; the message names the URL and what to check."""


def celery_config(settings: Settings) -> dict:
    """Settings for a long-running-task queue: late acks, one message at a time, JSON only."""
    return {
        "broker_url": settings.effective_broker_url,
        "broker_connection_retry_on_startup": True,
        # Redis re-delivers an unacknowledged message after this long, so it must outlast any trial.
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s, **BROKER_SOCKET_TIMEOUTS},
        "broker_connection_timeout": BROKER_SOCKET_TIMEOUTS["socket_connect_timeout"],
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_backend": None,  # results live in the database, not in Celery
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # A cold shutdown (SIGQUIT; SIGTERM too where REMAP_SIGTERM=SIGQUIT, as in docker-compose.yml)
        # lets running trials go on for this long, then cancels them; the broker connection then puts
        # their unacknowledged messages back in the queue, marked redelivered, for another worker to
        # take over. On idle too, so reserved-but-not-started messages are restored the same way.
        "worker_soft_shutdown_timeout": SOFT_SHUTDOWN_S,
        "worker_enable_soft_shutdown_on_idle": True,
        "task_queues": [Queue(name) for name in QUEUES],
        "task_default_queue": "cpu",
        "task_create_missing_queues": False,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "enable_utc": True,
    }


def make_celery(settings: Settings, *, name: str = "fitscope") -> Celery:
    """The Celery app of these settings, its broker client library already imported (it connects on
    first use): kombu imports it at the first connection otherwise, 0.06-0.13 s here, which a
    long-running submitter (the dashboard) would pay in a user's first submit, not at its start."""
    app = Celery(name)
    app.conf.update(celery_config(settings))
    app.connection_for_write().release()  # resolves (imports) the transport; opens no socket
    return app


def check_broker(app: Celery, *, timeout_s: float = 5.0) -> None:
    """Fail fast with one sentence when the broker does not answer."""
    url = app.conf.broker_url
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout_s)
    except Exception as exc:  # kombu raises several unrelated types for a dead broker
        if url.startswith("rediss://"):
            raise BrokerUnreachable(
                f"cannot reach the broker at {redact_url(url)} over TLS within {timeout_s:g} s ({type(exc).__name__}); "
                "check that the server speaks TLS on that port, or use redis:// for one that does not"
            ) from None
        raise BrokerUnreachable(
            f"cannot reach the broker at {redact_url(url)} ({type(exc).__name__}); start it with `fitscope up` "
            "or set FITSCOPE_BROKER_URL to a running Redis"
        ) from None


def enqueue_jobs(app: Celery, jobs: Iterable[tuple[list[int], str]], *, takeover: bool = False) -> int:
    """Send one run_job message per (trial ids, queue) over one connection; call only after the commit.
    ``takeover`` sends trials left ``running`` by a worker that stopped heart-beating
    (services.workers.sweep_stale): their claim then keeps the rows up to their job's checkpoint and
    counts the attempt. Send those only after the commit that declared the worker lost."""
    sent = 0
    kwargs = {"takeover": True} if takeover else {}
    with app.producer_or_acquire() as producer:
        for trial_ids, queue in jobs:
            app.send_task(RUN_JOB_TASK, args=[[int(trial_id) for trial_id in trial_ids]], kwargs=kwargs, queue=queue,
                          producer=producer)
            sent += 1
    return sent


def enqueue_submission(app: Celery, submitted) -> int:
    """Send what a submission (services.submission.Submitted) asks for: its planned jobs, or one job
    per trial when it has none. Call only after the commit. Returns the messages sent."""
    return enqueue_jobs(app, submitted.jobs or [([trial_id], queue) for trial_id, queue in submitted.trials])
