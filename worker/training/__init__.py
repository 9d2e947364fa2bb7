"""The training engine: trials from TrialConfigs to per-epoch metrics and results, stacked (fused.py)."""

from worker.training.fused import train_fused
from worker.training.loop import train_trial  # fused.train_trial, also taking worker/tasks.py's resume_from
from worker.training.results import CannotResume, DeviceUnavailable, EpochMetrics, TrialResult

__all__ = ["CannotResume", "DeviceUnavailable", "EpochMetrics", "TrialResult", "train_fused", "train_trial"]
