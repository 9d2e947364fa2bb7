"""The stacked model's hand-run backward (StackedModel.loss_and_gradients by its train_plan) against
torch's autograd over the same stacked forward: the same losses and gradients, step after step on
the buffers it keeps, for every shape of model the plan takes, and autograd itself for the rest."""

from __future__ import annotations

import pytest
import torch

from services.trial_config import TrialConfig
from worker.training.data import make_dataset
from worker.training.fused_results import per_trial_loss
from worker.training.fused_stack import StackedModel, initial_rows
from worker.training.losses import model_outputs, resolve_loss
from worker.training.models import Dropout, build_model

SMALL = dict(n_train=64, n_val=32, n_test=32, width=16)
CASES = [
    dict(dataset="sine", depth=2),  # regression, mse
    dict(dataset="moons", depth=3, dropout=0.5),  # binary, relu and dropout between every layer
    dict(dataset="blobs", depth=1, label_smoothing=0.1),  # cross-entropy over classes, through autograd
    dict(dataset="blobs", depth=2),  # cross-entropy with its own gradient
    dict(dataset="sine", depth=0),  # one Linear layer
    dict(dataset="sine", depth=2, loss="huber"),
]


def _stack(config: TrialConfig, rows: int):
    splits = make_dataset(config)
    loss = resolve_loss(config, task=splits.task, n_classes=None if splits.task == "regression" else splits.n_outputs)
    template = build_model(config, splits.n_features, model_outputs(loss, splits.n_outputs),
                           generator=torch.Generator(), task=splits.task)
    flat = initial_rows(template, [torch.Generator().manual_seed(seed) for seed in range(rows)])
    return splits, template, flat, per_trial_loss(config, loss)


def _autograd(model: StackedModel, x, y, row_loss, scales):
    losses = row_loss(model.forward(x, train=True, dropout_scales=scales), y)
    return losses, torch.autograd.grad(losses.sum(), model.params)


@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(f"{k}={v}" for k, v in case.items()))
def test_the_planned_backward_gives_autograds_losses_and_gradients_step_after_step(case) -> None:
    config = TrialConfig(**{**SMALL, **case})
    splits, template, flat, row_loss = _stack(config, rows=5)
    planned, reference = StackedModel(template, flat), StackedModel(template, flat)
    assert planned.train_plan is not None
    layers = sum(isinstance(layer, Dropout) for layer in planned.layers)
    generator = torch.Generator().manual_seed(0)
    y_all = splits.y_train if splits.task == "multilabel" else splits.y_train.reshape(-1)
    # batches of 8, 8, 3 rows: the buffers are per batch size, and every step rewrites them
    for start, end in [(0, 8), (8, 16), (16, 19), (24, 32)]:
        order = torch.stack([torch.randperm(64, generator=generator)[start:end] for _ in range(5)])
        x, y = splits.x_train[order], y_all[order]
        scales = ((torch.rand(5, layers, config.width, end - start, generator=generator) < 0.5).float() / 0.5
                  if layers else None)
        losses, grads = planned.loss_and_gradients(x, y, row_loss, dropout_scales=scales)
        want_losses, want_grads = _autograd(reference, x, y, row_loss, scales)
        torch.testing.assert_close(losses, want_losses, rtol=1e-6, atol=1e-7)
        assert len(grads) == len(want_grads)
        for got, want in zip(grads, want_grads, strict=True):
            assert got.is_contiguous() and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # a step of plain SGD on both, so the next batch sees new weights
            for p, q, g in zip(planned.params, reference.params, want_grads, strict=True):
                p.sub_(0.1 * g)
                q.sub_(0.1 * g)


@pytest.mark.filterwarnings("error")  # torch warns when it resizes an out= buffer of the wrong size
def test_the_buffers_follow_the_stack_when_it_shrinks() -> None:
    config = TrialConfig(**SMALL, dataset="sine", depth=2)
    splits, template, flat, row_loss = _stack(config, rows=6)
    planned, reference = StackedModel(template, flat), StackedModel(template, flat)
    x, y = splits.x_train[:16].expand(6, 16, -1), splits.y_train[:16].reshape(1, -1).expand(6, -1)
    planned.loss_and_gradients(x, y, row_loss)
    keep = torch.tensor([1, 4])
    planned.keep(keep)
    reference.keep(keep)
    losses, grads = planned.loss_and_gradients(x[keep], y[keep], row_loss)
    want_losses, want_grads = _autograd(reference, x[keep], y[keep], row_loss, None)
    torch.testing.assert_close(losses, want_losses)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", [dict(activation="tanh"), dict(norm="layer"), dict(norm="batch"),
                                  dict(poly_degree=3, depth=0)], ids=str)
def test_other_layers_go_through_autograd(case) -> None:
    config = TrialConfig(**{**SMALL, "dataset": "sine", "depth": 2, **case})
    _, template, flat, _ = _stack(config, rows=2)
    assert StackedModel(template, flat).train_plan is None


@pytest.mark.parametrize("n", [64, 16, 3, 2000])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_a_losss_own_gradient_is_autograds_bitwise(loss, n) -> None:
    config = TrialConfig(**SMALL, dataset="sine" if loss == "mse" else "blobs")
    row_loss = per_trial_loss(config, loss)
    generator = torch.Generator().manual_seed(n)
    classes = 1 if loss == "mse" else 4
    outputs = (torch.randn(5, classes, n, generator=generator) * 3).requires_grad_()
    y = (torch.randn(5, n, generator=generator) if loss == "mse"
         else torch.randint(0, classes, (5, n), generator=generator))
    (want,) = torch.autograd.grad(row_loss(outputs, y).sum(), outputs)
    with torch.no_grad():
        got = row_loss.gradient(outputs, y)
    assert got.shape == want.shape and torch.equal(got, want)


def test_the_losses_without_their_own_gradient_go_through_autograd() -> None:
    config = TrialConfig(**SMALL, dataset="blobs")
    assert per_trial_loss(config, "huber").gradient is None
    assert per_trial_loss(config.model_copy(update={"label_smoothing": 0.1}), "cross_entropy").gradient is None
    assert per_trial_loss(config, "cross_entropy").gradient is not None


def test_a_nan_or_inf_in_one_row_stays_in_that_rows_loss_and_outputs() -> None:
    # A diverging trial is found by its losses: a planned step or evaluation must carry its NaN and
    # inf through every bias and ReLU (aten's one-pass add-relu kernel clamps inf to the largest float
    # and, past its vector lanes, NaN to 0: a batch of 5 rows is all past them).
    config = TrialConfig(**SMALL, dataset="sine", depth=1)
    splits, template, flat, row_loss = _stack(config, rows=3)
    first_bias = slice(config.width * splits.n_features, config.width * (splits.n_features + 1))
    flat[1, first_bias] = float("nan")
    flat[2, first_bias] = float("inf")
    model = StackedModel(template, flat)
    x, y = splits.x_train[:5].expand(3, 5, -1), splits.y_train[:5].reshape(1, -1).expand(3, -1)
    losses, _ = model.loss_and_gradients(x, y, row_loss)
    assert torch.isfinite(losses[0]) and losses[1].isnan() and not torch.isfinite(losses[2])
    outputs = model.evaluate(splits.x_val[:5])
    assert torch.isfinite(outputs[0]).all() and outputs[1].isnan().all() and not torch.isfinite(outputs[2]).any()
