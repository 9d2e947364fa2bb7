"""The analysis pages (Fit analysis, Optimizers and schedules, Trial, Experiment) with Streamlit's
AppTest, against a real migrated SQLite database filled by the real engine: grids are submitted
through services.submission and their trials claimed and trained by worker.jobs.execute_job, the
code a worker runs, so charts are drawn from rows and artifacts the engine really wrote."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.db import make_engine
from services.migrate import upgrade
from tests.dashboard.test_app import figure_spec, give_up, run_app, submit_spec, train

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
# Only the learning rate varies, and its largest value blows the loss up: the schedule chart's default
# group is then lr itself, and the diverged runs test the bands' toggle.
LR_SPEC = """
name: lr-only
seeds: [0, 1]
parameters:
  dataset: {value: sine}
  n_train: {value: 32}
  n_val: {value: 32}
  n_test: {value: 16}
  batch_size: {value: full}
  epochs: {value: 4}
  width: {value: 16}
  optimizer: {value: sgd}
  schedule: {value: exponential}
  lr: {values: [0.01, 0.1, 10.0]}
"""
# List and dict parameters (betas, milestones, early_stopping) that vary: groups, axes and filters see them as text.
NESTED_SPEC = """
name: nested-parameters
seeds: [0]
parameters:
  dataset: {value: circles}
  n_train: {value: 32}
  n_val: {value: 32}
  n_test: {value: 16}
  batch_size: {value: full}
  epochs: {value: 4}
  width: {value: 8}
  schedule: {value: multistep}
  betas: {values: [[0.9, 0.999], [0.5, 0.9]]}
  milestones: {values: [[2], [3]]}
  early_stopping: {values: [{patience: 1}, {patience: 10}]}
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
    lr: int
    nested: int
    failed_trial: int
    moons_trials: list[int]
    sine_trials: list[int]
    nested_trials: list[int]


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
        lr, nested = submit_spec(engine, LR_SPEC), submit_spec(engine, NESTED_SPEC)
        # lr 10 blows up both seeds: one to inf (status diverged), one to 1e32 (verdict diverged).
        assert {train(engine, trial_id) for trial_id in lr.trial_ids} == {"succeeded", "diverged"}
        assert {train(engine, trial_id) for trial_id in nested.trial_ids} == {"succeeded"}
        queued = submit_spec(engine, QUEUED_SPEC)
    finally:
        engine.dispose()
    return path, Filled(moons=moons.experiment_id, sine=sine.experiment_id, queued=queued.experiment_id,
                        lr=lr.experiment_id, nested=nested.experiment_id,
                        failed_trial=failed, moons_trials=moons.trial_ids, sine_trials=sine.trial_ids,
                        nested_trials=nested.trial_ids)


