"""The worker's Celery app. Created by :func:`create_app`, never at import.

torch is imported only in the pool's child processes (``worker_process_init``), after the fork,
so no torch thread pool or CUDA context is ever inherited across a fork. Each child then trains one
tiny trial, so that torch's one-time costs (lazy imports on the first optimizer step, ~3 s here)
are paid before the first real trial rather than inside it.
"""

from __future__ import annotations

import atexit
import os
import time

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown
from celery.utils.log import get_logger

from services.config import Settings, get_settings
from services.cpus import cpu_quota
from services.queue import make_celery

log = get_logger(__name__)
# Importing torch and the warm-up take several seconds; Celery's default allows 4 s.
PROCESS_START_TIMEOUT_S = 120


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = make_celery(settings, name="fitscope-worker")
    app.conf.worker_proc_alive_timeout = PROCESS_START_TIMEOUT_S
    from worker import tasks
    from worker.messages import use_validating_transport

    use_validating_transport(app)  # every message checked before Celery acts on it

    tasks.register(app)  # the one task: a job of one or more trials
    return app


def run_worker(app: Celery, argv: list[str]) -> int:
    """Run `celery worker` with ``argv`` and return its exit code: non-zero when it stopped on an
    error, so a supervisor restarts it (app.worker_main and app.start both drop the code)."""
    from celery.bin.celery import celery
    from click.exceptions import Exit

    celery.params[0].default = app
    try:
        code = celery.main(args=argv, standalone_mode=False)
    except Exit as exc:
        code = exc.exit_code
    finally:
        celery.params[0].default = None
    return code if isinstance(code, int) else 0


# The worker's presence (registration, heartbeat, sweep of lost workers) lives in its main process.
_presence = None
_main_started_at = None
_concurrency = None  # training processes of this worker, known before the pool forks them


@worker_init.connect
def _note_start(sender=None, **_kwargs) -> None:
    """Before the pool forks: trials claimed from here on belong to this process, not to a dead one."""
    global _main_started_at, _concurrency
    from services.models import utcnow

    _main_started_at = utcnow()
    _concurrency = getattr(sender, "concurrency", None)


@worker_ready.connect
def _start_presence(sender=None, **_kwargs) -> None:
    """Main process only (worker_ready is not sent in pool processes): register and start beating."""
    global _presence
    from worker.presence import Presence

    controller = sender.controller
    queues = sorted(sender.app.amqp.queues.consume_from or {"cpu": None})
    _presence = Presence(get_settings(), name=sender.hostname, queues=queues,
                         concurrency=int(controller.concurrency), started_at=_main_started_at)
    _presence.start()
    # A cold shutdown (SIGQUIT, or SIGTERM with REMAP_SIGTERM=SIGQUIT as in docker-compose.yml) never
    # sends worker_shutdown; atexit runs on both paths, after the broker connection has put the
    # cancelled trials back in the queue. Pool processes leave with os._exit and skip it.
    atexit.register(_stop_presence, main_pid=os.getpid())


@worker_shutdown.connect
def _stop_presence(main_pid: int | None = None, **_kwargs) -> None:
    global _presence
    if _presence is not None and (main_pid is None or main_pid == os.getpid()):
        _presence.stop()
        _presence = None


@worker_process_init.connect
def _init_training_process(**_kwargs) -> None:
    from worker import tasks

    tasks.reset_process_state()
    started = time.perf_counter()
    from worker.training.memory import keep_freed_memory

    keep_freed_memory()  # before torch allocates: no page-fault storm per training step
    import torch

    torch.set_num_threads(torch_threads(get_settings(), _concurrency))
    _warm_up()
    log.info("training process %d ready: torch %s, %d thread(s), warm-up %.1f s", os.getpid(),
             torch.__version__, torch.get_num_threads(), time.perf_counter() - started)


def torch_threads(settings: Settings, concurrency: int | None) -> int:
    """FITSCOPE_TORCH_THREADS when it is set. Otherwise, in a container with a CPU limit (compose's
    WORKER_CPUS), that share split over the training processes, so they neither fight for cores nor
    leave them idle; elsewhere the setting's default (small models train fastest on one thread)."""
    share = cpu_quota()
    if "torch_threads" in settings.model_fields_set or share is None:
        return settings.torch_threads
    return max(1, share // max(1, concurrency or settings.effective_worker_concurrency))


def _warm_up() -> None:
    from services.trial_config import TrialConfig
    from worker.training import train_trial

    train_trial(TrialConfig(n_train=16, n_val=8, n_test=4, width=4, depth=1, epochs=1, batch_size=8))
