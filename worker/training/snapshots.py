"""Watch it fit: a trial's prediction picture at about ``SNAPSHOTS`` epochs, so the dashboard can play
the moment a boundary starts chasing noise.

Which epochs: the first, log-spaced ones up to the trial's ``epochs`` (early epochs change the
picture most), the epoch it ended at (early stopping, a cancel), and its best epoch (the picture the
final ``boundary_2d`` / ``curve_1d`` artifact shows): :func:`snapshot_epochs` plans all but the last
two, which are known only at the end.

Compact, under 200 KB a trial: the grid (or the curve's x) is stored once; a decision-region frame
holds each cell's predicted class and that class's probability as uint8 (probability = byte / 255),
zlib-compressed and base64-encoded; a curve frame holds its 200 rounded values. Each frame also
carries that epoch's train and validation loss, so the picture can be read beside its numbers.

The engine (fused.py) asks for frames only at those epochs, for all the stack's rows that want one
in one evaluation on the grid, and keeps them in its checkpoint: a resumed job has the frames taken
before the crash and takes the later ones again, bitwise as the first attempt would have.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from services.snapshot_codec import decode_bytes, encode_bytes
from worker.training.artifacts import (
    DECIMALS,
    GRID,
    boundary_cells,
    boundary_grid,
    curve_inputs,
    label_set_names,
    picture_kind,
    round_for_json,
)

if TYPE_CHECKING:
    from worker.training.data import Splits
    from worker.training.fused_stack import StackedModel

SNAPSHOTS = 20  # about this many frames a trial: the planned ones, then its last and best epochs
PLANNED = SNAPSHOTS - 2
ARTIFACT = "snapshots"  # the TrialArtifact kind of a trial's frames
__all__ = ["ARTIFACT", "PLANNED", "SNAPSHOTS", "Snapshots", "decode_bytes", "encode_bytes", "snapshot_epochs"]


def snapshot_epochs(epochs: int, *, count: int = PLANNED) -> frozenset[int]:
    """The epochs planned for a trial of ``epochs`` epochs: 1, log-spaced ones and ``epochs``, about
    ``count`` of them (every epoch when there are at most that many), unique."""
    if epochs <= count:
        return frozenset(range(1, epochs + 1))
    points = count
    while True:  # rounding merges the first few log-spaced points: ask for more until count are left
        planned = np.unique(np.round(np.geomspace(1, epochs, points)).astype(int))
        if len(planned) >= count:
            return frozenset(int(epoch) for epoch in planned)
        points += 1


class Snapshots:
    """One job's picture inputs, standardised once, and the frames of its trials."""

    def __init__(self, splits: Splits, *, device: torch.device) -> None:
        self.kind = picture_kind(splits)
        self.multilabel = splits.task == "multilabel"
        if self.kind == "curve_1d":
            raw = curve_inputs(splits)
            self.fixed: dict[str, Any] = {"kind": "curve_1d", "x": round_for_json(raw)}
            raw = raw[:, None]
        else:
            (x_low, x_high), (y_low, y_high), raw = boundary_grid(splits)
            names = (label_set_names(splits.label_names) if self.multilabel else
                     list(splits.class_names) if splits.class_names else [str(k) for k in range(splits.n_outputs)])
            self.fixed = {"kind": "boundary_2d", "x_range": [round(x_low, DECIMALS), round(x_high, DECIMALS)],
                          "y_range": [round(y_low, DECIMALS), round(y_high, DECIMALS)], "resolution": GRID,
                          "class_names": names,
                          "encoding": "predicted_class and probability: uint8 per cell, row = y, column = x, "
                                      "zlib then base64; probability = byte / 255"}
        self.inputs = ((raw - splits.feature_mean) / splits.feature_std).to(device)

    @classmethod
    def of(cls, splits: Splits, *, device: torch.device) -> Snapshots | None:
        """The job's snapshots, or None when its data get no picture."""
        return cls(splits, device=device) if splits.x_train.shape[0] and picture_kind(splits) else None

    @torch.no_grad()
    def frames(self, model: StackedModel, rows: list[int], *, metrics: list[tuple[int, float, float]],
               outputs: torch.Tensor | None = None) -> list[dict]:
        """One frame per row of ``rows`` (the stack's current weights), with its (epoch, train loss,
        validation loss) from ``metrics``; every row is evaluated once, on the shared inputs, unless
        ``outputs`` already holds every row's outputs on them ([rows, inputs, outputs] on the CPU, as
        a trial's end pictures computed them: the same weights on the same grid)."""
        if not rows:
            return []
        if outputs is None:
            outputs = model.evaluate(self.inputs, rows=rows).float().mT  # [rows, inputs, outputs]
        elif len(rows) != outputs.shape[0]:  # a gather copies every output: only when some rows are left out
            outputs = outputs[rows]
        outputs = outputs.cpu()
        frames = []
        if self.kind == "curve_1d":
            for values, (epoch, train_loss, val_loss) in zip(outputs[:, :, 0], metrics, strict=True):
                frames.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                               "y_pred": round_for_json(values)})
            return frames
        probability, predicted = boundary_cells(outputs, multilabel=self.multilabel)
        quantised = probability.nan_to_num(0.0).clamp_(0, 1).mul_(255).round_().to(torch.uint8).numpy()
        for classes, chances, (epoch, train_loss, val_loss) in zip(predicted.numpy(), quantised, metrics, strict=True):
            frames.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                           "predicted_class": encode_bytes(classes), "probability": encode_bytes(chances)})
        return frames

    def artifact(self, frames: list[dict]) -> dict:
        """The TrialArtifact data of a trial's frames: the fixed inputs once, then the frames by epoch
        (one per epoch: a later frame of the same epoch - its best weights - replaces an earlier)."""
        by_epoch = {frame["epoch"]: frame for frame in frames}
        return {**self.fixed, "frames": [by_epoch[epoch] for epoch in sorted(by_epoch)]}
