"""The Loss surfaces page's figure: a 2-D test function's contour with every trial's path on it, one
panel per learning rate (or any parameter), paths coloured by a parameter, the known minima and
saddle points marked. Trials and paths in, figure out; no Streamlit calls.

The contour's levels are log-spaced (the colour is log10 of the value above the function's lowest
value on the grid), so the flat floor of a valley and its steep walls both show structure.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboard.charts import _color_map, _format_value
from services.surfaces import SURFACES

GRID = 140  # contour resolution per axis
MAX_PANELS = 4  # panels per row
_FLOOR = 1e-3  # log10(value - lowest + _FLOOR): levels down to a thousandth above the bottom
_SYMBOLS = {"minimum": "star", "saddle": "x"}
_MARKER_COLORS = {"minimum": "#ffd21f", "saddle": "#111111"}
# Light where the function is low, so the paths (which end there) stand out; distinct strong colours
# for the paths (Plotly's default pairs near-alike reds and greens among seven optimizers).
_CONTOUR_SCALE = [[0.0, "#ffffff"], [1.0, "#b4c3d3"]]
_PATH_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2", "#8c564b",
                "#7f7f7f", "#bcbd22")


def contour_grid(function: str, *, resolution: int = GRID) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(xs, ys, log-levels [y][x], the lowest value on the grid) over the function's drawing range."""
    surface = SURFACES[function]
    xs = np.linspace(*surface.x_range, resolution)
    ys = np.linspace(*surface.y_range, resolution)
    grid_x, grid_y = np.meshgrid(xs, ys)
    values = surface.value(grid_x, grid_y, np.cos)
    lowest = float(min(values.min(), *(surface.value(p.x, p.y, math.cos) for p in surface.minima)))
    return xs, ys, np.log10(values - lowest + _FLOOR), lowest


def surface_paths(trials: pd.DataFrame, paths: dict[int, dict], *, function: str, color_by: str,
                  panel_by: str | None, step: int | None = None, titles: dict[int, str] | None = None) -> go.Figure:
    """One panel per value of ``panel_by`` (all in one when None), each the contour of ``function``
    with the path of every trial of ``trials`` (a ``trial_id`` column and the parameters) up to
    ``step`` (all of it when None): a line from its start (open circle) to where it is (filled dot),
    coloured by ``color_by``. ``paths`` maps trial id to its stored ``path_2d`` artifact."""
    surface = SURFACES[function]
    panels = _panel_values(trials, panel_by)
    columns = min(len(panels), MAX_PANELS)
    rows = math.ceil(len(panels) / columns)
    titles_of = [f"{panel_by} = {_format_value(value)}" if panel_by else "" for value in panels]
    figure = make_subplots(rows=rows, cols=columns, shared_xaxes=True, shared_yaxes=True,
                           horizontal_spacing=0.03, vertical_spacing=0.08)
    xs, ys, levels, lowest = contour_grid(function)
    ticks = [v for v in range(-3, 7) if levels.min() <= v <= levels.max()]
    colors = _path_colors(trials[color_by]) if color_by in trials else {}
    shown_legend: set[str] = set()
    for index, value in enumerate(panels):
        row, column = index // columns + 1, index % columns + 1
        figure.add_trace(go.Contour(
            x=xs, y=ys, z=levels, colorscale=_CONTOUR_SCALE, ncontours=24,
            contours={"coloring": "fill", "showlines": True}, line={"width": 0.6, "color": "#8a9bb0"},
            showscale=index == 0, hoverinfo="skip",
            colorbar={"title": {"text": "f", "side": "top"}, "tickvals": ticks, "len": 0.8,
                      "ticktext": [f"{lowest + 10.0 ** v:.3g}" for v in ticks], "thickness": 10, "x": 1.0},
        ), row=row, col=column)
        chosen = trials if panel_by is None else trials[trials[panel_by].map(_format_value) == _format_value(value)]
        for trial in chosen.itertuples(index=False):
            path = paths.get(int(trial.trial_id))
            if not path:
                continue
            x, y = _up_to(path, step)
            label = _format_value(getattr(trial, color_by)) if color_by in trials else "trial"
            color = colors.get(label, "#444")
            name = (titles or {}).get(int(trial.trial_id), f"trial {trial.trial_id}")
            first = label not in shown_legend
            shown_legend.add(label)
            figure.add_trace(go.Scatter(
                x=x, y=y, mode="lines", line={"color": color, "width": 2}, legendgroup=label, name=label,
                showlegend=first, hovertemplate=f"{name}<br>x=%{{x:.4g}}, y=%{{y:.4g}}<extra></extra>",
            ), row=row, col=column)
            figure.add_trace(go.Scatter(
                x=[x[0], x[-1]], y=[y[0], y[-1]], mode="markers", legendgroup=label, showlegend=False,
                marker={"color": [color, color], "size": [7, 8], "symbol": ["circle-open", "circle"],
                        "line": {"color": color, "width": 1.5}}, hoverinfo="skip",
            ), row=row, col=column)
        for kind, symbol in _SYMBOLS.items():
            points = [p for p in surface.points if p.kind == kind]
            if not points:
                continue
            figure.add_trace(go.Scatter(
                x=[p.x for p in points], y=[p.y for p in points], mode="markers", name=f"known {kind}",
                legendgroup=f"known {kind}", showlegend=index == 0,
                marker={"symbol": symbol, "size": 15 if len(points) < 20 else 7, "color": _MARKER_COLORS[kind],
                        "line": {"color": "#111" if kind == "minimum" else "white", "width": 1}},
                hovertemplate=f"{kind} %{{x:.4g}}, %{{y:.4g}}<extra></extra>",
            ), row=row, col=column)
    figure.update_xaxes(range=list(surface.x_range), constrain="domain")
    figure.update_xaxes(title_text="x", row=rows)
    figure.update_yaxes(range=list(surface.y_range), constrain="domain")
    figure.update_yaxes(title_text="y", col=1)
    for index, title in enumerate(titles_of):  # one unit of x as long as one unit of y: the true shape
        suffix = "" if index == 0 else str(index + 1)
        figure.layout[f"yaxis{suffix}"].scaleanchor = f"x{suffix}"
        if title:  # over the panel as drawn (its domain shrinks to keep the scale), not over its cell
            figure.add_annotation(text=title, showarrow=False, xref=f"x{suffix} domain", yref=f"y{suffix} domain",
                                  x=0.5, y=1.0, yanchor="bottom", font={"size": 14})
    figure.update_layout(
        title={"text": f"{function}: f(x, y) = {surface.formula}", "x": 0.01},
        height=460 * rows + 60 if columns > 1 else 640, margin={"l": 50, "r": 10, "t": 70, "b": 40},
        legend={"title": {"text": color_by}, "x": 1.08, "y": 1.0, "yanchor": "top", "font": {"size": 13}},
        plot_bgcolor="white",
    )
    return figure


