"""Fused on a GPU against one trial at a time on the same GPU, side by side in one process.

Grid (a) of bench/fused.py widened to 256 trials (64 learning rates x 4 seeds; width 64, depth 2,
moons, adam, 20 epochs), trained on CUDA both ways:
  one-by-one - worker.training.train_trial once per trial (a stack of one: a GPU kept busy by
               kernel launches of tiny matmuls, as any one-model-per-trial tool runs);
  fused      - worker/training/fused.py train_fused once with all 256 trials.
Both ways are warmed up, then timed --repeats times, interleaved (the fastest counts), with the GPU
synchronised before each clock read. Prints trials/second each way, the ratio, and the largest gap
between the two ways' final validation losses (a sanity check). Exits with one sentence, code 2,
where there is no CUDA GPU.

    .venv/bin/python bench/gpu.py [--epochs 20] [--repeats 1] [--trials 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from fused import grid  # noqa: E402 - bench/fused.py's grid (a), one definition

from worker.training import train_trial  # noqa: E402
from worker.training.fused import train_fused  # noqa: E402


def timed(run) -> tuple[float, list[float]]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    results = run()
    torch.cuda.synchronize()
    return time.perf_counter() - started, [r.final_metrics["final_val_loss"] for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each way (the fastest counts)")
    parser.add_argument("--trials", type=int, default=256, help="a multiple of 4 (4 seeds per learning rate)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"bench/gpu.py needs a CUDA GPU, and torch {torch.__version__} sees none on this machine "
                 f"(built for CUDA {torch.version.cuda or 'none: a CPU-only build'}); run it where "
                 "torch.cuda.is_available() is True.", file=sys.stderr)
        sys.exit(2)
    configs = grid(trials=args.trials, width=64, epochs=args.epochs)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}); "
          f"{len(configs)} trials x {args.epochs} epochs (moons, width 64, depth 2, adam)", flush=True)
    ways = {"one-by-one": lambda: [train_trial(config, device="cuda") for config in configs],
            "fused": lambda: train_fused(configs, device="cuda")}
    train_fused(configs[:2], device="cuda"), train_trial(configs[0], device="cuda")  # CUDA context, kernels
    best: dict[str, tuple[float, list[float]]] = {}
    for _ in range(args.repeats):  # interleaved, so a load change hits both ways
        for name, run in ways.items():
            seconds, losses = timed(run)
            print(f"  {name:<10} {seconds:8.2f} s", flush=True)
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, losses)
    (solo_s, solo_loss), (fused_s, fused_loss) = best["one-by-one"], best["fused"]
    gap = max(abs(a - b) for a, b in zip(solo_loss, fused_loss, strict=True))
    print(f"one-by-one {len(configs) / solo_s:8.1f} trials/s ({solo_s:7.2f} s)")
    print(f"fused      {len(configs) / fused_s:8.1f} trials/s ({fused_s:7.2f} s)")
    print(f"largest final val_loss gap {gap:.1e}; peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"fused vs one at a time on CUDA: {solo_s / fused_s:.1f}x")


if __name__ == "__main__":
    main()
