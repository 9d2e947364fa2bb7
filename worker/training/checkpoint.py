"""A trial's :class:`~worker.training.loop.TrainingState` as bytes, and back.

Written with ``torch.save`` and read with ``torch.load(weights_only=True)``: the payload is only
tensors, dicts, lists, tuples, numbers, strings and None (torch's own state dicts hold a few strings
and MultiStepLR a Counter, which weights_only also accepts), so loading a checkpoint can never run
code. Generator states are uint8 tensors; every tensor is on the CPU, so a checkpoint written on a GPU
worker resumes on a CPU one. The payload names its format, so an old or foreign file is refused
rather than misread.
"""

from __future__ import annotations

import io
from dataclasses import asdict

import torch

from worker.training.loop import EpochMetrics, TrainingState

FORMAT = "fitscope-trial-state-1"


class CheckpointUnreadable(ValueError):
    """The bytes are not a checkpoint this engine can resume from; the trial must start over."""


def state_to_bytes(state: TrainingState) -> bytes:
    """Serialise ``state`` (whose tensors are CPU copies, as loop._capture makes them)."""
    payload = {
        "format": FORMAT,
        "epoch": state.epoch,
        "model": state.model,
        "optimizer": state.optimizer,
        "schedule": state.schedule,
        "generator": state.generator,
        "noise_generator": state.noise_generator,
        "last": asdict(state.last),
        "best": asdict(state.best) if state.best is not None else None,
        "best_weights": state.best_weights,
        "stopper": state.stopper,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def state_from_bytes(data: bytes) -> TrainingState:
    """The state that :func:`state_to_bytes` wrote; raises CheckpointUnreadable for anything else."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or holding something other than plain data
        raise CheckpointUnreadable(f"the checkpoint cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointUnreadable(f"the checkpoint has format {found!r}, not {FORMAT!r}")
    try:
        return TrainingState(
            epoch=int(payload["epoch"]),
            model=payload["model"],
            optimizer=payload["optimizer"],
            schedule=payload["schedule"],
            generator=_byte_tensor(payload["generator"]),
            noise_generator=_byte_tensor(payload["noise_generator"]),
            last=EpochMetrics(**payload["last"]),
            best=EpochMetrics(**payload["best"]) if payload["best"] is not None else None,
            best_weights=payload["best_weights"],
            stopper=payload["stopper"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointUnreadable(f"the checkpoint lacks or garbles a field ({exc})") from None


def _byte_tensor(value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise ValueError("a generator state is not a uint8 tensor")
    return value