@pytest.fixture
def filled(_template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Filled:
    template, filled = _template
    shutil.copyfile(template, tmp_path / "fitscope.db")
    monkeypatch.setenv("FITSCOPE_DATABASE_URL", f"sqlite:///{tmp_path / 'fitscope.db'}")
    return filled


def figures_by_key(app) -> dict[str, dict]:
    """Each plotly chart's figure, by the element key the page gave it (the part after its prefix)."""

    found = {}
    for element in app.get("plotly_chart"):
        key = element.proto.id.split("-", 2)[-1] if element.proto.id else ""
        found[key] = figure_spec(element)
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
    assert any("7 of 8 trials have finished training" in caption.value for caption in app.caption)  # given-up: out
    capacity = figure(app, "fit_capacity_chart")
    assert mean_lines(capacity) == [("n_train=16", "dash"), ("n_train=16", "dot"), ("n_train=16", "solid"),
                                    ("n_train=48", "dash"), ("n_train=48", "dot"), ("n_train=48", "solid")]
    lines = {(trace["name"], trace["line"]["dash"]): trace for trace in capacity["data"]
             if trace.get("fill") != "toself"}
    assert len(lines["n_train=16", "solid"]["x"]) == 2  # two model sizes (parameter counts) per line
    # The dotted generalization gap is validation minus train, run by run, then averaged.
    train, val, gap = (lines["n_train=16", dash]["y"] for dash in ("solid", "dash", "dot"))
    assert gap == pytest.approx([v - t for v, t in zip(val, train, strict=True)])
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

    boundaries = figure(app, "fit_prediction_animation")
    # By default one seed's smallest, middle and largest model, side by side, each with its epochs to play
    # (regions, their 0.5 line, the training points).
    # (the first panel also holds the two class colours' legend entries)
    assert [trace["type"] for trace in boundaries["data"]] == (["heatmap", "contour", "scatter"] + ["scatter"] * 2
                                                               + ["heatmap", "contour", "scatter"] * 2)
    assert [frame["name"] for frame in boundaries["frames"]] == ["1", "2", "3", "4"]


def test_fit_analysis_group_by_and_axes_change_the_figures(filled: Filled):
    app = run_app(page=FIT_PAGE, query={"experiment": str(filled.moons)})

    app.selectbox(key="fit_curves_group").select("n_train").run()
    app.selectbox(key="fit_capacity_colour").select("all trials").run()
    app.selectbox(key="fit_heatmap_x").select("n_train").run()
    app.selectbox(key="fit_heatmap_y").select("width").run()

    assert not app.exception
    assert {name for name, _ in mean_lines(figure(app, "fit_curves_chart"))} == {"n_train=16", "n_train=48"}
    assert mean_lines(figure(app, "fit_capacity_chart")) == [("all trials", "dash"), ("all trials", "dot"),
                                                             ("all trials", "solid")]
    heatmap = figure(app, "fit_heatmap_chart")["data"][0]
    assert heatmap["x"] == ["16", "48"] and heatmap["y"] == ["4", "32"]


def test_fit_analysis_of_a_regression_draws_the_fitted_curve_against_the_truth(filled: Filled):
    app = run_app(page=FIT_PAGE, query={"experiment": str(filled.sine)})

    panels = figure(app, "fit_prediction_animation")["data"]
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
        "optimizer=adam (lr=0.1)", "optimizer=sgd (lr=0.1)"}  # each at its best rate, named in the legend
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

    assert {name for name, _ in mean_lines(figure(app, "optimizers_curves_chart"))} == {
        "lr=0.01 (optimizer=adam)", "lr=0.1 (optimizer=adam)"}  # adam is the best optimizer at either rate
    assert {trace["name"] for trace in figure(app, "optimizers_divergence_chart")["data"]} == {"lr=0.01", "lr=0.1"}
    assert "B: optimizer=sgd, lr=0.1" in figure(app, "optimizers_compare_chart")["layout"]["title"]["subtitle"]["text"]
    assert app.markdown[-1].value != before


def test_optimizers_page_offers_the_final_norms_and_reads_them_once_chosen(filled: Filled):
    """The norms at each trial's last epoch are offered as metrics without being read for every trial
    (a tenth of the page at 10,000 trials); chosen, they are read and compared with their true means."""
    import os

    from dashboard import frames
    from services.db import session_scope
    from services.queries import last_epoch_values, trial_rows

    def kept_reads() -> set[str]:
        return {name for (_, experiment_id), (_, values) in frames._kept.items() if experiment_id == filled.sine
                for name in values}

    app = run_app(page=OPTIMIZERS_PAGE, query={"experiment": str(filled.sine)})
    for key in ("optimizers_compare_metric", "optimizers_others_best_metric"):
        assert {"final_weight_norm", "final_grad_norm"} <= set(app.selectbox(key=key).options)
    assert "final_norms" not in kept_reads()

    app.selectbox(key="optimizers_compare_metric").select("final_weight_norm").run()

    assert not app.exception and "final_norms" in kept_reads()
    label_a = app.selectbox(key="optimizers_compare_a").value  # "optimizer=adam, lr=0.01"
    chosen = dict(part.split("=") for part in label_a.split(", "))
    engine = make_engine(os.environ["FITSCOPE_DATABASE_URL"])
    with session_scope(engine) as session:
        norms = last_epoch_values(session, filled.sine)
        runs = [row["trial_id"] for row in trial_rows(session, filled.sine)
                if all(str(row[name]) == value for name, value in chosen.items())]
    engine.dispose()
    expected = sum(norms[trial_id]["weight_norm"] for trial_id in runs) / len(runs)
    assert f"Mean final_weight_norm: A **{expected:.4g}** ({len(runs)} runs)" in app.markdown[-1].value


