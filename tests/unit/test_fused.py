"""The stacked engine against the one-trial reference (tests/unit/reference_loop.py: an nn.Module,
torch.optim, torch's schedulers and norm layers): the same trials, trained stacked and one at a time.

Parity: initial weights bitwise, per-step losses to 1e-5 for every optimizer, and every per-trial
number (schedules, weight decay, l1, clipping, early stopping, epochs, losses, layer and batch norm)
inside one stack. Dropout and input noise draw differently (same distribution), so they are compared over
seeds. Endings stay per trial: divergence, cancellation, early stopping.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from services.trial_config import TrialConfig
from tests.unit.reference_loop import train_trial as reference_trial
from worker.training.fused import train_fused
from worker.training.fused_stack import initial_rows, module_weights
from worker.training.models import build_model

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")
SMALL = dict(n_train=64, n_val=48, n_test=32, width=16)


def _solo(config: TrialConfig):
    rows = []
    result = reference_trial(config, on_epoch=lambda metrics: rows.append(metrics))
    return result, rows


def _fused(configs: list[TrialConfig], stop: dict[int, int] | None = None):
    """train_fused, with each trial's rows in order; ``stop`` {trial: epoch} asks it to stop then."""
    rows: dict[int, list] = {i: [] for i in range(len(configs))}

    def on_epoch(epoch_rows):
        for index, metrics in epoch_rows.items():
            rows[index].append(metrics)
        return {i for i, epoch in (stop or {}).items() if i in epoch_rows and epoch_rows[i].epoch == epoch}

    return train_fused(configs, on_epoch=on_epoch), rows


def _assert_rows_match(fused_rows, solo_rows, *, tolerance: float) -> None:
    assert [m.epoch for m in fused_rows] == [m.epoch for m in solo_rows]
    for fused, solo in zip(fused_rows, solo_rows, strict=True):
        for name in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "train_rmse", "val_r2",
                     "lr", "grad_norm", "weight_norm"):
            a, b = getattr(fused, name), getattr(solo, name)
            assert (a is None) == (b is None), name
            if a is not None:
                scale = tolerance * (1 if name.endswith("loss") else max(1.0, abs(b)))
                assert abs(a - b) <= scale, (fused.epoch, name, a, b)
        # each Linear layer's gradient norm, as the nn.Module's own layers have it
        assert fused.layer_grad_norms == pytest.approx(solo.layer_grad_norms, rel=tolerance, abs=tolerance)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_initial_weights_are_bitwise_the_one_trial_models(optimizer):
    configs = [TrialConfig(optimizer=optimizer, seed=seed, norm=norm, depth=depth, **SMALL)
               for seed, norm, depth in [(0, "none", 2), (7, "none", 2), (123, "none", 2)]]
    template = build_model(configs[0], 2, 2, generator=torch.Generator())
    generators = [torch.Generator().manual_seed(c.seed) for c in configs]
    rows = initial_rows(template, generators)
    for config, row, generator in zip(configs, rows, generators, strict=True):
        reference_generator = torch.Generator().manual_seed(config.seed)
        reference = build_model(config, 2, 2, generator=reference_generator).state_dict()
        stacked = module_weights(template, row)
        assert stacked.keys() == reference.keys()
        assert all(torch.equal(stacked[name], reference[name]) for name in reference)
        # ... and the generator is left where build_model leaves it, so the data order follows.
        assert torch.equal(generator.get_state(), reference_generator.get_state())


# Rows at different rates step in one kernel call per rate, or in one call with the rates folded in
# (fused_optim.CALL_NUMBERS decides by cost): 0 never folds, a huge number always does.
NEVER_FOLD, ALWAYS_FOLD = 0, 10**15


