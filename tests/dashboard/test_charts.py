"""Unit tests of the figure builders, from small hand-made DataFrames."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from dashboard import axes, band_charts, charts
from services import analysis


def epochs_of(trial_ids: list[int], n_epochs: int = 3) -> pd.DataFrame:
    rows = [
        {"trial_id": trial_id, "epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.2 / epoch,
         "train_accuracy": 0.5 + 0.1 * epoch, "val_accuracy": 0.45 + 0.1 * epoch}
        for trial_id in trial_ids for epoch in range(1, n_epochs + 1)
    ]
    return pd.DataFrame(rows)


TRIALS = pd.DataFrame({
    "trial_id": [10, 11, 12, 13],
    "ordinal": [0, 1, 2, 3],
    "width": [8, 64, 8, 64],
    "optimizer": ["adam", "adam", "sgd", "sgd"],
    "batch_size": [32, "full", 32, "full"],
})


def test_progress_bar_chart_stacks_one_bar_per_status_in_fixed_colours():
    experiments = pd.DataFrame({"id": [2, 1], "name": ["wide", "narrow"], "succeeded": [3, 0], "failed": [1, 0],
                                "queued": [0, 4]})

    figure = charts.progress_bar_chart(experiments)

    assert figure.layout.barmode == "stack"
    assert [trace.name for trace in figure.data] == list(charts.STATUS_ORDER)
    assert all(trace.orientation == "h" for trace in figure.data)
    by_status = {trace.name: trace for trace in figure.data}
    assert list(by_status["succeeded"].y) == ["#2 wide", "#1 narrow"]
    assert list(by_status["succeeded"].x) == [3, 0] and list(by_status["queued"].x) == [0, 4]
    assert list(by_status["running"].x) == [0, 0]  # a status without a column counts zero
    assert {name: trace.marker.color for name, trace in by_status.items()} == charts.STATUS_COLORS


def test_a_long_experiment_name_is_cut_on_the_axis_and_whole_in_the_hover():
    name = "a grid with a name far longer than any bar chart axis can hold"
    figure = charts.progress_bar_chart(pd.DataFrame({"id": [7, 8], "name": [name, "short"], "queued": [1, 2]}))
    queued = {trace.name: trace for trace in figure.data}["queued"]
    assert list(queued.y) == [f"#7 {name}"[:39] + "…", "#8 short"]
    assert list(queued.customdata) == [f"#7 {name}", "#8 short"]


def test_learning_curves_draw_train_solid_and_validation_dashed_per_trial():
    figure = charts.learning_curves(epochs_of([10, 11, 12]), TRIALS, "width")

    # One trace per colour and split; the trials of a colour are lines separated by a gap (None).
    assert [(trace.name, trace.line.dash) for trace in figure.data] == [
        ("width=8", "solid"), ("width=8", "dash"), ("width=64", "solid"), ("width=64", "dash")]
    width_8 = figure.data[0]
    assert _gapped(width_8.y) == [1.0, 0.5, 1.0 / 3, None] * 2 and _gapped(width_8.x) == [1, 2, 3, None] * 2
    assert list(width_8.text) == ["trial 0"] * 3 + [None] + ["trial 2"] * 3 + [None]
    assert width_8.connectgaps is False and "%{text}" in width_8.hovertemplate
    assert _gapped(figure.data[3].y) == [1.2, 0.6, 1.2 / 3, None]


def _gapped(values) -> list:
    return [None if math.isnan(value) else value for value in values]


def test_learning_curves_give_one_colour_and_one_legend_entry_per_parameter_value():
    figure = charts.learning_curves(epochs_of([10, 11, 12, 13]), TRIALS, "width")

    colours = {trace.name: set() for trace in figure.data}
    for trace in figure.data:
        colours[trace.name].add(trace.line.color)
    assert set(colours) == {"width=8", "width=64"}
    assert all(len(found) == 1 for found in colours.values())
    assert colours["width=8"] != colours["width=64"]
    assert sorted(trace.name for trace in figure.data if trace.showlegend) == ["width=64", "width=8"]


def test_learning_curves_of_accuracy_and_of_mixed_value_types():
    figure = charts.learning_curves(epochs_of([10, 11]), TRIALS, "batch_size", metric="accuracy")

    assert [trace.name for trace in figure.data] == ["batch_size=32"] * 2 + ["batch_size=full"] * 2
    assert _gapped(figure.data[1].y) == [*epochs_of([10])["val_accuracy"], None]
    assert figure.layout.yaxis.title.text == "accuracy"


def test_learning_curves_of_no_epochs_is_an_empty_figure():
    figure = charts.learning_curves(epochs_of([]).reindex(columns=["trial_id", "epoch", "train_loss", "val_loss"]),
                                    TRIALS, "optimizer")
    assert len(figure.data) == 0


def test_status_badges_name_only_statuses_with_trials():
    assert charts.status_badges({"succeeded": 2, "failed": 1, "queued": 0}) == (
        ":green-badge[2 succeeded] :red-badge[1 failed]")
    assert charts.status_badges({"queued": 0}) == "no trials"


def test_learning_curves_coloured_by_trial_when_no_parameter_varies():
    figure = charts.learning_curves(epochs_of([10, 11]), TRIALS, "ordinal")
    assert [trace.name for trace in figure.data] == ["trial 0"] * 2 + ["trial 1"] * 2  # not "ordinal=0"


def test_epoch_marks_sit_inside_the_plot_below_the_title():
    figure = charts.learning_curves(epochs_of([10]), TRIALS, "ordinal", epoch_marks={"best": 3, "stopped early": 4})
    marks = [a for a in figure.layout.annotations if "(epoch " in a.text]
    assert [a.text for a in marks] == ["best (epoch 3)", "stopped early (epoch 4)"]
    # Anchored at the plot's top edge and hanging down into it (above it they ran into the subtitle),
    # the second one line lower than the first.
    assert all(a.yref == "paper" and a.y == 1 and a.yanchor == "top" for a in marks)
    assert marks[1].yshift < marks[0].yshift


# --- the analysis pages' builders ----------------------------------------------------------------------

def seed_grid() -> pd.DataFrame:
    """Trials over width (capacity) x 3 seeds, with final losses shaped as capacity theory says: train
    falls with width; validation falls, bottoms out at width 64 and rises again (the U)."""
    val_by_width = {4: 0.9, 16: 0.5, 64: 0.3, 256: 0.45, 1024: 0.7}
    rows = []
    for k, (width, val) in enumerate(val_by_width.items()):
        for seed in range(3):
            rows.append({"trial_id": 100 + 3 * k + seed, "ordinal": 3 * k + seed, "width": width, "seed": seed,
                         "n_train": 200, "parameter_count": 10 * width, "status": "succeeded",
                         "final_train_loss": 1.0 / (1 + k) + 0.01 * seed, "final_val_loss": val + 0.02 * (seed - 1)})
    return pd.DataFrame(rows)


def mean_lines(figure) -> list:
    return [trace for trace in figure.data if trace.fill != "toself"]


def band_traces(figure) -> list:
    return [trace for trace in figure.data if trace.fill == "toself"]


def bands_of(curves: pd.DataFrame, trials: pd.DataFrame, *, by: list[str], columns: dict[str, str],
             band: str = "std") -> pd.DataFrame:
    """What dashboard.data.curve_bands returns (the database's GROUP BY), computed with pandas."""
    merged = curves.merge(trials[["trial_id", *by]], on="trial_id")
    long = pd.concat([merged.assign(split=split, value=merged[column]) for split, column in columns.items()])
    return analysis.seed_bands(long, by=[*by, "split", "epoch"], value="value", band=band)


LOSS = {"train": "train_loss", "val": "val_loss"}


def test_learning_curve_bands_draw_one_mean_and_one_band_per_group_and_split():
    trials = TRIALS.assign(seed=[0, 1, 0, 1])  # width 8: trials 10 and 12; width 64: 11 and 13
    curves = epochs_of([10, 11, 12, 13])
    curves.loc[curves["trial_id"] == 12, "train_loss"] += 0.2  # two seeds of width 8 disagree

    figure = band_charts.learning_curve_bands(bands_of(curves, trials, by=["width"], columns=LOSS), color_by="width",
                                         subtitle="Lr at each line's best.")

    assert sorted((trace.name, trace.line.dash) for trace in mean_lines(figure)) == [
        ("width=64", "dash"), ("width=64", "solid"), ("width=8", "dash"), ("width=8", "solid")]
    width_8_train = next(t for t in mean_lines(figure) if t.name == "width=8" and t.line.dash == "solid")
    assert list(width_8_train.y) == pytest.approx([1.1, 0.6, 1 / 3 + 0.1])
    assert list(width_8_train.customdata) == [2, 2, 2]  # each point is the mean of two runs
    (band,) = band_traces(figure)  # only width 8's train runs differ; identical runs draw no band
    assert band.legendgroup == "8"
    assert "mean ± 1 std" in figure.layout.title.subtitle.text
    assert "Lr at each line's best." in figure.layout.title.subtitle.text
    assert figure.layout.yaxis.type == "linear"  # 0.33 .. 1.2: within two decades


def test_a_blow_up_gets_a_log_axis_and_a_linear_one_a_robust_range_with_a_note():
    trials = TRIALS.assign(seed=[0, 1, 0, 1])
    curves = epochs_of([10, 11, 12, 13])
    curves.loc[(curves["trial_id"] == 13) & (curves["epoch"] == 2), ["train_loss", "val_loss"]] = 1.2e10
    bands = bands_of(curves, trials, by=["width"], columns=LOSS)

    auto = band_charts.learning_curve_bands(bands, color_by="width")
    assert auto.layout.yaxis.type == "log"
    assert "log scale" in auto.layout.annotations[0].text
    assert all(y > 0 for trace in band_traces(auto) for y in trace.y)  # no band edge below 0 on a log axis

    linear = band_charts.learning_curve_bands(bands, color_by="width", log_y=False)
    assert linear.layout.yaxis.type == "linear"
    low, high = linear.layout.yaxis.range
    assert high < 10  # the flat lines stay readable
    (note,) = linear.layout.annotations
    assert note.text == "2 points above the range, max 6e+09"  # width 64's train and val means at epoch 2


def test_on_a_log_axis_a_band_never_reaches_below_its_lowest_run():
    """Seeds at 1, 0.2 and 0.21: mean - std is 0.011, positive but a decade under every run. On a log
    axis that drew a band down to it (in teeth, where the std crossed the mean from epoch to epoch);
    the band now starts at the lowest run. The mean line and the linear axis are unchanged."""
    trials = pd.DataFrame({"trial_id": [1, 2, 3], "width": [8, 8, 8], "seed": [0, 1, 2]})
    curves = pd.DataFrame([{"trial_id": trial_id, "epoch": epoch, "train_loss": loss * (1 + epoch / 10),
                            "val_loss": loss * (1 + epoch / 10)}
                           for trial_id, loss in ((1, 1.0), (2, 0.2), (3, 0.21)) for epoch in (1, 2, 3)])
    bands = bands_of(curves, trials, by=["width"], columns=LOSS)
    bands["low"] = bands["epoch"].map(curves.groupby("epoch")["train_loss"].min())  # as data.curve_bands gives
    assert (bands["lower"] > 0).all() and (bands["lower"] < bands["low"] / 10).all()  # the case above
    log = band_charts.learning_curve_bands(bands, color_by="width", log_y=True)
    for band in band_traces(log):
        assert min(band.y) == pytest.approx(0.2 * 1.1)  # the lowest run, at epoch 1
    linear = band_charts.learning_curve_bands(bands, color_by="width", log_y=False)
    assert min(min(band.y) for band in band_traces(linear)) == pytest.approx(float(bands["lower"].min()))


def test_a_few_blow_ups_on_a_log_axis_leave_the_rest_readable():
    # 100 epochs of losses between 0.005 and 0.7, and three spikes of unstable runs' means (1e4 .. 1e9).
    ordinary = np.linspace(0.005, 0.7, 300)
    kind, value_range, note = axes.axis_plan([*ordinary, 2e4, 3e7, 1e9])
    assert kind == "log" and note == "log scale: 3 points above the range, max 1e+09"
    low, high = value_range
    assert low < 0.005 < 0.7 < high < 1.0  # the axis spans the ordinary values, not twelve decades
    # Many values that high are a second bulk, not blow-ups: the axis spans everything.
    assert axes.axis_plan([*ordinary, *[1e9] * 30])[1] is None


def test_axis_plan_leaves_ordinary_values_alone():
    assert axes.axis_plan([0.1, 0.5, 0.9]) == ("linear", None, "")
    assert axes.axis_plan([0.001, 1.0]) == ("log", None, "log scale: the values span 3 decades")
    kind, value_range, note = axes.axis_plan([-0.1, 0.0, 0.1, 0.05, -0.05, 0.02, 0.03, 0.01, 0.04, 5e6])
    assert kind == "linear" and value_range[1] < 1 and note == "1 point above the range, max 5e+06"


def test_log_axes_label_whole_values_not_plotlys_lone_digits():
    # Four decades: each decade once, in full ("0.0001", not plotly's "100µ"; no lone "2" or "5").
    wide = axes.log_ticks([0.00012, 0.003, 0.2, 1.7])
    assert wide["tickvals"] == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    assert wide["ticktext"] == ["0.0001", "0.001", "0.01", "0.1", "1"]
    # Under two decades, 2 and 5 between them, written as the values they are.
    narrow = axes.log_ticks([0.05, 0.9])
    assert narrow["ticktext"] == ["0.05", "0.1", "0.2", "0.5", "1"]
    assert axes.log_ticks([0.3, 0.6]) == {}  # within a decade plotly's own ticks are whole values
    assert axes.log_ticks([-1.0, 0.0]) == {}
    # Twenty-five decades: at most about ten labels, still whole decades.
    assert len(axes.log_ticks([1e-12, 1e12])["tickvals"]) <= 14
    # The charts use them: a log loss axis and a log parameter-count axis.
    trials = TRIALS.assign(seed=[0, 1, 0, 1])
    curves = epochs_of([10, 11, 12, 13])
    curves.loc[(curves["trial_id"] == 13) & (curves["epoch"] == 2), ["train_loss", "val_loss"]] = 1.2e10
    figure = band_charts.learning_curve_bands(bands_of(curves, trials, by=["width"], columns=LOSS), color_by="width")
    assert figure.layout.yaxis.type == "log" and figure.layout.yaxis.ticktext
    assert all(math.log10(float(text)).is_integer() for text in figure.layout.yaxis.ticktext)  # decades, in full
    capacity = band_charts.metric_against(seed_grid(), x="parameter_count", color_by="n_train",
                                          columns={"train": "final_train_loss", "val": "final_val_loss"})
    assert capacity.layout.xaxis.type == "log"
    assert list(capacity.layout.xaxis.ticktext) == ["100", "1000", "10000"]  # 40 .. 10240


def test_learning_curve_bands_draw_a_second_parameter_as_panels():
    trials = TRIALS.assign(seed=0)
    bands = bands_of(epochs_of([10, 11, 12, 13]), trials, by=["optimizer", "width"], columns=LOSS)

    figure = band_charts.learning_curve_bands(bands, color_by="width", facet="optimizer")

    assert [a.text for a in figure.layout.annotations] == ["optimizer=adam", "optimizer=sgd"]
    assert {trace.xaxis for trace in figure.data} == {"x", "x2"}
    assert len([t for t in mean_lines(figure) if t.showlegend]) == 2  # one legend entry per width


def test_capacity_curve_shows_the_u_shaped_validation_curve_on_a_log_axis():
    figure = band_charts.metric_against(seed_grid(), x="parameter_count", color_by="n_train",
                                   columns={"train": "final_train_loss", "val": "final_val_loss"})

    train, val = sorted(mean_lines(figure), key=lambda trace: trace.line.dash != "solid")
    assert train.line.dash == "solid" and val.line.dash == "dash"
    assert list(val.x) == [40, 160, 640, 2560, 10240]
    lowest = list(val.y).index(min(val.y))
    assert 0 < lowest < len(val.y) - 1  # the bottom of the U is inside, not at an end
    assert list(val.y) == pytest.approx([0.9, 0.5, 0.3, 0.45, 0.7])
    assert list(train.y) == sorted(train.y, reverse=True)  # train keeps falling with capacity
    assert figure.layout.xaxis.type == "log"
    assert len(band_traces(figure)) == 2  # seeds differ: a band for train and for validation


def test_capacity_curve_with_min_max_bands_and_one_line_per_colour_value():
    grid = pd.concat([seed_grid(), seed_grid().assign(n_train=1000, trial_id=lambda f: f.trial_id + 100)])
    figure = band_charts.metric_against(grid, x="width", color_by="n_train", columns={"val": "final_val_loss"},
                                   band="minmax")

    assert sorted(trace.name for trace in mean_lines(figure)) == ["n_train=1000", "n_train=200"]
    band = band_traces(figure)[0]
    assert max(band.y) == pytest.approx(0.9 + 0.02) and min(band.y) == pytest.approx(0.3 - 0.02)
    assert "min to max" in figure.layout.title.subtitle.text


def test_metric_heatmap_writes_the_cell_means():
    grid = seed_grid().assign(lr=lambda f: [0.01, 0.1, 0.1] * 5)
    figure = charts.metric_heatmap(grid, x="width", y="lr", metric="final_val_loss")

    (heatmap,) = figure.data
    assert list(heatmap.x) == ["4", "16", "64", "256", "1024"] and list(heatmap.y) == ["0.01", "0.1"]
    assert heatmap.z[0][2] == pytest.approx(0.28)  # width 64, lr 0.01: the seed-0 run alone
    assert heatmap.z[1][2] == pytest.approx(0.31)  # width 64, lr 0.1: mean of seeds 1 and 2
    assert heatmap.customdata[1][2] == 2


def test_verdict_grid_colours_each_cell_by_its_most_common_verdict():
    grid = seed_grid()
    verdicts = {4: ["underfit"] * 3, 16: ["good_fit"] * 3, 64: ["good_fit", "good_fit", "overfit"],
                256: ["overfit"] * 3, 1024: ["diverged", "overfit", "overfit"]}
    grid["sibling_verdict"] = [v for width in grid["width"].unique() for v in verdicts[width]]

    figure = charts.verdict_grid(grid, x="width", y="n_train")

    (heatmap,) = figure.data
    order = charts.VERDICT_ORDER
    assert list(heatmap.z[0]) == [order.index("underfit"), order.index("good_fit"), order.index("good_fit"),
                                  order.index("overfit"), order.index("overfit")]
    assert heatmap.text[0][2] == "good fit 2/3" and heatmap.text[0][4] == "overfit 2/3"
    # Each verdict's colour fills its own step of the scale.
    scale = [color for _, color in heatmap.colorscale]
    assert scale[2 * order.index("overfit")] == charts.VERDICT_COLORS["overfit"] == "#d62728"
    assert scale[2 * order.index("good_fit")] == charts.VERDICT_COLORS["good_fit"]


def test_difference_interval_draws_the_ci_numbers():
    from services.analysis import mean_difference

    result = mean_difference([1.0, 1.2, 1.4, 1.1], [0.8, 0.9, 1.2, 1.0], paired=True)
    figure = charts.difference_interval(result, label_a="adam", label_b="sgd", metric="final_val_loss")

    point = figure.data[0]
    assert point.x[0] == pytest.approx(result.difference)
    assert point.x[0] + point.error_x.array[0] == pytest.approx(result.high)
    assert point.x[0] - point.error_x.arrayminus[0] == pytest.approx(result.low)
    assert "A: adam" in figure.layout.title.subtitle.text


def test_epochs_to_target_and_divergence_bars():
    trials = TRIALS.assign(status=["succeeded", "diverged", "succeeded", "succeeded"],
                           verdict=["good_fit", "diverged", "overfit", "good_fit"])
    curves = epochs_of([10, 11, 12, 13], n_epochs=4)  # val loss 1.2 / epoch: <= 0.5 from epoch 3
    curves.loc[curves["trial_id"] == 13, "val_loss"] = 0.9  # never gets there
    first = analysis.epochs_to_target(curves, target=0.5).dropna()

    reached = charts.epochs_to_target_bars(first, trials, target=0.5, x="optimizer", color_by="width")
    bars = [trace for trace in reached.data if trace.textposition != "outside"]  # not the "none reached" labels
    by_name = {trace.name: dict(zip(trace.x, trace.y, strict=True)) for trace in bars}
    assert by_name["width=8"] == {"adam": 3.0, "sgd": 3.0} and by_name["width=64"]["adam"] == 3.0
    assert math.isnan(by_name["width=64"]["sgd"])
    assert {trace.name: list(trace.text) for trace in bars}["width=64"] == ["1/1", "0/1"]

    rates = charts.divergence_bars(trials, x="optimizer", color_by="width")
    by_name = {trace.name: dict(zip(trace.x, trace.y, strict=True)) for trace in rates.data if trace.yaxis == "y"}
    assert by_name == {"width=8": {"adam": 0.0, "sgd": 0.0}, "width=64": {"adam": 1.0, "sgd": 0.0}}


def test_a_group_where_no_run_reached_the_target_is_labelled_in_its_own_slot_not_left_blank():
    """An empty slot read as zero epochs: each gap says "none reached (0/N)", at the bar's place (the
    same colour's offset group), in an empty bar that plotly draws no height for."""
    trials = pd.DataFrame({"trial_id": range(8), "lr": [0.01, 0.01, 0.1, 0.1] * 2,
                           "optimizer": ["adam"] * 4 + ["sgd"] * 4})
    reached = pd.Series({0: 5, 1: 7, 2: 3, 4: 9})  # sgd at lr 0.1 (trials 6, 7) never got there, nor 3 or 5

    figure = charts.epochs_to_target_bars(reached, trials, target=0.5, x="lr", color_by="optimizer")

    bars = {trace.name: trace for trace in figure.data if trace.textposition != "outside"}
    labels = {trace.name: trace for trace in figure.data if trace.textposition == "outside"}
    assert dict(zip(bars["optimizer=adam"].x, bars["optimizer=adam"].y, strict=True)) == {"0.01": 6.0, "0.1": 3.0}
    assert bars["optimizer=sgd"].y[0] == 9.0 and math.isnan(bars["optimizer=sgd"].y[1])
    assert list(labels) == ["optimizer=sgd"]  # adam reached the target in every slot: no label
    (empty,) = labels.values()
    assert list(empty.x) == ["0.1"] and list(empty.y) == [0] and list(empty.text) == ["none reached (0/2)"]
    assert empty.offsetgroup == bars["optimizer=sgd"].offsetgroup != bars["optimizer=adam"].offsetgroup
    assert empty.showlegend is False and empty.legendgroup == bars["optimizer=sgd"].legendgroup


def test_a_value_where_no_group_reached_the_target_gets_one_note_not_a_label_per_slot():
    """Side by side, seven upright "none reached" labels ran into one unreadable block: where no group
    of an x value got there, one note over that value says so, counting all of its runs."""
    trials = pd.DataFrame({"trial_id": range(12), "lr": [0.01, 0.01, 10.0, 10.0] * 3,
                           "optimizer": ["adam"] * 4 + ["sgd"] * 4 + ["momentum"] * 4})
    reached = pd.Series({0: 5, 1: 7, 4: 9})  # at lr 10 nobody got there; momentum never did

    figure = charts.epochs_to_target_bars(reached, trials, target=0.5, x="lr", color_by="optimizer")

    labels = [trace for trace in figure.data if trace.textposition == "outside"]
    assert [(trace.name, list(trace.x)) for trace in labels] == [("optimizer=momentum", ["0.01"])]
    [note] = figure.layout.annotations
    # At lr 10's position on the category axis (0.01, 10): plotly reads the label "10" as position 10,
    # far off the axis, which it then stretched to reach.
    assert list(figure.layout.xaxis.categoryarray) == ["0.01", "10"]
    assert note.x == 1 and note.y == 0 and note.text == "none<br>reached<br>(0/6)"


def test_band_chart_panels_are_where_plotly_puts_them():
    """The panels' axes, domains, titles and each line's panel, against plotly's own make_subplots,
    add_traces by row and column, and update_xaxes/update_yaxes by row and column (how the chart was
    built before it set them itself): five panels on a 2 x 4 grid, three cells empty."""
    from plotly.subplots import make_subplots

    bands = pd.DataFrame([{"size": size, "width": width, "split": split, "epoch": epoch, "mean": size + 0.1 * epoch,
                           "lower": size + 0.1 * epoch - 0.05, "upper": size + 0.1 * epoch + 0.05, "low": size, "n": 2}
                          for size in (1, 2, 3, 4, 5) for width in (8, 64) for split in ("train", "val")
                          for epoch in (1, 2, 3)])

    figure = band_charts.learning_curve_bands(bands, color_by="width", facet="size", metric="loss")

    reference = make_subplots(rows=2, cols=4, shared_yaxes=True, shared_xaxes=True, horizontal_spacing=0.03,
                              vertical_spacing=0.12, subplot_titles=[f"size={size}" for size in (1, 2, 3, 4, 5)])
    panels = [int(min(trace.y)) - 1 for trace in figure.data]  # a line's values start at its panel's size
    reference.add_traces([{key: value for key, value in trace.to_plotly_json().items() if key not in ("xaxis", "yaxis")}
                          for trace in figure.data],
                         rows=[panel // 4 + 1 for panel in panels], cols=[panel % 4 + 1 for panel in panels])
    reference.update_xaxes(title_text="epoch", row=2)
    reference.update_yaxes(title_text="loss", col=1)
    assert [(trace.xaxis, trace.yaxis) for trace in figure.data] == [(t.xaxis, t.yaxis) for t in reference.data]
    assert len(set(panels)) == 5
    axes = [name for name in reference.layout.to_plotly_json() if name.startswith(("xaxis", "yaxis"))]
    assert len(axes) == 16 and set(axes) <= set(figure.layout.to_plotly_json())
    for name in axes:
        drawn, expected = figure.layout[name], reference.layout[name]
        assert (drawn.domain, drawn.anchor, drawn.matches, drawn.showticklabels, drawn.title.text) == \
            (expected.domain, expected.anchor, expected.matches, expected.showticklabels, expected.title.text), name
    assert [(a.text, a.x, a.y) for a in figure.layout.annotations][:5] == \
        [(a.text, a.x, a.y) for a in reference.layout.annotations]


def test_prediction_panels_put_curves_and_boundaries_side_by_side():
    curve = {"x": [0.0, 0.5, 1.0], "y_pred": [0.0, 0.4, 0.9], "y_true": [0.0, 0.5, 1.0],
             "train_x": [0.1, 0.9], "train_y": [0.1, 1.1]}
    boundary = {"x_range": [-1.0, 1.0], "y_range": [-1.0, 1.0], "resolution": 2, "classes": [0, 1],
                "predicted_class": [[0, 1], [1, 1]], "probability": [[0.9, 0.6], [0.7, 0.8]],
                "train_x": [-0.5, 0.5], "train_y": [0.5, -0.5], "train_label": [0, 1]}

    figure = charts.prediction_panels({1: {"curve_1d": curve}, 2: {"boundary_2d": boundary}, 3: {}},
                                      {1: "width 4", 2: "width 256"})

    assert [annotation.text for annotation in figure.layout.annotations] == ["width 4", "width 256"]
    assert [trace.type for trace in figure.data] == ["scatter", "scatter", "scatter", "heatmap", "scatter"]
    assert list(figure.data[2].y) == curve["y_pred"] and figure.data[3].xaxis == "x2"
    # training points 2 x, 2 y; truth and model 3 + 3 each; grid 2 x, 2 y, 2 x 2 z; labelled points 2 + 2
    assert charts.points_shipped(figure) == 4 + 6 + 6 + 8 + 4
    go.Figure(figure.to_plotly_json())  # built without plotly's checks, it still passes them
    # The panels where make_subplots puts them (how the chart was built before it set them itself).
    from plotly.subplots import make_subplots

    reference = make_subplots(rows=1, cols=2, horizontal_spacing=0.04, subplot_titles=["width 4", "width 256"])
    assert [(a.text, a.x, a.y) for a in figure.layout.annotations] == \
        [(a.text, a.x, a.y) for a in reference.layout.annotations]
    assert (figure.layout.xaxis2.domain, figure.layout.yaxis2.anchor) == \
        (reference.layout.xaxis2.domain, reference.layout.yaxis2.anchor)
    untitled = charts.prediction_panels({2: {"boundary_2d": boundary}}, {2: ""})  # the trial page's
    assert "annotations" not in untitled.layout.to_plotly_json() and {trace.xaxis for trace in untitled.data} == {"x"}


SCHEDULE = {"loss": "val_loss", "lr": "lr"}


def test_schedule_over_loss_puts_the_learning_rate_on_the_right_axis():
    curves = epochs_of([10, 11]).assign(lr=[0.1, 0.05, 0.025, 0.1, 0.1, 0.1])
    figure = band_charts.schedule_over_loss(bands_of(curves, TRIALS, by=["width"], columns=SCHEDULE), color_by="width")

    lr_traces = [trace for trace in figure.data if trace.line.dash == "dot"]
    assert [list(trace.y) for trace in lr_traces] == [[0.1, 0.05, 0.025], [0.1, 0.1, 0.1]]
    assert all(trace.yaxis == "y2" for trace in lr_traces)


def test_schedule_over_loss_grouped_by_the_learning_rate_itself():
    """Review finding: curves carry the epoch's ``lr`` and the group was the configured ``lr``, a KeyError."""
    trials = pd.DataFrame({"trial_id": [10, 11], "ordinal": [0, 1], "lr": [0.1, 0.01]})
    curves = epochs_of([10, 11]).assign(epoch_lr=[0.1, 0.05, 0.025, 0.01, 0.005, 0.0025])

    bands = bands_of(curves, trials, by=["lr"], columns={"loss": "val_loss", "lr": "epoch_lr"})
    figure = band_charts.schedule_over_loss(bands, color_by="lr")

    lr_traces = {trace.name: list(trace.y) for trace in figure.data if trace.line.dash == "dot"}
    assert lr_traces == {"lr (0.01)": [0.01, 0.005, 0.0025], "lr (0.1)": [0.1, 0.05, 0.025]}


def test_metric_heatmap_of_a_metric_that_is_also_an_axis():
    grid = seed_grid().assign(lr=lambda f: [0.01, 0.1, 0.1] * 5, parameter_count=lambda f: f["width"] * 10)

    figure = charts.metric_heatmap(grid, x="parameter_count", y="lr", metric="parameter_count")

    (heatmap,) = figure.data
    assert list(heatmap.x) == ["40", "160", "640", "2560", "10240"]
    assert heatmap.z[0][2] == 640 and heatmap.z[1][2] == 640


def test_learning_curve_bands_of_a_metric_without_splits_on_a_log_axis():
    curves = epochs_of([10, 11]).assign(grad_norm=[1.0, 0.1, 0.01, 2.0, 0.2, 0.02])

    bands = bands_of(curves, TRIALS, by=["optimizer"], columns={"value": "grad_norm"})
    figure = band_charts.learning_curve_bands(bands, color_by="optimizer", metric="grad_norm", log_y=True)

    (line,) = [trace for trace in figure.data if trace.fill != "toself"]
    assert list(line.y) == pytest.approx([1.5, 0.15, 0.015]) and line.line.dash == "solid"
    assert figure.layout.yaxis.type == "log"


def test_learning_curves_mark_the_best_and_stopped_epochs():
    figure = charts.learning_curves(epochs_of([10]), TRIALS, "width", log_y=True,
                                    epoch_marks={"best": 2, "stopped early": 3, "missing": None})

    assert sorted(shape.x0 for shape in figure.layout.shapes) == [2, 3]
    assert {annotation.text for annotation in figure.layout.annotations} == {"best (epoch 2)",
                                                                              "stopped early (epoch 3)"}
    assert figure.layout.yaxis.type == "log"


def test_norm_curves_draw_gradient_and_weight_norms_on_a_log_axis():
    curves = epochs_of([10]).assign(grad_norm=[1.0, 0.1, 0.01], weight_norm=[3.0, 3.5, 4.0])

    figure = charts.norm_curves(curves)

    assert {trace.name: list(trace.y) for trace in figure.data} == {"gradient norm": [1.0, 0.1, 0.01],
                                                                    "weight norm": [3.0, 3.5, 4.0]}
    assert figure.layout.yaxis.type == "log"


def test_divergence_bars_show_unstable_runs_in_a_row_below_the_diverged_ones():
    trials = pd.DataFrame({"trial_id": range(4), "lr": [10, 10, 10, 0.1], "optimizer": "nesterov",
                           "status": ["diverged", "succeeded", "succeeded", "succeeded"], "verdict": None,
                           "unstable": [True, True, False, False]})
    figure = charts.divergence_bars(trials, x="lr", color_by="optimizer")

    diverged, unstable = figure.data
    assert list(diverged.y) == pytest.approx([0.0, 1 / 3]) and list(unstable.y) == pytest.approx([0.0, 1 / 3])
    assert (diverged.yaxis, unstable.yaxis) == ("y", "y2") and list(unstable.text) == ["0/1", "1/3"]
    assert figure.layout.annotations[1].text.startswith("unstable")


def test_importance_bars_put_interactions_and_seed_noise_last_in_grey():
    shares = pd.DataFrame({"parameter": ["width", "n_train", "interactions", "seed noise"],
                           "share": [0.6, 0.3, 0.05, 0.05]})
    (bars,) = charts.importance_bars(shares, metric="final_val_loss").data
    assert list(bars.y) == ["seed noise", "interactions", "n_train", "width"]  # drawn bottom-up
    assert list(bars.marker.color)[:2] == ["#9e9e9e", "#9e9e9e"]


def test_trial_labels_name_every_varying_parameter_even_a_missing_one():
    from dashboard.widgets import trial_labels

    trials = pd.DataFrame({"trial_id": [1, 2, 3], "ordinal": [0, 1, 2], "lr": [0.1, 0.01, 0.1],
                           "early_stopping": [None, None, {"patience": 20}],  # pandas 3 keeps None as missing
                           "verdict": ["overfit", None, "good_fit"]})
    assert trial_labels(trials, ["early_stopping", "lr"]) == {
        1: "trial 0 · early_stopping=None, lr=0.1 · overfit",
        2: "trial 1 · early_stopping=None, lr=0.01",
        3: "trial 2 · early_stopping={'patience': 20}, lr=0.1 · good fit"}
    assert trial_labels(trials, []) == {1: "trial 0 · overfit", 2: "trial 1", 3: "trial 2 · good fit"}


def test_grouped_bars_keep_the_values_order_when_the_first_colour_lacks_one():
    trials = pd.DataFrame({"trial_id": range(4), "lr": [0.001, 0.1, 0.01, 1.0],
                           "optimizer": ["adam", "adam", "sgd", "sgd"], "status": "succeeded", "unstable": False})
    order = ["0.001", "0.01", "0.1", "1"]
    assert list(charts.divergence_bars(trials, x="lr", color_by="optimizer").layout.xaxis.categoryarray) == order
    reached = pd.Series({0: 3, 1: 4, 2: 5, 3: 6})
    bars = charts.epochs_to_target_bars(reached, trials, target=0.5, x="lr", color_by="optimizer")
    assert list(bars.layout.xaxis.categoryarray) == order


def test_labels_written_once_per_distinct_value_are_each_values_label():
    """charts._format_values (each distinct value written once, the band charts' panels) against
    _format_value of each value: -0.0 beside 0.0, 1 beside 1.0 and True, missing and unhashable values."""
    values = [0.1, 1, 1.0, True, np.float64(0.1), "1", -0.0, 0.0, 0, math.nan, None, float("nan"), [1, 2], pd.NA,
              np.int64(3), 3, 1e-7, 0.1, "adam", -0.0]

    assert charts._format_values(values) == [charts._format_value(value) for value in values]


def _old_color_map(values: list) -> dict[str, str]:
    """charts._color_map as it was (commit 33c0310): every value formatted."""
    from plotly.colors import qualitative, sample_colorscale

    distinct = sorted({charts._format_value(v): v for v in values if not charts._is_missing(v)}.items(),
                      key=lambda item: charts._sort_key(item[1]))
    if not distinct:
        return {}
    if all(charts._is_number(value) for _, value in distinct) and len(distinct) > 1:
        palette = sample_colorscale("Viridis", np.linspace(0.0, 0.85, len(distinct)).tolist())
    else:
        palette = [qualitative.Plotly[i % len(qualitative.Plotly)] for i in range(len(distinct))]
    return {label: color for (label, _), color in zip(distinct, palette, strict=True)}


@pytest.mark.parametrize("seed", range(30))
def test_colour_map_of_distinct_values_is_the_map_of_every_value(seed: int) -> None:
    """Colours from each distinct value's label written once: the same map, in the same order, as from
    every value (ties of equal numbers of other types, 1 and 1.0 and True, 0.0 and -0.0, missing values)."""
    rng = np.random.default_rng(seed)
    pool = [1, 1.0, True, "1", 2.5, np.float64(2.5), 0.001, None, float("nan"), "adam", "sgd", 4, 16, 64, 1e-5,
            np.int64(4), False, 0, 0.0, -0.0]
    values = [pool[i] for i in rng.integers(0, len(pool) if seed % 2 else 8, int(rng.integers(0, 60)))]
    found = charts._color_map(values)
    assert found == _old_color_map(values)
    assert list(found) == list(_old_color_map(values))
    nested = [[0.9, 0.999], [0.5, 0.9], [0.9, 0.999]]  # unhashable: every value, as before
    assert charts._color_map(nested) == _old_color_map(nested)
