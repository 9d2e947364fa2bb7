"""Learning-rate schedules: each one's rate sequence equals torch's own scheduler run side by side."""

from __future__ import annotations

import pytest
import torch
from torch.optim import lr_scheduler

from services.trial_config import TrialConfig
from worker.training import EpochMetrics, train_trial
from worker.training.fused_optim import StepRates
from worker.training.schedules import build_schedule

EPOCHS, STEPS, LR = 30, 4, 0.1



def _optimizer(lr: float = LR) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)


def _engine_rates(config: TrialConfig, val_losses: list[float]) -> list[float]:
    """The rate of every step, as the engine's schedule sets it."""
    optimizer = _optimizer()
    schedule = build_schedule(config, optimizer, steps_per_epoch=STEPS)
    rates = []
    for epoch in range(config.epochs):
        for _ in range(STEPS):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.after_step()
        schedule.after_epoch(val_losses[epoch])
    return rates


def _torch_rates(make, *, per_step: bool, val_losses: list[float], epochs: int = EPOCHS,
                 lr: float = LR) -> list[float]:
    optimizer = _optimizer(lr)
    scheduler = make(optimizer)
    rates = []
    for epoch in range(epochs):
        for _ in range(STEPS):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if per_step:
                scheduler.step()
        if not per_step:
            if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val_losses[epoch])
            else:
                scheduler.step()
    return rates


# Validation loss that improves for 8 epochs, then stalls: plateau must decay a few times.
VAL_LOSSES = [1.0 - 0.1 * min(e, 8) for e in range(EPOCHS)]

CASES = {
    "constant": (dict(), lambda o: lr_scheduler.LambdaLR(o, lambda e: 1.0), False),
    "step": (dict(step_size=7, gamma=0.3), lambda o: lr_scheduler.StepLR(o, step_size=7, gamma=0.3), False),
    "multistep": (dict(milestones=(5, 12, 20), gamma=0.5),
                  lambda o: lr_scheduler.MultiStepLR(o, milestones=[5, 12, 20], gamma=0.5), False),
    "exponential": (dict(gamma=0.9), lambda o: lr_scheduler.ExponentialLR(o, gamma=0.9), False),
    "cosine": (dict(min_lr=0.01), lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=EPOCHS, eta_min=0.01), False),
    "warmup_cosine": (
        dict(warmup_epochs=5, min_lr=0.01),
        lambda o: lr_scheduler.SequentialLR(o, [
            lr_scheduler.LinearLR(o, start_factor=1 / 5, end_factor=1.0, total_iters=4),
            lr_scheduler.CosineAnnealingLR(o, T_max=EPOCHS - 5, eta_min=0.01),
        ], milestones=[5]),
        False,
    ),
    "one_cycle": (dict(), lambda o: lr_scheduler.OneCycleLR(
        o, max_lr=LR, total_steps=EPOCHS * STEPS, cycle_momentum=False), True),
    "plateau": (dict(gamma=0.5, plateau_patience=3),
                lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=3), False),
}


@pytest.mark.parametrize("schedule", sorted(CASES))
def test_rate_sequence_equals_torchs_scheduler(schedule: str) -> None:
    fields, make, per_step = CASES[schedule]
    config = TrialConfig(schedule=schedule, lr=LR, epochs=EPOCHS, **fields)

    engine = _engine_rates(config, VAL_LOSSES)
    reference = _torch_rates(make, per_step=per_step, val_losses=VAL_LOSSES)

    assert engine == pytest.approx(reference, rel=1e-9, abs=1e-12)
    if schedule != "constant":
        assert len(set(round(r, 12) for r in engine)) > 1, "the schedule never moved the rate"


