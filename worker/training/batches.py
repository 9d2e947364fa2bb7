"""An epoch's mini-batches: which rows of the training set each optimizer step sees.

Each trial's order is drawn once per epoch from its own generator (``torch.randperm``), so the
data order depends on the trial's seed alone, never on the trials it trains beside. A batch that
covers the whole set is the set itself, in order, and draws nothing (full-batch gradient descent).
"""

from __future__ import annotations

import math


def batch_bounds(n: int, *, batch_size: int, merge_single: bool = False) -> list[tuple[int, int]]:
    """The ``[start, end)`` rows of each step of an epoch over ``n`` rows; the last batch may be
    smaller. ``merge_single`` folds a last batch of one example into the batch before it (batch
    norm cannot normalise a single example)."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if merge_single and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def steps_per_epoch(n: int, *, batch_size: int, merge_single: bool = False) -> int:
    """Optimizer steps in one epoch of :func:`batch_bounds`."""
    steps = math.ceil(n / batch_size)
    return steps - 1 if merge_single and steps > 1 and n % batch_size == 1 else steps