@pytest.mark.parametrize("call_numbers", [NEVER_FOLD, ALWAYS_FOLD])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_the_first_ten_steps_match_the_one_trial_path(optimizer, call_numbers, monkeypatch):
    from worker.training import fused_optim

    monkeypatch.setattr(fused_optim, "CALL_NUMBERS", call_numbers)
    # Full batch: one step per epoch, so the 10 epoch rows are the losses after each of 10 steps.
    lr = 0.1 if optimizer in ("sgd", "momentum", "nesterov") else 0.01
    configs = [TrialConfig(optimizer=optimizer, seed=seed, lr=lr * scale, weight_decay=wd, momentum=mu,
                           batch_size="full", epochs=10, **SMALL)
               for seed, scale, wd, mu in [(0, 1.0, 0.0, 0.9), (1, 0.5, 0.01, 0.8), (2, 0.5, 0.0, 0.9)]]
    # Mini-batches too (2 per epoch), so each trial's data order from its own generator is checked.
    configs += [TrialConfig(optimizer=optimizer, seed=seed, lr=lr, batch_size=32, epochs=5, **SMALL)
                for seed in (3, 4)]
    minibatch = configs[3:]
    results, rows = _fused(configs[:3])
    results_mb, rows_mb = _fused(minibatch)
    for config, fused_rows in zip(configs, [rows[i] for i in range(3)] + [rows_mb[0], rows_mb[1]], strict=True):
        _, solo_rows = _solo(config)
        _assert_rows_match(fused_rows, solo_rows, tolerance=1e-5)
    assert [r.status for r in results + results_mb] == ["succeeded"] * 5


def test_every_per_trial_number_in_one_stack_matches_its_own_run():
    base = dict(optimizer="adam", **SMALL)
    schedules = [
        dict(schedule="step", step_size=2, gamma=0.5),
        dict(schedule="multistep", milestones=(2, 4)),
        dict(schedule="exponential", gamma=0.8),
        dict(schedule="cosine", min_lr=0.001),
        dict(schedule="warmup_cosine", warmup_epochs=2),
        dict(schedule="one_cycle"),
        dict(schedule="plateau", plateau_patience=1, gamma=0.5),
        dict(weight_decay=0.05, l1=0.001, grad_clip=0.5),
        dict(early_stopping={"patience": 1, "min_delta": 0.5}, lr=0.05),  # stops early
        dict(epochs=2),  # ends first: the stack compacts, the others go on
        dict(lr=0.003, betas=(0.8, 0.99)),
    ]
    configs = [TrialConfig(seed=i, norm="layer", **{"epochs": 6, **base, **extra}) for i, extra in enumerate(schedules)]
    results, rows = _fused(configs)
    for i, config in enumerate(configs):
        solo, solo_rows = _solo(config)
        _assert_rows_match(rows[i], solo_rows, tolerance=1e-5)
        fused = results[i]
        assert (fused.status, fused.epochs_run, fused.best_epoch) == (solo.status, solo.epochs_run, solo.best_epoch)
        assert fused.final_metrics.keys() == solo.final_metrics.keys()
        for key in ("stopped_epoch", "final_epoch", "parameter_count"):
            assert fused.final_metrics[key] == solo.final_metrics[key], key
        for key in ("final_val_loss", "best_val_loss", "test_loss", "test_accuracy", "baseline_val_loss"):
            assert fused.final_metrics[key] == pytest.approx(solo.final_metrics[key], abs=1e-5), key
        # the stack also keeps frames epoch by epoch (snapshots.py), which the reference loop does not take
        assert fused.artifacts.keys() - {"snapshots"} == solo.artifacts.keys() == {"boundary_2d"}
        assert fused.artifacts["boundary_2d"]["x_range"] == solo.artifacts["boundary_2d"]["x_range"]
    assert results[8].final_metrics["stopped_epoch"] is not None  # early stopping did happen


@pytest.mark.parametrize(("dataset", "loss", "extra"), [
    ("sine", "mse", dict(poly_degree=3)), ("sine", "mae", {}), ("polynomial", "huber", dict(huber_delta=0.5)),
    ("moons", "bce", {}), ("blobs", "cross_entropy", dict(label_smoothing=0.1, n_classes=4)),
    ("moons", "cross_entropy", dict(model="linear")),
])
def test_every_loss_matches_the_one_trial_path(dataset, loss, extra):
    configs = [TrialConfig(dataset=dataset, loss=loss, seed=seed, lr=lr, epochs=4, optimizer="momentum",
                           **{**SMALL, **extra}) for seed, lr in [(0, 0.05), (1, 0.02)]]
    results, rows = _fused(configs)
    for i, config in enumerate(configs):
        solo, solo_rows = _solo(config)
        _assert_rows_match(rows[i], solo_rows, tolerance=1e-5)
        assert results[i].artifacts.keys() - {"snapshots"} == solo.artifacts.keys()  # frames: stack only
        assert results[i].final_metrics["test_loss"] == pytest.approx(solo.final_metrics["test_loss"], abs=1e-5)


