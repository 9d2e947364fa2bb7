"""The analysis pages (Fit analysis, Optimizers and schedules, Trial, Experiment) with Streamlit's
AppTest, against a real migrated SQLite database filled by the real engine: grids are submitted
through services.submission and their trials claimed and trained by worker.tasks.execute_claim, the
code a worker runs, so charts are drawn from rows and artifacts the engine really wrote."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import streamlit as st

from services.db import make_engine
from services.migrate import upgrade
from tests.dashboard.test_app import give_up, run_app, submit_spec, train

FIT_PAGE = "app_pages/fit_analysis.py"
OPTIMIZERS_PAGE = "app_pages/optimizers.py"
TRIAL_PAGE = "app_pages/trial.py"
EXPERIMENT_PAGE = "app_pages/experiment.py"

# 2-D classification: capacity (width) x data size (n_train) x 2 seeds; the last trial is given up on.
MOONS_SPEC = """
name: moons-capacity
seeds: [0, 1]
parameters:
  dataset: {value: moons}
  n_val: {value: 32}
  n_test: {value: 16}
  batch_size: {value: full}
  epochs: {value: 4}
  width: {values: [4, 32]}
  n_train: {values: [16, 48]}
"""
# 1-D regression: optimizer x learning rate x 2 seeds, so every configuration has a paired partner.
SINE_SPEC = """
name: sine-optimizers
seeds: [0, 1]
parameters:
  dataset: {value: sine}
  n_train: {value: 32}
  n_val: {value: 32}
  n_test: {value: 16}
  batch_size: {value: full}
  epochs: {value: 4}
  width: {value: 16}
  optimizer: {values: [sgd, adam]}
  lr: {values: [0.01, 0.1]}
  schedule: {value: step}
  step_size: {value: 2}
"""
QUEUED_SPEC = """
name: nothing-finished
parameters:
  dataset: {value: circles}
  epochs: {value: 2}
"""


@dataclass(frozen=True)
class Filled:
    moons: int
    sine: int
    queued: int
    failed_trial: int
    moons_trials: list[int]
    sine_trials: list[int]


@pytest.fixture(autouse=True)
def _fresh_streamlit_caches():
    yield
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture(scope="module")
def _template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Filled]:
    """Trained once per module (about 20 tiny trials); each test gets a copy of the file."""
    path = tmp_path_factory.mktemp("analysis") / "fitscope.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    engine = make_engine(url)
    try:
        moons, sine = submit_spec(engine, MOONS_SPEC), submit_spec(engine, SINE_SPEC)
        *trained, failed = moons.trial_ids
        assert {train(engine, trial_id) for trial_id in trained + sine.trial_ids} <= {"succeeded", "diverged"}
        give_up(engine, failed)
        queued = submit_spec(engine, QUEUED_SPEC)
    finally:
        engine.dispose()
    return path, Filled(moons=moons.experiment_id, sine=sine.experiment_id, queued=queued.experiment_id,
                        failed_trial=failed, moons_trials=moons.trial_ids, sine_trials=sine.trial_ids)


@pytest.fixture
def filled(_template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Filled:
    template, filled = _template
    shutil.copyfile(template, tmp_path / "fitscope.db")
    monkeypatch.setenv("FITSCOPE_DATABASE_URL", f"sqlite:///{tmp_path / 'fitscope.db'}")
    return filled


def figures_by_key(app) -> dict[str, dict]:
    """Each plotly chart's figure, by the element key the page gave it (the part after its prefix)."""
    import json

    found = {}
    for element in app.get("plotly_chart"):
        key = element.proto.id.split("-", 2)[-1] if element.proto.id else ""
        found[key] = json.loads(element.proto.spec)
    return found


def figure(app, key: str) -> dict:
    matches = [spec for found, spec in figures_by_key(app).items() if found.endswith(key)]
    assert len(matches) == 1, (key, list(figures_by_key(app)))
    return matches[0]


def table_with(app, column: str):
    """The one dataframe on the page that has ``column`` (AppTest does not expose a dataframe's key)."""
    (found,) = [frame.value for frame in app.dataframe if column in frame.value.columns]
    return found


def mean_lines(spec: dict) -> list[tuple[str, str]]:
    """(name, dash) of every mean line of a band chart (band traces are the filled ones)."""
    return sorted((trace["name"], trace["line"]["dash"]) for trace in spec["data"] if trace.get("fill") != "toself")


# --- Fit analysis ------------------------------------------------------------------------------------

