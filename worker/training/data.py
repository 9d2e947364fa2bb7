"""The built-in data sets, drawn with numpy from ``config.data_seed`` alone.

Every replicate of a trial (same data_seed, different seed) sees the very same data. Each split
(train, val, test) has its own random stream, and within a split the point positions and the noise
have separate streams too, so:

- a split never depends on another split's size (growing n_train keeps the validation set), and
- a larger split starts with the points of a smaller one (n_train=400 contains n_train=200).

Labels cycle 0, 1, ..., n_classes-1, 0, ... so classes are balanced; training shuffles anyway.
``noise`` is the standard deviation of Gaussian noise added to the inputs (classification) or to
the target (sine). Features are standardised with the training split's mean and std only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from services.trial_config import TrialConfig

_CIRCLES_INNER_RADIUS = 0.5  # sklearn's make_circles(factor=0.5): outer radius 1, inner 0.5
_BLOBS_RADIUS = 1.0  # blob centres sit evenly on a circle of this radius; `noise` is their spread
_SPIRAL_TURNS = 1.0  # each arm turns this many times while its radius grows from 0 to 1


@dataclass(frozen=True)
class Splits:
    """One data set, split and standardised, as float32 tensors on the CPU.

    Labels are int64 class indices (classification); targets are float32 shaped [N, 1] (regression).
    ``feature_mean`` and ``feature_std`` map raw inputs into the model's space: (x - mean) / std.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_features: int
    n_outputs: int
    task: str  # "classification" | "regression"
    feature_mean: torch.Tensor
    feature_std: torch.Tensor


def make_dataset(config: TrialConfig) -> Splits:
    """Draw the configured data set and split it into train / val / test (sizes from the config)."""
    split_seeds = np.random.SeedSequence(config.data_seed).spawn(3)
    sizes = (config.n_train, config.n_val, config.n_test)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        _draw_split(config, n=n, seed=seed) for n, seed in zip(sizes, split_seeds, strict=True)
    )
    mean, std = standardisation_stats(x_train)
    x_train, x_val, x_test = ((x - mean) / std for x in (x_train, x_val, x_test))

    regression = config.task == "regression"
    return Splits(
        x_train=_features(x_train), y_train=_targets(y_train, regression=regression),
        x_val=_features(x_val), y_val=_targets(y_val, regression=regression),
        x_test=_features(x_test), y_test=_targets(y_test, regression=regression),
        n_features=x_train.shape[1],
        n_outputs=1 if regression else _n_classes(config),
        task=config.task,
        feature_mean=_features(mean), feature_std=_features(std),
    )


def standardisation_stats(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and (population) std of the training inputs; a constant feature gets std 1."""
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    return mean, np.where(std > 0, std, 1.0)


def _draw_split(
    config: TrialConfig, *, n: int, seed: np.random.SeedSequence
) -> tuple[np.ndarray, np.ndarray]:
    position_rng, noise_rng = (np.random.default_rng(s) for s in seed.spawn(2))
    if config.dataset == "sine":
        x = position_rng.uniform(-1.0, 1.0, size=(n, 1))
        y = np.sin(2 * np.pi * x) + config.noise * noise_rng.standard_normal((n, 1))
        return x, y
    labels = np.arange(n) % _n_classes(config)
    x = _CLEAN_POINTS[config.dataset](labels, n_classes=_n_classes(config), rng=position_rng)
    return x + config.noise * noise_rng.standard_normal(x.shape), labels


def _moons(labels: np.ndarray, *, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    # sklearn's make_moons: an upper half circle and a lower one shifted right and down.
    t = rng.uniform(0.0, np.pi, size=len(labels))
    upper = np.stack([np.cos(t), np.sin(t)], axis=1)
    lower = np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], axis=1)
    return np.where(labels[:, None] == 0, upper, lower)


def _circles(labels: np.ndarray, *, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    t = rng.uniform(0.0, 2 * np.pi, size=len(labels))
    radius = np.where(labels == 0, 1.0, _CIRCLES_INNER_RADIUS)
    return radius[:, None] * np.stack([np.cos(t), np.sin(t)], axis=1)


def _blobs(labels: np.ndarray, *, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    # The clean point is the blob's centre; the added input noise is the blob's spread.
    angle = 2 * np.pi * labels / n_classes
    return _BLOBS_RADIUS * np.stack([np.cos(angle), np.sin(angle)], axis=1)


def _spirals(labels: np.ndarray, *, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    radius = rng.uniform(0.0, 1.0, size=len(labels))
    angle = 2 * np.pi * (labels / n_classes + _SPIRAL_TURNS * radius)
    return radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)


_CLEAN_POINTS = {"moons": _moons, "circles": _circles, "blobs": _blobs, "spirals": _spirals}


def _n_classes(config: TrialConfig) -> int:
    return config.n_classes if config.dataset in ("blobs", "spirals") else 2


def _features(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _targets(y: np.ndarray, *, regression: bool) -> torch.Tensor:
    if regression:
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32).reshape(-1, 1))
    return torch.from_numpy(y.astype(np.int64))
