"""Value axes that survive blow-ups: a log axis for values spanning decades, else a robust range
with a note under the plot saying what was left out of it (dashboard.charts and dashboard.band_charts
use them)."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go

LOG_DECADES = 2.0  # values spanning more than this many decades get a log axis
OUTLIER_IQRS = 50.0  # a linear axis leaves out values this many interquartile ranges beyond the quartiles
OUTLIER_DECADES = 1.5  # a log axis leaves out values this many decades (at least) above the upper quartile...
OUTLIER_SHARE = 0.05  # ...when they are at most this share of the values (a few blow-ups, not a second bulk)


def axis_plan(values: Any, *, log: bool | None = None, points: Any = None) -> tuple[str, list[float] | None, str]:
    """How a value axis survives blow-ups: (axis type, range or None, a note for the chart or "").

    ``log`` None chooses a log axis for positive values spanning more than LOG_DECADES decades. A
    linear axis whose values include a few far above (or below) the bulk gets a robust range, and
    the note says how many of the ``points`` (default: the values; e.g. the mean lines, when the
    values also hold band edges) lie outside it and how far ("3 points above the range, max 1.2e+10")."""
    finite = _finite(values)
    if finite.size == 0:
        return ("log" if log else "linear"), None, ""
    positive = bool((finite > 0).all())
    decades = float(np.log10(finite.max() / finite.min())) if positive else 0.0
    if log is None and positive and decades > LOG_DECADES:
        value_range, above = _log_range(finite, points)
        if value_range is None:
            return "log", None, f"log scale: the values span {decades:.0f} decades"
        # A few blow-ups (an unstable run's spike in a mean) would squeeze every other line into the
        # bottom decades of a twelve-decade axis: the axis spans the rest, the note counts the spikes.
        return "log", value_range, ("log scale: " + (f"{_points(len(above))} above the range, max {above.max():.3g}"
                                                     if len(above) else "bands cut at the range"))
    if log:
        return "log", None, ""
    # Far outside means 50 interquartile ranges beyond the quartiles: a blow-up, never the first epochs
    # of an ordinary loss curve (1/epoch over 100 epochs stays inside).
    low, high = np.quantile(finite, [0.25, 0.75])
    spread = (high - low) or abs(float(np.median(finite))) or 1e-12
    top, bottom = high + OUTLIER_IQRS * spread, low - OUTLIER_IQRS * spread
    if not ((finite > top) | (finite < bottom)).any():
        return "linear", None, ""
    shown = finite if points is None else _finite(points)
    above, below = shown[shown > top], shown[shown < bottom]
    notes = ([f"{_points(len(above))} above the range, max {above.max():.3g}"] if len(above) else []) + \
            ([f"{_points(len(below))} below it, min {below.min():.3g}"] if len(below) else [])
    inside = finite[(finite >= bottom) & (finite <= top)]
    lowest, highest = inside.min(), inside.max()
    margin = 0.05 * ((highest - lowest) or spread)
    return "linear", [float(lowest - margin), float(highest + margin)], "; ".join(notes) or "bands cut at the range"


def log_ticks(values: Any, value_range: list[float] | None = None) -> dict[str, Any]:
    """Tick marks for a log axis that read at a glance: each decade labelled in full ("0.01", "1e-05"),
    with 2 and 5 between when the axis spans at most LOG_DECADES decades; at most about 10 labels.
    Plotly's own labels the 2s and 5s between decades "2" and "5" alone, so a loss axis read "2, 1, 5,
    2, 0.1" from the top, and "100µ" for 1e-4. ``value_range`` (values, not logs) is the axis's range
    when it has one; {} (plotly's ticks) when fewer than 2 marks fall among the values."""
    if value_range is not None:
        low, high = value_range
    else:
        finite = _finite(values)
        finite = finite[finite > 0]
        if finite.size == 0:
            return {}
        low, high = float(finite.min()), float(finite.max())
    if not 0 < low < high:
        return {}
    first, last = int(np.floor(np.log10(low))), int(np.ceil(np.log10(high)))
    mantissas = (1,) if np.log10(high / low) > LOG_DECADES else (1, 2, 5)
    step = max(1, -(-(last - first) // 10)) if mantissas == (1,) else 1
    # A little beyond the values: plotly pads its range and leaves out the marks outside it.
    ticks = [m * 10.0 ** k for k in range(first, last + 1, step) for m in mantissas
             if low / 2 <= m * 10.0 ** k <= high * 2]
    if sum(low <= tick <= high for tick in ticks) < 2:  # plotly's ticks do better within a decade
        return {}
    return {"tickvals": ticks, "ticktext": [f"{tick:.12g}" for tick in ticks]}


def _log_range(finite: np.ndarray, points: Any) -> tuple[list[float] | None, np.ndarray]:
    """For positive values on a log axis: the range of all but a few far above the rest (more than
    OUTLIER_DECADES, and 3 interquartile ranges, above the upper quartile; at most OUTLIER_SHARE of
    the values), and those of ``points`` (default: the values) above it; (None, []) when none are."""
    logs = np.log10(finite)
    low, high = np.quantile(logs, [0.25, 0.75])
    top = high + max(OUTLIER_DECADES, 3 * (high - low))
    outside = logs > top
    if not outside.any() or outside.mean() > OUTLIER_SHARE:
        return None, np.asarray([])
    inside = finite[~outside]
    pad = (inside.max() / inside.min()) ** 0.04 if inside.max() > inside.min() else 1.5
    shown = finite if points is None else _finite(points)
    shown = shown[shown > 0]
    return [float(inside.min() / pad), float(inside.max() * pad)], shown[np.log10(shown) > top]


def _points(count: int) -> str:
    return f"{count} point" + ("" if count == 1 else "s")


def _finite(values: Any) -> np.ndarray:
    flat = np.ravel(np.asarray(values, dtype=float)) if values is not None else np.asarray([])
    return flat[np.isfinite(flat)]


def _axis_range(axis_type: str, value_range: list[float] | None) -> list[float] | None:
    if value_range is None:
        return None
    return [float(np.log10(v)) for v in value_range] if axis_type == "log" else value_range


def _note(figure: go.Figure, text: str) -> None:
    """A note under the plot, right-aligned below the axis titles (what the y axis does to fit the
    values): clear of the data, the legend and the panels' titles."""
    if text:
        figure.add_annotation(text=text, xref="paper", yref="paper", x=1, y=0, xanchor="right", yanchor="top",
                              yshift=-48, showarrow=False, font={"size": 12, "color": "#444444"},
                              bgcolor="rgba(255, 243, 205, 0.9)", bordercolor="#e6b800", borderwidth=1)
        figure.update_layout(margin={"b": 80})
