"""The stacked model of fused execution: many trials' networks as one (or one alone), plus the
per-trial pieces of a step (dropout and input noise, batch and layer norm, gradient clipping, l1,
freezing). How rows are measured is fused_results.py.

Every parameter of the template model (the one-trial model, built once) is one contiguous tensor
with a row per trial: ``[slots, out, in]`` for a Linear weight, ``[slots, n, 1]`` for a bias or a
norm's scale or shift. So is each batch norm's running mean and variance (``[slots, n, 1]``, per
trial: each row's own statistics, moved only while its trial trains). A trial's parameters laid out
one after another, in the order of its nn.Module's parameters(), each in its own layout, then its
running statistics, make its row of the ``[slots, row_size]`` "flat" form that initial weights,
best weights, checkpoints and results use. The forward pass replays the
template's layers on the stacked parameters with batched matmuls, so a step costs the same few
kernel calls whatever the number of trials; backward gives one gradient per parameter, which the
optimizer uses as it is (fused_optim.py).

Activations are feature-major, ``[slots, features, rows]``: each layer is ``W h + b`` (one
baddbmm), every gradient comes out contiguous (element-wise backward kernels on a transposed
gradient ran ~20x slower), and the losses and arg-maxes over a handful of classes run along the
long, contiguous rows axis, several times faster than over a last axis of size 2. Inputs arrive
row-major, ``[slots, rows, features]`` as the data are stored, and are read transposed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from worker.training.fused_optim import StackedOptimizer
from worker.training.models import Dropout, PolynomialFeatures

if TYPE_CHECKING:
    from services.trial_config import TrialConfig
    from worker.training.fused_results import PerTrialLoss

# Evaluation runs over at most this many hidden activations at once (slots x rows x width): about
# 1 MB, so they stay in a core's L2 cache (measured: 2.5x faster than one pass over 64 trials).
EVAL_CHUNK_NUMBERS = 250_000
# Dropout masks and input noise are drawn ahead for at most this many numbers per trial at once
# (0.5 MB; 32 MB for a job of 64). Per trial, not per job: the stretch of rows drawn at once decides
# how a trial's generator is consumed, so it must not depend on which other trials share the job.
NOISE_CHUNK_NUMBERS = 131_072
# Compact the stack once at most this share of its rows still trains.
COMPACT_BELOW = 0.5

@torch.no_grad()
def initial_rows(template: nn.Module, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """``[trials, parameters]``: each trial's initial parameters, drawn from its generator exactly
    as models._init_linear_layers draws them (every Linear in order, weight then bias, uniform in
    +-1/sqrt(fan_in)), so bitwise what build_model gives; other parameters (norm scales and
    shifts, batch norm's running statistics) as the template has them. Leaves each generator where
    build_model would. On the CPU."""
    rows = []
    for generator in generators:
        parts = []
        for layer in _layers(template):
            for parameter in layer.parameters(recurse=False):
                if isinstance(layer, nn.Linear):
                    bound = 1.0 / math.sqrt(layer.in_features)
                    parts.append(torch.empty(parameter.shape).uniform_(-bound, bound, generator=generator))
                else:
                    parts.append(parameter.detach().to("cpu", copy=True))
        parts += [buffer.detach().to("cpu", copy=True) for buffer in _running_statistics(template)]
        rows.append(torch.cat([part.reshape(-1) for part in parts]))
    return torch.stack(rows)


def row_size(template: nn.Module) -> int:
    """Numbers in one row of the flat form: the parameters, then the running statistics."""
    return sum(p.numel() for p in template.parameters()) + sum(b.numel() for b in _running_statistics(template))


def module_weights(template: nn.Module, row: torch.Tensor) -> dict[str, torch.Tensor]:
    """One row of the stack as the trial's nn.Module state_dict (batch norm's batch counter aside)."""
    weights, offset = {}, 0
    statistics = {id(buffer) for buffer in _running_statistics(template)}
    named = [*template.named_parameters(), *[(name, buffer) for name, buffer in template.named_buffers()
                                             if id(buffer) in statistics]]
    for name, tensor in named:
        weights[name] = row[offset:offset + tensor.numel()].view(tensor.shape).detach().clone()
        offset += tensor.numel()
    return weights


class StackedModel:
    """The forward pass of every row of ``flat`` at once (see the module docstring)."""

    def __init__(self, template: nn.Module, flat: torch.Tensor) -> None:
        self.template = template
        self.layers = _layers(template)
        self.shapes = [tuple(p.shape) for p in template.parameters()]
        self.statistics_shapes = [tuple(b.shape) for b in _running_statistics(template)]
        self.widest = max(max(layer.in_features, layer.out_features) for layer in self.layers
                          if isinstance(layer, nn.Linear))
        self.params: list[torch.Tensor] = []
        self.statistics: list[torch.Tensor] = []  # batch norm's running mean and variance, [slots, n, 1]
        self.row_plan = _row_plan(self.layers)
        self.train_plan = _train_plan(self.layers)
        self.use(flat)

    @property
    def rows(self) -> int:
        return self.params[0].shape[0]

    def use(self, flat: torch.Tensor) -> None:
        """Make ``flat`` (``[slots, parameters]``) the parameters: each becomes its own contiguous
        tensor (a copy), an autograd leaf that backward gives its gradient and the optimizer
        updates in place; the running statistics after them, plain tensors."""
        tensors, offset = [], 0
        rows = flat.shape[0]
        for shape in self.shapes + self.statistics_shapes:
            size = math.prod(shape)
            view_shape = (rows, *shape, 1) if len(shape) == 1 else (rows, *shape)
            tensors.append(flat[:, offset:offset + size].detach().reshape(view_shape).clone())
            offset += size
        self._set(tensors[:len(self.shapes)], tensors[len(self.shapes):])

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows (fewer rows, less work); row numbers change."""
        self._set([p.detach()[rows] for p in self.params], [b[rows] for b in self.statistics])

    def flat(self, rows: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[slots, row_size]`` (or only these rows): each row's parameters and running statistics as
        one row, a copy (written into ``out`` when given)."""
        tensors = [p.detach() if rows is None else p.detach()[rows] for p in [*self.params, *self.statistics]]
        return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1, out=out)

    @torch.no_grad()
    def row_norms(self) -> torch.Tensor:
        """``[slots]``: the L2 norm of each row's parameters (of their norms, as clip_grad_norm_
        takes it)."""
        return _row_norms(self.params)

    def _evaluate_rows(self, x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """Eval-mode outputs ``[rows, outputs, n]`` of these rows, one after another, on feature-major
        inputs ``[features, n]``, by :attr:`row_plan`: per layer a 2-D matmul into one of two
        scratch buffers reused by every row, then the bias added in place: forward's numbers to
        float rounding (the bias is added after the matmul, not before it as baddbmm and addmm
        do), at about half addmm's CPU here (addmm's fresh output and broadcast bias copy cost
        more than its matmul on these shapes), with little Python per row (a snapshot evaluates 64
        rows one by one at every planned epoch)."""
        params, n = self.params, x.shape[1]
        scratch = [torch.empty(self.widest * n, dtype=x.dtype, device=x.device) for _ in range(2)]
        rows = list(rows)
        outputs = None
        for i, row in enumerate(rows):
            h, free = x, 0
            for step in self.row_plan:
                if isinstance(step, int):  # a Linear layer: its weight's index; its bias follows
                    weight = params[step][row]
                    h = torch.mm(weight, h, out=scratch[free][:weight.shape[0] * n].view(weight.shape[0], n))
                    h.add_(params[step + 1][row])
                    free = 1 - free
                elif step is None:
                    h = h.relu_()  # in place on the fresh matmul output, as in forward
                else:
                    h = step(h)
            if outputs is None:
                outputs = torch.empty(len(rows), *h.shape, dtype=h.dtype, device=h.device)
            outputs[i].copy_(h)
        return outputs

    def _set(self, params: list[torch.Tensor], statistics: list[torch.Tensor]) -> None:
        self.params = [p.requires_grad_() for p in params]
        self.statistics = statistics
        # the planned training step's buffers: per block, its output and (hidden blocks) the gradient
        # at its output, flat, for the largest batch so far (a smaller batch uses their first numbers)
        self._activations: list[torch.Tensor] = []
        self._gradients: list[torch.Tensor] | None = None  # one per parameter, rewritten every step

    def _step_buffers(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each block's output buffer ``[slots, width, n]`` and each hidden block's gradient buffer for
        a batch ``x`` of ``n`` rows (views of the flat buffers, allocated on first use)."""
        n = x.shape[1]
        shapes = [(self.rows, self.params[weight].shape[1], n) for weight, _, _ in self.train_plan]
        shapes += shapes[:-1]
        if not self._activations or any(math.prod(shape) > flat.numel()
                                         for shape, flat in zip(shapes, self._activations, strict=True)):
            self._activations = [torch.empty(math.prod(shape), dtype=x.dtype, device=x.device) for shape in shapes]
        views = [flat[:math.prod(shape)].view(shape) for shape, flat in zip(shapes, self._activations, strict=True)]
        blocks = len(self.train_plan)
        return views[:blocks], views[blocks:]

    def loss_and_gradients(self, x: torch.Tensor, labels: torch.Tensor, row_loss: PerTrialLoss, *,
                           dropout_scales: torch.Tensor | None = None, frozen: torch.Tensor | None = None,
                           want_losses: bool = True) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """One training step's forward and backward: each row's loss ``[slots]`` (``row_loss`` of the
        outputs and ``labels``; None when not ``want_losses`` and the loss has its own gradient, so
        none was computed) and the gradient of their sum for every parameter (contiguous; the
        caller may change them in place). Arguments as :meth:`forward` in training.

        A stack of Linear layers with ReLU (and dropout) between them runs by :attr:`train_plan`:
        every matmul and element-wise kernel autograd would run, in the same order (the loss's own
        backward is autograd's), but written into buffers kept from step to step, not freshly
        allocated ones: fresh outputs cost more than the kernels on these small shapes (measured:
        1.0 ms against 1.1-1.7 ms a step for 32 trials of width 64, batch 64). Anything else
        (norms, other activations, polynomial features) goes through autograd."""
        if self.train_plan is None:
            losses = row_loss(self.forward(x, train=True, dropout_scales=dropout_scales, frozen=frozen), labels)
            return losses, list(torch.autograd.grad(losses.sum(), self.params))
        buffers = self._step_buffers(x)
        inputs = self._planned_forward(x, dropout_scales, buffers[0])
        outputs = inputs.pop()
        if row_loss.gradient is not None:  # the loss's backward kernels called directly
            with torch.no_grad():
                losses = row_loss(outputs, labels) if want_losses else None
                grad = row_loss.gradient(outputs, labels)
        else:
            outputs = outputs.detach().requires_grad_()
            losses = row_loss(outputs, labels)
            (grad,) = torch.autograd.grad(losses.sum(), outputs)
        return losses, self._planned_backward(grad, inputs, dropout_scales, buffers[1])

    @torch.no_grad()
    def _planned_forward(self, x: torch.Tensor, dropout_scales: torch.Tensor | None,
                         buffers: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each block's input (the first: ``x`` read feature-major), then the outputs; each block
        writes into its buffer."""
        params = self.params
        h, inputs = x.mT, []
        for (weight, relu, dropout), out in zip(self.train_plan, buffers, strict=True):
            inputs.append(h)
            h = torch.bmm(params[weight], h, out=out).add_(params[weight + 1])
            if relu:
                h.relu_()
            if dropout is not None and dropout_scales is not None:
                # in place: relu's backward reads this block's output only for its sign, which the
                # scale (mask / keep, >= 0) keeps wherever the gradient it passes back is not 0
                h.mul_(dropout_scales[:, dropout])
        inputs.append(h)
        return inputs

    @torch.no_grad()
    def _planned_backward(self, grad: torch.Tensor, inputs: list[torch.Tensor],
                          dropout_scales: torch.Tensor | None, buffers: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every parameter's gradient from the outputs' ``grad``, block by block back to the first;
        the gradient at a hidden block's output goes into that block's entry of ``buffers``."""
        params = self.params
        if self._gradients is None:
            self._gradients = [torch.empty_like(p, requires_grad=False) for p in params]
        grads = self._gradients
        for block in range(len(self.train_plan) - 1, -1, -1):
            weight, relu, dropout = self.train_plan[block]
            if dropout is not None and dropout_scales is not None:
                grad.mul_(dropout_scales[:, dropout])
            if relu:  # autograd's ReluBackward: the gradient where the output is positive, else 0
                torch.ops.aten.threshold_backward.grad_input(grad, inputs[block + 1], 0, grad_input=grad)
            torch.bmm(grad, inputs[block].mT, out=grads[weight])
            torch.sum(grad, dim=-1, keepdim=True, out=grads[weight + 1])
            if block > 0:  # the first block's input is the data: no gradient wanted
                grad = torch.bmm(params[weight].mT, grad, out=buffers[block - 1])
        return grads

    def forward(self, x: torch.Tensor, *, train: bool = False, dropout_scales: torch.Tensor | None = None,
                frozen: torch.Tensor | None = None, rows: slice | list[int] = slice(None)) -> torch.Tensor:
        """Outputs ``[slots, outputs, n]``. ``x`` is ``[slots, n, features]``, or ``[n, features]``
        shared by all (evaluation). ``train``: batch norm normalises by the batch and moves the
        running statistics of every row but those ``frozen`` (``[slots, 1, 1]`` bools) marks; else
        eval mode.
        ``dropout_scales`` ``[slots, dropout layers, width, n]`` (mask / keep) applies dropout
        (training). ``rows`` picks a range of slots (or a list of them: a gather of the parameters)."""
        # Slicing the leaves only when asked: a slice would add a slice-backward per parameter.
        params = iter(self.params if rows == slice(None) else [p[rows] for p in self.params])
        statistics = iter(self.statistics if rows == slice(None) else [b[rows] for b in self.statistics])
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
            elif isinstance(layer, nn.LayerNorm):
                x = _layer_norm(x, layer, next(params), next(params))
            elif isinstance(layer, nn.BatchNorm1d):
                x = _batch_norm(x, layer, next(params), next(params), next(statistics), next(statistics),
                                train=train, frozen=frozen)
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
    def evaluate(self, x: torch.Tensor, *, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Eval-mode outputs ``[slots, outputs, n]`` of every row (or only ``rows``, in that order) on
        the shared inputs ``x`` ``[n, features]``, a few rows at a time so the activations stay small."""
        # Let go of the training step's buffers (the next step allocates them again): the stack's peak
        # memory is training's or evaluation's, not both.
        self._activations = []
        count = self.rows
        step = max(1, EVAL_CHUNK_NUMBERS // max(1, x.shape[0] * self.widest))
        if self.row_plan is not None and (step == 1 or count == 1):
            # one row at a time anyway: only the rows asked for (a snapshot's, often not all)
            return self._evaluate_rows(x.mT, range(count) if rows is None else rows)
        if rows is None or list(rows) == list(range(count)):
            if step >= count:
                return self.forward(x)
            return torch.cat([self.forward(x, rows=slice(start, start + step)) for start in range(0, count, step)])
        rows = list(rows)
        return torch.cat([self.forward(x, rows=rows[start:start + step]) for start in range(0, len(rows), step)])


class StackedTraining:
    """What training adds to the stacked model: the optimizer, the per-trial l1 and gradient
    clipping, each row's best weights, and which rows still train (the others are frozen).
    ``configs`` are the rows' trials in row order; ``slots`` their trial indices."""

    def __init__(self, model: StackedModel, configs: Sequence[TrialConfig], *, slots: list[int]) -> None:
        device = model.params[0].device
        self.model = model
        self.slots = list(slots)  # row -> trial index
        self.training = [True] * len(slots)  # row -> still training (False: frozen)
        self.best = model.flat()  # each row: its trial's weights at its best epoch so far
        self.optimizer = StackedOptimizer(configs[0].optimizer, params=model.params, configs=configs)
        self.any_l1 = any(c.l1 > 0 for c in configs)
        self.l1 = _column([c.l1 for c in configs], device)
        self.any_clip = any(c.grad_clip is not None for c in configs)
        self.clip = _column([c.grad_clip or math.inf for c in configs], device)
        owners = [(layer, name) for layer in model.layers for name, _ in layer.named_parameters(recurse=False)]
        self.penalised = [i for i, (layer, name) in enumerate(owners)  # what l1 acts on: Linear weights
                          if isinstance(layer, nn.Linear) and name == "weight"]
        # Each Linear layer's parameters (weight and bias), first layer first: its gradient norm's parts.
        linear = [layer for layer in model.layers if isinstance(layer, nn.Linear)]
        self.linear_params = [[i for i, (owner, _) in enumerate(owners) if owner is layer] for layer in linear]
        # Each parameter's linear layer (0-based), for freeze: N. A norm's scale and shift belong to the
        # linear layer before it (the norm of that layer's output): freezing the layer fixes them too.
        block: dict[int, int | None] = {}
        current = None
        for layer in model.layers:
            current = linear.index(layer) if isinstance(layer, nn.Linear) else current
            block[id(layer)] = current
        self.linear_of = [block[id(layer)] for layer, _ in owners]
        self.fixed_layers = [c.freeze for c in configs]  # per row: its first N linear layers never move
        self._fix_masks()

    @classmethod
    def resumed(cls, template: nn.Module, configs: Sequence[TrialConfig], state: dict, *,
                device: torch.device) -> StackedTraining:
        """The stack as :meth:`state` took it (its rows, weights, best weights, optimizer);
        ``configs`` are every trial of the job, by trial index. Raises ValueError when it does not fit."""
        slots = [int(slot) for slot in state["slots"]]
        params, best = state["params"], state["best"]
        count = row_size(template)
        if params.shape != (len(slots), count) or best.shape != params.shape:
            raise ValueError(f"the checkpoint's stack is {tuple(params.shape)}, not {(len(slots), count)}")
        training = cls(StackedModel(template, params.to(device)), [configs[slot] for slot in slots], slots=slots)
        training.training = [bool(flag) for flag in state["training"]]
        training.best = best.to(device)
        training.optimizer.load_state_dict(state["optimizer"])
        return training

    def state(self) -> dict:
        """What a resume needs, as CPU copies: the rows' trials, which still train, every row's
        weights and best weights, and the optimizer's state."""
        return {"slots": list(self.slots), "training": list(self.training),
                "params": self.model.flat().to("cpu", copy=True), "best": self.best.to("cpu", copy=True),
                "optimizer": self.optimizer.state_dict()}

    def step(self, grads: list[torch.Tensor], *, lr: Sequence[float], want_norm: bool) -> torch.Tensor | None:
        """One optimizer step at each row's rate ``lr`` from ``grads`` (one per parameter, of the sum
        of every row's loss, so each row has its own: StackedModel.loss_and_gradients; changed here
        in place). When asked, returns ``[slots, 1 + layers]``:
        each row's gradient norm before clipping (all parameters), then the norm of each Linear
        layer's gradient (its weight and bias), first layer first; with only Linear layers, the
        first column is the root of the sum of the others' squares."""
        params = self.model.params
        # The optimizer kernels read gradients as flat memory: a strided one would be misread with
        # no error. Autograd returns them contiguous here (feature-major layout); kept so if not.
        grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
        with torch.no_grad():
            if self.any_l1:  # d/dw of l1 * sum|w|: abs' backward is sign (0 at 0); weights only
                for i in self.penalised:
                    grads[i].addcmul_(params[i].sign(), self.l1)
            for i, fixed in self.fixed:  # a fixed layer has no gradient, as with requires_grad=False in torch
                grads[i].masked_fill_(fixed, 0.0)
            per_tensor = _tensor_norms(grads) if want_norm or self.any_clip else None
            norm = None if per_tensor is None else torch.linalg.vector_norm(per_tensor, dim=1)
            if self.any_clip:  # torch.nn.utils.clip_grad_norm_, per row; rows without a clip keep 1
                coefficient = (self.clip / (norm.view(-1, 1, 1) + 1e-6)).clamp(max=1.0)
                coefficient = torch.where(torch.isinf(self.clip), 1.0, coefficient)
                for grad in grads:
                    grad.mul_(coefficient)
            # Weight decay (coupled or not) and momentum would still move a weight whose gradient is 0:
            # a fixed layer's rows are put back exactly as they were.
            kept = [(params[i], rows, params[i][rows]) for i, rows in self.fixed_rows]
            self.optimizer.step(grads, lr=lr, training=self.training)
            for param, rows, values in kept:
                param[rows] = values
            if not want_norm:
                return None
            layers = [torch.linalg.vector_norm(per_tensor[:, columns], dim=1) for columns in self.linear_params]
            return torch.stack([norm, *layers], 1)

    def _fix_masks(self) -> None:
        """For each parameter some row keeps fixed: (its index, ``[rows, 1, 1]`` bools of the rows
        that keep it fixed) and (its index, those rows' numbers)."""
        device = self.model.params[0].device
        self.fixed, self.fixed_rows = [], []
        for i, layer in enumerate(self.linear_of):
            rows = [row for row, fixed in enumerate(self.fixed_layers) if layer is not None and layer < fixed]
            if rows:
                mask = torch.zeros(len(self.fixed_layers), dtype=torch.bool, device=device)
                mask[rows] = True
                self.fixed.append((i, mask.view(-1, 1, 1)))
                self.fixed_rows.append((i, torch.tensor(rows, device=device)))

    def keep_best(self, rows: list[int]) -> None:
        """These rows just reached their best validation loss: remember their weights."""
        if len(rows) == self.model.rows:  # all of them (a stack of one, mostly): no gather
            self.model.flat(out=self.best)
        elif rows:
            index = torch.tensor(rows, device=self.best.device)
            self.best[index] = self.model.flat(index)

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
            self.model.keep(index)
            self.best = self.best[index]
        self.l1, self.clip = self.l1[index], self.clip[index]
        self.fixed_layers = [self.fixed_layers[row] for row in keep]
        self._fix_masks()
        self.optimizer.select(index, keep, params=self.model.params)
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
        if end > self.end:  # a merged last batch (batch norm) may reach past one stretch
            self._draw(start, max(end, min(self.n, start + self.stretch)))
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


def _batch_norm(x: torch.Tensor, layer: nn.BatchNorm1d, scale: torch.Tensor, shift: torch.Tensor,
                running_mean: torch.Tensor, running_var: torch.Tensor, *, train: bool,
                frozen: torch.Tensor | None) -> torch.Tensor:
    """nn.BatchNorm1d on feature-major ``x`` ``[slots, features, n]``, each row with its own scale,
    shift and statistics: torch's one batch_norm kernel over ``slots * features`` channels. In
    training, the batch's statistics normalise and torch moves the running ones towards them in
    place, except in the rows ``frozen`` marks (``[slots, 1, 1]`` bools; their trials have ended);
    in eval mode, the running ones normalise."""
    slots, features, n = x.shape
    # With frozen rows, torch moves copies, and only the other rows take the moved statistics.
    copies = train and frozen is not None
    mean, var = (running_mean.clone(), running_var.clone()) if copies else (running_mean, running_var)
    x = F.batch_norm(x.reshape(1, slots * features, n), mean.view(-1), var.view(-1), scale.view(-1),
                     shift.view(-1), training=train, momentum=layer.momentum, eps=layer.eps)
    if copies:
        with torch.no_grad():
            running_mean.copy_(torch.where(frozen, running_mean, mean))
            running_var.copy_(torch.where(frozen, running_var, var))
    return x.view(slots, features, n)


def _layer_norm(x: torch.Tensor, layer: nn.LayerNorm, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """nn.LayerNorm over the feature axis of feature-major ``x`` ``[slots, features, n]``: torch's
    layer_norm kernel on the transposed view (one kernel forward and one backward, about twice as
    fast as composing it from reductions), then each row's own scale and shift."""
    normalised = F.layer_norm(x.mT, (x.shape[1],), None, None, layer.eps)
    return torch.addcmul(shift, normalised.mT, scale)


def _row_plan(layers: list[nn.Module]) -> list[int | None | nn.Module] | None:
    """How StackedModel._evaluate_rows replays the layers in eval mode: a Linear layer's weight index,
    None for ReLU, or a stateless activation module (dropout is the identity in eval mode); None
    (no plan) when a layer needs the stacked forward (norms, polynomial features)."""
    plan: list[int | None | nn.Module] = []
    index = 0
    for layer in layers:
        if isinstance(layer, nn.Linear) and layer.bias is not None:
            plan.append(index)
        elif isinstance(layer, nn.ReLU):
            plan.append(None)
        elif isinstance(layer, Dropout):
            continue
        elif isinstance(layer, (nn.BatchNorm1d, nn.LayerNorm, PolynomialFeatures)) or any(
                True for _ in layer.parameters(recurse=False)):
            return None
        else:
            plan.append(layer)
        index += sum(1 for _ in layer.parameters(recurse=False))
    return plan


def _train_plan(layers: list[nn.Module]) -> list[tuple[int, bool, int | None]] | None:
    """How StackedModel.loss_and_gradients trains without autograd: per Linear layer (with a bias), its
    weight's index, whether a ReLU follows it, and the dropout layer after that (its number among the
    model's dropout layers), if any; None when some layer is anything else."""
    plan: list[tuple[int, bool, int | None]] = []
    index = dropout = 0
    for layer in layers:
        if isinstance(layer, nn.Linear) and layer.bias is not None:
            plan.append((index, False, None))
        elif isinstance(layer, nn.ReLU) and plan and not plan[-1][1] and plan[-1][2] is None:
            plan[-1] = (plan[-1][0], True, None)
        elif isinstance(layer, Dropout) and plan and plan[-1][1] and plan[-1][2] is None:
            plan[-1] = (plan[-1][0], True, dropout)
            dropout += 1
        else:
            return None
        index += sum(1 for _ in layer.parameters(recurse=False))
    return plan


def _running_statistics(template: nn.Module) -> list[torch.Tensor]:
    """Each batch norm's running mean and variance, in layer order: what a row holds besides its
    parameters."""
    return [buffer for layer in _layers(template) if isinstance(layer, nn.BatchNorm1d)
            for buffer in (layer.running_mean, layer.running_var)]


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    # [slots, 1, 1]: one number per row, broadcast over a stacked parameter or gradient
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)


def _tensor_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    # [slots, tensors]: each row's L2 norm of each tensor
    return torch.stack([torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1) for t in tensors], 1)


def _row_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    # Each row's L2 norm over all the tensors: the norm of its per-tensor norms, as
    # torch.nn.utils.clip_grad_norm_ takes it.
    return torch.linalg.vector_norm(_tensor_norms(tensors), dim=1)


def _layers(model: nn.Module) -> list[nn.Module]:
    return list(model) if isinstance(model, nn.Sequential) else [model]

