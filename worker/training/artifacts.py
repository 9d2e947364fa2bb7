"""Pictures for later: a few kilobytes of JSON that show what a trial learned.

- 1-D regression -> ``curve_1d``: the model's curve on ``CURVE_POINTS`` inputs spanning the training
  inputs (padded by ``PADDING`` of their range on each side), the noiseless truth on the same inputs
  when the data set has one, and up to ``MAX_POINTS`` training points.
- 2-D classification -> ``boundary_2d``: on a ``GRID`` x ``GRID`` grid over the training inputs
  (padded likewise), the predicted class and its probability per cell, plus up to ``MAX_POINTS``
  training points with their labels. Multi-label (up to ``MAX_PICTURED_LABELS`` labels): the
  "class" of a cell is its predicted label set (bit k set: label k predicted yes), its probability
  that set's under the model (the product over labels of p or 1 - p), and ``class_names`` names
  each set.
- and, whatever the data, a learning-rate range test -> ``lr_range``: every step's (rate, batch loss), at most
  ``LR_RANGE_POINTS`` of them (see :func:`lr_range_artifact`).

Everything is in the data's raw coordinates: grid inputs are standardised with the training mean
and std before they reach the model, exactly as the training inputs were. Any other task or shape
gets no artifact ({}).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from services.trial_config import TrialConfig
    from worker.training.data import Splits

CURVE_POINTS = 200
GRID = 60
MAX_POINTS = 300
PADDING = 0.05  # share of the input range added on each side of the plot
DECIMALS = 3
MAX_PICTURED_LABELS = 3  # a multi-label boundary colours each label set: 2^3 colours stay readable


# Standardised inputs [n, features] -> outputs [rows, n, outputs]: one model (rows=1), or every
# trial of a fused stack at once.
Predict = Callable[[torch.Tensor], torch.Tensor]


def prediction_artifacts(
    model: nn.Module, splits: Splits, config: TrialConfig, device: torch.device | str
) -> dict[str, dict]:
    """kind -> JSON-able data: ``curve_1d`` for 1-D regression, ``boundary_2d`` for 2-D classification."""

    @torch.no_grad()
    def predict(x: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return model(x.to(device)).float().cpu().unsqueeze(0)
        finally:
            model.train(was_training)

    return prediction_artifacts_rows(predict, splits, config, rows=1)[0]


def prediction_artifacts_rows(predict: Predict, splits: Splits, config: TrialConfig, *, rows: int) -> list[dict]:
    """:func:`prediction_artifacts` of each of ``rows`` models that ``predict`` evaluates together
    (a fused stack's trials, which share the data): the inputs, the training points and the
    roundings are done once for all of them; each row's numbers are its own."""
    if splits.x_train.shape[0] == 0:
        return [{} for _ in range(rows)]
    kind = picture_kind(splits)
    if kind == "curve_1d":
        return [{"curve_1d": curve} for curve in _curve_1d(predict, splits, config, rows)]
    if kind == "boundary_2d":
        return [{"boundary_2d": boundary} for boundary in _boundary_2d(predict, splits, rows)]
    return [{} for _ in range(rows)]


def picture_kind(splits: Splits) -> str | None:
    """curve_1d, boundary_2d, or None: the picture a trial on these data gets."""
    if splits.task == "regression" and splits.n_features == 1 and splits.n_outputs == 1:
        return "curve_1d"
    if splits.n_features == 2 and (splits.task == "classification" or (
            splits.task == "multilabel" and splits.n_outputs <= MAX_PICTURED_LABELS)):
        return "boundary_2d"
    return None


def curve_inputs(splits: Splits) -> torch.Tensor:
    """The ``CURVE_POINTS`` raw inputs a fitted curve is drawn at."""
    low, high = padded_range(raw_inputs(splits, splits.x_train)[:, 0])
    return torch.linspace(low, high, CURVE_POINTS)


def boundary_grid(splits: Splits) -> tuple[tuple[float, float], tuple[float, float], torch.Tensor]:
    """(x range, y range, raw inputs [GRID * GRID, 2]) of the decision-region grid: row i of the
    grid is one y value, column j one x value, flattened row by row."""
    raw = raw_inputs(splits, splits.x_train)
    (x_low, x_high), (y_low, y_high) = padded_range(raw[:, 0]), padded_range(raw[:, 1])
    xs, ys = torch.linspace(x_low, x_high, GRID), torch.linspace(y_low, y_high, GRID)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return (x_low, x_high), (y_low, y_high), torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)


