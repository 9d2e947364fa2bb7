"""Unit tests of the figure builders, from small hand-made DataFrames."""

from __future__ import annotations

import pandas as pd

from dashboard import charts


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


def test_learning_curves_draw_train_solid_and_validation_dashed_per_trial():
    figure = charts.learning_curves(epochs_of([10, 11, 12]), TRIALS, "width")

    assert len(figure.data) == 3 * 2
    assert [trace.line.dash for trace in figure.data] == ["solid", "dash"] * 3
    assert list(figure.data[0].y) == [1.0, 0.5, 1.0 / 3] and list(figure.data[1].x) == [1, 2, 3]


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
    assert list(figure.data[1].y) == list(epochs_of([10])["val_accuracy"])
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
    assert [trace.name for trace in figure.data] == ["ordinal=0"] * 2 + ["ordinal=1"] * 2
