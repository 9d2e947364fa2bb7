"""Widgets the pages share: which experiment, which parameter goes on which axis, which trials,
which trial. Each takes a ``page`` or ``key`` prefix so that its session-state keys are the page's
own (Streamlit's multipage guidance), and each offers only what the experiment at hand varies:
nothing is hard-wired to one grid."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import streamlit as st

from dashboard import data, trial_tables
from services.analysis import BANDS
from services.safe_text import markdown_text
from services.selection import (
    HANDLINGS,
    SEED_PARAMETERS,
    Selection,
    configuration_parameters,
    select_configurations,
)

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
    experiments = data.experiment_choices(limit=500)
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
    return [name for name in trial_tables.varying_parameters(trials) if name not in SEED_PARAMETERS] or ["ordinal"]


def with_final_norms(experiment_id: int, trials: pd.DataFrame, *, chosen: Sequence[object]
                     ) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """``trials`` with each one's final gradient and weight norm (data.final_norms) when one of the
    page's ``chosen`` metrics is such a norm, and no recorded ones; else ``trials`` as they are, with
    the norms some trained trial recorded (data.final_norms_recorded, a look-up that stops at the
    first): a page offers those in its metric lists and reads them once chosen, since joining every
    trial's last epoch row is a tenth of a cold page at 10,000 trials. The index as the merge leaves
    it either way."""
    if not set(chosen).isdisjoint(data.FINAL_NORMS):
        return trials.merge(data.final_norms(experiment_id), on="trial_id", how="left"), ()
    return trials.reset_index(drop=True), data.final_norms_recorded(experiment_id, statuses=TRAINED)


def numeric_choices(trials: pd.DataFrame, names: Sequence[str]) -> list[str]:
    """Those of ``names`` whose every value is a number (they can go on a numeric x axis)."""
    return [name for name in names if name in trials and trial_tables.all_numbers(trials[name])]


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
    # Each column's distinct values first, then their texts: the text of every one of 10,000 values,
    # and a set built from it, took most of a second.
    texts = {name: _distinct_texts(trials[name]) for name in trial_tables.varying_parameters(trials)}
    choices = [name for name, values in texts.items() if values.nunique() <= MAX_FILTER_OPTIONS]
    kept = trials
    with st.expander("Filter trials", icon=":material/filter_alt:"):
        for name in choices:
            widget = f"{key}_{experiment_id}_{name}"
            kept_choice = f"{widget}_left_out"  # not a widget's key: survives the runs that show another experiment
            if widget not in st.session_state:
                st.session_state[widget] = list(st.session_state.get(kept_choice, []))
            values = set(texts[name]) | set(st.session_state[widget])
            left_out = st.multiselect(f"Leave out {name}", sorted(values, key=_natural), key=widget)
            st.session_state[kept_choice] = left_out
            if left_out:
                kept = kept[~kept[name].astype(str).isin(left_out)]
        st.caption(f"{len(kept)} of {len(trials)} trials kept.")
    return kept


def _distinct_texts(column: pd.Series) -> pd.Series:
    """``column.astype(str)`` of each distinct value once (by type and value: True and 1.0 are equal
    keys to pandas but have different texts)."""
    try:
        distinct = list(dict.fromkeys((type(value), value) for value in column.tolist()))
    except TypeError:  # list or dict values
        return column.astype(str)
    return pd.Series([value for _, value in distinct], dtype=object).astype(str)


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


Y_SCALES = {"auto": None, "linear": False, "log": True}
HANDLING_HELP = ("best: each line at the value with the best mean metric over its seeds; held: every line at "
                 "the value chosen on the right; averaged: all values pooled, so a band spans configurations, "
                 "not only seeds.")


def y_scale(*, key: str, container=st) -> bool | None:
    """The y-axis picker of a chart: auto (None: a log axis when the values span more than two decades,
    a robust range with a note for a few blow-ups), linear (False) or log (True)."""
    chosen = container.segmented_control("y axis", list(Y_SCALES), default="auto", key=key,
                                         help="auto: log when the values span more than two decades; a few "
                                              "values far above the rest are left outside the range, and the "
                                              "chart says how many.")
    return Y_SCALES[chosen or "auto"]


@dataclass(frozen=True)
class Handling:
    """How a page's charts treat the parameters they do not draw (see :func:`other_parameters`)."""

    handling: dict[str, str]
    held: dict[str, object]
    metric: str
    goal: str
    # What this page run learned of each trials frame it saw, by the frame's id (the frame kept beside it,
    # so that a new frame never inherits an old id's answers): the parameters that tell its
    # configurations apart (a page's six charts need not look through 50 columns of 10,000 runs six
    # times), each column's text codes (services.selection.text_codes: every selection groups the same
    # runs by mostly the same columns), and the selections made, by the shown columns (two charts that
    # draw the same columns share one).
    frames: dict[int, _FrameSeen] = field(default_factory=dict, compare=False, repr=False)

    def select(self, trials: pd.DataFrame, *, shown: Sequence[str]) -> Selection:
        """The trials a chart that draws the ``shown`` columns uses (services.selection.select_configurations)."""
        shown = tuple(name for name in shown if name)
        seen = self.frames.get(id(trials))
        if seen is None or seen.trials is not trials:
            seen = self.frames[id(trials)] = _FrameSeen(
                trials, configuration_parameters(trials, trial_tables.parameter_columns(trials)))
        if shown not in seen.selections:
            seen.selections[shown] = select_configurations(
                trials, shown=list(shown), metric=self.metric, goal=self.goal, parameters=seen.varying,
                handling=self.handling, held=self.held, codes=seen.codes)
        return seen.selections[shown]


