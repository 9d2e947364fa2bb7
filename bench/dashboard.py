"""How fast the dashboard's pages are on a large experiment, on SQLite or PostgreSQL.

Fills a database with one experiment of ``--trials`` trials x ``--epochs`` epochs (5 widths x 2
training-set sizes x 4 optimizers x 5 learning rates x 2 schedules, as many seeds as it takes, on
moons). The grid goes through services.submission.submit; the epoch rows, final metrics and verdicts
are then written in bulk (executemany; COPY on PostgreSQL), not through the engine: synthetic but
plausible curves (train falls to a floor set by capacity and data size, validation is U-shaped for
big models on little data, too large a rate diverges, a few runs blow up and come back). Filling is
not timed.

Then each page is run as a user opens it, with its default choices, by Streamlit's AppTest (the real
page script: reads, selection, database aggregates and figures, served on loopback as `fitscope up`
serves it); each page is opened once untimed first, as a running dashboard has imported its
libraries already. Each page is timed twice: *cold*, every cache emptied first (Streamlit's and the
frames kept per experiment, dashboard/frames.py), so every read goes to the database and every
frame is rebuilt, as on the first view after the experiment changed; and *unchanged*, Streamlit's
caches emptied (their few seconds have passed) but the experiment unchanged since another page was
viewed, so its trials frame is kept (its stamp is still read). It prints both per page and ends with
``slowest page: X.XX s``, the slowest cold page (wall seconds; the process's CPU seconds are printed
beside them, steadier on a shared machine). A page that shows an error stops the bench.

    .venv/bin/python bench/dashboard.py [--trials 10000] [--epochs 100] [--database-url URL] [--repeat 3]
                                        [--page "Fit analysis"]

Without --database-url a temporary SQLite file is used. A database given by URL must be empty, or hold
only what an earlier run of this bench filled with the same --trials and --epochs: that experiment is
then timed again without refilling (filling 10,000 x 100 takes minutes).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.db import make_engine, session_scope  # noqa: E402
from services.migrate import upgrade  # noqa: E402

BAR_S = 1.0
WIDTHS = [4, 16, 64, 256, 1024]
N_TRAIN = [50, 400]
OPTIMIZERS = {"sgd": 0.3, "momentum": 1.0, "adam": 2.0, "adamw": 2.0}  # relative speed at one learning rate
LRS = [0.0003, 0.001, 0.01, 0.1, 1.0]
SCHEDULES = ["constant", "step"]
CONFIGURATIONS = len(WIDTHS) * len(N_TRAIN) * len(OPTIMIZERS) * len(LRS) * len(SCHEDULES)
APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
PAGES = {"Experiments": "app_pages/experiments.py", "Experiment": "app_pages/experiment.py",
         "Fit analysis": "app_pages/fit_analysis.py", "Optimizers and schedules": "app_pages/optimizers.py",
         "Trial": "app_pages/trial.py"}


def bench_spec(*, seeds: int, epochs: int) -> str:
    return (
        f"name: dashboard-bench\nmethod: grid\nseeds: {list(range(seeds))}\nparameters:\n"
        f"  dataset: {{value: moons}}\n  epochs: {{value: {epochs}}}\n  width: {{values: {WIDTHS}}}\n"
        f"  n_train: {{values: {N_TRAIN}}}\n  optimizer: {{values: {list(OPTIMIZERS)}}}\n  lr: {{values: {LRS}}}\n"
        f"  schedule: {{values: {SCHEDULES}}}\n"
    )


def synthetic_run(config: dict, *, epochs: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Train and validation losses per epoch for one trial, and how it ended (succeeded or diverged)."""
    key = (WIDTHS.index(config["width"]), N_TRAIN.index(config["n_train"]), list(OPTIMIZERS).index(config["optimizer"]),
           LRS.index(config["lr"]), SCHEDULES.index(config["schedule"]))
    rng = np.random.default_rng([config["seed"], *key])
    capacity = math.log(config["width"]) / math.log(max(WIDTHS))  # 0.2 .. 1
    data = config["n_train"] / max(N_TRAIN)  # 0.125 .. 1
    speed = OPTIMIZERS[config["optimizer"]] * config["lr"] * 30 * (0.8 if config["schedule"] == "step" else 1.0)
    epoch = np.arange(1, epochs + 1)
    progress = 1 - np.exp(-speed * epoch / epochs * 5)
    floor = 0.35 * (1 - capacity) ** 2 + 0.02
    train = 0.69 - (0.69 - floor * (0.4 + 0.6 * data)) * progress + rng.normal(0, 0.004, epochs)
    # Validation follows train, then rises once a big model has memorised a small training set.
    overfit = max(capacity - 0.5 * data - 0.2, 0) * np.clip(progress - 0.5, 0, None) * 0.8
    val = train + 0.03 + overfit + rng.normal(0, 0.006, epochs)
    if speed * rng.uniform(0.6, 1.4) > 40:  # far too large a step: the loss explodes part way
        stop = int(rng.integers(3, max(4, epochs // 3)))
        return train[:stop], val[:stop], "diverged"
    if 20 < speed and rng.uniform() < 0.3:  # a large step that blows up once and comes back: unstable
        spike = int(rng.integers(1, max(2, epochs // 4)))
        train[spike], val[spike] = 10.0 ** rng.uniform(3, 10), 10.0 ** rng.uniform(3, 10)
    return np.abs(train), np.abs(val), "succeeded"


def synthetic_boundary(config: dict) -> dict:
    """A 60 x 60 decision boundary (the size the engine stores): wigglier for wider models."""
    xs = np.linspace(-1.5, 2.5, 60)
    grid_x, grid_y = np.meshgrid(xs, np.linspace(-1.0, 1.5, 60))
    wiggle = 0.05 * math.log2(config["width"]) * np.sin(grid_x * config["width"] ** 0.5)
    predicted = (grid_y < 0.5 - 0.5 * np.sin(grid_x * 2) + wiggle).astype(int)
    points = np.random.default_rng(config["seed"]).uniform(-1, 2, (300, 2))
    return {"x_range": [-1.5, 2.5], "y_range": [-1.0, 1.5], "resolution": 60, "classes": [0, 1],
            "predicted_class": predicted.tolist(), "probability": np.full((60, 60), 0.9).round(2).tolist(),
            "train_x": points[:, 0].round(3).tolist(), "train_y": points[:, 1].round(3).tolist(),
            "train_label": (points[:, 1] < 0.5).astype(int).tolist()}


def fill(url: str, *, trials: int, epochs: int) -> int:
    """Submit the grid (the first ``trials`` of it) and write every trial's rows in bulk; returns the
    experiment id."""
    from sqlalchemy import bindparam, delete, insert, select, update

    from services.analysis import diagnose
    from services.models import Trial, TrialArtifact
    from services.spec import parse_spec
    from services.submission import submit

    engine = make_engine(url)
    seeds = -(-trials // CONFIGURATIONS)
    text = bench_spec(seeds=seeds, epochs=epochs)
    with session_scope(engine) as session:
        submitted = submit(session, spec=parse_spec(text), spec_text=text, submitted_by="bench",
                           max_trials=seeds * CONFIGURATIONS, fuse=False)
        extra = submitted.trial_ids[trials:]
        if extra:  # the grid has whole seeds; keep the first ``trials``
            session.execute(delete(Trial).where(Trial.id.in_(extra)))
        configs = dict(session.execute(select(Trial.id, Trial.config).where(Trial.id.in_(submitted.trial_ids[:trials]))
                                       ).all())
    epoch_rows, trial_rows, artifacts = [], [], []
    for trial_id, config in configs.items():
        train, val, status = synthetic_run(config, epochs=epochs)
        n = len(train)
        rows = [{"epoch": e + 1, "train_loss": float(train[e]), "val_loss": float(val[e])} for e in range(n)]
        lr = config["lr"] * (0.3 ** (np.arange(n) // 7) if config["schedule"] == "step" else np.ones(n))
        for row, rate in zip(rows, lr, strict=True):
            epoch_rows.append((trial_id, row["epoch"], row["train_loss"], row["val_loss"], 1 - 0.6 * row["train_loss"],
                               1 - 0.6 * row["val_loss"], float(rate), 0.01, row["train_loss"],
                               3 + row["epoch"] * 0.01))
        best = int(np.argmin(val))
        final = {"final_train_loss": float(train[-1]), "final_val_loss": float(val[-1]),
                 "final_train_accuracy": float(1 - 0.6 * train[-1]), "final_val_accuracy": float(1 - 0.6 * val[-1]),
                 "best_val_loss": float(val[best]), "best_val_accuracy": float(1 - 0.6 * val[best]),
                 "test_loss": float(val[best] * 1.02), "baseline_train_loss": 0.693, "baseline_val_loss": 0.693,
                 "parameter_count": 2 * config["width"] + config["width"] ** 2 + 4 * config["width"] + 2}
        found = diagnose(rows, final, status=status)
        trial_rows.append({"id": trial_id, "status": status, "epochs_done": n, "best_epoch": best + 1,
                           "final_metrics": final, "parameter_count": final["parameter_count"],
                           "verdict": found.verdict, "diagnosis": found.as_json()})
        if config["seed"] == 0:
            artifacts.append({"trial_id": trial_id, "kind": "boundary_2d", "data": synthetic_boundary(config)})
    columns = ["trial_id", "epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr", "epoch_seconds",
               "grad_norm", "weight_norm"]
    _bulk_epochs(engine, columns, epoch_rows)
    with engine.begin() as connection:
        statement = (update(Trial.__table__).where(Trial.__table__.c.id == bindparam("trial_id"))
                     .values(status=bindparam("status"), epochs_done=bindparam("epochs_done"),
                             best_epoch=bindparam("best_epoch"), final_metrics=bindparam("final_metrics"),
                             parameter_count=bindparam("parameter_count"), verdict=bindparam("verdict"),
                             diagnosis=bindparam("diagnosis")))
        connection.execute(statement, [{**row, "trial_id": row.pop("id")} for row in trial_rows])
        connection.execute(insert(TrialArtifact.__table__), artifacts)
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            # The planner's statistics as autovacuum leaves them a minute after a worker wrote the rows:
            # a bulk load timed at once would be planned as the empty table it was.
            connection.exec_driver_sql("ANALYZE")
    engine.dispose()
    return submitted.experiment_id


def _bulk_epochs(engine, columns: list[str], rows: list[tuple]) -> None:
    """Epoch rows in bulk: COPY on PostgreSQL, one executemany per 100,000 rows on SQLite."""
    from sqlalchemy import insert

    from services.models import EpochMetric

    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            cursor = connection.connection.cursor()
            with cursor.copy(f"COPY epoch_metrics ({', '.join(columns)}, recorded_at) FROM STDIN") as copy:
                buffer = io.StringIO()
                for row in rows:
                    buffer.write("\t".join(map(str, row)) + "\t2026-01-01T00:00:00Z\n")
                copy.write(buffer.getvalue())
        return
    for start in range(0, len(rows), 100_000):
        with engine.begin() as connection:
            connection.execute(insert(EpochMetric.__table__),
                               [dict(zip(columns, row, strict=True)) for row in rows[start:start + 100_000]])


def time_pages(experiment_id: int, trial_id: int, *, repeat: int = 1, pages: list[str] | None = None
               ) -> list[tuple[str, tuple[float, float], tuple[float, float]]]:
    """Each page (of ``pages``, default all) opened as a user opens it (AppTest runs the real
    script), caches emptied first; the fastest of ``repeat`` openings (wall and CPU seconds each the
    smallest). Every page is still opened once untimed first."""
    import streamlit as st
    from streamlit import config
    from streamlit.testing.v1 import AppTest

    from dashboard import frames

    config.set_option("server.address", "127.0.0.1")  # as `fitscope up` serves it: no sign-in gate
    app = AppTest.from_file(str(APP), default_timeout=600)

    def open_page(name: str, page: str, *, cold: bool = True) -> tuple[float, float]:
        st.cache_data.clear()
        if cold:
            frames.forget()
        started, cpu = time.perf_counter(), time.process_time()
        app.query_params.clear()
        app.query_params.update({"trial": str(trial_id)} if name == "Trial" else {"experiment": str(experiment_id)})
        app.switch_page(page).run()
        if app.exception:
            raise SystemExit(f"{name}: {app.exception[0].message}")
        if app.error:  # a page that stopped with one sentence measures nothing
            raise SystemExit(f"{name}: {app.error[0].value}")
        # The process's CPU seconds too (the page script's thread, SQLite's reads): on a machine shared
        # with other work, the wall seconds measure the neighbours as much as the page.
        return time.perf_counter() - started, time.process_time() - cpu

    app.run()
    # Once untimed: a dashboard process imports plotly, pandas and scipy once, not on every page view.
    for name, page in PAGES.items():
        open_page(name, page)
    def fastest(timings: list[tuple[float, float]]) -> tuple[float, float]:
        return min(wall for wall, _ in timings), min(cpu for _, cpu in timings)

    timed = {name: page for name, page in PAGES.items() if pages is None or name in pages}
    runs = [([open_page(name, page) for name, page in timed.items()],
             [open_page(name, page, cold=False) for name, page in timed.items()]) for _ in range(repeat)]
    cold = [fastest([run[0][k] for run in runs]) for k in range(len(timed))]
    unchanged = [fastest([run[1][k] for run in runs]) for k in range(len(timed))]
    return [(name, first, second) for name, first, second in zip(timed, cold, unchanged, strict=True)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--database-url", default=None, help="an empty database (default: a temporary SQLite file)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="time each page this many times and print the fastest (a shared machine's noise)")
    parser.add_argument("--page", action="append", choices=list(PAGES), default=None,
                        help="time only this page (repeatable; default: every page)")
    args = parser.parse_args()
    import streamlit.logger

    streamlit.logger.set_log_level("error")
    with tempfile.TemporaryDirectory(prefix="fitscope-dash-bench-") as workdir:
        url = args.database_url or f"sqlite:///{Path(workdir) / 'fitscope.db'}"
        os.environ["FITSCOPE_DATABASE_URL"] = url
        upgrade(url)
        experiment_id = _filled_before(url, trials=args.trials, epochs=args.epochs)
        if experiment_id is None:
            started = time.perf_counter()
            experiment_id = fill(url, trials=args.trials, epochs=args.epochs)
            print(f"filled {args.trials} trials x {args.epochs} epochs on {make_engine(url).dialect.name} in "
                  f"{time.perf_counter() - started:.1f} s")
        else:
            print(f"reusing experiment {experiment_id}: {args.trials} trials x {args.epochs} epochs on "
                  f"{make_engine(url).dialect.name}, filled by an earlier run")
        results = time_pages(experiment_id, trial_id=_a_trial(url, experiment_id), repeat=args.repeat,
                              pages=args.page)
    print(f"\n{'page':<26} {'cold s':>8} {'(cpu)':>7} {'unchanged s':>12} {'(cpu)':>7}  (bar: < {BAR_S:g} s)")
    for name, (cold, cold_cpu), (unchanged, unchanged_cpu) in results:
        print(f"{name:<26} {cold:>8.2f} {cold_cpu:>7.2f} {unchanged:>12.2f} {unchanged_cpu:>7.2f}  "
              f"{'ok' if cold < BAR_S else 'SLOW'}")
    print(f"slowest page, experiment unchanged: {max(unchanged for _, _, (unchanged, _) in results):.2f} s")
    slowest = max(cold for _, (cold, _), _ in results)
    print(f"slowest page: {slowest:.2f} s")
    return 0 if slowest < BAR_S else 1


def _filled_before(url: str, *, trials: int, epochs: int) -> int | None:
    """The experiment an earlier run filled with these sizes, when it is the database's only one;
    None for an empty database. Anything else stops the bench: it times only its own experiment."""
    from sqlalchemy import func, select

    from services.models import EpochMetric, Experiment, Trial

    engine = make_engine(url)
    with session_scope(engine) as session:
        found = session.execute(select(Experiment.id, Experiment.name)).all()
        if not found:
            engine.dispose()
            return None
        count = session.scalar(select(func.count()).select_from(Trial))
        planned = session.scalar(select(func.max(EpochMetric.epoch)))
    engine.dispose()
    if len(found) != 1 or found[0][1] != "dashboard-bench" or count != trials or planned != epochs:
        raise SystemExit(f"{url} holds other data than this bench's {trials} x {epochs} experiment: "
                         "give an empty database")
    return int(found[0][0])


def _a_trial(url: str, experiment_id: int) -> int:
    from sqlalchemy import select

    from services.models import Trial

    engine = make_engine(url)
    with session_scope(engine) as session:
        ids = session.scalars(select(Trial.id).where(Trial.experiment_id == experiment_id).order_by(Trial.id)).all()
    engine.dispose()
    return ids[len(ids) // 2]


if __name__ == "__main__":
    raise SystemExit(main())
