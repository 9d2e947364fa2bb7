"""Plotly figure builders for the dashboard: a DataFrame in, a figure out. No Streamlit calls here,
so every chart can be unit-tested (and reused in a notebook) without a running app."""

from __future__ import annotations

import copy
import functools
import json
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

from dashboard.axes import _axis_range, _note, axis_plan, log_ticks
from services import analysis
from services.safe_text import plotly_text

# Left to right in a stacked bar: what has ended well, what is under way, what went wrong.
STATUS_ORDER = ("succeeded", "running", "queued", "diverged", "failed", "cancelled")
# One fixed colour per status, so a status reads the same on every chart and every page. The
# names in STATUS_BADGES are Streamlit's badge colours closest to these.
STATUS_COLORS = {
    "succeeded": "#2ca02c",
    "running": "#1f77b4",
    "queued": "#9e9e9e",
    "diverged": "#ff7f0e",
    "failed": "#d62728",
    "cancelled": "#9467bd",
}
STATUS_BADGES = {
    "succeeded": "green", "running": "blue", "queued": "gray",
    "diverged": "orange", "failed": "red", "cancelled": "violet",
}
SPLIT_DASH = {"train": "solid", "val": "dash", "gap": "dot"}
_MISSING_COLOR = "#7f7f7f"


_LABEL_CHARS = 40  # the most characters of an experiment's name on the progress chart's axis


def progress_bar_chart(experiments: pd.DataFrame) -> go.Figure:
    """One horizontal bar per experiment, stacked by the number of trials in each status.

    ``experiments`` needs the columns ``id`` and ``name`` and one count column per status (a missing
    status column counts as zero). Newest experiments (first rows) are drawn at the top.
    """
    names = [f"#{row.id} {row.name}" for row in experiments[["id", "name"]].itertuples()]
    # A long name would squeeze the bars to nothing: the axis shows its start (the id keeps it unique),
    # the hover the whole of it.
    labels = [plotly_text(name if len(name) <= _LABEL_CHARS else name[:_LABEL_CHARS - 1] + "…") for name in names]
    figure = go.Figure()
    for status in STATUS_ORDER:
        counts = experiments[status] if status in experiments else pd.Series(0, index=experiments.index)
        figure.add_bar(
            y=labels, x=counts.tolist(), name=status, orientation="h",
            marker_color=STATUS_COLORS[status], customdata=[plotly_text(name) for name in names],
            hovertemplate=f"%{{customdata}}<br>%{{x}} {status}<extra></extra>",
        )
    figure.update_layout(
        barmode="stack",
        height=150 + 32 * len(labels),
        margin={"l": 10, "r": 10, "t": 60, "b": 30},  # room above the bars for the legend's two rows
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0},
        xaxis={"title": "trials", "rangemode": "tozero"},
        yaxis={"autorange": "reversed", "automargin": True},
    )
    return figure


