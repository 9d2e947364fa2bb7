"""Admission control: a trial's peak memory, estimated from its config before it is accepted.

The estimate (bytes above a warmed-up training process, float32 as the engine trains) adds:

- data: every split generated in float64, then kept as float32 tensors (inputs and targets);
- polynomial features: their count is C(n + d, d) - 1 for n inputs and degree d, computed without
  enumerating a single term (a spec of 1000 features at degree 10 is refused in microseconds);
  the expanded batch, and the largest split expanded at once for evaluation with its gather buffer;
- weights: the parameters, their gradients, the optimizer's state (two buffers for Adam) and the
  scratch of its update, the best epoch's copy and a checkpoint's copy;
- activations: each hidden layer's output, normalisation, activation and dropout mask for one
  batch, kept for the backward pass, or the largest split's forward pass at evaluation (no
  gradients, two layers alive at a time), whichever is larger.

tests/unit/test_admission.py checks it against the peak resident memory measured while real trials
train: within a factor of two.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from services.trial_config import REAL_DATASETS, TrialConfig

FLOAT32, FLOAT64, INT64 = 4, 8, 8
MAX_POLYNOMIAL_FEATURES = 100_000  # the engine's cap (worker/training/models.py)
_REAL_SHAPES = {"digits": (1797, 64, 10), "breast_cancer": (569, 30, 2), "wine": (178, 13, 3)}
_BUILTIN_INPUTS = {"moons": 2, "circles": 2, "blobs": 2, "spirals": 2, "multilabel_2d": 2, "sine": 1, "polynomial": 1}
_OPTIMIZER_STATES = {"sgd": 0, "momentum": 1, "nesterov": 1, "adagrad": 1, "rmsprop": 1, "adam": 2, "adamw": 2}


@dataclass(frozen=True)
class Estimate:
    """A trial's estimated peak memory, in bytes, by part."""

    data: int
    polynomial: int
    weights: int
    activations: int

    @property
    def total(self) -> int:
        return self.data + self.polynomial + self.weights + self.activations

    @property
    def total_mb(self) -> float:
        return self.total / 2**20


def polynomial_feature_count(n_features: int, degree: int) -> int:
    """Monomials of degree 1..degree in n_features inputs, without enumerating them."""
    return math.comb(n_features + degree, degree) - 1 if degree > 1 else n_features


def _shape(config: TrialConfig, csv_shape: tuple[int, int] | None) -> tuple[int, int, int, int, int]:
    """(train rows, val rows, test rows, inputs, outputs) as the engine will build them."""
    if isinstance(config.dataset, str) and config.dataset in REAL_DATASETS:
        rows, inputs, outputs = _REAL_SHAPES[config.dataset]
        n_val, n_test = int(rows * config.val_fraction), int(rows * config.test_fraction)
        return config.n_train or rows - n_val - n_test, n_val, n_test, inputs, outputs
    if isinstance(config.dataset, str):
        inputs = config.n_features if config.dataset == "linear" else _BUILTIN_INPUTS[config.dataset]
        outputs = 1 if config.task == "regression" else config._builtin_classes or 2  # multilabel_2d: 2 labels
        return config.train_size, config.n_val, config.n_test, inputs, outputs
    rows, inputs = csv_shape or (0, 1)
    n_val, n_test = int(rows * config.val_fraction), int(rows * config.test_fraction)
    return config.n_train or rows - n_val - n_test, n_val, n_test, inputs, 20  # at most 20 classes


def estimate_trial(config: TrialConfig, *, csv_shape: tuple[int, int] | None = None) -> Estimate:
    """The peak memory one trial of ``config`` needs; ``csv_shape`` is (rows, feature columns) of its
    CSV data set."""
    if config.is_surface:  # a point (float64), its gradient, optimizer state and its path of epochs + 1 points
        return Estimate(data=0, polynomial=0, weights=2 * FLOAT64 * 8, activations=2 * FLOAT64 * (config.epochs + 1))
    n_train, n_val, n_test, inputs, outputs = _shape(config, csv_shape)
    rows, largest_split = n_train + n_val + n_test, max(n_train, n_val, n_test)
    batch = n_train if config.batch_size == "full" else min(config.batch_size, n_train)
    data = rows * (inputs + 1) * (FLOAT64 + FLOAT32)

    polynomial = 0
    features = inputs
    if config.task != "classification" and config.poly_degree > 1:
        features = polynomial_feature_count(inputs, config.poly_degree)
        top_terms = math.comb(inputs + config.poly_degree - 1, config.poly_degree)  # the largest degree's
        index = sum(math.comb(inputs + d - 1, d) * d for d in range(1, config.poly_degree + 1)) * INT64
        expanded = features * 2 + top_terms * config.poly_degree  # gather, product, concatenation
        polynomial = index + max(batch * 2, largest_split) * expanded * FLOAT32

    mlp = config.model == "mlp" and config.depth > 0
    widths = [config.width] * config.depth if mlp else []
    layer_sizes = list(zip([features, *widths], [*widths, outputs], strict=True))
    parameters = sum(fan_in * fan_out + fan_out for fan_in, fan_out in layer_sizes)
    parameters += 2 * config.width * config.depth if mlp and config.norm != "none" else 0
    # Weights, gradients, the best epoch's copy, a checkpoint's copy and the norms' scratch; each
    # optimizer state twice (torch's foreach update makes a scratch copy) plus the update's temporaries.
    states = _OPTIMIZER_STATES[config.optimizer]
    weights = parameters * (5 + 2 * states + (3 if states else 0)) * FLOAT32

    per_unit = 2 + (config.norm != "none") + (config.dropout > 0)  # linear out, activation, norm, mask
    training = batch * (sum(widths) * per_unit + features + outputs) * FLOAT32
    # Without gradients a layer's input is freed once its output exists: two layers' worth at a time.
    evaluating = largest_split * (2 * max([0, *widths]) + features + outputs) * FLOAT32
    return Estimate(data=data, polynomial=polynomial, weights=weights, activations=max(training, evaluating))


