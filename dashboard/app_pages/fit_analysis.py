"""Fit analysis: where an experiment's models underfit and overfit. Learning curves grouped by any
parameter with a band over seeds; final (or best) train and validation loss against capacity and
against any other parameter (the U-shaped validation curve); a heatmap of any metric over two
parameters; the fit verdicts of the trials judged among their siblings, as a colour-coded grid and a
table; and the learned curves or decision boundaries of chosen trials side by side."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, data, widgets

NOTHING_FINISHED = ("No trial of this experiment has finished yet. The analysis appears as soon as a worker "
                    "finishes the first one (start one with `fitscope worker` or `fitscope up`).")
# Parameters that mostly move a model between under- and overfitting: the pickers start on these.
CAPACITY = ("width", "depth", "poly_degree", "model")
DATA_SIZE = ("n_train", "noise", "label_noise")
REGULARIZERS = ("weight_decay", "l1", "dropout", "input_noise", "label_smoothing", "norm", "early_stopping")
VALUES = {  # what "final" and "best" mean for each metric: split -> trial-table column
    ("loss", "final"): {"train": "final_train_loss", "val": "final_val_loss"},
    ("loss", "best"): {"train": "diag_best_train_loss", "val": "best_val_loss"},
    ("accuracy", "final"): {"train": "final_train_accuracy", "val": "final_val_accuracy"},
    ("accuracy", "best"): {"val": "best_val_accuracy"},
}
MAX_PREDICTIONS = 4  # panels side by side; a decision boundary is ~60 KB


def learning_curves(experiment_id: int, trials: pd.DataFrame, groups: list[str], band: str) -> None:
    st.subheader("Learning curves")
    chosen = widgets.trial_filter(trials, key="fit_curves_filter")
    colour, metric = st.columns(2)
    color_by = widgets.parameter_picker("Group by", groups, key="fit_curves_group",
                                        preferred=(*CAPACITY, *DATA_SIZE, *REGULARIZERS), container=colour)
    chosen_metric = metric.segmented_control("Metric", _metrics(trials), default="loss",
                                             key="fit_curves_metric") or "loss"
    if chosen.empty:
        st.info("No trial is left after the filter.")
        return
    every = data.epoch_step(len(chosen), int(chosen["epochs_done"].max() or 0))
    ids = None if len(chosen) == len(trials) else tuple(int(i) for i in chosen["trial_id"])
    curves = data.curves(experiment_id, trial_ids=ids, fields=(f"train_{chosen_metric}", f"val_{chosen_metric}"),
                         every=every)
    st.plotly_chart(charts.learning_curve_bands(curves, chosen, color_by=color_by, metric=chosen_metric, band=band),
                    key="fit_curves_chart")
    if every > 1:
        st.caption(f"{len(chosen)} trials: every {every}th epoch is drawn (and each run's first and last), so the "
                   f"browser gets at most {data.CURVE_ROW_BUDGET:,} points; the epochs CSV has every epoch.")


def capacity(trials: pd.DataFrame, groups: list[str], band: str) -> None:
    st.subheader("Capacity: train and validation against model size")
    metric, value, colour = st.columns(3)
    chosen_metric = metric.segmented_control("Metric", _metrics(trials), default="loss",
                                             key="fit_capacity_metric") or "loss"
    chosen_value = value.segmented_control("Value", ["final", "best"], default="final", key="fit_capacity_value",
                                           help="final: the last epoch; best: the lowest train loss and the "
                                                "best validation epoch") or "final"
    color_by = widgets.parameter_picker("One line per", [charts.ALL_TRIALS, *groups], key="fit_capacity_colour",
                                        preferred=(*DATA_SIZE, *REGULARIZERS, charts.ALL_TRIALS), container=colour)
    columns = VALUES[(chosen_metric, chosen_value)]
    st.plotly_chart(charts.metric_against(trials, x="parameter_count", color_by=color_by, columns=columns, band=band,
                                          y_title=chosen_metric, title=f"{chosen_value.capitalize()} "
                                          f"{chosen_metric} against parameter count"), key="fit_capacity_chart")
    st.caption("Too small a model underfits (both curves high); too large a one overfits (validation rises "
               "again while train keeps falling): the bottom of the dashed U is the balance point.")

    numeric = widgets.numeric_choices(trials, groups)
    if not numeric:
        return
    x_column, colour_column = st.columns(2)
    x = widgets.parameter_picker("Against", numeric, key="fit_against_x", preferred=(*DATA_SIZE, *REGULARIZERS),
                                 container=x_column, help="Training-set size, a regularization strength, or any "
                                                          "other numeric parameter that varies.")
    color_by = widgets.parameter_picker("One line per", [charts.ALL_TRIALS, *groups], key="fit_against_colour",
                                        preferred=(*CAPACITY, charts.ALL_TRIALS), avoid=x, container=colour_column)
    st.plotly_chart(charts.metric_against(trials, x=x, color_by=color_by, columns=columns, band=band,
                                          y_title=chosen_metric), key="fit_against_chart")


def heatmap(trials: pd.DataFrame, groups: list[str]) -> None:
    st.subheader("Heatmap")
    metrics = [name for name in data.metric_columns(trials)
               if pd.to_numeric(trials[name], errors="coerce").notna().any()]
    axes = [*groups, "parameter_count"]
    metric, x_column, y_column = st.columns(3)
    chosen = widgets.parameter_picker("Metric", metrics, key="fit_heatmap_metric",
                                      preferred=("final_val_loss", "diag_gap_ratio"), container=metric)
    x = widgets.parameter_picker("x", axes, key="fit_heatmap_x", preferred=CAPACITY, container=x_column)
    y = widgets.parameter_picker("y", axes, key="fit_heatmap_y", preferred=(*DATA_SIZE, *REGULARIZERS), avoid=x,
                                 container=y_column)
    st.plotly_chart(charts.metric_heatmap(trials, x=x, y=y, metric=chosen), key="fit_heatmap_chart")


def diagnosis(trials: pd.DataFrame, groups: list[str]) -> None:
    st.subheader("Diagnosis")
    x_column, y_column = st.columns(2)
    x = widgets.parameter_picker("x", groups, key="fit_verdict_x", preferred=CAPACITY, container=x_column)
    y = widgets.parameter_picker("y", groups, key="fit_verdict_y", preferred=(*DATA_SIZE, *REGULARIZERS), avoid=x,
                                 container=y_column)
    st.plotly_chart(charts.verdict_grid(trials, x=x, y=y), key="fit_verdict_chart")
    st.caption("Verdicts here judge each trial among its siblings on the same data (the rule of services."
               "analysis.diagnose_experiment); the stored verdict judges it alone. Thresholds: README, "
               "\"Fit diagnosis\".")
    shown = trials.assign(link=trials["trial_id"].map(widgets.trial_page_link))
    varying = [name for name in data.varying_parameters(trials) if name != "ordinal"]
    numbers = [name for name in data.DIAGNOSIS_COLUMNS[3:] if name in shown]
    st.dataframe(
        shown[["ordinal", *varying, "sibling_verdict", "verdict", *numbers, "reasons", "link"]],
        hide_index=True, key="fit_diagnosis_table",
        column_config={"ordinal": st.column_config.NumberColumn("trial"),
                       "sibling_verdict": st.column_config.TextColumn("verdict among siblings"),
                       "verdict": st.column_config.TextColumn("stored verdict"),
                       "link": st.column_config.LinkColumn("details", display_text="open"),
                       **{name: st.column_config.NumberColumn(format="%.3f") for name in numbers}},
    )


def predictions(trials: pd.DataFrame, groups: list[str]) -> None:
    st.subheader("What the models learned")
    labels = {int(row["trial_id"]): widgets.trial_label(row, groups) for _, row in trials.iterrows()}
    chosen = st.multiselect(f"Trials (up to {MAX_PREDICTIONS})", list(labels), format_func=labels.get,
                            default=_spread_by_capacity(trials), max_selections=MAX_PREDICTIONS,
                            key="fit_prediction_trials")
    found = data.artifacts(tuple(chosen)) if chosen else {}
    if not any(found.values()):
        st.info("No prediction picture for these trials: fitscope draws the fitted curve of 1-D regression "
                "(sine, polynomial) and the decision boundary of 2-D classification (moons, circles, blobs, spirals).")
        return
    titles = {trial_id: labels[trial_id].split(" · ")[0] + " · " + labels[trial_id].split(" · ")[-1]
              for trial_id in chosen}
    st.plotly_chart(charts.prediction_panels({trial_id: found.get(trial_id, {}) for trial_id in chosen}, titles),
                    key="fit_prediction_chart")
    st.caption("Dashed black: the truth; red: the model; grey or coloured dots: training points. A straight "
               "line that misses the curve underfits; a wiggly one that chases the dots overfits.")


def _metrics(trials: pd.DataFrame) -> list[str]:
    """loss, and accuracy when the trials are classifiers."""
    has_accuracy = "final_val_accuracy" in trials and trials["final_val_accuracy"].notna().any()
    return ["loss", "accuracy"] if has_accuracy else ["loss"]


def _spread_by_capacity(trials: pd.DataFrame) -> list[int]:
    """Up to three trials of one seed from the smallest to the largest model: the default comparison."""
    first_seed = trials[trials["seed"] == trials["seed"].min()] if "seed" in trials else trials
    ordered = first_seed.sort_values(["parameter_count", "ordinal"])
    if ordered.empty:
        return []
    picks = ordered.iloc[[0, len(ordered) // 2, len(ordered) - 1]]["trial_id"]
    return [int(trial_id) for trial_id in dict.fromkeys(picks)]


st.title("Fit analysis")
experiment_id = widgets.experiment_or_stop("fit")
all_trials = data.groupable(data.trials(experiment_id))
trained = all_trials[all_trials["status"].isin(widgets.TRAINED)]
if trained.empty:
    st.info(NOTHING_FINISHED, icon=":material/hourglass_empty:")
    st.stop()
trained = trained.merge(data.sibling_diagnoses(experiment_id), on="trial_id", how="left")
groups = widgets.grouping_choices(all_trials)
st.caption(f"{len(trained)} of {len(all_trials)} trials have finished training "
           f"(failed, cancelled and unfinished trials are left out).")
chosen_band = widgets.band_picker(key="fit_band")
learning_curves(experiment_id, trained, groups, chosen_band)
capacity(trained, groups, chosen_band)
heatmap(trained, groups)
diagnosis(trained, groups)
predictions(trained, groups)
