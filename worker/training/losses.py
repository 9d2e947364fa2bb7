"""Losses, the metrics measured beside them, and the loss of the best constant predictor.

Classification labels are int64 class indices; regression targets are float32 shaped [N, 1].

- cross_entropy: softmax cross-entropy over n_classes logits, with config.label_smoothing
- bce:           binary cross-entropy on ONE logit (two classes; the logit is the evidence for
                 class 1, so a positive logit predicts class 1)
- multilabel_bce: multi-label targets (float 0/1 [N, labels]): one logit per label, binary
                 cross-entropy per label (torch's binary_cross_entropy_with_logits), averaged over
                 labels and examples; what the user's loss bce (or auto) means on multi-label data
- mse, mae, huber (with config.huber_delta): regression, means per example

Multi-label metrics: accuracy is the mean of the per-label accuracies (each label right or wrong
on its own), exact_match the share of examples with every label right.

Reported losses are always this data loss alone; the l1 penalty is added to the training objective
only, so curves compare across l1 values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from services.trial_config import TrialConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_REGRESSION_LOSSES = ("mse", "mae", "huber")


def resolve_loss(config: TrialConfig, *, task: str, n_classes: int | None = None) -> str:
    """The loss to train with, once the task is known (a CSV's task may only be known from its data).

    Raises ValueError with one clear sentence when the loss does not fit the task or the classes.
    """
    if task == "multilabel":
        if config.loss not in ("auto", "bce"):
            raise ValueError(f"loss {config.loss!r} does not fit the multi-label data of {config.dataset_name}; "
                             "use loss bce or auto (one sigmoid and binary cross-entropy per label)")
        return "multilabel_bce"
    name = config.loss if config.loss != "auto" else ("mse" if task == "regression" else "cross_entropy")
    if (name in _REGRESSION_LOSSES) != (task == "regression"):
        raise ValueError(f"loss {name!r} does not fit the {task} data of {config.dataset_name}; "
                         "use loss auto, or one made for that task")
    if name == "bce" and n_classes is not None and n_classes != 2:
        raise ValueError(f"loss 'bce' needs two classes but {config.dataset_name} has {n_classes}; "
                         "use cross_entropy")
    return name


def model_outputs(loss: str, n_outputs: int) -> int:
    """Outputs of the model's last layer: one logit for bce, otherwise what the data set needs."""
    return 1 if loss == "bce" else n_outputs


def build_loss(config: TrialConfig, loss: str) -> LossFn:
    """The mean data loss ``loss_fn(output, y)`` of the resolved loss name."""
    if loss == "cross_entropy":
        if config.label_smoothing:
            return partial(F.cross_entropy, label_smoothing=config.label_smoothing)
        return F.cross_entropy
    if loss == "bce":
        return _bce
    if loss == "multilabel_bce":
        return _multilabel_bce
    if loss == "mae":
        return F.l1_loss
    if loss == "huber":
        return partial(F.huber_loss, delta=config.huber_delta)
    return F.mse_loss


def _bce(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(output.squeeze(1), y.to(output.dtype))


def _multilabel_bce(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(output, y.to(output.dtype))


def penalised_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights l1 acts on: every Linear layer's weight matrix (not biases, not norm scales)."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


# A weight this close to zero counts as zero in zero_weight_fraction: L1's subgradient steps make
# weights hover around 0 rather than land on it exactly.
ZERO_WEIGHT = 1e-3


@torch.no_grad()
def weight_statistics(weights: list[torch.Tensor]) -> dict[str, float | None]:
    """Statistics of the weights L1 and weight decay act on (penalised_weights): their L1 norm, mean,
    min, max, and the share that is (nearly) zero, which L1 drives up (sparsity)."""
    flat = torch.cat([w.detach().reshape(-1) for w in weights]) if weights else torch.zeros(0)
    if flat.numel() == 0 or not bool(torch.isfinite(flat).all()):
        return dict.fromkeys(("weight_l1", "weight_mean", "weight_min", "weight_max", "zero_weight_fraction"))
    return {
        "weight_l1": flat.abs().sum().item(),
        "weight_mean": flat.mean().item(),
        "weight_min": flat.min().item(),
        "weight_max": flat.max().item(),
        "zero_weight_fraction": (flat.abs() < ZERO_WEIGHT).float().mean().item(),
    }


@torch.no_grad()
def measure(output: torch.Tensor, y: torch.Tensor, *, loss_fn: LossFn, loss: str) -> dict[str, float | None]:
    """Loss and task metrics of outputs on a whole set: accuracy (classification, fraction in
    [0, 1]), or rmse, mae and r2 (regression; r2 is None when the targets are constant)."""
    if y.shape[0] == 0:
        return {"loss": None, "accuracy": None, "rmse": None, "mae": None, "r2": None}
    if loss == "multilabel_bce":
        correct = (output > 0) == (y > 0.5)
        values = torch.stack([loss_fn(output, y), correct.float().mean(), correct.all(1).float().mean()]).tolist()
        return {"loss": values[0], "accuracy": values[1], "rmse": None, "mae": None, "r2": None,
                "exact_match": values[2]}
    if y.dtype == torch.int64:
        predicted = (output.squeeze(1) > 0).long() if loss == "bce" else output.argmax(dim=1)
        values = torch.stack([loss_fn(output, y), (predicted == y).float().mean()]).tolist()
        return {"loss": values[0], "accuracy": values[1], "rmse": None, "mae": None, "r2": None}
    error = output - y
    values = torch.stack([
        loss_fn(output, y), error.square().mean(), error.abs().mean(), (y - y.mean()).square().mean()
    ]).tolist()
    data_loss, mse, mae, variance = values
    return {"loss": data_loss, "accuracy": None, "rmse": math.sqrt(mse), "mae": mae,
            "r2": 1 - mse / variance if variance > 0 else None}


@torch.no_grad()
def constant_predictor(y_train: torch.Tensor, *, loss: str, n_outputs: int) -> torch.Tensor:
    """The output row of the best constant predictor fitted on the training targets: the class prior
    as logits (classification), each label's share as a logit (multi-label), or the training mean
    (regression)."""
    if loss == "multilabel_bce":
        share = y_train.double().mean(dim=0).clamp(1e-7, 1 - 1e-7)  # a label never seen: huge, finite loss
        return torch.log(share / (1 - share)).float()
    if y_train.dtype != torch.int64:
        return y_train.mean(dim=0)
    prior = torch.bincount(y_train, minlength=max(n_outputs, 2)).double() / y_train.shape[0]
    prior = prior.clamp_min(1e-7)  # a class missing from training: a huge, finite loss, not inf
    if loss == "bce":
        return torch.log(prior[1:2] / prior[0:1]).float()
    return prior.log().float()


def baseline_loss(constant: torch.Tensor, y: torch.Tensor, *, loss_fn: LossFn) -> float | None:
    """Mean loss of always predicting ``constant`` on a set (None for an empty set)."""
    if y.shape[0] == 0:
        return None
    value = loss_fn(constant.to(y.device).expand(y.shape[0], -1), y).item()
    return value if math.isfinite(value) else None
