"""Fit analysis: where an experiment's models underfit and overfit. A filter at the top chooses the
slice of the grid every section shows; then learning curves grouped by any parameter with a band over
the seeds of one configuration, a second parameter as panels, every other one at its best (or held,
or averaged, as chosen); final (or best) train and validation metrics, and their generalization gap,
against capacity and against any other parameter (the U-shaped validation curve); a heatmap of any
metric over two parameters; how much of the spread each parameter explains, against seed noise; the
fit verdicts of the trials judged among their siblings, as a colour-coded grid and a table; the
first layer's gradient over the last's against depth, per activation (vanishing gradients); and the
learned curves or decision boundaries of chosen trials side by side."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import band_charts, charts, data, fit_frames, gradient_charts, trial_tables, widgets
from services import selection

NO_FACETS = "none"

NOTHING_FINISHED = ("No trial of this experiment has finished yet. The analysis appears as soon as a worker "
                    "finishes the first one (start one with `fitscope worker` or `fitscope up`).")
NOTHING_KEPT = "No finished trial is left after the filter: leave out fewer values under \"Filter trials\"."
# Parameters that mostly move a model between under- and overfitting: the pickers start on these.
CAPACITY = ("width", "depth", "poly_degree", "model", "activation")
DATA_SIZE = ("n_train", "noise", "label_noise")
REGULARIZERS = ("weight_decay", "l1", "dropout", "input_noise", "label_smoothing", "norm", "early_stopping")
FINE_TUNING = ("init_from", "freeze")  # fine-tuned against from scratch, over n_train: the first line choice
SPLIT_METRICS = ("loss", "accuracy", "rmse", "mae", "r2")  # recorded for train and validation each epoch
NORMS = ("grad_norm", "weight_norm")  # recorded once per epoch, no split
BEST = {  # what "best" means for each metric: split -> trial-table column (others have only "final")
    "loss": {"train": "diag_best_train_loss", "val": "best_val_loss"},
    "accuracy": {"val": "best_val_accuracy"},
    "rmse": {"val": "best_val_rmse"},
}
MAX_PREDICTIONS = 4  # panels side by side; a decision boundary is ~60 KB


def learning_curves(trials: pd.DataFrame, groups: list[str], band: str, others: widgets.Handling) -> None:
    st.subheader("Learning curves")
    colour, facet_column, metric, scale = st.columns([2, 2, 3, 2])
    color_by = widgets.parameter_picker("Group by", groups, key="fit_curves_group",
                                        preferred=(*CAPACITY, *DATA_SIZE, *REGULARIZERS), container=colour)
    facet = _facet_picker(groups, color_by, key="fit_curves_facet", container=facet_column)
    chosen_metric = metric.segmented_control("Metric", [*_split_metrics(trials), *NORMS], default="loss",
                                             key="fit_curves_metric",
                                             help="grad_norm: the gradient's L2 norm at each epoch's last step "
                                                  "(vanishing or exploding gradients: group by activation); "
                                                  "weight_norm: the weights' L2 norm") or "loss"
    log_y = widgets.y_scale(key=f"fit_curves_scale_{chosen_metric}", container=scale)
    columns = ({"value": chosen_metric} if chosen_metric in NORMS
               else {split: f"{split}_{chosen_metric}" for split in ("train", "val")})
    chosen = others.select(trials, shown=[color_by, facet])
    bands = data.curve_bands(chosen.trials, by=[name for name in (facet, color_by) if name], columns=columns,
                             band=band)
    st.plotly_chart(band_charts.learning_curve_bands(bands, color_by=color_by, facet=facet, metric=chosen_metric,
                                                band=band, log_y=log_y, subtitle=chosen.describe(),
                                                line_notes=chosen.best_values(color_by)),
                    key="fit_curves_chart")
    st.caption(f"One line per {color_by}" + (f", one panel per {facet}" if facet else "") + ". "
               + chosen.describe() + " Every epoch is drawn; the database computes the means and bands.")


def capacity(trials: pd.DataFrame, groups: list[str], band: str, others: widgets.Handling,
             recorded: tuple[str, ...] = ()) -> None:
    st.subheader("Capacity: train and validation against model size")
    metric, value, colour, facet_column = st.columns(4)
    metrics = [*_split_metrics(trials), *(name for name in data.FINAL_NORMS if name in trials or name in recorded)]
    chosen_metric = metric.segmented_control("Metric", metrics, default="loss", key="fit_capacity_metric") or "loss"
    chosen_value = value.segmented_control("Value", ["final", "best"], default="final", key="fit_capacity_value",
                                           help="final: the last epoch; best: the lowest train loss and the "
                                                "best validation epoch") or "final"
    color_by = widgets.parameter_picker("One line per", [charts.ALL_TRIALS, *groups], key="fit_capacity_colour",
                                        preferred=(*DATA_SIZE, *REGULARIZERS, charts.ALL_TRIALS), container=colour)
    facet = _facet_picker([name for name in groups if name not in CAPACITY], color_by, key="fit_capacity_facet",
                          container=facet_column, start_empty=True)
    columns, chosen_value = _value_columns(trials, chosen_metric, chosen_value)
    show_gap = st.toggle("Show the generalization gap (val - train), dotted", value=chosen_metric == "loss",
                         key="fit_capacity_gap", disabled=not {"train", "val"} <= set(columns))
    sentence = widgets.single_value(trials, "parameter_count", vary="vary width or depth in the grid to see "
                                    "where a model starts to underfit or overfit")
    if sentence:
        st.info(sentence, icon=":material/straighten:")
    else:
        chosen = others.select(trials, shown=["parameter_count", *CAPACITY, color_by, facet])
        title = f"{chosen_value.capitalize()} {chosen_metric} against parameter count"
        st.plotly_chart(band_charts.metric_against(chosen.trials, x="parameter_count", color_by=color_by,
                                                   columns=columns, band=band, y_title=chosen_metric, title=title,
                                                   gap=show_gap, facet=facet, subtitle=chosen.describe()),
                        key="fit_capacity_chart")
        st.caption("Too small a model underfits (both curves high); too large a one overfits (validation rises "
                   "again while train keeps falling, and the dotted gap grows): the bottom of the dashed U is the "
                   "balance point. " + chosen.describe())

    numeric = widgets.numeric_choices(trials, [name for name in groups if name not in CAPACITY])
    if not numeric:
        return
    x_column, colour_column = st.columns(2)
    x = widgets.parameter_picker("Against", numeric, key="fit_against_x", preferred=(*DATA_SIZE, *REGULARIZERS),
                                 container=x_column, help="Training-set size, a regularization strength, or any "
                                                          "other numeric parameter that varies. Pick the metric "
                                                          "final_weight_norm above to see weight decay or L1 "
                                                          "shrink the weights.")
    color_by = widgets.parameter_picker("One line per", [charts.ALL_TRIALS, *groups], key="fit_against_colour",
                                        preferred=(*FINE_TUNING, *CAPACITY, charts.ALL_TRIALS), avoid=x,
                                        container=colour_column)
    chosen = others.select(trials, shown=[x, color_by])
    st.plotly_chart(band_charts.metric_against(chosen.trials, x=x, color_by=color_by, columns=columns, band=band,
                                          y_title=chosen_metric, gap=show_gap, subtitle=chosen.describe()),
                    key="fit_against_chart")
    st.caption(chosen.describe())


def heatmap(trials: pd.DataFrame, groups: list[str], others: widgets.Handling, recorded: tuple[str, ...] = ()) -> None:
    st.subheader("Heatmap")
    metrics = [name for name in trial_tables.metric_columns(trials) if trial_tables.any_number(trials[name])]
    metrics += [name for name in recorded if name not in metrics]
    if not metrics:
        st.info("These trials recorded no numeric metric to map.")
        return
    metric, x_column, y_column = st.columns(3)
    chosen_metric = widgets.parameter_picker("Metric", metrics, key="fit_heatmap_metric",
                                             preferred=("final_val_loss", "diag_gap_ratio"), container=metric)
    axes = [name for name in (*groups, "parameter_count") if name != chosen_metric]  # a metric is not its own axis
    x = widgets.parameter_picker("x", axes, key="fit_heatmap_x", preferred=CAPACITY, container=x_column)
    y = widgets.parameter_picker("y", axes, key="fit_heatmap_y", preferred=(*DATA_SIZE, *REGULARIZERS), avoid=x,
                                 container=y_column)
    chosen = others.select(trials, shown=[x, y])
    st.plotly_chart(charts.metric_heatmap(chosen.trials, x=x, y=y, metric=chosen_metric), key="fit_heatmap_chart")
    st.caption("Each cell is the mean of " + chosen_metric + " over its runs (hover for how many). "
               + chosen.describe())


def importance(trials: pd.DataFrame) -> None:
    st.subheader("Which parameter matters")
    metrics = [name for name in ("final_val_loss", "best_val_loss", "test_loss", "final_val_accuracy",
                                 "test_accuracy", "final_train_loss", "diag_gap_ratio", "final_val_rmse")
               if name in trials and trial_tables.any_number(trials[name])]
    parameters = selection.configuration_parameters(trials, trial_tables.parameter_columns(trials))
    if not metrics or not parameters:
        st.info("Only one configuration is left (nothing but the seed varies): vary a parameter in the grid to "
                "see how much of the spread it explains.")
        return
    metric = widgets.parameter_picker("Metric", metrics, key="fit_importance_metric", preferred=("final_val_loss",))
    shares = selection.parameter_importance(trials, parameters=parameters, metric=metric)
    if shares.empty:
        st.info(f"Every run has the same {metric}: there is no spread to explain.")
        return
    st.plotly_chart(charts.importance_bars(shares, metric=metric), key="fit_importance_chart")
    noise = float(shares.set_index("parameter").at["seed noise", "share"])
    st.caption(f"A variance decomposition over the {len(trials)} runs shown: each parameter's bar is how much "
               f"the mean {metric} moves between its values (its main effect); interactions are what "
               f"combinations add; seed noise ({noise:.0%}) is the spread between runs that differ only by "
               "their seed: a parameter whose bar is not well above it is hard to tell from chance.")


def diagnosis(trials: pd.DataFrame, groups: list[str], others: widgets.Handling) -> None:
    st.subheader("Diagnosis")
    x_column, y_column = st.columns(2)
    x = widgets.parameter_picker("x", groups, key="fit_verdict_x", preferred=CAPACITY, container=x_column)
    y = widgets.parameter_picker("y", groups, key="fit_verdict_y", preferred=(*DATA_SIZE, *REGULARIZERS), avoid=x,
                                 container=y_column)
    chosen = others.select(trials, shown=[x, y])
    st.plotly_chart(charts.verdict_grid(chosen.trials, x=x, y=y), key="fit_verdict_chart")
    st.caption("Each cell: the most common verdict among its runs. " + chosen.describe() + " Verdicts here judge "
               "each trial among its siblings on the same data (the rule of services.analysis.diagnose_experiment); "
               "the stored verdict judges it alone. Diverged runs are counted here whatever the toggle above says. "
               "The table lists every trial. Thresholds: README, \"Fit diagnosis\".")
    shown = trials.assign(link=trials["trial_id"].map(widgets.trial_page_link))
    varying = [name for name in trial_tables.varying_parameters(trials) if name != "ordinal"]
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


def layer_gradients(experiment_id: int, trials: pd.DataFrame, groups: list[str], others: widgets.Handling) -> None:
    """The first layer's gradient norm over the last's, against depth (or any numeric parameter), one
    line per activation (or any parameter), with a band over the seeds."""
    norms = data.layer_grad_norms(experiment_id, ends_only=True)  # first and last epochs: all it draws
    if norms.empty or norms["layer"].max() < 2:
        return
    st.subheader("Gradients layer by layer")
    numeric = widgets.numeric_choices(trials, groups) or ["parameter_count"]
    x_column, colour_column, epoch_column = st.columns(3)
    x = widgets.parameter_picker("Against", numeric, key="fit_layers_x", preferred=("depth", "width"),
                                 container=x_column)
    color_by = widgets.parameter_picker("One line per", [charts.ALL_TRIALS, *groups], key="fit_layers_colour",
                                        preferred=("activation", "norm", charts.ALL_TRIALS), avoid=x,
                                        container=colour_column)
    when = epoch_column.segmented_control("At", ["first epoch", "last epoch"], default="first epoch",
                                          key="fit_layers_epoch",
                                          help="The gradient of the epoch's last step. The first epoch shows "
                                               "what the initial weights pass back; by the last, training has "
                                               "moved them.") or "first epoch"
    chosen = others.select(trials, shown=[x, color_by])
    ratios = _first_over_last(norms, last=when == "last epoch")
    table = chosen.trials.merge(ratios, on="trial_id").assign(**{charts.ALL_TRIALS: "all"})
    if table.empty:
        st.info("None of the trials shown recorded its layers' gradients.")
        return
    st.plotly_chart(gradient_charts.depth_ratio_chart(table, x=x, color_by=color_by), key="fit_layers_chart")
    st.caption("Below the dotted line, the first layer (next to the input) gets a smaller gradient than the last "
               "(next to the output), so it learns more slowly. Sigmoid's slope is at most 1/4, so every layer "
               "shrinks the gradient: deep sigmoid networks lose decades. " + chosen.describe()
               + " Each trial's own layers: open a trial's page.")


def _first_over_last(norms: pd.DataFrame, *, last: bool) -> pd.DataFrame:
    """trial_id and ratio: the first layer's gradient norm over the last layer's, at each trial's first
    (or last) recorded epoch."""
    epochs = norms.groupby("trial_id")["epoch"].transform("max" if last else "min")
    at = norms[norms["epoch"] == epochs]
    by_trial = at.groupby("trial_id")
    first = at.loc[by_trial["layer"].idxmin()].set_index("trial_id")["grad_norm"]
    final = at.loc[by_trial["layer"].idxmax()].set_index("trial_id")["grad_norm"]
    return (first / final).rename("ratio").reset_index()


def predictions(experiment_id: int, trials: pd.DataFrame, groups: list[str]) -> None:
    st.subheader("What the models learned")
    # Seed 0 of each configuration is enough to pick from (a list of 10,000 trials is not).
    offered = trials[trials["seed"] == trials["seed"].min()] if "seed" in trials else trials
    labels = widgets.trial_labels(offered, groups)
    chosen = widgets.keyed_multiselect(f"Trials (up to {MAX_PREDICTIONS})", list(labels), format_func=labels.get,
                                       default=_spread_by_capacity(trials), max_selections=MAX_PREDICTIONS,
                                       key=f"fit_prediction_trials_{experiment_id}")
    found = data.artifacts(tuple(chosen)) if chosen else {}
    if not any(kind in kinds for kinds in found.values() for kind in charts.PREDICTION_KINDS):
        st.info("No prediction picture for these trials: fitscope draws the fitted curve of 1-D regression "
                "(sine, polynomial) and the decision boundary of 2-D classification (moons, circles, blobs, spirals).")
        return
    titles = {trial_id: labels[trial_id].split(" · ")[0] + " · " + labels[trial_id].split(" · ")[-1]
              for trial_id in chosen}
    if any(fit_frames.has_frames(found.get(trial_id, {})) for trial_id in chosen):
        st.plotly_chart(fit_frames.fit_animation([(titles[trial_id], found.get(trial_id, {})) for trial_id in chosen],
                                                 start="last"), key="fit_prediction_animation")
        st.caption("Each panel at its last epoch; drag the slider or press Play to watch them fit from epoch 1 "
                   "(each panel shows its latest snapshot at the slider's epoch). Dashed black: the truth; red: "
                   "the model; dots: training points; pale regions: the model is unsure. A straight line that "
                   "misses the curve underfits; a wiggly one that chases the dots overfits.")
        return
    st.plotly_chart(charts.prediction_panels({trial_id: found.get(trial_id, {}) for trial_id in chosen}, titles),
                    key="fit_prediction_chart")
    st.caption("Dashed black: the truth; red: the model; grey or coloured dots: training points. A straight "
               "line that misses the curve underfits; a wiggly one that chases the dots overfits.")


def _facet_picker(groups: list[str], color_by: str, *, key: str, container=st, start_empty: bool = False) -> str | None:
    """A "Panels per" picker: one small chart per value of a second parameter (none when nothing else
    varies). Starts on the first other varying parameter, so a second parameter is shown, not averaged."""
    options = [NO_FACETS, *(name for name in groups if name not in (color_by, "ordinal"))]
    start = NO_FACETS if start_empty or len(options) == 1 else options[1]
    preferred = [name for name in (*DATA_SIZE, *REGULARIZERS, *CAPACITY) if name in options and name != NO_FACETS]
    if not start_empty and preferred:
        start = preferred[0]
    chosen = widgets.parameter_picker("Panels per", options, key=key, preferred=(start,), container=container,
                                      help="One small chart per value, on one shared y axis.")
    return None if chosen == NO_FACETS else chosen


def _split_metrics(trials: pd.DataFrame) -> list[str]:
    """The train/validation metrics these trials recorded: loss, and accuracy (classification) or
    rmse, mae and r2 (regression)."""
    return [name for name in SPLIT_METRICS
            if name == "loss" or (f"final_val_{name}" in trials and trials[f"final_val_{name}"].notna().any())]


def _value_columns(trials: pd.DataFrame, metric: str, value: str) -> tuple[dict[str, str], str]:
    """The trial-table columns to draw for a metric's final or best value (split -> column), and the
    value actually drawn: "final" where the engine keeps no best value for that metric."""
    if metric.startswith("final_"):  # a norm at the last epoch
        return {"value": metric}, "final"
    if value == "best" and metric in BEST:
        return BEST[metric], "best"
    columns = {split: f"final_{split}_{metric}" for split in ("train", "val")}
    return {split: column for split, column in columns.items() if column in trials}, "final"


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
all_trials = widgets.parents_as_words(data.groupable_trials(experiment_id))
widgets.networks_or_stop(all_trials, page="the fit analysis")
groups = widgets.grouping_choices(all_trials)
kept = widgets.trial_filter(all_trials, key="fit_filter", experiment_id=experiment_id)
trained = kept[kept["status"].isin(widgets.TRAINED)]
if not all_trials["status"].isin(widgets.TRAINED).any():  # asked of the column, not of a copy of the table
    st.info(NOTHING_FINISHED, icon=":material/hourglass_empty:")
    st.stop()
if trained.empty:
    st.info(NOTHING_KEPT, icon=":material/filter_alt_off:")
    st.stop()
finished = len(trained)
trained, groups = widgets.without_range_tests(trained, all_trials, groups,
                                             read_at="read on the Optimizers and schedules page",
                                             shows="how models fit")
trained = trained.merge(data.sibling_diagnoses(experiment_id), on="trial_id", how="left")
trained, recorded = widgets.with_final_norms(  # the capacity and heatmap metrics may be a final norm
    experiment_id, trained, chosen=[st.session_state.get("fit_capacity_metric"),
                                    st.session_state.get("fit_heatmap_metric")])
st.caption(f"{len(trained)} of {len(all_trials)} trials have finished training and pass the filter "
           f"(failed, cancelled and unfinished trials are left out"
           f"{', and range tests' if len(trained) < finished else ''}).")
chosen_band, banded = widgets.band_controls(trained, key="fit")
handled = widgets.other_parameters(banded, key="fit_others", metrics=("final_val_loss", "best_val_loss",
                                                                       "final_val_accuracy", "test_loss"))
if banded.empty:
    st.info("Every trial shown diverged: turn on \"Include diverged runs\" to draw them.")
else:
    learning_curves(banded, groups, chosen_band, handled)
    capacity(banded, groups, chosen_band, handled, recorded)
    heatmap(banded, groups, handled, recorded)
    importance(banded)
    layer_gradients(experiment_id, banded, groups, handled)
diagnosis(trained, groups, handled)
predictions(experiment_id, trained, groups)
