"""Prediction artifacts: the right kind per task, raw coordinates, a few kilobytes of JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from services.trial_config import TrialConfig
from worker.training.artifacts import CURVE_POINTS, GRID, MAX_POINTS, prediction_artifacts
from worker.training.data import make_dataset
from worker.training.models import build_model

MAX_BYTES = 60_000


def artifacts_of(config: TrialConfig, model: nn.Module | None = None) -> dict[str, dict]:
    splits = make_dataset(config)
    if model is None:
        model = build_model(config, splits.n_features, splits.n_outputs)
    return prediction_artifacts(model, splits, config, "cpu")


class RawCoordinateProbe(nn.Module):
    """Undoes the standardisation with the training statistics: its output is the raw first input."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, n_outputs: int) -> None:
        super().__init__()
        self.mean, self.std, self.n_outputs = mean, std, n_outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = x * self.std + self.mean
        if self.n_outputs == 1:
            return raw[:, :1]
        # class 1 wins exactly where raw x > 0.5, with a sharp margin
        return torch.stack([torch.zeros_like(raw[:, 0]), 20 * (raw[:, 0] - 0.5)], dim=1)


def test_a_1d_regression_gets_its_curve_over_the_raw_input_range() -> None:
    config = TrialConfig(dataset="sine", n_train=1000, n_val=10, n_test=0)
    curve = artifacts_of(config)["curve_1d"]

    assert len(curve["x"]) == len(curve["y_pred"]) == CURVE_POINTS
    assert -1.2 < curve["x"][0] < -1.0 and 1.0 < curve["x"][-1] < 1.2  # sine inputs span [-1, 1], padded
    assert len(curve["train_x"]) == len(curve["train_y"]) == MAX_POINTS
    assert all(-1.0 <= x <= 1.0 for x in curve["train_x"])  # raw, not standardised
    expected_truth = [math.sin(2 * math.pi * x) for x in curve["x"]]  # the sine set's noiseless target
    assert curve["y_true"] == pytest.approx(expected_truth, abs=5e-3)  # x is rounded to 3 decimals
    assert len(json.dumps(curve)) < MAX_BYTES


def test_grid_inputs_are_standardised_like_the_training_inputs() -> None:
    config = TrialConfig(dataset="sine", n_train=100, n_val=10, n_test=0)
    splits = make_dataset(config)
    probe = RawCoordinateProbe(splits.feature_mean, splits.feature_std, 1)
    curve = prediction_artifacts(probe, splits, config, "cpu")["curve_1d"]
    assert curve["y_pred"] == pytest.approx(curve["x"], abs=2e-3)


def test_a_2d_classification_gets_a_boundary_grid_in_raw_coordinates() -> None:
    config = TrialConfig(dataset="moons", n_train=1000, n_val=10, n_test=0)
    splits = make_dataset(config)
    probe = RawCoordinateProbe(splits.feature_mean, splits.feature_std, 2)
    boundary = prediction_artifacts(probe, splits, config, "cpu")["boundary_2d"]

    assert boundary["resolution"] == GRID and boundary["classes"] == [0, 1]
    assert len(boundary["predicted_class"]) == GRID and all(len(row) == GRID for row in boundary["predicted_class"])
    assert len(boundary["probability"]) == GRID and all(0.5 <= p <= 1 for row in boundary["probability"] for p in row)
    x_low, x_high = boundary["x_range"]
    raw_x = (splits.x_train * splits.feature_std + splits.feature_mean)[:, 0]
    span = (raw_x.max() - raw_x.min()).item()
    assert raw_x.min().item() - 0.1 * span < x_low < raw_x.min().item() < raw_x.max().item() < x_high
    assert x_high < raw_x.max().item() + 0.1 * span  # the raw range, padded a little
    xs = [x_low + (x_high - x_low) * j / (GRID - 1) for j in range(GRID)]
    for row in boundary["predicted_class"]:  # the probe's boundary is the raw line x = 0.5
        assert row == [int(x > 0.5) for x in xs]
    assert len(boundary["train_x"]) == len(boundary["train_label"]) == MAX_POINTS
    assert len(json.dumps(boundary)) < MAX_BYTES


