"""Learning-rate schedules by name, built on torch.optim.lr_scheduler wherever torch has the schedule.

Epoch-wise schedules move the rate between epochs, so each epoch trains at one rate (the ``lr``
metric of that epoch). ``one_cycle`` moves it after every step; its epoch's ``lr`` metric is the rate
of the epoch's first step.

- constant:      config.lr throughout
- step:          StepLR: times gamma every step_size epochs
- multistep:     MultiStepLR: times gamma at each epoch in milestones
- exponential:   ExponentialLR: times gamma after every epoch
- cosine:        CosineAnnealingLR(T_max=epochs, eta_min=min_lr): half a cosine from lr towards min_lr
- warmup_cosine: epoch e < warmup_epochs trains at lr * (e + 1) / warmup_epochs (a linear rise from
                 0), then a cosine from lr towards min_lr over the remaining epochs (LambdaLR)
- one_cycle:     OneCycleLR(max_lr=lr, total_steps=epochs * steps_per_epoch), stepped per batch;
                 cycle_momentum=False, so config.momentum and betas keep the values the user set
- plateau:       ReduceLROnPlateau(factor=gamma, patience=plateau_patience) on the validation loss;
                 gamma=1 never decays (torch refuses a factor of 1, so the rate simply stays)
- lr_range_test: the learning-rate range test (Smith 2015; fastai's lr_find): the rate rises
                 exponentially every step, from min_lr at the first step to lr at the last
                 (epochs * steps_per_epoch steps): LambdaLR, stepped per batch, the same factor each
                 step. Its epoch's ``lr`` metric is the rate of the epoch's first step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.optim import lr_scheduler

if TYPE_CHECKING:
    from services.trial_config import TrialConfig


class LearningRateSchedule:
    """Moves an optimizer's learning rate. Call ``after_step()`` after each optimizer step and
    ``after_epoch(val_loss)`` after each epoch's evaluation; ``per_step`` says whether after_step
    does anything (the loop skips the call otherwise: per-step overhead matters)."""

    def __init__(self, scheduler: lr_scheduler.LRScheduler | lr_scheduler.ReduceLROnPlateau | None = None,
                 *, per_step: bool = False) -> None:
        self.scheduler = scheduler
        self.per_step = per_step

    def after_step(self) -> None:
        if self.per_step:
            self.scheduler.step()

    def after_epoch(self, val_loss: float) -> None:
        if self.scheduler is None or self.per_step:
            return
        if isinstance(self.scheduler, lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val_loss)
        else:
            self.scheduler.step()


def build_schedule(
    config: TrialConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> LearningRateSchedule:
    """The schedule config.schedule names, driving ``optimizer`` (steps_per_epoch: batches per epoch)."""
    name = config.schedule
    if is_constant(config):
        return LearningRateSchedule()
    if name == "one_cycle":
        total_steps = config.epochs * steps_per_epoch
        return LearningRateSchedule(
            lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps, cycle_momentum=False),
            per_step=True,
        )
    if name == "lr_range_test":
        total_steps = config.epochs * steps_per_epoch

        def factor(step: int) -> float:
            return lr_range_test_rate(step, total_steps=total_steps, min_lr=config.min_lr, lr=config.lr) / config.lr

        return LearningRateSchedule(lr_scheduler.LambdaLR(optimizer, factor), per_step=True)
    return LearningRateSchedule(_EPOCH_SCHEDULERS[name](optimizer, config))


def is_constant(config: TrialConfig) -> bool:
    """Whether the trial trains at config.lr throughout: a constant schedule, or a plateau one that
    never decays (gamma 1)."""
    return config.schedule == "constant" or (config.schedule == "plateau" and config.gamma >= 1)


def lr_range_test_rate(step: int, *, total_steps: int, min_lr: float, lr: float) -> float:
    """The range test's rate at (0-based) ``step`` of ``total_steps``: min_lr times the same factor
    (lr / min_lr) ** (1 / (total_steps - 1)) per step, so min_lr at the first step and lr at the last
    (a single step trains at min_lr)."""
    fraction = step / (total_steps - 1) if total_steps > 1 else 0.0
    return min_lr * (lr / min_lr) ** fraction


def warmup_cosine_factor(epoch: int, *, warmup_epochs: int, epochs: int, lr: float, min_lr: float) -> float:
    """The multiple of lr that warmup_cosine uses in (0-based) ``epoch``."""
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    cosine_epochs = max(epochs - warmup_epochs, 1)
    floor = min_lr / lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / cosine_epochs))


def _warmup_cosine(optimizer: torch.optim.Optimizer, config: TrialConfig) -> lr_scheduler.LRScheduler:
    def factor(epoch: int) -> float:
        return warmup_cosine_factor(epoch, warmup_epochs=config.warmup_epochs, epochs=config.epochs,
                                    lr=config.lr, min_lr=config.min_lr)

    return lr_scheduler.LambdaLR(optimizer, factor)


_EPOCH_SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer, TrialConfig], object]] = {
    "step": lambda opt, c: lr_scheduler.StepLR(opt, step_size=c.step_size, gamma=c.gamma),
    "multistep": lambda opt, c: lr_scheduler.MultiStepLR(opt, milestones=list(c.milestones), gamma=c.gamma),
    "exponential": lambda opt, c: lr_scheduler.ExponentialLR(opt, gamma=c.gamma),
    "cosine": lambda opt, c: lr_scheduler.CosineAnnealingLR(opt, T_max=c.epochs, eta_min=c.min_lr),
    "warmup_cosine": _warmup_cosine,
    "plateau": lambda opt, c: lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=c.gamma, patience=c.plateau_patience),
}
