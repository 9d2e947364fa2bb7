"""The old one-trial entry point, kept only for worker/tasks.py's one-trial task (run_trial), which
imports train_trial(resume_from=...), CannotResume and TrainingState. Every trial trains in the
stacked engine now (fused.py): a trial alone is a stack of one. Remove this module, and point
worker/training/__init__.py's train_trial at fused.train_trial, once that task is gone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.training.checkpoint import JobState
from worker.training.fused import train_trial as _train_trial
from worker.training.results import CannotResume, DeviceUnavailable, EpochMetrics, TrialResult

if TYPE_CHECKING:
    from services.trial_config import TrialConfig

# A lone trial's checkpoint is a job's of one trial.
TrainingState = JobState

__all__ = ["CannotResume", "DeviceUnavailable", "EpochMetrics", "TrainingState", "TrialResult", "train_trial"]


def train_trial(config: TrialConfig, *, resume_from: JobState | None = None, resume: JobState | None = None,
                **kwargs) -> TrialResult:
    """fused.train_trial, also under the one-trial task's old keyword for the state to resume from."""
    return _train_trial(config, resume=resume if resume is not None else resume_from, **kwargs)
