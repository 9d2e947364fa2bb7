"""The stacked model of fused execution: many trials' networks as one, plus the per-trial pieces
of a step (losses, metrics, dropout and input noise, gradient clipping, l1, freezing).

Every trial's parameters are one row of a ``[slots, parameters]`` tensor ``flat`` (in the order of
its nn.Module's parameters(), each in its own layout), and each layer's weight is a view of it:
``[slots, out, in]`` for a Linear weight, ``[slots, n, 1]`` for a bias or a norm's scale or shift.
The forward pass replays a template model's layers (the one-trial model, built once) on those
views with batched matmuls, so a step costs the same few kernel calls whatever the number of trials.

Activations are feature-major, ``[slots, features, rows]``: each layer is ``W h + b`` (one
baddbmm), every gradient comes out contiguous (element-wise backward kernels on a transposed
gradient ran ~20x slower), and the losses and arg-maxes over a handful of classes run along the
long, contiguous rows axis, several times faster than over a last axis of size 2. Inputs arrive
row-major, ``[slots, rows, features]`` as the data are stored, and are read transposed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from worker.training.fused_optim import StackedOptimizer
from worker.training.models import Dropout, PolynomialFeatures

if TYPE_CHECKING:
    from services.trial_config import TrialConfig

# Evaluation runs over at most this many hidden activations at once (slots x rows x width): about
# 1 MB, so they stay in a core's L2 cache (measured: 2.5x faster than one pass over 64 trials).
EVAL_CHUNK_NUMBERS = 250_000
# Dropout masks and input noise are drawn ahead for at most this many numbers per trial at once
# (0.5 MB; 32 MB for a job of 64). Per trial, not per job: the stretch of rows drawn at once decides
# how a trial's generator is consumed, so it must not depend on which other trials share the job.
NOISE_CHUNK_NUMBERS = 131_072
# Compact the stack once at most this share of its rows still trains.
COMPACT_BELOW = 0.5

PerTrialLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def initial_rows(template: nn.Module, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """``[trials, parameters]``: each trial's initial parameters, drawn from its generator exactly
    as models._init_linear_layers draws them (every Linear in order, weight then bias, uniform in
    +-1/sqrt(fan_in)), so bitwise what build_model gives; other parameters (norm scales and
    shifts) as the template has them. Leaves each generator where build_model would."""
    rows = []
    for generator in generators:
        parts = []
        for layer in _layers(template):
            for parameter in layer.parameters(recurse=False):
                if isinstance(layer, nn.Linear):
                    bound = 1.0 / math.sqrt(layer.in_features)
                    parts.append(torch.empty(parameter.shape).uniform_(-bound, bound, generator=generator))
                else:
                    parts.append(parameter.detach().clone())
        rows.append(torch.cat([part.reshape(-1) for part in parts]))
    return torch.stack(rows)


def module_weights(template: nn.Module, row: torch.Tensor) -> dict[str, torch.Tensor]:
    """One row of the stack as the trial's nn.Module state_dict."""
    weights, offset = {}, 0
    for name, parameter in template.named_parameters():
        weights[name] = row[offset:offset + parameter.numel()].view(parameter.shape).detach().clone()
        offset += parameter.numel()
    return weights


