"""Regularizers and training noise: early stopping, l1, dropout, input noise, grad_clip; determinism."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from services.trial_config import EarlyStopping, TrialConfig
from worker.training import EpochMetrics, train_trial
from worker.training.batches import batch_bounds, steps_per_epoch
from worker.training.data import make_dataset
from worker.training.fused_results import measure_rows, per_trial_loss
from worker.training.models import build_model

SMALL = dict(n_train=64, n_val=32, n_test=32, width=16, depth=2, epochs=3)



def _without_timings(rows: list[EpochMetrics]) -> list[EpochMetrics]:
    return [dataclasses.replace(m, epoch_seconds=0.0) for m in rows]


def _expected_stop(val_losses: list[float], *, patience: int, min_delta: float) -> int | None:
    best, waited = float("inf"), 0
    for epoch, loss in enumerate(val_losses, start=1):
        if loss < best - min_delta:
            best, waited = loss, 0
        else:
            waited += 1
            if waited >= patience:
                return epoch
    return None


def test_early_stopping_stops_at_the_right_epoch_and_restores_the_best_weights(keep_model) -> None:
    # Few noisy points and a wide MLP: validation loss falls, then rises as the noise is memorised.
    overfit = dict(dataset="sine", n_train=16, n_val=64, n_test=64, noise=0.5, width=128, depth=2,
                   optimizer="adam", lr=0.01, batch_size="full", epochs=150)
    full_run: list[EpochMetrics] = []
    train_trial(TrialConfig(**overfit), on_epoch=full_run.append)
    expected = _expected_stop([m.val_loss for m in full_run], patience=5, min_delta=0.001)
    assert expected is not None and expected < 150, "the crafted case must overfit"

    rows: list[EpochMetrics] = []
    config = TrialConfig(**overfit, early_stopping=EarlyStopping(patience=5, min_delta=0.001))
    result, _, splits, stacked = keep_model(config, rows)

    assert result.status == "succeeded"
    assert result.final_metrics["stopped_epoch"] == expected == result.epochs_run
    assert result.final_metrics["final_epoch"] == expected
    assert _without_timings(rows) == _without_timings(full_run[:expected])  # same run up to the stop
    best = min(rows, key=lambda m: m.val_loss)
    assert result.best_epoch == best.epoch < expected
    # The restored model is the best epoch's: measured as every epoch is (training and validation
    # sets in one pass), its validation loss is that epoch's, bit for bit.
    outputs = stacked.evaluate(torch.cat([splits.x_train, splits.x_val]))[:, :, splits.x_train.shape[0]:]
    restored = measure_rows(outputs, splits.y_val.reshape(-1), per_trial_loss(config, "mse"), loss="mse")[0]["loss"]
    assert restored == best.val_loss
    assert result.final_metrics["final_val_loss"] == best.val_loss
    assert result.final_metrics["final_train_loss"] == best.train_loss


def test_without_early_stopping_there_is_no_stopped_epoch() -> None:
    result = train_trial(TrialConfig(**SMALL))
    assert result.final_metrics["stopped_epoch"] is None and result.final_metrics["final_epoch"] == 3


def test_l1_drives_more_weights_to_zero(keep_model) -> None:
    def small_weights(l1: float) -> tuple[int, float]:
        config = TrialConfig(dataset="moons", n_train=200, n_val=50, n_test=0, width=32, depth=2, optimizer="sgd",
                             lr=0.1, batch_size=32, epochs=30, l1=l1)
        rows: list[EpochMetrics] = []
        _, model, _, _ = keep_model(config, rows)
        weights = torch.cat([m.weight.detach().flatten() for m in model.modules()
                             if isinstance(m, torch.nn.Linear)])
        return int((weights.abs() < 0.01).sum()), rows[-1].weight_norm

    sparse_count, sparse_norm = small_weights(0.003)
    dense_count, dense_norm = small_weights(0.0)
    assert sparse_count > 3 * max(dense_count, 1)
    assert sparse_norm < dense_norm


def test_l1_is_not_part_of_the_reported_loss() -> None:
    config = TrialConfig(**{**SMALL, "epochs": 1}, l1=1e-3, batch_size="full", optimizer="sgd", lr=1e-9)
    rows: list[EpochMetrics] = []
    train_trial(config, on_epoch=rows.append)
    splits = make_dataset(config)
    model = build_model(config, splits.n_features, splits.n_outputs)  # lr ~0: the weights barely moved
    with torch.no_grad():
        data_loss = torch.nn.functional.cross_entropy(model(splits.x_train), splits.y_train).item()
    assert rows[0].train_loss == pytest.approx(data_loss, rel=1e-6)


@pytest.mark.parametrize("noise", [dict(dropout=0.5), dict(input_noise=0.3)])
def test_training_noise_is_reproducible_per_seed_and_never_reads_the_global_rng(noise: dict) -> None:
    config = TrialConfig(**SMALL, batch_size=16, **noise)

    def rows_after_global_seed(global_seed: int, trial: TrialConfig) -> list[EpochMetrics]:
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        rows: list[EpochMetrics] = []
        train_trial(trial, on_epoch=rows.append)
        assert torch.equal(torch.get_rng_state(), state), "training read the global RNG"
        return _without_timings(rows)

    first = rows_after_global_seed(0, config)
    assert rows_after_global_seed(123, config) == first
    assert rows_after_global_seed(0, config.model_copy(update={"seed": 1})) != first
    quiet = rows_after_global_seed(0, TrialConfig(**SMALL, batch_size=16))
    assert quiet != first  # the noise is really applied


def test_a_full_config_is_bitwise_deterministic() -> None:
    config = TrialConfig(dataset="spirals", n_train=96, n_val=48, n_test=48, width=32, depth=3, norm="batch",
                         dropout=0.2, input_noise=0.05, l1=1e-4, grad_clip=1.0, optimizer="adamw",
                         weight_decay=0.01, betas=(0.8, 0.99), schedule="one_cycle", batch_size=16, epochs=4,
                         label_smoothing=0.1, seed=5)
    runs = []
    for _ in range(2):
        rows: list[EpochMetrics] = []
        result = train_trial(config, on_epoch=rows.append)
        runs.append((_without_timings(rows), {k: v for k, v in result.final_metrics.items()
                                               if k != "train_seconds"}))
    assert runs[0] == runs[1]
    assert result.status == "succeeded" and len(runs[0][0]) == 4


def test_grad_clip_bounds_the_update(keep_model) -> None:
    # One full-batch SGD step: the update is lr times the gradient, whose norm clipping caps.
    lr, clip = 0.5, 0.01
    config = TrialConfig(**{**SMALL, "epochs": 1}, optimizer="sgd", lr=lr, batch_size="full", grad_clip=clip)
    splits = make_dataset(config)
    initial = torch.cat([p.detach().flatten() for p in build_model(config, 2, 2).parameters()])
    rows: list[EpochMetrics] = []
    _, model, _, _ = keep_model(config, rows)
    moved = (torch.cat([p.detach().flatten() for p in model.parameters()]) - initial).norm().item()

    assert rows[0].grad_norm > 10 * clip  # the reported norm is the one before clipping
    assert moved == pytest.approx(lr * clip, rel=1e-4)
    assert splits.n_outputs == 2


def test_bce_and_cross_entropy_reach_similar_accuracy_on_moons() -> None:
    base = dict(dataset="moons", n_train=300, n_val=300, n_test=0, noise=0.2, width=32, depth=2, optimizer="adam",
                lr=0.01, batch_size=32, epochs=15)
    bce = train_trial(TrialConfig(**base, loss="bce")).final_metrics
    ce = train_trial(TrialConfig(**base, loss="cross_entropy")).final_metrics

    assert bce["final_val_accuracy"] > 0.9 and ce["final_val_accuracy"] > 0.9
    assert abs(bce["final_val_accuracy"] - ce["final_val_accuracy"]) < 0.04
    assert bce["parameter_count"] == ce["parameter_count"] - 33  # one output unit instead of two


def test_batch_norm_never_sees_a_batch_of_one() -> None:
    # 65 = 2 * 32 + 1: the single leftover example joins the second batch; one_cycle counts 2 steps.
    config = TrialConfig(**{**SMALL, "n_train": 65}, norm="batch", batch_size=32, schedule="one_cycle")
    result = train_trial(config)
    assert result.status == "succeeded" and result.epochs_run == 3

    sizes = [end - start for start, end in batch_bounds(65, batch_size=32, merge_single=True)]
    assert sizes == [32, 33] and steps_per_epoch(65, batch_size=32, merge_single=True) == 2
    assert steps_per_epoch(65, batch_size=32) == 3 and batch_bounds(65, batch_size=32)[-1] == (64, 65)


def test_l1_shrinks_the_weights_and_makes_them_sparse_in_both_execution_paths():
    from worker.training.fused import train_fused

    configs = [TrialConfig(dataset="moons", width=32, l1=l1, epochs=40, seed=0, optimizer="sgd", lr=0.1)
               for l1 in (0.0, 0.003, 0.03)]
    solo = [train_trial(config).final_metrics for config in configs]
    fused = [result.final_metrics for result in train_fused(configs)]
    none, some, more = solo
    assert none["zero_weight_fraction"] < 0.05 < 0.2 < some["zero_weight_fraction"]
    assert none["weight_l1"] > some["weight_l1"] > more["weight_l1"]
    assert none["weight_min"] < none["weight_mean"] < none["weight_max"]
    for one, stacked in zip(solo, fused, strict=True):
        for key in ("weight_l1", "weight_mean", "weight_min", "weight_max", "zero_weight_fraction"):
            assert stacked[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
