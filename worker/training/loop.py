"""One trial, top to bottom: data -> model -> optimizer and schedule -> epochs -> result.

Reproducible: the data come from config.data_seed; one ``torch.Generator`` seeded with config.seed
draws the initial weights and then every epoch's data order, and a second one derived from the same
seed (models.make_noise_generator) draws the training noise (dropout masks, input noise). So the
same config and seed on the CPU give bitwise the same metrics run to run. The global RNGs are never
read.

Each step: optional Gaussian input noise -> forward -> data loss (+ l1 penalty on the weights) ->
backward -> optional gradient clipping -> optimizer step -> per-step schedule. After each epoch the
model is evaluated in eval mode, without gradients, on the full training and validation sets (one
forward pass each), and ``on_epoch`` receives that row of metrics. Reported losses are the data loss
alone (no l1 term). A loss that stops being finite ends the trial as "diverged"; ``on_epoch``
returning True ends it as "cancelled"; early stopping ends it as "succeeded" with ``stopped_epoch``.
None of these raises.

Resumable: after each epoch (its schedule step included) ``checkpoint(epoch, capture)`` may call
``capture()`` for a :class:`TrainingState` - model, optimizer, schedule, both generators' states,
best epoch and weights, early stopper - and ``resume_from=state`` goes on from there in a freshly
built trial. Resumed or not, the same config gives bitwise the same metrics (timings aside).

At the end the model holds the weights of its best-validation epoch (the one early stopping keeps,
and the one the test set and the prediction artifacts see).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from worker.training.data import Splits, make_dataset
from worker.training.losses import (
    LossFn,
    baseline_loss,
    build_loss,
    constant_predictor,
    l1_penalty,
    measure,
    model_outputs,
    penalised_weights,
    resolve_loss,
    weight_statistics,
)
from worker.training.models import build_model, fit_input_features, make_noise_generator, parameter_count
from worker.training.optim import build_optimizer
from worker.training.results import (
    CannotResume,
    DeviceUnavailable,
    EarlyStopper,
    EpochMetrics,
    TrialResult,
    divergence,
    epoch_metrics,
    final_metrics_of,
    finite_or_none,
    resolve_device,
)
from worker.training.schedules import LearningRateSchedule, build_schedule

__all__ = ["CannotResume", "DeviceUnavailable", "EarlyStopper", "EpochMetrics", "TrialResult", "resolve_device",
           "train_trial"]

if TYPE_CHECKING:
    from services.trial_config import TrialConfig

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs, labels or targets


@dataclass(frozen=True)
class TrainingState:
    """Everything a trial needs to go on after ``epoch`` exactly as if it had never stopped. Tensors
    are CPU copies; worker/training/checkpoint.py turns a state into bytes and back."""

    epoch: int  # the last epoch it includes (1-based)
    model: dict[str, torch.Tensor]
    optimizer: dict  # Optimizer.state_dict()
    schedule: dict | None  # the torch scheduler's state_dict(); None for a constant rate
    generator: torch.Tensor  # uint8 state of the init / data-order generator
    noise_generator: torch.Tensor  # uint8 state of the dropout / input-noise generator
    last: EpochMetrics  # the metrics of ``epoch``
    best: EpochMetrics | None  # the first epoch with the lowest validation loss so far
    best_weights: dict[str, torch.Tensor] | None  # the model as it was after ``best``
    stopper: dict | None  # the early stopper's counters, when early stopping is on


# ``checkpoint(epoch, capture)``: called after each epoch but the last; calls ``capture()`` when it
# wants the state (capturing copies every tensor, so it is done only when asked).
CheckpointHook = Callable[[int, Callable[[], TrainingState]], None]


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
    checkpoint: CheckpointHook | None = None,
    resume_from: TrainingState | None = None,
) -> TrialResult:
    """Train the trial that ``config`` describes; ``device`` overrides config.device (cpu, cuda, auto);
    ``csv_content`` is the stored file of a CSV data set. ``checkpoint`` is offered the state after
    each epoch; ``resume_from`` (a state of this same config) continues after its epoch."""
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
    optimizer = build_optimizer(config, model.parameters())
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
    if resume_from is not None:
        # Everything above was rebuilt exactly as at the start (data, and the init drawn from the
        # generator); now every piece of state that training moves is put back as it was.
        try:
            _restore(resume_from, model=model, optimizer=optimizer, schedule=schedule, generator=generator,
                     noise_generator=noise_generator, stopper=stopper)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            # e.g. a GPU generator's state on a CPU worker (device: auto), or another schedule
            raise CannotResume(f"the checkpoint does not fit this run ({type(exc).__name__}: {exc})") from None
        last, best, best_weights = resume_from.last, resume_from.best, resume_from.best_weights
    status, message, stopped_epoch = "succeeded", None, None
    for epoch in range((resume_from.epoch if resume_from else 0) + 1, config.epochs + 1):
        epoch_started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        batches = get_batches(x_train, y_train, batch_size=batch_size, generator=generator,
                              merge_single=merge_single)
        grad_norm = train_one_epoch(model, optimizer, loss_fn, batches, schedule=schedule,
                                    regularization=regularization)
        model.eval()
        with torch.no_grad():
            train = measure(model(x_train), y_train, loss_fn=loss_fn, loss=loss_name)
            val = measure(model(x_val), y_val, loss_fn=loss_fn, loss=loss_name)
        message = divergence(train["loss"], val["loss"], epoch)
        if message:
            status = "diverged"
            break
        metrics = epoch_metrics(epoch, train, val, lr=lr, seconds=time.perf_counter() - epoch_started,
                                grad_norm=grad_norm, weight_norm=_l2_norm(list(model.parameters())).item())
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
        if checkpoint is not None and epoch < config.epochs:  # nothing is left to resume after the last
            checkpoint(epoch, partial(
                _capture, epoch, model=model, optimizer=optimizer, schedule=schedule, generator=generator,
                noise_generator=noise_generator, last=last, best=best, best_weights=best_weights,
                stopper=stopper))

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
) -> float:
    """One optimizer step per batch; returns the L2 norm of the last step's gradient (before clipping).

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
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if per_step_schedule:
            schedule.after_step()
    if grad_norm is None:
        # The step leaves .grad as backward made it, so the last step's gradient is still there.
        grad_norm = _l2_norm([p.grad for p in params if p.grad is not None])
    return grad_norm.item()


