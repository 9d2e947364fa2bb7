"""Fused execution against one trial at a time, side by side in one process.

Two grids, each trained both ways on one torch thread (as a worker's training process does):
  (a) 64 trials: width 64, depth 2, moons (16 learning rates x 4 seeds), adam, 20 epochs
  (b) 16 trials: width 256, depth 2, moons (4 learning rates x 4 seeds), adam, 20 epochs
  one-by-one - worker.training.train_trial (a stack of one) called once per trial;
  fused      - worker/training/fused.py train_fused called once with every trial.
Both ways are warmed up, then timed --repeats times, interleaved (the fastest run of each counts:
the machine may be shared); prints trials/second for each and their ratio, and the largest gap
between the two ways' final validation losses (a sanity check; tests/unit/test_fused.py tests parity).
Then where one more fused run spends its time (this process's CPU seconds, so a shared machine
inflates it less than the wall clock): the training steps, the snapshot frames taken after epochs,
the trials' ends (test set, artifacts), and the rest (set-up, each epoch's evaluation and metrics),
each beside its matmul GFLOP and the share of the peak that makes (evaluations without gradients
count: on grid (a) the snapshots' pictures are two thirds of the FLOPs).

Then the ceiling: both ways do the same matrix-multiply FLOPs (counted with torch's
FlopCounterMode, forward and backward), so no way can be faster than those FLOPs at this core's
peak (a 1024x1024 sgemm in CPU seconds, best of several, measured again after each grid). Where
fused is near that floor, only fewer FLOPs, not less overhead, would raise the ratio.

    .venv/bin/python bench/fused.py [--epochs 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from services.trial_config import TrialConfig  # noqa: E402
from worker.training import fused as engine  # noqa: E402
from worker.training import train_trial  # noqa: E402
from worker.training.fused import train_fused  # noqa: E402
from worker.training.memory import keep_freed_memory  # noqa: E402

GRIDS = {
    "(a) 64 trials, width 64": dict(trials=64, width=64),
    "(b) 16 trials, width 256": dict(trials=16, width=256),
}


def grid(*, trials: int, width: int, epochs: int) -> list[TrialConfig]:
    seeds = 4
    lrs = [round(0.001 * (i + 1), 4) for i in range(trials // seeds)]
    return [TrialConfig(dataset="moons", width=width, depth=2, lr=lr, seed=seed, epochs=epochs)
            for lr in lrs for seed in range(seeds)]


def one_by_one(configs: list[TrialConfig]) -> tuple[float, list[float]]:
    started = time.perf_counter()
    results = [train_trial(config) for config in configs]
    return time.perf_counter() - started, [r.final_metrics["final_val_loss"] for r in results]


def fused(configs: list[TrialConfig]) -> tuple[float, list[float]]:
    started = time.perf_counter()
    results = train_fused(configs)
    return time.perf_counter() - started, [r.final_metrics["final_val_loss"] for r in results]


# The engine's parts a breakdown times (module-level functions of worker/training/fused.py).
PARTS = {"training steps": "_train_one_epoch", "snapshots": "_take_snapshots", "trial ends": "trial_results"}


def _by_part(spent: dict[str, float], *, measure) -> ExitStack:
    """Patches that add to ``spent[part]`` what ``measure()`` grew by across each call of a part."""
    def counted(part: str, function):
        def run(*args, **kwargs):
            before = measure()
            try:
                return function(*args, **kwargs)
            finally:
                spent[part] += measure() - before
        return run

    patches = ExitStack()
    for part, name in PARTS.items():
        patches.enter_context(mock.patch.object(engine, name, counted(part, getattr(engine, name))))
    return patches


def breakdown(configs: list[TrialConfig]) -> tuple[float, dict[str, float]]:
    """One fused run's CPU seconds in all, and in each of PARTS."""
    spent: dict[str, float] = defaultdict(float)
    with _by_part(spent, measure=time.process_time):
        started = time.process_time()
        train_fused(configs)
        return time.process_time() - started, dict(spent)


