"""Widgets the pages share: which experiment, which parameter goes on which axis, which trials,
which trial. Each takes a ``page`` or ``key`` prefix so that its session-state keys are the page's
own (Streamlit's multipage guidance), and each offers only what the experiment at hand varies:
nothing is hard-wired to one grid."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd
import streamlit as st

from dashboard import data
from services.analysis import BANDS
from services.safe_text import markdown_text

NO_EXPERIMENTS = "No experiments yet. Submit one with `fitscope submit examples/quickstart.yaml`."
LAST_EXPERIMENT = "widgets_last_experiment"  # the experiment chosen last on any page, the next page's default
TRAINED = ("succeeded", "diverged")  # statuses of trials with a full run to compare
MAX_FILTER_OPTIONS = 200  # a parameter with more distinct values than this is not offered as a filter
_ID = re.compile(r"[0-9]{1,18}")  # a database id in a link: ASCII digits, within a 64-bit integer


def parse_id(text: str | None) -> int | None:
    """The id in a `?experiment=` or `?trial=` link, or None when it is not one: up to 18 ASCII
    digits, so that a longer number never reaches the database (whose integers are 64-bit)."""
    return int(text) if isinstance(text, str) and _ID.fullmatch(text) else None


def experiment_or_stop(page: str) -> int:
    """The experiment selectbox of a page, or the empty state (and the page stops) when there is none."""
    experiments = data.experiments(limit=500)
    if experiments.empty:
        st.info(NO_EXPERIMENTS, icon=":material/science:")
        st.stop()
    return choose_experiment(experiments, page=page)


def choose_experiment(experiments: pd.DataFrame, *, page: str = "experiment") -> int:
    """The selectbox of experiments, kept in step with the `?experiment=` query parameter: a link
    decides when the page is opened by one; otherwise the experiment chosen last on any page."""
    selected, query = f"{page}_selected", f"{page}_query"
    labels = {int(row.id): f"#{row.id} {row.name}" for row in experiments.itertuples(index=False)}
    asked = st.query_params.get("experiment")
    if asked != st.session_state.get(query):  # arrived by a link: the link decides
        st.session_state[query] = asked
        if parse_id(asked) in labels:
            st.session_state[selected] = parse_id(asked)
        elif asked is not None:
            st.warning(f"Experiment {markdown_text(repr(asked[:40]))} does not exist; choose one below.")
    if selected not in st.session_state and st.session_state.get(LAST_EXPERIMENT) in labels:
        st.session_state[selected] = st.session_state[LAST_EXPERIMENT]
    chosen = st.selectbox("Experiment", options=list(labels), format_func=labels.get, key=selected)
    st.query_params["experiment"] = st.session_state[query] = str(chosen)
    st.session_state[LAST_EXPERIMENT] = chosen
    return chosen


def grouping_choices(trials: pd.DataFrame) -> list[str]:
    """Parameters a chart can group, colour or lay out by: those that vary, seeds excepted (seeds
    collapse into bands). ``ordinal`` (one group per trial) when nothing else varies."""
    return [name for name in data.varying_parameters(trials) if name != "seed"] or ["ordinal"]


def numeric_choices(trials: pd.DataFrame, names: Sequence[str]) -> list[str]:
    """Those of ``names`` whose every value is a number (they can go on a numeric x axis)."""
    return [name for name in names if name in trials
            and pd.to_numeric(trials[name], errors="coerce").notna().sum() == trials[name].notna().sum() > 0]


def parameter_picker(label: str, options: Sequence[str], *, key: str, preferred: Sequence[str] = (),
                     avoid: str | None = None, help: str | None = None, container=st) -> str:
    """A selectbox over ``options`` starting at the first of ``preferred`` that is offered (else the
    first option other than ``avoid``, so two pickers on one chart start on different parameters)."""
    options = list(options)
    start = next((name for name in preferred if name in options and name != avoid),
                 next((name for name in options if name != avoid), options[0]))
    return container.selectbox(label, options, index=options.index(start), key=key, help=help)


def band_picker(*, key: str) -> str:
    """How seeds collapse into a band: mean ± std, or min to max."""
    return st.radio("Band over seeds", list(BANDS), format_func=BANDS.get, key=key, horizontal=True,
                    help="Runs that share every plotted parameter (usually the seeds) become one line and a band.")


def trial_filter(trials: pd.DataFrame, *, key: str, experiment_id: int) -> pd.DataFrame:
    """An expander with one "leave out" multiselect per varying parameter; the trials with none of
    the left-out values.

    The widgets hold what is left out (nothing at first), keyed by the experiment: a value that
    appears later (a trial of a running experiment) is shown, not silently filtered away, and another
    experiment starts with its own, empty, choices."""
    choices = [name for name in data.varying_parameters(trials)
               if trials[name].astype(str).nunique() <= MAX_FILTER_OPTIONS]
    kept = trials
    with st.expander("Filter trials", icon=":material/filter_alt:"):
        for name in choices:
            widget = f"{key}_{experiment_id}_{name}"
            kept_choice = f"{widget}_left_out"  # not a widget's key: survives the runs that show another experiment
            if widget not in st.session_state:
                st.session_state[widget] = list(st.session_state.get(kept_choice, []))
            values = set(trials[name].astype(str)) | set(st.session_state[widget])
            left_out = st.multiselect(f"Leave out {name}", sorted(values, key=_natural), key=widget)
            st.session_state[kept_choice] = left_out
            if left_out:
                kept = kept[~kept[name].astype(str).isin(left_out)]
        st.caption(f"{len(kept)} of {len(trials)} trials kept.")
    return kept


def diverged_mask(trials: pd.DataFrame) -> pd.Series:
    """True for the trials that diverged: the engine said so, or a verdict (stored or among siblings) did."""
    mask = trials["status"] == "diverged"
    for column in ("verdict", "sibling_verdict"):
        if column in trials:
            mask |= trials[column] == "diverged"
    return mask


def without_diverged(trials: pd.DataFrame, *, key: str) -> pd.DataFrame:
    """The trials that go into bands: diverged runs left out unless the user asks for them (one blown-up
    seed would stretch a band over the whole chart)."""
    diverged = diverged_mask(trials)
    include = st.toggle(f"Include diverged runs in bands ({int(diverged.sum())} of {len(trials)})", value=False,
                        key=key, help="Off: a run whose loss blew up is left out of means and bands; the "
                                      "divergence charts and the verdict grid always count it.")
    return trials if include else trials[~diverged]


def band_controls(trials: pd.DataFrame, *, key: str) -> tuple[str, pd.DataFrame]:
    """The band picker and the diverged-runs toggle side by side (keys ``{key}_band`` and
    ``{key}_include_diverged``): how seeds collapse, and the trials that go into the bands."""
    band_column, diverged_column = st.columns(2)
    with band_column:
        band = band_picker(key=f"{key}_band")
    with diverged_column:
        banded = without_diverged(trials, key=f"{key}_include_diverged")
    return band, banded


def averaged_over(trials: pd.DataFrame, plotted: Sequence[str]) -> str:
    """A sentence saying what each mean and band of a chart averages: the runs that share the
    ``plotted`` parameters, i.e. the seeds and every varying parameter not plotted."""
    others = [name for name in data.varying_parameters(trials) if name not in (*plotted, "seed", "ordinal")]
    seeds = trials["seed"].nunique() if "seed" in trials else 1
    across = f"{seeds} seed(s)" + (f" and every value of {', '.join(others)}" if others else "")
    return f"Each line and band averages the {len(trials)} runs shown over {across} (use the filter to slice)."


def keyed_multiselect(label: str, options: Sequence, *, key: str, default: Sequence, **kwargs) -> list:
    """A multiselect that starts at ``default`` once, then keeps the user's choice, dropping any chosen
    value that is no longer offered (a filter changed) instead of failing."""
    options = list(options)
    if key in st.session_state:
        st.session_state[key] = [value for value in st.session_state[key] if value in options]
    else:
        st.session_state[key] = [value for value in default if value in options]
    return st.multiselect(label, options, key=key, **kwargs)


def trial_label(trial: pd.Series | dict, parameters: Sequence[str]) -> str:
    """``trial 3 · width=64, lr=0.01 · overfit``: its ordinal, the parameters that vary, its verdict."""
    values = ", ".join(f"{name}={trial[name]}" for name in parameters if name in trial and name != "ordinal")
    verdict = trial.get("sibling_verdict") or trial.get("verdict")
    return " · ".join(part for part in (f"trial {trial['ordinal']}", values, _text(verdict)) if part)


def configuration_labels(trials: pd.DataFrame, parameters: Sequence[str]) -> pd.Series:
    """One label per trial naming its configuration (every varying parameter but the seed), so runs
    that differ only in their seed share a label."""
    names = [name for name in parameters if name not in ("seed", "ordinal")]
    if not names:
        return pd.Series("all trials", index=trials.index)
    return trials[names].astype(str).apply(lambda row: ", ".join(f"{k}={v}" for k, v in row.items()), axis=1)


def trial_page_link(trial_id: int) -> str:
    """A relative link to the Trial page with this trial chosen (for st.column_config.LinkColumn)."""
    return f"trial?trial={int(trial_id)}"


def _natural(text: str) -> tuple[int, float, str]:
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def _text(value) -> str:
    return value.replace("_", " ") if isinstance(value, str) else ""
