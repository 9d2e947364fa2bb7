"""fitscope against a plain PyTorch loop (and Ray Tune and Optuna where installed), one run, one grid.

The reference grid: 64 MLPs (width 64, depth 2, ReLU) on 2,000 training rows of 20 features (the
`linear` data set), batch 64, 10 epochs, SGD with momentum 0.9, 32 learning rates x 2 seeds.

  fitscope     - `fitscope up` exactly as a user starts it, nothing configured but a fresh
                 FITSCOPE_HOME and free ports (so: the embedded broker, SQLite, the default worker
                 concurrency, the dashboard too); timed from submit (services.actions.submit, what
                 `fitscope submit` calls) until the last trial ended: the latest finished_at the
                 worker recorded, read once a poll every 0.1 s sees every trial ended (the poll alone
                 would add half its interval on average, a delay of the bench's, not the service's;
                 the line says when the poll saw it too). It also evaluates the train and validation
                 sets every epoch and writes every row.
  plain loop   - the same data (fitscope's own draw of it), the same model, optimizer and steps, one
                 trial after another in this process with as many torch threads as usable CPUs, no
                 evaluation, nothing written.
  Ray Tune     - (when `ray` is importable) Tuner over a grid_search of the same 64, one CPU per
                 trial, each trial the plain loop with one thread.
  Optuna       - (when `optuna` is importable) a study with GridSampler over the same 64, the
                 plain loop as its objective, run as its users do (n_jobs=1).

The last line is `fitscope vs plain loop: N.Nx` (plain loop seconds / fitscope seconds: above 1 is
fitscope faster), against the FASTER of the loop with as many threads as cores and the loop with one
thread: on a loaded machine several threads wait on each other, and a ratio against a loop slowed
that way would flatter fitscope. FITSCOPE_* variables of the
calling shell are ignored, so the defaults are measured.

    .venv/bin/python bench/peers.py
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

for _name in [name for name in os.environ if name.startswith("FITSCOPE_")]:
    del os.environ[_name]  # the defaults, in this process and in `fitscope up`

from services.broker import free_port  # noqa: E402
from services.cpus import usable_cpus  # noqa: E402
from services.spec import expand, parse_spec  # noqa: E402

HERE = Path(__file__).resolve().parent.parent
LEARNING_RATES = [round(0.0005 * (i + 1), 4) for i in range(32)]
SEEDS = [0, 1]
WIDTH, DEPTH, FEATURES, ROWS, BATCH, EPOCHS, MOMENTUM = 64, 2, 20, 2000, 64, 10, 0.9

SPEC = f"""name: peers-bench
method: grid
seeds: {SEEDS}
parameters:
  dataset: {{value: linear}}
  n_features: {{value: {FEATURES}}}
  n_train: {{value: {ROWS}}}
  width: {{value: {WIDTH}}}
  depth: {{value: {DEPTH}}}
  batch_size: {{value: {BATCH}}}
  epochs: {{value: {EPOCHS}}}
  optimizer: {{value: momentum}}
  momentum: {{value: {MOMENTUM}}}
  lr: {{values: {LEARNING_RATES}}}
"""


# ---- the plain loop (also what Ray Tune's and Optuna's trials run) ------------------------------

def reference_data():
    """fitscope's own training rows of the grid (every trial draws the same data set)."""
    from worker.training.data import make_dataset

    configs = expand(parse_spec(SPEC))
    assert len({config.data_seed for config in configs}) == 1
    splits = make_dataset(configs[0])
    assert tuple(splits.x_train.shape) == (ROWS, FEATURES), splits.x_train.shape
    return splits.x_train, splits.y_train


