"""Optimizers and schedules: how the way a model is trained changes where it ends. Loss curves per
optimizer (or any parameter), each at its best learning rate and schedule by default, with a band over
the seeds of that one configuration; final validation loss against the learning rate (the sensitivity
curve); how many epochs each needs to reach a target loss; how often each diverges or blows up and
recovers (unstable); the learning-rate schedule drawn over the loss; and the mean difference between
two configurations with a 95% confidence interval over seeds."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import band_charts, charts, data, gradient_charts, widgets
from services.analysis import UNSTABLE_RATIO, mean_difference
from services.range_test import mean_curve, read_range_test

NOTHING_FINISHED = ("No trial of this experiment has finished yet. The comparison appears as soon as a worker "
                    "finishes the first one (start one with `fitscope worker` or `fitscope up`).")
OPTIMIZATION = ("optimizer", "schedule", "lr", "momentum", "batch_size", "betas", "grad_clip")
COMPARED = ("final_val_loss", "best_val_loss", "test_loss", "final_val_accuracy", "test_accuracy", "final_train_loss",
            "final_val_rmse", "test_rmse", "final_val_r2", "final_weight_norm", "final_grad_norm")
CURVE_METRICS = {"loss": {"train": "train_loss", "val": "val_loss"}, "grad_norm": {"value": "grad_norm"},
                 "weight_norm": {"value": "weight_norm"}}
RANGE_TESTS_SHOWN = 30  # each curve is up to 2,000 points; more tests than this are left out (said so)
SENSITIVITY_METRICS = {"final validation loss": {"val": "final_val_loss"},
                       "final weight norm": {"value": "final_weight_norm"},
                       "final gradient norm": {"value": "final_grad_norm"}}


def range_test(trials: pd.DataFrame, groups: list[str]) -> None:
    """Loss against the rate of the range-test trials, one line per optimizer (by default) and
    configuration, the mean over its seeds, and the rate each suggests (services.range_test: the
    steepest descent of the smoothed loss)."""
    tests = trials[widgets.range_tests(trials)]
    if tests.empty:
        return
    st.subheader("Learning-rate range test")
    color_by = widgets.parameter_picker("One line per", groups, key="optimizers_range_group",
                                        preferred=("optimizer", *OPTIMIZATION))
    shown = tests.sort_values([color_by, "seed"] if "seed" in tests else [color_by]).head(RANGE_TESTS_SHOWN)
    stored = data.artifacts(tuple(int(i) for i in shown["trial_id"]))
    configurations = widgets.configuration_labels(shown, groups)
    lines: dict[tuple, list] = {}  # (colour value, configuration) -> [(trial row, curve)]: its seeds
    for (_, row), configuration in zip(shown.iterrows(), configurations, strict=True):
        curve = stored.get(int(row["trial_id"]), {}).get("lr_range")
        if curve:
            lines.setdefault((str(row[color_by]), configuration), []).append((row, curve))
    readings, table = [], []
    for runs in lines.values():
        first_rates = runs[0][1]["lr"]
        same_rates = all(curve["lr"] == first_rates for _, curve in runs)
        for part in ([runs] if same_rates else [[run] for run in runs]):
            reading = read_range_test(part[0][1]["lr"], mean_curve([curve["loss"] for _, curve in part]))
            if reading is None:
                continue
            value = part[0][0][color_by]
            readings.append((value, reading))
            table.append({color_by: value, "runs": len(part),
                          "trials": ", ".join(str(int(row["ordinal"])) for row, _ in part),
                          "suggested lr (steepest descent)": reading.steepest_lr,
                          "lr at minimum loss": reading.minimum_lr, "minimum / 10": reading.minimum_lr / 10})
    if not readings:
        st.info("The range-test trials have not stored their curves yet (each stores its curve when it ends).")
        return
    st.plotly_chart(gradient_charts.range_test_chart(readings, color_by=color_by), key="optimizers_range_chart")
    st.dataframe(pd.DataFrame(table), hide_index=True, key="optimizers_range_table",
                 column_config={name: st.column_config.NumberColumn(format="%.2e") for name in
                                ("suggested lr (steepest descent)", "lr at minimum loss", "minimum / 10")})
    left_out = len(tests) - len(shown)
    st.caption("Each run raises the rate exponentially every step, from min_lr to lr; a line is the mean of its "
               "seeds' batch losses. The suggested rate is where the smoothed loss falls fastest (▼, Smith's rule, "
               "fastai's \"steep\"); past the minimum (●) the rate is too large. The other common rule, the "
               "minimum's rate / 10, is in the table." + (f" {left_out} more range tests are not drawn."
                                                           if left_out > 0 else ""))


def loss_curves(trials: pd.DataFrame, groups: list[str], band: str, others: widgets.Handling) -> str:
    st.subheader("Loss per epoch")
    group_column, metric_column, scale_column = st.columns([2, 2, 2])
    color_by = widgets.parameter_picker("One line per", groups, key="optimizers_group", preferred=OPTIMIZATION,
                                        container=group_column)
    metric = metric_column.segmented_control("Metric", list(CURVE_METRICS), default="loss", key="optimizers_metric",
                                             help="grad_norm: the gradient's L2 norm at each epoch's last step "
                                                  "(exploding with too large a rate); weight_norm: the weights' "
                                                  "L2 norm") or "loss"
    log_y = widgets.y_scale(key="optimizers_curves_scale", container=scale_column)
    chosen = others.select(trials, shown=[color_by])
    bands = data.curve_bands(_drawn(chosen.trials), by=[color_by], columns=CURVE_METRICS[metric], band=band)
    st.plotly_chart(band_charts.learning_curve_bands(bands, color_by=color_by, band=band, metric=metric, log_y=log_y,
                                                subtitle=chosen.describe(), line_notes=chosen.best_values(color_by)),
                    key="optimizers_curves_chart")
    st.caption(f"Each line: the {chosen.trials['seed'].nunique() if 'seed' in chosen.trials else 1} seed(s) of one "
               f"configuration per {color_by}. {chosen.describe()} Every epoch is drawn; the database computes "
               "the means and bands.")
    return color_by


def sensitivity(trials: pd.DataFrame, groups: list[str], color_by: str, band: str, others: widgets.Handling) -> None:
    heading = st.empty()  # named after the parameter on the x axis, once it is chosen below
    heading.subheader("Sensitivity to the learning rate")
    numeric = widgets.numeric_choices(trials, groups)
    if not numeric:
        st.info("No numeric parameter varies in this experiment, so there is no sensitivity curve: vary lr (or "
                "momentum, weight_decay) in the grid to see one.")
        return
    x_column, metric_column, scale_column = st.columns([2, 2, 2])
    x = widgets.parameter_picker("Against", numeric, key="optimizers_sensitivity_x",
                                 preferred=("lr", "momentum", "weight_decay", "l1"), container=x_column)
    heading.subheader(sensitivity_heading(x))
    metric = metric_column.selectbox("Metric", list(SENSITIVITY_METRICS), key="optimizers_sensitivity_metric",
                                     help="The weight norm against weight_decay or l1 shows the penalty at work.")
    log_y = widgets.y_scale(key="optimizers_sensitivity_scale", container=scale_column)
    line_by = charts.ALL_TRIALS if x == color_by else color_by  # one line across the rates, not one dot per rate
    chosen = others.select(trials, shown=[color_by, x])
    st.plotly_chart(band_charts.metric_against(_drawn(chosen.trials), x=x, color_by=line_by, band=band,
                                          columns=SENSITIVITY_METRICS[metric], y_title=metric,
                                          title=f"{metric.capitalize()} against {x}", log_y=log_y,
                                          subtitle=chosen.describe()),
                    key="optimizers_sensitivity_chart")
    diverged = int(widgets.diverged_mask(chosen.trials).sum())
    st.caption("Too small a rate converges slowly (high on the left), too large a one bounces or diverges "
               "(high on the right, or missing where every seed diverged). " + chosen.describe()
               + f" {diverged} of the {len(chosen.trials)} runs diverged"
               + (" (drawn: the toggle above includes them)." if st.session_state.get("optimizers_include_diverged")
                  else " and are left out of the bands."))


def sensitivity_heading(x: str) -> str:
    """The section's heading for the parameter on its x axis: the learning rate, or whichever it is."""
    return "Sensitivity to the learning rate" if x == "lr" else f"Sensitivity to {x}"


