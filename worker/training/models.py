"""The models a trial can train: an MLP, or a single linear layer (depth 0 or model=linear).

With cross-entropy a linear model is logistic / softmax regression; with MSE it is linear regression.
Weights are initialised from an explicit ``torch.Generator`` with torch's default distribution for
``nn.Linear`` (weight and bias uniform in +-1/sqrt(fan_in)), so init never reads the global RNG.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from services.trial_config import TrialConfig

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}


def build_model(
    config: TrialConfig, n_features: int, n_outputs: int, *, generator: torch.Generator | None = None
) -> nn.Module:
    """The configured model on the CPU, initialised from ``generator`` (default: seeded by config.seed)."""
    if generator is None:
        generator = torch.Generator().manual_seed(config.seed)
    if config.model == "linear" or config.depth == 0:
        model: nn.Module = nn.Linear(n_features, n_outputs)
    else:
        model = _mlp(n_features, n_outputs, width=config.width, depth=config.depth,
                     activation=ACTIVATIONS[config.activation])
    _init_linear_layers(model, generator)
    return model


def parameter_count(model: nn.Module) -> int:
    """Number of trainable scalars (weights and biases)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _mlp(
    n_features: int, n_outputs: int, *, width: int, depth: int, activation: type[nn.Module]
) -> nn.Module:
    layers: list[nn.Module] = []
    fan_in = n_features
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), activation()]
        fan_in = width
    layers.append(nn.Linear(fan_in, n_outputs))
    return nn.Sequential(*layers)


@torch.no_grad()
def _init_linear_layers(model: nn.Module, generator: torch.Generator) -> None:
    # Same distribution as nn.Linear.reset_parameters (kaiming_uniform with a=sqrt(5)), seeded.
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
