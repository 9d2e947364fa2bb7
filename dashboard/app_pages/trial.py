"""Trial: one trial, opened by `?trial=ID` (the links in the other pages' tables) or chosen by
experiment and trial. Its resolved config, learning curves, each layer's gradient norm against depth,
its range test (schedule lr_range_test), the stored fit diagnosis with every number that decided it,
its error text when it failed, and the picture of what it learned."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, data, fit_frames, gradient_charts, surface_charts, widgets
from services.range_test import read_range_test
from services.safe_text import markdown_text

PICKER_TRIALS = 100  # the most trials the picker lists at once (a list of 10,000 is slow and unreadable)
NOT_STARTED = "This trial has not recorded an epoch yet; its curves appear when a worker reports the first one."


def choose_trial() -> int | None:
    """The trial named by `?trial=ID`, else the one chosen in the experiment and trial selectboxes."""
    asked = st.query_params.get("trial")
    if asked is not None and asked != st.session_state.get("trial_query"):  # arrived by a link
        st.session_state["trial_query"] = asked
        asked_id = widgets.parse_id(asked)  # a 20-digit number must not reach the database
        found = data.trial(asked_id) if asked_id is not None else None
        if found is None:
            st.warning(f"Trial {markdown_text(repr(asked[:40]))} does not exist; choose one below.")
        else:
            st.query_params["experiment"] = str(found["experiment_id"])
            st.session_state["trial_selected"] = found["trial_id"]
    experiment_id = widgets.experiment_or_stop("trial_experiment")
    trials = widgets.parents_as_words(data.trial_configs(experiment_id))
    if trials.empty:
        st.info("This experiment has no trials.")
        return None
    varying = widgets.grouping_choices(trials)
    labels = widgets.trial_labels(trials, varying)
    if st.session_state.get("trial_selected") not in labels:
        st.session_state.pop("trial_selected", None)
    chosen = st.selectbox("Trial", _listed(labels), format_func=labels.get, key="trial_selected")
    st.query_params["trial"] = st.session_state["trial_query"] = str(chosen)
    return chosen


def _listed(labels: dict[int, str]) -> list[int]:
    """The trials the picker lists: all of a small experiment; of a large one, the first PICKER_TRIALS
    whose label holds every word typed in a search box (the chosen trial always among them)."""
    if len(labels) <= PICKER_TRIALS:
        return list(labels)
    words = st.text_input("Find a trial", key="trial_search", placeholder="e.g. adam lr=0.1 overfit, or trial 12",
                          help="Lists the trials whose label (number, parameters that vary, verdict) holds every "
                               "word typed.").lower().split()
    matching = [trial_id for trial_id, label in labels.items() if all(word in label.lower() for word in words)]
    listed = matching[:PICKER_TRIALS]
    st.caption(f"{len(listed)} of {len(matching)} matching trials listed ({len(labels)} in the experiment)"
               + ("; type parameter values above to narrow the list." if len(matching) > PICKER_TRIALS else "."))
    chosen = st.session_state.get("trial_selected")
    if chosen in labels and chosen not in listed:  # the trial shown stays choosable whatever the search
        listed.insert(0, chosen)
    return listed


def header(trial: dict) -> None:
    st.subheader(f"Trial {trial['ordinal']} of #{trial['experiment_id']} {markdown_text(trial['experiment_name'])}")
    st.markdown(charts.status_badges({trial["status"]: 1}).replace("[1 ", "[")
                + f" · id {trial['trial_id']} (what init_from takes) · {trial['epochs_done']} epochs"
                + (f" · worker `{trial['worker']}`" if trial["worker"] else "")
                + f" · attempt {trial['attempts']}" + _fused_note(trial["final_metrics"]) + _fold_note(trial["config"]))
    st.page_link("app_pages/fit_analysis.py", label="Fit analysis of this experiment", icon=":material/insights:",
                 query_params={"experiment": str(trial["experiment_id"])})
    parent_link(trial["config"])
    if trial["error"]:
        first, _, rest = trial["error"].partition("\n")
        st.error(f"This trial {trial['status']}: {markdown_text(first)}", icon=":material/error:")
        if rest:
            with st.expander("Full error"):
                st.code(trial["error"], language=None)


def parent_link(config: dict) -> None:
    """A fine-tuned trial links to the trial whose best weights it started from."""
    parent = config.get("init_from")
    if parent is None:
        return
    fixed = config.get("freeze") or 0
    kept = f", its first {fixed} linear layer{'s' if fixed > 1 else ''} kept fixed" if fixed else ""
    st.page_link("app_pages/trial.py", label=f"Fine-tuned from trial {int(parent)}'s best-epoch weights{kept}",
                 icon=":material/call_split:", query_params={"trial": str(int(parent))})


def _fold_note(config: dict) -> str:
    folds = config.get("folds")
    return f" · cross-validation fold {config.get('fold')} of {folds}" if folds else ""


def _fused_note(final_metrics: dict) -> str:
    together = final_metrics.get("trained_with") or 1
    return f" · trained fused with {together - 1} other trial{'s' if together > 2 else ''}" if together > 1 else ""


def curves(trial: dict) -> None:
    st.subheader("Learning curves")
    epochs = data.curves(trial["experiment_id"], trial_ids=(trial["trial_id"],),
                         fields=("train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr", "grad_norm",
                                 "weight_norm"))
    if epochs.empty:
        st.info(NOT_STARTED, icon=":material/hourglass_empty:")
        return
    marks = {"best": trial["best_epoch"], "stopped early": trial["final_metrics"].get("stopped_epoch")}
    row = pd.DataFrame([{"trial_id": trial["trial_id"], "ordinal": trial["ordinal"]}])
    log_y = widgets.y_scale(key="trial_y_scale")
    loss, accuracy = st.columns(2)
    loss.plotly_chart(charts.learning_curves(epochs, row, "ordinal", log_y=log_y, epoch_marks=marks),
                      key="trial_loss_chart")
    if epochs["val_accuracy"].notna().any():
        accuracy.plotly_chart(charts.learning_curves(epochs, row, "ordinal", metric="accuracy", epoch_marks=marks),
                              key="trial_accuracy_chart")
    if epochs[["grad_norm", "weight_norm"]].notna().any().any():
        (accuracy if not epochs["val_accuracy"].notna().any() else st).plotly_chart(
            charts.norm_curves(epochs, epoch_marks=marks), key="trial_norms_chart")
        st.caption("A gradient norm shrinking by decades means vanishing gradients (deep sigmoid or tanh "
                   "networks); one growing until the loss blows up means exploding ones (too large a rate). "
                   "Weight decay and L1 keep the weight norm small.")
    if trial["best_epoch"]:
        stopped = marks["stopped early"]
        st.caption(f"Best validation epoch: {trial['best_epoch']} of {trial['epochs_done']}"
                   + (f"; early stopping ended the run at epoch {stopped} and kept the best epoch's weights."
                      if stopped else "."))


def layer_gradients(trial: dict) -> None:
    """Each Linear layer's gradient norm against its depth, at a few chosen epochs."""
    norms = data.layer_grad_norms(trial["experiment_id"], trial_ids=(trial["trial_id"],))
    if norms.empty:
        return
    st.subheader("Gradients layer by layer")
    epochs = sorted(norms["epoch"].unique().tolist())
    default = sorted({epochs[0], epochs[len(epochs) // 2], epochs[-1]})
    chosen = widgets.keyed_multiselect("Epochs", epochs, default=default, key=f"trial_layer_epochs_{trial['trial_id']}",
                                       help="One line per epoch: the gradient of that epoch's last step.")
    if not chosen:
        st.info("Choose an epoch to draw.")
        return
    st.plotly_chart(gradient_charts.layer_norms_chart(norms, epochs=chosen), key="trial_layers_chart")
    last = norms[norms["epoch"] == chosen[-1]].sort_values("layer")["grad_norm"].tolist()
    ratio = last[0] / last[-1] if last and last[-1] else None
    st.caption("Gradients flow back from the output (right) to the input (left). A line falling to the left means "
               "the first layers barely learn (vanishing gradients: saturating activations such as sigmoid in deep "
               "networks)." + (f" At epoch {chosen[-1]} the first layer's gradient is {ratio:.2g} times the last's."
                               if ratio else ""))


def range_test(trial: dict) -> None:
    if trial["config"].get("schedule") != "lr_range_test":
        return
    curve = data.artifacts((trial["trial_id"],)).get(trial["trial_id"], {}).get("lr_range")
    reading = read_range_test(curve["lr"], curve["loss"]) if curve else None
    if reading is None:
        return
    st.subheader("Learning-rate range test")
    st.plotly_chart(gradient_charts.range_test_chart([(trial["config"].get("optimizer"), reading)],
                                                     color_by="optimizer"), key="trial_range_chart")
    st.caption(f"Suggested rate (steepest descent of the smoothed loss): {reading.suggested_lr:.2g}; the loss is "
               f"lowest at {reading.minimum_lr:.2g} (a tenth of it: {reading.minimum_lr / 10:.2g}).")


def diagnosis(trial: dict) -> None:
    st.subheader("Fit diagnosis")
    stored = trial["diagnosis"]
    if not trial["verdict"] and not stored:
        st.info("No verdict yet: a trial is diagnosed when it ends.")
        return
    verdict = (trial["verdict"] or "none").replace("_", " ")
    st.markdown(f"Verdict (judged alone, as stored): **{verdict}**")
    for reason in stored.get("reasons", []):
        st.markdown(f"- {reason}")
    numbers = stored.get("numbers", {})
    if numbers:
        measured = {k: v for k, v in numbers.items() if not k.endswith("_limit") and k != "tail_fraction"}
        limits = {k: v for k, v in numbers.items() if k.endswith("_limit") or k == "tail_fraction"}
        left, right = st.columns(2)
        left.dataframe(_table(measured), hide_index=True, key="trial_numbers_table")
        right.dataframe(_table(limits, header="threshold"), hide_index=True, key="trial_limits_table")


def predictions(trial: dict) -> None:
    found = data.artifacts((trial["trial_id"],)).get(trial["trial_id"], {})
    if "path_2d" in found:  # a 2-D test function: the point's path on the function, not a model's predictions
        st.subheader("The point's path")
        row = pd.DataFrame([{"trial_id": trial["trial_id"], "optimizer": trial["config"].get("optimizer")}])
        st.plotly_chart(surface_charts.surface_paths(row, {trial["trial_id"]: found["path_2d"]},
                                                     function=found["path_2d"]["function"], color_by="optimizer",
                                                     panel_by=None), key="trial_path_chart")
    elif fit_frames.has_frames(found):
        st.subheader("Watch it fit")
        losses = data.curves(trial["experiment_id"], trial_ids=(trial["trial_id"],), fields=("train_loss", "val_loss"))
        st.plotly_chart(fit_frames.fit_animation([("What the model predicts", found)], curves=losses,
                                                 best_epoch=trial["best_epoch"]), key="trial_fit_animation")
        st.caption(fit_frames.HOW_TO_READ)
    elif any(kind in found for kind in charts.PREDICTION_KINDS):
        st.subheader("What the model learned")
        st.plotly_chart(charts.prediction_panels({trial["trial_id"]: found}, {trial["trial_id"]: ""}),
                        key="trial_prediction_chart")
    if found.get("multilabel"):
        multilabel(found["multilabel"])


def multilabel(series: dict) -> None:
    """A multi-label trial: exact match (every label of an example right) per epoch, and each label's
    accuracy with the best epoch's weights."""
    st.subheader("Labels")
    left, right = st.columns(2)
    left.plotly_chart(fit_frames.exact_match_curves(series), key="trial_exact_match_chart")
    right.plotly_chart(fit_frames.label_accuracy_bars(series), key="trial_label_accuracy_chart")
    st.caption("Accuracy on the curves above is the mean of the per-label accuracies; exact match asks every "
               "label of an example to be right, so it is lower and falls first when one label is hard.")


def config_and_metrics(trial: dict) -> None:
    config, metrics = st.columns(2)
    with config:
        st.subheader("Resolved config")
        st.json(trial["config"], expanded=True)
    with metrics:
        st.subheader("Final metrics")
        st.dataframe(_table(trial["final_metrics"], header="value"), hide_index=True, key="trial_metrics_table")


def _table(values: dict, *, header: str = "value") -> pd.DataFrame:
    return pd.DataFrame({"name": list(values), header: [_shown(value) for value in values.values()]})


def _shown(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


st.title("Trial")
trial_id = choose_trial()
if trial_id is None:
    st.stop()
chosen = data.trial(trial_id)
if chosen is None:
    st.warning(f"Trial {trial_id} no longer exists.")
    st.stop()
header(chosen)
curves(chosen)
layer_gradients(chosen)
range_test(chosen)
diagnosis(chosen)
predictions(chosen)
config_and_metrics(chosen)
