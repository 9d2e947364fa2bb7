"""Reading a learning-rate range test (Smith 2015; fastai's ``lr_find``): the loss of every step
against the rate it trained at, rising exponentially from min_lr to lr.

The batch losses are noisy, so they are smoothed first: a centred moving average over about a
twentieth of the test (an odd number of steps; fewer at the ends). Centred, so it does not lag: the
exponential average fastai's plot uses shifts every feature right by its window (measured: ~0.25
decade on a 400-step test), which would suggest too large a rate. On the smoothed curve, up to the
point where the loss has blown up (past its lowest so far, above 4x that lowest, where fastai stops
the test, or, once it had fallen by a quarter, back above where it started):

- the minimum: the rate of the lowest smoothed loss. Past it the rate is too large.
- the steepest descent: where the smoothed loss falls fastest per decade of rate, before the
  minimum. Its slope is taken across a tenth of the test, so a sustained fall wins over a short drop
  in the noise; the first tenth of the test, where the average still settles, is skipped.
- the suggestion: the steepest-descent rate (Smith's rule: the rate where the loss improves
  fastest, fastai's "steep"). The other common rule, the minimum's rate / 10, is given beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FELL = 0.25  # a fall by this share of the first loss makes a return above it a blow-up
BLOW_UP = 4.0  # the test counts as over once the smoothed loss passes this many times its minimum
SETTLE = 0.1  # share of the test skipped before looking for the steepest descent
WINDOW_SHARE = 0.05  # the smoothing window, as a share of the test's steps
SLOPE_SHARE = 0.1  # the slope is taken across this share of the test: a sustained fall, not a blip


@dataclass(frozen=True)
class RangeTestReading:
    lr: list[float]  # the steps with a finite loss, in step order
    loss: list[float]  # their batch losses
    smoothed: list[float]  # the smoothed loss of each
    steepest_lr: float | None  # None when the loss never fell
    steepest_loss: float | None
    minimum_lr: float
    minimum_loss: float

    @property
    def suggested_lr(self) -> float:
        """The steepest-descent rate; the minimum's rate / 10 where the loss never fell."""
        return self.steepest_lr if self.steepest_lr is not None else self.minimum_lr / 10


def read_range_test(lr: Sequence[float], loss: Sequence[float | None]) -> RangeTestReading | None:
    """The reading of one test (rates and batch losses, step by step; a None loss was not a number);
    None with fewer than 3 finite points."""
    points = [(float(r), float(v)) for r, v in zip(lr, loss, strict=True)
              if v is not None and math.isfinite(v) and r > 0]
    if len(points) < 3:
        return None
    rates = np.array([r for r, _ in points])
    values = np.array([v for _, v in points])
    smoothed = smooth(values)
    end = _end(smoothed)
    lowest = int(np.argmin(smoothed[:end]))
    start = int(SETTLE * len(smoothed))
    steepest = None
    if lowest - start >= 2:
        slope = _slope(smoothed, np.log10(rates))[start:lowest + 1]
        if slope.min() < 0:
            steepest = start + int(np.argmin(slope))
    return RangeTestReading(
        lr=rates.tolist(), loss=values.tolist(), smoothed=smoothed.tolist(),
        steepest_lr=None if steepest is None else float(rates[steepest]),
        steepest_loss=None if steepest is None else float(smoothed[steepest]),
        minimum_lr=float(rates[lowest]), minimum_loss=float(smoothed[lowest]))


def mean_curve(losses: Sequence[Sequence[float | None]]) -> list[float | None]:
    """The step-by-step mean of several tests' losses over the same rates (seeds of one
    configuration); a step where any of them is not a number is None (that run had blown up)."""
    return [None if any(v is None or not math.isfinite(v) for v in step) else sum(step) / len(step)
            for step in zip(*losses, strict=True)]


def _end(smoothed: np.ndarray) -> int:
    # The first step past the lowest loss so far where the loss is above BLOW_UP times that lowest, or,
    # once it had fallen by a quarter, back above where it started: the test is over there.
    lowest = np.minimum.accumulate(smoothed)
    over = np.nonzero((smoothed > BLOW_UP * lowest)
                      | ((smoothed > smoothed[0]) & (lowest < (1 - FELL) * smoothed[0])))[0]
    return int(over[0]) if len(over) else len(smoothed)


def smooth(values: np.ndarray) -> np.ndarray:
    """Centred moving average of ``values`` over an odd window of about WINDOW_SHARE of them (at
    least 1); near the ends, over the values there are."""
    half = int(WINDOW_SHARE * len(values)) // 2
    sums = np.concatenate([[0.0], np.cumsum(values)])
    index = np.arange(len(values))
    low, high = np.maximum(index - half, 0), np.minimum(index + half + 1, len(values))
    return (sums[high] - sums[low]) / (high - low)


def _slope(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    # d values / d x at each point, across SLOPE_SHARE of the points centred on it (narrower at the ends)
    half = max(1, int(SLOPE_SHARE * len(values)) // 2)
    index = np.arange(len(values))
    low, high = np.maximum(index - half, 0), np.minimum(index + half, len(values) - 1)
    return (values[high] - values[low]) / (x[high] - x[low])