def learning_curves(epochs: pd.DataFrame, trials: pd.DataFrame, color_by: str, *,
                    metric: str = "loss", log_y: bool | None = None,
                    epoch_marks: dict[str, int | None] | None = None) -> go.Figure:
    """Train (solid) and validation (dashed) ``metric`` per epoch, one pair of lines per trial,
    coloured by the trial's value of the parameter ``color_by``.

    ``epochs`` has ``trial_id``, ``epoch``, ``train_<metric>`` and ``val_<metric>`` (metric is
    ``loss`` or ``accuracy``); ``trials`` has ``trial_id``, ``ordinal`` and the ``color_by`` column.
    Numeric parameters get an ordered colour scale (small to large), others distinct colours.
    ``log_y`` draws the metric on a log axis; None chooses (:func:`axis_plan`: a log axis for values
    spanning decades, a robust range with a note for a few blow-ups); ``epoch_marks`` draws a labelled
    vertical line at each named epoch (e.g. {"best": 12, "stopped": 22}; None values are skipped).
    """
    by_trial = trials.set_index("trial_id")
    colors = _color_map(by_trial[color_by].tolist() if color_by in by_trial else [])
    # One trace per colour and split, the trials' lines in it separated by gaps (None): the same
    # picture as one trace per trial, with a hundred times fewer traces for plotly to validate and
    # the browser to lay out. Each point's text names its trial for the hover. Arrays, not lists:
    # plotly validates a list one value at a time.
    ordered = epochs.sort_values(["trial_id", "epoch"])
    trial_ids = list(dict.fromkeys(ordered["trial_id"].tolist()))
    labels = {trial_id: _format_value(by_trial.at[trial_id, color_by]
                                      if trial_id in by_trial.index and color_by in by_trial else None)
              for trial_id in trial_ids}
    known = "ordinal" in by_trial
    names = {trial_id: f"trial {by_trial.at[trial_id, 'ordinal'] if known and trial_id in by_trial.index else '?'}"
             for trial_id in trial_ids}
    lines: dict[str, dict[str, np.ndarray]] = {}
    for label, rows in ordered.groupby(ordered["trial_id"].map(labels), sort=False):
        # The label's trials one after the other, a NaN after each trial's last epoch (a gap).
        ids = rows["trial_id"].to_numpy()
        ends = np.append(np.flatnonzero(ids[1:] != ids[:-1]) + 1, len(ids))
        lines[label] = {
            "x": np.insert(rows["epoch"].to_numpy(dtype=float), ends, np.nan),
            **{split: np.insert(rows[f"{split}_{metric}"].to_numpy(dtype=float), ends, np.nan)
               for split in ("train", "val")},
            "text": np.insert(rows["trial_id"].map(names).to_numpy(dtype=object), ends, None)}
    traces = [
        {"type": "scatter", "x": line["x"], "y": line[split],  # gaps: NaN
         "text": line["text"], "mode": "lines", "connectgaps": False,
         "line": {"color": colors.get(label, _MISSING_COLOR), "dash": dash, "width": 1.5},
         "name": _line_name(color_by, label), "legendgroup": label, "showlegend": split == "train",
         "hovertemplate": ("%{text}" + ("" if color_by == "ordinal" else f" ({_line_name(color_by, label)})")
                           + f"<br>epoch %{{x}}<br>{split} {metric} %{{y:.4g}}<extra></extra>")}
        for label, line in lines.items() for split, dash in (("train", "solid"), ("val", "dash"))
    ]
    columns = [f"{split}_{metric}" for split in ("train", "val") if f"{split}_{metric}" in epochs]
    y_type, y_range, note = axis_plan(epochs[columns].to_numpy() if columns else [], log=log_y)
    axis_range = _axis_range(y_type, y_range)
    # Plain dicts (_figure), in the form plotly's checks would have given them: checking 100 trials'
    # points and hover texts took half the chart's time.
    figure = _figure(traces, {
        "title": {"text": f"{metric.capitalize()} per epoch", "subtitle": {"text": "solid: train, dashed: validation"}},
        "margin": {"l": 10, "r": 10, "t": 70, "b": 40},
        "xaxis": {"title": {"text": "epoch"}},
        "yaxis": {"title": {"text": metric}, "type": y_type,
                  **({"range": axis_range} if axis_range is not None else {}),
                  **(log_ticks(epochs[columns].to_numpy(), y_range) if y_type == "log" and columns else {})},
        "legend": {"title": {"text": "" if color_by == "ordinal" else color_by}},
        "hovermode": "closest",
    })
    _note(figure, note)
    _mark_epochs(figure, epoch_marks)
    return figure


def _line_name(color_by: str, label: str) -> str:
    """A legend entry: ``lr=0.1``; a trial's own line (coloured by ordinal) reads ``trial 3``."""
    return f"trial {plotly_text(label)}" if color_by == "ordinal" else f"{color_by}={plotly_text(label)}"


