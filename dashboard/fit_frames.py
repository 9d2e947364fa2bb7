"""Watch it fit: a trial's prediction picture epoch by epoch (worker/training/snapshots.py), as one
Plotly figure with an epoch slider and a play button. Pictures in, a figure out; no Streamlit calls.

Each panel is one trial: its decision regions (two classes: the chance of the second class, white
where the model is unsure, with the 0.5 line drawn; more classes or label sets: the predicted one)
or its fitted curve, over the training points. Beside a single trial, its train and validation loss
with the slider's epoch marked. Several trials share one slider over every epoch any of them kept;
each panel then shows its latest frame at or before that epoch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from services.safe_text import plotly_text
from services.snapshot_codec import decode_bytes

TRAIN_COLOR, VAL_COLOR = "#1f77b4", "#d62728"
HOW_TO_READ = ("Drag the slider or press Play to watch training from epoch 1. Colours: the class the model "
               "predicts where no point is (pale where it is unsure; the black line is its boundary); dots: the "
               "training points. A boundary that bends around single dots while the validation loss climbs "
               "is the model memorising noise: overfitting.")
HALF = 127.5  # a byte's 0.5: the boundary between two classes
FRAME_MS = 450  # a frame's time on screen when playing: ~20 frames in under 10 s


def has_frames(kinds: dict[str, dict]) -> bool:
    """Whether a trial's artifacts hold snapshots a figure can play."""
    return bool((kinds.get("snapshots") or {}).get("frames")) and ("boundary_2d" in kinds or "curve_1d" in kinds)


def fit_animation(panels: list[tuple[str, dict[str, dict]]], *, curves: pd.DataFrame | None = None,
                  best_epoch: int | None = None, start: str = "best", height: int = 470) -> go.Figure:
    """One panel per (title, artifacts) trial with snapshots (others are left out), an epoch slider
    and a play button (which plays from the first epoch). ``curves`` (epoch, train_loss, val_loss of
    ONE trial) adds its loss chart beside the picture; ``best_epoch`` is marked on the slider. The
    figure opens on the ``start`` epoch: "best" (``best_epoch``, the final picture), "first" or "last"."""
    shown = [(title, kinds) for title, kinds in panels if has_frames(kinds)]
    columns = len(shown) + (curves is not None)
    # Built without plotly's per-property validation (the inputs are our own numbers): ~20 frames of
    # 3,600 cells per trial otherwise take seconds, on every rerun of the page.
    figure = make_subplots(figure=go.Figure(_validate=False), rows=1, cols=max(columns, 1),
                           horizontal_spacing=0.08 if curves is not None else 0.04,
                           column_widths=[1.0] * len(shown) + ([0.8] if curves is not None else []),
                           subplot_titles=[plotly_text(title) or " " for title, _ in shown]
                           + (["Loss at that epoch"] if curves is not None else []))
    if not shown:
        return figure
    epochs = sorted({frame["epoch"] for _, kinds in shown for frame in kinds["snapshots"]["frames"]})
    dynamic: list[list[int]] = []  # per panel, the indices of the traces that change with the epoch
    for column, (_, kinds) in enumerate(shown, start=1):
        first = len(figure.data)
        if kinds["snapshots"]["kind"] == "boundary_2d":
            changing = _boundary_traces(figure, kinds, column=column)
        else:
            changing = _curve_traces(figure, kinds, column=column)
        dynamic.append([first + k for k in changing])
    marker_traces = _loss_traces(figure, curves, column=columns) if curves is not None else []

    notes_layout = [note.to_plotly_json() for note in figure.layout.annotations]
    frames = []
    for epoch in epochs:
        data, traces, notes = [], [], []
        for (title, kinds), indices in zip(shown, dynamic, strict=True):
            frame = _frame_at(kinds["snapshots"]["frames"], epoch)
            data += _frame_data(kinds, frame)
            traces += indices
            best = " (best)" if frame["epoch"] == best_epoch and len(shown) == 1 else ""
            notes.append(f"{plotly_text(title)}<br><sup>epoch {frame['epoch']}{best} · train loss "
                         f"{_loss(frame['train_loss'])} · validation loss {_loss(frame['val_loss'])}</sup>")
        if curves is not None:
            frame = _frame_at(shown[0][1]["snapshots"]["frames"], epoch)
            data += _marker_data(frame, curves)
            traces += marker_traces
            notes.append("Loss at that epoch")
        annotations = [dict(note, text=text) for note, text in zip(notes_layout, notes, strict=False)]
        frames.append({"name": str(epoch), "data": data, "traces": traces, "layout": {"annotations": annotations}})
    figure.frames = frames
    opening = {"first": 0, "last": len(epochs) - 1}.get(
        start, epochs.index(best_epoch) if best_epoch in epochs else len(epochs) - 1)
    for index, update in zip(frames[opening]["traces"], frames[opening]["data"], strict=True):
        figure.data[index].update({key: value for key, value in update.items() if key != "type"})
    figure.layout.annotations = frames[opening]["layout"]["annotations"]
    # Assigned, not update_layout's merge: the same without walking every step through validators.
    figure.layout.height, figure.layout.showlegend = height, True
    figure.layout.margin = {"l": 10, "r": 10, "t": 95, "b": 10}
    figure.layout.legend = {"orientation": "h", "x": 0, "xanchor": "left", "yref": "container", "y": 1.0,
                            "yanchor": "top", "traceorder": "normal"}
    figure.layout.sliders = [{
        "active": opening, "currentvalue": {"visible": False}, "x": 0.16, "len": 0.84, "y": 0, "yanchor": "top",
        "pad": {"t": 40},
        "steps": [{"label": f"{epoch}{' best' if epoch == best_epoch else ''}", "method": "animate",
                   "args": [[str(epoch)], {"mode": "immediate", "frame": {"duration": 0, "redraw": True},
                                            "transition": {"duration": 0}}]} for epoch in epochs]}]
    figure.layout.updatemenus = [{
        "type": "buttons", "direction": "left", "x": 0, "y": 0, "xanchor": "left", "yanchor": "top",
        "pad": {"t": 40}, "showactive": False, "buttons": [
            {"label": "▶ Play", "method": "animate",
             "args": [None, {"frame": {"duration": FRAME_MS, "redraw": True}, "fromcurrent": False,
                             "transition": {"duration": 0}}]},
            {"label": "❚❚ Pause", "method": "animate",
             "args": [[None], {"mode": "immediate", "frame": {"duration": 0, "redraw": False}}]}]}]
    return figure


