"""The built-in data sets, drawn with numpy from ``config.data_seed`` alone.

Every replicate of a trial (same data_seed, different seed) sees the very same data. Each split
(train, val, test) has its own random stream, and within a split the point positions and the noise
have separate streams too, so:

- a split never depends on another split's size (growing n_train keeps the validation set), and
- a larger split starts with the points of a smaller one (n_train=400 contains n_train=200).

Labels cycle 0, 1, ..., n_classes-1, 0, ... so classes are balanced; training shuffles anyway.
``noise`` is the standard deviation of Gaussian noise added to the inputs (classification) or to
the target (sine, polynomial, linear). Features are standardised with the training split's mean and
std only.

Regression: ``sine`` is sin(2 pi x); ``polynomial`` is a random Legendre series of degree
``true_degree`` (coefficients from data_seed), scaled so its largest |y| on [-1, 1] is 1; ``linear``
is x . w + b with ``n_features`` standard-normal inputs, w ~ N(0, 1/n_features) and b ~ N(0, 1) from
data_seed. The function itself comes from its own stream, so every split shares it.

Multi-label: ``multilabel_2d`` draws clean points uniformly in [-1, 1]^2, each with two yes/no
labels, ``inside_circle`` (the centred circle covering half the square) and ``above_line`` (y > 0.5 x
- 0.2); ``noise`` is added to the inputs as for the other 2-D sets. A CSV whose target is a list of
0/1 columns is multi-label too. Targets are then float32 0/1 [N, labels]; ``label_noise`` flips that
fraction of every label column.

Real data (digits, breast_cancer, wine from scikit-learn; users' CSVs) are permuted by data_seed and
split by val_fraction / test_fraction (class-stratified), or by a CSV's split column; training rows
are then capped to ``config.train_size``.

k-fold cross-validation (``folds: K``, ``fold: k``) re-deals a trial's training and validation rows
(the synthetic draws of n_train and n_val points, in that order; or a table's non-test rows, capped
as above, in file order): fold k validates on the k-th of K parts and trains on the others, exactly
scikit-learn's ``KFold(K, shuffle=True, random_state=data_seed)`` over those rows.

``label_noise`` flips that fraction of the training labels (exactly round(fraction * n_train) of
them) to another class, for every classification set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial

import numpy as np
import torch

from services.datasets import fraction_sizes, parse_csv
from services.trial_config import (
    MULTILABEL_2D_LABELS,
    REAL_DATASETS,
    SYNTHETIC_MULTILABEL,
    SYNTHETIC_REGRESSION,
    CsvDataset,
    TrialConfig,
)

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
    task: str  # "classification" | "regression" | "multilabel"
    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    # 1-D synthetic regression only: raw x [N, 1] (or [N]) -> noiseless y [N, 1], to draw the truth.
    truth: Callable[[np.ndarray], np.ndarray] | None = None
    class_names: tuple[str, ...] | None = None  # classification: the label of each class index
    # multilabel: each output's label name; targets are float32 0/1 [N, labels], one column per label
    label_names: tuple[str, ...] | None = None


def make_dataset(config: TrialConfig, *, csv_content: bytes | None = None) -> Splits:
    """Draw or load the configured data set and split it into train / val / test.

    ``csv_content`` is the CSV file's original (decompressed) bytes, as
    ``services.datasets.load_dataset_content`` returns them; required when ``config.dataset`` is a CSV.
    """
    streams = np.random.SeedSequence(config.data_seed).spawn(_STREAMS)
    class_names = None
    truth = None
    label_names = None
    if isinstance(config.dataset, CsvDataset):
        if csv_content is None:
            raise ValueError(f"dataset {config.dataset_name} is a CSV; pass its bytes as csv_content")
        table = parse_csv(csv_content, config.dataset)
        task, n_classes, class_names = table.task, len(table.classes) or None, table.classes or None
        if table.multilabel:
            task, n_classes, class_names, label_names = "multilabel", None, None, table.classes
        parts = _split_rows(config, table.features, table.target, split=table.split, n_classes=n_classes,
                            stream=streams[_FUNCTION])
    elif config.dataset in REAL_DATASETS:
        x, y = _load_real(config.dataset)
        task, n_classes = "classification", int(y.max()) + 1
        parts = _split_rows(config, x, y, split=None, n_classes=n_classes, stream=streams[_FUNCTION])
    elif config.dataset in SYNTHETIC_MULTILABEL:
        task, n_classes, label_names = "multilabel", None, MULTILABEL_2D_LABELS
        sizes = (config.train_size, config.n_val, config.n_test)
        parts = [_draw_multilabel_2d(config, n=n, seed=seed) for n, seed in zip(sizes, streams[:3], strict=True)]
        _deal_fold(config, parts)
    else:
        task = config.task
        n_classes = None if task == "regression" else _n_classes(config)
        function = _regression_function(config, streams[_FUNCTION]) if task == "regression" else None
        sizes = (config.train_size, config.n_val, config.n_test)
        parts = [_draw_split(config, n=n, seed=seed, function=function)
                 for n, seed in zip(sizes, streams[:3], strict=True)]
        _deal_fold(config, parts)
        if function is not None and parts[0][0].shape[1] == 1:
            truth = function
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = parts
    if n_classes is not None and config.label_noise > 0:
        y_train = flip_labels(y_train, fraction=config.label_noise, n_classes=n_classes,
                              rng=np.random.default_rng(streams[_LABEL_NOISE]))
    if label_names is not None and config.label_noise > 0:
        y_train = flip_label_columns(y_train, fraction=config.label_noise,
                                     rng=np.random.default_rng(streams[_LABEL_NOISE]))
    x_train, x_val, x_test = _fill_missing(x_train, x_val, x_test)
    mean, std = standardisation_stats(x_train)
    x_train, x_val, x_test = ((x - mean) / std for x in (x_train, x_val, x_test))

    regression = task == "regression"
    targets = _label_columns if label_names is not None else partial(_targets, regression=regression)
    return Splits(
        x_train=_features(x_train), y_train=targets(y_train),
        x_val=_features(x_val), y_val=targets(y_val),
        x_test=_features(x_test), y_test=targets(y_test),
        n_features=x_train.shape[1],
        n_outputs=1 if regression else len(label_names) if label_names is not None else n_classes,
        task=task,
        feature_mean=_features(mean), feature_std=_features(std),
        truth=truth, class_names=class_names, label_names=label_names,
    )


# Streams spawned from data_seed: 0-2 the synthetic splits (as before), then the data set's fixed
# function (polynomial coefficients, linear weights) or the real/CSV rows' permutation, then label noise.
_STREAMS = 5
_FUNCTION = 3
_LABEL_NOISE = 4


def _deal_fold(config: TrialConfig, parts: list) -> None:
    """k-fold on synthetic data: the drawn training and validation rows pooled and re-dealt for this
    trial's fold (in place); nothing without folds."""
    if config.folds is None:
        return
    x_pool, y_pool = (np.concatenate([parts[0][i], parts[1][i]]) for i in (0, 1))
    train, val = fold_rows(len(y_pool), folds=config.folds, fold=config.fold, data_seed=config.data_seed)
    parts[:2] = [(x_pool[train], y_pool[train]), (x_pool[val], y_pool[val])]