def speed_and_divergence(experiment_id: int, trials: pd.DataFrame, groups: list[str], color_by: str,
                         others: widgets.Handling) -> None:
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
    chosen = others.select(trials, shown=[color_by, x])
    reached = data.epochs_to_reach(experiment_id, field="val_loss", target=target,
                                   trial_ids=tuple(int(i) for i in chosen.trials["trial_id"]))
    left, right = st.columns(2)
    left.plotly_chart(charts.epochs_to_target_bars(reached, chosen.trials, target=target, x=x, color_by=color_by),
                      key="optimizers_target_chart")
    left.caption(chosen.describe())
    counted = data.with_stability(experiment_id, trials)
    right.plotly_chart(charts.divergence_bars(counted, x=x, color_by=color_by), key="optimizers_divergence_chart")
    rest = [name for name in others.handling if name not in (x, color_by)]
    right.caption("Counts every trained run of each bar" + (f", whatever its {', '.join(rest)}" if rest else "")
                  + f" and seed. Unstable: the loss once rose above {UNSTABLE_RATIO:g}x the loss of predicting a "
                  "constant, then came back; the stored verdicts are unchanged.")


def schedule(trials: pd.DataFrame, groups: list[str], others: widgets.Handling) -> None:
    st.subheader("Learning-rate schedule over the loss")
    color_by = widgets.parameter_picker("One line per", groups, key="optimizers_schedule_group",
                                        preferred=("schedule", *OPTIMIZATION))
    chosen = others.select(trials, shown=[color_by])
    bands = data.curve_bands(_drawn(chosen.trials), by=[color_by], columns={"loss": "val_loss", "lr": "lr"})
    st.plotly_chart(band_charts.schedule_over_loss(bands, color_by=color_by, subtitle=chosen.describe()),
                    key="optimizers_schedule_chart")
    st.caption("Each line is the mean over the seeds of one configuration, so its dotted rate is the rate those "
               "runs trained with. " + chosen.describe())


