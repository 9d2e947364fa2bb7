"""A job stopped after a checkpoint and resumed from its bytes gives bitwise the epoch rows and
results of a job that never stopped (timings aside), on the CPU: every trial's weights, optimizer
and schedule state, generators, best epoch and early stopper, and the trials that already ended."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from services.trial_config import TrialConfig
from worker.training.checkpoint import CheckpointUnreadable, JobState, job_state_from_bytes, job_state_to_bytes
from worker.training.fused import train_fused
from worker.training.results import CannotResume

SMALL = dict(n_train=64, n_val=32, n_test=32, width=16, depth=2, batch_size=16, epochs=12)
# Patience 1 with min_delta ends those trials at their first stalled epoch: early, at different epochs.
EARLY = {"patience": 1, "min_delta": 0.02}
LATE = {"patience": 2, "min_delta": 0.002}

# Each group moves a different piece of state; every group mixes learning rates, early stopping
# (some trials end early, before and after the checkpoint), dropout and input noise, and a trial
# with fewer epochs, so the stack is compacted before the checkpoint.
GROUPS = {
    "adam, cosine, dropout, input noise": [
        dict(lr=lr, dropout=dropout, input_noise=noise, early_stopping=early, epochs=epochs, seed=seed,
             optimizer="adam", schedule="cosine")
        for lr, dropout, noise, early, epochs, seed in [
            (0.003, 0.2, 0.0, None, 12, 0), (0.01, 0.0, 0.1, EARLY, 12, 1), (0.03, 0.3, 0.05, EARLY, 12, 2),
            (0.1, 0.1, 0.0, None, 3, 3), (0.3, 0.0, 0.0, EARLY, 12, 4), (0.01, 0.2, 0.1, None, 12, 5)]],
    "momentum, plateau, clipping, l1, layer norm": [
        dict(lr=lr, dropout=0.1, input_noise=0.05, early_stopping=early, epochs=epochs, seed=seed, norm="layer",
             optimizer="momentum", schedule="plateau", plateau_patience=1, grad_clip=clip, l1=l1, dataset="blobs")
        for lr, early, epochs, seed, clip, l1 in [
            (0.01, None, 12, 0, None, 0.0), (0.05, EARLY, 12, 1, 0.5, 1e-3), (0.2, EARLY, 12, 2, None, 0.0),
            (0.1, None, 2, 3, 1.0, 1e-4), (0.02, None, 4, 4, None, 0.0)]],
    "regression, sgd, one_cycle, multistep, lr_range_test": [
        dict(lr=lr, input_noise=0.1, early_stopping=early, epochs=epochs, seed=seed, dataset="sine",
             optimizer="sgd", schedule=schedule, milestones=(3, 6), poly_degree=1, min_lr=1e-4)
        for lr, early, epochs, seed, schedule in [
            (0.01, None, 12, 0, "one_cycle"), (0.05, EARLY, 12, 1, "multistep"), (0.1, LATE, 12, 2, "one_cycle"),
            (0.3, LATE, 12, 4, "multistep"),
            (0.02, None, 3, 3, "multistep"), (0.5, None, 12, 5, "lr_range_test")]],  # its every step's loss
}
STOP_AFTER = 5


class _Crash(Exception):
    """Stands in for a worker killed right after its checkpoint was saved."""


def _configs(group: str) -> list[TrialConfig]:
    return [TrialConfig(**{**SMALL, **overrides}) for overrides in GROUPS[group]]


def _run(configs, *, stop_after: int | None = None, resume: JobState | None = None, device: str | None = None,
         parents: list | None = None):
    """train_fused with every trial's rows; with ``stop_after``, it saves the state after that epoch
    as bytes and stops as a killed worker would. Returns (results or None, rows, ended, bytes)."""
    rows: dict[int, list] = {i: [] for i in range(len(configs))}
    ended: dict[int, object] = {}
    saved: list[bytes] = []

    def on_epoch(epoch_rows):
        for index, metrics in epoch_rows.items():
            rows[index].append(metrics)

    def checkpoint(epoch, capture):
        if epoch == stop_after:
            saved.append(job_state_to_bytes(capture()))
            raise _Crash

    try:
        results = train_fused(configs, on_epoch=on_epoch, on_trials_end=ended.update, checkpoint=checkpoint,
                              resume=resume, device=device, parents=parents)
    except _Crash:
        return None, rows, ended, saved[0]
    return results, rows, ended, None


def _without_timings(rows) -> list[dict]:
    return [{k: v for k, v in dataclasses.asdict(row).items() if not k.endswith("_seconds")} for row in rows]


def _result_without_timings(result) -> dict:
    fields = dataclasses.asdict(result)
    fields["final_metrics"] = {k: v for k, v in result.final_metrics.items() if not k.endswith("_seconds")}
    return fields


@pytest.mark.parametrize("group", GROUPS)
def test_a_job_resumed_from_checkpoint_bytes_matches_an_uninterrupted_one_bitwise(group: str) -> None:
    configs = _configs(group)
    full, full_rows, _, _ = _run(configs)
    # The case must be what it claims: some trials end before the checkpoint, some after it
    # (by early stopping), and some run to their last epoch.
    ended_at = [result.epochs_run for result in full]
    assert any(epochs <= STOP_AFTER for epochs in ended_at), ended_at
    stopped = [r.final_metrics["stopped_epoch"] for r in full]
    assert any(s is not None and s > STOP_AFTER for s in stopped), stopped
    assert any(s is None for s in stopped)

    _, first_rows, first_ended, data = _run(configs, stop_after=STOP_AFTER)
    state = job_state_from_bytes(data)
    assert state.epoch == STOP_AFTER and set(state.results) == set(first_ended)
    resumed, resumed_rows, resumed_ended, _ = _run(configs, resume=state)

    assert set(first_ended) | set(resumed_ended) == set(range(len(configs)))
    assert not set(first_ended) & set(resumed_ended), "a trial that ended stays ended"
    for i in range(len(configs)):
        assert [row.epoch for row in first_rows[i]] == list(range(1, min(STOP_AFTER, ended_at[i]) + 1))
        assert _without_timings(first_rows[i] + resumed_rows[i]) == _without_timings(full_rows[i]), i
        assert _result_without_timings(resumed[i]) == _result_without_timings(full[i]), i
    if "lr_range_test" in group:  # the steps before the checkpoint are in the resumed trial's curve
        assert resumed[-1].artifacts["lr_range"]["steps"] == 12 * 4


def test_the_hook_is_offered_every_epoch_but_the_last_and_captures_only_when_asked() -> None:
    configs = [TrialConfig(**{**SMALL, "epochs": epochs, "seed": seed}) for seed, epochs in [(0, 4), (1, 2)]]
    offered: list[int] = []
    states: list[JobState] = []

    def checkpoint(epoch: int, capture) -> None:
        offered.append(epoch)
        if epoch == 2:
            states.append(capture())

    train_fused(configs, checkpoint=checkpoint)

    assert offered == [1, 2, 3]
    [state] = states
    assert state.epoch == 2 and [t.last.epoch for t in state.trials] == [2, 2]
    assert [t.status for t in state.trials] == ["running", "succeeded"] and set(state.results) == {1}
    assert all(t.generator.dtype == torch.uint8 and t.noise_generator.dtype == torch.uint8 for t in state.trials)
    assert state.stack["params"].device.type == "cpu"


def test_a_checkpoint_is_plain_data_loaded_with_weights_only() -> None:
    configs = [TrialConfig(**{**SMALL, "schedule": "multistep", "seed": seed, "epochs": 4}) for seed in (0, 1)]
    _, _, _, data = _run(configs, stop_after=2)

    payload = torch.load(io.BytesIO(data), weights_only=True)
    assert payload["format"] == "fitscope-job-state-1" and payload["epoch"] == 2
    assert job_state_from_bytes(data).epoch == 2


class _NotPlainData:
    pass


def _saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("make_bytes", [
    lambda data: data[: len(data) // 2],  # truncated
    lambda data: b"not a checkpoint at all",
    lambda data: _saved({"format": "fitscope-trial-state-1"}),  # a lone trial's, not a job's
    lambda data: _saved({"format": "fitscope-job-state-1", "epoch": 3}),  # fields missing
    lambda data: _saved(_NotPlainData()),  # weights_only refuses to build objects
], ids=["truncated", "garbage", "foreign format", "missing fields", "an object"])
def test_bytes_that_are_not_a_usable_checkpoint_are_refused(make_bytes) -> None:
    _, _, _, data = _run([TrialConfig(**{**SMALL, "epochs": 3})], stop_after=1)

    with pytest.raises(CheckpointUnreadable):
        job_state_from_bytes(make_bytes(data))


def test_a_checkpoint_that_does_not_fit_the_job_raises_cannot_resume_before_training() -> None:
    configs = [TrialConfig(**{**SMALL, "epochs": 6, "dropout": 0.2, "seed": seed}) for seed in (0, 1)]
    _, _, _, data = _run(configs, stop_after=3)
    state = job_state_from_bytes(data)
    seen: list = []

    other_trials = [config.model_copy(update={"lr": 0.5}) for config in configs]
    with pytest.raises(CannotResume, match="other trials"):
        train_fused(other_trials, resume=state, on_epoch=seen.append)
    # A GPU generator's state (a device: auto job that ran on a GPU) does not fit a CPU generator.
    zeros = torch.zeros(16, dtype=torch.uint8)
    alien = dataclasses.replace(state, trials=[dataclasses.replace(t, noise_generator=zeros) for t in state.trials])
    with pytest.raises(CannotResume, match="does not fit this run"):
        train_fused(configs, resume=alien, on_epoch=seen.append)
    assert seen == []