def _frame_at(frames: list[dict], epoch: int) -> dict:
    """The latest frame at or before ``epoch`` (the first one before any)."""
    earlier = [frame for frame in frames if frame["epoch"] <= epoch]
    return earlier[-1] if earlier else frames[0]


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _palette(count: int) -> list[str]:
    return [qualitative.Plotly[k % len(qualitative.Plotly)] for k in range(count)]


def _grid_axes(snapshots: dict) -> tuple[list[float], list[float]]:
    (x_low, x_high), (y_low, y_high), n = snapshots["x_range"], snapshots["y_range"], snapshots["resolution"]
    return np.linspace(x_low, x_high, n).round(3).tolist(), np.linspace(y_low, y_high, n).round(3).tolist()


def _boundary_traces(figure: go.Figure, kinds: dict, *, column: int) -> list[int]:
    """Regions (changing), the 0.5 line of two classes (changing), the training points (fixed);
    returns the changing ones' indices counted from the panel's first trace."""
    snapshots, picture = kinds["snapshots"], kinds["boundary_2d"]
    names = snapshots["class_names"]
    palette = _palette(len(names))
    xs, ys = _grid_axes(snapshots)
    # The chance of the second class as a byte (0..255): a frame ships as 3,600 bytes, not floats.
    if len(names) == 2:  # the second class's chance: its colour, white where unsure, the first's
        figure.add_heatmap(x=xs, y=ys, z=[[HALF]], zmin=0, zmax=255, showscale=False, opacity=0.55,
                           colorscale=[[0, palette[0]], [0.5, "#ffffff"], [1, palette[1]]], hoverinfo="skip",
                           row=1, col=column)
        figure.add_contour(x=xs, y=ys, z=[[HALF]], contours={"start": HALF, "end": HALF, "coloring": "none"},
                           line={"color": "#000000", "width": 2}, showscale=False, hoverinfo="skip", showlegend=False,
                           row=1, col=column)
        changing = [0, 1]
    else:
        scale = [[edge, palette[k]] for k in range(len(names)) for edge in (k / len(names), (k + 1) / len(names))]
        figure.add_heatmap(x=xs, y=ys, z=[[0]], zmin=-0.5, zmax=len(names) - 0.5, colorscale=scale, opacity=0.4,
                           showscale=False, hoverinfo="skip", row=1, col=column)
        changing = [0]
    labels = picture["train_label"]
    figure.add_scatter(x=picture["train_x"], y=picture["train_y"], mode="markers", showlegend=False,
                       marker={"size": 6, "color": [palette[label % len(palette)] for label in labels],
                               "line": {"width": 0.8, "color": "#ffffff"}},
                       text=[plotly_text(names[label]) if label < len(names) else str(label) for label in labels],
                       hovertemplate="training point: %{text}<extra></extra>", row=1, col=column)
    if column == 1:  # which colour is which class (or label set), once for every panel
        for name, color in zip(names, palette, strict=True):
            label = f"class {name}" if name.isdigit() else plotly_text(name)
            figure.add_scatter(x=[None], y=[None], mode="markers", name=label,
                               marker={"size": 12, "symbol": "square", "color": color}, row=1, col=column)
    figure.update_xaxes(range=snapshots["x_range"], row=1, col=column)
    figure.update_yaxes(range=snapshots["y_range"], row=1, col=column)
    return changing


