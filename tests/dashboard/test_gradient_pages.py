"""The range test on the Optimizers page, and each layer's gradient on the Trial and Fit analysis pages,
with AppTest against a real migrated SQLite database that the real engine filled (services.submission,
then worker.jobs.execute_job per trial); and the figure builders of dashboard.gradient_charts."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dashboard import gradient_charts
from services.db import make_engine
from services.migrate import upgrade
from services.range_test import read_range_test
from tests.dashboard.test_analysis_pages import figure, figures_by_key, mean_lines, table_with
from tests.dashboard.test_app import run_app, submit_spec, train

RANGE_SPEC = """
name: range-test
seeds: [0, 1]
parameters:
  dataset: {value: moons}
  n_train: {value: 128}
  n_val: {value: 32}
  n_test: {value: 0}
  width: {value: 16}
  batch_size: {value: 16}
  epochs: {value: 4}
  schedule: {value: lr_range_test}
  min_lr: {value: 0.0001}
  lr: {value: 3.0}
  optimizer: {values: [sgd, adam]}
"""
MIXED_SPEC = """
name: range-test-and-constant
seeds: [0]
parameters:
  dataset: {value: moons}
  n_train: {value: 128}
  n_val: {value: 32}
  n_test: {value: 0}
  width: {value: 16}
  batch_size: {value: 16}
  epochs: {value: 3}
  optimizer: {values: [adam, sgd]}
  lr: {value: 0.01}
  min_lr: {value: 0.0001}
  schedule: {values: [lr_range_test, constant]}
"""
VANISH_SPEC = """
name: vanishing
seeds: [0, 1]
parameters:
  dataset: {value: moons}
  n_train: {value: 64}
  n_val: {value: 32}
  n_test: {value: 0}
  width: {value: 16}
  batch_size: {value: full}
  optimizer: {value: sgd}
  lr: {value: 0.1}
  epochs: {value: 3}
  depth: {values: [2, 6]}
  activation: {values: [sigmoid, relu]}