class StackedModel:
    """The forward pass of every row of ``flat`` at once (see the module docstring)."""

    def __init__(self, template: nn.Module, flat: torch.Tensor) -> None:
        self.template = template
        self.layers = _layers(template)
        self.shapes = [tuple(p.shape) for p in template.parameters()]
        self.widest = max(max(layer.in_features, layer.out_features) for layer in self.layers
                          if isinstance(layer, nn.Linear))
        self.use(flat)

    def use(self, flat: torch.Tensor) -> None:
        """Make ``flat`` the parameters. Its views are autograd leaves: backward gives each its
        gradient, and in-place updates of flat show through them."""
        self.flat = flat
        self.params, offset = [], 0
        rows = flat.shape[0]
        for shape in self.shapes:
            size = math.prod(shape)
            view_shape = (rows, *shape, 1) if len(shape) == 1 else (rows, *shape)
            self.params.append(flat[:, offset:offset + size].view(view_shape).requires_grad_())
            offset += size

    def forward(self, x: torch.Tensor, *, dropout_scales: torch.Tensor | None = None,
                rows: slice = slice(None)) -> torch.Tensor:
        """Outputs ``[slots, outputs, n]``. ``x`` is ``[slots, n, features]``, or ``[n, features]``
        shared by all (evaluation). ``dropout_scales`` ``[slots, dropout layers, width, n]`` (mask /
        keep) applies dropout (training); None is eval mode. ``rows`` picks a range of slots."""
        # Slicing the leaves only when asked: a slice would add a slice-backward per parameter.
        params = iter(self.params if rows == slice(None) else [p[rows] for p in self.params])
        if isinstance(self.layers[0], PolynomialFeatures):  # works on row-major inputs
            x = self.layers[0](x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.layers[0].n_out)
        x = x.mT  # feature-major from here on (a view: the first matmul reads it transposed)
        dropout_layer = 0
        for layer in self.layers:
            if isinstance(layer, PolynomialFeatures):
                continue
            if isinstance(layer, nn.Linear):
                weight, bias = next(params), next(params)
                if x.dim() == 2:
                    x = x.expand(weight.shape[0], *x.shape)
                x = torch.baddbmm(bias, weight, x)
            elif isinstance(layer, nn.LayerNorm):  # F.layer_norm's formula, over the feature axis
                scale, shift = next(params), next(params)
                variance, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
                x = torch.addcmul(shift, (x - mean) * torch.rsqrt(variance + layer.eps), scale)
            elif isinstance(layer, Dropout):
                if dropout_scales is not None:
                    x = x * dropout_scales[:, dropout_layer]
                dropout_layer += 1
            elif isinstance(layer, nn.ReLU):
                x = x.relu_()  # in place on the fresh matmul output (relu's backward needs only its result)
            else:
                x = layer(x)  # a stateless activation module
        return x

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode outputs ``[slots, outputs, n]`` of every row on the shared inputs ``x``
        ``[n, features]``, a few rows at a time so the activations stay small."""
        count = self.flat.shape[0]
        step = max(1, EVAL_CHUNK_NUMBERS // max(1, x.shape[0] * self.widest))
        if step >= count:
            return self.forward(x)
        return torch.cat([self.forward(x, rows=slice(start, start + step)) for start in range(0, count, step)])


class StackedTraining:
    """What training adds to the stacked model: the optimizer, the per-trial l1 and gradient
    clipping, each row's best weights, and which rows still train (the others are frozen).
    ``configs`` are the rows' trials in row order; ``slots`` their trial indices."""

    def __init__(self, model: StackedModel, configs: Sequence[TrialConfig], *, slots: list[int]) -> None:
        device = model.flat.device
        self.model = model
        self.slots = list(slots)  # row -> trial index
        self.training = [True] * len(slots)  # row -> still training (False: frozen)
        self.best = model.flat.clone()  # each row: its trial's weights at its best epoch so far
        self.optimizer = StackedOptimizer(configs[0].optimizer, flat=model.flat, configs=configs)
        self.any_l1 = any(c.l1 > 0 for c in configs)
        self.l1 = _column([c.l1 for c in configs], device)
        self.any_clip = any(c.grad_clip is not None for c in configs)
        self.clip = _column([c.grad_clip or math.inf for c in configs], device)
        self.l1_mask = torch.cat([
            torch.full((parameter.numel(),), float(isinstance(layer, nn.Linear) and name == "weight"))
            for layer in model.layers for name, parameter in layer.named_parameters(recurse=False)]).to(device)

    def step(self, loss: torch.Tensor, *, lr: Sequence[float], want_norm: bool) -> torch.Tensor | None:
        """Backward from ``loss`` (the sum of every row's loss, so each row gets its own gradient)
        and one optimizer step at each row's rate ``lr``; returns each row's gradient norm before
        clipping when asked."""
        grads = torch.autograd.grad(loss, self.model.params)
        with torch.no_grad():
            flat = self.model.flat
            grad = torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)
            if self.any_l1:  # d/dw of l1 * sum|w|: abs' backward is sign (0 at 0); weights only
                grad.addcmul_(flat.sign().mul_(self.l1_mask), self.l1)
            norm = torch.linalg.vector_norm(grad, dim=1) if want_norm or self.any_clip else None
            if self.any_clip:  # torch.nn.utils.clip_grad_norm_, per row; rows without a clip keep 1
                coefficient = (self.clip / (norm.unsqueeze(1) + 1e-6)).clamp(max=1.0)
                grad.mul_(torch.where(torch.isinf(self.clip), 1.0, coefficient))
            self.optimizer.step(flat, grad, lr=lr, training=self.training)
        return norm

    def keep_best(self, rows: list[int]) -> None:
        """These rows just reached their best validation loss: remember their weights."""
        if rows:
            index = torch.tensor(rows, device=self.best.device)
            self.best[index] = self.model.flat.detach()[index]

    def freeze(self, row: int) -> None:
        """The row's trial has ended: from now on its parameters are never written."""
        self.training[row] = False

    def compact(self) -> bool:
        """Drop the frozen rows once few enough still train (fewer rows, less work); returns
        whether it did (row numbers change)."""
        if sum(self.training) > COMPACT_BELOW * len(self.training):
            return False
        keep = [row for row, is_training in enumerate(self.training) if is_training]
        index = torch.tensor(keep, device=self.best.device)
        with torch.no_grad():
            self.model.use(self.model.flat.detach()[index].clone())
            self.best = self.best[index].clone()
        self.l1, self.clip = self.l1[index], self.clip[index]
        self.optimizer.select(index, keep)
        self.slots = [self.slots[row] for row in keep]
        self.training = [True] * len(keep)
        return True


