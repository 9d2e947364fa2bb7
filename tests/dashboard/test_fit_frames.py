"""The epoch slider of Watch it fit: one frame per epoch any trial kept, each panel at its latest
snapshot at or before that epoch, opened on the best epoch, the loss marked beside the picture."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dashboard.fit_frames import HALF, fit_animation, has_frames
from services.snapshot_codec import decode_bytes, encode_bytes

N = 4  # a tiny grid


def _trial(epochs: list[int], *, best: int) -> dict:
    frames = []
    for epoch in epochs:
        classes = np.full(N * N, epoch % 2, dtype=np.uint8)  # the class flips every epoch
        frames.append({"epoch": epoch, "train_loss": 1 / epoch, "val_loss": 1 / epoch + 0.1 * (epoch > best),
                       "predicted_class": encode_bytes(classes), "probability": encode_bytes(np.full(N * N, 200))})
    boundary = {"train_x": [0.0, 1.0], "train_y": [0.0, 1.0], "train_label": [0, 1]}
    return {"boundary_2d": boundary, "snapshots": {"kind": "boundary_2d", "x_range": [-1, 1], "y_range": [-1, 1],
                                                   "resolution": N, "class_names": ["a", "b"], "frames": frames}}


def test_one_trial_opens_on_its_best_epoch_with_its_losses_marked() -> None:
    trial = _trial([1, 2, 5, 10], best=5)
    curves = pd.DataFrame({"epoch": range(1, 11), "train_loss": [1 / e for e in range(1, 11)],
                           "val_loss": [1 / e + 0.05 for e in range(1, 11)]})
    figure = fit_animation([("t", trial)], curves=curves, best_epoch=5)
    assert [frame.name for frame in figure.frames] == ["1", "2", "5", "10"]
    [slider] = figure.layout.sliders
    assert [step.label for step in slider.steps] == ["1", "2", "5 best", "10"] and slider.active == 2
    heatmap = figure.data[0]
    # epoch 5: class 1 with probability 200/255, so the second class's chance is 200 (of 255)
    assert np.asarray(heatmap.z).ravel().tolist() == [200] * (N * N)
    assert "epoch 5 (best)" in figure.layout.annotations[0].text
    markers = figure.frames[3].data[-2]
    assert list(markers.x) == [10, 10] and list(markers.y) == [0.1, 0.2]
    assert figure.layout.updatemenus[0].buttons[0].label == "▶ Play"


def test_several_trials_share_one_slider_and_each_shows_its_latest_frame() -> None:
    figure = fit_animation([("a", _trial([1, 3], best=3)), ("b", _trial([1, 2, 4], best=2)),
                            ("no frames", {"boundary_2d": {}})], start="first")
    assert [frame.name for frame in figure.frames] == ["1", "2", "3", "4"]
    at_two = figure.frames[1]
    a, b = at_two.data[0], at_two.data[2]  # each panel's regions (then its 0.5 line)
    assert np.asarray(a.z).ravel()[0] == 200 and np.asarray(b.z).ravel()[0] == 255 - 200  # a at 1, b at 2
    assert "epoch 1" in at_two.layout.annotations[0].text and "epoch 2" in at_two.layout.annotations[1].text
    assert len(figure.layout.annotations) == 2  # the trial without frames is left out
    assert not has_frames({"boundary_2d": {}}) and has_frames(_trial([1], best=1))
    assert HALF == 127.5 and decode_bytes(encode_bytes(np.arange(3))).tolist() == [0, 1, 2]


def test_a_multi_label_trial_draws_its_exact_match_and_each_labels_accuracy() -> None:
    from dashboard.fit_frames import exact_match_curves, label_accuracy_bars

    series = {"labels": ["inside_circle", "above_line"], "epoch": [1, 2, 3], "train_exact_match": [0.2, 0.5, 0.9],
              "val_exact_match": [0.2, 0.4, 0.5],
              "best_label_accuracy": {"train": [0.95, 0.9], "val": [0.8, 0.85], "test": None}}
    curves = exact_match_curves(series)
    assert [list(trace.y) for trace in curves.data] == [[0.2, 0.5, 0.9], [0.2, 0.4, 0.5]]
    bars = label_accuracy_bars(series)
    assert [trace.name for trace in bars.data] == ["train", "validation"]  # no test set: no bar
    assert list(bars.data[1].x) == ["inside_circle", "above_line"] and list(bars.data[1].y) == [0.8, 0.85]