def test_fit_analysis_draws_capacity_train_and_validation_per_group(filled: Filled):
    app = run_app(page=FIT_PAGE, query={"experiment": str(filled.moons)})

    assert app.selectbox(key="fit_selected").value == filled.moons
    assert "7 of 8 trials have finished training" in app.caption[0].value  # the given-up trial is left out
    capacity = figure(app, "fit_capacity_chart")
    assert mean_lines(capacity) == [("n_train=16", "dash"), ("n_train=16", "solid"),
                                    ("n_train=48", "dash"), ("n_train=48", "solid")]
    widths = {trace["name"]: trace["x"] for trace in capacity["data"] if trace.get("fill") != "toself"}
    assert len(widths["n_train=16"]) == 2  # two model sizes (parameter counts) per line
    assert capacity["layout"]["xaxis"]["title"]["text"] == "parameter_count"

    curves = figure(app, "fit_curves_chart")
    assert {name for name, _ in mean_lines(curves)} == {"width=4", "width=32"}
    assert {len(trace["x"]) for trace in curves["data"] if trace.get("fill") != "toself"} == {4}  # 4 epochs

    verdicts = figure(app, "fit_verdict_chart")["data"][0]
    assert verdicts["x"] == ["4", "32"] and verdicts["y"] == ["16", "48"]
    assert all(text for row in verdicts["text"] for text in row)  # every cell has a verdict
    table = table_with(app, "sibling_verdict")
    assert len(table) == 7 and table["sibling_verdict"].notna().all()
    assert set(table["link"]) == {f"trial?trial={trial_id}" for trial_id in filled.moons_trials[:-1]}

    boundaries = figure(app, "fit_prediction_chart")
    # By default one seed's smallest, middle and largest model, side by side.
    assert [trace["type"] for trace in boundaries["data"]] == ["heatmap", "scatter"] * 3


def test_fit_analysis_group_by_and_axes_change_the_figures(filled: Filled):
    app = run_app(page=FIT_PAGE, query={"experiment": str(filled.moons)})

    app.selectbox(key="fit_curves_group").select("n_train").run()
    app.selectbox(key="fit_capacity_colour").select("all trials").run()
    app.selectbox(key="fit_heatmap_x").select("n_train").run()
    app.selectbox(key="fit_heatmap_y").select("width").run()

    assert not app.exception
    assert {name for name, _ in mean_lines(figure(app, "fit_curves_chart"))} == {"n_train=16", "n_train=48"}
    assert mean_lines(figure(app, "fit_capacity_chart")) == [("all trials", "dash"), ("all trials", "solid")]
    heatmap = figure(app, "fit_heatmap_chart")["data"][0]
    assert heatmap["x"] == ["16", "48"] and heatmap["y"] == ["4", "32"]


def test_fit_analysis_of_a_regression_draws_the_fitted_curve_against_the_truth(filled: Filled):
    app = run_app(page=FIT_PAGE, query={"experiment": str(filled.sine)})

    panels = figure(app, "fit_prediction_chart")["data"]
    lines = [trace for trace in panels if trace["mode"] == "lines"]
    assert {trace["name"] for trace in lines} == {"truth", "model"}
    assert all(len(trace["x"]) == 200 for trace in lines)  # artifacts.CURVE_POINTS, as the engine stored them


def test_fit_analysis_before_anything_finished_says_so(filled: Filled):
    app = run_app(page=FIT_PAGE, query={"experiment": str(filled.queued)})

    assert any("No trial of this experiment has finished yet" in info.value for info in app.info)
    assert not app.get("plotly_chart")


@pytest.mark.parametrize("page", [FIT_PAGE, OPTIMIZERS_PAGE, TRIAL_PAGE])
def test_analysis_pages_without_experiments_say_how_to_submit(page: str, migrated_sqlite_url, monkeypatch):
    monkeypatch.setenv("FITSCOPE_DATABASE_URL", migrated_sqlite_url)
    app = run_app(page=page)
    assert "fitscope submit examples/quickstart.yaml" in app.info[0].value
    assert not app.get("plotly_chart")


# --- Optimizers and schedules ----------------------------------------------------------------------------