@pytest.mark.parametrize("call_numbers", [NEVER_FOLD, ALWAYS_FOLD])
def test_the_stack_shrinks_to_the_trials_still_training(call_numbers, monkeypatch):
    from worker.training import fused_optim, fused_stack

    monkeypatch.setattr(fused_optim, "CALL_NUMBERS", call_numbers)
    compactions = []
    original = fused_stack.StackedTraining.compact

    def spy(self):
        compacted = original(self)
        compactions.append((compacted, list(self.slots)))
        return compacted

    monkeypatch.setattr(fused_stack.StackedTraining, "compact", spy)
    configs = [TrialConfig(seed=seed, epochs=epochs, lr=0.02 * (seed + 1), **SMALL)
               for seed, epochs in [(0, 2), (1, 7), (2, 2), (3, 3)]]
    results, rows = _fused(configs)
    assert (True, [1]) in compactions  # after epoch 3 only trial 1 still trains, alone in the stack
    assert [r.epochs_run for r in results] == [2, 7, 2, 3]
    for i, config in enumerate(configs):
        _assert_rows_match(rows[i], _solo(config)[1], tolerance=1e-5)


def test_each_trial_is_reported_right_after_the_epoch_it_ended_in():
    configs = [TrialConfig(seed=seed, epochs=epochs, **SMALL) for seed, epochs in [(0, 4), (1, 2), (2, 3)]]
    epochs_seen, reported = [0], []

    def on_epoch(rows):
        epochs_seen[0] = max(m.epoch for m in rows.values())

    results = train_fused(configs, on_epoch=on_epoch,
                          on_trials_end=lambda ended: reported.append((epochs_seen[0], sorted(ended))))
    assert reported == [(2, [1]), (3, [2]), (4, [0])]
    assert [r.epochs_run for r in results] == [4, 2, 3]


def test_a_nan_in_one_trial_ends_only_that_trial():
    configs = [TrialConfig(dataset="sine", optimizer="sgd", lr=lr, seed=seed, epochs=5, **SMALL)
               for seed, lr in [(0, 0.05), (1, 10.0), (2, 0.02)]]
    results, rows = _fused(configs)
    solo_diverged, _ = _solo(configs[1])
    assert results[1].status == solo_diverged.status == "diverged"
    assert results[1].message == solo_diverged.message
    for i in (0, 2):
        assert results[i].status == "succeeded"
        _assert_rows_match(rows[i], _solo(configs[i])[1], tolerance=1e-5)


def test_a_cancelled_trial_stops_alone_and_the_others_are_unaffected():
    configs = [TrialConfig(seed=seed, epochs=6, **SMALL) for seed in range(3)]
    results, rows = _fused(configs, stop={1: 2})
    assert (results[1].status, results[1].epochs_run, results[1].message) == ("cancelled", 2, "cancelled after epoch 2")
    assert [len(rows[i]) for i in range(3)] == [6, 2, 6]
    _assert_rows_match(rows[0], _solo(configs[0])[1], tolerance=1e-5)
    _assert_rows_match(rows[2], _solo(configs[2])[1], tolerance=1e-5)


def test_a_trials_results_do_not_depend_on_its_companions(monkeypatch):
    # Dropout and input noise come from the trial's own generators, whatever else is in the stack.
    # A small draw budget makes an epoch several stretches of draws, as a large n_train does.
    from worker.training import fused_stack

    monkeypatch.setattr(fused_stack, "NOISE_CHUNK_NUMBERS", 8_000)
    small = {**SMALL, "n_train": 256}
    trial = TrialConfig(seed=5, dropout=0.3, input_noise=0.1, epochs=4, **small)
    with_a, _ = _fused([trial, TrialConfig(seed=1, lr=0.05, **small)])
    with_b, _ = _fused([TrialConfig(seed=2, dropout=0.5, epochs=2, **small), trial,
                        TrialConfig(seed=3, input_noise=0.5, **small)])
    assert with_a[0].final_metrics["final_val_loss"] == pytest.approx(with_b[1].final_metrics["final_val_loss"],
                                                                      abs=1e-6)