def _path_colors(values: pd.Series) -> dict[str, str]:
    """A colour per distinct value, keyed by its label: an ordered scale for numbers (charts' own),
    else one of _PATH_COLORS in the values' order."""
    colors = _color_map(list(values))
    labels = list(colors)
    if any(isinstance(v, str) for v in values):
        colors = {label: _PATH_COLORS[i % len(_PATH_COLORS)] for i, label in enumerate(dict.fromkeys(
            _format_value(v) for v in values))}
    return colors if colors else dict.fromkeys(labels, "#444")


def ends_table(trials: pd.DataFrame, parameters: list[str]) -> pd.DataFrame:
    """Where each run ended: its varying parameters, status, final point and value, what it reached."""
    columns = [c for c in (*parameters, "status", "final_x", "final_y", "final_value", "reached",
                           "distance_to_minimum", "epochs_done") if c in trials]
    table = trials[columns].copy()
    if "reached" in table:
        table["reached"] = [_reached_text(value, status) for value, status in
                            zip(table["reached"], table.get("status", [""] * len(table)), strict=True)]
    return table


def _reached_text(value: Any, status: str) -> str:
    if status == "diverged":
        return "diverged"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "no known point"
    return "saddle point" if value == "saddle" else f"minimum {value}"


def _up_to(path: dict, step: int | None) -> tuple[list[float], list[float]]:
    if step is None:
        return path["x"], path["y"]
    count = max(1, sum(1 for s in path["step"] if s <= step))
    return path["x"][:count], path["y"][:count]


def _panel_values(trials: pd.DataFrame, panel_by: str | None) -> list[Any]:
    if panel_by is None or panel_by not in trials:
        return [None]
    values = {_format_value(v): v for v in trials[panel_by]}
    return [values[k] for k in sorted(values, key=lambda k: (0, float(values[k]), "") if isinstance(
        values[k], int | float) else (1, 0.0, k))]