def test_the_sensitivity_heading_names_the_parameter_on_its_x_axis(filled: Filled):
    app = run_app(page=OPTIMIZERS_PAGE, query={"experiment": str(filled.sine)})
    assert "Sensitivity to the learning rate" in [header.value for header in app.subheader]

    app = run_app(page=OPTIMIZERS_PAGE, query={"experiment": str(filled.moons)})  # varies width and n_train
    app.selectbox(key="optimizers_sensitivity_x").select("n_train").run()

    headings = [header.value for header in app.subheader]
    assert "Sensitivity to n_train" in headings and "Sensitivity to the learning rate" not in headings
    assert figure(app, "optimizers_sensitivity_chart")["layout"]["xaxis"]["title"]["text"] == "n_train"


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
    animation = figure(app, "trial_fit_animation")  # the picture, then the loss beside it with its epoch marked
    assert [trace["type"] for trace in animation["data"]] == ["heatmap", "contour"] + ["scatter"] * 7
    assert len(animation["frames"]) == len(animation["layout"]["sliders"][0]["steps"]) >= 3
    assert app.json[0].value and '"width": 4' in app.json[0].value


def test_trial_page_says_how_many_trials_shared_the_fused_model(filled: Filled, tmp_path: Path):
    from sqlalchemy import select

    from services.db import session_scope
    from services.models import Trial

    fused_id, alone_id = filled.moons_trials[:2]
    engine = make_engine(f"sqlite:///{tmp_path / 'fitscope.db'}")
    with session_scope(engine) as session:  # as worker/jobs.py records a job of five trials
        trial = session.scalar(select(Trial).where(Trial.id == fused_id))
        trial.final_metrics = {**trial.final_metrics, "trained_with": 5}
    engine.dispose()

    def header(trial_id: int) -> str:
        return run_app(page=TRIAL_PAGE, query={"trial": str(trial_id)}).markdown[0].value

    assert "trained fused with 4 other trials" in header(fused_id)
    assert "trained fused" not in header(alone_id)  # trained_with 1: the one-trial path
    # How a trial ran is not something it learned: no metric picker offers it.
    from dashboard import data, trial_tables

    table = data.trials(filled.moons)
    assert "trained_with" in table.columns and "final_val_loss" in trial_tables.metric_columns(table)
    assert "trained_with" not in trial_tables.metric_columns(table)


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


# --- review findings: crashes, the filter, diverged runs, more metrics --------------------------------------

def test_a_learning_rate_sweep_draws_its_schedule_per_lr_and_counts_the_diverged_runs(filled: Filled):
    app = run_app(page=OPTIMIZERS_PAGE, query={"experiment": str(filled.lr)})

    assert app.selectbox(key="optimizers_schedule_group").value == "lr"  # the only parameter that varies
    schedule = figure(app, "optimizers_schedule_chart")
    rates = {trace["name"]: trace["y"] for trace in schedule["data"] if trace["line"].get("dash") == "dot"}
    assert set(rates) == {"lr (0.01)", "lr (0.1)"}  # lr 10 diverged: out of the bands by default
    assert rates["lr (0.1)"][0] == pytest.approx(0.1) and rates["lr (0.1)"][-1] < 0.1  # exponential decay
    caption = next(caption.value for caption in app.caption if "runs diverged" in caption.value)
    assert "Bands over seeds only. 2 of the 6 runs diverged and are left out of the bands" in caption
    sensitivity = figure(app, "optimizers_sensitivity_chart")
    assert {x for trace in sensitivity["data"] for x in trace["x"]} == {0.01, 0.1}

    app.toggle(key="optimizers_include_diverged").set_value(True).run()

    assert not app.exception
    rates = {trace["name"] for trace in figure(app, "optimizers_schedule_chart")["data"]
             if trace["line"].get("dash") == "dot"}
    assert rates == {"lr (0.01)", "lr (0.1)", "lr (10)"}


