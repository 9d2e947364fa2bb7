"""The resolved configuration of one trial: every parameter a grid can vary, with its default.

This is the contract between the spec (which expands a grid into these), the worker's training
engine (which trains exactly what one of these says) and the dashboard (which groups by its fields).
Pure: no torch, no I/O. The README's parameter table documents the same fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

REGRESSION_DATASETS = ("sine",)
CLASSIFICATION_DATASETS = ("moons", "circles", "blobs", "spirals")
DATASETS = CLASSIFICATION_DATASETS + REGRESSION_DATASETS

Dataset = Literal["moons", "circles", "blobs", "spirals", "sine"]
Activation = Literal["relu", "leaky_relu", "tanh", "sigmoid", "gelu"]
Optimizer = Literal["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"]
Loss = Literal["auto", "cross_entropy", "mse"]
Device = Literal["cpu", "cuda", "auto"]

CLASSIFICATION_LOSSES = ("cross_entropy",)
REGRESSION_LOSSES = ("mse",)


class TrialConfig(BaseModel):
    """One trial, fully resolved. Field docs are the user-facing parameter reference."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- data ---
    dataset: Dataset = Field("moons", description="Built-in data set: moons, circles, blobs, spirals (2-D "
                             "classification) or sine (1-D regression).")
    n_train: Annotated[int, Field(ge=4, le=1_000_000)] = Field(
        200, description="Training-set size: the lever between over- and underfitting.")
    n_val: Annotated[int, Field(ge=4, le=1_000_000)] = Field(500, description="Validation-set size.")
    n_test: Annotated[int, Field(ge=0, le=1_000_000)] = Field(500, description="Test-set size.")
    noise: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] = Field(
        0.2, description="Standard deviation of the Gaussian noise added to the inputs (classification) "
                         "or targets (regression).")
    n_classes: Annotated[int, Field(ge=2, le=20)] = Field(3, description="Classes for blobs and spirals.")
    data_seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = Field(
        0, description="Seed of the data draw, separate from the trial seed so replicates see one data set.")

    # --- model ---
    model: Literal["mlp", "linear"] = Field("mlp", description="mlp, or linear (logistic/softmax/linear "
                                            "regression by task).")
    width: Annotated[int, Field(ge=1, le=4096)] = Field(64, description="Units per hidden layer (mlp).")
    depth: Annotated[int, Field(ge=0, le=16)] = Field(2, description="Hidden layers (mlp); 0 is linear.")
    activation: Activation = Field("relu", description="Hidden-layer activation (mlp).")

    # --- optimisation ---
    loss: Loss = Field("auto", description="auto picks cross_entropy for classification, mse for regression.")
    optimizer: Optimizer = Field("adam", description="torch.optim semantics; momentum = SGD with momentum, "
                                 "nesterov = SGD with Nesterov momentum.")
    lr: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = Field(0.01, description="Learning rate.")
    momentum: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = Field(
        0.9, description="Momentum of the momentum and nesterov optimizers (SGD).")
    weight_decay: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] = Field(
        0.0, description="L2 penalty with torch's meaning for the optimizer (decoupled under adamw).")
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)] | Literal["full"] = Field(
        32, description="Mini-batch size, or full for full-batch gradient descent.")
    epochs: Annotated[int, Field(ge=1, le=10_000)] = Field(20, description="Passes over the training set.")

    # --- execution ---
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = Field(
        0, description="Trial seed (weights, data order); set through the spec's seeds axis.")
    device: Device = Field("cpu", description="cpu, cuda (gpu queue), or auto (a GPU when the worker has one).")

    @model_validator(mode="after")
    def _check_combination(self) -> TrialConfig:
        if self.loss != "auto":
            allowed = REGRESSION_LOSSES if self.task == "regression" else CLASSIFICATION_LOSSES
            if self.loss not in allowed:
                raise ValueError(
                    f"loss {self.loss!r} does not fit dataset {self.dataset!r} ({self.task}); "
                    f"use one of {', '.join(allowed)} or auto"
                )
        return self

    @property
    def task(self) -> Literal["classification", "regression"]:
        return "regression" if self.dataset in REGRESSION_DATASETS else "classification"

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
