"""What the service costs over training directly.

Runs the same 40 small trials (20 epochs each) both ways in one go, --rounds times (default 3), each
round in the order direct, service, service, direct:
  direct  - the training function called in a loop in this process, no database, no queue;
  service - submitted (one transaction), queued on a real Valkey broker, trained by a real
            `fitscope worker` process that writes one row per epoch into SQLite; timed from submit
            until the last trial ended (the latest finished_at the worker recorded, read once a poll
            every 0.1 s, as `fitscope submit --wait` polls, sees every trial ended: the poll alone
            would add half its interval to each run, a delay of the bench's, not the service's; the
            total says what the poll saw too). finished_at is stamped as the trial's final write
            begins, so the last write itself (~2 ms) is left out of each run.
and prints both wall times and their ratio per round, then the median of the rounds' ratios: this
VM's speed drifts by tens of percent within a minute, and one round's ratio moved from +3% to +27%
between two runs of the same code; the median of several rounds moves less. Both sides use one torch
thread per training process.

Wall time on a shared machine also counts other people's work, so the CPU seconds of each side are
printed too (Linux): the direct loop's own, and the service's worker processes (main and training)
plus its broker, read from /proc around each run; their ratio is the service's cost in work done,
which another process's load moves less than the wall-clock one. Both sides keep freed memory in
the process (worker.training.memory), as a worker's training process does. Less still moves the share the
worker logs for each job: the CPU its training process spent around the engine (claim, rows,
status) over the CPU it spent in the engine, measured within the job, so the machine's drift during
the job slows both alike.

    .venv/bin/python bench/overhead.py [--trials 40] [--epochs 20]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
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
from services.queue import enqueue_jobs, make_celery  # noqa: E402
from services.spec import expand, parse_spec  # noqa: E402
from services.submission import submit  # noqa: E402
from tests.servers import WorkerProcess, fitscope_env  # noqa: E402
from worker.training.memory import keep_freed_memory  # noqa: E402


def bench_spec(trials: int, epochs: int) -> str:
    # 40 distinct configurations: 10 learning rates x 4 seeds, on moons.
    lrs = [round(0.002 * (i + 1), 4) for i in range(max(1, trials // 4))]
    return (
        "name: overhead-bench\nmethod: grid\nseeds: [0, 1, 2, 3]\nparameters:\n"
        "  dataset: {value: moons}\n  n_train: {value: 500}\n  width: {value: 64}\n  depth: {value: 2}\n"
        f"  batch_size: {{value: 32}}\n  epochs: {{value: {epochs}}}\n  lr: {{values: {lrs}}}\n"
    )


def _stat(stat: Path) -> tuple[int, float]:
    """(process group, CPU seconds (user + system) used so far, its own threads included) from a
    /proc/PID/stat file."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[2]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """CPU seconds that process ``pid`` has used so far."""
    return _stat(Path(f"/proc/{pid}/stat"))[1]


def group_cpu_s(group: int) -> float:
    """CPU seconds of the live processes of process group ``group`` (a worker and its training processes)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            of, seconds = _stat(stat)
        except OSError:  # ended meanwhile
            continue
        if of == group:
            total += seconds
    return total


# worker/jobs.py logs this for every job.
JOB_CPU = re.compile(r"CPU ([0-9.]+) s in the engine, ([0-9.]+) s around it")


def recorded_end(engine, experiment_id: int) -> float:
    """The epoch seconds at which the experiment's last trial ended, as the worker recorded it."""
    from datetime import UTC

    from sqlalchemy import func, select

    from services.models import Trial

    with session_scope(engine) as session:
        ended_at = session.scalar(select(func.max(Trial.finished_at)).where(Trial.experiment_id == experiment_id))
    return (ended_at if ended_at.tzinfo else ended_at.replace(tzinfo=UTC)).timestamp()  # SQLite keeps no zone


def run_direct(configs) -> tuple[float, float]:
    """Wall and CPU seconds of training ``configs`` one after another in this process."""
    from worker.training import train_trial

    started, cpu_started = time.perf_counter(), time.process_time()
    for config in configs:
        result = train_trial(config)
        assert result.status == "succeeded", result
    return time.perf_counter() - started, time.process_time() - cpu_started