def norm_curves(epochs: pd.DataFrame, *, epoch_marks: dict[str, int | None] | None = None) -> go.Figure:
    """One trial's gradient norm (of each epoch's last step, before clipping) and weight norm per
    epoch, on a log axis: a gradient norm falling by decades means vanishing gradients, one climbing
    means exploding ones; weight decay and L1 show as a smaller weight norm. ``epochs`` has epoch,
    grad_norm and weight_norm."""
    figure = go.Figure()
    for column, color, name in (("grad_norm", "#d62728", "gradient norm"), ("weight_norm", "#1f77b4", "weight norm")):
        if column in epochs and epochs[column].notna().any():
            rows = epochs.sort_values("epoch")
            figure.add_scatter(x=rows["epoch"].tolist(), y=rows[column].tolist(), mode="lines", name=name,
                               line={"color": color, "width": 2},
                               hovertemplate=f"epoch %{{x}}<br>{name} %{{y:.4g}}<extra></extra>")
    figure.update_layout(title={"text": "Gradient and weight norms", "subtitle": {"text": "L2 norms, log scale"}},
                         margin={"l": 10, "r": 10, "t": 70, "b": 40}, xaxis={"title": "epoch"},
                         yaxis={"title": "L2 norm", "type": "log"}, hovermode="closest")
    _mark_epochs(figure, epoch_marks)
    return figure


def _mark_epochs(figure: go.Figure, marks: dict[str, int | None] | None) -> None:
    """A dotted vertical line at each named epoch, labelled inside the plot's top edge (above it, the
    label ran into the title's subtitle); a second label sits one line lower, clear of the first."""
    for k, (label, epoch) in enumerate((name, epoch) for name, epoch in (marks or {}).items() if epoch):
        figure.add_vline(x=int(epoch), line={"color": "#7f7f7f", "dash": "dot", "width": 1})
        figure.add_annotation(x=int(epoch), xref="x", y=1, yref="paper", yanchor="top", yshift=-2 - 20 * k,
                              xanchor="left", xshift=3, text=f"{label} (epoch {int(epoch)})", showarrow=False,
                              font={"size": 11, "color": "#555555"}, bgcolor="rgba(255, 255, 255, 0.8)")


def _color_map(values: list[Any]) -> dict[str, str]:
    """A colour per distinct value, keyed by its label: an ordered scale for numbers, a palette otherwise."""
    distinct = sorted({label: v for label, v in zip(_format_values(values), values, strict=True)
                       if not _is_missing(v)}.items(), key=lambda item: _sort_key(item[1]))
    if not distinct:
        return {}
    if all(_is_number(value) for _, value in distinct) and len(distinct) > 1:
        # Stop short of Viridis' pale yellow end, which is hard to see on a white background.
        palette = sample_colorscale("Viridis", np.linspace(0.0, 0.85, len(distinct)).tolist())
    else:
        palette = [qualitative.Plotly[i % len(qualitative.Plotly)] for i in range(len(distinct))]
    return {label: color for (label, _), color in zip(distinct, palette, strict=True)}


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _sort_key(value: Any) -> tuple[int, float, str]:
    return (0, float(value), "") if _is_number(value) else (1, 0.0, str(value))


def _format_value(value: Any) -> str:
    if _is_missing(value):
        return "n/a"
    if _is_number(value) and not isinstance(value, numbers.Integral):
        return f"{float(value):g}"
    return str(value)


def _format_values(values: Iterable[Any]) -> list[str]:
    """:func:`_format_value` of each value, each distinct one (by type and value) written once: a
    chart labels thousands of rows with a handful of values. A zero is written each time (-0.0 equals
    0.0 but reads "-0"), and so is a value that cannot be a key."""
    written: dict[tuple[type, Any], str] = {}
    labels = []
    for value in values:
        try:
            key = None if value == 0 else (type(value), value)
            label = written.get(key) if key is not None else None
        except (TypeError, ValueError):  # unhashable, or no plain truth value
            key = label = None
        if label is None:
            label = _format_value(value)
            if key is not None:
                written[key] = label
        labels.append(label)
    return labels


def status_badges(counts: dict[str, int] | pd.Series) -> str:
    """Streamlit markdown: one coloured badge per status with trials in it, e.g. ``:green-badge[3 succeeded]``."""
    badges = [f":{STATUS_BADGES[status]}-badge[{int(counts[status])} {status}]"
              for status in STATUS_ORDER if status in counts and int(counts[status])]
    return " ".join(badges) if badges else "no trials"


# --- the analysis pages: seed bands, capacity, heatmaps, verdicts, predictions ---------------------
# Builders below take the raw trial table or epoch rows, aggregate through services.analysis (so the
# numbers are the ones the unit tests check) and ship one line and one band per group, never one
# line per trial: a page over 1,000 trials draws a few hundred points. The band charts (learning
# curves, metric against a parameter, the schedule) are in dashboard/band_charts.py.

