"""Optimizers by name, with exactly torch.optim's semantics.

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
schedules.py moves it from there.

fused=True picks torch's one-kernel-per-step implementation of the same update where torch has one
(all but RMSprop): a trial's steps are tiny, so per-step overhead, not arithmetic, sets the pace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from services.trial_config import TrialConfig

Params = Iterable[torch.Tensor]


def build_optimizer(config: TrialConfig, params: Params) -> torch.optim.Optimizer:
    """The torch optimizer that config.optimizer names, with config's lr, momentum, betas and weight_decay."""
    return _BUILDERS[config.optimizer](params, config)


def _sgd(params: Params, config: TrialConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)


def _momentum(params: Params, config: TrialConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, fused=True
    )


def _nesterov(params: Params, config: TrialConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay,
        fused=True,
    )


def _adagrad(params: Params, config: TrialConfig) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)


def _rmsprop(params: Params, config: TrialConfig) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=config.lr, weight_decay=config.weight_decay)


def _adam(params: Params, config: TrialConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, fused=True)


def _adamw(params: Params, config: TrialConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, fused=True)


_BUILDERS: dict[str, Callable[[Params, TrialConfig], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "momentum": _momentum,
    "nesterov": _nesterov,
    "adagrad": _adagrad,
    "rmsprop": _rmsprop,
    "adam": _adam,
    "adamw": _adamw,
}
