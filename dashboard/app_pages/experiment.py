"""Experiment: one experiment, chosen in a selectbox or by `?experiment=ID`. Its progress, the
error of every failed trial, learning curves coloured by a parameter that varies across its
trials, and a table of every trial's status, parameters and final metrics with a link to each
trial's own page. Refreshed live; the Fit analysis and Optimizers pages go deeper (and, for trials on
2-D test functions, Loss surfaces)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import charts, data, trial_tables, widgets
from services.safe_text import markdown_text
from services.surfaces import SURFACE_NAMES

MAX_CURVES = 100  # trials drawn at once; more lines than this is unreadable and slow in a browser
NO_EPOCHS = ("No trial has finished an epoch yet. Learning curves appear here as soon as a worker "
             "reports the first epoch (start one with `fitscope worker` or `fitscope up`).")


def summary(experiment: dict, trials: pd.DataFrame) -> None:
    st.subheader(f"#{experiment['id']} {markdown_text(experiment['name'])}")
    if who := _who(experiment):
        st.caption(who)
    on_surfaces = trials["dataset"].isin(SURFACE_NAMES) if "dataset" in trials else pd.Series(False, index=trials.index)
    links = [("app_pages/loss_surfaces.py", "Loss surfaces", ":material/landscape:")] if on_surfaces.any() else []
    if not on_surfaces.all() or trials.empty:  # networks on data: analysed on these two pages
        links += [("app_pages/fit_analysis.py", "Fit analysis", ":material/insights:"),
                  ("app_pages/optimizers.py", "Optimizers and schedules", ":material/speed:")]
    for column, (page, label, icon) in zip(st.columns(len(links)), links, strict=True):
        column.page_link(page, label=label, icon=icon, query_params={"experiment": str(experiment["id"])})
    st.progress(float(experiment["progress"]),
                text=f"{experiment['progress']:.0%} of planned epochs · {experiment['ended']} of "
                     f"{experiment['trials']} trials ended")
    st.markdown(charts.status_badges(experiment))


def failed_trials(trials: pd.DataFrame) -> None:
    failed = trials[trials["status"] == "failed"]
    for trial in failed.itertuples(index=False):
        error = trial.error if isinstance(trial.error, str) and trial.error else "no error was recorded"
        st.error(f"Trial {trial.ordinal} (id {trial.trial_id}) failed: {markdown_text(error.splitlines()[0])}",
                 icon=":material/error:")
        if "\n" in error:
            with st.expander(f"Full error of trial {trial.ordinal}"):
                st.code(error, language=None)


def learning_curves(experiment_id: int, trials: pd.DataFrame, varying: list[str]) -> None:
    st.subheader("Learning curves")
    started = trials[trials["epochs_done"] > 0]
    if started.empty:
        st.info(NO_EPOCHS, icon=":material/hourglass_empty:")
        return
    shown, sample = _spread_sample(started)
    epochs = data.curves(experiment_id, trial_ids=tuple(int(i) for i in shown["trial_id"]),
                         fields=("train_loss", "val_loss", "train_accuracy", "val_accuracy"))
    colour_by_options = varying or ["ordinal"]  # one trial, or a grid of one point
    metrics = ["loss"] + (["accuracy"] if epochs["val_accuracy"].notna().any() else [])
    colour_by, metric = st.columns(2)
    chosen_colour = colour_by.selectbox(
        "Colour by", colour_by_options, key=f"experiment_colour_by_{experiment_id}",
        help="Parameters that take more than one value in this experiment.",
    )
    chosen_metric = metric.segmented_control("Metric", metrics, default="loss",
                                             key=f"experiment_metric_{experiment_id}") or "loss"
    st.plotly_chart(charts.learning_curves(epochs, trials, chosen_colour, metric=chosen_metric),
                    key=f"experiment_curves_{experiment_id}")
    if len(shown) < len(started):
        st.caption(f"To keep the chart light, {len(shown)} of the {len(started)} trials that have started are drawn, "
                   f"every epoch: {sample}. Fit analysis shows all of them as bands; the epochs CSV has everything.")


def _spread_sample(started: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """At most MAX_CURVES trials spread evenly over the grid (the first seed of each configuration
    when there are several seeds), not its first corner; and what was drawn, in words."""
    if len(started) <= MAX_CURVES:
        return started, "all of them"
    seeds = "seed" in started and started["seed"].nunique() > 1
    seed = started["seed"].min() if seeds else None
    pool = started[started["seed"] == seed] if seeds else started
    picks = np.unique(np.linspace(0, len(pool) - 1, min(MAX_CURVES, len(pool))).round().astype(int))
    if not seeds:
        return pool.iloc[picks], f"{len(picks)} spread evenly over the grid"
    which = f"each of the {len(pool)} configurations" if len(picks) == len(pool) else \
        f"{len(picks)} of the {len(pool)} configurations, spread evenly over the grid"
    return pool.iloc[picks], f"seed {seed} of {which}"


def trial_table(trials: pd.DataFrame, varying: list[str]) -> None:
    st.subheader("Trials")
    metrics = trial_tables.metric_columns(trials)
    table = trials.assign(error=trials["error"].map(_first_line), link=trials["trial_id"].map(widgets.trial_page_link))
    st.dataframe(
        table[["ordinal", "status", *varying, "epochs_done", "best_epoch", *metrics, "error", "link"]],
        hide_index=True, key="experiment_trials_table",
        column_config={"ordinal": st.column_config.NumberColumn("trial"),
                       "link": st.column_config.LinkColumn("details", display_text="open"),
                       **{name: st.column_config.NumberColumn(format="%.4g") for name in metrics
                          if pd.api.types.is_numeric_dtype(trials[name])}},  # verdict, reasons: text
    )
    shared = [name for name in trial_tables.parameter_columns(trials) if name not in varying]
    if shared and len(trials):
        with st.expander("Parameters shared by every trial"):
            st.dataframe(pd.DataFrame({"parameter": shared, "value": [str(trials[name].iloc[0]) for name in shared]}),
                         hide_index=True)


def _who(experiment: dict) -> str:
    """Submitted by X · last cancelled by Y · last re-queued by Z (the signed-in users, or the CLI's)."""
    parts = [f"{label} **{markdown_text(value)}**" for label, value in (
        ("Submitted by", experiment.get("submitted_by")), ("last cancelled by", experiment.get("cancelled_by")),
        ("last re-queued by", experiment.get("requeued_by"))) if isinstance(value, str) and value]
    return " · ".join(parts)


def _first_line(text) -> str | None:
    return text.splitlines()[0] if isinstance(text, str) and text else None


@st.fragment(run_every=data.REFRESH_SECONDS)
def experiment_panel(experiment_id: int) -> None:
    experiment = data.experiment(experiment_id)
    if experiment is None:
        st.warning(f"Experiment {experiment_id} no longer exists.")
        return
    trials = data.trials(experiment_id)
    summary(experiment, trials)
    failed_trials(trials)
    varying = trial_tables.varying_parameters(trials)  # once: 50 columns of 10,000 trials
    learning_curves(experiment_id, trials, varying)
    trial_table(trials, varying)


st.title("Experiment")
experiment_panel(widgets.experiment_or_stop("experiment"))