VERDICT_ORDER = ("underfit", "not_converged", "good_fit", "overfit", "diverged")
VERDICT_COLORS = {
    "underfit": "#4c78a8",       # blue: too little capacity or data fit
    "not_converged": "#e6b800",  # amber: still learning, more epochs first
    "good_fit": "#2ca02c",       # green
    "overfit": "#d62728",        # red: memorised, does not generalise
    "diverged": "#3b3b3b",       # near-black: the loss blew up
}
SPLIT_NAMES = {"train": "train", "val": "validation", "gap": "generalization gap (val - train)"}
ALL_TRIALS = "all trials"  # a color_by that draws every trial as one group


def importance_bars(shares: pd.DataFrame, *, metric: str) -> go.Figure:
    """One horizontal bar per varying parameter: the share of the spread of ``metric`` over the runs it
    explains (services.selection.parameter_importance), then the interactions and the seed noise in grey."""
    rows = shares.iloc[::-1]
    colors = ["#9e9e9e" if name in ("interactions", "seed noise") else "#4c78a8" for name in rows["parameter"]]
    figure = go.Figure(go.Bar(x=rows["share"].tolist(), y=rows["parameter"].tolist(), orientation="h",
                              marker_color=colors, text=[f"{share:.0%}" for share in rows["share"]],
                              textposition="outside",
                              hovertemplate="%{y}: %{x:.1%} of the variance<extra></extra>"))
    figure.update_layout(title={"text": f"What moves {metric}", "subtitle": {
                             "text": "share of the variance over all runs; grey: interactions, and seed noise "
                                     "(runs that differ only by their seed)"}},
                         xaxis={"title": "share of the variance", "tickformat": ".0%", "range": [0, 1.12]},
                         yaxis={"type": "category"}, height=140 + 34 * len(rows),
                         margin={"l": 10, "r": 10, "t": 70, "b": 40})
    return figure


def metric_heatmap(trials: pd.DataFrame, *, x: str, y: str, metric: str) -> go.Figure:
    """The mean of ``metric`` in each cell of the ``x`` by ``y`` grid (over seeds and any other
    parameter), written in the cell; the count of runs is in the hover text."""
    if metric in trials:  # a copy of the metric, so that it may also be an axis (parameter_count, say)
        cells = analysis.seed_bands(trials.assign(_metric=trials[metric]), by=_unique([x, y]), value="_metric")
    else:
        cells = pd.DataFrame()
    x_labels, y_labels = _axis_labels(cells, x), _axis_labels(cells, y)
    z = np.full((len(y_labels), len(x_labels)), np.nan)
    counts = np.zeros_like(z)
    for cell in cells.to_dict("records"):
        i, j = y_labels.index(_format_value(cell[y])), x_labels.index(_format_value(cell[x]))
        z[i, j], counts[i, j] = cell["mean"], cell["n"]
    figure = go.Figure(go.Heatmap(
        x=x_labels, y=y_labels, z=z.tolist(), customdata=counts.tolist(), colorscale="Viridis",
        texttemplate="%{z:.3g}", colorbar={"title": {"text": metric}},
        hovertemplate=f"{x}=%{{x}}<br>{y}=%{{y}}<br>mean {metric} %{{z:.4g}} over %{{customdata}} runs<extra></extra>",
    ))
    figure.update_layout(title={"text": f"Mean {metric}"}, xaxis={"title": x, "type": "category"},
                         yaxis={"title": y, "type": "category"}, margin={"l": 10, "r": 10, "t": 50, "b": 40})
    return figure


