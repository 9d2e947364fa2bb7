"""One trial alone: the one-trial loop fitscope used to run vs the stacked engine (a stack of one).

Every trial now trains in the stack (worker/training/fused.py); the loop it replaced lives on as
tests/unit/reference_loop.py (an nn.Module, torch.optim with fused kernels, torch's schedulers).
For each configuration below, the same trial is trained both ways on one torch thread (as a
worker's training process does), warmed up, then timed --repeats times, interleaved (the fastest
run of each counts: the machine may be shared; times are the process's CPU time). Prints both
fastest times, stack / loop of those (above 1.00 the stack is slower), the median stack / loop of
the runs taken back to back (less swayed by one lucky run), and the gap between the two final
validation losses (float rounding, or other draws where the config has dropout or input noise).

    .venv/bin/python bench/single.py [--repeats 9] [--only NAME]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from services.trial_config import TrialConfig  # noqa: E402
from tests.unit.reference_loop import train_trial as loop_trial  # noqa: E402
from worker.training import train_trial  # noqa: E402
from worker.training.memory import keep_freed_memory  # noqa: E402

CONFIGS = {
    "default (moons, 64x2, adam, batch 32)": dict(epochs=60),
    "many steps (n_train 2000, batch 32)": dict(n_train=2000, epochs=5),
    "full batch sgd, 200 epochs": dict(optimizer="sgd", lr=0.1, batch_size="full", epochs=200),
    "batch norm + dropout, 128x2": dict(width=128, norm="batch", dropout=0.2, epochs=10, n_train=500),
    "layer norm, one_cycle, clip, l1": dict(norm="layer", schedule="one_cycle", grad_clip=1.0, l1=1e-4,
                                            optimizer="momentum", epochs=20),
    "wide (spirals, 512x3, batch 64)": dict(dataset="spirals", width=512, depth=3, batch_size=64, n_train=1000,
                                            epochs=3),
    "linear regression, poly 5": dict(dataset="sine", model="linear", poly_degree=5, epochs=100),
}


def timed(train, config: TrialConfig) -> tuple[float, float | None]:
    # CPU time of this process, not wall time: on a shared machine, waiting for a core is not
    # training (one torch thread, so the CPU time is the trial's own work).
    started = time.process_time()
    result = train(config)
    return time.process_time() - started, result.final_metrics["final_val_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9, help="timed runs of each way (the fastest counts)")
    parser.add_argument("--only", help="run only the configurations whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()  # as a worker's training process does (worker/celery_app.py)
    print(f"torch {torch.__version__}, 1 thread, best of {args.repeats}")
    print(f"{'configuration':40s} {'loop':>8s} {'stack':>8s} {'stack/loop':>10s} {'median pair':>11s}"
          "  final val_loss gap")
    ratios = []
    for name, overrides in CONFIGS.items():
        if args.only and args.only not in name:
            continue
        config = TrialConfig(**overrides)
        timed(loop_trial, config), timed(train_trial, config)  # warm-up: lazy imports and first-call costs
        loop_runs, stack_runs = [], []
        for _ in range(args.repeats):  # interleaved, so a load change on a shared machine hits both ways
            loop_runs.append(timed(loop_trial, config))
            stack_runs.append(timed(train_trial, config))
        (loop_s, loop_loss), (stack_s, stack_loss) = min(loop_runs), min(stack_runs)
        ratios.append(stack_s / loop_s)
        paired = statistics.median(stack[0] / loop[0] for loop, stack in zip(loop_runs, stack_runs, strict=True))
        gap = abs(loop_loss - stack_loss) if None not in (loop_loss, stack_loss) else float("nan")
        print(f"{name:40s} {loop_s:7.3f}s {stack_s:7.3f}s {stack_s / loop_s:9.2f}x {paired:10.2f}x  {gap:.1e}")
    if ratios:
        print(f"slowest stack/loop: {max(ratios):.2f}x (the rule: a single trial at most 1.05x through the stack)")


if __name__ == "__main__":
    main()
