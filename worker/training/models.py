"""The models a trial can train: an MLP, or a single linear layer (depth 0 or model=linear).

With cross-entropy a linear model is logistic / softmax regression; with MSE it is linear regression.
Weights are initialised from an explicit ``torch.Generator`` with torch's default distribution for
``nn.Linear`` (weight and bias uniform in +-1/sqrt(fan_in)), so init never reads the global RNG
(layers are built on the meta device, so not even nn.Linear's own init touches it).

An MLP's hidden layer is Linear -> norm (batch or layer, optional) -> activation -> dropout
(optional). Dropout draws its masks from its own generator (the trial's noise generator), never
from torch's global RNG, so a run is reproducible and independent of anything else in the process.

Regression with poly_degree d > 1 first expands the (standardised) inputs into every monomial of
degree 1..d: x, x^2, ..., x^d for one feature; for features (a, b) and d = 2: a, b, a^2, ab, b^2.
Each expanded feature is then standardised with the training set's statistics (see
:func:`fit_input_features`), so a high degree stays well conditioned.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import numpy as np
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
NORMS: dict[str, type[nn.Module]] = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}
MAX_POLYNOMIAL_FEATURES = 100_000


def build_model(
    config: TrialConfig,
    n_features: int,
    n_outputs: int,
    *,
    generator: torch.Generator | None = None,
    noise_generator: torch.Generator | None = None,
    task: str | None = None,
) -> nn.Module:
    """The configured model on the CPU, initialised from ``generator`` (default: seeded by config.seed).

    ``noise_generator`` drives dropout (default: :func:`noise_generator` on the CPU); ``task``
    overrides config.task (a CSV's task is known only from its data).
    """
    if generator is None:
        generator = torch.Generator().manual_seed(config.seed)
    layers: list[nn.Module] = []
    if (task or config.task) == "regression" and config.poly_degree > 1:
        layers.append(PolynomialFeatures(n_features, config.poly_degree))
        n_features = layers[-1].n_out
    if config.model == "linear" or config.depth == 0:
        layers.append(_linear(n_features, n_outputs))
    else:
        if config.dropout > 0 and noise_generator is None:
            noise_generator = make_noise_generator(config.seed)
        layers += _mlp_layers(n_features, n_outputs, config=config, noise_generator=noise_generator)
    model = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
    _init_linear_layers(model, generator)
    return model


def make_noise_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of a trial's training noise (dropout masks, input noise): seeded from the trial
    seed but a stream of its own, so switching dropout on does not change the init or data order."""
    mixed = int(np.random.SeedSequence([seed, 1]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(mixed)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable scalars (weights, biases and norm scales/shifts)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def fit_input_features(model: nn.Module, x_train: torch.Tensor) -> None:
    """Fit the polynomial features' standardisation on the training inputs (no-op without them)."""
    for module in model.modules():
        if isinstance(module, PolynomialFeatures):
            module.fit(x_train)


class Dropout(nn.Module):
    """Inverted dropout (as nn.Dropout) whose masks come from ``generator``, not the global RNG."""

    def __init__(self, p: float, generator: torch.Generator) -> None:
        super().__init__()
        self.p, self.generator = p, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.p
        mask = torch.empty(x.shape, device=self.generator.device).bernoulli_(keep, generator=self.generator)
        return x * mask.to(x.device) / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PolynomialFeatures(nn.Module):
    """Every monomial of the inputs of degree 1..degree, each standardised by training statistics."""

    def __init__(self, n_features: int, degree: int) -> None:
        super().__init__()
        self.degree = degree
        terms = [combo for d in range(1, degree + 1)
                 for combo in itertools.combinations_with_replacement(range(n_features), d)]
        if len(terms) > MAX_POLYNOMIAL_FEATURES:
            raise ValueError(f"poly_degree {degree} on {n_features} features makes {len(terms)} input features "
                             f"(more than {MAX_POLYNOMIAL_FEATURES}); use a lower poly_degree")
        self.n_out = len(terms)
        # Terms grouped by degree: one gather and product per degree.
        for d in range(1, degree + 1):
            index = torch.tensor([t for t in terms if len(t) == d], dtype=torch.int64)
            self.register_buffer(f"index_{d}", index, persistent=False)
        self.register_buffer("mean", torch.zeros(self.n_out))
        self.register_buffer("std", torch.ones(self.n_out))

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x[:, getattr(self, f"index_{d}")].prod(dim=2) for d in range(1, self.degree + 1)]
        return torch.cat(parts, dim=1)

    def fit(self, x_train: torch.Tensor) -> None:
        raw = self.expand(x_train.to(self.mean.device))
        std = raw.std(dim=0, unbiased=False)
        self.mean.copy_(raw.mean(dim=0))
        self.std.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.expand(x) - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"degree={self.degree}, out_features={self.n_out}"


def _mlp_layers(
    n_features: int, n_outputs: int, *, config: TrialConfig, noise_generator: torch.Generator | None
) -> list[nn.Module]:
    activation = ACTIVATIONS[config.activation]
    layers: list[nn.Module] = []
    fan_in = n_features
    for _ in range(config.depth):
        layers.append(_linear(fan_in, config.width))
        if config.norm != "none":
            layers.append(NORMS[config.norm](config.width))
        layers.append(activation())
        if config.dropout > 0:
            layers.append(Dropout(config.dropout, noise_generator))
        fan_in = config.width
    layers.append(_linear(fan_in, n_outputs))
    return layers


def _linear(in_features: int, out_features: int) -> nn.Linear:
    # Built on the meta device: nn.Linear's own init would draw from (and advance) the global RNG.
    # Its weights are then allocated empty and filled by _init_linear_layers from the trial's generator.
    return nn.Linear(in_features, out_features, device="meta").to_empty(device="cpu")


@torch.no_grad()
def _init_linear_layers(model: nn.Module, generator: torch.Generator) -> None:
    # Same distribution as nn.Linear.reset_parameters (kaiming_uniform with a=sqrt(5)), seeded.
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
