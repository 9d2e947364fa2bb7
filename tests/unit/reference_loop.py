"""The one-trial training loop as fitscope ran it before every trial trained in the stack: one
nn.Module, a torch.optim optimizer, torch's schedulers (OneCycleLR stepped per batch),
clip_grad_norm_ and nn.BatchNorm1d. Kept here, outside the engine, as the reference the stacked
engine is tested against (tests/unit/test_fused.py) and measured against (bench/single.py): it is
built from torch's own modules, so it checks the stack's hand-made kernels and layers from outside.

Same data, same initial weights (the trial's generator), same data order; dropout masks and input
noise are drawn differently (per step, from the same noise generator). No checkpoints.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from worker.training.data import Splits, make_dataset
from worker.training.losses import (
    LossFn,
    baseline_loss,
    build_loss,
    constant_predictor,
    measure,
    model_outputs,
    penalised_weights,
    resolve_loss,
    weight_statistics,
)
from worker.training.models import build_model, fit_input_features, make_noise_generator, parameter_count
from worker.training.results import (
    EarlyStopper,
    EpochMetrics,
    TrialResult,
    final_metrics_of,
    finite_or_none,
    resolve_device,
)
from worker.training.schedules import LearningRateSchedule, build_schedule

if TYPE_CHECKING:
    from services.trial_config import TrialConfig

log = logging.getLogger(__name__)

# torch.optim with fitscope's settings; fused=True wherever torch has the one-kernel update.
_OPTIMIZERS = {
    "sgd": lambda p, c: torch.optim.SGD(p, lr=c.lr, weight_decay=c.weight_decay, fused=True),
    "momentum": lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                                             fused=True),
    "nesterov": lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, nesterov=True,
                                             weight_decay=c.weight_decay, fused=True),
    "adagrad": lambda p, c: torch.optim.Adagrad(p, lr=c.lr, weight_decay=c.weight_decay, fused=True),
    "rmsprop": lambda p, c: torch.optim.RMSprop(p, lr=c.lr, weight_decay=c.weight_decay),
    "adam": lambda p, c: torch.optim.Adam(p, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay, fused=True),
    "adamw": lambda p, c: torch.optim.AdamW(p, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay, fused=True),
}

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs, labels or targets


@dataclass(frozen=True)
class _Regularization:
    l1: float
    l1_weights: list[torch.Tensor]
    input_noise: float
    grad_clip: float | None
    noise_generator: torch.Generator


def train_trial(
    config: TrialConfig,
    *,
    on_epoch: Callable[[EpochMetrics], bool | None] = lambda metrics: None,
    device: str | None = None,
    csv_content: bytes | None = None,
) -> TrialResult:
    """Train the trial that ``config`` describes; ``device`` overrides config.device (cpu, cuda, auto);
    ``csv_content`` is the stored file of a CSV data set."""
    target = resolve_device(device or config.device)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)  # init first, then the data order
    splits = make_dataset(config, csv_content=csv_content)
    task = splits.task
    loss_name = resolve_loss(config, task=task, n_classes=None if task == "regression" else splits.n_outputs)
    noise_generator = make_noise_generator(config.seed, target)
    model = build_model(config, splits.n_features, model_outputs(loss_name, splits.n_outputs),
                        generator=generator, noise_generator=noise_generator, task=task)
    fit_input_features(model, splits.x_train)
    model.to(target)
    optimizer = _OPTIMIZERS[config.optimizer](model.parameters(), config)
    loss_fn = build_loss(config, loss_name)
    x_train, y_train, x_val, y_val = (
        t.to(target) for t in (splits.x_train, splits.y_train, splits.x_val, splits.y_val)
    )
    n_train = x_train.shape[0]
    batch_size = n_train if config.batch_size == "full" else min(config.batch_size, n_train)
    merge_single = config.norm == "batch" and config.model == "mlp" and config.depth > 0
    schedule = build_schedule(config, optimizer, steps_per_epoch=steps_per_epoch(
        n_train, batch_size=batch_size, merge_single=merge_single))
    regularization = _Regularization(
        l1=config.l1, l1_weights=penalised_weights(model), input_noise=config.input_noise,
        grad_clip=config.grad_clip, noise_generator=noise_generator,
    )
    constant = constant_predictor(splits.y_train, loss=loss_name, n_outputs=splits.n_outputs)
    baselines = {"baseline_train_loss": baseline_loss(constant, y_train, loss_fn=loss_fn),
                 "baseline_val_loss": baseline_loss(constant, y_val, loss_fn=loss_fn)}

    last: EpochMetrics | None = None  # the latest epoch's metrics
    best: EpochMetrics | None = None  # the first epoch with the lowest validation loss
    best_weights: dict[str, torch.Tensor] | None = None  # the model as it was after that epoch
    stopper = EarlyStopper(config.early_stopping) if config.early_stopping else None
    status, message, stopped_epoch = "succeeded", None, None
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        batches = get_batches(x_train, y_train, batch_size=batch_size, generator=generator,
                              merge_single=merge_single)
        grad_norm, layer_norms = train_one_epoch(model, optimizer, loss_fn, batches, schedule=schedule,
                                                 regularization=regularization)
        model.eval()
        with torch.no_grad():
            train = measure(model(x_train), y_train, loss_fn=loss_fn, loss=loss_name)
            val = measure(model(x_val), y_val, loss_fn=loss_fn, loss=loss_name)
        if not (math.isfinite(train["loss"]) and math.isfinite(val["loss"])):
            which, bad = ("training", train["loss"]) if not math.isfinite(train["loss"]) else (
                "validation", val["loss"])
            status, message = "diverged", f"{which} loss became {bad} at epoch {epoch}"
            break

        metrics = EpochMetrics(
            epoch=epoch, train_loss=train["loss"], val_loss=val["loss"],
            train_accuracy=train["accuracy"], val_accuracy=val["accuracy"], lr=lr,
            epoch_seconds=time.perf_counter() - epoch_started,
            train_rmse=train["rmse"], val_rmse=val["rmse"], train_mae=train["mae"], val_mae=val["mae"],
            train_r2=train["r2"], val_r2=val["r2"], grad_norm=finite_or_none(grad_norm),
            weight_norm=finite_or_none(_l2_norm(list(model.parameters())).item()),
            layer_grad_norms=layer_norms,
        )
        last = metrics
        if best is None or metrics.val_loss < best.val_loss:
            best, best_weights = metrics, _copy_weights(model)
        if on_epoch(metrics):
            status, message = "cancelled", f"cancelled after epoch {epoch}"
            break
        if stopper is not None and stopper.should_stop(metrics.val_loss):
            stopped_epoch = epoch
            break
        schedule.after_epoch(metrics.val_loss)

    if best_weights is not None:
        model.load_state_dict(best_weights)
    test = test_at_best(model, best_weights, splits=splits, loss_fn=loss_fn, loss=loss_name, device=target)
    # Early stopping keeps the best model, so its "final" numbers are the best epoch's.
    final = None if status == "diverged" or last is None else (best if stopper is not None else last)
    final_metrics = final_metrics_of(last=final, best=best, test=test)
    final_metrics.update(baselines)
    final_metrics["stopped_epoch"] = stopped_epoch
    final_metrics["final_epoch"] = last.epoch if last else None
    final_metrics["parameter_count"] = parameter_count(model)
    final_metrics.update(weight_statistics(penalised_weights(model) if best_weights is not None else []))
    artifacts = _prediction_artifacts(model, splits, config, target) if best_weights is not None else {}
    final_metrics["train_seconds"] = time.perf_counter() - started
    return TrialResult(
        status=status, epochs_run=last.epoch if last else 0, best_epoch=best.epoch if best else None,
        final_metrics=final_metrics, message=message, artifacts=artifacts,
    )


def get_batches(
    x: torch.Tensor, y: torch.Tensor, *, batch_size: int, generator: torch.Generator, merge_single: bool = False
) -> Iterator[Batch]:
    """Yield one epoch of mini-batches in a fresh random order; the last batch may be smaller.

    A batch that covers the whole set is the set itself, in order (full-batch gradient descent).
    ``merge_single`` folds a last batch of one example into the batch before it (batch norm cannot
    normalise a single example).
    """
    n = x.shape[0]
    if batch_size >= n:
        yield x, y
        return
    # One gather per epoch, then each batch is a contiguous slice (a view): cheap per step.
    order = torch.randperm(n, generator=generator).to(x.device)
    x, y = x[order], y[order]
    for start in range(0, n, batch_size):
        end = start + batch_size
        if merge_single and end == n - 1:
            end = n
        yield x[start:end], y[start:end]
        if end == n:
            return


def steps_per_epoch(n: int, *, batch_size: int, merge_single: bool = False) -> int:
    """Optimizer steps in one epoch of :func:`get_batches`."""
    steps = math.ceil(n / batch_size)
    return steps - 1 if merge_single and steps > 1 and n % batch_size == 1 else steps


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    batches: Iterator[Batch],
    *,
    schedule: LearningRateSchedule,
    regularization: _Regularization,
) -> tuple[float, list[float]]:
    """One optimizer step per batch; returns the L2 norm of the last step's gradient (before clipping)
    and that of each nn.Linear's part of it (:func:`layer_grad_norms`).

    No .item() per step: the norm tensor of the last step is read once, at the epoch's end.
    """
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # Locals, not attribute look-ups, inside the step loop: per-step Python is what a small trial costs.
    input_noise, l1, grad_clip = regularization.input_noise, regularization.l1, regularization.grad_clip
    l1_weights, noise_generator = regularization.l1_weights, regularization.noise_generator
    per_step_schedule = schedule.per_step
    grad_norm = None
    for x, y in batches:
        if input_noise:
            noise = torch.randn(x.shape, device=noise_generator.device, generator=noise_generator)
            x = x + input_noise * noise.to(x.device)
        loss = loss_fn(model(x), y)
        if l1:
            loss = loss + l1 * l1_penalty(l1_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            layer_norms = layer_grad_norms(model)  # before clipping, as grad_norm
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if per_step_schedule:
            schedule.after_step()
    if grad_norm is None:
        # The step leaves .grad as backward made it, so the last step's gradient is still there.
        grad_norm = _l2_norm([p.grad for p in params if p.grad is not None])
        layer_norms = layer_grad_norms(model)
    return grad_norm.item(), layer_norms


def layer_grad_norms(model: nn.Module) -> list[float]:
    """The L2 norm of each nn.Linear's gradient (weight and bias) as the last step left it, first
    layer first."""
    return [_l2_norm([p.grad for p in layer.parameters() if p.grad is not None]).item()
            for layer in model.modules() if isinstance(layer, nn.Linear)]


def _copy_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_at_best(
    model: nn.Module,
    best_weights: dict[str, torch.Tensor] | None,
    *,
    splits: Splits,
    loss_fn: LossFn,
    loss: str,
    device: torch.device,
) -> dict[str, float | None]:
    # The test set is touched once, with the weights that early stopping on validation would keep.
    if best_weights is None or splits.x_test.shape[0] == 0:
        return {"loss": None, "accuracy": None, "rmse": None, "mae": None, "r2": None}
    model.eval()
    with torch.no_grad():
        test = measure(model(splits.x_test.to(device)), splits.y_test.to(device), loss_fn=loss_fn, loss=loss)
    return {key: finite_or_none(value) for key, value in test.items()}


def _prediction_artifacts(model: nn.Module, splits: Splits, config: TrialConfig, device: torch.device) -> dict:
    # A trial whose plot fails still succeeds.
    from worker.training.artifacts import prediction_artifacts

    model.eval()
    try:
        return dict(prediction_artifacts(model, splits, config, device))
    except Exception:
        log.exception("prediction artifacts of a %s trial failed; the trial keeps its metrics", config.dataset_name)
        return {}


def _l2_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    # The L2 norm of all the tensors as one vector. One fused call: torch.nn.utils.get_total_norm
    # does the same with more Python around it, which shows in a trial of tiny steps.
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


def l1_penalty(weights: list[torch.Tensor]) -> torch.Tensor:
    """Sum of absolute values of the given weight tensors (the caller scales it by config.l1)."""
    return torch.stack([w.abs().sum() for w in weights]).sum()