class NoiseAhead:
    """Dropout scales (mask / keep) and input noise for an epoch's rows of data, drawn a stretch of
    rows at a time: per trial one draw from its own noise generator per stretch, not one per step.
    Trials without dropout (or input noise), and frozen ones, draw nothing."""

    def __init__(self, *, dropout: list[float], input_noise: list[float], generators: list[torch.Generator | None],
                 dropout_layers: int, width: int, features: int, n: int, batch_size: int,
                 device: torch.device) -> None:
        self.dropout, self.input_noise, self.generators = dropout, input_noise, generators
        self.dropout_layers, self.width, self.features, self.n, self.device = (
            dropout_layers, width, features, n, device)
        self.wants_dropout = dropout_layers > 0 and any(p > 0 for p in dropout)
        self.wants_noise = any(s > 0 for s in input_noise)
        # Only what every trial of the job shares (layers, width, features, batch size) sizes the
        # stretch: not the job's size, nor whether some other trial uses dropout or input noise.
        per_row = dropout_layers * width + features
        self.stretch = max(batch_size, NOISE_CHUNK_NUMBERS // max(per_row, 1) // batch_size * batch_size)
        self.start = self.end = 0
        self.noise = self.scales = None

    def rows(self, start: int, end: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(input noise ``[slots, rows, features]``, dropout scales ``[slots, layers, width, rows]``)
        for data rows start..end of the epoch; None where no trial uses it."""
        if not (self.wants_dropout or self.wants_noise):
            return None, None
        if end > self.end:
            self._draw(start, min(self.n, start + self.stretch))
        a, b = start - self.start, end - self.start
        return (None if self.noise is None else self.noise[:, a:b],
                None if self.scales is None else self.scales[..., a:b])

    def _draw(self, start: int, end: int) -> None:
        rows, device = end - start, self.device
        self.start, self.end = start, end
        if self.wants_noise:
            self.noise = torch.stack([
                torch.randn(rows, self.features, generator=g, device=device) * std
                if std > 0 and g is not None else torch.zeros(rows, self.features, device=device)
                for g, std in zip(self.generators, self.input_noise, strict=True)])
        if self.wants_dropout:
            shape = (self.dropout_layers, self.width, rows)
            self.scales = torch.stack([
                (torch.rand(shape, generator=g, device=device) < 1 - p).float().div_(1 - p)
                if p > 0 and g is not None else torch.ones(shape, device=device)
                for g, p in zip(self.generators, self.dropout, strict=True)])


def per_trial_loss(config: TrialConfig, loss: str) -> PerTrialLoss:
    """Each row's mean data loss ``[slots]`` from class-major outputs ``[slots, outputs, n]`` and
    labels or targets ``[slots, n]``: the losses of losses.build_loss, per row."""
    if loss == "cross_entropy":
        smoothing = config.label_smoothing
        return lambda output, y: F.cross_entropy(output, y, reduction="none", label_smoothing=smoothing).mean(1)
    if loss == "bce":
        return lambda output, y: F.binary_cross_entropy_with_logits(
            output[:, 0], y.to(output.dtype), reduction="none").mean(1)
    if loss == "huber":
        return lambda output, y: F.huber_loss(output[:, 0], y, reduction="none", delta=config.huber_delta).mean(1)
    elementwise = {"mse": F.mse_loss, "mae": F.l1_loss}[loss]
    return lambda output, y: elementwise(output[:, 0], y, reduction="none").mean(1)


@torch.no_grad()
def measure_rows(output: torch.Tensor, y: torch.Tensor, loss_fn: PerTrialLoss, *, loss: str
                 ) -> list[dict[str, float | None]]:
    """losses.measure for every row at once, with one read from the device: class-major outputs
    ``[slots, outputs, n]`` on the shared labels or targets ``y`` ``[n]``."""
    slots = output.shape[0]
    if y.shape[0] == 0:
        return [{"loss": None, "accuracy": None, "rmse": None, "mae": None, "r2": None}] * slots
    labels = y.expand(slots, *y.shape)
    data_loss = loss_fn(output, labels)
    if y.dtype == torch.int64:
        predicted = (output[:, 0] > 0).long() if loss == "bce" else _first_argmax(output)
        values = torch.stack([data_loss, (predicted == labels).float().mean(1)], 1).tolist()
        return [{"loss": lo, "accuracy": acc, "rmse": None, "mae": None, "r2": None} for lo, acc in values]
    error = output[:, 0] - labels
    variance = (y - y.mean()).square().mean()
    values = torch.stack([data_loss, error.square().mean(1), error.abs().mean(1), variance.expand(slots)], 1).tolist()
    return [{"loss": lo, "accuracy": None, "rmse": math.sqrt(mse), "mae": mae,
             "r2": 1 - mse / var if var > 0 else None} for lo, mse, mae, var in values]


def _first_argmax(output: torch.Tensor) -> torch.Tensor:
    """argmax over dim 1 of ``[slots, classes, n]`` (the first index of the largest, as argmax),
    class by class: torch's argmax over a middle axis is ~10x slower than these few passes."""
    best, predicted = output[:, 0], torch.zeros(output[:, 0].shape, dtype=torch.int64, device=output.device)
    for k in range(1, output.shape[1]):
        better = output[:, k] > best
        best = torch.where(better, output[:, k], best)
        predicted = torch.where(better, k, predicted)
    return predicted


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _layers(model: nn.Module) -> list[nn.Module]:
    return list(model) if isinstance(model, nn.Sequential) else [model]

