"""The resolved configuration of one trial: every parameter a grid can vary, with its default.

This is the contract between the spec (which expands a grid into these), the worker's training
engine (which trains exactly what one of these says) and the dashboard (which groups by its fields).
Pure: no torch, no I/O. The README's parameter table documents the same fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SYNTHETIC_CLASSIFICATION = ("moons", "circles", "blobs", "spirals")
SYNTHETIC_REGRESSION = ("sine", "polynomial", "linear")
# Small real data sets shipped inside scikit-learn (no download): rows available in each.
REAL_DATASETS = {"digits": 1797, "breast_cancer": 569, "wine": 178}
REGRESSION_DATASETS = SYNTHETIC_REGRESSION
CLASSIFICATION_DATASETS = SYNTHETIC_CLASSIFICATION + tuple(REAL_DATASETS)
DATASETS = CLASSIFICATION_DATASETS + REGRESSION_DATASETS

BuiltinDataset = Literal["moons", "circles", "blobs", "spirals", "sine", "polynomial", "linear",
                         "digits", "breast_cancer", "wine"]
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
    target: str = Field(min_length=1, max_length=200, description="Column to predict.")
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
        "moons", description="moons, circles, blobs, spirals (2-D classification); sine, polynomial (1-D "
                             "regression), linear (multi-feature regression); digits, breast_cancer, wine "
                             "(real, from scikit-learn); or {csv: PATH, target: COLUMN}.")
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

    # --- execution ---
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = Field(
        0, description="Trial seed (weights, data order, dropout); set through the spec's seeds axis.")
    device: Device = Field("cpu", description="cpu, cuda (gpu queue), or auto (a GPU when the worker has one).")

    @model_validator(mode="after")
    def _check_combination(self) -> TrialConfig:
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
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% of the rows for training")
        return self

    @property
    def train_size(self) -> int | None:
        """Training rows to use: n_train, or 200 for synthetic data; None = every available row."""
        if self.n_train is not None:
            return self.n_train
        return 200 if self.dataset in SYNTHETIC_CLASSIFICATION + SYNTHETIC_REGRESSION else None

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
    def _builtin_classes(self) -> int | None:
        return {"moons": 2, "circles": 2, "breast_cancer": 2, "wine": 3, "digits": 10,
                "blobs": self.n_classes, "spirals": self.n_classes}.get(self.dataset) if isinstance(
            self.dataset, str) else None

    @property
    def resolved_loss(self) -> str:
        if self.loss != "auto":
            return self.loss
        return "mse" if self.task == "regression" else "cross_entropy"

    @property
    def queue(self) -> str:
        """The Celery queue this trial goes to: cuda trials need a GPU worker."""
        return "gpu" if self.device == "cuda" else "cpu"


TRIAL_PARAMETERS: tuple[str, ...] = tuple(TrialConfig.model_fields)


def parameter_reference() -> list[dict[str, Any]]:
    """Name, default and description of every trial parameter (for the README and the dashboard)."""
    return [
        {"name": name, "default": field.default, "description": field.description or ""}
        for name, field in TrialConfig.model_fields.items()
    ]
