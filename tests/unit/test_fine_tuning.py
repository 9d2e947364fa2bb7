"""Fine-tuning in the engine: a trial started from a parent's kept best-epoch weights, with every layer
fixed and a tiny rate, begins exactly where the parent was best; fixed layers stay bitwise where they
started whatever weight decay and momentum do; the leading layers of the same shapes are taken, the
rest drawn; and a fine-tuned, cross-validated job stopped after a checkpoint resumes bitwise."""

from __future__ import annotations

import json

import pytest
import torch

from services.trial_config import TrialConfig
from tests.unit.test_fused_resume import _result_without_timings, _run, _without_timings
from worker.training.checkpoint import job_state_from_bytes
from worker.training.fine_tuning import decode_row, start_from, weights_artifact
from worker.training.fused import train_fused
from worker.training.fused_stack import initial_rows, module_weights
from worker.training.models import build_model

PARENT = dict(dataset="moons", n_train=200, n_val=100, n_test=50, width=16, depth=2, epochs=12, lr=0.02)


def _parent(**overrides):
    """A parent trained beside another trial (as in a grid), its rows and its result."""
    rows: list = []
    results = train_fused([TrialConfig(**{**PARENT, **overrides}), TrialConfig(**{**PARENT, **overrides, "seed": 9})],
                          on_epoch=lambda epoch_rows: rows.append(epoch_rows[0]) and None)
    return results[0], rows


def test_a_child_with_every_layer_fixed_starts_at_its_parents_best_training_loss():
    parent, parent_rows = _parent(optimizer="adamw", weight_decay=0.01)
    best = parent_rows[parent.best_epoch - 1]
    assert best.epoch == parent.best_epoch
    child = TrialConfig(**{**PARENT, "init_from": 1, "freeze": 3, "lr": 1e-9, "epochs": 2, "seed": 5,
                           "optimizer": "adamw", "weight_decay": 0.1})
    rows: list = []
    [result] = train_fused([child], parents=[parent.best_weights], on_epoch=lambda r: rows.append(r[0]) and None)
    assert rows[0].train_loss == pytest.approx(best.train_loss, rel=1e-6)
    assert rows[0].val_loss == pytest.approx(best.val_loss, rel=1e-6)
    assert result.best_weights["data"] == parent.best_weights["data"]  # not one bit moved


def test_fixed_layers_stay_bitwise_under_weight_decay_and_momentum_while_the_others_train():
    parent, _ = _parent()
    start = decode_row(parent.best_weights)
    child = TrialConfig(**{**PARENT, "init_from": 1, "freeze": 1, "lr": 0.5, "epochs": 3, "optimizer": "momentum",
                           "weight_decay": 0.5})
    [result] = train_fused([child], parents=[parent.best_weights])
    end = decode_row(result.best_weights)
    template = build_model(child, 2, 2, generator=torch.Generator())
    before, after = module_weights(template, start), module_weights(template, end)
    assert torch.equal(before["0.weight"], after["0.weight"]) and torch.equal(before["0.bias"], after["0.bias"])
    assert not torch.equal(before["2.weight"], after["2.weight"]) and not torch.equal(before["4.weight"],
                                                                                          after["4.weight"])


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_a_fixed_layer_keeps_the_norm_after_it_fixed_too(norm):
    """freeze: 1 fixes the first linear layer and the scale and shift of the norm of its output; the
    second layer's norm trains (it used to train the first norm too, moving what "fixed" keeps)."""
    parent, _ = _parent(norm=norm)
    start = decode_row(parent.best_weights)
    child = TrialConfig(**{**PARENT, "norm": norm, "init_from": 1, "freeze": 1, "lr": 0.5, "epochs": 3,
                           "optimizer": "momentum", "weight_decay": 0.5})
    [result] = train_fused([child], parents=[parent.best_weights])
    template = build_model(child, 2, 2, generator=torch.Generator())
    before, after = module_weights(template, start), module_weights(template, decode_row(result.best_weights))
    assert isinstance(template[1], torch.nn.LayerNorm | torch.nn.BatchNorm1d)
    for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
        assert torch.equal(before[name], after[name]), name
    for name in ("3.weight", "4.weight", "4.bias"):
        assert not torch.equal(before[name], after[name]), name


