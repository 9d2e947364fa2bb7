"""Charts of how the gradient moves through training: the learning-rate range test (loss against
the rate, per optimizer) and each layer's gradient norm (against depth for one trial; the first
layer's over the last's across activations and depths). A DataFrame or readings in, a figure out."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from dashboard.axes import log_ticks
from dashboard.charts import _color_map, _format_value, _sort_key
from services.range_test import RangeTestReading
from services.safe_text import plotly_text

_MARGIN = {"l": 10, "r": 10, "t": 70, "b": 40}


def range_test_chart(tests: list[tuple[object, RangeTestReading]], *, color_by: str) -> go.Figure:
    """Loss against learning rate (log x) of each range test, coloured by its ``color_by`` value: the
    batch losses faint, their smoothing solid, ▼ at the steepest descent (the suggested rate) and ●
    at the minimum. The y axis spans the smoothed curves up to a little above where they started,
    so the blow-up at the end does not flatten the part that matters."""
    colors = _color_map([value for value, _ in tests])
    figure = go.Figure()
    shown: set[str] = set()
    for value, reading in tests:
        label = _format_value(value)
        color = colors.get(label, "#7f7f7f")
        first = label not in shown
        shown.add(label)
        name = plotly_text(label)
        figure.add_scatter(x=reading.lr, y=reading.loss, mode="lines", line={"color": color, "width": 1},
                           opacity=0.25, legendgroup=label, showlegend=False, hoverinfo="skip")
        figure.add_scatter(x=reading.lr, y=reading.smoothed, mode="lines", line={"color": color, "width": 2.5},
                           name=name, legendgroup=label, showlegend=first,
                           hovertemplate=f"{name}<br>lr %{{x:.3g}}<br>smoothed loss %{{y:.4g}}<extra></extra>")
        if reading.steepest_lr is not None:
            figure.add_scatter(x=[reading.steepest_lr], y=[reading.steepest_loss], mode="markers",
                               marker={"symbol": "triangle-down", "size": 14, "color": color,
                                       "line": {"color": "black", "width": 1}},
                               legendgroup=label, showlegend=False,
                               hovertemplate=f"{name}<br>steepest descent: lr %{{x:.3g}} (suggested)<extra></extra>")
        figure.add_scatter(x=[reading.minimum_lr], y=[reading.minimum_loss], mode="markers",
                           marker={"symbol": "circle", "size": 11, "color": color,
                                   "line": {"color": "black", "width": 1}},
                           legendgroup=label, showlegend=False,
                           hovertemplate=f"{name}<br>minimum: lr %{{x:.3g}}, loss %{{y:.4g}}<extra></extra>")
    for symbol, text in (("triangle-down", "steepest descent (suggested rate)"), ("circle", "minimum loss")):
        figure.add_scatter(x=[None], y=[None], mode="markers", name=text,
                           marker={"symbol": symbol, "size": 11, "color": "white",
                                   "line": {"color": "black", "width": 1}})
    figure.update_layout(
        title={"text": "Learning-rate range test: loss against the rate",
               "subtitle": {"text": "the rate rises every step; faint: each batch's loss, solid: smoothed"}},
        xaxis={"title": "learning rate (log scale)", "type": "log", "dtick": 1, "exponentformat": "power"},
        yaxis={"title": "training batch loss", "range": _loss_range(tests)},
        margin=_MARGIN, hovermode="closest", legend={"title": {"text": color_by}})
    return figure


def _loss_range(tests: list[tuple[object, RangeTestReading]]) -> list[float] | None:
    if not tests:
        return None
    low = min(reading.minimum_loss for _, reading in tests)
    high = max(max(reading.smoothed[: max(1, len(reading.smoothed) // 10)]) for _, reading in tests)
    pad = 0.08 * (high - low) if high > low else 0.1 * max(abs(high), 1e-3)
    return [max(0.0, low - pad) if low >= 0 else low - pad, high + 3 * pad]


def layer_norms_chart(norms: pd.DataFrame, *, epochs: list[int]) -> go.Figure:
    """One trial's gradient norm of each Linear layer (x: 1 = next to the input; log y), one line per
    epoch of ``epochs`` (early dark, late light). ``norms`` has epoch, layer and grad_norm."""
    figure = go.Figure()
    chosen = sorted(epochs)
    palette = sample_colorscale("Viridis", np.linspace(0.0, 0.85, len(chosen)).tolist()) if len(chosen) > 1 else [
        "#1f77b4"]
    for epoch, color in zip(chosen, palette, strict=True):
        rows = norms[norms["epoch"] == epoch].sort_values("layer")
        positive = rows[rows["grad_norm"] > 0]
        figure.add_scatter(x=positive["layer"].tolist(), y=positive["grad_norm"].tolist(), mode="lines+markers",
                           name=f"epoch {epoch}", line={"color": color, "width": 2}, marker={"size": 7},
                           hovertemplate=f"epoch {epoch}<br>layer %{{x}}<br>gradient norm %{{y:.3g}}<extra></extra>")
    layers = int(norms["layer"].max()) if len(norms) else 1
    figure.update_layout(
        title={"text": "Gradient norm of each layer",
               "subtitle": {"text": "layer 1 takes the input, the last gives the output; log scale, at each "
                                    "epoch's last step"}},
        xaxis={"title": "layer (input → output)", "tickmode": "array", "tickvals": list(range(1, layers + 1)),
               "ticktext": _layer_ticks(layers)},
        # automargin: the powers of ten are wider than plain ticks, and the title was cut at the left edge.
        yaxis={"title": "gradient L2 norm", "type": "log", "exponentformat": "power", "automargin": True},
        margin=_MARGIN, hovermode="closest")
    return figure


def _layer_ticks(layers: int) -> list[str]:
    return [f"{i}<br>input" if i == 1 and layers > 1 else f"{i}<br>output" if i == layers else str(i)
            for i in range(1, layers + 1)]


def depth_ratio_chart(ratios: pd.DataFrame, *, x: str = "depth", color_by: str = "activation") -> go.Figure:
    """The first layer's gradient norm over the last layer's (log y) against ``x``, one line per
    ``color_by`` value: the geometric mean over the seeds, a band from their lowest to their highest.
    ``ratios`` has x, color_by and ratio (one row per trial). 1 means the input layer learns as fast as
    the output; 1e-6, six decades slower."""
    figure = go.Figure()
    usable = ratios[(ratios["ratio"] > 0) & np.isfinite(ratios["ratio"])]
    colors = _color_map(usable[color_by].tolist())
    for value in sorted(usable[color_by].unique(), key=_sort_key):
        label = _format_value(value)
        color = colors.get(label, "#7f7f7f")
        grouped = usable[usable[color_by] == value].groupby(x)["ratio"]
        summary = pd.DataFrame({"mean": grouped.apply(lambda r: float(np.exp(np.log(r).mean()))),
                                "low": grouped.min(), "high": grouped.max(), "n": grouped.size()}).sort_index()
        xs = summary.index.tolist()
        figure.add_scatter(x=xs + xs[::-1], y=summary["high"].tolist() + summary["low"].tolist()[::-1],
                           fill="toself", fillcolor=color, opacity=0.18, line={"width": 0}, mode="lines",
                           legendgroup=label,
                           showlegend=False, hoverinfo="skip")
        name = plotly_text(label)
        figure.add_scatter(x=xs, y=summary["mean"].tolist(), mode="lines+markers", name=name, legendgroup=label,
                           line={"color": color, "width": 2.5}, marker={"size": 8},
                           customdata=summary[["low", "high", "n"]].to_numpy(),
                           hovertemplate=(f"{name}<br>{x} %{{x}}<br>first / last layer %{{y:.2g}}<br>seeds: "
                                          "%{customdata[2]}, from %{customdata[0]:.2g} to %{customdata[1]:.2g}"
                                          "<extra></extra>"))
    figure.add_hline(y=1, line={"color": "#7f7f7f", "dash": "dot", "width": 1})
    # (add_hline's own annotation lands at 10**1 on a log axis: placed by hand, at log10(1) = 0)
    figure.add_annotation(x=0, xref="paper", y=0, yref="y", text="equal: the first layer learns as fast as the last",
                          showarrow=False, xanchor="left", yanchor="bottom", font={"color": "#7f7f7f", "size": 11})
    decades = np.log10(usable["ratio"]) if len(usable) else pd.Series([0.0])
    figure.update_layout(
        title={"text": "Do the first layers still learn? First layer's gradient over the last's",
               "subtitle": {"text": "geometric mean over seeds, band: lowest to highest seed; log scale"}},
        xaxis=_x_axis(usable[x], x),
        yaxis={"title": "first layer / last layer gradient norm", "type": "log", "exponentformat": "power", "dtick": 1,
               "range": [math.floor(min(decades.min(), -1)) - 0.2, max(0.5, math.ceil(decades.max()) + 0.2)]},
        margin=_MARGIN, hovermode="closest", legend={"title": {"text": color_by}})
    return figure


def _x_axis(values: pd.Series, title: str) -> dict:
    """A tick per whole number for a few (depth 1..8), a log axis for sizes spanning decades (width 2
    .. 256, labelled at its values; a tick per whole number drew 256 labels on top of each other),
    else plotly's own."""
    numbers = pd.to_numeric(values, errors="coerce")
    if len(numbers) == 0 or numbers.isna().any():
        return {"title": title}
    low, high = float(numbers.min()), float(numbers.max())
    if low > 0 and high / low >= 30:
        distinct = sorted(set(numbers.tolist()))
        ticks = {"tickvals": distinct, "ticktext": [f"{value:g}" for value in distinct]} if len(distinct) <= 8 \
            else log_ticks(numbers)  # a grid's few sizes are their own best labels
        return {"title": title, "type": "log", **ticks}
    if high - low <= 20 and (numbers == numbers.round()).all():
        return {"title": title, "dtick": 1}
    return {"title": title}