@pytest.mark.parametrize("dataset", ["moons", "circles", "spirals", "blobs"])
def test_every_2d_artifact_of_a_real_model_stays_small(dataset: str) -> None:
    config = TrialConfig(dataset=dataset, n_classes=5, n_train=2000, n_val=10, n_test=0, width=32)
    artifacts = artifacts_of(config)
    assert set(artifacts) == {"boundary_2d"}
    assert len(json.dumps(artifacts["boundary_2d"])) < MAX_BYTES


def test_a_data_set_without_a_truth_stores_null() -> None:
    config = TrialConfig(dataset="linear", n_features=1, n_train=50, n_val=10, n_test=0)
    curve = artifacts_of(config)["curve_1d"]
    assert curve["y_true"] is None or len(curve["y_true"]) == CURVE_POINTS


def test_other_shapes_get_no_artifact() -> None:
    config = TrialConfig(dataset="moons", n_train=20, n_val=10, n_test=0)
    splits = make_dataset(config)
    four_features = type(splits)(**{**splits.__dict__, "n_features": 4})
    assert prediction_artifacts(nn.Identity(), four_features, config, "cpu") == {}


def test_a_non_finite_prediction_is_stored_as_null() -> None:
    config = TrialConfig(dataset="sine", n_train=20, n_val=10, n_test=0)
    splits = make_dataset(config)

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((x.shape[0], 1), math.nan)

    curve = prediction_artifacts(Broken(), splits, config, "cpu")["curve_1d"]
    assert set(curve["y_pred"]) == {None}
    json.dumps(curve, allow_nan=False)


def test_the_model_is_left_in_the_mode_it_was_in() -> None:
    config = TrialConfig(dataset="moons", n_train=20, n_val=10, n_test=0, dropout=0.5)
    splits = make_dataset(config)
    model = build_model(config, splits.n_features, splits.n_outputs)
    model.train()
    prediction_artifacts(model, splits, config, "cpu")
    assert model.training


def test_a_bce_model_with_one_logit_gets_both_classes_in_its_boundary():
    from services.trial_config import TrialConfig
    from worker.training import train_trial

    result = train_trial(TrialConfig(dataset="moons", loss="bce", n_train=200, epochs=30, batch_size="full",
                                      lr=0.05, width=32, seed=0))
    grid = result.artifacts["boundary_2d"]
    classes = {cell for row in grid["predicted_class"] for cell in row}
    assert classes == {0, 1}
    assert all(0.5 <= p <= 1 for row in grid["probability"] for p in row if p is not None)


@pytest.mark.parametrize("classes", [1, 2, 3, 12])
@pytest.mark.parametrize("broken", [False, True])
def test_each_cell_gets_torch_max_of_its_class_probabilities_bitwise(classes: int, broken: bool) -> None:
    # boundary_cells reduces class by class (a last axis of a few classes is slow in torch): its
    # probability and class must be torch.max's, ties (first class) and NaN cells (first NaN) too.
    from worker.training.artifacts import boundary_cells, class_probabilities

    logits = torch.randn(3, 500, classes, generator=torch.Generator().manual_seed(classes)) * 4
    logits[:, :50] = logits[:, :50].round()  # ties between classes
    if classes > 1:
        logits[0, 50:60, :2] = 3.0  # an exact tie of the two most likely classes
    if broken:  # a diverged row: NaN and infinite outputs, some cells fine
        logits[1, 100:110, -1] = math.nan
        logits[1, 110:120, 0] = math.inf
        logits[1, 120:130] = -math.inf
        logits[2, 130:140, 0] = math.nan
    probability, predicted = boundary_cells(logits, multilabel=False)
    reference, index = class_probabilities(logits.movedim(-1, 0).contiguous()).max(0)
    assert probability.shape == predicted.shape == (3, 500)
    assert torch.equal(probability.nan_to_num(-1.0), reference.nan_to_num(-1.0))
    assert torch.equal(probability.isnan(), reference.isnan()) and reference.isnan().any() == broken
    assert torch.equal(predicted, index)