def test_dropout_and_input_noise_agree_with_the_one_trial_path_within_the_seed_spread():
    seeds = range(8)
    configs = [TrialConfig(seed=seed, dropout=0.3, input_noise=0.2, epochs=12, n_train=128, width=32) for seed in seeds]
    fused = [r.final_metrics["final_val_loss"] for r in train_fused(configs)]
    solo = [reference_trial(c).final_metrics["final_val_loss"] for c in configs]
    spread = max(statistics.stdev(fused), statistics.stdev(solo))
    assert spread > 0
    assert abs(statistics.mean(fused) - statistics.mean(solo)) <= spread, (fused, solo)
    assert fused != solo  # the noise really is drawn (differently), not switched off


def test_trials_that_cannot_share_a_stack_are_refused():
    with pytest.raises(ValueError, match="trial 1 differs from trial 0"):
        train_fused([TrialConfig(width=8), TrialConfig(width=16)])
    with pytest.raises(ValueError, match="trial 1 differs from trial 0"):
        train_fused([TrialConfig(norm="batch"), TrialConfig(norm="none", seed=1)])


def test_batch_norm_trials_share_a_stack_each_with_its_own_running_statistics():
    # 65 = 2 * 32 + 1: the single leftover example joins the batch before it (as the reference's
    # get_batches merges it). Different rates and endings: each row's running mean and variance
    # must move with its own batches only, and stop moving when its trial ends (the eval-mode
    # validation loss of every later epoch reads them). Momentum SGD, not Adam: the bias before a
    # batch norm gets a gradient of rounding noise only, which Adam would scale up to lr-sized
    # steps (sign(noise) * lr) that differ between any two implementations.
    configs = [TrialConfig(norm="batch", seed=seed, lr=lr, epochs=epochs, batch_size=32, optimizer="momentum",
                           early_stopping=early, **{**SMALL, "n_train": 65})
               for seed, lr, epochs, early in [(0, 0.05, 6, None), (1, 0.2, 2, None), (2, 0.01, 6, None),
                                               (3, 0.5, 6, {"patience": 1, "min_delta": 0.05})]]
    results, rows = _fused(configs)
    for i, config in enumerate(configs):
        solo, solo_rows = _solo(config)
        _assert_rows_match(rows[i], solo_rows, tolerance=1e-5)
        assert (results[i].epochs_run, results[i].best_epoch) == (solo.epochs_run, solo.best_epoch)
        for key in ("test_loss", "test_accuracy", "best_val_loss", "weight_l1"):
            assert results[i].final_metrics[key] == pytest.approx(solo.final_metrics[key], abs=1e-5), key
    assert results[3].final_metrics["stopped_epoch"] is not None and results[1].epochs_run == 2


def test_a_model_too_wide_to_be_worth_fusing_still_trains_as_a_stack_of_one():
    # The planner keeps wide models out of fused jobs; the engine trains any one trial.
    config = TrialConfig(width=1500, depth=2, epochs=2, n_train=64, n_val=32, n_test=0, batch_size=32,
                         optimizer="momentum", lr=0.01)
    [result], rows = _fused([config])
    _assert_rows_match(rows[0], _solo(config)[1], tolerance=1e-5)
    assert result.status == "succeeded"


def test_epoch_seconds_are_each_trials_share_of_the_stack():
    configs = [TrialConfig(seed=seed, epochs=3, **SMALL) for seed in range(4)]
    results, rows = _fused(configs)
    assert all(m.epoch_seconds > 0 and math.isfinite(m.epoch_seconds) for r in rows.values() for m in r)
    assert all(r.final_metrics["train_seconds"] >= sum(m.epoch_seconds for m in rows[i])
               for i, r in enumerate(results))


def test_a_data_set_too_big_to_copy_per_trial_is_gathered_step_by_step_with_the_same_result(monkeypatch):
    from worker.training import fused

    configs = [TrialConfig(seed=seed, epochs=3, batch_size=16, **SMALL) for seed in range(3)]
    whole, _ = _fused(configs)
    monkeypatch.setattr(fused, "EPOCH_GATHER_NUMBERS", 0)
    stepwise, _ = _fused(configs)
    assert [r.final_metrics["final_val_loss"] for r in whole] == [r.final_metrics["final_val_loss"] for r in stepwise]


