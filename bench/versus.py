"""This checkout's engine against another checkout's (e.g. main), side by side in one run.

Two training processes, one per checkout (each imports its own worker/ through PYTHONPATH), one
torch thread each; the same fused grids are sent to both in turn, --repeats times, and each reports
the CPU time of train_fused (on a shared machine, waiting for a core is not training). Prints the
fastest run of each, their ratio, and the first trial's final validation loss from each side (equal
when the change kept the numbers).

    .venv/bin/python bench/versus.py /path/to/other/checkout [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
GRIDS = {  # name -> (trials, width, extra settings); 4 seeds per learning rate, moons, 20 epochs
    "(a) 64 trials, width 64": (64, 64, {}),
    "(b) 16 trials, width 256": (16, 256, {}),
    "(c) 64 trials, width 64, layer norm": (64, 64, {"norm": "layer"}),
}

_WORKER = """
import json, sys, time, torch
from services.trial_config import TrialConfig
from worker.training.fused import train_fused
from worker.training.memory import keep_freed_memory
torch.set_num_threads(1)
keep_freed_memory()
grids = {}
for line in sys.stdin:
    trials, width, extra = json.loads(line)
    key = line
    if key not in grids:
        grids[key] = [TrialConfig(dataset="moons", width=width, depth=2, lr=round(0.001 * (i // 4 + 1), 4),
                                  seed=i % 4, epochs=20, **extra) for i in range(trials)]
        train_fused(grids[key][:2])  # warm-up
    started = time.process_time()
    results = train_fused(grids[key])
    print(time.process_time() - started, results[0].final_metrics["final_val_loss"], flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="the other checkout's root folder")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    trees = {"other": args.other.resolve(), "this": HERE}
    workers = {name: subprocess.Popen([sys.executable, "-c", _WORKER], cwd=root, text=True, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(root)})
               for name, root in trees.items()}
    print(f"this: {HERE}, other: {trees['other']}; train_fused CPU seconds, best of {args.repeats}")
    for label, grid in GRIDS.items():
        best, loss = {}, {}
        for _ in range(args.repeats):  # interleaved, so a load change hits both sides
            for name, worker in workers.items():
                worker.stdin.write(json.dumps(grid) + "\n")
                worker.stdin.flush()
                seconds, loss[name] = worker.stdout.readline().split()
                best[name] = min(best.get(name, float("inf")), float(seconds))
        print(f"{label}: other {best['other']:.3f} s, this {best['this']:.3f} s, this/other "
              f"{best['this'] / best['other']:.2f}x; first trial's final val_loss {loss['other']} vs {loss['this']}")
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()


if __name__ == "__main__":
    main()