def test_optimizers_page_compares_optimizers_with_seed_bands_and_an_interval(filled: Filled):
    app = run_app(page=OPTIMIZERS_PAGE, query={"experiment": str(filled.sine)})

    assert app.selectbox(key="optimizers_group").value == "optimizer"
    assert {name for name, _ in mean_lines(figure(app, "optimizers_curves_chart"))} == {
        "optimizer=adam", "optimizer=sgd"}
    sensitivity = figure(app, "optimizers_sensitivity_chart")
    assert sensitivity["layout"]["xaxis"]["title"]["text"] == "lr"
    assert {tuple(trace["x"]) for trace in sensitivity["data"] if trace.get("fill") != "toself"} == {(0.01, 0.1)}
    divergence = figure(app, "optimizers_divergence_chart")
    assert {trace["name"] for trace in divergence["data"]} == {"optimizer=adam", "optimizer=sgd"}
    assert all(0 <= rate <= 1 for trace in divergence["data"] for rate in trace["y"])
    schedule = figure(app, "optimizers_schedule_chart")
    learning_rates = [trace["y"] for trace in schedule["data"] if trace["line"].get("dash") == "dot"]
    assert learning_rates and all(rates[0] > rates[-1] for rates in learning_rates)  # step decay is drawn

    interval = figure(app, "optimizers_compare_chart")["data"][0]
    assert "paired by seed" in app.markdown[-1].value
    assert "95% confidence interval" in app.markdown[-1].value
    assert interval["error_x"]["array"][0] > 0


def test_optimizers_page_follows_the_group_and_the_configs_compared(filled: Filled):
    app = run_app(page=OPTIMIZERS_PAGE, query={"experiment": str(filled.sine)})
    before = app.markdown[-1].value

    app.selectbox(key="optimizers_group").select("lr").run()
    app.selectbox(key="optimizers_compare_b").select("optimizer=sgd, lr=0.1").run()

    assert {name for name, _ in mean_lines(figure(app, "optimizers_curves_chart"))} == {"lr=0.01", "lr=0.1"}
    assert {trace["name"] for trace in figure(app, "optimizers_divergence_chart")["data"]} == {"lr=0.01", "lr=0.1"}
    assert "B: optimizer=sgd, lr=0.1" in figure(app, "optimizers_compare_chart")["layout"]["title"]["subtitle"]["text"]
    assert app.markdown[-1].value != before


# --- Trial and Experiment ----------------------------------------------------------------------------------

def test_trial_page_shows_config_curves_diagnosis_numbers_and_the_picture(filled: Filled):
    trial_id = filled.moons_trials[0]
    app = run_app(page=TRIAL_PAGE, query={"trial": str(trial_id)})

    assert app.subheader[0].value == f"Trial 0 of #{filled.moons} moons-capacity"
    assert app.selectbox(key="trial_selected").value == trial_id
    assert "Verdict (judged alone, as stored): **" in "".join(markdown.value for markdown in app.markdown)
    numbers = {tuple(frame.value["name"]): frame.value for frame in app.dataframe}
    measured = next(names for names in numbers if "train_ratio" in names)
    assert {"gap_ratio", "baseline_train_loss"} <= set(measured) and "underfit_ratio_limit" not in measured
    assert any("underfit_ratio_limit" in names for names in numbers)  # the thresholds, in their own table
    assert len(figure(app, "trial_loss_chart")["data"]) == 2  # train and validation
    assert figure(app, "trial_accuracy_chart")
    assert [trace["type"] for trace in figure(app, "trial_prediction_chart")["data"]] == ["heatmap", "scatter"]
    assert app.json[0].value and '"width": 4' in app.json[0].value


def test_trial_page_of_a_failed_trial_shows_its_error(filled: Filled):
    app = run_app(page=TRIAL_PAGE, query={"trial": str(filled.failed_trial)})

    assert "This trial failed: gave up after 1 attempts" in app.error[0].value
    assert any("No verdict yet" in info.value or "has not recorded an epoch" in info.value for info in app.info)


def test_trial_page_with_an_unknown_trial_says_so(filled: Filled):
    app = run_app(page=TRIAL_PAGE, query={"trial": "999999"})
    assert "Trial '999999' does not exist" in app.warning[0].value


def test_experiment_page_links_each_trial_and_the_analysis_pages(filled: Filled):
    app = run_app(page=EXPERIMENT_PAGE, query={"experiment": str(filled.moons)})

    table = table_with(app, "link")
    assert table["link"].tolist() == [f"trial?trial={trial_id}" for trial_id in filled.moons_trials]
    links = {link.proto.page: link.proto.query_string for link in app.get("page_link")}
    assert links["fit_analysis"] == links["optimizers"] == f"experiment={filled.moons}"
    assert "gave up after 1 attempts" in app.error[0].value
