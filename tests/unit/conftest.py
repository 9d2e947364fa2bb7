"""Unit tests train tiny models: several torch threads only add synchronisation (and contention on a
busy 2-core machine), so each unit test runs on one, as a worker's training process does."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
