"""The worker's Celery app. Created by :func:`create_app`, never at import.

torch is imported only in the pool's child processes (``worker_process_init``), after the fork,
so no torch thread pool or CUDA context is ever inherited across a fork.
"""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init

from services.config import Settings, get_settings
from services.queue import make_celery


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = make_celery(settings, name="fitscope-worker")
    from worker import tasks

    tasks.register(app)
    return app


@worker_process_init.connect
def _init_training_process(**_kwargs) -> None:
    from worker import tasks

    tasks.reset_process_state()
    import torch

    torch.set_num_threads(get_settings().torch_threads)
