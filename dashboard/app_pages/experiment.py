"""Experiment: one experiment, chosen in a selectbox or by `?experiment=ID`. Its progress, the
error of every failed trial, learning curves coloured by a parameter that varies across its
trials, and a table of every trial's status, parameters and final metrics. Refreshed live."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, data

MAX_CURVES = 200  # trials drawn at once; more lines than this is unreadable and slow in a browser
NO_EXPERIMENTS = "No experiments yet. Submit one with `fitscope submit examples/quickstart.yaml`."
NO_EPOCHS = ("No trial has finished an epoch yet. Learning curves appear here as soon as a worker "
             "reports the first epoch (start one with `fitscope worker` or `fitscope up`).")


def choose_experiment(experiments: pd.DataFrame) -> int:
    """The selectbox of experiments, kept in step with the `?experiment=` query parameter."""
    labels = {int(row.id): f"#{row.id} {row.name}" for row in experiments.itertuples(index=False)}
    asked = st.query_params.get("experiment")
    if asked != st.session_state.get("experiment_query"):  # arrived by a link: the link decides
        st.session_state["experiment_query"] = asked
        if asked is not None and asked.isdigit() and int(asked) in labels:
            st.session_state["experiment_selected"] = int(asked)
        elif asked is not None:
            st.warning(f"Experiment {asked!r} does not exist; choose one below.")
    chosen = st.selectbox("Experiment", options=list(labels), format_func=labels.get, key="experiment_selected")
    st.query_params["experiment"] = st.session_state["experiment_query"] = str(chosen)
    return chosen


def summary(experiment: dict) -> None:
    st.subheader(f"#{experiment['id']} {experiment['name']}")
    st.progress(float(experiment["progress"]),
                text=f"{experiment['progress']:.0%} of planned epochs · {experiment['ended']} of "
                     f"{experiment['trials']} trials ended")
    st.markdown(charts.status_badges(experiment))


def failed_trials(trials: pd.DataFrame) -> None:
    failed = trials[trials["status"] == "failed"]
    for trial in failed.itertuples(index=False):
        error = trial.error if isinstance(trial.error, str) and trial.error else "no error was recorded"
        st.error(f"Trial {trial.ordinal} (id {trial.trial_id}) failed: {error.splitlines()[0]}",
                 icon=":material/error:")
        if "\n" in error:
            with st.expander(f"Full error of trial {trial.ordinal}"):
                st.code(error, language=None)


def learning_curves(experiment_id: int, trials: pd.DataFrame, epochs: pd.DataFrame) -> None:
    st.subheader("Learning curves")
    if epochs.empty:
        st.info(NO_EPOCHS, icon=":material/hourglass_empty:")
        return
    varying = data.varying_parameters(trials)
    colour_by_options = varying or ["ordinal"]  # one trial, or a grid of one point
    metrics = ["loss"] + (["accuracy"] if epochs["val_accuracy"].notna().any() else [])
    colour_by, metric = st.columns(2)
    chosen_colour = colour_by.selectbox(
        "Colour by", colour_by_options, key=f"experiment_colour_by_{experiment_id}",
        help="Parameters that take more than one value in this experiment.",
    )
    chosen_metric = metric.segmented_control("Metric", metrics, default="loss",
                                             key=f"experiment_metric_{experiment_id}") or "loss"
    shown_trials = epochs["trial_id"].drop_duplicates().head(MAX_CURVES)
    if len(shown_trials) < epochs["trial_id"].nunique():
        st.caption(f"Showing the first {MAX_CURVES} trials; download the epochs CSV for all of them.")
    st.plotly_chart(
        charts.learning_curves(epochs[epochs["trial_id"].isin(shown_trials)], trials, chosen_colour,
                               metric=chosen_metric),
        key=f"experiment_curves_{experiment_id}",
    )


def trial_table(trials: pd.DataFrame) -> None:
    st.subheader("Trials")
    varying = data.varying_parameters(trials)
    metrics = data.metric_columns(trials)
    table = trials.assign(error=trials["error"].map(_first_line))
    st.dataframe(
        table[["ordinal", "status", *varying, "epochs_done", "best_epoch", *metrics, "error"]],
        hide_index=True, key="experiment_trials_table",
        column_config={"ordinal": st.column_config.NumberColumn("trial"),
                       **{name: st.column_config.NumberColumn(format="%.4g") for name in metrics}},
    )
    shared = [name for name in data.parameter_columns(trials) if name not in varying]
    if shared and len(trials):
        with st.expander("Parameters shared by every trial"):
            st.dataframe(pd.DataFrame({"parameter": shared, "value": [str(trials[name].iloc[0]) for name in shared]}),
                         hide_index=True)


def _first_line(text) -> str | None:
    return text.splitlines()[0] if isinstance(text, str) and text else None


@st.fragment(run_every=data.REFRESH_SECONDS)
def experiment_panel(experiment_id: int) -> None:
    experiment = data.experiment(experiment_id)
    if experiment is None:
        st.warning(f"Experiment {experiment_id} no longer exists.")
        return
    trials, epochs = data.trials(experiment_id), data.epochs(experiment_id)
    summary(experiment)
    failed_trials(trials)
    learning_curves(experiment_id, trials, epochs)
    trial_table(trials)


st.title("Experiment")
experiments = data.experiments(limit=500)
if experiments.empty:
    st.info(NO_EXPERIMENTS, icon=":material/science:")
    st.stop()
experiment_panel(choose_experiment(experiments))