def test_fit_analysis_filter_slices_every_section_and_is_kept_per_experiment(filled: Filled):
    app = run_app(page=FIT_PAGE, query={"experiment": str(filled.moons)})

    app.multiselect(key=f"fit_filter_{filled.moons}_n_train").set_value(["48"]).run()

    assert not app.exception
    assert any("4 of 8 trials have finished training" in caption.value for caption in app.caption)  # n_train 16
    assert {name for name, _ in mean_lines(figure(app, "fit_capacity_chart"))} == {"n_train=16"}
    assert figure(app, "fit_heatmap_chart")["data"][0]["y"] == ["16"]
    assert figure(app, "fit_verdict_chart")["data"][0]["y"] == ["16"]
    assert len(table_with(app, "sibling_verdict")) == 4

    # Another experiment starts with nothing left out (the old filter, keyed by name, hid its values).
    app.selectbox(key="fit_selected").select(filled.sine).run()
    assert any("8 of 8 trials have finished training" in caption.value for caption in app.caption)
    app.selectbox(key="fit_selected").select(filled.moons).run()
    assert any("4 of 8 trials have finished training" in caption.value for caption in app.caption)


def test_fit_analysis_offers_regression_metrics_and_norms(filled: Filled):
    app = run_app(page=FIT_PAGE, query={"experiment": str(filled.sine)})

    assert app.segmented_control(key="fit_curves_metric").options == [
        "loss", "rmse", "mae", "r2", "grad_norm", "weight_norm"]
    app.segmented_control(key="fit_curves_metric").set_value("grad_norm").run()
    app.segmented_control(key="fit_capacity_metric").set_value("final_weight_norm").run()
    assert not app.exception
    assert figure(app, "fit_curves_chart")["layout"]["yaxis"]["type"] == "linear"  # auto: within two decades
    app.segmented_control(key="fit_curves_scale_grad_norm").set_value("log").run()

    assert not app.exception
    curves = figure(app, "fit_curves_chart")
    assert curves["layout"]["yaxis"]["type"] == "log" and curves["layout"]["yaxis"]["title"]["text"] == "grad_norm"
    assert all(y > 0 for trace in curves["data"] if trace.get("fill") != "toself" for y in trace["y"])
    # One width: no capacity curve but a sentence saying what to vary; the norm is drawn against lr instead.
    assert any("same parameter_count" in info.value and "vary width or depth" in info.value for info in app.info)
    against = figure(app, "fit_against_chart")
    assert {trace["line"]["dash"] for trace in against["data"] if trace.get("fill") != "toself"} == {"solid"}


def test_fit_analysis_offers_the_final_norms_and_reads_them_once_chosen(filled: Filled):
    """As on the Optimizers page: the capacity and heatmap metric lists offer the final norms without
    reading them for every trial; chosen, they are read, and the heatmap maps their true means."""
    import os

    from dashboard import frames
    from services.db import session_scope
    from services.queries import last_epoch_values

    def kept_reads() -> set[str]:
        return {name for (_, experiment_id), (_, values) in frames._kept.items() if experiment_id == filled.sine
                for name in values}

    app = run_app(page=FIT_PAGE, query={"experiment": str(filled.sine)})
    assert {"final_weight_norm", "final_grad_norm"} <= set(app.segmented_control(key="fit_capacity_metric").options)
    assert {"final_weight_norm", "final_grad_norm"} <= set(app.selectbox(key="fit_heatmap_metric").options)
    assert "final_norms" not in kept_reads()

    app.selectbox(key="fit_heatmap_metric").select("final_weight_norm").run()

    assert not app.exception and "final_norms" in kept_reads()
    engine = make_engine(os.environ["FITSCOPE_DATABASE_URL"])
    with session_scope(engine) as session:
        norms = last_epoch_values(session, filled.sine)
    engine.dispose()
    cells = [z for row in figure(app, "fit_heatmap_chart")["data"][0]["z"] for z in row if z is not None]
    weights = [values["weight_norm"] for values in norms.values() if values.get("weight_norm") is not None]
    assert cells and min(weights) - 1e-9 <= min(cells) and max(cells) <= max(weights) + 1e-9


