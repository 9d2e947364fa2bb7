"""The training engine: one trial from a TrialConfig to per-epoch metrics and a result."""

from worker.training.loop import DeviceUnavailable, EpochMetrics, TrialResult, train_trial

__all__ = ["DeviceUnavailable", "EpochMetrics", "TrialResult", "train_trial"]
