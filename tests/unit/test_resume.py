"""Resumable training: a trial stopped after a checkpoint and resumed from its bytes gives bitwise the
epochs and final metrics of a trial that never stopped (timings aside), on the CPU."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from services.trial_config import TrialConfig
from worker.training.checkpoint import CheckpointUnreadable, state_from_bytes, state_to_bytes
from worker.training.loop import EpochMetrics, TrainingState, train_trial

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
            saved.append(state_to_bytes(capture()))
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
    state = state_from_bytes(data)
    resumed_rows: list[EpochMetrics] = []
    resumed = train_trial(config, on_epoch=resumed_rows.append, resume_from=state)

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
    resumed = train_trial(config, resume_from=state_from_bytes(data))

    assert resumed.final_metrics["stopped_epoch"] == stopped
    assert _final_without_timings(resumed.final_metrics) == _final_without_timings(full.final_metrics)


def test_the_hook_is_offered_every_epoch_but_the_last_and_captures_only_when_asked() -> None:
    offered: list[int] = []
    states: list[TrainingState] = []

    def checkpoint(epoch: int, capture) -> None:
        offered.append(epoch)
        if epoch == 2:
            states.append(capture())

    train_trial(TrialConfig(**{**SMALL, "epochs": 4}), checkpoint=checkpoint)

    assert offered == [1, 2, 3]
    [state] = states
    assert state.epoch == 2 and state.last.epoch == 2
    assert state.generator.dtype == torch.uint8 and state.noise_generator.dtype == torch.uint8
    assert all(tensor.device.type == "cpu" for tensor in state.model.values())


def test_a_checkpoint_is_plain_data_loaded_with_weights_only() -> None:
    _rows, data = _run_until_checkpoint(TrialConfig(**{**SMALL, "schedule": "multistep"}), epoch=3)

    payload = torch.load(io.BytesIO(data), weights_only=True)
    assert payload["format"] == "fitscope-trial-state-1" and payload["epoch"] == 3
    assert state_from_bytes(data).epoch == 3


class _NotPlainData:
    pass


@pytest.mark.parametrize("make_bytes", [
    lambda data: data[: len(data) // 2],  # truncated
    lambda data: b"not a checkpoint at all",
    lambda data: _saved({"format": "someone-else-1"}),
    lambda data: _saved({"format": "fitscope-trial-state-1", "epoch": 3}),  # fields missing
    lambda data: _saved(_NotPlainData()),  # weights_only refuses to build objects
], ids=["truncated", "garbage", "foreign format", "missing fields", "an object"])
def test_bytes_that_are_not_a_usable_checkpoint_are_refused(make_bytes) -> None:
    _rows, data = _run_until_checkpoint(TrialConfig(**{**SMALL, "epochs": 3}), epoch=1)

    with pytest.raises(CheckpointUnreadable):
        state_from_bytes(make_bytes(data))


def _saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def test_a_checkpoint_that_does_not_fit_the_run_raises_cannot_resume_before_training() -> None:
    # A GPU generator's state (a device: auto trial that ran on a GPU) does not fit a CPU generator.
    from worker.training.loop import CannotResume

    config = TrialConfig(dataset="moons", width=8, epochs=6, dropout=0.2, n_train=64, seed=1)
    _, data = _run_until_checkpoint(config, 3)
    state = state_from_bytes(data)
    alien = dataclasses.replace(state, noise_generator=torch.zeros(16, dtype=torch.uint8))
    seen: list[EpochMetrics] = []
    with pytest.raises(CannotResume, match="does not fit this run"):
        train_trial(config, resume_from=alien, on_epoch=seen.append)
    assert seen == []