def verdict_grid(trials: pd.DataFrame, *, x: str, y: str, verdict: str = "sibling_verdict") -> go.Figure:
    """A colour-coded grid over two parameters: each cell takes the most common verdict of its trials
    (seeds and other parameters), in VERDICT_COLORS, and says how many of them share it."""
    judged = trials[trials[verdict].isin(VERDICT_ORDER)] if verdict in trials else trials.iloc[:0]
    x_labels, y_labels = _axis_labels(judged, x), _axis_labels(judged, y)
    z = np.full((len(y_labels), len(x_labels)), np.nan)
    text = [["" for _ in x_labels] for _ in y_labels]
    for key, cell in judged.groupby(_unique([x, y]), sort=False, dropna=False):
        x_value, y_value = key[0], key[-1]  # one key when x and y are the same parameter
        counts = cell[verdict].value_counts()
        # The most common verdict; a tie goes to the worse one (later in VERDICT_ORDER), to be safe.
        top = max(counts.index, key=lambda name: (counts[name], VERDICT_ORDER.index(name)))
        i, j = y_labels.index(_format_value(y_value)), x_labels.index(_format_value(x_value))
        z[i, j] = VERDICT_ORDER.index(top)
        text[i][j] = f"{top.replace('_', ' ')} {counts[top]}/{len(cell)}"
    steps = len(VERDICT_ORDER)
    # A stepped colour scale: verdict k (0..4) fills the interval [k/5, (k+1)/5] with its colour.
    colorscale = [[edge, VERDICT_COLORS[name]] for k, name in enumerate(VERDICT_ORDER)
                  for edge in (k / steps, (k + 1) / steps)]
    figure = go.Figure(go.Heatmap(
        x=x_labels, y=y_labels, z=z.tolist(), text=text, texttemplate="%{text}", zmin=-0.5, zmax=steps - 0.5,
        colorscale=colorscale, xgap=2, ygap=2, hovertemplate=f"{x}=%{{x}}<br>{y}=%{{y}}<br>%{{text}}<extra></extra>",
        colorbar={"tickvals": list(range(steps)), "ticktext": [name.replace("_", " ") for name in VERDICT_ORDER]},
    ))
    figure.update_layout(title={"text": "Fit verdict", "subtitle": {"text": "most common verdict among the cell's "
                                                                            "trials, judged among siblings"}},
                         xaxis={"title": x, "type": "category"}, yaxis={"title": y, "type": "category"},
                         margin={"l": 10, "r": 10, "t": 70, "b": 40})
    return figure


PREDICTION_KINDS = ("curve_1d", "boundary_2d")  # the artifacts that picture what a model learned


def prediction_panels(artifacts: dict[int, dict[str, dict]], titles: dict[int, str]) -> go.Figure:
    """Side by side, one panel per trial: the fitted 1-D curve against the truth and the training points
    (``curve_1d``), or the 2-D decision regions with the training points (``boundary_2d``). Trials
    without such an artifact are left out."""
    shown = [(trial_id, kinds) for trial_id, kinds in artifacts.items()
             if any(kind in kinds for kind in PREDICTION_KINDS)]
    # Plain trace and layout dicts, without plotly's per-property validation (the artifacts' own numbers
    # and our colours): the 300 training points' colours were checked one by one, in every panel, and
    # make_subplots' layout was built again on every page run. The panels' titles are set on the kept
    # layout's (their place does not depend on their text); an empty title has none, as make_subplots does.
    titled = [titles.get(trial_id, f"trial {trial_id}") for trial_id, _ in shown]
    layout = subplots_layout(rows=1, cols=max(len(shown), 1), horizontal_spacing=0.04,
                             subplot_titles=["title"] * len(shown))
    notes = [{**note, "text": text} for note, text in zip(layout.pop("annotations", []), titled, strict=True) if text]
    if notes:
        layout["annotations"] = notes
    traces = []
    for column, (_, kinds) in enumerate(shown, start=1):
        added = (_curve_1d_traces(kinds["curve_1d"]) if "curve_1d" in kinds
                 else _boundary_2d_traces(kinds["boundary_2d"]))
        axes = {"xaxis": f"x{column if column > 1 else ''}", "yaxis": f"y{column if column > 1 else ''}"}
        traces += [{**trace, **axes} for trace in added]
    layout.update(height=360, margin={"l": 10, "r": 10, "t": 40, "b": 30}, showlegend=False)
    return _figure(traces, layout)