def test_warmup_cosine_rises_linearly_then_falls_to_the_floor() -> None:
    config = TrialConfig(schedule="warmup_cosine", lr=LR, epochs=EPOCHS, warmup_epochs=5, min_lr=0.01)
    per_epoch = _engine_rates(config, VAL_LOSSES)[::STEPS]

    assert per_epoch[:5] == pytest.approx([LR * k / 5 for k in range(1, 6)])
    assert per_epoch[5] == pytest.approx(LR)
    assert all(a >= b for a, b in zip(per_epoch[5:], per_epoch[6:], strict=False))
    assert 0.01 < per_epoch[-1] < 0.012


def test_plateau_with_gamma_one_keeps_the_rate() -> None:
    config = TrialConfig(schedule="plateau", lr=LR, epochs=EPOCHS, gamma=1.0, plateau_patience=1)
    assert set(_engine_rates(config, VAL_LOSSES)) == {LR}


@pytest.mark.parametrize("schedule", ["step", "one_cycle", "plateau"])
def test_the_lr_metric_is_the_rate_each_epoch_trained_at(schedule: str) -> None:
    config = TrialConfig(schedule=schedule, step_size=2, gamma=0.5, plateau_patience=1, lr=0.05, epochs=6,
                         n_train=64, n_val=32, n_test=0, width=8, batch_size=16)
    rows: list[EpochMetrics] = []
    train_trial(config, on_epoch=rows.append)

    if schedule == "step":
        assert [m.lr for m in rows] == pytest.approx([0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125])
    elif schedule == "one_cycle":
        reference = _torch_rates(lambda o: lr_scheduler.OneCycleLR(
            o, max_lr=0.05, total_steps=6 * 4, cycle_momentum=False), per_step=True, val_losses=[], epochs=6, lr=0.05)
        assert [m.lr for m in rows] == pytest.approx(reference[::4])  # 64 / 16 = 4 steps per epoch
    else:  # torch's scheduler, fed the validation losses the trial reported
        reference = _torch_rates(lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=1),
                                 per_step=False, val_losses=[m.val_loss for m in rows], epochs=6, lr=0.05)
        assert [m.lr for m in rows] == pytest.approx(reference[::4])


# --- the learning-rate range test ---------------------------------------------------------------

RANGE = dict(schedule="lr_range_test", min_lr=1e-5, lr=LR, epochs=EPOCHS)


def test_range_test_rates_equal_torchs_exponential_and_lambda_schedulers_to_1e_12() -> None:
    config = TrialConfig(**RANGE)
    total = EPOCHS * STEPS
    factor = (LR / 1e-5) ** (1 / (total - 1))  # the same factor every step
    exponential = _torch_rates(lambda o: lr_scheduler.ExponentialLR(o, gamma=factor), per_step=True,
                               val_losses=[], lr=1e-5)
    lambda_lr = _torch_rates(lambda o: lr_scheduler.LambdaLR(o, lambda step: 1e-5 / LR * factor ** step),
                             per_step=True, val_losses=[], lr=LR)
    engine = _engine_rates(config, VAL_LOSSES)  # the one-module path: schedules.build_schedule
    stacked = [rate for epoch in range(1, EPOCHS + 1) for rate in StepRates(config, steps=STEPS).epoch(epoch)]

    assert engine[0] == stacked[0] == 1e-5 and stacked[-1] == pytest.approx(LR, abs=1e-12)
    for rates in (engine, stacked):
        assert rates == pytest.approx(exponential, rel=1e-12, abs=1e-12)
        assert rates == pytest.approx(lambda_lr, rel=1e-12, abs=1e-12)
    assert all(b > a for a, b in zip(stacked, stacked[1:], strict=False))  # it rises every step


@pytest.mark.parametrize(("min_lr", "lr"), [(0.0, 0.1), (0.1, 0.1), (0.5, 0.1)])
def test_range_test_refuses_a_start_that_is_not_between_0_and_lr(min_lr: float, lr: float) -> None:
    with pytest.raises(ValueError, match=r"min_lr .* must be above 0 and below lr .* lr_range_test"):
        TrialConfig(schedule="lr_range_test", min_lr=min_lr, lr=lr)


