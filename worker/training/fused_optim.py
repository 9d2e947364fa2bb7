"""The optimizers of worker/training/optim.py, stepping a stack of trials at once.

Every trial's parameters are one row of a ``[rows, parameters]`` tensor (and so are its gradient
and optimizer state). Rows whose numbers are equal at a step (lr, weight decay, momentum, betas)
and adjacent are updated by ONE call of the same torch kernel the one-trial path uses
(torch._fused_sgd_ / _fused_adagrad_ / _fused_adam_ / _fused_adamw_, which optim.py reaches
through ``fused=True``), on the slice of those rows. The stack is ordered by those numbers (see
:func:`row_order`), so a grid with k distinct learning rates costs about k kernel calls per step,
not one per trial, and each call makes one cache-friendly pass over its rows. The update
arithmetic is therefore torch's own, with torch's defaults for what fitscope does not expose.

rmsprop has no fused kernel; its rows get torch's single-tensor formula (square_avg = 0.99
square_avg + 0.01 g^2; p -= lr g / (sqrt(square_avg) + 1e-8)), a few element-wise calls per run.

A frozen row (its trial has ended) is left out of every update: its parameters and state are
never written again, so nothing is multiplied by 0 and a NaN in it cannot leak anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from services.trial_config import TrialConfig

_ADAGRAD_EPS, _ADAM_EPS, _RMSPROP_ALPHA, _RMSPROP_EPS = 1e-10, 1e-8, 0.99, 1e-8
_STATE = {"sgd": (), "momentum": ("buf",), "nesterov": ("buf",), "adagrad": ("sum",),
          "rmsprop": ("square_avg",), "adam": ("m", "v"), "adamw": ("m", "v")}


def row_numbers(config: TrialConfig) -> tuple[float, ...]:
    """The numbers besides lr that one kernel call must share: weight decay, momentum, betas."""
    return (config.weight_decay, config.momentum, *config.betas)


def row_order(configs: Sequence[TrialConfig]) -> list[int]:
    """Trial indices in stack-row order: sorted by (numbers, lr), so trials that step alike sit
    side by side and share kernel calls. Stable, so replicates (seeds) keep grid order."""
    return sorted(range(len(configs)), key=lambda i: (row_numbers(configs[i]), configs[i].lr))


class StackedOptimizer:
    """One optimizer family over the rows of ``flat``; ``configs`` are the rows' trials, in row order."""

    def __init__(self, name: str, *, flat: torch.Tensor, configs: Sequence[TrialConfig]) -> None:
        self.name = name
        self.numbers = [row_numbers(config) for config in configs]
        self.state = {key: torch.zeros_like(flat) for key in _STATE[name]}
        self.steps = 0
        self.step_count = torch.zeros((), dtype=torch.float32, device=flat.device)  # the fused kernels' "step"

    def step(self, flat: torch.Tensor, grad: torch.Tensor, *, lr: Sequence[float], training: Sequence[bool]) -> None:
        """Update the training rows of ``flat`` in place from ``grad``; ``lr`` is each row's rate."""
        self.steps += 1
        self.step_count.add_(1)
        for start, end in _runs(lr, self.numbers, training):
            rows = slice(start, end)
            weight_decay, momentum, beta1, beta2 = self.numbers[start]
            self._update(flat[rows], grad[rows], {key: value[rows] for key, value in self.state.items()},
                         lr=lr[start], weight_decay=weight_decay, momentum=momentum, betas=(beta1, beta2))

    def select(self, rows: torch.Tensor, kept: Sequence[int]) -> None:
        """Keep only these rows (``rows`` as a tensor, ``kept`` as a list)."""
        self.state = {key: value[rows] for key, value in self.state.items()}
        self.numbers = [self.numbers[row] for row in kept]

    def _update(self, p, g, state, *, lr, weight_decay, momentum, betas) -> None:
        name = self.name
        if name in ("sgd", "momentum", "nesterov"):
            torch._fused_sgd_([p], [g], [state["buf"]] if name != "sgd" else [], weight_decay=weight_decay,
                              momentum=momentum if name != "sgd" else 0.0, lr=lr, dampening=0.0,
                              nesterov=name == "nesterov", maximize=False, is_first_step=self.steps == 1)
        elif name == "adagrad":
            torch._fused_adagrad_([p], [g], [state["sum"]], [self.step_count], lr=lr, lr_decay=0.0,
                                  weight_decay=weight_decay, eps=_ADAGRAD_EPS, maximize=False)
        elif name in ("adam", "adamw"):
            kernel = torch._fused_adam_ if name == "adam" else torch._fused_adamw_
            kernel([p], [g], [state["m"]], [state["v"]], [], [self.step_count], lr=lr, beta1=betas[0],
                   beta2=betas[1], weight_decay=weight_decay, eps=_ADAM_EPS, amsgrad=False, maximize=False)
        else:  # rmsprop: torch's single-tensor RMSprop (alpha 0.99, no momentum, not centered)
            if weight_decay:
                g = g.add(p, alpha=weight_decay)
            square_avg = state["square_avg"]
            square_avg.mul_(_RMSPROP_ALPHA).addcmul_(g, g, value=1 - _RMSPROP_ALPHA)
            p.addcdiv_(g, square_avg.sqrt().add_(_RMSPROP_EPS), value=-lr)


def _runs(lr: Sequence[float], numbers: Sequence[tuple], training: Sequence[bool]) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of adjacent training rows with equal lr and numbers."""
    runs: list[tuple[int, int]] = []
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
