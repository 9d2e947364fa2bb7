"""The resolved configuration of one trial: every parameter a grid can vary, with its default.

This is the contract between the spec (which expands a grid into these), the worker's training
engine (which trains exactly what one of these says) and the dashboard (which groups by its fields).
Pure: no torch, no I/O. The README's parameter table documents the same fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.surfaces import SURFACE_NAMES, SURFACES, is_surface

SYNTHETIC_CLASSIFICATION = ("moons", "circles", "blobs", "spirals")
# Multi-label: each point carries several independent yes/no labels (one sigmoid output per label).
SYNTHETIC_MULTILABEL = ("multilabel_2d",)
MULTILABEL_2D_LABELS = ("inside_circle", "above_line")
MAX_LABELS = 20  # labels of one multi-label target: each is an output and a column of every chart's hover
SYNTHETIC_REGRESSION = ("sine", "polynomial", "linear")
# Small real data sets shipped inside scikit-learn (no download): rows available in each.
REAL_DATASETS = {"digits": 1797, "breast_cancer": 569, "wine": 178}
REGRESSION_DATASETS = SYNTHETIC_REGRESSION
CLASSIFICATION_DATASETS = SYNTHETIC_CLASSIFICATION + SYNTHETIC_MULTILABEL + tuple(REAL_DATASETS)
DATASETS = CLASSIFICATION_DATASETS + REGRESSION_DATASETS + SURFACE_NAMES
# What a 2-D test function does not have (it optimizes a point: no network, no data, no loss to pick):
# a spec that sets one of these for a surface is refused, naming the field.
NOT_FOR_SURFACES = ("n_train", "n_val", "n_test", "val_fraction", "test_fraction", "noise", "label_noise",
                    "n_classes", "n_features", "true_degree", "data_seed", "model", "width", "depth", "activation",
                    "norm", "dropout", "poly_degree", "loss", "huber_delta", "label_smoothing", "l1",
                    "early_stopping", "input_noise", "batch_size", "init_from", "freeze", "folds", "fold")

BuiltinDataset = Literal["moons", "circles", "blobs", "spirals", "multilabel_2d", "sine", "polynomial", "linear",
                         "digits", "breast_cancer", "wine", "himmelblau", "rosenbrock", "saddle",
                         "ill_conditioned", "six_hump_camel", "rastrigin"]
Coordinate = Annotated[float, Field(ge=-1e4, le=1e4, allow_inf_nan=False)]
Activation = Literal["relu", "leaky_relu", "tanh", "sigmoid", "gelu"]
Optimizer = Literal["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"]
Loss = Literal["auto", "cross_entropy", "bce", "mse", "mae", "huber"]
Schedule = Literal["constant", "step", "multistep", "exponential", "cosine", "warmup_cosine", "one_cycle", "plateau",
                   "lr_range_test"]
Device = Literal["cpu", "cuda", "auto"]

CLASSIFICATION_LOSSES = ("cross_entropy", "bce")
REGRESSION_LOSSES = ("mse", "mae", "huber")

Fraction = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]


class CsvDataset(BaseModel):
    """A user's CSV file: numeric feature columns plus a target column. Validated and stored in the
    database at submit (content-addressed by ``sha256``), so every worker trains on the same rows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    csv: str = Field(min_length=1, max_length=1000, description="Path of the CSV file, as given in the spec.")
    target: Annotated[str, Field(min_length=1, max_length=200)] | tuple[
        Annotated[str, Field(min_length=1, max_length=200)], ...] = Field(
        description="Column to predict; or a list of 0/1 columns, one yes/no label each (multi-label).")
    split_column: str | None = Field(
        "split", description="Column of train/val/test labels, used as given when present; None to ignore.")
    missing: Literal["error", "drop_rows", "mean"] = Field(
        "error", description="What to do with empty/NaN cells: refuse the file, drop those rows, or fill "
                             "feature columns with the training mean.")
    task: Literal["auto", "classification", "regression"] = Field(
        "auto", description="auto: classification when the target is text or has at most 20 distinct integers.")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                               description="Set at submit: the stored content's hash. Not written by users.")


