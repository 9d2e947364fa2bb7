"""The training engine: trials from TrialConfigs to per-epoch metrics and results, stacked (fused.py)."""

from worker.training.fused import train_fused, train_trial
from worker.training.results import CannotResume, DeviceUnavailable, EpochMetrics, TrialResult

__all__ = ["CannotResume", "DeviceUnavailable", "EpochMetrics", "TrialResult", "train_fused", "train_trial"]
