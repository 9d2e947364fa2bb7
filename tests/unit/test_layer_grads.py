"""Each epoch's gradient norm per Linear layer: the stack's numbers against an nn.Sequential trained by
torch's own modules (tests/unit/reference_loop.py), their sum against grad_norm, and the textbook
claim they are there to show: through deep sigmoid networks the first layers' gradients vanish."""

from __future__ import annotations

import math
import statistics

import pytest

from services.trial_config import TrialConfig
from tests.unit.reference_loop import train_trial as reference_trial
from worker.training.fused import train_fused

SMALL = dict(dataset="moons", n_train=64, n_val=32, n_test=0, width=16, epochs=3, batch_size=16)


def _fused_rows(configs: list[TrialConfig]) -> dict[int, list]:
    rows: dict[int, list] = {i: [] for i in range(len(configs))}
    train_fused(configs, on_epoch=lambda epoch_rows: [rows[i].append(m) for i, m in epoch_rows.items()] and None)
    return rows


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_each_layers_gradient_norm_equals_the_nn_sequentials_in_one_stack(activation: str) -> None:
    configs = [TrialConfig(seed=seed, depth=3, activation=activation, lr=lr, optimizer="momentum", **SMALL)
               for seed, lr in enumerate([0.1, 0.03])]
    rows = _fused_rows(configs)
    for i, config in enumerate(configs):
        solo: list = []
        reference_trial(config, on_epoch=solo.append)
        assert [len(m.layer_grad_norms) for m in rows[i]] == [4] * 3  # 3 hidden layers + the output layer
        for fused, reference in zip(rows[i], solo, strict=True):
            assert fused.layer_grad_norms == pytest.approx(reference.layer_grad_norms, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("extra", [{}, dict(l1=0.01, grad_clip=0.05)])
def test_grad_norm_is_the_root_of_the_sum_of_the_layers_squares(extra: dict) -> None:
    # Without norm layers every parameter belongs to a Linear layer; both are taken before clipping.
    rows = _fused_rows([TrialConfig(depth=4, **SMALL, **extra)])[0]
    for m in rows:
        assert m.grad_norm == pytest.approx(math.sqrt(sum(v * v for v in m.layer_grad_norms)), rel=1e-6)


def test_layer_norm_parameters_are_left_out_of_the_layers_norms() -> None:
    rows = _fused_rows([TrialConfig(depth=2, norm="layer", **SMALL)])[0]
    assert all(len(m.layer_grad_norms) == 3 for m in rows)
    assert all(m.grad_norm > math.sqrt(sum(v * v for v in m.layer_grad_norms)) for m in rows)


def test_deep_sigmoid_networks_first_layers_get_gradients_decades_smaller_than_relus() -> None:
    """Depth 8 (nine Linear layers), torch's default initialisation, one epoch of SGD, four seeds:
    log10(first layer's / last layer's gradient norm). Sigmoid's derivative is at most 1/4, so each
    layer shrinks the gradient several-fold: about 6-7 decades over the net. ReLU passes gradients
    through unchanged where active; with the default init (weights of variance 1/(3 fan_in)) they
    still shrink about 2-3 decades over nine layers, far less."""
    decades = {}
    for activation in ("sigmoid", "relu"):
        configs = [TrialConfig(dataset="moons", n_train=200, n_test=0, width=32, depth=8, activation=activation,
                               optimizer="sgd", lr=0.1, epochs=1, batch_size=32, seed=seed) for seed in range(4)]
        rows = _fused_rows(configs)
        decades[activation] = statistics.median(
            math.log10(rows[i][0].layer_grad_norms[0] / rows[i][0].layer_grad_norms[-1]) for i in rows)
    assert decades["sigmoid"] < -5
    assert decades["relu"] > -3.5
    assert decades["relu"] - decades["sigmoid"] > 3