"""


@dataclass(frozen=True)
class Filled:
    range_test: int
    vanishing: int
    vanishing_trials: list[int]
    range_trials: list[int]
    mixed: int


@pytest.fixture(scope="module")
def _template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Filled]:
    path = tmp_path_factory.mktemp("gradients") / "fitscope.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    engine = make_engine(url)
    try:
        ranged, vanishing = submit_spec(engine, RANGE_SPEC), submit_spec(engine, VANISH_SPEC)
        mixed = submit_spec(engine, MIXED_SPEC)
        for trial_id in ranged.trial_ids + vanishing.trial_ids + mixed.trial_ids:
            assert train(engine, trial_id) in {"succeeded", "diverged"}
    finally:
        engine.dispose()
    return path, Filled(range_test=ranged.experiment_id, vanishing=vanishing.experiment_id,
                        vanishing_trials=vanishing.trial_ids, range_trials=ranged.trial_ids,
                        mixed=mixed.experiment_id)


@pytest.fixture
def filled(_template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Filled:
    template, filled = _template
    shutil.copyfile(template, tmp_path / "fitscope.db")
    monkeypatch.setenv("FITSCOPE_DATABASE_URL", f"sqlite:///{tmp_path / 'fitscope.db'}")
    return filled


def test_optimizers_page_draws_each_optimizers_range_test_and_suggests_a_rate(filled: Filled):
    app = run_app(page="app_pages/optimizers.py", query={"experiment": str(filled.range_test)})

    spec = figure(app, "optimizers_range_chart")
    assert spec["layout"]["xaxis"]["type"] == "log"
    smoothed = {trace["name"]: trace for trace in spec["data"] if trace.get("name") in ("adam", "sgd")}
    assert set(smoothed) == {"adam", "sgd"}  # one line per optimizer: the mean of its two seeds
    assert all(len(trace["x"]) == 4 * 8 for trace in smoothed.values())  # 128 / 16 = 8 steps an epoch, 4 epochs
    assert min(smoothed["sgd"]["x"]) == pytest.approx(1e-4)
    table = table_with(app, "suggested lr (steepest descent)")
    assert sorted(table["optimizer"]) == ["adam", "sgd"] and list(table["runs"]) == [2, 2]
    assert (table["lr at minimum loss"] > 1e-4).all() and (table["lr at minimum loss"] <= 3.0).all()
    # Nothing else to compare: a range test's epochs say nothing of an optimizer at a rate of its own.
    assert any("Every trial of this experiment is a learning-rate range test" in info.value for info in app.info)
    assert "optimizers_curves_chart" not in " ".join(figures_by_key(app))


def test_optimizers_page_compares_the_runs_that_are_not_range_tests(filled: Filled):
    app = run_app(page="app_pages/optimizers.py", query={"experiment": str(filled.mixed)})

    assert figure(app, "optimizers_range_chart")["data"]  # the range test, read on its own
    assert any("Range-test runs (2) are left out" in caption.value for caption in app.caption)
    # The constant-rate runs alone, one line per optimizer (train and validation); the schedule, which
    # no longer varies among them, is not offered as a line.
    assert mean_lines(figure(app, "optimizers_curves_chart")) == [
        ("optimizer=adam", "dash"), ("optimizer=adam", "solid"), ("optimizer=sgd", "dash"), ("optimizer=sgd", "solid")]
    assert "schedule" not in app.selectbox(key="optimizers_group").options


def test_fit_analysis_leaves_range_tests_out_and_says_where_to_read_them(filled: Filled):
    alone = run_app(page="app_pages/fit_analysis.py", query={"experiment": str(filled.range_test)})
    assert any("Every trial of this experiment is a learning-rate range test, read on the Optimizers"
               in info.value for info in alone.info)
    assert not figures_by_key(alone)  # no learning curves, verdicts or pictures of blow-ups

    mixed = run_app(page="app_pages/fit_analysis.py", query={"experiment": str(filled.mixed)})
    assert any("Range-test runs (2) are left out" in caption.value for caption in mixed.caption)
    assert any("2 of 4 trials" in caption.value and "and range tests" in caption.value for caption in mixed.caption)
    assert mean_lines(figure(mixed, "fit_curves_chart")) == [
        ("optimizer=adam", "dash"), ("optimizer=adam", "solid"), ("optimizer=sgd", "dash"), ("optimizer=sgd", "solid")]
    assert "schedule" not in mixed.selectbox(key="fit_curves_group").options


def test_trial_page_draws_each_layers_gradient_against_depth(filled: Filled):
    trial_id = filled.vanishing_trials[-1]  # the last of the grid: depth 6, relu or sigmoid
    app = run_app(page="app_pages/trial.py", query={"trial": str(trial_id)})

    spec = figure(app, "trial_layers_chart")
    assert spec["layout"]["yaxis"]["type"] == "log"
    assert [trace["name"] for trace in spec["data"]] == ["epoch 1", "epoch 2", "epoch 3"]
    assert all(trace["x"] == list(range(1, 8)) for trace in spec["data"])  # 6 hidden layers + the output
    assert "times the last's" in " ".join(caption.value for caption in app.caption)


def test_fit_analysis_compares_the_first_layers_gradient_across_activations_and_depths(filled: Filled):
    app = run_app(page="app_pages/fit_analysis.py", query={"experiment": str(filled.vanishing)})

    spec = figure(app, "fit_layers_chart")
    lines = {trace["name"]: trace for trace in spec["data"] if trace.get("fill") != "toself"}
    assert set(lines) == {"relu", "sigmoid"}
    assert all(trace["x"] == [2, 6] for trace in lines.values())
    sigmoid, relu = lines["sigmoid"]["y"], lines["relu"]["y"]
    assert sigmoid[1] < sigmoid[0] / 100  # four more sigmoid layers: two decades and more lost
    assert sigmoid[1] < relu[1] / 100
    assert spec["layout"]["yaxis"]["type"] == "log"


# --- the figure builders -------------------------------------------------------------------------

def _reading(blow_up: float = 1e6):
    lr = np.geomspace(1e-5, 10, 200)
    x = np.log10(lr)
    loss = 1.0 - 0.8 / (1 + np.exp(-(x + 2) * 3)) + np.where(x > 0, blow_up * x, 0.0)
    return read_range_test(lr.tolist(), loss.tolist())


def test_the_range_test_charts_y_axis_is_not_flattened_by_the_blow_up():
    spec = gradient_charts.range_test_chart([("sgd", _reading())], color_by="optimizer").to_dict()
    low, high = spec["layout"]["yaxis"]["range"]
    assert 0 <= low < 0.2 < 1.0 < high < 2  # the fall from 1 to 0.2 fills the chart; 1e6 is off it
    steepest = [t for t in spec["data"] if t.get("marker", {}).get("symbol") == "triangle-down" and t["x"][0]]
    assert abs(math.log10(steepest[0]["x"][0]) - -2) < 0.1


def test_the_depth_chart_draws_the_geometric_mean_over_seeds_with_a_band():
    ratios = pd.DataFrame({"depth": [2, 2, 8, 8], "activation": ["sigmoid"] * 4, "ratio": [1e-1, 1e-3, 1e-6, 1e-8]})
    spec = gradient_charts.depth_ratio_chart(ratios).to_dict()
    (line,) = [t for t in spec["data"] if t.get("fill") != "toself"]
    (band,) = [t for t in spec["data"] if t.get("fill") == "toself"]
    assert line["y"] == pytest.approx([1e-2, 1e-7])
    assert band["y"] == pytest.approx([1e-1, 1e-6, 1e-8, 1e-3])
    assert spec["layout"]["yaxis"]["type"] == "log"


def test_the_depth_chart_labels_its_x_axis_readably_against_depth_and_against_width():
    # Depth 1..8: a tick per depth. Width 2..256: a log axis with a few whole labels, not a tick per
    # whole number (256 labels drawn over each other).
    by_depth = pd.DataFrame({"depth": [1, 2, 4, 8], "activation": ["relu"] * 4, "ratio": [0.9, 0.5, 0.2, 0.1]})
    assert gradient_charts.depth_ratio_chart(by_depth).to_dict()["layout"]["xaxis"]["dtick"] == 1
    by_width = pd.DataFrame({"width": [2, 8, 64, 256], "activation": ["relu"] * 4, "ratio": [0.5, 0.4, 0.2, 0.1]})
    xaxis = gradient_charts.depth_ratio_chart(by_width, x="width").to_dict()["layout"]["xaxis"]
    assert xaxis["type"] == "log" and "dtick" not in xaxis
    assert xaxis["ticktext"] == ["2", "8", "64", "256"]  # a grid's few widths label themselves
