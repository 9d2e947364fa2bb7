"""The Loss surfaces page (and what the network pages say on a surface experiment) with Streamlit's
AppTest, against a migrated SQLite database filled by the real engine through worker.jobs, the code a
worker runs: the paths drawn are the ones the engine stored."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dashboard import surface_charts
from services.db import make_engine, session_scope
from services.migrate import upgrade
from services.models import Trial
from tests.dashboard.test_app import figure_spec, run_app, submit_spec, train
from worker.jobs import execute_job

PAGE = "app_pages/loss_surfaces.py"
SURFACE_SPEC = """
name: surfaces
parameters:
  dataset: {values: [himmelblau, saddle]}
  start: {values: [[1.5, 0.05], [-1.0, -1.0]]}
  optimizer: {values: [sgd, momentum]}
  lr: {values: [0.001, 0.01]}
  epochs: {value: 30}
"""
NETWORK_SPEC = """
name: moons
parameters:
  n_train: {value: 16}
  n_val: {value: 16}
  n_test: {value: 8}
  width: {value: 4}
  epochs: {value: 2}
"""


@pytest.fixture(scope="module")
def _template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int]:
    path = tmp_path_factory.mktemp("surfaces") / "fitscope.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    engine = make_engine(url)
    try:
        surfaces = submit_spec(engine, SURFACE_SPEC)
        statuses = execute_job(engine, surfaces.trial_ids, worker="test-worker", redelivered=False)
        assert set(statuses.values()) == {"succeeded"}
        network = submit_spec(engine, NETWORK_SPEC)
        assert train(engine, network.trial_ids[0]) == "succeeded"
    finally:
        engine.dispose()
    return path, surfaces.experiment_id, network.experiment_id


@pytest.fixture
def filled(_template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, int, int]:
    template, surfaces, network = _template
    shutil.copyfile(template, tmp_path / "fitscope.db")
    url = f"sqlite:///{tmp_path / 'fitscope.db'}"
    monkeypatch.setenv("FITSCOPE_DATABASE_URL", url)
    return url, surfaces, network


def _paths(figure: dict) -> list[dict]:
    return [t for t in figure["data"] if t.get("type") == "scatter" and t.get("mode") == "lines"]


def test_the_page_draws_every_path_on_the_contour_one_panel_per_rate(filled):
    url, surfaces, _ = filled
    app = run_app(page=PAGE, query={"experiment": str(surfaces)})
    figure = figure_spec(app.get("plotly_chart")[0])
    assert "himmelblau" in figure["layout"]["title"]["text"]
    assert len([t for t in figure["data"] if t["type"] == "contour"]) == 2  # lr 0.001 and 0.01
    assert [a["text"] for a in figure["layout"]["annotations"]][:2] == ["lr = 0.001", "lr = 0.01"]
    paths = _paths(figure)
    assert len(paths) == 8  # 2 starts x 2 optimizers x 2 rates on himmelblau
    with session_scope(make_engine(url)) as session:
        trials = session.query(Trial).filter_by(experiment_id=surfaces).all()
        ends = {(t.final_metrics["final_x"], t.final_metrics["final_y"]) for t in trials}
    assert {(p["x"][-1], p["y"][-1]) for p in paths} <= ends and all(len(p["x"]) == 31 for p in paths)
    assert {t["name"] for t in figure["data"] if t.get("showlegend")} >= {"sgd", "momentum", "known minimum",
                                                                           "known saddle"}
    text = "\n".join(m.value for m in app.markdown)
    assert "Of the 8 runs on himmelblau" in text
    table = app.dataframe[0].value
    assert len(table) == 8 and {"final_x", "final_y", "final_value", "reached"} <= set(table.columns)


def test_the_step_slider_replays_the_descent(filled):
    _, surfaces, _ = filled
    app = run_app(page=PAGE, query={"experiment": str(surfaces)})
    app.slider(key="surfaces_step").set_value(5).run()
    assert not app.exception
    assert all(len(p["x"]) == 6 for p in _paths(figure_spec(app.get("plotly_chart")[0])))


def test_the_experiment_page_links_a_surface_experiment_to_loss_surfaces_only(filled):
    _, surfaces, network = filled
    app = run_app(page="app_pages/experiment.py", query={"experiment": str(surfaces)})
    assert {link.proto.page: link.proto.query_string for link in app.get("page_link")} == {
        "loss_surfaces": f"experiment={surfaces}"}
    app = run_app(page="app_pages/experiment.py", query={"experiment": str(network)})
    assert {link.proto.page for link in app.get("page_link")} == {"fit_analysis", "optimizers"}


def test_the_saddle_function_and_colour_by_start(filled):
    _, surfaces, _ = filled
    app = run_app(page=PAGE, query={"experiment": str(surfaces)})
    app.selectbox(key="surfaces_function").set_value("saddle").run()
    app.selectbox(key="surfaces_colour").set_value("start").run()
    assert not app.exception
    figure = figure_spec(app.get("plotly_chart")[0])
    assert "saddle" in figure["layout"]["title"]["text"]
    assert {t["name"] for t in _paths(figure) if t.get("showlegend")} == {"[1.5, 0.05]", "[-1.0, -1.0]"}


def test_network_pages_say_in_one_sentence_that_they_do_not_apply(filled):
    _, surfaces, network = filled
    for page, words in (("app_pages/fit_analysis.py", "fit analysis does not apply"),
                        ("app_pages/optimizers.py", "does not apply")):
        app = run_app(page=page, query={"experiment": str(surfaces)})
        assert words in app.info[0].value and not app.get("plotly_chart")
    app = run_app(page=PAGE, query={"experiment": str(network)})
    assert "trains networks on data sets" in app.info[0].value


def test_the_trial_page_draws_a_surface_trials_path(filled):
    url, surfaces, _ = filled
    with session_scope(make_engine(url)) as session:
        trial_id = session.query(Trial).filter_by(experiment_id=surfaces).first().id
    app = run_app(page="app_pages/trial.py", query={"trial": str(trial_id)})
    keys = [chart.proto.id for chart in app.get("plotly_chart")]
    assert any("trial_path_chart" in key for key in keys)


def test_contour_levels_are_log_spaced_and_one_panel_without_a_panel_parameter():
    xs, ys, levels, lowest = surface_charts.contour_grid("rosenbrock", resolution=50)
    assert lowest == pytest.approx(0.0, abs=1e-9) and levels.shape == (50, 50)
    values = (1 - xs[None, :]) ** 2 + 100 * (ys[:, None] - xs[None, :] ** 2) ** 2
    assert np.allclose(levels, np.log10(values + 1e-3))
    trials = pd.DataFrame([{"trial_id": 1, "optimizer": "adam"}])
    path = {"function": "rosenbrock", "step": [0, 1, 2], "x": [-1.2, -1.1, -1.0], "y": [1.0, 1.0, 1.0]}
    figure = surface_charts.surface_paths(trials, {1: path}, function="rosenbrock", color_by="optimizer",
                                          panel_by=None, step=1)
    assert len([t for t in figure.data if t.type == "contour"]) == 1
    assert list(_paths(figure.to_plotly_json())[0]["x"]) == [-1.2, -1.1]