def admission_problem(config: TrialConfig, *, cap_mb: int, csv_shape: tuple[int, int] | None = None) -> str | None:
    """One sentence refusing a trial over ``cap_mb`` (FITSCOPE_MAX_TRIAL_MEMORY_MB), or None. Names the
    parameters that decide its size."""
    if config.task != "classification" and config.poly_degree > 1:
        inputs = _shape(config, csv_shape)[3]
        features = polynomial_feature_count(inputs, config.poly_degree)
        if features > MAX_POLYNOMIAL_FEATURES:
            return (f"poly_degree {config.poly_degree} on {inputs} input features makes {features:.3g} polynomial "
                    f"features, over the cap of {MAX_POLYNOMIAL_FEATURES}; lower poly_degree or n_features")
    estimate = estimate_trial(config, csv_shape=csv_shape)
    if estimate.total_mb <= cap_mb:
        return None
    n_train, n_val, n_test, inputs, _ = _shape(config, csv_shape)
    return (f"a trial with width {config.width}, depth {config.depth}, batch_size {config.batch_size}, "
            f"{inputs} input features (poly_degree {config.poly_degree}) and {n_train}/{n_val}/{n_test} "
            f"train/val/test rows needs about {estimate.total_mb:,.0f} MB, over FITSCOPE_MAX_TRIAL_MEMORY_MB="
            f"{cap_mb}; make it smaller or raise the cap")


def check_admission(configs: Iterable[TrialConfig], *, cap_mb: int,
                    csv_shape_of: Callable[[TrialConfig], tuple[int, int] | None] = lambda _: None) -> list[str]:
    """The refusals of a grid: one sentence for the first trial over the cap, prefixed with its place
    in the grid (the others are usually the same parameters again). Empty when every trial fits."""
    seen: set[tuple] = set()
    for ordinal, config in enumerate(configs, start=1):
        key = (config.dataset_name, config.n_train, config.n_val, config.n_test, config.n_features,
               config.poly_degree, config.width, config.depth, config.batch_size, config.model, config.norm,
               config.dropout > 0, config.optimizer)
        if key in seen:  # the estimate depends on these only; seeds and rates repeat it
            continue
        seen.add(key)
        if problem := admission_problem(config, cap_mb=cap_mb, csv_shape=csv_shape_of(config)):
            return [f"trial {ordinal}: {problem}"]
    return []


def csv_shape(session, config: TrialConfig) -> tuple[int, int] | None:
    """(rows, feature columns) of the stored CSV data set of ``config``, or None for built-in data."""
    from services.models import Dataset

    sha256 = getattr(config.dataset, "sha256", None)
    dataset = session.get(Dataset, sha256) if sha256 else None
    if dataset is None:
        return None
    return dataset.n_rows, dataset.n_columns - 1 - (config.dataset.split_column is not None)


def claim_problem(config: TrialConfig, *, cap_mb: int | None = None,
                  csv_shape: tuple[int, int] | None = None) -> str | None:
    """Why a worker must not start this trial (over the cap, or more than this machine has free right
    now), as one sentence; None when it can hold it. Refused before anything is allocated."""
    from services.config import get_settings

    cap_mb = cap_mb if cap_mb is not None else get_settings().max_trial_memory_mb
    if problem := admission_problem(config, cap_mb=cap_mb, csv_shape=csv_shape):
        return f"this worker refuses the trial: {problem}"
    available = _available_bytes()
    needed = estimate_trial(config, csv_shape=csv_shape).total
    if available is not None and needed > available:
        return (f"this worker refuses the trial: it needs about {needed / 2**20:,.0f} MB and this machine has "
                f"{available / 2**20:,.0f} MB available; run it on a larger worker or make it smaller")
    return None


def job_estimate(configs: Iterable[TrialConfig], *, csv_shape: tuple[int, int] | None = None) -> int:
    """Bytes a job of ``configs`` trained as one stack needs: the data (and polynomial features) once,
    every trial's weights, optimizer state and activations."""
    estimates = [estimate_trial(config, csv_shape=csv_shape) for config in configs]
    shared = max((e.data + e.polynomial for e in estimates), default=0)
    return shared + sum(e.weights + e.activations for e in estimates)


def job_problem(configs: list[TrialConfig], *, csv_shape: tuple[int, int] | None = None) -> str | None:
    """Why a worker must not start this job of several trials (together more than this machine has
    free right now), as one sentence; None when it can hold them. Each trial is checked alone by
    claim_problem; the planner keeps a job within FITSCOPE_MAX_TRIAL_MEMORY_MB."""
    available = _available_bytes()
    needed = job_estimate(configs, csv_shape=csv_shape)
    if len(configs) > 1 and available is not None and needed > available:
        return (f"this worker refuses the job: its {len(configs)} trials together need about "
                f"{needed / 2**20:,.0f} MB and this machine has {available / 2**20:,.0f} MB available; run it on "
                "a larger worker, or lower FITSCOPE_FUSE_MAX_TRIALS and re-queue it")
    return None


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None
