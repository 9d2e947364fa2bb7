"""Plotly figure builders for the dashboard: a DataFrame in, a figure out. No Streamlit calls here,
so every chart can be unit-tested (and reused in a notebook) without a running app."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative, sample_colorscale

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
SPLIT_DASH = {"train": "solid", "val": "dash"}
_MISSING_COLOR = "#7f7f7f"


def progress_bar_chart(experiments: pd.DataFrame) -> go.Figure:
    """One horizontal bar per experiment, stacked by the number of trials in each status.

    ``experiments`` needs the columns ``id`` and ``name`` and one count column per status (a missing
    status column counts as zero). Newest experiments (first rows) are drawn at the top.
    """
    labels = [f"#{row.id} {row.name}" for row in experiments[["id", "name"]].itertuples()]
    figure = go.Figure()
    for status in STATUS_ORDER:
        counts = experiments[status] if status in experiments else pd.Series(0, index=experiments.index)
        figure.add_bar(
            y=labels, x=counts.tolist(), name=status, orientation="h",
            marker_color=STATUS_COLORS[status],
            hovertemplate=f"%{{y}}<br>%{{x}} {status}<extra></extra>",
        )
    figure.update_layout(
        barmode="stack",
        height=120 + 32 * len(labels),
        margin={"l": 10, "r": 10, "t": 30, "b": 30},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "x": 0},
        xaxis={"title": "trials", "rangemode": "tozero"},
        yaxis={"autorange": "reversed", "automargin": True},
    )
    return figure


def learning_curves(epochs: pd.DataFrame, trials: pd.DataFrame, color_by: str, *,
                    metric: str = "loss") -> go.Figure:
    """Train (solid) and validation (dashed) ``metric`` per epoch, one pair of lines per trial,
    coloured by the trial's value of the parameter ``color_by``.

    ``epochs`` has ``trial_id``, ``epoch``, ``train_<metric>`` and ``val_<metric>`` (metric is
    ``loss`` or ``accuracy``); ``trials`` has ``trial_id``, ``ordinal`` and the ``color_by`` column.
    Numeric parameters get an ordered colour scale (small to large), others distinct colours.
    """
    by_trial = trials.set_index("trial_id")
    colors = _color_map(by_trial[color_by].tolist() if color_by in by_trial else [])
    figure = go.Figure()
    in_legend: set[str] = set()
    for trial_id, rows in epochs.sort_values(["trial_id", "epoch"]).groupby("trial_id", sort=True):
        value = by_trial.at[trial_id, color_by] if trial_id in by_trial.index and color_by in by_trial else None
        label = _format_value(value)
        ordinal = by_trial.at[trial_id, "ordinal"] if "ordinal" in by_trial and trial_id in by_trial.index else "?"
        for split, dash in SPLIT_DASH.items():
            figure.add_scatter(
                x=rows["epoch"].tolist(), y=rows[f"{split}_{metric}"].tolist(), mode="lines",
                line={"color": colors.get(label, _MISSING_COLOR), "dash": dash, "width": 1.5},
                name=f"{color_by}={label}", legendgroup=label,
                showlegend=split == "train" and label not in in_legend,
                hovertemplate=(f"trial {ordinal} ({color_by}={label})<br>epoch %{{x}}<br>"
                               f"{split} {metric} %{{y:.4g}}<extra></extra>"),
            )
        in_legend.add(label)
    figure.update_layout(
        title={"text": f"{metric.capitalize()} per epoch",
               "subtitle": {"text": "solid: train, dashed: validation"}},
        margin={"l": 10, "r": 10, "t": 70, "b": 40},
        xaxis={"title": "epoch"},
        yaxis={"title": metric},
        legend={"title": {"text": color_by}},
        hovermode="closest",
    )
    return figure


def _color_map(values: list[Any]) -> dict[str, str]:
    """A colour per distinct value, keyed by its label: an ordered scale for numbers, a palette otherwise."""
    distinct = sorted({_format_value(v): v for v in values if not _is_missing(v)}.items(),
                      key=lambda item: _sort_key(item[1]))
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


def status_badges(counts: dict[str, int] | pd.Series) -> str:
    """Streamlit markdown: one coloured badge per status with trials in it, e.g. ``:green-badge[3 succeeded]``."""
    badges = [f":{STATUS_BADGES[status]}-badge[{int(counts[status])} {status}]"
              for status in STATUS_ORDER if status in counts and int(counts[status])]
    return " ".join(badges) if badges else "no trials"