def _curve_traces(figure: go.Figure, kinds: dict, *, column: int) -> list[int]:
    """Training points and truth (fixed), the model's curve (changing)."""
    picture, first = kinds["curve_1d"], len(figure.data)
    figure.add_scatter(x=picture["train_x"], y=picture["train_y"], mode="markers", showlegend=False,
                       marker={"size": 5, "color": "#9e9e9e"}, hoverinfo="skip", row=1, col=column)
    if picture.get("y_true"):
        figure.add_scatter(x=picture["x"], y=picture["y_true"], mode="lines", showlegend=False, name="truth",
                           line={"color": "#000000", "dash": "dash"}, hoverinfo="skip", row=1, col=column)
    changing = len(figure.data)
    figure.add_scatter(x=kinds["snapshots"]["x"], y=picture["y_pred"], mode="lines", showlegend=False, name="model",
                       line={"color": "#d62728", "width": 2.5}, row=1, col=column)
    values = [v for v in (*picture["train_y"], *(picture.get("y_true") or [])) if v is not None]
    if values:  # a wild early curve must not rescale the axis away from the data
        low, high = min(values), max(values)
        pad = 0.25 * (high - low or 1.0)
        figure.update_yaxes(range=[low - pad, high + pad], row=1, col=column)
    return [changing - first]


def _frame_data(kinds: dict, frame: dict) -> list[dict]:
    snapshots = kinds["snapshots"]
    if snapshots["kind"] == "curve_1d":
        return [{"type": "scatter", "y": frame["y_pred"]}]
    n = int(snapshots["resolution"])
    classes = decode_bytes(frame["predicted_class"], most=n * n).reshape(n, n)
    if len(snapshots["class_names"]) == 2:
        probability = decode_bytes(frame["probability"], most=n * n).reshape(n, n)
        second = np.where(classes == 1, probability, 255 - probability).astype(np.uint8)
        return [{"type": "heatmap", "z": second}, {"type": "contour", "z": second}]
    return [{"type": "heatmap", "z": classes}]