def train_one(x, y, *, lr: float, seed: int) -> float:
    """One trial the plain PyTorch way; returns the last epoch's mean training loss."""
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers, width_in = [], x.shape[1]
    for _ in range(DEPTH):
        layers += [nn.Linear(width_in, WIDTH), nn.ReLU()]
        width_in = WIDTH
    model = nn.Sequential(*layers, nn.Linear(width_in, y.shape[1]))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    loss_fn = nn.MSELoss()
    for _ in range(EPOCHS):
        order, total = torch.randperm(len(x), generator=generator), 0.0
        for start in range(0, len(x), BATCH):
            batch = order[start:start + BATCH]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
    return total / len(x)


def plain_loop(x, y, *, threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    train_one(x[:BATCH * 2], y[:BATCH * 2], lr=0.001, seed=0)  # torch's one-time costs, as fitscope's warm-up
    started = time.perf_counter()
    for lr in LEARNING_RATES:
        for seed in SEEDS:
            train_one(x, y, lr=lr, seed=seed)
    return time.perf_counter() - started


# ---- fitscope as `fitscope up` starts it ----------------------------------------------------------

class Up:
    """`fitscope up` in its own process group, its output in a file; Ctrl-C (SIGINT) stops it."""

    def __init__(self, home: Path) -> None:
        self.home, self.broker_port = home, free_port()
        self.env = {**os.environ, "FITSCOPE_HOME": str(home), "FITSCOPE_EMBEDDED_BROKER_PORT": str(self.broker_port),
                    "FITSCOPE_DASHBOARD_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
        self.log_path = home.parent / "up.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "services.cli", "up"], cwd=HERE, env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 180) -> int:
        """Until the worker's training processes have warmed up and the worker is online; returns how
        many processes the banner announced."""
        import re

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fitscope up exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            log = self.log()
            banner = re.search(r"worker +(\d+) training process", log)
            if banner and len(re.findall(r"training process \d+ ready", log)) >= int(banner[1]) and " ready." in log:
                return int(banner[1])
            time.sleep(0.2)
        raise TimeoutError(f"fitscope up not ready after {timeout_s} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def through_fitscope(workdir: Path) -> tuple[float, float, int, int]:
    """Seconds from submit to the last trial ended (as recorded, and as the poll saw it), the training
    processes, and the jobs sent."""
    from datetime import UTC

    from sqlalchemy import func, select

    from services import actions
    from services.config import make_settings
    from services.db import make_engine, session_scope
    from services.models import Trial
    from services.queries import get_experiment
    from services.queue import make_celery
    from services.workers import training_processes

    up = Up(workdir / "home")
    try:
        processes = up.wait_ready()
        settings = make_settings(home=workdir / "home", embedded_broker_port=up.broker_port)
        engine, producer = make_engine(settings.effective_database_url), make_celery(settings)
        deadline = time.monotonic() + 60
        while True:  # the submission splits fused jobs over the processes the worker registered
            with session_scope(engine) as session:
                online = training_processes(session, "cpu", lost_after_s=settings.worker_lost_after_s)
            if online >= processes or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        spec = parse_spec(SPEC)
        started, started_at = time.perf_counter(), time.time()
        submitted = actions.submit(engine, producer, spec=spec, spec_text=SPEC, settings=settings,
                                   submitted_by="bench")
        while True:
            with session_scope(engine) as session:
                summary = get_experiment(session, submitted.experiment_id)
            if summary.finished:
                break
            time.sleep(0.1)
        seen_s = time.perf_counter() - started
        assert summary.counts["succeeded"] == summary.trials == len(LEARNING_RATES) * len(SEEDS), summary.counts
        with session_scope(engine) as session:
            ended_at = session.scalar(select(func.max(Trial.finished_at)).where(
                Trial.experiment_id == submitted.experiment_id))
        if ended_at.tzinfo is None:  # SQLite keeps no zone; the column is UTC
            ended_at = ended_at.replace(tzinfo=UTC)
        engine.dispose()
        return ended_at.timestamp() - started_at, seen_s, processes, len(submitted.jobs)
    finally:
        up.stop()


# ---- the peers, where installed -------------------------------------------------------------------

def through_ray(x, y, cpus: int) -> float:
    import ray
    from ray import tune

    def trainable(config, x=None, y=None):
        import torch

        torch.set_num_threads(1)
        return {"train_loss": train_one(x, y, lr=config["lr"], seed=config["seed"])}

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        started = time.perf_counter()
        tuner = tune.Tuner(tune.with_resources(tune.with_parameters(trainable, x=x, y=y), {"cpu": 1}),
                           param_space={"lr": tune.grid_search(LEARNING_RATES), "seed": tune.grid_search(SEEDS)},
                           tune_config=tune.TuneConfig(metric="train_loss", mode="min"))
        results = tuner.fit()
        elapsed = time.perf_counter() - started
        assert len(results) == len(LEARNING_RATES) * len(SEEDS) and not results.errors, results.errors
        return elapsed
    finally:
        ray.shutdown()


def through_optuna(x, y, threads: int) -> float:
    import optuna
    import torch

    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.GridSampler({"lr": LEARNING_RATES, "seed": SEEDS})
    study = optuna.create_study(direction="minimize", sampler=sampler)
    started = time.perf_counter()
    study.optimize(lambda trial: train_one(x, y, lr=trial.suggest_categorical("lr", LEARNING_RATES),
                                           seed=trial.suggest_categorical("seed", SEEDS)),
                   n_trials=len(LEARNING_RATES) * len(SEEDS))
    elapsed = time.perf_counter() - started
    assert len(study.trials) == len(LEARNING_RATES) * len(SEEDS)
    return elapsed


def main() -> None:
    cpus = usable_cpus()
    trials = len(expand(parse_spec(SPEC)))
    print(f"{trials} MLPs (width {WIDTH}, depth {DEPTH}) on {ROWS} rows x {FEATURES} features, batch {BATCH}, "
          f"{EPOCHS} epochs, SGD momentum {MOMENTUM}, {len(LEARNING_RATES)} learning rates x {len(SEEDS)} seeds; "
          f"{cpus} usable CPUs of {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # the finally blocks stop `fitscope up`
    x, y = reference_data()
    with tempfile.TemporaryDirectory(prefix="fitscope-peers-") as workdir:
        fitscope_s, seen_s, processes, jobs = through_fitscope(Path(workdir))
    print(f"fitscope (fitscope up defaults: {processes} training processes, {jobs} fused jobs, embedded broker, "
          f"SQLite): {fitscope_s:7.2f} s (the 0.1 s poll saw it at {seen_s:.2f} s)", flush=True)
    loop_s = plain_loop(x, y, threads=cpus)
    print(f"plain PyTorch loop ({cpus} torch threads, one trial after another, no evaluation): {loop_s:7.2f} s",
          flush=True)
    # On a loaded machine several torch threads wait on each other (each barrier waits for the slowest
    # core); one thread shows what the loop does without that, so the ratio below can be read fairly.
    single_s = plain_loop(x, y, threads=1) if cpus > 1 else loop_s
    print(f"plain PyTorch loop (1 torch thread, for comparison): {single_s:7.2f} s", flush=True)
    for name, run, module in (("Ray Tune (1 CPU per trial)", lambda: through_ray(x, y, cpus), "ray"),
                              ("Optuna (GridSampler, n_jobs=1)", lambda: through_optuna(x, y, cpus), "optuna")):
        if importlib.util.find_spec(module) is None:
            print(f"{name}: skipped, `{module}` is not installed", flush=True)
        else:
            print(f"{name}: {run():7.2f} s", flush=True)
    print(f"(load average {os.getloadavg()[0]:.1f}; fitscope vs the {cpus}-thread loop: {loop_s / fitscope_s:.1f}x, "
          f"vs the 1-thread loop: {single_s / fitscope_s:.1f}x)")
    print(f"fitscope vs plain loop: {min(loop_s, single_s) / fitscope_s:.1f}x")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; the `fitscope up` this bench started is stopped")
