"""One trial, top to bottom: data -> model -> optimizer -> epochs -> result.

Reproducible: the data come from config.data_seed, and one ``torch.Generator`` seeded with
config.seed draws the initial weights and then every epoch's data order, so the same config and
seed on the CPU give bitwise the same metrics run to run. The global RNGs are never read.

After each epoch the model is evaluated in eval mode, without gradients, on the full training and
validation sets (one forward pass each), and ``on_epoch`` receives that row of metrics. A loss
that stops being finite ends the trial as "diverged"; ``on_epoch`` returning True ends it as
"cancelled". Neither raises.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from worker.training.data import Splits, make_dataset
from worker.training.models import build_model, parameter_count
from worker.training.optim import build_optimizer

if TYPE_CHECKING:
    from services.trial_config import TrialConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]  # inputs, labels or targets


class DeviceUnavailable(ValueError):
    """The trial asked for a device this worker does not have."""


@dataclass(frozen=True)
class EpochMetrics:
    """One row of per-epoch metrics, measured after the epoch's last step. Losses are means per example."""

    epoch: int  # 1-based
    train_loss: float
    val_loss: float
    train_accuracy: float | None  # fraction in [0, 1]; None for regression
    val_accuracy: float | None
    lr: float
    epoch_seconds: float  # wall time of the epoch's steps plus its evaluation


@dataclass(frozen=True)
class TrialResult:
    """How a trial ended. final_metrics holds JSON-able numbers only (None where there is no number)."""

    status: str  # "succeeded" | "diverged" | "cancelled"
    epochs_run: int  # epochs whose metrics went to on_epoch
    best_epoch: int | None  # epoch with the lowest validation loss
    final_metrics: dict
    message: str | None


def train_trial(
    config: TrialConfig,
    *,
    on_epoch: Callable[[EpochMetrics], bool | None] = lambda metrics: None,
    device: str | None = None,
) -> TrialResult:
    """Train the trial that ``config`` describes; ``device`` overrides config.device (cpu, cuda, auto)."""
    target = resolve_device(device or config.device)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)  # init first, then the data order
    splits = make_dataset(config)
    model = build_model(config, splits.n_features, splits.n_outputs, generator=generator).to(target)
    optimizer = build_optimizer(config, model.parameters())
    loss_fn = _loss_function(config)
    x_train, y_train, x_val, y_val = (
        t.to(target) for t in (splits.x_train, splits.y_train, splits.x_val, splits.y_val)
    )
    batch_size = splits.x_train.shape[0] if config.batch_size == "full" else config.batch_size

    history: list[EpochMetrics] = []
    best: EpochMetrics | None = None  # the first epoch with the lowest validation loss
    best_weights: dict[str, torch.Tensor] | None = None  # the model as it was after that epoch
    status, message = "succeeded", None
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        batches = get_batches(x_train, y_train, batch_size=batch_size, generator=generator)
        train_one_epoch(model, optimizer, loss_fn, batches)
        train_loss, train_accuracy = evaluate(model, loss_fn, x_train, y_train)
        val_loss, val_accuracy = evaluate(model, loss_fn, x_val, y_val)
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            which, bad = ("training", train_loss) if not math.isfinite(train_loss) else ("validation", val_loss)
            status, message = "diverged", f"{which} loss became {bad} at epoch {epoch}"
            break

        metrics = EpochMetrics(
            epoch=epoch, train_loss=train_loss, val_loss=val_loss,
            train_accuracy=train_accuracy, val_accuracy=val_accuracy,
            lr=optimizer.param_groups[0]["lr"], epoch_seconds=time.perf_counter() - epoch_started,
        )
        history.append(metrics)
        if best is None or val_loss < best.val_loss:
            best, best_weights = metrics, _copy_weights(model)
        if on_epoch(metrics):
            status, message = "cancelled", f"cancelled after epoch {epoch}"
            break

    test_loss, test_accuracy = _test_at_best(
        model, best_weights, splits=splits, loss_fn=loss_fn, device=target
    )
    final_metrics = _final_metrics(
        last=history[-1] if history and status != "diverged" else None, best=best,
        test_loss=test_loss, test_accuracy=test_accuracy,
    )
    final_metrics["parameter_count"] = parameter_count(model)
    final_metrics["train_seconds"] = time.perf_counter() - started
    return TrialResult(
        status=status, epochs_run=len(history), best_epoch=best.epoch if best else None,
        final_metrics=final_metrics, message=message,
    )


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


def get_batches(
    x: torch.Tensor, y: torch.Tensor, *, batch_size: int, generator: torch.Generator
) -> Iterator[Batch]:
    """Yield one epoch of mini-batches in a fresh random order; the last batch may be smaller.

    A batch that covers the whole set is the set itself, in order (full-batch gradient descent).
    """
    n = x.shape[0]
    if batch_size >= n:
        yield x, y
        return
    # One gather per epoch, then each batch is a contiguous slice (a view): cheap per step.
    order = torch.randperm(n, generator=generator).to(x.device)
    x, y = x[order], y[order]
    for start in range(0, n, batch_size):
        yield x[start:start + batch_size], y[start:start + batch_size]


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, float | None]:
    """Mean loss and (classification) accuracy of the model on a whole set, in eval mode."""
    model.eval()
    output = model(x)
    loss = loss_fn(output, y).item()
    if y.dtype != torch.int64:
        return loss, None
    return loss, (output.argmax(dim=1) == y).sum().item() / y.shape[0]


def train_one_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, batches: Iterable[Batch]
) -> None:
    """One optimizer step per batch. No .item() here: the loss is measured once, at the epoch's end."""
    model.train()
    for x, y in batches:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _loss_function(config: TrialConfig) -> LossFn:
    return F.mse_loss if config.resolved_loss == "mse" else F.cross_entropy


def _copy_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _test_at_best(
    model: nn.Module,
    best_weights: dict[str, torch.Tensor] | None,
    *,
    splits: Splits,
    loss_fn: LossFn,
    device: torch.device,
) -> tuple[float | None, float | None]:
    # The test set is touched once, with the weights that early stopping on validation would keep.
    if best_weights is None or splits.x_test.shape[0] == 0:
        return None, None
    model.load_state_dict(best_weights)
    loss, accuracy = evaluate(model, loss_fn, splits.x_test.to(device), splits.y_test.to(device))
    return (loss if math.isfinite(loss) else None), accuracy


def _final_metrics(
    *,
    last: EpochMetrics | None,
    best: EpochMetrics | None,
    test_loss: float | None,
    test_accuracy: float | None,
) -> dict:
    # A diverged trial has no final loss (it is not a number: None); its best epoch still counts.
    return {
        "final_train_loss": last.train_loss if last else None,
        "final_val_loss": last.val_loss if last else None,
        "final_train_accuracy": last.train_accuracy if last else None,
        "final_val_accuracy": last.val_accuracy if last else None,
        "best_val_loss": best.val_loss if best else None,
        "best_val_accuracy": best.val_accuracy if best else None,
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "generalization_gap": last.val_loss - last.train_loss if last else None,
    }
