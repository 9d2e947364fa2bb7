"""2-D test functions: the engine's path of a point against torch.optim run directly on the same
function, where descent ends (minima, the saddle), stored paths, resume, and the spec's refusals."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from services.planner import plan_jobs
from services.spec import SpecError, expand, parse_spec
from services.surfaces import SURFACES
from services.trial_config import TrialConfig
from worker.training.artifacts import thin
from worker.training.checkpoint import job_state_from_bytes, job_state_to_bytes
from worker.training.fused import train_fused

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")


def _torch_optimizer(config: TrialConfig, point: torch.Tensor) -> torch.optim.Optimizer:
    common = {"lr": config.lr, "weight_decay": config.weight_decay}
    return {
        "sgd": lambda: torch.optim.SGD([point], **common),
        "momentum": lambda: torch.optim.SGD([point], momentum=config.momentum, **common),
        "nesterov": lambda: torch.optim.SGD([point], momentum=config.momentum, nesterov=True, **common),
        "adagrad": lambda: torch.optim.Adagrad([point], **common),
        "rmsprop": lambda: torch.optim.RMSprop([point], **common),
        "adam": lambda: torch.optim.Adam([point], betas=config.betas, **common),
        "adamw": lambda: torch.optim.AdamW([point], betas=config.betas, **common),
    }[config.optimizer]()


def _torch_scheduler(config: TrialConfig, optimizer: torch.optim.Optimizer):
    schedulers = torch.optim.lr_scheduler
    return {
        "constant": lambda: None,
        "step": lambda: schedulers.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma),
        "cosine": lambda: schedulers.CosineAnnealingLR(optimizer, T_max=config.epochs, eta_min=config.min_lr),
        "one_cycle": lambda: schedulers.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.epochs,
                                                   cycle_momentum=False),
    }[config.schedule]()


def torch_reference(config: TrialConfig) -> tuple[float, float]:
    """The final point of torch.optim itself on the function: a float64 tensor of 2 parameters, one
    step per epoch, with torch's gradient clipping and scheduler."""
    point = torch.tensor(config.resolved_start, dtype=torch.float64, requires_grad=True)
    optimizer = _torch_optimizer(config, point)
    scheduler = _torch_scheduler(config, optimizer)
    function = SURFACES[config.dataset].value
    for _ in range(config.epochs):
        optimizer.zero_grad()
        function(point[0], point[1], torch.cos).backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([point], config.grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    x, y = point.detach().tolist()
    return x, y


# Rates each function takes without diverging from its default start (rosenbrock's valley is steep).
RATES = {"himmelblau": (0.01, 0.003), "rosenbrock": (0.001, 0.0003), "saddle": (0.05, 0.01)}


def test_every_optimizer_ends_where_torch_optim_ends_on_himmelblau_rosenbrock_and_the_saddle():
    # One job of every function x optimizer x two rates, as a grid fuses: each row its own trial.
    configs = [TrialConfig(dataset=function, optimizer=optimizer, lr=lr, epochs=60)
               for function, rates in RATES.items() for optimizer in OPTIMIZERS for lr in rates]
    results = train_fused(configs)
    for config, result in zip(configs, results, strict=True):
        expected = torch_reference(config)
        final = result.final_metrics
        assert result.status == "succeeded", (config.dataset, config.optimizer)
        assert final["final_x"] == pytest.approx(expected[0], abs=1e-9), (config.dataset, config.optimizer, config.lr)
        assert final["final_y"] == pytest.approx(expected[1], abs=1e-9), (config.dataset, config.optimizer, config.lr)
        assert final["final_value"] == pytest.approx(SURFACES[config.dataset].value(*expected, math.cos), abs=1e-9)
    # the trials moved (a test that cannot fail is no test): adam on himmelblau leaves its start
    assert results[10].final_metrics["final_x"] != 0.0


@pytest.mark.parametrize("config", [
    TrialConfig(dataset="himmelblau", optimizer="momentum", lr=0.02, momentum=0.8, weight_decay=0.01,
                schedule="step", step_size=20, gamma=0.5, grad_clip=5.0, epochs=80, start=(-1.0, -1.5)),
    TrialConfig(dataset="rosenbrock", optimizer="adam", lr=0.05, betas=(0.8, 0.99), schedule="cosine",
                grad_clip=1.0, epochs=80),
    TrialConfig(dataset="saddle", optimizer="adamw", lr=0.1, weight_decay=0.1, schedule="one_cycle", epochs=60,
                start=(1.0, 0.2)),
], ids=["momentum-step-clip", "adam-cosine-clip", "adamw-one_cycle"])
def test_schedules_weight_decay_and_clipping_follow_torch(config: TrialConfig):
    [result] = train_fused([config])
    expected = torch_reference(config)
    assert (result.final_metrics["final_x"], result.final_metrics["final_y"]) == pytest.approx(expected, abs=1e-9)


def test_an_epoch_row_is_one_step_its_value_and_the_gradient_it_used():
    config = TrialConfig(dataset="himmelblau", optimizer="sgd", lr=0.01, epochs=3, start=(1.0, 1.0))
    rows = []
    [result] = train_fused([config], on_epoch=lambda metrics: rows.append(metrics[0]))
    x, y = 1.0, 1.0
    for row in rows:  # by hand: the gradient of himmelblau, then w <- w - lr * grad
        gx = 4 * x * (x * x + y - 11) + 2 * (x + y * y - 7)
        gy = 2 * (x * x + y - 11) + 4 * y * (x + y * y - 7)
        assert row.grad_norm == pytest.approx(math.hypot(gx, gy), rel=1e-12)
        x, y = x - 0.01 * gx, y - 0.01 * gy
        assert row.train_loss == pytest.approx(SURFACES["himmelblau"].value(x, y, math.cos), rel=1e-12)
        assert row.val_loss is None and row.lr == 0.01
    path = result.artifacts["path_2d"]
    assert path["step"] == [0, 1, 2, 3] and path["x"][0] == 1.0 and path["x"][-1] == pytest.approx(x, rel=1e-12)


def test_plain_sgd_from_four_starts_reaches_himmelblaus_four_minima():
    starts = [(1.0, 1.0), (-1.0, 1.5), (-1.0, -1.5), (1.0, -1.5)]
    results = train_fused([TrialConfig(dataset="himmelblau", optimizer="sgd", lr=0.01, epochs=200, start=start)
                           for start in starts])
    reached = [result.final_metrics["reached"] for result in results]
    assert reached == ["(3, 2)", "(-2.81, 3.13)", "(-3.78, -3.28)", "(3.58, -1.85)"]
    assert len({m.name for m in SURFACES["himmelblau"].minima}) == 4


def test_beside_the_saddle_sgd_lingers_while_momentum_reaches_a_minimum():
    beside = (1e-3, 1e-3)
    sgd, slow_momentum, momentum = train_fused([
        TrialConfig(dataset="saddle", optimizer="sgd", lr=0.01, epochs=100, start=beside),
        TrialConfig(dataset="saddle", optimizer="momentum", lr=0.01, epochs=100, start=beside),
        TrialConfig(dataset="saddle", optimizer="momentum", lr=0.2, epochs=100, start=beside),
    ])
    sgd_final = sgd.final_metrics
    assert math.hypot(sgd_final["final_x"], sgd_final["final_y"]) < 0.1  # still at the saddle (0, 0)
    assert sgd_final["reached"] is None
    # at the same small rate, momentum has carried its point 100 times further from the saddle
    assert abs(slow_momentum.final_metrics["final_y"]) > 100 * abs(sgd_final["final_y"])
    assert momentum.final_metrics["reached"] == "(0, 1)"
    assert sgd.best_epoch is not None and sgd.status == momentum.status == "succeeded"


def test_a_point_exactly_on_the_saddle_is_reported_there():
    [result] = train_fused([TrialConfig(dataset="saddle", optimizer="sgd", lr=0.01, epochs=5, start=(0.0005, 0.0))])
    assert result.final_metrics["reached"] == "saddle"


def test_too_large_a_rate_diverges_and_keeps_the_finite_path():
    [result] = train_fused([TrialConfig(dataset="rosenbrock", optimizer="sgd", lr=0.1, epochs=50)])
    assert result.status == "diverged"
    path = result.artifacts["path_2d"]
    assert all(math.isfinite(v) for v in path["x"] + path["y"]) and len(path["x"]) >= 2
    assert result.final_metrics["reached"] is None and result.final_metrics["final_value"] is None


def test_paths_are_thinned_evenly_to_2000_points_keeping_first_and_last():
    assert thin(10, 2000) == list(range(10))
    kept = thin(5001, 2000)
    assert len(kept) == 2000 and kept[0] == 0 and kept[-1] == 5000
    gaps = {b - a for a, b in zip(kept, kept[1:], strict=False)}
    assert gaps <= {2, 3}
    [result] = train_fused([TrialConfig(dataset="ill_conditioned", optimizer="sgd", lr=0.001, epochs=2001)])
    path = result.artifacts["path_2d"]
    assert len(path["x"]) == 2000 and path["step"][0] == 0 and path["step"][-1] == 2001
    assert (path["x"][0], path["y"][0]) == SURFACES["ill_conditioned"].start


def test_a_surface_job_resumes_from_its_checkpoint_as_if_it_never_stopped():
    configs = [TrialConfig(dataset="himmelblau", optimizer=optimizer, lr=0.01, epochs=40, schedule="step",
                           step_size=10) for optimizer in ("momentum", "adam")]
    configs.append(TrialConfig(dataset="saddle", optimizer="adam", lr=0.05, epochs=15))
    straight = train_fused(configs)
    saved = {}

    def checkpoint(epoch, capture):
        if epoch == 20:
            saved["state"] = job_state_to_bytes(capture())

    train_fused(configs, checkpoint=checkpoint)
    resumed = train_fused(configs, resume=job_state_from_bytes(saved["state"]))
    for a, b in zip(straight, resumed, strict=True):
        assert (a.final_metrics["final_x"], a.final_metrics["final_y"]) == (
            b.final_metrics["final_x"], b.final_metrics["final_y"])
        assert a.artifacts["path_2d"] == b.artifacts["path_2d"] and a.epochs_run == b.epochs_run


def test_a_grid_of_every_function_and_optimizer_is_one_job():
    configs = [TrialConfig(dataset=function, optimizer=optimizer) for function in SURFACES for optimizer in OPTIMIZERS]
    configs = configs * 3  # 126 trials: more than a network job's 64, and more than the idle processes
    assert plan_jobs(configs, max_trials=64, slots=8) == [list(range(len(configs)))]


def test_long_surface_trials_split_so_a_jobs_paths_stay_bounded():
    from services.planner import SURFACE_PATH_POINTS

    configs = [TrialConfig(dataset="rosenbrock", lr=0.001 * (i + 1), epochs=10_000) for i in range(600)]
    jobs = plan_jobs(configs, max_trials=64, slots=1)
    assert sorted(i for job in jobs for i in job) == list(range(600)) and len(jobs) == 4
    assert all(len(job) * 10_001 <= SURFACE_PATH_POINTS for job in jobs)


SPEC = """
name: surfaces
parameters:
  dataset: {values: [himmelblau, saddle]}
  start: {values: [[1, 1], [-1, 1.5]]}
  optimizer: {values: [sgd, adam]}
"""


def test_start_is_a_grid_parameter_with_a_default_per_function():
    configs = expand(parse_spec(SPEC))
    assert [c.resolved_start for c in configs[:4]] == [(1.0, 1.0), (1.0, 1.0), (-1.0, 1.5), (-1.0, 1.5)]
    assert TrialConfig(dataset="rosenbrock").resolved_start == (-1.2, 1.0)


@pytest.mark.parametrize(("extra", "expected"), [
    ("  width: {values: [8, 64]}\n", "parameters.width: width does not apply to dataset himmelblau"),
    ("  dropout: {value: 0.5}\n", "parameters.dropout: dropout does not apply to dataset himmelblau"),
    ("  norm: {value: batch}\n", "parameters.norm: norm does not apply"),
])
def test_network_parameters_are_refused_for_a_surface_naming_the_field(extra: str, expected: str):
    with pytest.raises(SpecError) as error:
        parse_spec(SPEC + extra)
    assert len(error.value.problems) == 1 and error.value.problems[0].startswith(expected)
    assert "remove" in error.value.problems[0]


def test_start_is_refused_on_a_data_set_and_must_be_two_numbers():
    with pytest.raises(SpecError, match="start applies to the 2-D test functions"):
        expand(parse_spec("name: x\nparameters:\n  dataset: {value: moons}\n  start: {value: [1, 2]}\n"))
    with pytest.raises(SpecError, match=r"parameters\.start\.value"):
        parse_spec("name: x\nparameters:\n  dataset: {value: saddle}\n  start: {value: [1, 2, 3]}\n")
    with pytest.raises(ValueError, match="depth does not apply to dataset rastrigin"):
        TrialConfig(dataset="rastrigin", depth=4)


def test_the_cli_refuses_a_network_parameter_on_a_surface_with_exit_2(tmp_path, monkeypatch):
    from services.cli import app

    monkeypatch.setenv("FITSCOPE_HOME", str(tmp_path / "home"))
    spec = tmp_path / "bad.yaml"
    spec.write_text(SPEC + "  depth: {value: 3}\n")
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2
    assert "parameters.depth: depth does not apply to dataset himmelblau" in result.stderr


@pytest.mark.parametrize("extra, field", [({"folds": 3, "fold": 1}, "folds"), ({"init_from": 1}, "init_from"),
                                          ({"freeze": 1}, "freeze"),
                                          ({"schedule": "lr_range_test", "min_lr": 1e-5}, "lr_range_test")])
def test_what_a_surface_cannot_honour_is_refused_naming_it(extra, field):
    # fine-tuning, folds and the range test came after the surfaces: a point has no layers, rows or batches
    with pytest.raises(ValueError, match=field):
        TrialConfig(dataset="himmelblau", **extra)


def test_top_level_folds_on_a_surface_grid_is_one_sentence():
    spec = parse_spec("name: s\nfolds: 3\nparameters:\n  dataset: {value: himmelblau}\n  lr: {values: [0.01]}\n")
    with pytest.raises(SpecError, match="folds does not apply to dataset himmelblau"):
        expand(spec)
