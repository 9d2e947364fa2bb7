"""The analysis pages' defaults on the project's own example grids, trained by the real engine
(examples/optimizers_and_schedules.yaml and examples/capacity_vs_data.yaml with fewer epochs), as a
new user would first see them: no band mixes two configurations unless the user chose "averaged",
each optimizer is drawn at its best learning rate and schedule (checked against the trials table
read directly with SQL), and a loss that spans decades gets a log axis or a clipped range with a note."""

from __future__ import annotations

import math
import shutil
import sqlite3
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from services.db import make_engine, session_scope
from services.migrate import upgrade
from services.spec import parse_spec
from services.submission import submit
from tests.dashboard.test_analysis_pages import FIT_PAGE, OPTIMIZERS_PAGE, figure
from tests.dashboard.test_app import run_app, train
from tests.servers import REPO

SEEDS = 2


def submit_spec(engine, text: str):
    with session_scope(engine) as session:
        return submit(session, spec=parse_spec(text), spec_text=text, submitted_by="tester", max_trials=1000)


def example(name: str, **overrides) -> str:
    spec = yaml.safe_load((REPO / "examples" / name).read_text())
    for key, value in overrides.items():
        spec["parameters"][key] = {"value": value}
    return yaml.safe_dump(spec)


@pytest.fixture(scope="module")
def _template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int]:
    """Both example grids trained once per module (112 + 16 short trials); each test gets a copy."""
    path = tmp_path_factory.mktemp("examples") / "fitscope.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    engine = make_engine(url)
    try:
        optimizers = submit_spec(engine, example("optimizers_and_schedules.yaml", epochs=6, step_size=2))
        capacity = submit_spec(engine, example("capacity_vs_data.yaml", epochs=40))
        for trial_id in optimizers.trial_ids + capacity.trial_ids:
            assert train(engine, trial_id) in ("succeeded", "diverged")
    finally:
        engine.dispose()
    return path, optimizers.experiment_id, capacity.experiment_id


@pytest.fixture
def grids(_template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, int, int]:
    template, optimizers, capacity = _template
    shutil.copyfile(template, tmp_path / "fitscope.db")
    monkeypatch.setenv("FITSCOPE_DATABASE_URL", f"sqlite:///{tmp_path / 'fitscope.db'}")
    return tmp_path / "fitscope.db", optimizers, capacity


def mean_traces(spec: dict) -> list[dict]:
    return [trace for trace in spec["data"] if trace.get("fill") != "toself" and trace.get("customdata") is not None]


def best_configurations(path: Path, experiment_id: int) -> dict[str, tuple[float, str]]:
    """Straight from the trials table: for each optimizer, the (lr, schedule) whose trained runs have the
    lowest mean final validation loss (a run without one, e.g. diverged, counts as infinitely bad)."""
    with sqlite3.connect(path) as connection:
        rows = connection.execute(
            "SELECT json_extract(config, '$.optimizer'), json_extract(config, '$.lr'), "
            "json_extract(config, '$.schedule'), json_extract(final_metrics, '$.final_val_loss') "
            "FROM trials WHERE experiment_id = ? AND status IN ('succeeded', 'diverged')", (experiment_id,)).fetchall()
    losses: dict[tuple, list[float]] = defaultdict(list)
    for optimizer, lr, schedule, loss in rows:
        losses[(optimizer, lr, schedule)].append(loss if loss is not None and math.isfinite(loss) else math.inf)
    best: dict[str, tuple[float, tuple]] = {}
    for (optimizer, lr, schedule), values in sorted(losses.items(), key=lambda item: (item[0][0], str(item[0][1]),
                                                                                      item[0][2])):
        mean = sum(values) / len(values)
        if optimizer not in best or mean < best[optimizer][0]:
            best[optimizer] = (mean, (lr, schedule))
    return {optimizer: config for optimizer, (_, config) in best.items()}


def mean_val_curve(path: Path, experiment_id: int, optimizer: str, lr: float, schedule: str) -> list[float]:
    with sqlite3.connect(path) as connection:
        return [value for (value,) in connection.execute(
            "SELECT avg(e.val_loss) FROM epoch_metrics e JOIN trials t ON t.id = e.trial_id "
            "WHERE t.experiment_id = ? AND t.status = 'succeeded' AND json_extract(t.config, '$.optimizer') = ? "
            "AND json_extract(t.config, '$.lr') = ? AND json_extract(t.config, '$.schedule') = ? "
            "GROUP BY e.epoch ORDER BY e.epoch", (experiment_id, optimizer, lr, schedule))]


def assert_axis_survives(spec: dict, axis: str = "yaxis") -> None:
    """A chart whose drawn values span more than two decades has a log axis or a range with a note."""
    values = [y for trace in mean_traces(spec) if trace.get("yaxis", "y") == axis.replace("axis", "")
              for y in trace["y"] if y is not None and math.isfinite(y)]
    assert values
    layout = spec["layout"]
    if min(values) > 0 and max(values) / min(values) > 100:
        notes = [note["text"] for note in layout.get("annotations", [])]
        assert layout[axis].get("type") == "log" or any("above the range" in note for note in notes), (
            layout[axis], notes)


