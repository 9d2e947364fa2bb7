"""Experiments: the workers that train trials, and every experiment with its progress and its
trials per status, both refreshed live; a search over names, descriptions, notes, tags and
submitters; and what can be done to each experiment: open it or its fit analysis, cancel it,
re-queue its failed and cancelled trials, download its trials or its per-epoch metrics as CSV."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import actions, charts, data
from services.actions import ExperimentNotFound
from services.db import DatabaseUnreachable
from services.queue import BrokerUnreachable
from services.safe_text import markdown_text

NEWEST = 50
EMPTY_STATE = ("No experiments yet. Submit one with `fitscope submit examples/quickstart.yaml` "
               "and it appears here as soon as its trials are queued.")
NO_WORKER = "No worker online: start one with `fitscope worker`; queued trials wait until one is."
ERRORS = "experiments_errors"  # experiment id -> the last action's error sentence
NOTICE = "experiments_notice"  # what the last action did, shown once as a toast
SEARCH = "experiments_search"
LOST_STYLE = "color: #d62728; font-weight: 600"  # the red of a lost worker's row


def cancel_clicked(experiment_id: int) -> None:
    st.session_state[ERRORS].pop(experiment_id, None)
    try:
        done = actions.cancel(experiment_id)
    except (DatabaseUnreachable, ExperimentNotFound) as exc:
        st.session_state[ERRORS][experiment_id] = data.sentence(str(exc))
        return
    st.session_state[NOTICE] = (f"Experiment {experiment_id}: {done.cancelled} queued trials cancelled, "
                                f"{done.stopping} running trials asked to stop.")


def requeue_clicked(experiment_id: int) -> None:
    st.session_state[ERRORS].pop(experiment_id, None)
    try:
        done = actions.requeue(experiment_id)
    except (BrokerUnreachable, DatabaseUnreachable, ExperimentNotFound) as exc:
        st.session_state[ERRORS][experiment_id] = data.sentence(str(exc))
        return
    st.session_state[NOTICE] = f"Experiment {experiment_id}: {len(done.trial_ids)} trials re-queued."


def experiment_card(experiment) -> None:
    with st.container(border=True, key=f"experiments_card_{experiment.id}"):
        heading, open_link = st.columns([5, 1])
        heading.markdown(f"**#{experiment.id} {markdown_text(experiment.name)}** · {experiment.method} · "
                         f"{experiment.trials} trials" +
                         (f" · by {markdown_text(experiment.submitted_by)}" if experiment.submitted_by else "") +
                         "".join(f" :gray-badge[{markdown_text(tag)}]" for tag in experiment.tags))
        if isinstance(experiment.note, str) and experiment.note:  # pandas holds a missing note as NaN
            heading.caption(markdown_text(experiment.note))
        open_link.page_link("app_pages/experiment.py", label="Open", icon=":material/monitoring:",
                            query_params={"experiment": str(experiment.id)})
        open_link.page_link("app_pages/fit_analysis.py", label="Fit analysis", icon=":material/insights:",
                            query_params={"experiment": str(experiment.id)})
        st.progress(float(experiment.progress),
                    text=f"{experiment.progress:.0%} of planned epochs · {experiment.ended} of "
                         f"{experiment.trials} trials ended")
        st.markdown(charts.status_badges(experiment._asdict()))
        if experiment.id in st.session_state[ERRORS]:
            st.error(st.session_state[ERRORS][experiment.id])
        action_buttons(experiment)


def action_buttons(experiment) -> None:
    cancel, requeue, trials_csv, epochs_csv = st.columns(4)
    cancel.button(
        "Cancel", key=f"experiments_cancel_{experiment.id}", icon=":material/cancel:",
        disabled=experiment.queued + experiment.running == 0, on_click=cancel_clicked, args=(experiment.id,),
        help="Queued trials are cancelled now; running ones stop at the end of their current epoch.",
    )
    requeue.button(
        "Re-queue failed/cancelled", key=f"experiments_requeue_{experiment.id}", icon=":material/replay:",
        disabled=experiment.failed + experiment.cancelled == 0, on_click=requeue_clicked, args=(experiment.id,),
        help="Run the failed and cancelled trials again from scratch.",
    )
    trials_csv.download_button(
        "Trials CSV", data=data.csv_export(experiment.id, "trials"), key=f"experiments_trials_csv_{experiment.id}",
        file_name=f"experiment-{experiment.id}-trials.csv", mime="text/csv", icon=":material/download:",
        on_click="ignore", help="One row per trial: status, parameters, final metrics.",
    )
    epochs_csv.download_button(
        "Epochs CSV", data=data.csv_export(experiment.id, "epochs"), key=f"experiments_epochs_csv_{experiment.id}",
        file_name=f"experiment-{experiment.id}-epochs.csv", mime="text/csv", icon=":material/download:",
        on_click="ignore", help="One row per trial and epoch: train and validation loss and accuracy.",
    )


@st.fragment(run_every=data.REFRESH_SECONDS)
def workers_panel() -> None:
    workers = data.workers()
    if not any(worker["status"] == "online" for worker in workers):
        st.warning(NO_WORKER, icon=":material/warning:")
    if not workers:
        return
    table = pd.DataFrame([{
        "worker": w["name"], "status": w["status"], "queues": ", ".join(w["queues"]),
        "running trials": ", ".join(str(t) for t in w["current_trials"]) or "-",
        "processes": w["concurrency"], "device": w["device"], "host": w["host"], "pid": w["pid"],
        "last heartbeat": f"{w['seconds_since_heartbeat']:.0f} s ago", "torch": w["torch_version"],
    } for w in workers])
    st.dataframe(table.style.apply(lambda row: [LOST_STYLE if row["status"] == "lost" else ""] * len(row), axis=1),
                 hide_index=True, key="experiments_workers")


@st.fragment(run_every=data.REFRESH_SECONDS)
def experiments_panel(search: str) -> None:
    # Shown here rather than in the button's callback: a callback of a fragment must not draw elements.
    if notice := st.session_state.pop(NOTICE, None):
        st.toast(notice, icon=":material/check_circle:")
    experiments = data.experiments(limit=NEWEST, search=search)
    if experiments.empty and search.strip():
        shown = markdown_text(repr(search.strip()))
        st.info(f"No experiment's name, description, note, tags or submitter contains {shown}.",
                icon=":material/search_off:")
        return
    if experiments.empty:
        st.info(EMPTY_STATE, icon=":material/science:")
        return
    st.plotly_chart(charts.progress_bar_chart(experiments), key="experiments_progress_chart")
    if len(experiments) == NEWEST:
        st.caption(f"The newest {NEWEST} experiments; `fitscope status --limit N` lists more.")
    for experiment in experiments.itertuples(index=False):
        experiment_card(experiment)


st.session_state.setdefault(ERRORS, {})
st.title("Experiments")
st.subheader("Workers")
workers_panel()
st.subheader("Experiments")
search = st.text_input("Search", key=SEARCH, placeholder="name, description, note, tag or submitter",
                       max_chars=200, icon=":material/search:", label_visibility="collapsed")
experiments_panel(search)