def epochs_to_target_bars(reached: pd.Series, trials: pd.DataFrame, *, target: float, x: str, color_by: str,
                          column: str = "val_loss") -> go.Figure:
    """Mean epochs to reach ``column`` <= ``target`` per ``x`` and ``color_by``, among the trials that
    reached it; each bar says how many of its trials did. A group where none did has no bar: its slot
    says "none reached (0/N)", so that the gap is not read as zero epochs; where no group of an ``x``
    value did, one note over it says "none reached" with the count of all its runs.

    ``reached`` is the first epoch at the target per trial id (services.analysis.epochs_to_target, or
    the database's aggregate of the same rule); trials of ``trials`` missing from it never got there.
    """
    merged = trials[_unique(["trial_id", x, color_by])].merge(
        reached.rename("epochs_to_target").rename_axis("trial_id").reset_index(), on="trial_id", how="left")
    summary = merged.groupby(_unique([color_by, x]), sort=False, dropna=False)["epochs_to_target"].agg(
        ["mean", "count", "size"]).reset_index()
    summary["text"] = [f"{int(got)}/{int(of)}" for got, of in zip(summary["count"], summary["size"], strict=True)]
    summary["none_text"] = [f"none reached (0/{int(of)})" for of in summary["size"]]
    return _grouped_bars(summary, x=x, color_by=color_by, value="mean", text="text", empty_text="none_text",
                         empty_note=lambda rows: f"none<br>reached<br>(0/{int(rows['size'].sum())})",
                         title=f"Epochs until {column} <= {target:g}", y_title="epochs (mean of those that got there)")


def divergence_bars(trials: pd.DataFrame, *, x: str, color_by: str) -> go.Figure:
    """Two rows of grouped bars per ``x`` and ``color_by`` (services.analysis.divergence_rate): on top
    the share of trained trials that diverged, below the share that was unstable (the loss once rose
    above UNSTABLE_RATIO x its baseline, then came back), in the same colours."""
    rates = analysis.divergence_rate(trials, by=_unique([color_by, x]))
    colors = _color_map(rates[color_by].tolist() if color_by in rates else [])
    groups = rates.groupby(color_by, sort=False, dropna=False) if len(rates) else []
    traces = []
    for group, rows in sorted(groups, key=lambda item: _sort_key(_unwrap(item[0]))):
        label = _format_value(_unwrap(group))
        rows = rows.sort_values(x, key=lambda column: column.map(_sort_key))
        xs = [_format_value(v) for v in rows[x]]
        for row, (share, count) in enumerate((("rate", "diverged"), ("unstable_rate", "unstable")), start=1):
            text = [f"{int(k)}/{int(n)}" for k, n in zip(rows[count], rows["trials"], strict=True)]
            traces.append({"type": "bar", "x": xs, "y": rows[share].tolist(), "text": text,
                           "name": f"{color_by}={plotly_text(label)}", "legendgroup": label, "showlegend": row == 1,
                           "marker": {"color": colors.get(label, _MISSING_COLOR)},
                           "hovertemplate": f"{color_by}={plotly_text(label)}<br>{x}=%{{x}}<br>{count}: %{{text}}"
                                            "<extra></extra>",
                           "xaxis": "x" if row == 1 else "x2", "yaxis": "y" if row == 1 else "y2"})
    layout = subplots_layout(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.16, subplot_titles=[
        "diverged (the loss became NaN or infinite)",
        f"unstable (rose above {analysis.UNSTABLE_RATIO:g}x its baseline, then came back)"])
    for note in layout["annotations"]:
        note.update(x=0, xanchor="left", font={"size": 12})  # the panels' titles fit a column
    # In the values' order, not in the order the colours first show them (0.001, 0.1, 0.01 when the
    # first colour lacks 0.01).
    categories = {"type": "category", "categoryorder": "array", "categoryarray": _axis_labels(rates, x)}
    layout["xaxis"].update(categories)
    layout["xaxis2"].update(categories, title={"text": x})
    for axis in ("yaxis", "yaxis2"):
        layout[axis].update(range=[0, 1.05], tickformat=".0%", title={"text": "share of runs"})
    layout.update(barmode="group", title={"text": "Divergence rate", "subtitle": {
                      "text": "share of the trained runs of each bar; the stored verdicts are unchanged"}},
                  # Below the bars, not beside them: beside, it took the width that the second
                  # panel's title needs in a half-page column, and the title ran under it.
                  legend={"title": {"text": color_by}, "orientation": "h", "x": 0, "xanchor": "left",
                          "y": -0.12, "yanchor": "top"}, height=580,
                  margin={"l": 10, "r": 10, "t": 95, "b": 40})
    return _figure(traces, layout)