def _drawn(trials: pd.DataFrame) -> pd.DataFrame:
    """The selected trials that go into bands: diverged ones only when the toggle includes them."""
    return trials if st.session_state.get("optimizers_include_diverged") else trials[~widgets.diverged_mask(trials)]


def chosen_metrics() -> list[object]:
    """The metrics the page's choices name: the one that picks the best values, the sensitivity
    metric's columns and the compared one (widgets.with_final_norms reads the norms once one is)."""
    return [st.session_state.get("optimizers_others_best_metric"), st.session_state.get("optimizers_compare_metric"),
            *SENSITIVITY_METRICS.get(st.session_state.get("optimizers_sensitivity_metric"), {}).values()]


def compare_two(trials: pd.DataFrame, groups: list[str], recorded: tuple[str, ...] = ()) -> None:
    st.subheader("A against B")
    labels = widgets.configuration_labels(trials, groups)
    configurations = sorted(labels.unique())
    if len(configurations) < 2:
        st.info("This experiment has one configuration (its trials differ only in their seed): nothing to compare.")
        return
    a_column, b_column, metric_column = st.columns([2, 2, 1])
    a = a_column.selectbox("A", configurations, index=0, key="optimizers_compare_a")
    b = b_column.selectbox("B", configurations, index=1, key="optimizers_compare_b")
    metrics = [name for name in COMPARED if name in recorded or (name in trials and trials[name].notna().any())]
    if not metrics:
        st.info("These trials recorded no final metric to compare (every one of them diverged, or ended before "
                "its first epoch).")
        return
    metric = metric_column.selectbox("Metric", metrics, key="optimizers_compare_metric")
    runs_a, runs_b = trials[labels == a], trials[labels == b]
    # A run is named by its seed and, under cross-validation, its fold: pairs share both (same data, same draw).
    by = [name for name in ("seed", "fold") if name in trials and trials[name].notna().any()]
    runs_of = lambda runs: sorted(runs[by].astype(str).itertuples(index=False, name=None))  # noqa: E731
    paired = "seed" in by and len(runs_a) == len(runs_b) > 1 and runs_of(runs_a) == runs_of(runs_b)
    if paired:
        runs_a, runs_b = runs_a.sort_values(by), runs_b.sort_values(by)
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
all_trials = data.groupable_trials(experiment_id)
widgets.networks_or_stop(all_trials, page="this page of loss curves")
trained = all_trials[all_trials["status"].isin(widgets.TRAINED)]
if trained.empty:
    st.info(NOTHING_FINISHED, icon=":material/hourglass_empty:")
    st.stop()
trained, recorded = widgets.with_final_norms(experiment_id, trained, chosen=chosen_metrics())
groups = widgets.grouping_choices(all_trials)
range_test(trained, groups)
trained, groups = widgets.without_range_tests(trained, all_trials, groups, read_at="read above",
                                             shows="the comparisons of optimizers and schedules")
chosen_band, banded = widgets.band_controls(trained, key="optimizers")
handled = widgets.other_parameters(trained, key="optimizers_others", metrics=COMPARED, recorded=recorded)
if banded.empty:
    st.info("Every trial diverged: turn on \"Include diverged runs\" to draw their curves.")
    colour = widgets.parameter_picker("One line per", groups, key="optimizers_group", preferred=OPTIMIZATION)
else:
    colour = loss_curves(trained, groups, chosen_band, handled)
    sensitivity(trained, groups, colour, chosen_band, handled)
speed_and_divergence(experiment_id, trained, groups, colour, handled)
if not banded.empty:
    schedule(trained, groups, handled)
compare_two(trained, groups, recorded)