def boundary_cells(logits: torch.Tensor, *, multilabel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(probability, predicted class) of each cell from outputs [..., cells, outputs]: the most
    probable class and its probability, or (multi-label) the predicted label set's code and its
    probability."""
    if multilabel:
        positive = torch.sigmoid(logits)
        yes = logits > 0  # as accuracy counts a label predicted
        bits = 2 ** torch.arange(logits.shape[-1], device=logits.device)
        return torch.where(yes, positive, 1 - positive).prod(-1), (yes.long() * bits).sum(-1)
    # Class-major ([classes, ...cells]): softmax and the reductions over a last axis of a few
    # classes run ~50x slower in torch (a frame of 64 trials: 70 ms, now ~3 ms); same numbers.
    return _first_max(class_probabilities(logits.movedim(-1, 0).contiguous()))


def _first_max(by_class: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.max(dim=0) of class probabilities, class by class: the largest (amax's, bitwise: they hold
    no -0.0 to tie with 0.0) and the index of the first largest. A cell's probabilities are all NaN or
    none (softmax shares one max and one sum; the sigmoid's complement follows it), so a NaN cell keeps
    class 0, max's first NaN, without a NaN test."""
    best, index = by_class[0], torch.zeros(by_class.shape[1:], dtype=torch.int64, device=by_class.device)
    for k in range(1, by_class.shape[0]):
        candidate = by_class[k]
        better = candidate > best
        best = torch.where(better, candidate, best)
        index = torch.where(better, k, index)
    return best, index


def label_set_names(labels: tuple[str, ...]) -> list[str]:
    """The name of each label set by its code (bit k: label k): "none", "a", "b", "a + b", ..."""
    return [" + ".join(label for k, label in enumerate(labels) if code >> k & 1) or "none"
            for code in range(2 ** len(labels))]


def _curve_1d(predict: Predict, splits: Splits, config: TrialConfig, rows: int) -> list[dict[str, Any]]:
    raw_x = raw_inputs(splits, splits.x_train)[:, 0]
    x = curve_inputs(splits)
    y_pred = _predict(predict, splits, x[:, None])[:, :, 0]  # [rows, points]
    keep = subsample(raw_x.shape[0])
    x_list, truth = round_for_json(x), true_values(splits, config, x)
    train_x, train_y = round_for_json(raw_x[keep]), round_for_json(splits.y_train[keep, 0])
    return [{
        "x": list(x_list),
        "y_pred": row,
        "y_true": None if truth is None else list(truth),
        "train_x": list(train_x),
        "train_y": list(train_y),
    } for row in grid_rows(round_for_json(y_pred.reshape(-1)), CURVE_POINTS)]


def class_probabilities(by_class: torch.Tensor) -> torch.Tensor:
    """[classes, ...] probabilities from a classifier's outputs, classes first: softmax over several
    logits, or for a single bce logit the sigmoid as class 1's probability beside its complement."""
    if by_class.shape[0] == 1:
        positive = torch.sigmoid(by_class)
        return torch.cat([1 - positive, positive])
    return torch.softmax(by_class, dim=0)


def _boundary_2d(predict: Predict, splits: Splits, rows: int) -> list[dict[str, Any]]:
    (x_low, x_high), (y_low, y_high), grid = boundary_grid(splits)
    multilabel = splits.task == "multilabel"
    probability, predicted = boundary_cells(_predict(predict, splits, grid), multilabel=multilabel)
    raw = raw_inputs(splits, splits.x_train)
    keep = subsample(raw.shape[0])
    train_x, train_y = round_for_json(raw[keep, 0]), round_for_json(raw[keep, 1])
    if multilabel:
        names = label_set_names(splits.label_names)
        bits = 2 ** torch.arange(splits.n_outputs)
        train_label = (splits.y_train[keep] > 0.5).long().mul(bits).sum(1).tolist()
    else:
        names = list(splits.class_names) if splits.class_names else [str(k) for k in range(splits.n_outputs)]
        train_label = splits.y_train[keep].tolist()
    return [{
        "x_range": [round(x_low, DECIMALS), round(x_high, DECIMALS)],
        "y_range": [round(y_low, DECIMALS), round(y_high, DECIMALS)],
        "resolution": GRID,
        "classes": list(range(len(names))),
        "class_names": names,
        "predicted_class": classes,  # [row = y][column = x]
        "probability": grid_rows(row, GRID),  # of that class
        "train_x": list(train_x),
        "train_y": list(train_y),
        "train_label": list(train_label),
    } for classes, row in zip(predicted.reshape(rows, GRID, GRID).tolist(),
                              grid_rows(round_for_json(probability.reshape(-1)), GRID * GRID), strict=True)]


def _predict(predict: Predict, splits: Splits, raw_x: torch.Tensor) -> torch.Tensor:
    return predict((raw_x - splits.feature_mean) / splits.feature_std)


def true_values(splits: Splits, config: TrialConfig, x: torch.Tensor) -> list[float] | None:
    # data.true_function(config, raw x [N, 1]) is the noiseless target, or None (no truth to draw).
    from worker.training import data

    truth = getattr(data, "true_function", None)  # guarded: the data module may predate it
    values = truth(config, x.numpy()[:, None].astype("float64")) if truth is not None else None
    if values is None:
        return None
    return round_for_json(torch.as_tensor(values, dtype=torch.float32).reshape(-1))


def raw_inputs(splits: Splits, x: torch.Tensor) -> torch.Tensor:
    return x * splits.feature_std + splits.feature_mean


def padded_range(values: torch.Tensor) -> tuple[float, float]:
    low, high = values.min().item(), values.max().item()
    pad = PADDING * (high - low) if high > low else 1.0
    return low - pad, high + pad


def subsample(n: int) -> torch.Tensor:
    # Evenly spaced indices: deterministic, and the data are already in random order.
    if n <= MAX_POINTS:
        return torch.arange(n)
    return torch.linspace(0, n - 1, MAX_POINTS).round().long()


def grid_rows(values: list, width: int) -> list[list]:
    return [values[start:start + width] for start in range(0, len(values), width)]


def round_for_json(values: torch.Tensor) -> list[float | None]:
    # JSON has no NaN/inf (PostgreSQL refuses them): a non-finite prediction is stored as null.
    # One vectorised rounding, not a Python round() per number: a 60x60 boundary is 3,600 of them,
    # which cost a few milliseconds per trial (more than a small fused trial's training).
    values = values.detach().to(torch.float64)
    finite = torch.isfinite(values)
    rounded = torch.round(torch.where(finite, values, 0.0), decimals=DECIMALS).tolist()
    if bool(finite.all()):
        return rounded
    return [v if ok else None for v, ok in zip(rounded, finite.tolist(), strict=True)]


LR_RANGE_POINTS = 2_000


def thin(count: int, most: int) -> list[int]:
    """At most ``most`` evenly spaced indices of ``count`` points, the first and the last always among
    them (a stored series: a range test's steps, a surface's path)."""
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def lr_range_artifact(points: list[tuple[float, float]]) -> dict[str, Any]:
    """``lr_range``: a range test's (rate, training-batch loss) of every step, evenly thinned to at most
    ``LR_RANGE_POINTS`` (the first and last always kept); a loss that is not a number is null."""
    chosen = [points[i] for i in thin(len(points), LR_RANGE_POINTS)]
    return {"steps": len(points), "lr": [rate for rate, _ in chosen],
            "loss": [loss if math.isfinite(loss) else None for _, loss in chosen]}