@pytest.mark.parametrize("page", [TRIAL_PAGE, FIT_PAGE])
def test_a_link_with_a_twenty_digit_id_is_a_warning_not_a_crash(filled: Filled, page: str):
    asked = "9" * 25
    app = run_app(page=page, query={"trial": asked, "experiment": asked})
    assert any("does not exist" in warning.value for warning in app.warning)


def test_trial_page_marks_best_and_early_stopped_epochs_and_draws_the_norms(filled: Filled):
    app = run_app(page=TRIAL_PAGE, query={"trial": str(filled.nested_trials[0])})

    loss = figure(app, "trial_loss_chart")
    labels = {annotation["text"] for annotation in loss["layout"].get("annotations", [])}
    assert any(label.startswith("best (epoch ") for label in labels)
    norms = figure(app, "trial_norms_chart")
    assert {trace["name"] for trace in norms["data"]} == {"gradient norm", "weight norm"}
    assert norms["layout"]["yaxis"]["type"] == "log"
    app.segmented_control(key="trial_y_scale").set_value("log").run()
    assert figure(app, "trial_loss_chart")["layout"]["yaxis"]["type"] == "log"


# --- every choice a picker offers ---------------------------------------------------------------------------

def choose_everything(app) -> int:
    """Select, one widget at a time, every option of every selectbox, segmented control and toggle on
    the page (the experiment picker aside), asserting after each run that nothing raised. Returns the
    number of choices made, so a test can tell that the page offered some."""
    made = 0
    widget_kinds = ("selectbox", "segmented_control", "toggle")
    keys = [(kind, widget.key) for kind in widget_kinds for widget in getattr(app, kind)
            if widget.key and not widget.key.endswith("_selected")]
    for kind, key in keys:
        present = [widget for widget in getattr(app, kind) if widget.key == key]
        if not present:
            continue  # an earlier choice removed it (e.g. "Against" when no numeric parameter is left)
        choices = [True, False] if kind == "toggle" else list(range(len(present[0].options)))
        for choice in choices:
            present = [widget for widget in getattr(app, kind) if widget.key == key]
            if not present:
                break
            widget = present[0]
            if widget.disabled:
                break
            if kind == "selectbox":
                if choice >= len(widget.options):
                    break
                widget.select_index(choice)
            elif kind == "segmented_control":
                if choice >= len(widget.options):
                    break
                widget.set_value(widget.options[choice])
            else:
                widget.set_value(choice)
            app.run()
            assert not app.exception, (key, choice, app.exception)
            made += 1
    return made


@pytest.mark.slow
@pytest.mark.parametrize(("page", "experiment"), [
    (FIT_PAGE, "lr"), (FIT_PAGE, "nested"),  # regression with diverged runs; classification, nested parameters
    (OPTIMIZERS_PAGE, "sine"), (OPTIMIZERS_PAGE, "lr"), (OPTIMIZERS_PAGE, "nested"),
])
def test_every_picker_option_of_the_analysis_pages_draws_without_an_error(filled: Filled, page: str,
                                                                           experiment: str):
    """Review findings 1 and 2 (the schedule grouped by lr, a heatmap whose metric is also an axis) were
    crashes behind a non-default choice: this walks every choice on the test experiments, including one
    whose list and dict parameters (betas, milestones, early_stopping) vary. About 20 s a page."""
    app = run_app(page=page, query={"experiment": str(getattr(filled, experiment))})

    assert choose_everything(app) > 10
    assert app.get("plotly_chart")