@dataclass
class _FrameSeen:
    """What :class:`Handling` keeps of one trials frame during a page run."""

    trials: pd.DataFrame
    varying: list[str]
    codes: dict[str, tuple] = field(default_factory=dict)
    selections: dict[tuple[str, ...], Selection] = field(default_factory=dict)


def other_parameters(trials: pd.DataFrame, *, key: str, metrics: Sequence[str],
                     recorded: Sequence[str] = ()) -> Handling:
    """An expander that says, for each parameter that tells configurations apart, what a chart that
    does not draw it (on an axis, as the colour or as panels) does with it: best (each line at the value
    with the best mean ``metric`` over seeds, the default), held at a chosen value, or averaged (then the
    band spans configurations and the caption says so). ``metrics`` are offered when ``trials`` holds a
    number of them, or when they are ``recorded`` (known to hold one, not read until chosen)."""
    names = configuration_parameters(trials, trial_tables.parameter_columns(trials))
    offered = [name for name in metrics
               if name in recorded or (name in trials and trial_tables.any_number(trials[name]))]
    handling: dict[str, str] = {}
    held: dict[str, object] = {}
    with st.expander("Parameters not on a chart's axes, colour or panels: " + (", ".join(
            f"{name} {st.session_state.get(f'{key}_{name}_handling') or 'best'}" for name in names) or "none"),
            icon=":material/tune:"):
        st.caption("A line's band is over the seeds of one configuration unless a parameter is averaged.")
        metric = st.selectbox("Best means the best mean over seeds of", offered or ["final_val_loss"],
                              key=f"{key}_best_metric")
        for name in names:
            how_column, value_column = st.columns([3, 2])
            how = how_column.segmented_control(name, list(HANDLINGS), default="best", key=f"{key}_{name}_handling",
                                               help=HANDLING_HELP) or "best"
            handling[name] = how
            if how == "held":
                values = list(dict.fromkeys(sorted(trials[name].dropna().tolist(), key=_natural_value)))
                held[name] = value_column.selectbox(f"{name} held at", values, key=f"{key}_{name}_held")
    return Handling(handling, held, metric, goal_of(metric), {id(trials): _FrameSeen(trials, names)})


def goal_of(metric: str) -> str:
    """maximize for accuracies and R², minimize for losses, errors and norms."""
    return "maximize" if any(word in metric for word in ("accuracy", "r2")) else "minimize"


def single_value(trials: pd.DataFrame, column: str, *, vary: str) -> str | None:
    """One sentence in place of a chart whose axis ``column`` has a single value among ``trials``
    (None when it has more): what the axis would show, and what to vary to see it."""
    values = trials[column].dropna().astype(str).unique() if column in trials else []
    if len(values) > 1:
        return None
    value = values[0] if len(values) else "no value"
    return f"Every trial shown has the same {column} ({value}), so there is no curve against it: {vary}."


def _natural_value(value: object) -> tuple[int, float, str]:
    return _natural(str(value))


def keyed_multiselect(label: str, options: Sequence, *, key: str, default: Sequence, **kwargs) -> list:
    """A multiselect that starts at ``default`` once, then keeps the user's choice, dropping any chosen
    value that is no longer offered (a filter changed) instead of failing."""
    options = list(options)
    if key in st.session_state:
        st.session_state[key] = [value for value in st.session_state[key] if value in options]
    else:
        st.session_state[key] = [value for value in default if value in options]
    return st.multiselect(label, options, key=key, **kwargs)


def parents_as_words(trials: pd.DataFrame) -> pd.DataFrame:
    """init_from as words, so a line per parent reads "from trial 12" beside "from scratch" (not 12.0 and nan)."""
    if "init_from" not in trials:
        return trials
    return trials.assign(init_from=["from scratch" if pd.isna(value) else f"from trial {int(value)}"
                                    for value in trials["init_from"]])