def _copy_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _capture(epoch: int, *, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: LearningRateSchedule,
             generator: torch.Generator, noise_generator: torch.Generator, last: EpochMetrics,
             best: EpochMetrics | None, best_weights: dict[str, torch.Tensor] | None,
             stopper: EarlyStopper | None) -> TrainingState:
    # Copies, not references: the optimizer's state_dict() hands out its live tensors.
    return TrainingState(
        epoch=epoch, model=_cpu_copy(dict(model.state_dict())), optimizer=_cpu_copy(optimizer.state_dict()),
        schedule=_cpu_copy(schedule.scheduler.state_dict()) if schedule.scheduler is not None else None,
        generator=generator.get_state(), noise_generator=noise_generator.get_state(),
        last=last, best=best, best_weights=_cpu_copy(best_weights), stopper=stopper.state() if stopper else None,
    )


def _restore(state: TrainingState, *, model: nn.Module, optimizer: torch.optim.Optimizer,
             schedule: LearningRateSchedule, generator: torch.Generator, noise_generator: torch.Generator,
             stopper: EarlyStopper | None) -> None:
    if (state.schedule is None) != (schedule.scheduler is None) or (state.stopper is None) != (stopper is None):
        raise ValueError("the checkpoint was written by a trial with another schedule or early stopping")
    model.load_state_dict(state.model)  # copies onto the model's device
    optimizer.load_state_dict(state.optimizer)
    if schedule.scheduler is not None:
        schedule.scheduler.load_state_dict(state.schedule)
    # set_state on the generators themselves: the model's dropout layers hold the noise generator.
    generator.set_state(state.generator)
    noise_generator.set_state(state.noise_generator)
    if stopper is not None:
        stopper.restore(state.stopper)


def _cpu_copy(value):
    """A deep copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):  # keeps the dict's type: MultiStepLR's milestones are a Counter
        return type(value)({key: _cpu_copy(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return type(value)(_cpu_copy(item) for item in value)
    return value


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
