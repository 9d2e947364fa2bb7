"""A job's :class:`JobState` (a stack of one or more trials) as bytes, and back.

Written with ``torch.save`` and read with ``torch.load(weights_only=True)``: the payload is only
tensors, dicts, lists, tuples, numbers, strings and None (torch's own state dicts hold a few strings
and MultiStepLR a Counter, which weights_only also accepts), so loading a checkpoint can never run
code. Generator states are uint8 tensors; every tensor is on the CPU, so a checkpoint written on a GPU
worker resumes on a CPU one. The payload names its format, so an old or foreign file is refused
rather than misread.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import torch

from worker.training.results import EpochMetrics, TrialResult

JOB_FORMAT = "fitscope-job-state-1"


class CheckpointUnreadable(ValueError):
    """The bytes are not a checkpoint this engine can resume from; the trial must start over."""


@dataclass(frozen=True)
class TrialState:
    """One trial's own state inside a job: what it has done and where its generators stand."""

    status: str  # "running", or how it ended
    message: str | None
    stopped_epoch: int | None
    epochs_run: int
    last: EpochMetrics | None  # the metrics of its latest epoch
    best: EpochMetrics | None  # its first epoch with the lowest validation loss so far
    stopper: dict | None  # the early stopper's counters, when early stopping is on
    rates: dict | None  # its schedule's state: {"holder": ..., "schedule": ...}; None when it has none (older
    # checkpoints hold a constant rate's stand-in too: StepRates.restore reads them)
    generator: torch.Tensor  # uint8 state of the init / data-order generator
    noise_generator: torch.Tensor  # uint8 state of the dropout / input-noise generator
    seconds: float  # its share of the job's time so far
    lr_range: list | None = None  # a range test's (rate, batch loss) of every step so far
    frames: list | None = None  # its prediction snapshots so far (snapshots.py); None in older checkpoints
    exact_match: list | None = None  # multi-label: [epoch, train, val] exact-match ratios so far


@dataclass(frozen=True)
class JobState:
    """Everything a job (a stack of one or more trials) needs to go on after ``epoch`` exactly as if it
    had never stopped. Tensors are CPU copies; :func:`job_state_to_bytes` turns it into bytes."""

    epoch: int  # the last epoch it includes (1-based)
    configs: list[str]  # each trial's TrialConfig as JSON: a resume must train the very same trials
    stack: dict  # fused_stack.StackedTraining.state(): the rows, their weights, best weights, optimizer
    trials: list[TrialState]  # by trial index
    results: dict[int, TrialResult]  # the trials that have ended, by trial index


def job_state_to_bytes(state: JobState) -> bytes:
    """Serialise ``state`` into plain data (tensors, dicts, lists, numbers, strings) with torch.save."""
    payload = {
        "format": JOB_FORMAT,
        "epoch": state.epoch,
        "configs": list(state.configs),
        "stack": state.stack,
        "trials": [_trial_payload(trial) for trial in state.trials],
        "results": {index: asdict(result) for index, result in state.results.items()},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def job_state_from_bytes(data: bytes) -> JobState:
    """The state that :func:`job_state_to_bytes` wrote; raises CheckpointUnreadable for anything else."""
    payload = _load(data, JOB_FORMAT)
    try:
        trials = [TrialState(**{**trial, "last": _metrics(trial["last"]), "best": _metrics(trial["best"]),
                                "generator": _byte_tensor(trial["generator"]),
                                "noise_generator": _byte_tensor(trial["noise_generator"])})
                  for trial in payload["trials"]]
        results = {int(index): TrialResult(**result) for index, result in payload["results"].items()}
        configs = [str(config) for config in payload["configs"]]
        if not isinstance(payload["stack"], dict) or len(configs) != len(trials):
            raise ValueError("the stack is not a dict, or the trials do not match the configs")
        return JobState(epoch=int(payload["epoch"]), configs=configs, stack=payload["stack"], trials=trials,
                        results=results)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointUnreadable(f"the checkpoint lacks or garbles a field ({exc})") from None


def _trial_payload(trial: TrialState) -> dict:
    payload = {name: getattr(trial, name) for name in TrialState.__dataclass_fields__}
    payload["last"] = asdict(trial.last) if trial.last is not None else None
    payload["best"] = asdict(trial.best) if trial.best is not None else None
    return payload


def _metrics(value: dict | None) -> EpochMetrics | None:
    return EpochMetrics(**value) if value is not None else None


def _load(data: bytes, expected: str) -> dict:
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or holding something other than plain data
        raise CheckpointUnreadable(f"the checkpoint cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != expected:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointUnreadable(f"the checkpoint has format {found!r}, not {expected!r}")
    return payload



def _byte_tensor(value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise ValueError("a generator state is not a uint8 tensor")
    return value