def subplots_layout(**options: Any) -> dict:
    """The layout plotly's ``make_subplots(**options)`` makes (its axes' domains and anchors, the panel
    titles), without the template: computed once per set of options, a copy each time. A chart built
    from it and plain trace dicts (:func:`_figure`) skips make_subplots' and plotly's checks on every
    page run."""
    return copy.deepcopy(_subplots_layout_kept(json.dumps(options, sort_keys=True)))


@functools.lru_cache(maxsize=256)  # bounded: a faceted chart's options hold its panels' titles
def _subplots_layout_kept(options: str) -> dict:
    layout = make_subplots(**json.loads(options)).layout.to_plotly_json()
    return {key: value for key, value in layout.items() if key != "template"}


def _figure(traces: list[dict], layout: dict) -> go.Figure:
    """A figure from plain trace and layout dicts, without plotly's per-property validation (our own
    values, in plotly's own form): validating each property of a few bar charts took a tenth of a
    page."""
    return go.Figure({"data": traces, "layout": layout}, _validate=False)


def difference_interval(result: analysis.MeanDifference, *, label_a: str, label_b: str, metric: str) -> go.Figure:
    """The mean difference A - B as a point with its 95% confidence interval, beside a line at 0."""
    point = {"type": "scatter", "x": [result.difference], "y": ["A - B"], "mode": "markers",
             "marker": {"size": 12, "color": "#1f77b4"},
             "hovertemplate": f"{metric}: A - B = %{{x:.4g}}<extra></extra>"}
    if result.low is not None and result.high is not None:
        point["error_x"] = {"type": "data", "symmetric": False, "array": [result.high - result.difference],
                            "arrayminus": [result.difference - result.low]}
    return _figure([point], {"title": {"text": f"Mean {metric}: A - B, with its 95% confidence interval",
                                       "subtitle": {"text": f"A: {label_a} · B: {label_b}"}},
                             "height": 220, "margin": {"l": 10, "r": 10, "t": 70, "b": 40},
                             "xaxis": {"title": {"text": metric}},
                             # A dashed line at 0 across the plot (what add_vline(x=0) draws).
                             "shapes": [{"type": "line", "x0": 0, "x1": 0, "xref": "x", "y0": 0, "y1": 1,
                                         "yref": "y domain", "line": {"color": "#7f7f7f", "dash": "dash"}}]})


def points_shipped(figure: go.Figure) -> int:
    """How many data values a figure sends to the browser (x, y, z and text arrays of every trace)."""
    total = 0
    for trace in figure.data:
        for name in ("x", "y", "z"):
            values = getattr(trace, name, None)
            if values is not None and not isinstance(values, str):
                total += int(np.size(np.asarray(values, dtype=object)))
    return total


