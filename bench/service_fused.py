"""Fused execution through the real service, fuse off against fuse on, side by side in one run.

Grid (a) of bench/fused.py (64 trials: 16 learning rates x 4 seeds, width 64, depth 2, moons, adam,
20 epochs) submitted to one real service: an embedded Valkey broker on a free port, a migrated SQLite
file in a temp folder, and one `fitscope worker --concurrency 2` (two training processes, one torch
thread each). Three ways:
  fuse off      - one run_job message per trial; the two processes share the 64 messages;
  fuse on       - planned with the worker's online training processes as slots (services.planner):
                  two fused jobs of 32, one per process;
  fuse, 1 job   - the grid as one fused job (as planned before slots were counted), by raising
                  the smallest half to the whole grid; one process trains, the other waits.
Each run is timed from just before submit until every trial is terminal (the database polled every
0.1 s, as `fitscope submit --wait` does). A first run of each way warms the training processes
on a 1-epoch grid; then the ways run interleaved, --repeats times, and the fastest run of each
counts. Prints trials/second each way, the ratios, and the jobs each fused run used.
Every process it starts is stopped on the way out, also on Ctrl-C or SIGTERM.

    .venv/bin/python bench/service_fused.py [--epochs 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.broker import free_port, start_embedded_broker  # noqa: E402
from services.config import Settings  # noqa: E402
from services.db import make_engine, session_scope  # noqa: E402
from services.migrate import upgrade  # noqa: E402
from services.queries import get_experiment  # noqa: E402
from services.queue import enqueue_submission, make_celery  # noqa: E402
from services.spec import expand, parse_spec  # noqa: E402
from services.submission import submit  # noqa: E402
from services.workers import training_processes  # noqa: E402
from tests.servers import WorkerProcess, fitscope_env  # noqa: E402

CONCURRENCY = 2
SEEDS, LEARNING_RATES = 4, 16
# name -> submit's fuse options; min trials above the grid's size keeps the whole grid in one job.
WAYS = {
    "fuse off": {"fuse": False},
    "fuse on": {"fuse": True},
    "fuse, 1 job": {"fuse": True, "fuse_min_trials": SEEDS * LEARNING_RATES},
}


def grid_spec(*, epochs: int, learning_rates: int = LEARNING_RATES) -> str:
    """Grid (a) of bench/fused.py as a spec: the same learning rates and seeds, every other
    parameter at its default (adam, moons' default size and split, batch 32)."""
    lrs = [round(0.001 * (i + 1), 4) for i in range(learning_rates)]
    return (f"name: service-fused-bench\nmethod: grid\nseeds: {list(range(SEEDS))}\nparameters:\n"
            f"  dataset: {{value: moons}}\n  width: {{value: 64}}\n  depth: {{value: 2}}\n"
            f"  epochs: {{value: {epochs}}}\n  lr: {{values: {lrs}}}\n")


class Service:
    """A real broker, a migrated SQLite file and one warm `fitscope worker --concurrency 2`."""

    def __init__(self) -> None:
        self.broker = self.worker = self.engine = None

    def start(self, workdir: Path) -> None:
        """Each part is kept as soon as it runs, so close() stops it even if a later one fails."""
        self.broker = start_embedded_broker(data_dir=workdir / "valkey", port=free_port())
        database_url = f"sqlite:///{workdir / 'bench.db'}"
        upgrade(database_url)  # as `fitscope db upgrade` does
        self.settings = Settings(database_url=database_url, broker_url=self.broker.url)
        env = fitscope_env(database_url=database_url, broker_url=self.broker.url, home=workdir,
                           FITSCOPE_TORCH_THREADS="1")
        self.worker = WorkerProcess(env, workdir / "worker.log", "--concurrency", str(CONCURRENCY))
        self.worker.wait_ready(processes=CONCURRENCY)
        self.engine = make_engine(database_url)
        self.producer = make_celery(self.settings)
        self._wait_online()

    def _wait_online(self, timeout_s: float = 30) -> None:
        """Until the worker's row says its processes are online: the fused plan reads it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with session_scope(self.engine) as session:
                if training_processes(session, "cpu", lost_after_s=self.settings.worker_lost_after_s) >= CONCURRENCY:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"the worker did not register {CONCURRENCY} processes:\n{self.worker.log()[-2000:]}")

    def run(self, spec_text: str, **fuse_options) -> tuple[float, list[int]]:
        """Submit, send, and poll the database until every trial has ended. Returns the wall seconds
        and the number of trials in each message sent."""
        spec = parse_spec(spec_text)
        started = time.perf_counter()
        with session_scope(self.engine) as session:
            submitted = submit(session, spec=spec, spec_text=spec_text, submitted_by="bench", max_trials=10_000,
                               **fuse_options)
        enqueue_submission(self.producer, submitted)
        while True:
            with session_scope(self.engine) as session:
                summary = get_experiment(session, submitted.experiment_id)
            if summary.finished:
                break
            time.sleep(0.1)
        elapsed = time.perf_counter() - started
        assert summary.counts["succeeded"] == summary.trials, summary.counts
        return elapsed, [len(ids) for ids, _ in submitted.jobs]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
        if self.worker is not None:
            self.worker.stop()
        if self.broker is not None:
            self.broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each way (the fastest counts)")
    args = parser.parse_args()
    spec_text = grid_spec(epochs=args.epochs)
    trials = len(expand(parse_spec(spec_text), max_trials=10_000))
    print(f"{trials} trials x {args.epochs} epochs (moons, width 64, depth 2, adam), one `fitscope worker "
          f"--concurrency {CONCURRENCY}` (1 torch thread per process), SQLite, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    # SIGTERM ends the run like Ctrl-C, so the finally below stops the worker and the broker.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    best: dict[str, tuple[float, list[int]]] = {}
    with tempfile.TemporaryDirectory(prefix="fitscope-bench-") as workdir:
        service = Service()
        try:
            service.start(Path(workdir))
            warm_up = grid_spec(epochs=1, learning_rates=CONCURRENCY * 2)  # both code paths, both processes
            for options in WAYS.values():
                service.run(warm_up, **options)
            for _ in range(args.repeats):  # interleaved, so a load change on a shared machine hits every way
                for name, options in WAYS.items():
                    seconds, jobs = service.run(spec_text, **options)
                    print(f"  {name:<12} {seconds:6.2f} s  ({len(jobs)} messages)", flush=True)
                    if name not in best or seconds < best[name][0]:
                        best[name] = (seconds, jobs)
        finally:
            service.close()
    off_s, on_s, one_s = (best[name][0] for name in WAYS)
    for name, (seconds, jobs) in best.items():
        shown = f"{len(jobs)} jobs of {'/'.join(map(str, jobs))} trials" if len(jobs) < trials else f"{len(jobs)} jobs"
        print(f"{name:<12} {trials / seconds:6.1f} trials/s ({seconds:6.2f} s, {shown})")
    print(f"ratio fuse on / fuse off = {off_s / on_s:.2f}x;  fuse on / one fused job = {one_s / on_s:.2f}x  "
          f"(load average {os.getloadavg()[0]:.1f}: two processes gain over one only where two cores are free)")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; the worker and the broker this bench started are stopped")