def _loss_traces(figure: go.Figure, curves: pd.DataFrame, *, column: int) -> list[int]:
    """Train and validation loss (fixed), the epoch's two points and its vertical line (changing)."""
    for split, color in (("train", TRAIN_COLOR), ("val", VAL_COLOR)):
        figure.add_scatter(x=curves["epoch"].tolist(), y=curves[f"{split}_loss"].tolist(), mode="lines",
                           name="training loss" if split == "train" else "validation loss",
                           line={"color": color, "width": 2, "dash": "solid" if split == "train" else "dash"},
                           row=1, col=column)
    first = len(figure.data)
    figure.add_scatter(x=[1, 1], y=[0, 0], mode="markers", showlegend=False, hoverinfo="skip",
                       marker={"size": 11, "color": [TRAIN_COLOR, VAL_COLOR], "line": {"width": 1, "color": "#000"}},
                       row=1, col=column)
    figure.add_scatter(x=[1, 1], y=list(_loss_range(curves)), mode="lines", showlegend=False, hoverinfo="skip",
                       line={"color": "#555555", "width": 1, "dash": "dot"}, row=1, col=column)
    last = float(curves["epoch"].max())
    if last >= 50:  # the frames are log-spaced: so is this axis, a little past both ends for the markers
        figure.update_xaxes(title_text="epoch (log scale)", type="log", range=[-0.05, np.log10(last) + 0.05],
                            row=1, col=column)
    else:
        figure.update_xaxes(title_text="epoch", range=[0.5, last + 0.5], row=1, col=column)
    figure.update_yaxes(range=list(_loss_range(curves)), row=1, col=column)
    return [first, first + 1]


def _loss_range(curves: pd.DataFrame) -> tuple[float, float]:
    values = pd.concat([curves["train_loss"], curves["val_loss"]]).replace([np.inf, -np.inf], np.nan).dropna()
    if values.empty:
        return 0.0, 1.0
    # Up to the largest loss, unless a spike would flatten the curves: then three times the larger of
    # the first and last losses (the validation loss climbing as the model overfits stays in view).
    ends = [float(curves[column].iloc[k]) for column in ("train_loss", "val_loss") for k in (0, -1)]
    top = min(float(values.max()), 3 * max(v for v in ends if np.isfinite(v)) if any(map(np.isfinite, ends)) else 1.0)
    return 0.0, 1.08 * top


def _marker_data(frame: dict, curves: pd.DataFrame) -> list[dict]:
    epoch = frame["epoch"]
    return [{"type": "scatter", "x": [epoch, epoch], "y": [frame["train_loss"], frame["val_loss"]]},
            {"type": "scatter", "x": [epoch, epoch], "y": list(_loss_range(curves))}]


def exact_match_curves(series: dict) -> go.Figure:
    """A multi-label trial's exact-match ratio per epoch (the ``multilabel`` artifact), train and val."""
    figure = go.Figure()
    for split, color in (("train", TRAIN_COLOR), ("val", VAL_COLOR)):
        figure.add_scatter(x=series["epoch"], y=series[f"{split}_exact_match"], mode="lines",
                           name="training" if split == "train" else "validation",
                           line={"color": color, "dash": "solid" if split == "train" else "dash"})
    figure.update_layout(title={"text": "Exact match",
                                "subtitle": {"text": "share of examples with every label right"}},
                         yaxis={"range": [0, 1.02], "tickformat": ".0%"}, xaxis={"title": "epoch"}, height=320,
                         margin={"l": 10, "r": 10, "t": 70, "b": 40})
    return figure


def label_accuracy_bars(series: dict) -> go.Figure:
    """Each label's accuracy with the best epoch's weights, on train, validation and test."""
    figure = go.Figure()
    labels = [plotly_text(label) for label in series["labels"]]
    for split, color in (("train", TRAIN_COLOR), ("val", VAL_COLOR), ("test", "#7f7f7f")):
        values = (series.get("best_label_accuracy") or {}).get(split)
        if values:
            figure.add_bar(x=labels, y=values, name={"val": "validation"}.get(split, split), marker_color=color,
                           hovertemplate="%{x}: %{y:.1%}<extra></extra>")
    figure.update_layout(title={"text": "Accuracy per label", "subtitle": {"text": "at the best epoch"}},
                         barmode="group", yaxis={"range": [0, 1.02], "tickformat": ".0%"}, height=320,
                         xaxis={"type": "category"}, margin={"l": 10, "r": 10, "t": 70, "b": 40})
    return figure