class Service:
    """A real broker, a migrated SQLite file and one warm `fitscope worker` process."""

    def __init__(self, workdir: Path) -> None:
        self.broker = start_embedded_broker(data_dir=workdir / "valkey", port=free_port())
        database_url = f"sqlite:///{workdir / 'bench.db'}"
        upgrade(database_url)
        env = fitscope_env(database_url=database_url, broker_url=self.broker.url, home=workdir,
                           FITSCOPE_TORCH_THREADS="1")
        self.worker = WorkerProcess(env, workdir / "worker.log")
        self.worker.wait_ready()
        self.engine = make_engine(database_url)
        self.producer = make_celery(Settings(database_url=database_url, broker_url=self.broker.url))

    def cpu_s(self) -> float:
        """CPU seconds used so far by the worker's processes and the broker."""
        return group_cpu_s(self.worker.process.pid) + process_cpu_s(self.broker.process.pid)

    def run(self, spec_text: str) -> tuple[float, float, float, int, tuple[float, float]]:
        """Submit, queue, and poll the database until every trial has ended: wall seconds to the last
        trial's recorded end and to the poll that saw it, the CPU seconds of the worker and the broker
        meanwhile, the epoch rows written, and the CPU seconds the worker's jobs logged (in the engine,
        around it)."""
        spec = parse_spec(spec_text)
        log_start = len(self.worker.log())
        started, started_at, cpu_started = time.perf_counter(), time.time(), self.cpu_s()
        with session_scope(self.engine) as session:
            submitted = submit(session, spec=spec, spec_text=spec_text, submitted_by="bench", max_trials=10_000)
        enqueue_jobs(self.producer, [([trial_id], queue) for trial_id, queue in submitted.trials])
        while True:
            with session_scope(self.engine) as session:
                summary = get_experiment(session, submitted.experiment_id)
            if summary.finished:
                break
            time.sleep(0.1)  # as `fitscope submit --wait` polls
        seen, cpu = time.perf_counter() - started, self.cpu_s() - cpu_started
        assert summary.counts["succeeded"] == summary.trials, summary.counts
        elapsed = recorded_end(self.engine, submitted.experiment_id) - started_at
        time.sleep(0.2)  # the last job's log line
        jobs = [tuple(map(float, found)) for found in JOB_CPU.findall(self.worker.log()[log_start:])]
        assert len(jobs) in (0, summary.trials), f"{len(jobs)} job CPU lines for {summary.trials} trials"
        return elapsed, seen, cpu, summary.epochs_done, (sum(j[0] for j in jobs), sum(j[1] for j in jobs))

    def close(self) -> None:
        self.engine.dispose()
        self.worker.stop()
        self.broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of direct, service, service, direct")
    args = parser.parse_args()
    spec_text = bench_spec(args.trials, args.epochs)
    configs = expand(parse_spec(spec_text), max_trials=10_000)
    print(f"{len(configs)} trials x {args.epochs} epochs (moons, n_train 500, width 64, depth 2, batch 32), "
          f"{os.cpu_count()} CPUs, 1 torch thread per training process")
    import torch

    from worker.training import train_trial

    torch.set_num_threads(1)
    keep_freed_memory()  # as the worker's training process does (worker/celery_app.py)
    train_trial(configs[0].model_copy(update={"epochs": 1}))  # warm, as the worker's process is
    # direct, service, service, direct: a slow drift of the machine's speed cancels out of each round's sums.
    totals = {"direct": 0.0, "service": 0.0}
    cpu_totals = {"direct": 0.0, "service": 0.0}
    ratios, cpu_ratios = [], []
    in_worker = [0.0, 0.0]  # CPU seconds the jobs logged: in the engine, around it
    polled = 0.0  # the service's seconds as the poll saw them
    with tempfile.TemporaryDirectory(prefix="fitscope-bench-") as workdir:
        stack = Service(Path(workdir))
        try:
            for round_number in range(1, args.rounds + 1):
                sums = {"direct": 0.0, "service": 0.0}
                cpu_sums = {"direct": 0.0, "service": 0.0}
                for order in ("direct", "service", "service", "direct"):
                    if order == "direct":
                        seconds, cpu = run_direct(configs)
                        print(f"direct  (train_trial in a loop)                    {seconds:8.2f} s  cpu {cpu:6.2f} s")
                    else:
                        seconds, seen, cpu, epoch_rows, (engine_cpu, around_cpu) = stack.run(spec_text)
                        polled += seen
                        in_worker[0] += engine_cpu
                        in_worker[1] += around_cpu
                        print(f"service (submit, broker, worker, {epoch_rows} epoch rows) {seconds:8.2f} s  "
                              f"cpu {cpu:6.2f} s")
                    sums[order] += seconds
                    cpu_sums[order] += cpu
                ratios.append(sums["service"] / sums["direct"])
                cpu_ratios.append(cpu_sums["service"] / cpu_sums["direct"])
                print(f"round {round_number}: direct {sums['direct']:.2f} s, service {sums['service']:.2f} s, "
                      f"overhead {100 * (ratios[-1] - 1):+.1f}%; cpu overhead {100 * (cpu_ratios[-1] - 1):+.1f}%")
                for side in totals:
                    totals[side] += sums[side]
                    cpu_totals[side] += cpu_sums[side]
        finally:
            stack.close()
    direct, service = totals["direct"], totals["service"]
    print(f"total: direct {direct:.2f} s, service {service:.2f} s (the 0.1 s poll saw it at {polled:.2f} s)")
    cpu_median = statistics.median(cpu_ratios)
    print(f"cpu: direct {cpu_totals['direct']:.2f} s, service {cpu_totals['service']:.2f} s (worker and broker "
          f"processes), ratio {cpu_median:.3f} (overhead {100 * (cpu_median - 1):+.1f}%, the median of "
          f"{len(cpu_ratios)} rounds)")
    if in_worker[0]:  # a worker older than this bench logs no CPU per job
        print(f"inside the worker's training process: {in_worker[1]:.2f} s CPU around the engine for "
              f"{in_worker[0]:.2f} s in it ({100 * in_worker[1] / in_worker[0]:.1f}%; claim, rows and status, per job)")
    median = statistics.median(ratios)
    print(f"ratio service/direct = {median:.3f}  (overhead {100 * (median - 1):+.1f}%, the median of "
          f"{len(ratios)} rounds; all rounds together {100 * (service / direct - 1):+.1f}%)")


if __name__ == "__main__":
    main()
