"""What watching a trial fit costs: the same trials trained with their ~20 prediction snapshots
(worker/training/snapshots.py) and without (the engine told the data get no picture), on one torch
thread, interleaved, the fastest of --repeats runs of each counting (CPU time of this process; the
machine may be shared). Prints both times and with / without (above 1.00 the snapshots cost that).

    .venv/bin/python bench/snapshots.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from services.trial_config import TrialConfig  # noqa: E402
from worker.training import fused  # noqa: E402

CONFIGS = {
    "default (moons, 64x2, adam, batch 32), 60 epochs": [dict(epochs=60)],
    "overfitting (moons n_train 40, 256x4, full batch), 300 epochs": [
        dict(n_train=40, width=256, depth=4, batch_size="full", epochs=300)],
    "16 fused trials (moons, 32x2), 100 epochs": [dict(width=32, lr=lr, seed=seed, epochs=100)
                                                   for lr in (0.003, 0.01, 0.03, 0.1) for seed in range(4)],
    "fitted curve (sine, 64x2), 100 epochs": [dict(dataset="sine", epochs=100)],
    "multi-label (multilabel_2d, 64x2), 60 epochs": [dict(dataset="multilabel_2d", epochs=60)],
}


def timed(configs: list[TrialConfig], *, snapshots: bool) -> float:
    started = time.process_time()
    if snapshots:
        fused.train_fused(configs)
    else:
        with mock.patch.object(fused.Snapshots, "of", return_value=None):
            fused.train_fused(configs)
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each way (the fastest counts)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, best of {args.repeats}")
    for name, overrides in CONFIGS.items():
        configs = [TrialConfig(**o) for o in overrides]
        timed(configs, snapshots=True)  # warm-up
        with_s, without_s = [], []
        for _ in range(args.repeats):
            with_s.append(timed(configs, snapshots=True))
            without_s.append(timed(configs, snapshots=False))
        print(f"{name}: with {min(with_s):.3f} s, without {min(without_s):.3f} s, "
              f"with / without {min(with_s) / min(without_s):.2f}")


if __name__ == "__main__":
    main()
