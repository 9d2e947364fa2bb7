"""What a trial reports: per-epoch metric rows, final metrics, baselines, artifacts; models and losses."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from services.trial_config import TrialConfig
from services.trials import EPOCH_METRIC_FIELDS, EPOCH_SERIES_FIELDS
from worker.training import EpochMetrics, fused, fused_results, train_trial
from worker.training.data import make_dataset
from worker.training.losses import build_loss, resolve_loss
from worker.training.models import PolynomialFeatures, build_model, parameter_count

SMALL = dict(n_train=64, n_val=32, n_test=32, width=16, depth=2, epochs=3)



def test_epoch_rows_carry_exactly_the_database_columns() -> None:
    assert tuple(f.name for f in dataclasses.fields(EpochMetrics)) == ("epoch", *EPOCH_METRIC_FIELDS,
                                                                     *EPOCH_SERIES_FIELDS)


def test_classification_rows() -> None:
    rows: list[EpochMetrics] = []
    train_trial(TrialConfig(**SMALL), on_epoch=rows.append)
    for m in rows:
        assert 0 <= m.train_accuracy <= 1 and 0 <= m.val_accuracy <= 1
        assert m.train_rmse is m.val_rmse is m.train_mae is m.val_mae is m.train_r2 is m.val_r2 is None
        assert m.grad_norm > 0 and m.weight_norm > 0


def test_regression_rows_and_final_metrics() -> None:
    rows: list[EpochMetrics] = []
    result = train_trial(TrialConfig(**SMALL, dataset="sine"), on_epoch=rows.append)
    splits = make_dataset(TrialConfig(**SMALL, dataset="sine"))
    metrics = result.final_metrics

    for m in rows:
        assert m.train_accuracy is None and m.val_accuracy is None
        assert m.train_rmse == pytest.approx(math.sqrt(m.train_loss), rel=1e-5)  # mse loss: rmse is its root
        assert m.val_rmse == pytest.approx(math.sqrt(m.val_loss), rel=1e-5)
        assert 0 < m.val_mae <= m.val_rmse
        variance = splits.y_val.var(unbiased=False).item()
        assert m.val_r2 == pytest.approx(1 - m.val_loss / variance, rel=1e-4, abs=1e-6)
    assert metrics["final_val_rmse"] == rows[-1].val_rmse
    assert metrics["best_val_rmse"] == rows[result.best_epoch - 1].val_rmse
    assert metrics["test_rmse"] == pytest.approx(math.sqrt(metrics["test_loss"]), rel=1e-5)
    assert metrics["test_mae"] > 0 and metrics["test_r2"] is not None
    # The best constant predictor of MSE is the training mean: its loss is the targets' variance.
    assert metrics["baseline_train_loss"] == pytest.approx(splits.y_train.var(unbiased=False).item(), rel=1e-5)
    json.dumps(metrics, allow_nan=False)


def test_grad_norm_is_the_last_steps_gradient_and_weight_norm_the_final_weights(keep_model) -> None:
    config = TrialConfig(**{**SMALL, "epochs": 1}, optimizer="sgd", lr=0.1, batch_size="full")
    rows: list[EpochMetrics] = []
    _, final_model, _, _ = keep_model(config, rows)

    splits = make_dataset(config)
    model = build_model(config, splits.n_features, splits.n_outputs)
    F.cross_entropy(model(splits.x_train), splits.y_train).backward()
    gradient = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert rows[0].grad_norm == pytest.approx(gradient.norm().item(), rel=1e-5)
    weights = torch.cat([p.detach().flatten() for p in final_model.parameters()])
    assert rows[0].weight_norm == pytest.approx(weights.norm().item(), rel=1e-5)


@pytest.mark.parametrize("dataset", ["moons", "blobs"])
def test_classification_baseline_is_the_class_prior(dataset: str) -> None:
    config = TrialConfig(**{**SMALL, "n_train": 65, "epochs": 1}, dataset=dataset)
    splits = make_dataset(config)
    prior = torch.bincount(splits.y_train).float() / len(splits.y_train)
    expected_val = -prior.log()[splits.y_val].mean().item()

    metrics = train_trial(config).final_metrics
    assert metrics["baseline_val_loss"] == pytest.approx(expected_val, rel=1e-5)
    if dataset == "moons":  # a single logit holding the same prior gives the same loss
        assert train_trial(config.model_copy(update={"loss": "bce"})).final_metrics[
            "baseline_val_loss"] == pytest.approx(expected_val, rel=1e-5)


def test_final_metrics_keep_every_key_and_are_json() -> None:
    result = train_trial(TrialConfig(**SMALL))
    expected = {"final_train_loss", "final_val_loss", "final_train_accuracy", "final_val_accuracy", "best_val_loss",
                "best_val_accuracy", "test_loss", "test_accuracy", "generalization_gap", "parameter_count",
                "train_seconds", "baseline_train_loss", "baseline_val_loss", "stopped_epoch", "final_epoch",
                "final_val_rmse", "best_val_rmse", "test_rmse", "test_mae", "test_r2"}
    assert expected <= set(result.final_metrics)
    json.dumps(result.final_metrics, allow_nan=False)


def test_prediction_artifacts_come_from_the_diagnosis_module(monkeypatch) -> None:
    seen = {}

    def prediction_artifacts_rows(predict, splits, config, *, rows):
        seen["outputs"] = tuple(predict(splits.x_val).shape)  # [rows, n, outputs], eval mode
        return [{"decision_boundary": {"grid": [[0.5]]}}] * rows

    monkeypatch.setattr(fused_results, "prediction_artifacts_rows", prediction_artifacts_rows)
    result = train_trial(TrialConfig(**SMALL))
    pictures = {kind: data for kind, data in result.artifacts.items() if kind != "snapshots"}  # frames: snapshots.py
    assert pictures == {"decision_boundary": {"grid": [[0.5]]}} and seen == {"outputs": (1, 32, 2)}

    def broken(predict, splits, config, *, rows):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(fused_results, "prediction_artifacts_rows", broken)
    result = train_trial(TrialConfig(**SMALL))
    assert result.status == "succeeded" and set(result.artifacts) <= {"snapshots"}


def test_csv_content_goes_to_the_data_set(monkeypatch) -> None:
    seen = {}
    real = fused.make_dataset

    def make_dataset_spy(config, **kwargs):
        seen.update(kwargs)
        return real(config)

    monkeypatch.setattr(fused, "make_dataset", make_dataset_spy)
    train_trial(TrialConfig(**SMALL), csv_content=b"x,y\n1,2\n")
    assert seen == {"csv_content": b"x,y\n1,2\n"}


# --- models -----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_norm_layers_sit_before_the_activation_and_count_their_parameters(norm: str) -> None:
    model = build_model(TrialConfig(width=8, depth=2, norm=norm, dropout=0.5), n_features=2, n_outputs=3)
    kinds = [type(layer).__name__ for layer in model]
    norm_name = "BatchNorm1d" if norm == "batch" else "LayerNorm"
    assert kinds == ["Linear", norm_name, "ReLU", "Dropout"] * 2 + ["Linear"]
    assert parameter_count(model) == 123 + 2 * (2 * 8)  # the plain MLP plus a scale and shift per unit


def test_polynomial_features_expand_to_every_monomial_and_standardise() -> None:
    features = PolynomialFeatures(n_features=2, degree=2)
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0], [-1.0, 0.5]])
    assert features.n_out == 5
    torch.testing.assert_close(features.expand(x), torch.stack(
        [x[:, 0], x[:, 1], x[:, 0] ** 2, x[:, 0] * x[:, 1], x[:, 1] ** 2], dim=1))
    features.fit(x)
    standardised = features(x)
    torch.testing.assert_close(standardised.mean(dim=0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(standardised.std(dim=0, unbiased=False), torch.ones(5), atol=1e-5, rtol=0)

    model = build_model(TrialConfig(dataset="sine", model="linear", poly_degree=4), n_features=1, n_outputs=1)
    assert parameter_count(model) == 4 + 1
    with pytest.raises(ValueError, match="poly_degree 4 applies to regression only"):
        TrialConfig(model="linear", poly_degree=4)  # polynomial features are for regression


# --- losses -----------------------------------------------------------------------------------


def test_regression_losses_by_hand() -> None:
    output, y = torch.tensor([[0.0], [3.0]]), torch.tensor([[0.5], [0.0]])
    config = TrialConfig(dataset="sine", huber_delta=1.0)
    assert build_loss(config, "mse")(output, y).item() == pytest.approx((0.25 + 9) / 2)
    assert build_loss(config, "mae")(output, y).item() == pytest.approx((0.5 + 3) / 2)
    assert build_loss(config, "huber")(output, y).item() == pytest.approx((0.5 * 0.25 + (3 - 0.5)) / 2)


def test_label_smoothing_and_loss_checks() -> None:
    logits, y = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    smoothed = build_loss(TrialConfig(label_smoothing=0.2), "cross_entropy")(logits, y).item()
    log_p = torch.log_softmax(logits, dim=1)[0]
    assert smoothed == pytest.approx(-(0.9 * log_p[0] + 0.1 * log_p[1]).item())

    config = TrialConfig(dataset={"csv": "data.csv", "target": "y"}, loss="bce")
    assert resolve_loss(config, task="classification", n_classes=2) == "bce"
    with pytest.raises(ValueError, match="two classes"):
        resolve_loss(config, task="classification", n_classes=3)
    with pytest.raises(ValueError, match="does not fit"):
        resolve_loss(config, task="regression")
    assert resolve_loss(TrialConfig(dataset={"csv": "d.csv", "target": "y"}), task="regression") == "mse"