def test_optimizers_page_draws_each_optimizer_at_its_best_rate_and_schedule_over_its_seeds_only(grids):
    path, optimizers, _ = grids
    app = run_app(page=OPTIMIZERS_PAGE, query={"experiment": str(optimizers)})

    chart = figure(app, "optimizers_curves_chart")
    best = best_configurations(path, optimizers)
    assert len(best) == 7
    validation = {trace["name"]: trace for trace in mean_traces(chart) if trace["line"]["dash"] == "dash"}
    # The legend names each line's best rate and schedule, as the trials table has them.
    expected = {optimizer: f"optimizer={optimizer} (lr={lr:g}, schedule={schedule})"
                for optimizer, (lr, schedule) in best.items()}
    assert set(validation) == set(expected.values())
    for optimizer, (lr, schedule) in best.items():
        line = validation[expected[optimizer]]
        assert max(line["customdata"]) <= SEEDS  # a band over the seeds of one configuration, nothing more
        assert line["y"] == pytest.approx(mean_val_curve(path, optimizers, optimizer, lr, schedule), rel=1e-9), (
            optimizer, lr, schedule)
    subtitle = chart["layout"]["title"]["subtitle"]["text"]
    assert "Lr and schedule at each line's best (lowest mean final_val_loss over seeds); bands over seeds only" \
        in subtitle
    assert_axis_survives(chart)
    for key in ("optimizers_sensitivity_chart", "optimizers_schedule_chart"):
        spec = figure(app, key)
        assert all(max(trace["customdata"]) <= SEEDS for trace in mean_traces(spec))
        assert_axis_survives(spec)


def test_averaging_the_rate_is_a_choice_the_chart_then_says_spans_configurations(grids):
    _, optimizers, _ = grids
    app = run_app(page=OPTIMIZERS_PAGE, query={"experiment": str(optimizers)})

    app.segmented_control(key="optimizers_others_lr_handling").set_value("averaged").run()

    assert not app.exception
    chart = figure(app, "optimizers_curves_chart")
    assert max(max(trace["customdata"]) for trace in mean_traces(chart)) > SEEDS  # rates pooled, as asked
    assert "lr averaged: each band spans lr as well as seeds" in chart["layout"]["title"]["subtitle"]["text"]
    assert any("spans lr as well as seeds" in caption.value for caption in app.caption)
    assert_axis_survives(chart)

    app.segmented_control(key="optimizers_others_lr_handling").set_value("held").run()
    app.selectbox(key="optimizers_others_lr_held").select(0.1).run()
    chart = figure(app, "optimizers_curves_chart")
    assert "lr held at 0.1" in chart["layout"]["title"]["subtitle"]["text"]
    assert all(max(trace["customdata"]) <= SEEDS for trace in mean_traces(chart))


def test_divergence_chart_shows_unstable_runs_next_to_diverged_ones(grids):
    path, optimizers, _ = grids
    with sqlite3.connect(path) as connection:
        unstable = connection.execute(
            "SELECT count(*) FROM trials t WHERE t.experiment_id = ? AND t.status = 'succeeded' "
            "AND coalesce(t.verdict, '') != 'diverged' AND (SELECT max(e.train_loss) FROM epoch_metrics e "
            "WHERE e.trial_id = t.id) > 10 * json_extract(t.final_metrics, '$.baseline_train_loss')",
            (optimizers,)).fetchone()[0]
    app = run_app(page=OPTIMIZERS_PAGE, query={"experiment": str(optimizers)})

    bars = figure(app, "optimizers_divergence_chart")
    drawn = sum(int(text.split("/")[0]) for trace in bars["data"] if trace.get("yaxis") == "y2"
                for text in trace["text"])
    assert drawn >= unstable  # the train-loss rule alone; validation blow-ups count too
    assert bars["layout"]["annotations"][1]["text"].startswith("unstable (rose above 10x its baseline")


def test_fit_analysis_draws_data_size_as_panels_not_as_an_average(grids):
    _, _, capacity = grids
    app = run_app(page=FIT_PAGE, query={"experiment": str(capacity)})

    assert app.selectbox(key="fit_curves_group").value == "width"
    assert app.selectbox(key="fit_curves_facet").value == "n_train"
    curves = figure(app, "fit_curves_chart")
    titles = [note["text"] for note in curves["layout"]["annotations"]]
    assert "n_train=40" in titles and "n_train=400" in titles
    assert {max(trace["customdata"]) for trace in mean_traces(curves)} == {SEEDS}  # the two seeds, not four runs
    assert_axis_survives(curves)
    capacity_chart = figure(app, "fit_capacity_chart")
    assert all(max(trace["customdata"]) <= SEEDS for trace in mean_traces(capacity_chart))
    shares = figure(app, "fit_importance_chart")["data"][0]
    assert set(shares["y"]) == {"width", "n_train", "interactions", "seed noise"}
    assert sum(shares["x"]) == pytest.approx(1.0)