def fold_rows(n: int, *, folds: int, fold: int, data_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of fold ``fold`` (1-based) of ``folds`` over ``n`` rows: the
    fold-th split of scikit-learn's ``KFold(folds, shuffle=True, random_state=data_seed)`` (rows
    shuffled by numpy's legacy RandomState, the first n % folds parts one row longer)."""
    if n < folds:
        raise ValueError(f"folds {folds} needs at least {folds} training and validation rows, but there are {n}; "
                         "use fewer folds or more rows")
    order = np.random.RandomState(data_seed).permutation(n)
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1
    stop = int(sizes[:fold].sum())
    val = order[stop - int(sizes[fold - 1]):stop]
    keep = np.ones(n, dtype=bool)
    keep[val] = False
    return np.flatnonzero(keep), np.flatnonzero(~keep)  # both in row order, as KFold.split gives them


def standardisation_stats(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and (population) std of the training inputs; a constant feature gets std 1."""
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    return mean, np.where(std > 0, std, 1.0)


def true_function(config: TrialConfig, x_raw: np.ndarray) -> np.ndarray | None:
    """The noiseless target of a 1-D synthetic regression set at raw inputs x [N, 1] (or [N]), as
    y [N, 1]; None for every other data set (nothing to draw a curve against)."""
    if config.dataset not in SYNTHETIC_REGRESSION or (config.dataset == "linear" and config.n_features != 1):
        return None
    streams = np.random.SeedSequence(config.data_seed).spawn(_STREAMS)
    return _regression_function(config, streams[_FUNCTION])(np.asarray(x_raw, dtype=np.float64))


def flip_labels(y: np.ndarray, *, fraction: float, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``y`` with round(fraction * len(y)) labels, chosen at random, moved to another class."""
    flipped = y.copy()
    chosen = rng.choice(len(y), size=round(fraction * len(y)), replace=False)
    flipped[chosen] = (y[chosen] + rng.integers(1, n_classes, size=len(chosen))) % n_classes
    return flipped


def flip_label_columns(y: np.ndarray, *, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Multi-label: a copy of 0/1 ``y`` [N, labels] with round(fraction * N) entries of each label
    column, chosen at random per column, flipped (0 <-> 1)."""
    flipped = y.copy()
    for column in range(y.shape[1]):
        chosen = rng.choice(len(y), size=round(fraction * len(y)), replace=False)
        flipped[chosen, column] = 1 - flipped[chosen, column]
    return flipped


# multilabel_2d: clean points uniform in the square [-1, 1]^2, two yes/no labels each. The circle's
# radius makes it cover half the square (pi r^2 = 2); the line is tilted so neither label is an axis.
_MULTILABEL_RADIUS = float(np.sqrt(2 / np.pi))
_MULTILABEL_LINE = (0.5, -0.2)  # above_line: y > 0.5 x - 0.2


def multilabel_2d_labels(points: np.ndarray) -> np.ndarray:
    """The true labels of clean 2-D points [N, 2]: int64 [N, 2] (inside_circle, above_line)."""
    slope, intercept = _MULTILABEL_LINE
    inside = (points ** 2).sum(axis=1) < _MULTILABEL_RADIUS ** 2
    above = points[:, 1] > slope * points[:, 0] + intercept
    return np.stack([inside, above], axis=1).astype(np.int64)


def _draw_multilabel_2d(config: TrialConfig, *, n: int, seed: np.random.SeedSequence) -> tuple[np.ndarray, np.ndarray]:
    # Labels belong to the clean point; the input noise then blurs where it is seen (as for moons).
    position_rng, noise_rng = (np.random.default_rng(s) for s in seed.spawn(2))
    clean = position_rng.uniform(-1.0, 1.0, size=(n, 2))
    return clean + config.noise * noise_rng.standard_normal(clean.shape), multilabel_2d_labels(clean)


def _draw_split(
    config: TrialConfig, *, n: int, seed: np.random.SeedSequence,
    function: Callable[[np.ndarray], np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray]:
    position_rng, noise_rng = (np.random.default_rng(s) for s in seed.spawn(2))
    if function is not None:
        if config.dataset == "linear":
            x = position_rng.standard_normal((n, config.n_features))
        else:
            x = position_rng.uniform(-1.0, 1.0, size=(n, 1))
        return x, function(x) + config.noise * noise_rng.standard_normal((n, 1))
    labels = np.arange(n) % _n_classes(config)
    x = _CLEAN_POINTS[config.dataset](labels, n_classes=_n_classes(config), rng=position_rng)
    return x + config.noise * noise_rng.standard_normal(x.shape), labels


def _regression_function(config: TrialConfig, seed: np.random.SeedSequence) -> Callable[[np.ndarray], np.ndarray]:
    """The noiseless target of a synthetic regression set: raw x [N, F] -> y [N, 1]."""
    assert config.dataset in SYNTHETIC_REGRESSION
    rng = np.random.default_rng(seed)
    if config.dataset == "sine":
        return _sine
    if config.dataset == "polynomial":
        coefficients = rng.standard_normal(config.true_degree + 1)
        peak = np.abs(np.polynomial.legendre.legval(np.linspace(-1, 1, 2001), coefficients)).max()
        return partial(_legendre, coefficients=coefficients / peak)
    weights = rng.standard_normal(config.n_features) / np.sqrt(config.n_features)
    return partial(_linear, weights=weights, bias=float(rng.standard_normal()))


def _sine(x: np.ndarray) -> np.ndarray:
    return np.sin(2 * np.pi * np.reshape(x, (-1, 1)))


def _legendre(x: np.ndarray, *, coefficients: np.ndarray) -> np.ndarray:
    return np.polynomial.legendre.legval(np.reshape(x, (-1, 1)), coefficients)


def _linear(x: np.ndarray, *, weights: np.ndarray, bias: float) -> np.ndarray:
    return (np.reshape(x, (-1, len(weights))) @ weights + bias).reshape(-1, 1)


@cache
def _load_real(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Features (float64) and class indices of a data set shipped inside scikit-learn."""
    from sklearn import datasets  # heavy; only trials on real data pay for it

    loader = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer,
              "wine": datasets.load_wine}[name]
    x, y = loader(return_X_y=True)
    x, y = x.astype(np.float64), y.astype(np.int64)
    x.flags.writeable = y.flags.writeable = False  # cached: shared by every trial in this process
    return x, y


def _split_rows(
    config: TrialConfig, x: np.ndarray, y: np.ndarray, *, split: np.ndarray | None, n_classes: int | None,
    stream: np.random.SeedSequence,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Train/val/test rows of a table: by its split labels, else by fractions of a data_seed
    permutation (interleaved by class, so each split keeps the class shares); then cap training."""
    rng = np.random.default_rng(stream)
    if split is not None:
        train, val, test = (np.flatnonzero(split == name) for name in ("train", "val", "test"))
        train = rng.permutation(train)  # so a cap on n_train takes a random subset, not the file's first rows
    else:
        n_train, n_val, n_test = fraction_sizes(len(y), val_fraction=config.val_fraction,
                                                test_fraction=config.test_fraction)
        order = _stratified_order(len(y), labels=y if n_classes is not None else None, rng=rng)
        val, test, train = order[:n_val], order[n_val:n_val + n_test], order[n_val + n_test:]
    if config.train_size is not None:
        if config.train_size > len(train):
            raise ValueError(f"n_train {config.train_size} is more than the {len(train)} training rows of "
                             f"{config.dataset_name}; use at most {len(train)}")
        train = train[:config.train_size]
    if config.folds is not None:  # the non-test rows in file order, re-dealt by fold (scikit-learn's KFold)
        pool = np.sort(np.concatenate([train, val]))
        in_train, in_val = fold_rows(len(pool), folds=config.folds, fold=config.fold, data_seed=config.data_seed)
        train, val = pool[in_train], pool[in_val]
    return [(x[rows], y[rows]) for rows in (train, val, test)]


def _stratified_order(n: int, *, labels: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """A random order of n rows; with class ``labels``, interleaved so that every prefix holds each
    class in about its overall share (a stratified split with exact split sizes)."""
    order = rng.permutation(n)
    if labels is None:
        return order
    position = np.empty(n)
    for label in np.unique(labels):
        rows = order[labels[order] == label]
        position[rows] = (np.arange(len(rows)) + 0.5) / len(rows)  # where in its class each row falls
    return order[np.argsort(position[order], kind="stable")]


def _fill_missing(*splits: np.ndarray) -> tuple[np.ndarray, ...]:
    """CSV with missing: mean: NaN feature cells become the training mean of their column."""
    if not any(np.isnan(x).any() for x in splits):
        return splits
    present = ~np.isnan(splits[0])
    counts = present.sum(axis=0)
    sums = np.where(present, splits[0], 0.0).sum(axis=0)
    fill = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)  # a column empty in training: 0
    return tuple(np.where(np.isnan(x), fill, x) for x in splits)


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


def _label_columns(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))


def _targets(y: np.ndarray, *, regression: bool) -> torch.Tensor:
    if regression:
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32).reshape(-1, 1))
    return torch.from_numpy(y.astype(np.int64))
