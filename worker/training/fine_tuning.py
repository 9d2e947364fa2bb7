"""Fine-tuning's two pieces in the engine: a finished trial's best-epoch weights kept as a small JSON
artifact, and a new trial's initial weights taken from one.

The artifact (kind services.fine_tuning.WEIGHTS_KIND) holds the trial's row of the stack's flat form
(fused_stack.py: every parameter in order, then batch norm's running statistics) as little-endian
float32 bytes in base64, and a description of each layer that holds numbers: its kind (Linear,
LayerNorm, BatchNorm1d) and the shapes of its parameters and statistics. Plain JSON: reading it can
never run code, and the numbers come back bitwise.

A child takes the parent's layers from the first one while they agree in kind and shapes: the whole
network when every layer does, else the leading ones (a new output layer for other classes, say).
Everything after the first disagreement keeps the child's own initial draw.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import torch
from torch import nn

from services.fine_tuning import MAX_KEPT_WEIGHTS, WEIGHTS_FORMAT
from worker.training.fused_stack import _layers, row_size


def layer_layout(template: nn.Module) -> list[dict[str, Any]]:
    """Each layer that holds numbers, in order: kind, parameter shapes, statistics shapes, and where
    its parameters and its statistics sit in a row of the flat form (offsets)."""
    layers = [layer for layer in _layers(template) if any(True for _ in layer.parameters(recurse=False))]
    layout, offset = [], 0
    for layer in layers:
        shapes = [list(p.shape) for p in layer.parameters(recurse=False)]
        layout.append({"kind": type(layer).__name__, "shapes": shapes, "statistics": [], "at": offset})
        offset += sum(int(np.prod(shape)) for shape in shapes)
    for entry, layer in zip(layout, layers, strict=True):
        if isinstance(layer, nn.BatchNorm1d):
            entry["statistics"] = [list(layer.running_mean.shape), list(layer.running_var.shape)]
            entry["statistics_at"] = offset
            offset += 2 * layer.running_mean.numel()
    return layout


def weights_artifact(template: nn.Module, row: torch.Tensor) -> dict[str, Any] | None:
    """One trial's best-epoch row as the JSON a child can start from; None when the model has more
    than MAX_KEPT_WEIGHTS numbers (the artifact stays small)."""
    if row.numel() > MAX_KEPT_WEIGHTS:
        return None
    numbers = row.detach().to("cpu", torch.float32).numpy().astype("<f4", copy=False)
    layout = layer_layout(template)
    return {"format": WEIGHTS_FORMAT, "size": int(row.numel()),
            "layers": [{key: value for key, value in entry.items() if not key.endswith("at")} for entry in layout],
            "data": base64.b64encode(numbers.tobytes()).decode("ascii")}


def decode_row(artifact: dict[str, Any]) -> torch.Tensor:
    """The float32 row a weights artifact holds; ValueError when it is not one."""
    if artifact.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"the stored weights have format {artifact.get('format')!r}, not {WEIGHTS_FORMAT!r}")
    numbers = np.frombuffer(base64.b64decode(artifact["data"]), dtype="<f4")
    if numbers.size != artifact["size"]:
        raise ValueError("the stored weights are truncated")
    return torch.from_numpy(numbers.astype(np.float32))


def _same(parent: dict[str, Any], child: dict[str, Any]) -> bool:
    return (parent["kind"], parent["shapes"], parent["statistics"]) == (child["kind"], child["shapes"],
                                                                        child["statistics"])


@torch.no_grad()
def start_from(template: nn.Module, rows: torch.Tensor, parents: list[dict[str, Any] | None]) -> None:
    """Overwrite, in place, each row of ``rows`` (``[trials, row_size]``, on the CPU) whose ``parents``
    entry is a weights artifact with the parent's leading layers that agree in kind and shapes (all
    of them: the whole network). Raises ValueError naming both shapes when not even the first does."""
    child = layer_layout(template)
    for index, artifact in enumerate(parents):
        if artifact is None:
            continue
        parent_row, parent_layers = decode_row(artifact), artifact["layers"]
        parent_layout = _with_offsets(parent_layers)
        if not parent_layout or not child or not _same(parent_layout[0], child[0]):
            raise ValueError(f"the parent's first layer is {_shape_text(parent_layers)} but this trial's is "
                             f"{_shape_text(child)}; fine-tune on inputs and a width that give the same first layer")
        for theirs, ours in zip(parent_layout, child, strict=False):
            if not _same(theirs, ours):
                break
            size = sum(int(np.prod(shape)) for shape in ours["shapes"])
            rows[index, ours["at"]:ours["at"] + size] = parent_row[theirs["at"]:theirs["at"] + size]
            if ours["statistics"]:
                size = sum(int(np.prod(shape)) for shape in ours["statistics"])
                rows[index, ours["statistics_at"]:ours["statistics_at"] + size] = (
                    parent_row[theirs["statistics_at"]:theirs["statistics_at"] + size])
    assert rows.shape[1] == row_size(template)


def _with_offsets(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stored layer description with the offsets layer_layout gives (parameters first, then the
    statistics, in layer order)."""
    out, offset = [], 0
    for entry in layers:
        out.append({**entry, "at": offset})
        offset += sum(int(np.prod(shape)) for shape in entry["shapes"])
    for entry in out:
        if entry["statistics"]:
            entry["statistics_at"] = offset
            offset += sum(int(np.prod(shape)) for shape in entry["statistics"])
    return out


def _shape_text(layers: list[dict[str, Any]]) -> str:
    if not layers:
        return "missing"
    out, inputs = layers[0]["shapes"][0] if layers[0]["shapes"] else ("?", "?")
    return f"{out} x {inputs} (outputs x inputs)"
