"""Verdicts on real training runs whose answer is clear, through the real engine on the CPU."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from services.analysis import Diagnosis, diagnose
from services.trial_config import TrialConfig
from worker.training import train_trial


def trained_verdict(**parameters) -> Diagnosis:
    rows: list[dict] = []
    result = train_trial(TrialConfig(**parameters), on_epoch=lambda metrics: rows.append(asdict(metrics)))
    return diagnose(rows, result.final_metrics, status=result.status)


def test_a_linear_model_on_moons_underfits() -> None:
    result = trained_verdict(dataset="moons", noise=0.2, n_train=200, n_val=200, n_test=0, model="linear",
                             optimizer="adam", lr=0.05, batch_size="full", epochs=80)

    assert result.verdict == "underfit", result.reasons
    assert result.numbers["baseline_source"] == "constant_predictor"  # the engine reported ln 2
    assert result.numbers["train_ratio"] > 0.35  # a straight line cannot separate the moons


def test_a_wide_deep_mlp_on_60_noisy_points_overfits() -> None:
    # Width 128 (not 256) keeps the test short on a small CPU; the memorisation is the same.
    result = trained_verdict(dataset="moons", noise=0.35, n_train=60, n_val=200, n_test=0, width=128, depth=3,
                             optimizer="adam", lr=0.01, batch_size="full", epochs=200)

    assert result.verdict == "overfit", result.reasons
    assert result.numbers["train_ratio"] < 0.01  # the 60 points are memorised ...
    assert result.numbers["gap_ratio"] > 1.0  # ... and validation pays for it
    assert result.numbers["val_rise_ratio"] > 1.0


def test_a_moderate_mlp_with_enough_data_fits_well() -> None:
    result = trained_verdict(dataset="moons", noise=0.2, n_train=1000, n_val=300, n_test=0, width=16, depth=2,
                             optimizer="adam", lr=0.02, batch_size="full", epochs=200)

    assert result.verdict == "good_fit", result.reasons
    assert result.numbers["gap_ratio"] < 0.1


def test_sgd_with_learning_rate_10_on_the_sine_diverges() -> None:
    result = trained_verdict(dataset="sine", optimizer="sgd", lr=10, epochs=20, n_val=100, n_test=0)

    assert result.verdict == "diverged", result.reasons
    assert "finite" in result.reasons[0]


@pytest.mark.parametrize(("dataset", "kind"), [("moons", "boundary_2d"), ("sine", "curve_1d")])
def test_the_engine_returns_the_prediction_artifact(dataset: str, kind: str) -> None:
    result = train_trial(TrialConfig(dataset=dataset, n_train=50, n_val=20, n_test=0, width=8, epochs=2))
    assert set(result.artifacts) == {kind, "snapshots"}  # the picture, and its frames epoch by epoch


def test_a_well_fitted_sine_is_a_good_fit_and_its_curve_follows_the_truth() -> None:
    rows: list[dict] = []
    result = train_trial(TrialConfig(dataset="sine", noise=0.1, n_train=200, n_val=200, n_test=0, width=32,
                                     depth=2, optimizer="adam", lr=0.01, batch_size="full", epochs=150),
                         on_epoch=lambda metrics: rows.append(asdict(metrics)))
    curve = result.artifacts["curve_1d"]
    inside = [(p, t) for x, p, t in zip(curve["x"], curve["y_pred"], curve["y_true"], strict=True) if -1 <= x <= 1]

    assert diagnose(rows, result.final_metrics, status=result.status).verdict == "good_fit"
    assert max(abs(p - t) for p, t in inside) < 0.3  # the learned curve lies on sin(2 pi x)
    assert sum((p - t) ** 2 for p, t in inside) / len(inside) < 0.01
