"""Reading a range test: smoothing as fastai does, the minimum, the steepest descent, the suggestion."""

from __future__ import annotations

import numpy as np
import pytest

from services.range_test import read_range_test, smooth


def _test_curve(n: int = 400, noise: float = 0.0):
    """A textbook range test: flat, a fall steepest at 1e-2, a minimum near 1e-1, then a blow-up."""
    lr = np.geomspace(1e-5, 10, n)
    x = np.log10(lr)
    loss = 1.0 - 0.8 / (1 + np.exp(-(x + 2) * 3)) + np.where(x > -1, (x + 1) ** 2 * 3, 0.0)
    loss += np.random.default_rng(0).normal(0, noise, n)
    return lr.tolist(), loss.tolist()


def test_the_smoothing_is_a_centred_moving_average_matching_pandas():
    import pandas as pd

    values = np.random.default_rng(1).random(200)
    expected = pd.Series(values).rolling(11, center=True, min_periods=1).mean().to_numpy()  # 5% of 200, odd
    assert smooth(values) == pytest.approx(expected, rel=1e-12)


def test_a_noiseless_curve_gives_its_steepest_point_and_minimum():
    lr, loss = _test_curve()
    reading = read_range_test(lr, loss)
    assert abs(np.log10(reading.steepest_lr) - -2) < 0.05
    assert -1.5 < np.log10(reading.minimum_lr) < -0.5
    assert reading.suggested_lr == reading.steepest_lr


def test_noise_and_a_blow_up_to_nan_do_not_move_the_reading_far():
    lr, loss = _test_curve(noise=0.02)  # a fortieth of the fall, per step
    loss[-20:] = [None] * 20  # the loss stopped being a number
    reading = read_range_test(lr, loss)
    assert abs(np.log10(reading.steepest_lr) - -2) < 0.3
    assert len(reading.lr) == len(lr) - 20


def test_a_loss_that_only_rises_suggests_a_tenth_of_the_minimums_rate():
    lr = np.geomspace(1e-3, 1, 50).tolist()
    reading = read_range_test(lr, [1 + r for r in lr])
    assert reading.steepest_lr is None and reading.suggested_lr == pytest.approx(reading.minimum_lr / 10)
    assert read_range_test([1e-3, 1e-2], [1.0, None]) is None


def test_a_loss_that_blows_up_and_falls_back_ends_the_test_where_it_blew_up():
    lr, loss = _test_curve(n=400)
    x = np.log10(lr)
    loss = [v if xi < 0 else v + (0.0 if xi > 0.5 else 5.0) - (1.0 if xi > 0.5 else 0.0)
            for v, xi in zip(loss, x, strict=True)]  # a blow-up at 1, then a lower loss than ever
    reading = read_range_test(lr, loss)
    assert -1.5 < np.log10(reading.minimum_lr) < -0.5  # the minimum before the blow-up


def test_the_mean_of_seeds_is_taken_step_by_step_and_none_where_one_blew_up():
    from services.range_test import mean_curve

    assert mean_curve([[1.0, 2.0, None], [3.0, 4.0, 5.0]]) == [2.0, 3.0, None]
