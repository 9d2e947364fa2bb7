"""The optimizers, with exactly torch.optim's semantics, and the schedules of schedules.py, stepping a
stack of trials at once.

- sgd:      plain SGD, w <- w - lr * grad (no momentum)
- momentum: SGD with momentum=config.momentum
- nesterov: SGD with Nesterov momentum (momentum=config.momentum)
- adagrad:  Adagrad
- rmsprop:  RMSprop with torch's defaults (alpha=0.99, momentum=0): config.momentum is NOT used,
            so rmsprop stays the textbook "divide by the running RMS" method
- adam:     Adam with config.betas; weight_decay is an L2 term added to the gradient (torch's coupled form)
- adamw:    AdamW with config.betas; weight_decay is decoupled. torch's own default is 0.01, ours is
            config's (0.0)

weight_decay is passed through to every optimizer unchanged. The learning rate starts at config.lr;
the schedule moves it from there.

Each parameter of the stack is one contiguous ``[rows, ...]`` tensor (a row per trial), and so are
its gradient and optimizer state. Rows whose numbers are equal at a step (lr, weight decay,
momentum, betas) and adjacent are updated by ONE call of the torch kernel that torch.optim runs with
``fused=True`` (torch._fused_sgd_ / _fused_adagrad_ / _fused_adam_ / _fused_adamw_), on those rows
of every parameter (slices of contiguous tensors, so contiguous themselves, as the kernels need).
The stack is ordered by those numbers (see :func:`row_order`), so a grid with k distinct learning
rates costs about k kernel calls per step, not one per trial. The update arithmetic is therefore
torch's own, with torch's defaults for what fitscope does not expose. Gradients are used as autograd
returns them, one tensor per parameter: no copy into one flat tensor.

Many short runs (a grid of many learning rates over small models) cost more in calls than in
arithmetic; then the rates are folded in instead: one call per run of equal numbers writes each
number's update at rate 1 into a buffer, and ``p += rate * update`` applies it at each row's rate
(two more passes over the numbers, so only where they cost less than the calls; CALL_NUMBERS).
The two ways round differently in the last bit, as any two kernels do.

rmsprop has no fused kernel; its rows get torch's single-tensor formula (square_avg = 0.99
square_avg + 0.01 g^2; p -= lr g / (sqrt(square_avg) + 1e-8)), a few multi-tensor calls per run.

A frozen row (its trial has ended) is left out of every update: its parameters and state are
never written again, so nothing is multiplied by 0 and a NaN in it cannot leak anywhere.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from worker.training.schedules import LearningRateSchedule, build_schedule, is_constant, lr_range_test_rate

if TYPE_CHECKING:
    from services.trial_config import TrialConfig

_ADAGRAD_EPS, _ADAM_EPS, _RMSPROP_ALPHA, _RMSPROP_EPS = 1e-10, 1e-8, 0.99, 1e-8
_STATE = {"sgd": (), "momentum": ("buf",), "nesterov": ("buf",), "adagrad": ("sum",),
          "rmsprop": ("square_avg",), "adam": ("m", "v"), "adamw": ("m", "v")}

Run = tuple[int, int]  # [start, end) rows
# A kernel call costs about what a pass over this many numbers does: when splitting the stack into
# runs of equal rates would cost more calls than this many numbers per extra call, the rates are
# folded into one call per run of equal numbers instead (measured on 64 x 4k and 16 x 67k stacks).
CALL_NUMBERS = 64_000


def row_numbers(config: TrialConfig) -> tuple[float, ...]:
    """The numbers besides lr that one kernel call must share: weight decay, momentum, betas."""
    return (config.weight_decay, config.momentum, *config.betas)


def row_order(configs: Sequence[TrialConfig]) -> list[int]:
    """Trial indices in stack-row order: sorted by (numbers, lr), so trials that step alike sit
    side by side and share kernel calls. Stable, so replicates (seeds) keep grid order."""
    return sorted(range(len(configs)), key=lambda i: (row_numbers(configs[i]), configs[i].lr))


class StackedOptimizer:
    """One optimizer family over the rows of ``params`` (each ``[rows, ...]``, contiguous);
    ``configs`` are the rows' trials, in row order."""

    def __init__(self, name: str, *, params: Sequence[torch.Tensor], configs: Sequence[TrialConfig]) -> None:
        self.name = name
        self.numbers = [row_numbers(config) for config in configs]
        self.steps = 0
        self.step_count = torch.zeros((), dtype=torch.float32, device=params[0].device)  # the kernels' "step"
        self._use(params, {key: [torch.zeros_like(p) for p in params] for key in _STATE[name]})

    def step(self, grads: Sequence[torch.Tensor], *, lr: Sequence[float], training: Sequence[bool]) -> None:
        """Update the training rows of the parameters in place from ``grads`` (one per parameter,
        contiguous, as autograd returns them); ``lr`` is each row's rate."""
        self.steps += 1
        self.step_count.add_(1)
        runs, rates = self._plan(lr, training)
        if not runs:
            return
        bounds, pieces = self._pieces(runs)
        grad_segments = list(zip(*[grad.tensor_split(bounds) for grad in grads], strict=True))  # per segment
        rate_segments = None if rates is None else rates.tensor_split(bounds)
        for (start, _), (segment, params, state, updates) in zip(runs, pieces, strict=True):
            weight_decay, momentum, beta1, beta2 = self.numbers[start]
            numbers = dict(weight_decay=weight_decay, momentum=momentum, betas=(beta1, beta2))
            if rate_segments is None:
                self._update(params, list(grad_segments[segment]), state, lr=lr[start], **numbers)
            else:
                self._update_at_rates(params, list(grad_segments[segment]), state, updates,
                                      rates=rate_segments[segment], **numbers)

    def state_dict(self) -> dict:
        """What a resume needs (CPU copies): the step counts and every state tensor, by kind."""
        return {"name": self.name, "steps": self.steps, "step_count": self.step_count.detach().to("cpu", copy=True),
                "state": {key: [value.detach().to("cpu", copy=True) for value in values]
                          for key, values in self.state.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Put back what :meth:`state_dict` took, onto the parameters this optimizer was built on."""
        if state["name"] != self.name or set(state["state"]) != set(self.state):
            raise ValueError(f"the checkpoint's optimizer is {state['name']!r}, not {self.name!r}")
        loaded = {key: [value.to(param.device) for value, param in zip(values, self.params, strict=True)]
                  for key, values in state["state"].items()}
        if any(value.shape != param.shape for values in loaded.values()
               for value, param in zip(values, self.params, strict=True)):
            raise ValueError("the checkpoint's optimizer state has other shapes than the model")
        self.steps = int(state["steps"])
        self.step_count.copy_(state["step_count"])
        self._use(self.params, loaded)

    def select(self, rows: torch.Tensor, kept: Sequence[int], *, params: Sequence[torch.Tensor]) -> None:
        """Keep only these rows (``rows`` as a tensor, ``kept`` as a list); ``params`` are the
        stack's parameters, already cut down to them."""
        self.numbers = [self.numbers[row] for row in kept]
        self._use(params, {key: [value[rows] for value in values] for key, values in self.state.items()})

    def _use(self, params: Sequence[torch.Tensor], state: dict[str, list[torch.Tensor]]) -> None:
        self.params, self.state = list(params), state
        self.row_numbers = sum(p[0].numel() for p in self.params)  # numbers in one row of the stack
        self._updates: list[torch.Tensor] | None = None  # each number's update, when the rates are folded in
        self._last_plan: tuple | None = None
        self._last_pieces: tuple[list[Run], list[int], list[tuple]] | None = None

    def _plan(self, lr: Sequence[float], training: Sequence[bool]) -> tuple[list[Run], torch.Tensor | None]:
        """The runs of rows that one kernel call updates, and each row's rate ``[rows, 1, 1]`` when
        the rates are folded in (else None: every run has one rate). Many short runs cost more in
        calls than folding costs in passes (see :meth:`_update_at_rates`). The plan changes only
        when a rate or a row's training does: once an epoch, mostly."""
        training = tuple(training)
        if self._last_plan is None or self._last_plan[:2] != (lr, training):
            runs = _runs(lr, self.numbers, training)
            alike = _runs([0.0] * len(lr), self.numbers, training)  # runs of equal numbers, any rate
            training_numbers = self.row_numbers * sum(end - start for start, end in alike)
            if (len(runs) - len(alike)) * CALL_NUMBERS > training_numbers:
                device = self.step_count.device
                # in the parameters' precision: a float32 rate would round a float64 surface's steps
                rates = torch.tensor(lr, dtype=self.params[0].dtype, device=device).view(-1, 1, 1)
                runs = alike
                if self._updates is None:
                    self._updates = [torch.zeros_like(p) for p in self.params]
            else:
                rates = None
            self._last_plan = (list(lr), training, runs, rates)
        return self._last_plan[2], self._last_plan[3]

    def _pieces(self, runs: list[Run]) -> tuple[list[int], list[tuple]]:
        """The row bounds that cut the stack into runs (and the frozen rows between them), and per
        run: its segment's number, its slice of every parameter, of every state tensor and of
        every update buffer."""
        if self._last_pieces is None or self._last_pieces[0] != runs or self._last_pieces[3] != (self._updates is None):
            bounds = sorted({row for run in runs for row in run} - {0, len(self.numbers)})
            segment_of = {start: segment for segment, start in enumerate([0, *bounds])}
            param_segments = [p.tensor_split(bounds) for p in self.params]
            state_segments = {key: [value.tensor_split(bounds) for value in values]
                              for key, values in self.state.items()}
            update_segments = [buffer.tensor_split(bounds) for buffer in self._updates or []]
            pieces = []
            for start, _ in runs:
                segment = segment_of[start]
                pieces.append((segment, [segments[segment] for segments in param_segments],
                               {key: [segments[segment] for segments in values]
                                for key, values in state_segments.items()},
                               [segments[segment] for segments in update_segments]))
            self._last_pieces = (runs, bounds, pieces, self._updates is None)
        return self._last_pieces[1], self._last_pieces[2]

    def _update_at_rates(self, p, g, state, updates, *, rates, weight_decay, momentum, betas) -> None:
        # One kernel call for rows at different rates: the kernel, at rate 1 and without weight
        # decay, writes each number's update into a zeroed buffer, and p += rate * update adds it
        # at the row's rate. Weight decay is applied here, as the kernel would: added to the
        # gradient (coupled), or p *= 1 - rate * weight_decay first (adamw, decoupled).
        if weight_decay and self.name != "adamw":
            torch._foreach_add_(g, p, alpha=weight_decay)
        elif weight_decay:
            torch._foreach_mul_(p, [1 - rates * weight_decay] * len(p))
        torch._foreach_zero_(updates)
        self._update(updates, g, state, lr=1.0, weight_decay=0.0, momentum=momentum, betas=betas)
        torch._foreach_addcmul_(p, updates, [rates] * len(p))

    def _update(self, p, g, state, *, lr, weight_decay, momentum, betas) -> None:
        name = self.name
        if name in ("sgd", "momentum", "nesterov"):
            torch._fused_sgd_(p, g, state["buf"] if name != "sgd" else [], weight_decay=weight_decay,
                              momentum=momentum if name != "sgd" else 0.0, lr=lr, dampening=0.0,
                              nesterov=name == "nesterov", maximize=False, is_first_step=self.steps == 1)
        elif name == "adagrad":
            torch._fused_adagrad_(p, g, state["sum"], [self.step_count] * len(p), lr=lr, lr_decay=0.0,
                                  weight_decay=weight_decay, eps=_ADAGRAD_EPS, maximize=False)
        elif name in ("adam", "adamw"):
            kernel = torch._fused_adam_ if name == "adam" else torch._fused_adamw_
            kernel(p, g, state["m"], state["v"], [], [self.step_count] * len(p), lr=lr, beta1=betas[0],
                   beta2=betas[1], weight_decay=weight_decay, eps=_ADAM_EPS, amsgrad=False, maximize=False)
        else:  # rmsprop: torch's single-tensor RMSprop (alpha 0.99, no momentum, not centered)
            if weight_decay:
                g = torch._foreach_add(g, p, alpha=weight_decay)
            square_avg = state["square_avg"]
            torch._foreach_mul_(square_avg, _RMSPROP_ALPHA)
            torch._foreach_addcmul_(square_avg, g, g, value=1 - _RMSPROP_ALPHA)
            denominator = torch._foreach_sqrt(square_avg)
            torch._foreach_add_(denominator, _RMSPROP_EPS)
            torch._foreach_addcdiv_(p, g, denominator, value=-lr)


def _runs(lr: Sequence[float], numbers: Sequence[tuple], training: Sequence[bool]) -> list[Run]:
    """Maximal [start, end) runs of adjacent training rows with equal lr and numbers."""
    runs: list[Run] = []
    start = None
    for row in range(len(lr) + 1):
        same = (start is not None and row < len(lr) and training[row]
                and lr[row] == lr[start] and numbers[row] == numbers[start])
        if same:
            continue
        if start is not None:
            runs.append((start, row))
        start = row if row < len(lr) and training[row] else None
    return runs


@dataclass
class StepRates:
    """A trial's learning rate at each step: config.lr for a constant one; torch's own scheduler, on
    a stand-in optimizer, for the other epoch-wise schedules; OneCycleLR's formula for one_cycle and
    schedules.lr_range_test_rate for lr_range_test (a whole epoch at a time, rather than a scheduler
    call per trial per step). A constant rate builds no stand-in: a process's first torch optimizer
    imports torch._dynamo (~1.5 s at every worker start), and most grids keep the default."""

    config: TrialConfig
    steps: int
    schedule: LearningRateSchedule | None = None
    holder: torch.optim.Optimizer | None = None

    def __post_init__(self) -> None:
        if self.config.schedule not in ("one_cycle", "lr_range_test") and not is_constant(self.config):
            self.holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=self.config.lr)
            self.schedule = build_schedule(self.config, self.holder, steps_per_epoch=self.steps)
            self.holder.step()  # no gradient, so no change; tells the scheduler its optimizer steps

    def epoch(self, epoch: int) -> list[float]:
        """The rate of each step of this (1-based) epoch."""
        if self.holder is not None:
            return [self.holder.param_groups[0]["lr"]] * self.steps
        if is_constant(self.config):
            return [self.config.lr] * self.steps
        if self.config.schedule == "lr_range_test":
            total, first = self.config.epochs * self.steps, (epoch - 1) * self.steps
            return [lr_range_test_rate(first + step, total_steps=total, min_lr=self.config.min_lr, lr=self.config.lr)
                    for step in range(self.steps)]
        return [self._one_cycle((epoch - 1) * self.steps + step) for step in range(self.steps)]

    def after_epoch(self, val_loss: float) -> None:
        if self.schedule is not None:
            self.schedule.after_epoch(val_loss)

    def state(self) -> dict | None:
        """The schedule's state (plain data; None for a constant rate, one_cycle and lr_range_test,
        which depend on the step alone)."""
        if self.holder is None:
            return None
        scheduler = self.schedule.scheduler
        return copy.deepcopy({"holder": self.holder.state_dict(),
                              "schedule": scheduler.state_dict() if scheduler is not None else None})

    def restore(self, state: dict | None) -> None:
        if self.holder is None and is_constant(self.config) and state is not None and state.get("schedule") is None:
            state = None  # written before constant rates had no stand-in: it holds config.lr, nothing to restore
        if (state is None) != (self.holder is None) or (
                state is not None and (state["schedule"] is None) != (self.schedule.scheduler is None)):
            raise ValueError("the checkpoint was written by a trial with another schedule")
        if state is not None:
            self.holder.load_state_dict(state["holder"])
            if state["schedule"] is not None:
                self.schedule.scheduler.load_state_dict(state["schedule"])

    def _one_cycle(self, step: int) -> float:
        # OneCycleLR.get_lr with fitscope's settings (pct_start 0.3, cos, div 25, final div 1e4).
        total = self.config.epochs * self.steps
        max_lr = self.config.lr
        initial = max_lr / 25.0
        phases = ((float(0.3 * total) - 1, initial, max_lr), (total - 1, max_lr, initial / 1e4))
        start = 0.0
        for i, (end, start_lr, end_lr) in enumerate(phases):
            if step <= end or i == len(phases) - 1:
                pct = (step - start) / (end - start)
                return end_lr + (start_lr - end_lr) / 2.0 * (math.cos(math.pi * pct) + 1)
            start = end
        raise AssertionError("unreachable")