@pytest.mark.parametrize(("dataset", "loss", "extra"), [
    ("moons", "cross_entropy", {}), ("moons", "bce", {}), ("blobs", "cross_entropy", dict(n_classes=4)),
    ("blobs", "cross_entropy", dict(n_classes=12)), ("sine", "mse", {}),
])
def test_a_stacks_artifacts_and_weight_statistics_are_each_trials_own_bitwise(dataset, loss, extra):
    # The end of a fused job measures every trial at once; each trial must get exactly what
    # prediction_artifacts and weight_statistics give its own model (here: a stand-in module that
    # returns the trial's row of the stacked outputs, as the stacked forward computes them).
    from worker.training.artifacts import prediction_artifacts
    from worker.training.data import make_dataset
    from worker.training.fused_results import stacked_prediction_artifacts, weight_statistics_rows
    from worker.training.fused_stack import StackedModel
    from worker.training.losses import model_outputs, penalised_weights, resolve_loss, weight_statistics

    config = TrialConfig(dataset=dataset, loss=loss, **{**SMALL, **extra})
    splits = make_dataset(config)
    outputs = model_outputs(resolve_loss(config, task=splits.task, n_classes=splits.n_outputs), splits.n_outputs)
    template = build_model(config, splits.n_features, outputs, generator=torch.Generator(), task=splits.task)
    rows = initial_rows(template, [torch.Generator().manual_seed(seed) for seed in range(4)]) * 3
    rows[3, 0] = math.inf  # a broken trial: no weight statistics, and a picture with gaps
    stacked = StackedModel(template, rows)

    class Row(torch.nn.Module):
        def __init__(self, row: int) -> None:
            super().__init__()
            self.row = row

        def forward(self, x):
            return stacked.evaluate(x)[self.row].mT

    pictures = stacked_prediction_artifacts(stacked, [True] * 4, splits=splits, config=config,
                                                device=torch.device("cpu"))
    statistics = weight_statistics_rows(template, rows, [True] * 4)
    for row in range(4):
        assert pictures[row] == prediction_artifacts(Row(row), splits, config, "cpu")
        module = build_model(config, splits.n_features, outputs, generator=torch.Generator(), task=splits.task)
        module.load_state_dict(module_weights(template, rows[row]))
        assert statistics[row] == weight_statistics(penalised_weights(module))
    assert pictures[0] and statistics[0]["weight_l1"] > 0 and statistics[3]["weight_l1"] is None


def test_batch_norm_rows_normalise_and_keep_statistics_as_torchs_own_layer_does():
    # Each row against nn.BatchNorm1d on that row's own batch: the same outputs, and the same
    # running statistics afterwards - except a frozen row's, which must not move at all.
    from worker.training.fused_stack import StackedModel

    config = TrialConfig(norm="batch", depth=1, width=8, **{k: v for k, v in SMALL.items() if k != "width"})
    template = build_model(config, 2, 2, generator=torch.Generator())
    rows = initial_rows(template, [torch.Generator().manual_seed(seed) for seed in range(3)])
    stacked = StackedModel(template, rows)
    x = torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(0))
    before = [statistic.clone() for statistic in stacked.statistics]
    frozen = torch.tensor([False, True, False]).view(-1, 1, 1)
    outputs = stacked.forward(x, train=True, frozen=frozen)
    for row in range(3):
        module = build_model(config, 2, 2, generator=torch.Generator())
        module.load_state_dict(module_weights(template, rows[row]), strict=False)
        expected = module.train()(x[row])
        torch.testing.assert_close(outputs[row].mT, expected, rtol=1e-5, atol=1e-6)
        moved = [statistic[row].view(-1) for statistic in stacked.statistics]
        if row == 1:
            assert all(torch.equal(now, then[row].view(-1)) for now, then in zip(moved, before, strict=True))
        else:
            torch.testing.assert_close(moved, [module[1].running_mean, module[1].running_var], rtol=1e-5, atol=1e-7)
    assert not torch.equal(stacked.statistics[0], before[0])  # the statistics did move
