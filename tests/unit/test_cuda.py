"""The CUDA path: a fused job on a GPU gives the CPU's numbers to float tolerance, and a job
checkpointed on a GPU resumes there as if never stopped. Skipped, saying why, without a GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from services.trial_config import TrialConfig
from tests.unit.test_fused_resume import _run as run_and_stop
from worker.training.checkpoint import JobState, job_state_from_bytes

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU; torch.cuda.is_available() is False on this machine"),
]

SMALL = dict(n_train=128, n_val=64, n_test=64, width=32, depth=2, batch_size=16, epochs=6)
# No dropout and no input noise: those masks come from a generator on the training device, which
# draws other numbers on a GPU. Weights and data order come from CPU generators on both.
ALIKE = {
    "adam, classification": [dict(lr=lr, seed=seed, optimizer="adam") for lr in (0.003, 0.03) for seed in (0, 1)],
    "momentum, cosine, layer norm, blobs": [
        dict(lr=lr, seed=seed, optimizer="momentum", schedule="cosine", norm="layer", dataset="blobs")
        for lr, seed in ((0.01, 0), (0.05, 1), (0.1, 2))],
    "sgd, regression, clipping": [
        dict(lr=lr, seed=seed, optimizer="sgd", dataset="sine", grad_clip=1.0) for lr, seed in ((0.01, 0), (0.05, 1))],
}
STOP_AFTER = 3


def _run(configs, *, device: str, stop_after: int | None = None, resume: JobState | None = None):
    """The resume tests' runner on ``device``: (results or None, rows, checkpoint bytes or None)."""
    results, rows, _, saved = run_and_stop(configs, device=device, stop_after=stop_after, resume=resume)
    return results, rows, saved


def _numbers(rows) -> list[dict]:
    return [{k: v for k, v in dataclasses.asdict(row).items() if not k.endswith("_seconds")} for row in rows]


def _assert_close(got: list[dict], want: list[dict], *, rel: float, abs_: float, n_val: int) -> None:
    assert [row["epoch"] for row in got] == [row["epoch"] for row in want]
    for got_row, want_row in zip(got, want, strict=True):
        for key, expected in want_row.items():
            if expected is None or key == "epoch":
                assert got_row[key] == expected, key
            elif key.endswith("accuracy"):  # one validation point on the boundary may fall either way
                assert got_row[key] == pytest.approx(expected, abs=1.5 / n_val + 1e-9), (key, got_row["epoch"])
            else:
                assert got_row[key] == pytest.approx(expected, rel=rel, abs=abs_), (key, got_row["epoch"])


@pytest.mark.parametrize("group", ALIKE)
def test_a_fused_job_on_cuda_gives_the_cpus_numbers(group: str) -> None:
    assert not torch.backends.cuda.matmul.allow_tf32, "TF32 matmuls would change the numbers users see"
    configs = [TrialConfig(**{**SMALL, **overrides}) for overrides in ALIKE[group]]
    cpu, cpu_rows, _ = _run(configs, device="cpu")
    gpu, gpu_rows, _ = _run(configs, device="cuda")
    for i in range(len(configs)):
        assert (gpu[i].status, gpu[i].epochs_run) == (cpu[i].status, cpu[i].epochs_run) == ("succeeded", 6)
        _assert_close(_numbers(gpu_rows[i]), _numbers(cpu_rows[i]), rel=1e-3, abs_=1e-5, n_val=SMALL["n_val"])
        for key in ("final_val_loss", "final_train_loss", "test_loss"):
            if cpu[i].final_metrics.get(key) is not None:
                assert gpu[i].final_metrics[key] == pytest.approx(cpu[i].final_metrics[key], rel=1e-3, abs=1e-5), key


def test_a_job_checkpointed_on_cuda_resumes_there_as_if_never_stopped() -> None:
    # Dropout and input noise on: the GPU generator's state is saved and restored too.
    configs = [TrialConfig(**{**SMALL, "lr": lr, "seed": seed, "dropout": 0.2, "input_noise": 0.05,
                              "optimizer": "adam", "schedule": "cosine"})
               for lr, seed in ((0.003, 0), (0.01, 1), (0.03, 2))]
    full, full_rows, _ = _run(configs, device="cuda")
    _, first_rows, data = _run(configs, device="cuda", stop_after=STOP_AFTER)

    state = job_state_from_bytes(data)  # torch.load(weights_only=True) of the bytes a worker stores
    assert state.epoch == STOP_AFTER
    assert state.stack["params"].device.type == "cpu", "checkpoint bytes hold CPU tensors, readable anywhere"
    resumed, resumed_rows, _ = _run(configs, device="cuda", resume=state)

    for i in range(len(configs)):
        assert [row.epoch for row in first_rows[i]] == list(range(1, STOP_AFTER + 1))
        # The same kernels on the same GPU: equal but for the last bits a kernel choice may move.
        _assert_close(_numbers(first_rows[i] + resumed_rows[i]), _numbers(full_rows[i]), rel=1e-6, abs_=1e-7,
                      n_val=SMALL["n_val"])
        assert resumed[i].status == full[i].status == "succeeded"
        assert resumed[i].best_epoch == full[i].best_epoch