def trial_labels(trials: pd.DataFrame, parameters: Sequence[str]) -> dict[int, str]:
    """A label per trial, by trial id: ``trial 3 · width=64, lr=0.01 · overfit``: its ordinal, the
    ``parameters`` (those that vary), its verdict among siblings (else its stored one). Built column
    by column: a row at a time takes seconds on 10,000 trials."""
    # Plain lists, not Series string arithmetic: pandas 3's astype(str) keeps None as a missing value,
    # and "trial 3 · early_stopping=" + None is no label.
    names = [name for name in parameters if name in trials and name != "ordinal"]
    columns = [[f"{name}={value}" for value in trials[name].tolist()] for name in names]
    labels = [f"trial {ordinal}" + (" · " + ", ".join(values) if values else "")
              for ordinal, *values in zip(trials["ordinal"].tolist(), *columns, strict=True)]
    absent = [None] * len(trials)
    sibling, stored = (trials[name].tolist() if name in trials else absent for name in ("sibling_verdict", "verdict"))
    verdicts = [_text(first or second) for first, second in zip(sibling, stored, strict=True)]
    labels = [label + (f" · {verdict}" if verdict else "") for label, verdict in zip(labels, verdicts, strict=True)]
    return dict(zip((int(i) for i in trials["trial_id"]), labels, strict=True))


def configuration_labels(trials: pd.DataFrame, parameters: Sequence[str]) -> pd.Series:
    """One label per trial naming its configuration (every varying parameter but the seed), so runs
    that differ only in their seed share a label."""
    names = [name for name in parameters if name not in ("seed", "ordinal")]
    if not names:
        return pd.Series("all trials", index=trials.index)
    labels = f"{names[0]}=" + _texts(trials[names[0]])
    for name in names[1:]:  # column by column: a row-wise apply takes seconds on 10,000 trials
        labels = labels + f", {name}=" + _texts(trials[name])
    return labels


def _texts(column: pd.Series) -> pd.Series:
    """``column.astype(str)``, a missing value written too ("None", "nan"): pandas 3 keeps it missing,
    and a configuration without a value (grad_clip: [null, 1.0]) had no label, which broke sorting them."""
    texts = column.astype(str)
    missing = texts.isna()
    if missing.any():
        texts = texts.astype(object)
        texts[missing] = [str(value) for value in column[missing]]
    return texts


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


def networks_or_stop(trials: pd.DataFrame, *, page: str) -> None:
    """On an experiment whose every trial is a 2-D test function (no network, no data), one sentence
    in place of a page about networks, pointing to the Loss surfaces page; the page stops there."""
    from services.surfaces import SURFACE_NAMES

    if not trials.empty and "dataset" in trials and trials["dataset"].isin(SURFACE_NAMES).all():
        st.info(f"This experiment optimizes points on 2-D test functions, which have no network, no validation "
                f"set and no fit to diagnose, so {page} does not apply; the Loss surfaces page draws its paths.",
                icon=":material/landscape:")
        st.page_link("app_pages/loss_surfaces.py", label="Open Loss surfaces", icon=":material/landscape:")
        st.stop()


def range_tests(trials: pd.DataFrame) -> pd.Series:
    """Which of ``trials`` are learning-rate range tests (schedule lr_range_test)."""
    return trials["schedule"].eq("lr_range_test") if "schedule" in trials else pd.Series(False, index=trials.index)


def without_range_tests(trained: pd.DataFrame, all_trials: pd.DataFrame, groups: list[str], *, read_at: str,
                        shows: str) -> tuple[pd.DataFrame, list[str]]:
    """``trained`` without its learning-rate range tests, and the parameters a chart can group by among
    the experiment's other trials. A range test's rate rises every step until its loss blows up: its
    epochs compare with no other run's and say nothing of how it fits. One caption says how many were
    left out; where every run of ``trained`` is one, one sentence in place of the charts (where to read
    them: ``read_at``; what the page would show of other runs: ``shows``), and the page stops there."""
    ranged = range_tests(trained)
    if not ranged.any():
        return trained, groups
    if ranged.all():
        every = range_tests(all_trials).all()
        st.info(f"{'Every trial of this experiment' if every else 'Every trial shown'} is a learning-rate range "
                f"test, {read_at}. " + (f"To see {shows}, submit trials with another schedule (constant, step, "
                                         "cosine, ...)." if every else
                                         "This page's charts appear once trials with another schedule finish."))
        st.stop()
    st.caption(f"Range-test runs ({int(ranged.sum())}) are left out of the charts below: their rate rises every "
               "step until the loss blows up, so their epochs compare with no other run's.")
    return trained[~ranged], grouping_choices(all_trials[~range_tests(all_trials)])
