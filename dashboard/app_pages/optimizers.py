"""Optimizers and schedules: how the way a model is trained changes where it ends. Loss curves per
optimizer (or any parameter) with a band over seeds; final validation loss against the learning
rate (the sensitivity curve); how many epochs each needs to reach a target loss; how often each
diverges; the learning-rate schedule drawn over the loss; and the mean difference between two
configurations with a 95% confidence interval over seeds."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, data, widgets
from services.analysis import mean_difference

NOTHING_FINISHED = ("No trial of this experiment has finished yet. The comparison appears as soon as a worker "
                    "finishes the first one (start one with `fitscope worker` or `fitscope up`).")
OPTIMIZATION = ("optimizer", "schedule", "lr", "momentum", "batch_size", "betas", "grad_clip")
COMPARED = ("final_val_loss", "best_val_loss", "test_loss", "final_val_accuracy", "test_accuracy", "final_train_loss")


def loss_curves(experiment_id: int, trials: pd.DataFrame, groups: list[str], band: str) -> str:
    st.subheader("Loss per epoch")
    color_by = widgets.parameter_picker("One line per", groups, key="optimizers_group", preferred=OPTIMIZATION)
    every = data.epoch_step(len(trials), int(trials["epochs_done"].max() or 0))
    curves = data.curves(experiment_id, fields=("train_loss", "val_loss"), every=every)
    curves = curves[curves["trial_id"].isin(trials["trial_id"])]
    st.plotly_chart(charts.learning_curve_bands(curves, trials, color_by=color_by, band=band),
                    key="optimizers_curves_chart")
    if every > 1:
        st.caption(f"Every {every}th epoch is drawn (and each run's first and last) to keep the chart small.")
    return color_by


def sensitivity(trials: pd.DataFrame, groups: list[str], color_by: str, band: str) -> None:
    st.subheader("Sensitivity to the learning rate")
    numeric = widgets.numeric_choices(trials, groups)
    if not numeric:
        st.info("No numeric parameter varies in this experiment, so there is no sensitivity curve to draw.")
        return
    x = widgets.parameter_picker("Against", numeric, key="optimizers_sensitivity_x", preferred=("lr", "momentum"))
    st.plotly_chart(charts.metric_against(trials, x=x, color_by=color_by, band=band,
                                          columns={"val": "final_val_loss"}, y_title="final validation loss",
                                          title=f"Final validation loss against {x}"),
                    key="optimizers_sensitivity_chart")
    st.caption("Too small a rate converges slowly (high on the left), too large a one bounces or diverges "
               "(high on the right, or missing where every seed diverged).")


def speed_and_divergence(experiment_id: int, trials: pd.DataFrame, groups: list[str], color_by: str) -> None:
    st.subheader("Epochs to a target loss, and divergence")
    axes = [name for name in groups if name != color_by] or groups
    x_column, target_column = st.columns(2)
    x = widgets.parameter_picker("Bars along", axes, key="optimizers_bars_x", preferred=("lr", *OPTIMIZATION),
                                 container=x_column)
    reachable = trials["best_val_loss"].dropna() if "best_val_loss" in trials else pd.Series(dtype=float)
    target = target_column.number_input(
        "Target validation loss", min_value=0.0, value=float(round(reachable.median(), 3)) if len(reachable) else 0.5,
        step=0.01, format="%.3f", key="optimizers_target",
        help="Starts at the median of the trials' best validation losses: about half of them get there.")
    reached = data.epochs_to_reach(experiment_id, field="val_loss", target=target)
    left, right = st.columns(2)
    left.plotly_chart(charts.epochs_to_target_bars(reached, trials, target=target, x=x, color_by=color_by),
                      key="optimizers_target_chart")
    right.plotly_chart(charts.divergence_bars(trials, x=x, color_by=color_by), key="optimizers_divergence_chart")


def schedule(experiment_id: int, trials: pd.DataFrame, groups: list[str]) -> None:
    st.subheader("Learning-rate schedule over the loss")
    color_by = widgets.parameter_picker("One line per", groups, key="optimizers_schedule_group",
                                        preferred=("schedule", *OPTIMIZATION))
    every = data.epoch_step(len(trials), int(trials["epochs_done"].max() or 0))
    curves = data.curves(experiment_id, fields=("val_loss", "lr"), every=every)
    curves = curves[curves["trial_id"].isin(trials["trial_id"])]
    st.plotly_chart(charts.schedule_over_loss(curves, trials, color_by=color_by), key="optimizers_schedule_chart")


def compare_two(trials: pd.DataFrame, groups: list[str]) -> None:
    st.subheader("A against B")
    labels = widgets.configuration_labels(trials, groups)
    configurations = sorted(labels.unique())
    if len(configurations) < 2:
        st.info("This experiment has one configuration (its trials differ only in their seed): nothing to compare.")
        return
    a_column, b_column, metric_column = st.columns([2, 2, 1])
    a = a_column.selectbox("A", configurations, index=0, key="optimizers_compare_a")
    b = b_column.selectbox("B", configurations, index=1, key="optimizers_compare_b")
    metrics = [name for name in COMPARED if name in trials and trials[name].notna().any()]
    metric = metric_column.selectbox("Metric", metrics, key="optimizers_compare_metric")
    runs_a, runs_b = trials[labels == a], trials[labels == b]
    paired = ("seed" in trials and len(runs_a) == len(runs_b) > 1
              and sorted(runs_a["seed"]) == sorted(runs_b["seed"]))
    if paired:
        runs_a, runs_b = runs_a.sort_values("seed"), runs_b.sort_values("seed")
    result = mean_difference(runs_a[metric].tolist(), runs_b[metric].tolist(), paired=paired)
    st.plotly_chart(charts.difference_interval(result, label_a=a, label_b=b, metric=metric),
                    key="optimizers_compare_chart")
    how = "paired by seed" if paired else "Welch, unpaired"
    if result.low is None:
        st.warning(f"Mean {metric}: A {result.mean_a:.4g}, B {result.mean_b:.4g}; no interval: {result.reason}.")
    else:
        st.markdown(f"Mean {metric}: A **{result.mean_a:.4g}** ({result.n_a} runs), B **{result.mean_b:.4g}** "
                    f"({result.n_b} runs). A - B = **{result.difference:.4g}**, 95% confidence interval "
                    f"[{result.low:.4g}, {result.high:.4g}] ({how}). "
                    + ("The interval excludes 0: the difference is unlikely to be seed noise."
                       if result.low > 0 or result.high < 0 else
                       "The interval includes 0: more seeds are needed to tell them apart."))


st.title("Optimizers and schedules")
experiment_id = widgets.experiment_or_stop("optimizers")
all_trials = data.groupable(data.trials(experiment_id))
trained = all_trials[all_trials["status"].isin(widgets.TRAINED)]
if trained.empty:
    st.info(NOTHING_FINISHED, icon=":material/hourglass_empty:")
    st.stop()
groups = widgets.grouping_choices(all_trials)
chosen_band = widgets.band_picker(key="optimizers_band")
colour = loss_curves(experiment_id, trained, groups, chosen_band)
sensitivity(trained, groups, colour, chosen_band)
speed_and_divergence(experiment_id, trained, groups, colour)
schedule(experiment_id, trained, groups)
compare_two(trained, groups)