class EarlyStopping(BaseModel):
    """Stop when validation loss has not improved by ``min_delta`` for ``patience`` epochs, and
    restore the weights of the best epoch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    patience: Annotated[int, Field(ge=1, le=10_000)] = 10
    min_delta: NonNegative = 0.0


class TrialConfig(BaseModel):
    """One trial, fully resolved. Field docs are the user-facing parameter reference."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- data ---
    dataset: BuiltinDataset | CsvDataset = Field(
        "moons", description="moons, circles, blobs, spirals (2-D classification); multilabel_2d (2-D, two "
                             "yes/no labels per point: inside_circle, above_line); sine, polynomial (1-D "
                             "regression), linear (multi-feature regression); digits, breast_cancer, wine "
                             "(real, from scikit-learn); or {csv: PATH, target: COLUMN or [COLUMN, ...]}; "
                             "or a 2-D test function whose point is optimized directly: himmelblau, rosenbrock, "
                             "saddle, ill_conditioned, six_hump_camel, rastrigin (each epoch is one optimizer step).")
    start: tuple[Coordinate, Coordinate] | None = Field(
        None, description="[x, y]: where a 2-D test function's point starts. Default: one per function "
                          "(himmelblau [0, 0], rosenbrock [-1.2, 1], saddle [1.5, 0.01], ill_conditioned [-4, 1], "
                          "six_hump_camel [-1.5, 1], rastrigin [2.3, 2.6]).")
    n_train: Annotated[int, Field(ge=4, le=1_000_000)] | None = Field(
        None, description="Training-set size: the lever between over- and underfitting. Default: 200 for "
                          "synthetic data, every training row for real and CSV data.")
    n_val: Annotated[int, Field(ge=4, le=1_000_000)] = Field(500, description="Validation-set size (synthetic).")
    n_test: Annotated[int, Field(ge=0, le=1_000_000)] = Field(500, description="Test-set size (synthetic).")
    val_fraction: Annotated[float, Field(gt=0, lt=0.9, allow_inf_nan=False)] = Field(
        0.2, description="Share of rows held out for validation (real and CSV data without a split column).")
    test_fraction: Annotated[float, Field(ge=0, lt=0.9, allow_inf_nan=False)] = Field(
        0.2, description="Share of rows held out for testing (real and CSV data without a split column).")
    noise: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] = Field(
        0.2, description="Standard deviation of the Gaussian noise added to the inputs (synthetic "
                         "classification) or targets (synthetic regression).")
    label_noise: Annotated[float, Field(ge=0, le=0.5, allow_inf_nan=False)] = Field(
        0.0, description="Fraction of training labels flipped to another class (classification).")
    n_classes: Annotated[int, Field(ge=2, le=20)] = Field(3, description="Classes for blobs and spirals.")
    n_features: Annotated[int, Field(ge=1, le=1000)] = Field(5, description="Input features of the linear data set.")
    true_degree: Annotated[int, Field(ge=1, le=15)] = Field(
        3, description="Degree of the true polynomial of the polynomial data set.")
    data_seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = Field(
        0, description="Seed of the data draw and split, separate from the trial seed so replicates see one "
                       "data set.")

    # --- model ---
    model: Literal["mlp", "linear"] = Field("mlp", description="mlp, or linear (logistic/softmax/linear "
                                            "regression by task).")
    width: Annotated[int, Field(ge=1, le=4096)] = Field(64, description="Units per hidden layer (mlp).")
    depth: Annotated[int, Field(ge=0, le=16)] = Field(2, description="Hidden layers (mlp); 0 is linear.")
    activation: Activation = Field(
        "relu", description="Hidden-layer activation (mlp): relu, leaky_relu, tanh, sigmoid, gelu.")
    norm: Literal["none", "batch", "layer"] = Field(
        "none", description="Normalisation after each hidden layer: none, batch, layer.")
    dropout: Fraction = Field(0.0, description="Dropout probability after each hidden activation.")
    poly_degree: Annotated[int, Field(ge=1, le=10)] = Field(
        1, description="Polynomial input features up to this degree (regression; 1 = the raw inputs).")

    # --- loss ---
    loss: Loss = Field("auto", description="auto picks cross_entropy for classification, mse for regression; "
                                           "bce needs two classes; mae and huber are for regression.")
    huber_delta: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] = Field(
        1.0, description="Where huber switches from quadratic to linear.")
    label_smoothing: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = Field(
        0.0, description="Label smoothing of cross_entropy.")

    # --- regularization ---
    weight_decay: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] = Field(
        0.0, description="L2 penalty with torch's meaning for the optimizer (decoupled under adamw).")
    l1: NonNegative = Field(0.0, description="L1 penalty on the weights (not biases), added to the loss.")
    early_stopping: EarlyStopping | None = Field(
        None, description="{patience, min_delta}: stop when validation loss stalls; restore the best weights.")
    input_noise: NonNegative = Field(0.0, description="Std of Gaussian noise added to training inputs per step.")
    grad_clip: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] | None = Field(
        None, description="Clip the gradient's total L2 norm to this value.")

    # --- optimisation ---
    optimizer: Optimizer = Field("adam", description="sgd, momentum, nesterov, adagrad, rmsprop, adam, adamw with "
                                 "torch.optim semantics; momentum = SGD with momentum, nesterov = SGD with Nesterov "
                                 "momentum.")
    lr: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = Field(0.01, description="Learning rate.")
    momentum: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = Field(
        0.9, description="Momentum of the momentum and nesterov optimizers (SGD).")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="Adam/AdamW coefficients of the running averages.")
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)] | Literal["full"] = Field(
        32, description="Mini-batch size, or full for full-batch gradient descent.")
    epochs: Annotated[int, Field(ge=1, le=10_000)] = Field(20, description="Passes over the training set.")

    # --- learning-rate schedule ---
    schedule: Schedule = Field("constant", description="How the learning rate moves: constant, step, multistep, "
                                 "exponential, cosine, warmup_cosine, one_cycle (peaks at lr), plateau, "
                                 "lr_range_test (rises exponentially every step from min_lr to lr: the "
                                 "learning-rate range test).")
    step_size: Annotated[int, Field(ge=1, le=10_000)] = Field(10, description="step: epochs between decays.")
    milestones: tuple[Annotated[int, Field(ge=1, le=10_000)], ...] = Field(
        (30, 60), max_length=100, description="multistep: epochs at which the rate decays.")
    gamma: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = Field(
        0.5, description="Decay factor of step, multistep, exponential (per epoch) and plateau.")
    warmup_epochs: Annotated[int, Field(ge=0, le=10_000)] = Field(
        5, description="warmup_cosine: epochs of linear warm-up from 0.")
    min_lr: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] = Field(
        0.0, description="cosine, warmup_cosine: the floor of the rate; lr_range_test: the first step's rate "
        "(above 0, below lr). Ignored by the other schedules.")
    plateau_patience: Annotated[int, Field(ge=1, le=10_000)] = Field(
        5, description="plateau: epochs without validation improvement before decaying by gamma.")

    # --- fine-tuning (services/fine_tuning.py) ---
    init_from: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = Field(
        None, description="Start from the best-epoch weights of this finished trial (its id, in the same "
                          "database): its whole network when the shapes match, else its leading layers of the "
                          "same shapes. The data and every training parameter may differ from the parent's.")
    freeze: Annotated[int, Field(ge=0, le=17)] = Field(
        0, description="Keep the first N linear layers fixed (never updated, weight decay included), with "
                       "the scale and shift of the norm layer after each; at most depth + 1 (every layer).")

    # --- cross-validation (set through the spec's folds: K) ---
    folds: Annotated[int, Field(ge=2, le=20)] | None = Field(
        None, description="k-fold cross-validation: the trial's training and validation rows are cut into this "
                          "many parts (shuffled by data_seed, scikit-learn's KFold); set by the spec's folds: K.")
    fold: Annotated[int, Field(ge=1, le=20)] | None = Field(
        None, description="Which part (1..folds) validates; the others train. Set by the spec's folds: K.")

    # --- execution ---
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = Field(
        0, description="Trial seed (weights, data order, dropout); set through the spec's seeds axis.")
    device: Device = Field("cpu", description="cpu, cuda (gpu queue), or auto (a GPU when the worker has one).")

    @model_validator(mode="after")
    def _check_combination(self) -> TrialConfig:
        if self.is_surface:
            # Fields the spec named are refused by the spec (services.spec); here, values that differ
            # from the default (a config built in Python, or stored by hand).
            changed = [name for name in NOT_FOR_SURFACES
                       if getattr(self, name) != TrialConfig.model_fields[name].default]
            if changed:
                raise ValueError(surface_refusal(changed[0], self.dataset))
            if self.schedule == "lr_range_test":  # a range test charts batch losses; a surface has one value
                raise ValueError(f"schedule lr_range_test does not apply to dataset {self.dataset}, a 2-D test "
                                 "function (its one value per step is already on the Loss surfaces page); "
                                 "use another schedule")
            return self
        if self.start is not None:
            raise ValueError(f"start applies to the 2-D test functions ({', '.join(SURFACE_NAMES)}) only, and "
                             f"{self.dataset_name} is a data set; remove start")
        if self.loss != "auto" and self.task != "auto":
            allowed = REGRESSION_LOSSES if self.task == "regression" else CLASSIFICATION_LOSSES
            if self.loss not in allowed:
                raise ValueError(
                    f"loss {self.loss!r} does not fit dataset {self.dataset_name!r} ({self.task}); "
                    f"use one of {', '.join(allowed)} or auto"
                )
        if self.loss == "bce" and isinstance(self.dataset, str) and self._builtin_classes not in (None, 2):
            raise ValueError(f"loss 'bce' needs two classes but {self.dataset} has {self._builtin_classes}; "
                             "use cross_entropy")
        if self.dataset in REAL_DATASETS and self.n_train is not None:
            available = int(REAL_DATASETS[self.dataset] * (1 - self.val_fraction - self.test_fraction))
            if self.n_train > available:
                raise ValueError(f"n_train {self.n_train} is more than the {available} training rows of "
                                 f"{self.dataset} (after val_fraction and test_fraction); use at most {available}")
        if self.multilabel and self.loss not in ("auto", "bce"):
            raise ValueError(f"loss {self.loss!r} does not fit the multi-label data of {self.dataset_name} (one "
                             "yes/no label per output); use loss bce or auto")
        if self.multilabel and self.label_smoothing > 0:
            raise ValueError(f"label_smoothing {self.label_smoothing:g} applies to cross_entropy, and the multi-label "
                             f"data of {self.dataset_name} train with bce per label; leave label_smoothing at 0")
        if self.poly_degree > 1 and self.task == "classification":
            raise ValueError(f"poly_degree {self.poly_degree} applies to regression only and "
                             f"{self.dataset_name} is classification; leave poly_degree at 1")
        if len(set(self.milestones)) != len(self.milestones):  # multistep would decay twice at that epoch
            repeated = next(epoch for epoch in self.milestones if self.milestones.count(epoch) > 1)
            raise ValueError(f"milestones lists epoch {repeated} more than once, which would decay the rate twice "
                             "there; list each epoch once")
        if self.schedule == "lr_range_test" and not 0 < self.min_lr < self.lr:
            raise ValueError(f"min_lr {self.min_lr:g} must be above 0 and below lr {self.lr:g} for schedule "
                             f"lr_range_test, which raises the rate from min_lr to lr; set e.g. min_lr: "
                             f"{self.lr / 1e4:g}")
        if (self.folds is None) != (self.fold is None) or (self.folds is not None and self.fold > self.folds):
            raise ValueError("fold and folds go together, fold from 1 to folds; set folds: K at the top of the "
                             "spec and leave fold to it")
        if self.folds is not None and isinstance(self.dataset, str) and self.dataset not in REAL_DATASETS:
            pool = self.train_size + self.n_val
            if pool < 2 * self.folds:
                raise ValueError(f"folds {self.folds} needs at least {2 * self.folds} training and validation rows "
                                 f"but n_train + n_val is {pool}; use fewer folds or more rows")
        if self.freeze > self.linear_layers:
            raise ValueError(f"freeze {self.freeze} is more than the {self.linear_layers} linear layers of this "
                             f"model (depth + 1); use at most {self.linear_layers}")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% of the rows for training")
        return self

    @property
    def is_surface(self) -> bool:
        """Whether this trial optimizes a 2-D test function's point instead of training a network."""
        return is_surface(self.dataset)

    @property
    def resolved_start(self) -> tuple[float, float]:
        """A surface trial's start: ``start``, or its function's default."""
        return self.start if self.start is not None else SURFACES[self.dataset].start

    @property
    def train_size(self) -> int | None:
        """Training rows to use: n_train, or 200 for synthetic data; None = every available row."""
        if self.n_train is not None:
            return self.n_train
        return 200 if self.dataset in SYNTHETIC_CLASSIFICATION + SYNTHETIC_MULTILABEL + SYNTHETIC_REGRESSION else None

    @property
    def linear_layers(self) -> int:
        """How many linear layers the model has: depth + 1 for an mlp, 1 for a linear model."""
        return 1 if self.model == "linear" else self.depth + 1

    @property
    def dataset_name(self) -> str:
        return self.dataset if isinstance(self.dataset, str) else f"csv:{self.dataset.csv}"

    @property
    def task(self) -> Literal["classification", "regression", "auto"]:
        """The task; "auto" only for a CSV whose task is decided from its target column."""
        if isinstance(self.dataset, CsvDataset):
            return self.dataset.task
        return "regression" if self.dataset in REGRESSION_DATASETS else "classification"

    @property
    def multilabel(self) -> bool:
        """Several yes/no labels per example (a CSV target list, or multilabel_2d): a classification
        task trained with one sigmoid output and binary cross-entropy per label."""
        if isinstance(self.dataset, CsvDataset):
            return isinstance(self.dataset.target, tuple)
        return self.dataset in SYNTHETIC_MULTILABEL

    @property
    def _builtin_classes(self) -> int | None:
        return {"moons": 2, "circles": 2, "breast_cancer": 2, "wine": 3, "digits": 10,
                "blobs": self.n_classes, "spirals": self.n_classes}.get(self.dataset) if isinstance(
            self.dataset, str) else None

    @property
    def resolved_loss(self) -> str:
        if self.loss != "auto":
            return self.loss
        if self.multilabel:
            return "bce"
        return "mse" if self.task == "regression" else "cross_entropy"

    @property
    def queue(self) -> str:
        """The Celery queue this trial goes to: cuda trials need a GPU worker."""
        return "gpu" if self.device == "cuda" else "cpu"


TRIAL_PARAMETERS: tuple[str, ...] = tuple(TrialConfig.model_fields)


def surface_refusal(field: str, dataset: str) -> str:
    """The sentence that refuses ``field`` on the 2-D test function ``dataset``."""
    return (f"{field} does not apply to dataset {dataset}, a 2-D test function whose point is optimized "
            f"directly (no network, no data); remove {field}")


def parameter_reference() -> list[dict[str, Any]]:
    """Name, default and description of every trial parameter (for the README and the dashboard)."""
    return [
        {"name": name, "default": field.default, "description": field.description or ""}
        for name, field in TrialConfig.model_fields.items()
    ]