def test_the_spec_says_min_lr_is_ignored_where_no_schedule_uses_it() -> None:
    from services.spec import parse_spec

    ignored = parse_spec("name: t\nparameters:\n  min_lr: {value: 0.001}\n  schedule: {values: [constant, step]}\n")
    used = parse_spec("name: t\nparameters:\n  min_lr: {value: 0.001}\n  schedule: {values: [constant, cosine]}\n")

    assert any(w.startswith("min_lr: only schedules") and "constant, step" in w for w in ignored.warnings)
    assert not any(w.startswith("min_lr") for w in used.warnings)


def test_a_range_test_trial_records_every_steps_rate_and_loss() -> None:
    config = TrialConfig(schedule="lr_range_test", min_lr=1e-4, lr=1.0, epochs=3, optimizer="sgd",
                         n_train=64, n_val=32, n_test=0, width=8, batch_size=16)  # 4 steps per epoch
    rows: list[EpochMetrics] = []
    result = train_trial(config, on_epoch=rows.append)
    curve = result.artifacts["lr_range"]

    assert curve["steps"] == len(curve["lr"]) == len(curve["loss"]) == 12
    assert curve["lr"] == pytest.approx([1e-4 * (1e4 ** (s / 11)) for s in range(12)], rel=1e-12)
    assert [m.lr for m in rows] == curve["lr"][::4]  # the lr column: each epoch's first step
    assert all(loss > 0 for loss in curve["loss"])


def test_the_range_tests_curve_is_thinned_evenly_keeping_both_ends() -> None:
    from worker.training.artifacts import LR_RANGE_POINTS, lr_range_artifact

    points = [(float(i), float("nan") if i == 7 else float(i)) for i in range(5_001)]
    curve = lr_range_artifact(points)

    assert len(curve["lr"]) == LR_RANGE_POINTS and curve["steps"] == 5_001
    assert curve["lr"][0] == 0 and curve["lr"][-1] == 5_000
    gaps = {round(b - a) for a, b in zip(curve["lr"], curve["lr"][1:], strict=False)}
    assert gaps <= {2, 3}  # evenly: 5,000 / 1,999 apart
    assert lr_range_artifact([(1.0, 2.0), (2.0, float("inf"))])["loss"] == [2.0, None]


@pytest.mark.parametrize("fields", [dict(schedule="constant"), dict(schedule="plateau", gamma=1.0)])
def test_a_constant_rate_equals_torchs_stand_in_and_resumes_from_older_checkpoints(fields) -> None:
    # Older checkpoints held a constant rate's stand-in torch optimizer; the rate is config.lr either way.
    config = TrialConfig(lr=0.0123, epochs=EPOCHS, **fields)
    holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.lr)
    rates = StepRates(config, steps=STEPS)
    assert rates.holder is None and rates.state() is None
    for epoch in range(1, EPOCHS + 1):
        assert rates.epoch(epoch) == [holder.param_groups[0]["lr"]] * STEPS
        rates.after_epoch(1.0)
    older = StepRates(config, steps=STEPS)
    older.restore({"holder": holder.state_dict(), "schedule": None})
    assert older.epoch(3) == [config.lr] * STEPS
    with pytest.raises(ValueError, match="another schedule"):
        older.restore({"holder": holder.state_dict(), "schedule": {"last_epoch": 2}})


def test_a_constant_rate_grid_never_imports_torchs_compiler() -> None:
    # A process's first torch optimizer imports torch._dynamo (~1.5 s at each worker start).
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = ("import sys\n"
              "from services.trial_config import TrialConfig\n"
              "from worker.training.fused import train_fused\n"
              "train_fused([TrialConfig(dataset='moons', n_train=32, n_val=16, n_test=16, width=8, epochs=2, seed=s)"
              " for s in range(2)])\n"
              "print('torch._dynamo' in sys.modules)\n")
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300,
                         cwd=root, env=env)
    assert out.stdout.strip().splitlines()[-1] == "False"
