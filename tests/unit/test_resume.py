"""Resumable training of a trial alone (a stack of one): stopped after a checkpoint and resumed from
its bytes, it gives bitwise the epochs and final metrics of a trial that never stopped (timings
aside), on the CPU, whatever state its configuration moves. The hook, the bytes and refusals are
tested on jobs of several trials in test_fused_resume.py."""

from __future__ import annotations

import dataclasses

import pytest

from services.trial_config import TrialConfig
from worker.training import EpochMetrics, train_trial
from worker.training.checkpoint import job_state_from_bytes, job_state_to_bytes

SMALL = dict(n_train=64, n_val=32, n_test=32, width=16, depth=2, epochs=10)

# Each configuration moves a different piece of state that a resume must put back.
CONFIGS = {
    "dropout, input noise, adam, cosine": dict(dropout=0.2, input_noise=0.1, optimizer="adam", schedule="cosine",
                                               batch_size=16),
    "batch norm, momentum, one_cycle, clipping": dict(dataset="spirals", n_train=61, batch_size=20, norm="batch",
                                                      optimizer="momentum", schedule="one_cycle", grad_clip=0.5,
                                                      label_smoothing=0.1),
    "regression, plateau, early stopping, l1": dict(dataset="sine", poly_degree=3, optimizer="adamw",
                                                    weight_decay=0.01, l1=1e-3, schedule="plateau",
                                                    plateau_patience=1, gamma=0.5, lr=0.05,
                                                    early_stopping={"patience": 8, "min_delta": 0.0}),
    "layer norm, nesterov, multistep": dict(dataset="blobs", norm="layer", optimizer="nesterov",
                                            schedule="multistep", milestones=(3, 6), gamma=0.3, batch_size=8),
    "rmsprop, warmup_cosine": dict(dataset="circles", optimizer="rmsprop", schedule="warmup_cosine",
                                   warmup_epochs=3, lr=0.003),
    "adagrad, step, full batch": dict(optimizer="adagrad", schedule="step", step_size=2, batch_size="full"),
}


class _Crash(Exception):
    """Stands in for a worker killed right after its checkpoint was saved."""


def _without_timings(rows: list[EpochMetrics]) -> list[dict]:
    return [{k: v for k, v in dataclasses.asdict(row).items() if not k.endswith("_seconds")} for row in rows]


def _final_without_timings(final_metrics: dict) -> dict:
    return {k: v for k, v in final_metrics.items() if not k.endswith("_seconds")}


def _run_until_checkpoint(config: TrialConfig, epoch: int) -> tuple[list[EpochMetrics], bytes]:
    """Train until ``epoch``, serialise the state there, and stop as a killed worker would."""
    rows: list[EpochMetrics] = []
    saved: list[bytes] = []

    def checkpoint(at: int, capture) -> None:
        if at == epoch:
            saved.append(job_state_to_bytes(capture()))
            raise _Crash

    with pytest.raises(_Crash):
        train_trial(config, on_epoch=rows.append, checkpoint=checkpoint)
    return rows, saved[0]


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_a_trial_resumed_from_checkpoint_bytes_matches_an_uninterrupted_one_bitwise(overrides) -> None:
    config = TrialConfig(**{**SMALL, **overrides})
    full_rows: list[EpochMetrics] = []
    full = train_trial(config, on_epoch=full_rows.append)
    assert full.status == "succeeded" and full.epochs_run == 10

    first_rows, data = _run_until_checkpoint(config, epoch=4)
    state = job_state_from_bytes(data)
    resumed_rows: list[EpochMetrics] = []
    resumed = train_trial(config, on_epoch=resumed_rows.append, resume=state)

    assert [row.epoch for row in first_rows] == [1, 2, 3, 4]
    assert [row.epoch for row in resumed_rows] == list(range(5, 11))
    assert _without_timings(first_rows + resumed_rows) == _without_timings(full_rows)
    assert _final_without_timings(resumed.final_metrics) == _final_without_timings(full.final_metrics)
    assert (resumed.status, resumed.epochs_run, resumed.best_epoch, resumed.message) == (
        full.status, full.epochs_run, full.best_epoch, full.message)
    assert resumed.artifacts == full.artifacts


def test_early_stopping_counts_across_a_resume() -> None:
    # Patience 2 with a rate that makes validation loss stall at once: the stopper's counter must
    # carry over the checkpoint, or the resumed trial stops later than the uninterrupted one.
    config = TrialConfig(**{**SMALL, "epochs": 30, "dataset": "sine", "lr": 0.5, "optimizer": "sgd",
                            "early_stopping": {"patience": 2, "min_delta": 0.5}})
    full = train_trial(config)
    stopped = full.final_metrics["stopped_epoch"]
    assert stopped is not None and stopped >= 3, "the config must stop early, after epoch 2"

    _rows, data = _run_until_checkpoint(config, epoch=stopped - 1)
    resumed = train_trial(config, resume=job_state_from_bytes(data))

    assert resumed.final_metrics["stopped_epoch"] == stopped
    assert _final_without_timings(resumed.final_metrics) == _final_without_timings(full.final_metrics)