def _grouped_bars(table: pd.DataFrame, *, x: str, color_by: str, value: str, text: str, title: str,
                  y_title: str, empty_text: str | None = None,
                  empty_note: Callable[[pd.DataFrame], str] = lambda rows: "none") -> go.Figure:
    """One bar per row of ``table``, grouped along ``x``, one colour per ``color_by``, labelled with its
    ``text``. A row without a ``value`` has no bar; with ``empty_text`` (a column), its slot says so:
    the text, written upwards from the axis in an empty bar of the same colour group. Where no row of
    an ``x`` value has a bar, one level note over the whole category says so instead (slot labels side
    by side there ran into one another): ``empty_note`` of that category's rows."""
    colors = _color_map(table[color_by].tolist() if color_by in table else [])
    traces = []
    labels = table[x].map(_format_value) if len(table) else pd.Series(dtype=object)
    all_empty = [] if empty_text is None or not len(table) else [
        label for label, rows in table.groupby(labels, sort=False) if rows[value].isna().all()]
    categories = _axis_labels(table, x)
    # At the category's position, not its label: plotly reads a label that looks like a number ("10")
    # as a position on a category axis, and stretched the axis out to it.
    notes = [{"x": categories.index(label), "y": 0, "xref": "x", "yref": "y", "yanchor": "bottom",
              "showarrow": False, "text": empty_note(table[labels == label]), "font": {"size": 11, "color": "#555555"}}
             for label in all_empty]
    for group, rows in sorted(table.groupby(color_by, sort=False, dropna=False) if len(table) else [],
                              key=lambda item: _sort_key(_unwrap(item[0]))):
        label = _format_value(_unwrap(group))
        rows = rows.sort_values(x, key=lambda column: column.map(_sort_key))
        name, color = f"{color_by}={plotly_text(label)}", colors.get(label, _MISSING_COLOR)
        traces.append({"type": "bar", "x": [_format_value(v) for v in rows[x]], "y": rows[value].tolist(),
                       "text": rows[text].tolist(), "name": name, "marker": {"color": color},
                       # One slot per colour, shared with the empty bars below: a label sits in its gap.
                       "offsetgroup": label, "legendgroup": label,
                       "hovertemplate": (f"{name}<br>{x}=%{{x}}<br>%{{y:.3g}} (%{{text}})<extra></extra>")})
        empty = rows[rows[value].isna() & ~labels[rows.index].isin(all_empty)] if empty_text is not None \
            else rows.iloc[:0]
        if len(empty):
            traces.append({"type": "bar", "x": [_format_value(v) for v in empty[x]], "y": [0] * len(empty),
                           "text": empty[empty_text].tolist(), "textposition": "outside", "textangle": -90,
                           "constraintext": "none",
                           "cliponaxis": False, "marker": {"color": color}, "name": name, "offsetgroup": label,
                           "legendgroup": label, "showlegend": False,
                           "hovertemplate": f"{name}<br>{x}=%{{x}}<br>%{{text}}<extra></extra>"})
    return _figure(traces, {"barmode": "group", "title": {"text": title},
                            "xaxis": {"title": {"text": x}, "type": "category", "categoryorder": "array",
                                      "categoryarray": categories},
                            "yaxis": {"title": {"text": y_title}}, "legend": {"title": {"text": color_by}},
                            "annotations": notes, "margin": {"l": 10, "r": 10, "t": 50, "b": 40}})


def _curve_1d_traces(curve: dict) -> list[dict]:
    traces = [dict(type="scatter", x=curve["train_x"], y=curve["train_y"], mode="markers", name="training points",
                   marker={"size": 4, "color": "#9e9e9e"})]
    if curve.get("y_true"):
        traces.append(dict(type="scatter", x=curve["x"], y=curve["y_true"], mode="lines", name="truth",
                           line={"color": "#000000", "dash": "dash"}))
    traces.append(dict(type="scatter", x=curve["x"], y=curve["y_pred"], mode="lines", name="model",
                       line={"color": "#d62728", "width": 2.5}))
    return traces


def _boundary_2d_traces(boundary: dict) -> list[dict]:
    (x_low, x_high), (y_low, y_high), n = boundary["x_range"], boundary["y_range"], boundary["resolution"]
    classes = boundary["classes"] or [0]
    palette = [qualitative.Plotly[k % len(qualitative.Plotly)] for k in range(len(classes))]
    scale = [[edge, palette[k]] for k in range(len(classes))
             for edge in (k / len(classes), (k + 1) / len(classes))]
    # Cell centres as stored: column j is x_low + j * step, row i likewise in y (artifacts.py's grid).
    xs, ys = np.linspace(x_low, x_high, n).round(3).tolist(), np.linspace(y_low, y_high, n).round(3).tolist()
    return [dict(type="heatmap", x=xs, y=ys, z=np.asarray(boundary["predicted_class"]), zmin=-0.5,
                 zmax=len(classes) - 0.5, colorscale=scale, opacity=0.35, showscale=False, hoverinfo="skip"),
            dict(type="scatter", x=boundary["train_x"], y=boundary["train_y"], mode="markers", name="training points",
                 marker={"size": 5, "color": [palette[label % len(palette)] for label in boundary["train_label"]],
                         "line": {"width": 0.5, "color": "#ffffff"}})]


def _axis_labels(frame: pd.DataFrame, column: str) -> list[str]:
    values = frame[column].drop_duplicates().tolist() if column in frame else []
    return list(dict.fromkeys(_format_value(v) for v in sorted(values, key=_sort_key)))


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _unwrap(key: Any) -> Any:
    """pandas gives a group key as a 1-tuple when grouping by a list of one column."""
    return key[0] if isinstance(key, tuple) and len(key) == 1 else key