def peak_gflops() -> float:
    """This core's float32 matmul rate at its best: a 1024x1024 sgemm, best of several runs, in this
    process's CPU seconds (wall seconds on a shared machine count the time other processes held the
    core, and a peak measured low flatters every share of it)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = math.inf
    for _ in range(5):
        started = time.process_time()
        for _ in range(10):
            a @ b
        best = min(best, (time.process_time() - started) / 10)
    return 2 * 1024 ** 3 / best / 1e9


def matmul_gflop(configs: list[TrialConfig]) -> tuple[float, float, dict[str, float]]:
    """(one-by-one, fused) matrix-multiply GFLOP of training the grid, forward and backward, and the
    fused run's GFLOP in each of PARTS (evaluations under no_grad count too: snapshots, epochs' metrics)."""
    with FlopCounterMode(display=False) as solo:
        one_by_one(configs)
    parts: dict[str, float] = defaultdict(float)
    with FlopCounterMode(display=False) as stacked, _by_part(parts, measure=lambda: stacked.get_total_flops() / 1e9):
        fused(configs)
    return solo.get_total_flops() / 1e9, stacked.get_total_flops() / 1e9, dict(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each way (the fastest counts)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()  # as a worker's training process does (worker/celery_app.py)
    peak = peak_gflops()
    print(f"torch {torch.__version__}, 1 thread, {args.epochs} epochs per trial; "
          f"this core's matmul peak {peak:.0f} GFLOP/s")
    for name, shape in GRIDS.items():
        configs = grid(**shape, epochs=args.epochs)
        one_by_one(configs[:2]), fused(configs[:2])  # warm-up: lazy imports and first-call costs
        solo_runs, fused_runs = [], []
        for _ in range(args.repeats):  # interleaved, so a load change on a shared machine hits both ways
            solo_runs.append(one_by_one(configs))
            fused_runs.append(fused(configs))
        (solo_s, solo_loss), (fused_s, fused_loss) = (min(runs, key=lambda r: r[0]) for runs in (solo_runs, fused_runs))
        gap = max(abs(a - b) for a, b in zip(solo_loss, fused_loss, strict=True))
        print(f"{name}: one-by-one {len(configs) / solo_s:7.1f} trials/s ({solo_s:6.2f} s), "
              f"fused {len(configs) / fused_s:7.1f} trials/s ({fused_s:6.2f} s), "
              f"ratio {solo_s / fused_s:5.1f}x; largest final val_loss gap {gap:.1e}")
        solo_gflop, fused_gflop, part_gflop = matmul_gflop(configs)
        peak = max(peak, peak_gflops())  # again: the best seen so far is the nearest to the core's own
        floor_s = fused_gflop / peak
        print(f"    matmuls: {solo_gflop:.1f} GFLOP one-by-one, {fused_gflop:.1f} GFLOP fused; at the peak no way "
              f"takes under {floor_s:.2f} s, so the ratio cannot pass {solo_s / floor_s:.1f}x here "
              f"(by the wall clock, fused runs at {floor_s / fused_s:.0%} of the peak, {peak:.0f} GFLOP/s)")
        total, parts = breakdown(configs)
        parts["the rest"] = total - sum(parts.values())
        part_gflop["the rest"] = fused_gflop - sum(part_gflop.values())
        # The peak is in CPU seconds: so is this share (the wall clock's above counts a shared core's waits).
        share = fused_gflop / peak / total
        print(f"    fused, CPU seconds: {total:.2f} in all ({share:.0%} of the peak); " + ", ".join(
            f"{part} {seconds:.2f} ({part_gflop.get(part, 0.0):.1f} GFLOP, "
            f"{part_gflop.get(part, 0.0) / peak / max(seconds, 1e-9):.0%} of the peak)"
            for part, seconds in parts.items()))

if __name__ == "__main__":
    main()
