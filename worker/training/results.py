"""What the engine reports and the endings it decides: per-epoch metric rows, a trial's result and
its final metrics, the early stopper, and the errors a caller can act on.

Shared by every piece of the engine (fused.py trains, fused_stack.py measures, checkpoint.py
serialises) and by the worker, which writes these rows and results to the database.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


class CannotResume(ValueError):
    """The checkpoint handed to ``resume`` cannot be restored here; nothing was trained."""


class DeviceUnavailable(ValueError):
    """The trial asked for a device this worker does not have."""


@dataclass(frozen=True)
class EpochMetrics:
    """One row of per-epoch metrics, measured after the epoch's last step. Losses are means per example.

    Its fields are ``epoch`` followed by services.trials.EPOCH_METRIC_FIELDS, then
    services.trials.EPOCH_SERIES_FIELDS, in that order.
    """

    epoch: int  # 1-based
    train_loss: float
    val_loss: float
    train_accuracy: float | None  # fraction in [0, 1]; None for regression
    val_accuracy: float | None
    lr: float  # the learning rate of the epoch (one_cycle: of its first step)
    epoch_seconds: float  # wall time of the epoch's steps plus its evaluation
    train_rmse: float | None = None  # regression only, in target units
    val_rmse: float | None = None
    train_mae: float | None = None
    val_mae: float | None = None
    train_r2: float | None = None  # 1 - SSE/SST on that set; None when its targets are constant
    val_r2: float | None = None
    grad_norm: float | None = None  # L2 norm of the epoch's last full gradient, before clipping
    weight_norm: float | None = None  # L2 norm of all parameters at the epoch's end
    # The L2 norm of each Linear layer's gradient (weight and bias) at the same step as grad_norm,
    # first layer first (services.trials.EPOCH_SERIES_FIELDS: stored as one JSON list)
    layer_grad_norms: list[float | None] | None = None


@dataclass(frozen=True)
class TrialResult:
    """How a trial ended. final_metrics holds JSON-able numbers only (None where there is no number)."""

    status: str  # "succeeded" | "diverged" | "cancelled"
    epochs_run: int  # epochs with metrics, those before a resumed checkpoint included
    best_epoch: int | None  # epoch with the lowest validation loss
    final_metrics: dict
    message: str | None
    artifacts: dict[str, dict] = field(default_factory=dict)  # name -> small JSON-able plotting data
    # The best epoch's weights as JSON (fine_tuning.weights_artifact), what init_from starts from;
    # None without a best epoch or for a model too large to keep.
    best_weights: dict | None = None


class EarlyStopper:
    """Counts epochs since validation loss last improved by more than min_delta."""

    def __init__(self, settings) -> None:
        self.patience, self.min_delta = settings.patience, settings.min_delta
        self.best = math.inf
        self.waited = 0

    def state(self) -> dict:
        return {"best": self.best, "waited": self.waited}

    def restore(self, state: dict) -> None:
        self.best, self.waited = float(state["best"]), int(state["waited"])

    def should_stop(self, val_loss: float) -> bool:
        if val_loss < self.best - self.min_delta:
            self.best, self.waited = val_loss, 0
            return False
        self.waited += 1
        return self.waited >= self.patience


def resolve_device(requested: str) -> torch.device:
    """cpu, cuda, or auto (cuda when this machine has a GPU, else cpu)."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            "device 'cuda' was requested but this worker has no usable CUDA GPU; "
            "use device 'cpu' or 'auto', or run the trial on a GPU worker"
        )
    if requested not in ("cpu", "cuda"):
        raise DeviceUnavailable(f"device {requested!r} is unknown; use 'cpu', 'cuda' or 'auto'")
    return torch.device(requested)


def divergence(train_loss: float, val_loss: float, epoch: int) -> str | None:
    """The sentence that ends a trial whose loss stopped being a number, or None while both are."""
    if not math.isfinite(train_loss):
        return f"training loss became {train_loss} at epoch {epoch}"
    if not math.isfinite(val_loss):
        return f"validation loss became {val_loss} at epoch {epoch}"
    return None


def epoch_metrics(epoch: int, train: dict, val: dict, *, lr: float, seconds: float, grad_norm: float,
                  weight_norm: float, layer_grad_norms: list[float] | None = None) -> EpochMetrics:
    """The row of ``epoch`` from the training and validation measurements (losses.measure's keys)."""
    return EpochMetrics(
        epoch=epoch, train_loss=train["loss"], val_loss=val["loss"],
        train_accuracy=train["accuracy"], val_accuracy=val["accuracy"], lr=lr, epoch_seconds=seconds,
        train_rmse=train["rmse"], val_rmse=val["rmse"], train_mae=train["mae"], val_mae=val["mae"],
        train_r2=train["r2"], val_r2=val["r2"], grad_norm=finite_or_none(grad_norm),
        weight_norm=finite_or_none(weight_norm),
        layer_grad_norms=None if layer_grad_norms is None else [finite_or_none(v) for v in layer_grad_norms],
    )


def final_metrics_of(*, last: EpochMetrics | None, best: EpochMetrics | None, test: dict) -> dict:
    # A diverged trial has no final loss (it is not a number: None); its best epoch still counts.
    def of(metrics: EpochMetrics | None, name: str) -> float | None:
        return getattr(metrics, name) if metrics else None

    return {
        "final_train_loss": of(last, "train_loss"),
        "final_val_loss": of(last, "val_loss"),
        "final_train_accuracy": of(last, "train_accuracy"),
        "final_val_accuracy": of(last, "val_accuracy"),
        "best_val_loss": of(best, "val_loss"),
        "best_val_accuracy": of(best, "val_accuracy"),
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "generalization_gap": last.val_loss - last.train_loss if last else None,
        "final_train_rmse": of(last, "train_rmse"),
        "final_val_rmse": of(last, "val_rmse"),
        "final_val_mae": of(last, "val_mae"),
        "final_val_r2": of(last, "val_r2"),
        "best_val_rmse": of(best, "val_rmse"),
        "test_rmse": test["rmse"],
        "test_mae": test["mae"],
        "test_r2": test["r2"],
    }


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
