"""How the stack's trials are measured: each epoch's per-row losses and metrics, and at a trial's
end its test metrics, weight statistics, prediction artifacts and TrialResult.

Everything is measured for all rows at once (one stacked forward per input, then row-wise
reductions), giving each row the numbers that losses.measure, losses.weight_statistics and
artifacts.prediction_artifacts give its own nn.Module's outputs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from worker.training.artifacts import lr_range_artifact, prediction_artifacts_rows
from worker.training.fine_tuning import weights_artifact
from worker.training.fused_stack import StackedModel, row_size
from worker.training.losses import ZERO_WEIGHT, measure
from worker.training.models import parameter_count
from worker.training.results import TrialResult, final_metrics_of, finite_or_none
from worker.training.snapshots import ARTIFACT, Snapshots

if TYPE_CHECKING:
    from services.trial_config import TrialConfig
    from worker.training.data import Splits

log = logging.getLogger(__name__)

MULTILABEL_ARTIFACT = "multilabel"  # a multi-label trial's exact-match series and per-label accuracies

@dataclass(frozen=True)
class PerTrialLoss:
    """Each row's mean data loss ``[slots]`` from class-major outputs ``[slots, outputs, n]`` and
    labels or targets (called like a function), and, for some losses, ``gradient``: the gradient of
    the rows' summed losses with respect to the outputs, from the very kernels autograd would run
    (so the same numbers), without building a graph (~0.1 ms a training step of Python and autograd
    bookkeeping on a small stack, a tenth of the step)."""

    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    gradient: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __call__(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(output, y)


def per_trial_loss(config: TrialConfig, loss: str) -> PerTrialLoss:
    """Each row's mean data loss ``[slots]`` from class-major outputs ``[slots, outputs, n]`` and
    labels or targets ``[slots, n]``: the losses of losses.build_loss, per row."""
    if loss == "cross_entropy":
        smoothing = config.label_smoothing
        return PerTrialLoss(
            lambda output, y: F.cross_entropy(output, y, reduction="none", label_smoothing=smoothing).mean(1),
            None if smoothing else _cross_entropy_gradient)
    if loss == "bce":
        return PerTrialLoss(lambda output, y: F.binary_cross_entropy_with_logits(
            output[:, 0], y.to(output.dtype), reduction="none").mean(1))
    if loss == "multilabel_bce":  # labels [slots, n, labels] against label-major outputs [slots, labels, n]
        return PerTrialLoss(lambda output, y: F.binary_cross_entropy_with_logits(
            output, y.mT.to(output.dtype), reduction="none").mean((1, 2)))
    if loss == "huber":
        return PerTrialLoss(
            lambda output, y: F.huber_loss(output[:, 0], y, reduction="none", delta=config.huber_delta).mean(1))
    if loss == "mse":
        return PerTrialLoss(lambda output, y: F.mse_loss(output[:, 0], y, reduction="none").mean(1), _mse_gradient)
    elementwise = {"mae": F.l1_loss}[loss]
    return PerTrialLoss(lambda output, y: elementwise(output[:, 0], y, reduction="none").mean(1))


def _mean_share(output: torch.Tensor) -> torch.Tensor:
    # The backward of each row's mean over its n examples: 1 / n, in the outputs' precision.
    slots, n = output.shape[0], output.shape[-1]
    return (torch.ones((), dtype=output.dtype, device=output.device) / n).expand(slots, n)


def _cross_entropy_gradient(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # What autograd runs backward through sum -> mean(1) -> cross_entropy (reduction none, no label
    # smoothing), which torch computes as log_softmax over the classes, then nll_loss2d on a view.
    slots, classes, n = output.shape
    log_probabilities = torch._log_softmax(output, 1, False)
    nll = torch.ops.aten.nll_loss2d_backward(
        _mean_share(output).reshape(slots, 1, n), log_probabilities.view(slots, classes, 1, n), y.view(slots, 1, n),
        None, 0, -100, torch.zeros((), dtype=output.dtype, device=output.device))  # reduction none, no weights
    return torch.ops.aten._log_softmax_backward_data(nll.view(slots, classes, n), log_probabilities, 1, output.dtype)


def _mse_gradient(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # What autograd runs backward through sum -> mean(1) -> mse_loss(reduction none) -> output[:, 0]:
    # the mean's backward (1 / n in the outputs' precision) into mse_loss_backward.
    return torch.ops.aten.mse_loss_backward(_mean_share(output), output[:, 0], y, 0).unsqueeze(1)


@torch.no_grad()
def measure_rows(output: torch.Tensor, y: torch.Tensor, loss_fn: PerTrialLoss, *, loss: str
                 ) -> list[dict[str, float | None]]:
    """losses.measure for every row at once, with one read from the device: class-major outputs
    ``[slots, outputs, n]`` on the shared labels or targets ``y`` ``[n]``."""
    slots = output.shape[0]
    if y.shape[0] == 0:
        return [{"loss": None, "accuracy": None, "rmse": None, "mae": None, "r2": None}] * slots
    labels = y.expand(slots, *y.shape)
    data_loss = loss_fn(output, labels)
    if loss == "multilabel_bce":  # y [n, labels]: accuracy per label, averaged; exact match per example
        correct = (output > 0) == (labels.mT > 0.5)
        values = torch.stack([data_loss, correct.float().mean((1, 2)), correct.all(1).float().mean(1)], 1).tolist()
        return [{"loss": lo, "accuracy": acc, "rmse": None, "mae": None, "r2": None, "exact_match": exact}
                for lo, acc, exact in values]
    if y.dtype == torch.int64:
        predicted = (output[:, 0] > 0).long() if loss == "bce" else _first_argmax(output)
        values = torch.stack([data_loss, (predicted == labels).float().mean(1)], 1).tolist()
        return [{"loss": lo, "accuracy": acc, "rmse": None, "mae": None, "r2": None} for lo, acc in values]
    error = output[:, 0] - labels
    variance = (y - y.mean()).square().mean()
    values = torch.stack([data_loss, error.square().mean(1), error.abs().mean(1), variance.expand(slots)], 1).tolist()
    return [{"loss": lo, "accuracy": None, "rmse": math.sqrt(mse), "mae": mae,
             "r2": 1 - mse / var if var > 0 else None} for lo, mse, mae, var in values]


@torch.no_grad()
def test_outputs(model: StackedModel, has_best: list[bool], *, splits: Splits,
                 device: torch.device) -> torch.Tensor | None:
    """Every row's outputs ``[rows, outputs, n]`` on the test set (one evaluation, which the test
    metrics and the per-label accuracies share); None without a test set or a row with a best epoch."""
    if splits.x_test.shape[0] == 0 or not any(has_best):
        return None
    return model.evaluate(splits.x_test.to(device))


@torch.no_grad()
def measure_test_set(outputs: torch.Tensor | None, has_best: list[bool], *, splits: Splits, loss_fn, loss: str,
                     device: torch.device) -> list[dict[str, float | None]]:
    """The test metrics of each row's best weights (the test set is touched once, with the weights
    early stopping on validation keeps) from their :func:`test_outputs`: losses.measure on the row's
    outputs, as its own module gives them; all None for a row without a best epoch."""
    nothing = ("loss", "accuracy", "rmse", "mae", "r2")
    if outputs is None:
        return [dict.fromkeys(nothing) for _ in has_best]
    y = splits.y_test.to(device)
    return [{key: finite_or_none(value) for key, value in measure(outputs[row].mT, y, loss_fn=loss_fn,
                                                                     loss=loss).items()}
            if ok else dict.fromkeys(nothing) for row, ok in enumerate(has_best)]


@torch.no_grad()
def weight_statistics_rows(template: nn.Module, rows: torch.Tensor, has_best: list[bool]) -> list[dict]:
    """losses.weight_statistics of each row's Linear weight matrices (penalised_weights), every
    statistic taken along the rows at once (row-wise reductions give each row's numbers bitwise)."""
    modules = dict(template.named_modules())
    columns, offset = [], 0
    for name, parameter in template.named_parameters():
        owner, _, kind = name.rpartition(".")
        if kind == "weight" and isinstance(modules[owner], nn.Linear):
            columns.append(torch.arange(offset, offset + parameter.numel()))
        offset += parameter.numel()
    weights = rows[:, torch.cat(columns).to(rows.device)]
    magnitude = weights.abs()
    values = torch.stack([magnitude.sum(1), weights.mean(1), weights.amin(1), weights.amax(1),
                          (magnitude < ZERO_WEIGHT).float().mean(1)], 1).tolist()
    usable = torch.isfinite(weights).all(1).tolist()
    names = ("weight_l1", "weight_mean", "weight_min", "weight_max", "zero_weight_fraction")
    return [dict(zip(names, row_values, strict=True)) if ok and finite else dict.fromkeys(names)
            for row_values, ok, finite in zip(values, has_best, usable, strict=True)]


def trial_results(trials: list, template: nn.Module, *, splits: Splits, loss_fn, loss: str,
             device: torch.device, baselines: dict, set_up_s: float,
             snapshots: Snapshots | None = None) -> dict[int, TrialResult]:
    """Each ended trial's TrialResult (fused._Trial: its history, ending and best weights), from its
    weights at its best epoch, which it also keeps (TrialResult.best_weights, for init_from). The test
    metrics, weight statistics and prediction artifacts are measured for all of them at once, with the
    numbers each trial's own nn.Module would give: one stacked forward per input, then the same
    reductions and roundings on every row together."""
    started = time.perf_counter()
    count = parameter_count(template)  # the same for every trial: they share the layers
    nothing = torch.zeros(row_size(template), device=device)  # a trial that never finished an epoch has no best
    best_rows = torch.stack([nothing if trial.best_weights is None else trial.best_weights for trial in trials])
    has_best = [trial.best_weights is not None for trial in trials]
    model = StackedModel(template, best_rows)
    on_test = test_outputs(model, has_best, splits=splits, device=device)
    tests = measure_test_set(on_test, has_best, splits=splits, loss_fn=loss_fn, loss=loss, device=device)
    statistics = weight_statistics_rows(template, best_rows, has_best)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # the pictures' (inputs, outputs): the frames reuse them
    pictures = stacked_prediction_artifacts(model, has_best, splits=splits, config=trials[0].config, device=device,
                                            seen=seen)
    if snapshots is not None:  # each trial's frames, with its best epoch's from the weights the pictures saw
        _add_snapshots(snapshots, model, trials, pictures, has_best, seen=seen)
    per_label = (label_accuracies(model, splits=splits, device=device, on_test=on_test)
                 if splits.task == "multilabel" else None)
    share = (time.perf_counter() - started) / len(trials)
    results = {}
    for row, (trial, test, weights, artifacts) in enumerate(zip(trials, tests, statistics, pictures, strict=True)):
        best = trial.best
        last = None if trial.status == "diverged" or trial.last is None else (
            best if trial.stopper is not None else trial.last)
        final_metrics = final_metrics_of(last=last, best=best, test=test)
        final_metrics.update(baselines)
        final_metrics["stopped_epoch"] = trial.stopped_epoch
        final_metrics["final_epoch"] = trial.last.epoch if trial.last else None
        final_metrics["parameter_count"] = count
        final_metrics.update(weights)
        if per_label is not None:
            artifacts = {**artifacts, MULTILABEL_ARTIFACT: _multilabel_artifact(
                trial, last=last, best=best, test=test, final_metrics=final_metrics, splits=splits,
                per_label={split: values[row] if has_best[row] else None for split, values in per_label.items()})}
        final_metrics["train_seconds"] = set_up_s + trial.seconds + share
        if trial.lr_range:  # a range test's steps, whatever its ending (a blow-up is part of the picture)
            artifacts = {**artifacts, "lr_range": lr_range_artifact(trial.lr_range)}
        kept = None if trial.best_weights is None else weights_artifact(template, trial.best_weights)
        results[trial.index] = TrialResult(best_weights=kept, status=trial.status, epochs_run=trial.epochs_run,
                                           best_epoch=best.epoch if best else None, final_metrics=final_metrics,
                                           message=trial.message, artifacts=artifacts)
    return results


def stacked_prediction_artifacts(model: StackedModel, has_best: list[bool], *, splits: Splits, config: TrialConfig,
                               device: torch.device, seen: list | None = None) -> list[dict[str, dict]]:
    """artifacts.prediction_artifacts of every row with a best epoch ({} for the others), from one
    stacked forward per input; each (inputs on ``device``, outputs) it evaluated is appended to
    ``seen``. A failure costs the artifacts only: the trials keep their metrics."""

    def predict(x: torch.Tensor) -> torch.Tensor:  # [rows, n, outputs], as the artifacts read them
        x = x.to(device)
        outputs = model.evaluate(x).float().cpu().mT
        if seen is not None:
            seen.append((x, outputs))
        return outputs

    try:
        pictures = prediction_artifacts_rows(predict, splits, config, rows=model.rows)
    except Exception:
        log.exception("prediction artifacts of fused %s trials failed; the trials keep their metrics",
                      config.dataset_name)
        pictures = [{} for _ in has_best]
    return [picture if ok else {} for picture, ok in zip(pictures, has_best, strict=True)]


def _add_snapshots(snapshots: Snapshots, model: StackedModel, trials: list, pictures: list[dict],
                   has_best: list[bool], *, seen: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    rows = [row for row, ok in enumerate(has_best) if ok]
    # The best-epoch frames show the pictures' weights on the pictures' grid: reuse those outputs
    # (one evaluation, not two) when the inputs are the very same numbers.
    known = next((outputs for inputs, outputs in seen if inputs.shape == snapshots.inputs.shape
                  and inputs.dtype == snapshots.inputs.dtype
                  and torch.equal(inputs, snapshots.inputs)), None)
    try:
        best = snapshots.frames(model, rows, outputs=known, metrics=[
            (trials[row].best.epoch, trials[row].best.train_loss, trials[row].best.val_loss) for row in rows])
    except Exception:  # as for the pictures: a failure costs the frames only
        log.exception("snapshots of %d trials failed; the trials keep their metrics", len(trials))
        return
    for row, frame in zip(rows, best, strict=True):
        pictures[row][ARTIFACT] = snapshots.artifact([*trials[row].frames, frame])


@torch.no_grad()
def label_accuracies(model: StackedModel, *, splits: Splits, device: torch.device,
                     on_test: torch.Tensor | None) -> dict[str, list]:
    """Multi-label: each row's accuracy of every label on the train, val and test sets, split ->
    [rows][labels] (None for an empty set). ``on_test``: the rows' :func:`test_outputs`, so the test
    set is evaluated once; the training and validation sets are evaluated together."""
    found: dict[str, list] = {split: [None] * model.rows for split in ("train", "val", "test")}
    seen = [(split, x, y) for split, x, y in (("train", splits.x_train, splits.y_train),
                                              ("val", splits.x_val, splits.y_val)) if x.shape[0]]
    outputs = model.evaluate(torch.cat([x for _, x, _ in seen]).to(device)) if seen else None  # [rows, labels, n]
    start = 0
    for split, x, y in seen:
        found[split] = _label_accuracy(outputs[:, :, start:start + x.shape[0]], y.to(device))
        start += x.shape[0]
    if on_test is not None:
        found["test"] = _label_accuracy(on_test, splits.y_test.to(device))
    return found


def _label_accuracy(outputs: torch.Tensor, y: torch.Tensor) -> list:
    # [rows][labels]: the share of examples whose label the row predicts right
    return ((outputs > 0) == (y.mT > 0.5)).float().mean(2).tolist()


def _multilabel_artifact(trial, *, last, best, test: dict, final_metrics: dict, splits: Splits,
                         per_label: dict[str, list | None]) -> dict:
    """Multi-label: the exact-match ratios (every label of an example right) go into ``final_metrics``
    (final train and val, at the best epoch, on the test set), and the per-epoch series into an
    artifact, since epoch_metrics has no column for them; beside it each label's accuracy with the
    best epoch's weights (the ones the test set sees), to tell the hard labels from the easy ones."""
    by_epoch = {int(epoch): (train, val) for epoch, train, val in trial.exact_match}
    final = by_epoch.get(last.epoch, (None, None)) if last else (None, None)
    final_metrics["final_train_exact_match"], final_metrics["final_val_exact_match"] = final
    final_metrics["best_val_exact_match"] = by_epoch.get(best.epoch, (None, None))[1] if best else None
    final_metrics["test_exact_match"] = test.get("exact_match")
    epochs = sorted(by_epoch)
    return {"labels": list(splits.label_names), "epoch": epochs,
            "train_exact_match": [by_epoch[e][0] for e in epochs], "val_exact_match": [by_epoch[e][1] for e in epochs],
            "best_label_accuracy": per_label}


def _first_argmax(output: torch.Tensor) -> torch.Tensor:
    """argmax over dim 1 of ``[slots, classes, n]`` (the first index of the largest, as argmax),
    class by class: torch's argmax over a middle axis is ~10x slower than these few passes."""
    best, predicted = output[:, 0], torch.zeros(output[:, 0].shape, dtype=torch.int64, device=output.device)
    for k in range(1, output.shape[1]):
        better = output[:, k] > best
        best = torch.where(better, output[:, k], best)
        predicted = torch.where(better, k, predicted)
    return predicted
