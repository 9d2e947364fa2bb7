"""The engine's stack for 2-D test functions (services/surfaces.py): each trial is a point, optimized
directly in float64, with the same optimizers (fused_optim.StackedOptimizer) and schedules
(fused_optim.StepRates over schedules.py) as a network's weights.

train_fused hands a job of surface trials here; the hooks, endings, checkpoints and results are the
same as for networks. The stack is one ``[rows, 2, 1]`` float64 tensor, its rows grouped by optimizer
family, each family's slice stepped by its own optimizer (a job may mix families and functions:
every surface trial of a grid is one job). Each epoch is exactly one step: every row's function at
its point -> one backward for all rows -> optional gradient clipping
(torch.nn.utils.clip_grad_norm_'s arithmetic, per row) -> the optimizer's step at each row's rate ->
the function at the new point. The epoch's row: ``train_loss`` is the value after the step,
``grad_norm`` the norm of the gradient the step used (before clipping), ``lr`` its rate; there is no
validation set (``val_loss`` None), so a plateau schedule watches the value itself.

A trial's path (its start and the point after each step) is kept and stored at its end as the
``path_2d`` artifact, evenly thinned to at most PATH_POINTS points, first and last always kept. Its
final metrics say where it ended (final_x, final_y, final_value) and which known minimum or saddle
point it reached (services.surfaces.reached), if any.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from services.surfaces import SURFACES, nearest_minimum, reached
from worker.training.artifacts import thin
from worker.training.checkpoint import JobState, TrialState
from worker.training.fused_optim import StackedOptimizer, StepRates, row_order
from worker.training.results import CannotResume, EpochMetrics, TrialResult, resolve_device

if TYPE_CHECKING:
    from services.trial_config import TrialConfig

PATH_POINTS = 2000  # most points of a stored path
_NO_GENERATOR = torch.zeros(0, dtype=torch.uint8)  # a surface trial draws nothing


def train_surfaces(
    configs: Sequence[TrialConfig],
    *,
    on_epoch: Callable[[dict[int, EpochMetrics]], set[int] | None],
    on_trials_end: Callable[[dict[int, TrialResult]], None],
    device: str | None = None,
    checkpoint: Callable | None = None,
    resume: JobState | None = None,
) -> list[TrialResult]:
    """train_fused for 2-D test function trials (same arguments, same hooks, same results)."""
    # A handful of numbers per kernel: one thread. Waking the pool cost ~9 ms per optimizer call on a
    # busy 2-core machine, against 5 us on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(configs, on_epoch=on_epoch, on_trials_end=on_trials_end, device=device, checkpoint=checkpoint,
                      resume=resume)
    finally:
        torch.set_num_threads(threads)


def _train(configs, *, on_epoch, on_trials_end, device, checkpoint, resume) -> list[TrialResult]:
    target = resolve_device(device or configs[0].device)
    started = time.perf_counter()
    stack = _SurfaceStack(configs, device=target)
    trials = [_Trial(index=i, config=config, rates=StepRates(config, steps=1)) for i, config in enumerate(configs)]
    results: dict[int, TrialResult] = {}
    if resume is not None:
        _resume(resume, configs=configs, stack=stack, trials=trials, results=results)
    set_up_s = time.perf_counter() - started
    last_epoch = max(config.epochs for config in configs)

    for epoch in range((resume.epoch if resume else 0) + 1, last_epoch + 1):
        epoch_started = time.perf_counter()
        running = [trial for trial in trials if trial.status == "running"]
        rates = [trial.rates.epoch(epoch)[0] for trial in trials]
        grad_norms, values = stack.step(rates, epoch=epoch)
        share = (time.perf_counter() - epoch_started) / max(1, len(running))
        rows: dict[int, EpochMetrics] = {}
        for trial in running:
            trial.seconds += share
            value = values[trial.index]
            if not (math.isfinite(value) and stack.finite(trial.index)):
                trial.end(stack, status="diverged", message=f"the point left every finite number at step {epoch}")
                continue
            metrics = EpochMetrics(epoch=epoch, train_loss=value, val_loss=None, train_accuracy=None,
                                   val_accuracy=None, lr=rates[trial.index], epoch_seconds=share,
                                   grad_norm=grad_norms[trial.index])
            trial.last, trial.epochs_run = metrics, trial.epochs_run + 1
            if trial.best is None or value < trial.best.train_loss:
                trial.best = metrics
            rows[trial.index] = metrics
        asked_to_stop = (on_epoch(rows) if rows else None) or set()
        for index, metrics in rows.items():
            trial = trials[index]
            if index in asked_to_stop:
                trial.end(stack, status="cancelled", message=f"cancelled after epoch {epoch}")
            elif epoch == trial.config.epochs:
                trial.end(stack, status="succeeded")
            else:
                trial.rates.after_epoch(metrics.train_loss)  # plateau: the value is all there is to watch
        ended = [trial for trial in trials if trial.status != "running" and trial.index not in results]
        if ended:
            for trial in ended:
                results[trial.index] = trial.result(stack, set_up_s=set_up_s / len(configs))
            on_trials_end({trial.index: results[trial.index] for trial in ended})
        if not any(trial.status == "running" for trial in trials):
            break
        if checkpoint is not None and epoch < last_epoch:
            checkpoint(epoch, lambda epoch=epoch: JobState(
                epoch=epoch, configs=[config.model_dump_json() for config in configs], stack=stack.state(),
                trials=[trial.state() for trial in trials], results=dict(results)))
    return [results[index] for index in range(len(configs))]


class _SurfaceStack:
    """Every trial's point as one float64 ``[rows, 2, 1]`` leaf, its rows grouped by optimizer family
    (each family's optimizer steps its contiguous slice of rows), and every trial's path."""

    def __init__(self, configs: Sequence[TrialConfig], *, device: torch.device) -> None:
        self.configs = list(configs)
        order = row_order(configs)  # rows that step alike side by side, as in a network stack
        names = list(dict.fromkeys(configs[i].optimizer for i in order))
        self.slots = [i for name in names for i in order if configs[i].optimizer == name]  # row -> trial
        self.row_of = {slot: row for row, slot in enumerate(self.slots)}
        self.points = torch.tensor([[[v] for v in configs[i].resolved_start] for i in self.slots],
                                   dtype=torch.float64, device=device).requires_grad_()
        self.training = [True] * len(self.slots)
        self.families: list[_Family] = []
        start = 0
        for name in names:
            end = start + sum(configs[i].optimizer == name for i in order)
            rows = self.points.detach()[start:end]  # a contiguous slice: the optimizer writes the leaf's rows
            self.families.append(_Family(name, start, end, StackedOptimizer(
                name, params=[rows], configs=[configs[i] for i in self.slots[start:end]])))
            start = end
        # path[trial, epoch]: the point after that epoch (the start at 0), on the CPU; NaN past its end
        self.path = torch.full((len(configs), max(c.epochs for c in configs) + 1, 2), math.nan, dtype=torch.float64)
        self.path[:, 0] = torch.tensor([c.resolved_start for c in configs], dtype=torch.float64)
        self.length = [1] * len(configs)  # points of each trial's path so far
        self.clip = torch.tensor([configs[i].grad_clip or math.inf for i in self.slots], dtype=torch.float64,
                                 device=device).view(-1, 1, 1)
        self.any_clip = any(c.grad_clip is not None for c in configs)
        functions = list(dict.fromkeys(configs[i].dataset for i in self.slots))
        self._groups = [(name, torch.tensor([row for row, i in enumerate(self.slots) if configs[i].dataset == name],
                                            device=device)) for name in functions]

    def _values(self, points: torch.Tensor) -> torch.Tensor:
        """Each row's own function at its point: ``[rows]`` from ``points`` ``[rows, 2, 1]``."""
        if len(self._groups) == 1:
            return SURFACES[self._groups[0][0]].value(points[:, 0, 0], points[:, 1, 0], torch.cos)
        values = torch.zeros(points.shape[0], dtype=points.dtype, device=points.device)
        for name, rows in self._groups:
            chosen = points[rows]
            values = values.index_put((rows,), SURFACES[name].value(chosen[:, 0, 0], chosen[:, 1, 0], torch.cos))
        return values

    def step(self, rates: list[float], *, epoch: int) -> tuple[list[float | None], list[float]]:
        """One optimizer step for every training row at its trial's rate; returns per trial the norm of
        the gradient the step used (before clipping) and the value at the new point."""
        # one backward for every row: each row's gradient is its own function's at its own point
        [grad] = torch.autograd.grad(self._values(self.points).sum(), [self.points])
        with torch.no_grad():
            grad = grad.contiguous()
            norm = torch.linalg.vector_norm(grad.reshape(grad.shape[0], -1), dim=1)  # [rows]
            if self.any_clip:  # clip_grad_norm_: g *= min(1, max_norm / (norm + 1e-6)); no clip: 1
                coefficient = (self.clip / (norm.view(-1, 1, 1) + 1e-6)).clamp(max=1.0)
                grad.mul_(torch.where(torch.isinf(self.clip), 1.0, coefficient))
            for family in self.families:
                family.optimizer.step([grad[family.start:family.end]],
                                      lr=[rates[slot] for slot in self.slots[family.start:family.end]],
                                      training=self.training[family.start:family.end])
            after = self._values(self.points.detach())
        count = len(self.configs)
        norms: list[float | None] = [None] * count
        values: list[float] = [math.nan] * count
        moved = [row for row, training in enumerate(self.training) if training]
        slots = [self.slots[row] for row in moved]
        self.path[slots, epoch] = self.points.detach()[moved].reshape(-1, 2).to("cpu", copy=True)
        for slot, value, row_norm in zip(slots, after[moved].tolist(), norm[moved].tolist(), strict=True):
            norms[slot], values[slot] = row_norm, value
            self.length[slot] = epoch + 1
        return norms, values

    def finite(self, slot: int) -> bool:
        return bool(torch.isfinite(self.path[slot, self.length[slot] - 1]).all())

    def freeze(self, slot: int) -> None:
        self.training[self.row_of[slot]] = False

    def state(self) -> dict:
        return {"kind": "surface", "slots": list(self.slots), "training": list(self.training),
                "points": self.points.detach().to("cpu", copy=True),
                "path": self.path[:, :max(self.length)].clone(), "length": list(self.length),
                "optimizers": [family.optimizer.state_dict() for family in self.families]}

    def restore(self, state: dict) -> None:
        if state.get("kind") != "surface" or list(state["slots"]) != self.slots:
            raise ValueError("the checkpoint is not of this job's surface trials")
        if state["path"].shape[0] != self.path.shape[0] or len(state["optimizers"]) != len(self.families):
            raise ValueError("the checkpoint's paths or optimizers are not this job's")
        with torch.no_grad():
            self.points.copy_(state["points"])
        self.training = [bool(flag) for flag in state["training"]]
        for family, saved in zip(self.families, state["optimizers"], strict=True):
            family.optimizer.load_state_dict(saved)
        self.path[:, :state["path"].shape[1]] = state["path"]
        self.length = [int(length) for length in state["length"]]


@dataclass
class _Family:
    """One optimizer family's rows [start, end) of the stack."""

    name: str
    start: int
    end: int
    optimizer: StackedOptimizer


@dataclass
class _Trial:
    index: int
    config: TrialConfig
    rates: StepRates
    last: EpochMetrics | None = None
    best: EpochMetrics | None = None  # the epoch with the lowest value
    epochs_run: int = 0
    status: str = "running"
    message: str | None = None
    seconds: float = 0.0

    def end(self, stack: _SurfaceStack, *, status: str, message: str | None = None) -> None:
        self.status, self.message = status, message
        stack.freeze(self.index)

    def result(self, stack: _SurfaceStack, *, set_up_s: float) -> TrialResult:
        points = stack.path[self.index, :stack.length[self.index]]
        path = [(x, y) for x, y in points[torch.isfinite(points).all(dim=1)].tolist()]
        name = self.config.dataset
        x, y = path[-1]
        value = self.last.train_loss if self.status != "diverged" and self.last else None
        nearest, distance = nearest_minimum(name, x, y)
        final = {
            "final_x": x, "final_y": y, "final_value": value,
            "reached": reached(name, x, y) if self.status != "diverged" else None,
            "nearest_minimum": nearest, "distance_to_minimum": distance,
            "start_x": path[0][0], "start_y": path[0][1],
            "final_train_loss": value, "best_train_loss": self.best.train_loss if self.best else None,
            "steps": self.epochs_run, "parameter_count": 2, "total_seconds": self.seconds + set_up_s,
        }
        keep = thin(len(path), PATH_POINTS)
        artifact = {"function": name, "step": keep, "x": [path[i][0] for i in keep], "y": [path[i][1] for i in keep]}
        return TrialResult(status=self.status, epochs_run=self.epochs_run,
                           best_epoch=self.best.epoch if self.best else None, final_metrics=final,
                           message=self.message, artifacts={"path_2d": artifact})

    def state(self) -> TrialState:
        return TrialState(status=self.status, message=self.message, stopped_epoch=None, epochs_run=self.epochs_run,
                          last=self.last, best=self.best, stopper=None, rates=self.rates.state(),
                          generator=_NO_GENERATOR, noise_generator=_NO_GENERATOR, seconds=self.seconds)

    def restore(self, state: TrialState) -> None:
        self.status, self.message, self.epochs_run = state.status, state.message, state.epochs_run
        self.last, self.best, self.seconds = state.last, state.best, state.seconds
        self.rates.restore(state.rates)


def _resume(state: JobState, *, configs: Sequence[TrialConfig], stack: _SurfaceStack, trials: list[_Trial],
            results: dict[int, TrialResult]) -> None:
    if state.configs != [config.model_dump_json() for config in configs]:
        raise CannotResume("the checkpoint was written by a job of other trials or other settings")
    try:
        for trial, trial_state in zip(trials, state.trials, strict=True):
            trial.restore(trial_state)
        stack.restore(state.stack)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CannotResume(f"the checkpoint does not fit this run ({type(exc).__name__}: {exc})") from None
    results.update(state.results)