def test_the_artifact_is_plain_json_and_gives_the_row_back_bitwise():
    template = build_model(TrialConfig(**PARENT), 2, 2, generator=torch.Generator())
    row = initial_rows(template, [torch.Generator().manual_seed(3)])[0]
    artifact = json.loads(json.dumps(weights_artifact(template, row)))
    assert torch.equal(decode_row(artifact), row)
    assert [layer["shapes"][0] for layer in artifact["layers"]] == [[16, 2], [16, 16], [2, 16]]


def test_a_new_output_layer_takes_the_parents_leading_layers_and_draws_the_rest():
    parent_config = TrialConfig(**{**PARENT, "dataset": "blobs", "n_classes": 3})
    child_config = TrialConfig(**{**PARENT, "dataset": "blobs", "n_classes": 4, "init_from": 1, "seed": 7})
    parent_template = build_model(parent_config, 2, 3, generator=torch.Generator())
    parent_row = initial_rows(parent_template, [torch.Generator().manual_seed(1)])[0]
    template = build_model(child_config, 2, 4, generator=torch.Generator())
    drawn = initial_rows(template, [torch.Generator().manual_seed(7)])
    rows = drawn.clone()
    start_from(template, rows, [weights_artifact(parent_template, parent_row)])
    theirs, ours, own = (module_weights(t, r) for t, r in ((parent_template, parent_row), (template, rows[0]),
                                                             (template, drawn[0])))
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        assert torch.equal(ours[name], theirs[name]), name
    for name in ("4.weight", "4.bias"):  # 4 outputs, not 3: the child's own draw
        assert torch.equal(ours[name], own[name]), name


def test_a_first_layer_of_another_shape_is_refused_naming_both():
    parent_template = build_model(TrialConfig(**PARENT), 2, 2, generator=torch.Generator())
    artifact = weights_artifact(parent_template, initial_rows(parent_template, [torch.Generator()])[0])
    template = build_model(TrialConfig(**{**PARENT, "width": 8}), 2, 2, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"parent's first layer is 16 x 2 .* but this trial's is 8 x 2"):
        start_from(template, initial_rows(template, [torch.Generator()]), [artifact])


def test_a_fine_tuned_cross_validated_job_resumed_from_its_checkpoint_matches_an_uninterrupted_one_bitwise():
    parent, _ = _parent()
    configs = [TrialConfig(**{**PARENT, "n_train": 40, "epochs": 8, "folds": 3, "fold": 2, "seed": seed,
                              "optimizer": "momentum", **extra})
               for seed, extra in enumerate([
                   dict(init_from=1, freeze=1, weight_decay=0.05, lr=0.05),
                   dict(init_from=1, freeze=0, dropout=0.1, lr=0.01),
                   dict(lr=0.02)])]  # one from its own draw beside them
    parents = [parent.best_weights, parent.best_weights, None]
    full, full_rows, _, _ = _run(configs, parents=parents)
    _, scratch_rows, _, _ = _run(configs)
    assert full_rows[0][0].train_loss != scratch_rows[0][0].train_loss  # the parents did shape the run
    assert _without_timings(full_rows[2]) == _without_timings(scratch_rows[2])  # and only their own trials
    _, first_rows, _, data = _run(configs, stop_after=4, parents=parents)
    # A resume puts back the checkpointed weights: no parent is needed, and none is given.
    resumed, resumed_rows, _, _ = _run(configs, resume=job_state_from_bytes(data))
    for i in range(len(configs)):
        assert _without_timings(first_rows[i] + resumed_rows[i]) == _without_timings(full_rows[i]), i
        assert _result_without_timings(resumed[i]) == _result_without_timings(full[i]), i
