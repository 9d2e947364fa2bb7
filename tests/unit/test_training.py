"""The training engine: data, models, optimizers and the one-trial loop, on the CPU."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from services.trial_config import TrialConfig
from worker.training import DeviceUnavailable, EpochMetrics, train_trial
from worker.training.data import make_dataset, standardisation_stats
from worker.training.models import build_model, parameter_count
from worker.training.results import resolve_device

SMALL = dict(n_train=64, n_val=32, n_test=32, width=16, depth=2, epochs=3)


def small_config(**overrides) -> TrialConfig:
    return TrialConfig(**{**SMALL, **overrides})


# --- data -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "n_features", "n_outputs"),
    [("moons", 2, 2), ("circles", 2, 2), ("blobs", 2, 4), ("spirals", 2, 4), ("sine", 1, 1)],
)
def test_dataset_shapes_sizes_and_types(dataset: str, n_features: int, n_outputs: int) -> None:
    splits = make_dataset(TrialConfig(dataset=dataset, n_classes=4, n_train=50, n_val=30, n_test=20))

    assert (splits.n_features, splits.n_outputs) == (n_features, n_outputs)
    for x, y, n in [(splits.x_train, splits.y_train, 50), (splits.x_val, splits.y_val, 30),
                    (splits.x_test, splits.y_test, 20)]:
        assert x.shape == (n, n_features) and x.dtype == torch.float32
        if dataset == "sine":
            assert splits.task == "regression"
            assert y.shape == (n, 1) and y.dtype == torch.float32
        else:
            assert splits.task == "classification"
            assert y.shape == (n,) and y.dtype == torch.int64
            assert set(y.tolist()) == set(range(n_outputs))  # balanced labels: every class is there


def test_an_empty_test_split_is_allowed() -> None:
    splits = make_dataset(TrialConfig(n_test=0))
    assert splits.x_test.shape == (0, 2) and splits.y_test.shape == (0,)


def test_data_depend_on_the_data_seed_not_the_trial_seed() -> None:
    base = make_dataset(TrialConfig(seed=0, data_seed=7))
    other_trial_seed = make_dataset(TrialConfig(seed=123, data_seed=7))
    other_data_seed = make_dataset(TrialConfig(seed=0, data_seed=8))

    assert torch.equal(base.x_train, other_trial_seed.x_train)
    assert torch.equal(base.y_train, other_trial_seed.y_train)
    assert torch.equal(base.x_val, other_trial_seed.x_val)
    assert not torch.equal(base.x_train, other_data_seed.x_train)


def test_a_split_does_not_depend_on_the_other_splits_sizes() -> None:
    small = make_dataset(TrialConfig(n_train=100, n_val=50))
    large = make_dataset(TrialConfig(n_train=400, n_val=80))

    def raw(x: torch.Tensor, splits) -> torch.Tensor:
        return x * splits.feature_std + splits.feature_mean

    # The validation points are the same points whatever n_train is, and a larger split starts
    # with the points of a smaller one.
    np.testing.assert_allclose(raw(large.x_val[:50], large), raw(small.x_val, small), atol=1e-5)
    np.testing.assert_allclose(raw(large.x_train[:100], large), raw(small.x_train, small), atol=1e-5)


def test_standardisation_is_fitted_on_the_training_split_only() -> None:
    splits = make_dataset(TrialConfig(n_train=200, n_val=200, noise=0.5))

    np.testing.assert_allclose(splits.x_train.mean(dim=0), [0.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(splits.x_train.std(dim=0, unbiased=False), [1.0, 1.0], atol=1e-5)
    # Validation went through the training statistics, so its own are not exactly 0 and 1.
    assert splits.x_val.mean(dim=0).abs().max() > 1e-3


def test_standardisation_stats_by_hand() -> None:
    mean, std = standardisation_stats(np.array([[0.0, 5.0], [2.0, 5.0]]))
    np.testing.assert_array_equal(mean, [1.0, 5.0])
    np.testing.assert_array_equal(std, [1.0, 1.0])  # population std; a constant feature gets 1


# --- models -----------------------------------------------------------------------------------


def test_parameter_count_matches_a_hand_computation() -> None:
    mlp = build_model(TrialConfig(width=8, depth=2), n_features=2, n_outputs=3)
    # (2*8 + 8) + (8*8 + 8) + (8*3 + 3)
    assert parameter_count(mlp) == 24 + 72 + 27 == 123

    linear = build_model(TrialConfig(model="linear", width=8, depth=2), n_features=2, n_outputs=3)
    assert isinstance(linear, torch.nn.Linear) and parameter_count(linear) == 2 * 3 + 3
    depth_zero = build_model(TrialConfig(depth=0), n_features=1, n_outputs=1)
    assert isinstance(depth_zero, torch.nn.Linear) and parameter_count(depth_zero) == 2


def test_initial_weights_come_from_the_trial_seed() -> None:
    def weights(seed: int) -> torch.Tensor:
        model = build_model(TrialConfig(seed=seed), n_features=2, n_outputs=2)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(weights(3), weights(3))
    assert not torch.equal(weights(3), weights(4))


# --- optimizers: the engine's first steps equal a hand-written torch.optim loop ------------------

LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.8, 0.1
REFERENCE_OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=LR, weight_decay=WEIGHT_DECAY),
    "momentum": lambda p: torch.optim.SGD(p, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
    "nesterov": lambda p: torch.optim.SGD(
        p, lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY
    ),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=LR, weight_decay=WEIGHT_DECAY),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=LR, weight_decay=WEIGHT_DECAY),
    "adam": lambda p: torch.optim.Adam(p, lr=LR, weight_decay=WEIGHT_DECAY),
    "adamw": lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=WEIGHT_DECAY),
}


def _optimizer_config(optimizer: str) -> TrialConfig:
    return small_config(optimizer=optimizer, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                        batch_size="full", epochs=3, seed=11)


def _reference_losses(optimizer: str) -> list[float]:
    """Three full-batch steps written out by hand; the training loss after each."""
    config = _optimizer_config(optimizer)
    splits = make_dataset(config)
    model = build_model(config, splits.n_features, splits.n_outputs)
    opt = REFERENCE_OPTIMIZERS[optimizer](model.parameters())
    losses = []
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(splits.x_train), splits.y_train).backward()
        opt.step()
        with torch.no_grad():
            losses.append(F.cross_entropy(model(splits.x_train), splits.y_train).item())
    return losses


@pytest.fixture(scope="module")
def reference_losses() -> dict[str, list[float]]:
    return {name: _reference_losses(name) for name in REFERENCE_OPTIMIZERS}


def test_the_reference_optimizers_are_told_apart_within_three_steps(reference_losses) -> None:
    # Otherwise the comparison below could not notice the engine building the wrong optimizer.
    for a, b in itertools.combinations(reference_losses, 2):
        assert max(abs(x - y) for x, y in zip(reference_losses[a], reference_losses[b], strict=True)) > 1e-4, (
            a, b)


@pytest.mark.parametrize("optimizer", sorted(REFERENCE_OPTIMIZERS))
def test_first_three_steps_match_torch_optim(optimizer: str, reference_losses) -> None:
    rows: list[EpochMetrics] = []
    result = train_trial(_optimizer_config(optimizer), on_epoch=rows.append)

    assert result.status == "succeeded"
    assert [m.lr for m in rows] == [LR] * 3
    np.testing.assert_allclose([m.train_loss for m in rows], reference_losses[optimizer], rtol=0, atol=1e-6)


# --- the loop ---------------------------------------------------------------------------------


def _without_timings(rows: list[EpochMetrics]) -> list[EpochMetrics]:
    return [dataclasses.replace(m, epoch_seconds=0.0) for m in rows]


def test_same_config_same_metrics_bitwise() -> None:
    config = small_config(batch_size=16, optimizer="momentum")
    first: list[EpochMetrics] = []
    second: list[EpochMetrics] = []
    result_a = train_trial(config, on_epoch=first.append)
    result_b = train_trial(config, on_epoch=second.append)

    assert [m.epoch for m in first] == [1, 2, 3]
    assert _without_timings(first) == _without_timings(second)
    metrics_a = {k: v for k, v in result_a.final_metrics.items() if k != "train_seconds"}
    metrics_b = {k: v for k, v in result_b.final_metrics.items() if k != "train_seconds"}
    assert metrics_a == metrics_b

    other_seed: list[EpochMetrics] = []
    train_trial(config.model_copy(update={"seed": 1}), on_epoch=other_seed.append)
    assert _without_timings(other_seed) != _without_timings(first)


def test_result_of_a_classification_trial() -> None:
    rows: list[EpochMetrics] = []
    result = train_trial(small_config(), on_epoch=rows.append)
    metrics = result.final_metrics

    assert result.status == "succeeded" and result.message is None
    assert result.epochs_run == 3 and len(rows) == 3
    assert result.best_epoch == min(rows, key=lambda m: m.val_loss).epoch
    assert metrics["best_val_loss"] == rows[result.best_epoch - 1].val_loss
    assert metrics["final_train_loss"] == rows[-1].train_loss
    assert metrics["generalization_gap"] == pytest.approx(rows[-1].val_loss - rows[-1].train_loss)
    assert metrics["parameter_count"] == (2 * 16 + 16) + (16 * 16 + 16) + (16 * 2 + 2)
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["test_loss"] > 0
    json.dumps(metrics, allow_nan=False)


def test_result_of_a_regression_trial() -> None:
    rows: list[EpochMetrics] = []
    result = train_trial(small_config(dataset="sine"), on_epoch=rows.append)

    assert result.status == "succeeded"
    assert all(m.train_accuracy is None and m.val_accuracy is None for m in rows)
    assert result.final_metrics["final_val_accuracy"] is None
    assert result.final_metrics["test_accuracy"] is None and result.final_metrics["test_loss"] > 0


def test_divergence_ends_the_trial_without_raising() -> None:
    config = small_config(dataset="sine", noise=10.0, optimizer="sgd", lr=10.0, epochs=10, batch_size=8)
    result = train_trial(config)

    assert result.status == "diverged"
    assert result.message is not None and "at epoch" in result.message
    assert result.epochs_run < 10
    assert result.final_metrics["final_train_loss"] is None
    json.dumps(result.final_metrics, allow_nan=False)


def test_on_epoch_returning_true_cancels_at_the_epoch_boundary() -> None:
    seen: list[int] = []

    def cancel_after_two(metrics: EpochMetrics) -> bool:
        seen.append(metrics.epoch)
        return metrics.epoch == 2

    result = train_trial(small_config(epochs=5), on_epoch=cancel_after_two)

    assert result.status == "cancelled"
    assert result.epochs_run == 2 and seen == [1, 2]
    assert result.final_metrics["final_val_loss"] is not None


def test_a_wide_mlp_learns_moons() -> None:
    config = TrialConfig(dataset="moons", n_train=500, n_val=500, noise=0.2, width=128, depth=2,
                         optimizer="adam", lr=0.01, batch_size=32, epochs=5)
    result = train_trial(config)

    assert result.status == "succeeded"
    assert result.final_metrics["final_val_accuracy"] > 0.9


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(DeviceUnavailable, match="cuda"):
        train_trial(small_config(), device="cuda")
    with pytest.raises(DeviceUnavailable):
        train_trial(small_config(device="cuda"))
    assert resolve_device("auto") == torch.device("cpu")
