"""Band charts: one mean line and one translucent band per group (over the seeds of one
configuration, unless the page averages a parameter), from the database's per-epoch aggregates
(learning curves, the schedule over the loss) or from final metrics against a parameter (capacity,
sensitivity). A DataFrame in, a figure out; the shared colours, axes and notes are dashboard.charts'."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboard.axes import _axis_range, _note, axis_plan, log_ticks
from dashboard.charts import (
    _MISSING_COLOR,
    ALL_TRIALS,
    SPLIT_DASH,
    SPLIT_NAMES,
    _axis_labels,
    _color_map,
    _figure,
    _format_value,
    _is_number,
    _sort_key,
    _unique,
    _unwrap,
    subplots_layout,
)
from services import analysis
from services.safe_text import plotly_text


def _one_group(frame: pd.DataFrame, color_by: str) -> pd.DataFrame:
    return frame.assign(**{ALL_TRIALS: "all"}) if color_by == ALL_TRIALS else frame


def learning_curve_bands(bands: pd.DataFrame, *, color_by: str, facet: str | None = None, metric: str = "loss",
                         band: str = "std", log_y: bool | None = None, subtitle: str = "",
                         line_notes: dict[Any, str] | None = None) -> go.Figure:
    """Train (solid) and validation (dashed) ``metric`` per epoch: one mean line per value of
    ``color_by`` (one panel per value of ``facet``), with its band.

    ``bands`` is what dashboard.data.curve_bands returns (exact database aggregates): the
    ``color_by`` (and ``facet``) columns, split, epoch, mean, lower, upper, n. ``log_y`` None
    chooses: a log axis when the values span more than two decades. ``subtitle`` says how the
    parameters that are not drawn were handled (services.selection.Selection.describe);
    ``line_notes`` adds to a line's legend entry, by its ``color_by`` value (e.g. its best rate).
    """
    bands = _one_group(bands, color_by)
    return _band_figure(bands, x="epoch", color_by=color_by, facet=facet, band=band, x_title="epoch",
                        y_title=metric, title=f"{metric.replace('_', ' ').capitalize()} per epoch", log_y=log_y,
                        note=subtitle, line_notes=line_notes)


def metric_against(trials: pd.DataFrame, *, x: str, color_by: str, columns: dict[str, str], band: str = "std",
                   title: str | None = None, y_title: str = "loss", gap: bool = False, facet: str | None = None,
                   log_y: bool | None = None, subtitle: str = "") -> go.Figure:
    """A final metric against the parameter ``x`` (e.g. parameter_count for capacity, n_train, weight_decay,
    lr), one line per value of ``color_by`` (one panel per value of ``facet``) with a band over the runs
    that share them. ``columns`` maps a split (train, val) to the trial-table column drawn for it, e.g.
    {"train": "final_train_loss", "val": "final_val_loss"}; train is solid, validation dashed. ``gap``
    adds the generalization gap (validation minus train, per run, then averaged) dotted. Numeric x
    spanning more than a factor of 20 gets a log axis; y as in :func:`learning_curve_bands`."""
    # Only the columns drawn: the split below copies every column it keeps once per split.
    kept = [name for name in _unique([x, color_by, *([facet] if facet else []), *columns.values()]) if name in trials]
    rows = _one_group(trials.loc[trials[x].notna(), kept] if x in trials else trials.iloc[:0][kept], color_by)
    if gap and {"train", "val"} <= set(columns) and {columns["train"], columns["val"]} <= set(rows.columns):
        val = pd.to_numeric(rows[columns["val"]], errors="coerce")
        rows = rows.assign(_gap=val - pd.to_numeric(rows[columns["train"]], errors="coerce"))
        columns = {**columns, "gap": "_gap"}
    long = _by_split(rows, columns)
    long = long[np.isfinite(pd.to_numeric(long["value"], errors="coerce").astype(float))] if len(long) else long
    bands = analysis.seed_bands(long, by=_unique([*([facet] if facet else []), color_by, "split", x]), value="value",
                                band=band)
    values = bands[x].tolist()
    log_x = (len(values) > 0 and all(_is_number(v) and v > 0 for v in values)
             and max(values) / min(values) > 20)
    return _band_figure(bands, x=x, color_by=color_by, facet=facet, band=band, x_title=x, y_title=y_title,
                        title=title or f"{y_title} against {x}", log_x=log_x, log_y=log_y, note=subtitle)


def schedule_over_loss(bands: pd.DataFrame, *, color_by: str, metric: str = "val_loss",
                       subtitle: str = "") -> go.Figure:
    """The learning rate (dotted, right axis) drawn over the mean ``metric`` curve (solid, left axis),
    one colour per value of ``color_by``, so the loss's steps line up with the schedule's. ``bands``
    is dashboard.data.curve_bands with the splits ``loss`` and ``lr`` (the epoch's rate)."""
    colors = _color_map(bands[color_by].tolist() if color_by in bands else [])
    groups = bands.groupby(color_by, sort=False, dropna=False) if len(bands) else []
    traces = []
    for value, rows in sorted(groups, key=lambda item: _sort_key(_unwrap(item[0]))):
        label = _format_value(_unwrap(value))
        color = colors.get(label, _MISSING_COLOR)
        loss, rate = (rows[rows["split"] == split].sort_values("epoch") for split in ("loss", "lr"))
        shown = plotly_text(label)
        traces.append({"type": "scatter", "x": loss["epoch"].tolist(), "y": loss["mean"].tolist(), "mode": "lines",
                       "name": f"{color_by}={shown}", "customdata": loss["n"].tolist(), "line": {"color": color},
                       "legendgroup": label, "xaxis": "x", "yaxis": "y",
                       "hovertemplate": f"{color_by}={shown}<br>epoch %{{x}}<br>mean {metric} %{{y:.4g}} "
                                        "(%{customdata} runs)<extra></extra>"})
        traces.append({"type": "scatter", "x": rate["epoch"].tolist(), "y": rate["mean"].tolist(), "mode": "lines",
                       "name": f"lr ({shown})", "customdata": rate["n"].tolist(),
                       "line": {"color": color, "dash": "dot"}, "legendgroup": label, "showlegend": False,
                       "xaxis": "x", "yaxis": "y2",
                       "hovertemplate": f"{color_by}={shown}<br>epoch %{{x}}<br>learning rate %{{y:.4g}}"
                                        "<extra></extra>"})
    loss_type, loss_range, note = axis_plan(bands.loc[bands["split"] == "loss", "mean"] if len(bands) else [])
    rate_type = axis_plan(bands.loc[bands["split"] == "lr", "mean"] if len(bands) else [])[0]
    layout = subplots_layout(specs=[[{"secondary_y": True}]])
    layout["xaxis"]["title"] = {"text": "epoch"}
    layout["yaxis"].update(title={"text": metric}, type=loss_type,
                           **({"range": _axis_range(loss_type, loss_range)} if loss_range is not None else {}),
                           **(log_ticks(bands.loc[bands["split"] == "loss", "mean"], loss_range)
                              if loss_type == "log" else {}))
    layout["yaxis2"].update(title={"text": "learning rate"}, type=rate_type,
                            tickformat=".2~g")  # "0.4", "0.0069": plotly's log ticks read "120.0114µ" otherwise
    layout.update(title={"text": "Learning-rate schedule over the loss",
                         "subtitle": {"text": f"solid: mean {metric} (left), dotted: learning rate (right). "
                                              + subtitle}},
                  margin={"l": 10, "r": 10, "t": 90, "b": 40}, legend={"title": {"text": color_by}})
    # Built without plotly's per-property validation (our own values): validating each line and
    # layout update took most of the chart's time.
    figure = _figure(traces, layout)
    _note(figure, note)
    return figure


def _band_figure(bands: pd.DataFrame, *, x: str, color_by: str, band: str, x_title: str, y_title: str, title: str,
                 facet: str | None = None, log_x: bool = False, log_y: bool | None = None, note: str = "",
                 line_notes: dict[Any, str] | None = None) -> go.Figure:
    """One translucent band and one mean line per (group, split); train solid, validation dashed; one
    panel per value of ``facet``. The y axis follows :func:`axis_plan`."""
    panels = _axis_labels(bands, facet) if facet and facet in bands else [None]
    columns = min(len(panels), 4)
    grid_rows = -(-len(panels) // columns)
    # Built without plotly's per-property validation (our own arrays and settings): a chart of 20
    # panels x 8 lines of 100 epochs otherwise spends most of its time checking them.
    figure = None if len(panels) == 1 else make_subplots(
        rows=grid_rows, cols=columns, shared_yaxes=True, shared_xaxes=True, horizontal_spacing=0.03,
        vertical_spacing=0.12, subplot_titles=[f"{facet}={panel}" for panel in panels],
        figure=go.Figure(_validate=False))
    colors = _color_map(bands[color_by].tolist() if color_by in bands else [])
    numeric_x = bool(len(bands)) and (_numbers_only(bands[x]) or all(_is_number(v) for v in bands[x]))
    # A band edge below 0 under a positive mean is the std's artefact, not a value: it does not veto a log axis.
    edges = bands["lower"].where((bands["lower"] > 0) | (bands["mean"] <= 0)) if len(bands) else []
    y_type, y_range, y_note = axis_plan(pd.concat([bands["mean"], bands["upper"], edges]) if len(bands) else [],
                                        log=log_y, points=bands["mean"] if len(bands) else None)
    if y_type == "log" and len(bands):
        # mean - std below 0 has no place on a log axis: the band then starts at the lowest run instead
        # (when the bands carry it), not at an invented floor far below every run. Nor does it reach
        # below the lowest run when mean - std is a hair above 0: on a log axis that drew decades of
        # band under every run, in teeth wherever the std crossed the mean from epoch to epoch.
        floor = float(bands.loc[bands["mean"] > 0, "mean"].min()) / 2 if (bands["mean"] > 0).any() else 1e-12
        lowest = bands["low"].where(bands["low"] > 0, floor) if "low" in bands else floor
        lower = bands["lower"].where(bands["lower"] > 0, lowest)
        if "low" in bands:
            lower = lower.where(~(bands["low"] > lower), bands["low"])
        bands = bands.assign(lower=lower)
    in_legend: set[str] = set()
    notes = {_format_value(value): text for value, text in (line_notes or {}).items()}
    traces: list[dict] = []
    places: list[tuple[int, int]] = []
    panel_of = bands[facet].map(_format_value) if facet else None  # once, not once per panel
    for k, panel in enumerate(panels):
        rows_of_panel = bands[panel_of == panel] if facet else bands
        row, col = k // columns + 1, k % columns + 1
        groups = rows_of_panel.groupby(_unique([color_by, "split"]), sort=False, dropna=False) \
            if len(rows_of_panel) else []
        for (value, split), rows in sorted(groups, key=lambda item: (_sort_key(item[0][0]), item[0][1])):
            label = _format_value(value)
            color = colors.get(label, _MISSING_COLOR)
            rows = rows.sort_values(x, key=lambda c: c.map(_sort_key)) if not numeric_x else rows.sort_values(x)
            # Arrays where they can be: plotly validates a list one value at a time.
            xs = rows[x].to_numpy() if numeric_x else np.array([_format_value(v) for v in rows[x]], dtype=object)
            if split != "gap" and (rows["upper"] > rows["lower"]).any():  # a band on the gap would hide the rest
                traces.append(dict(
                    type="scatter", x=np.concatenate([xs, xs[::-1]]),
                    y=np.concatenate([rows["upper"].to_numpy(dtype=float), rows["lower"].to_numpy(dtype=float)[::-1]]),
                    fill="toself",
                    fillcolor=_translucent(color), line={"width": 0}, hoverinfo="skip", showlegend=False,
                    legendgroup=label, mode="lines"))
                places.append((row, col))
            traces.append(dict(
                type="scatter", x=xs, y=rows["mean"].to_numpy(dtype=float), customdata=rows["n"].to_numpy(),
                mode="lines+markers" if len(xs) < 30 else "lines",
                line={"color": color, "dash": SPLIT_DASH.get(split, "solid"), "width": 2}, marker={"size": 5},
                name=ALL_TRIALS if color_by == ALL_TRIALS else f"{color_by}={plotly_text(label)}"
                + (f" ({plotly_text(notes[label])})" if label in notes else ""), legendgroup=label,
                showlegend=label not in in_legend,
                hovertemplate=(f"{color_by}={plotly_text(label)}<br>{x_title} %{{x}}<br>"
                               f"{SPLIT_NAMES.get(split, split)} "
                               f"{y_title} %{{y:.4g}} (mean of %{{customdata}} runs)<extra></extra>")))
            places.append((row, col))
            in_legend.add(label)
    subtitle = f"{_line_styles(bands)}band: {analysis.BANDS[band]} over the runs of each line. {note}".strip()
    layout = {"title": {"text": title, "subtitle": {"text": subtitle}}, "margin": {"l": 10, "r": 10, "t": 90, "b": 40},
              "legend": {"title": {"text": color_by}}, "hovermode": "closest",
              "height": 450 if len(panels) <= 4 else 300 * (-(-len(panels) // columns)) + 100}
    x_axis = {"type": "log" if log_x else ("linear" if numeric_x else "category"),
              **(log_ticks(bands[x]) if log_x and numeric_x and len(bands) else {})}
    axis_range = _axis_range(y_type, y_range)
    y_axis = {"type": y_type, **({"range": axis_range} if axis_range is not None else {}),
              **(log_ticks(pd.concat([bands["mean"], bands["upper"], bands["lower"]]), y_range)
                 if y_type == "log" and len(bands) else {})}
    if len(panels) == 1:
        # One panel, built as plain dicts (_figure): plotly's updates checked each property of the
        # layout and axes, a third of the chart's time.
        figure = _figure(traces, {**layout, "xaxis": {**x_axis, "title": {"text": x_title}},
                                  "yaxis": {**y_axis, "title": {"text": y_title}}})
    else:
        if traces:  # at once: one add_scatter per trace re-validates the figure each time
            figure.add_traces(traces, rows=[row for row, _ in places], cols=[col for _, col in places])
        figure.update_layout(**layout)
        figure.update_xaxes(**x_axis)
        figure.update_yaxes(**y_axis)
        figure.update_xaxes(title_text=x_title, row=grid_rows)
        figure.update_yaxes(title_text=y_title, col=1)
    _note(figure, y_note)
    return figure


def _numbers_only(column: pd.Series) -> bool:
    """A numpy integer or float column: every value is a number (NaN too) without asking each one."""
    return isinstance(column.dtype, np.dtype) and column.dtype.kind in "iuf"


def _line_styles(bands: pd.DataFrame) -> str:
    """The legend of line styles, for the splits a band chart draws: "solid: train, dashed: validation; "."""
    splits = set(bands["split"]) if "split" in bands else set()
    styles = [f"{name}: {SPLIT_NAMES[split]}" for split, name in
              (("train", "solid"), ("val", "dashed"), ("gap", "dotted")) if split in splits]
    return "; ".join(styles) + "; " if styles else ""


def _by_split(frame: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Long format: one row per input row and split, the split's column as ``value``."""
    parts = [frame.drop(columns=[c for c in columns.values() if c in frame]).assign(split=split, value=frame[column])
             for split, column in columns.items() if column in frame]
    return pd.concat(parts, ignore_index=True) if parts else frame.iloc[:0].assign(split=[], value=[])


def _translucent(color: str, alpha: float = 0.18) -> str:
    if color.startswith("#") and len(color) == 7:
        red, green, blue = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    else:  # "rgb(r, g, b)" from sample_colorscale
        red, green, blue = (int(float(part)) for part in color[color.index("(") + 1:-1].split(",")[:3])
    return f"rgba({red}, {green}, {blue}, {alpha})"
