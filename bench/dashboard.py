"""How fast the dashboard's pages are on a large experiment.

Fills a fresh SQLite file with one experiment of 1,000 trials x 100 epochs (5 widths x 2 training-set
sizes x 4 optimizers x 5 learning rates x 5 seeds on moons), written through the services layer the
way workers write it: the grid is submitted with services.submission.submit, then every trial gets
synthetic but plausible curves (record_epochs: train falls to a floor set by capacity and data size,
validation is U-shaped for big models on little data, too large a learning rate diverges) and a
decision-boundary artifact (finish_trial, which also stores the verdict). Filling is not timed.

Then, for each page, it times what the page does with its default choices: the cached data reads
(dashboard.data, caches emptied first, so every read goes to the database) and the figure builders
(dashboard.charts), without Streamlit's script runner. It prints seconds per page and the number of
values the page's figures send to the browser. The bar: under 2 s per page.

    .venv/bin/python bench/dashboard.py [--seeds 5] [--epochs 100]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.db import make_engine, session_scope  # noqa: E402
from services.migrate import upgrade  # noqa: E402
from services.models import TrialStatus  # noqa: E402
from services.spec import parse_spec  # noqa: E402
from services.submission import submit  # noqa: E402
from services.trials import finish_trial, record_epochs  # noqa: E402

BAR_S = 2.0
WIDTHS = [4, 16, 64, 256, 1024]
N_TRAIN = [50, 400]
OPTIMIZERS = {"sgd": 0.3, "momentum": 1.0, "adam": 2.0, "adamw": 2.0}  # relative speed at one learning rate
LRS = [0.0003, 0.001, 0.01, 0.1, 1.0]
EXPERIMENT_MAX_CURVES = 100  # as dashboard/app_pages/experiment.py


def bench_spec(*, seeds: int, epochs: int) -> str:
    return (
        f"name: dashboard-bench\nmethod: grid\nseeds: {list(range(seeds))}\nparameters:\n"
        f"  dataset: {{value: moons}}\n  epochs: {{value: {epochs}}}\n  width: {{values: {WIDTHS}}}\n"
        f"  n_train: {{values: {N_TRAIN}}}\n  optimizer: {{values: {list(OPTIMIZERS)}}}\n  lr: {{values: {LRS}}}\n"
    )


def synthetic_run(config: dict, *, epochs: int) -> tuple[list[dict], str]:
    """Plausible per-epoch rows for one trial and how it ended (succeeded or diverged)."""
    rng = np.random.default_rng(config["seed"] * 7919 + hash((config["width"], config["n_train"],
                                                              config["optimizer"], config["lr"])) % 7919)
    capacity = math.log(config["width"]) / math.log(max(WIDTHS))  # 0.2 .. 1
    data = config["n_train"] / max(N_TRAIN)  # 0.125 .. 1
    speed = OPTIMIZERS[config["optimizer"]] * config["lr"] * 30
    epoch = np.arange(1, epochs + 1)
    progress = 1 - np.exp(-speed * epoch / epochs * 5)
    floor = 0.35 * (1 - capacity) ** 2 + 0.02
    train = 0.69 - (0.69 - floor * (0.4 + 0.6 * data)) * progress + rng.normal(0, 0.004, epochs)
    # Validation: follows train, then rises once a big model has memorised a small training set.
    overfit = max(capacity - 0.5 * data - 0.2, 0) * np.clip(progress - 0.5, 0, None) * 0.8
    val = train + 0.03 + overfit + rng.normal(0, 0.006, epochs)
    status = "succeeded"
    if speed * rng.uniform(0.6, 1.4) > 40:  # far too large a step: the loss explodes part way
        stop = int(rng.integers(3, max(4, epochs // 3)))
        train, val, epoch = train[:stop], val[:stop], epoch[:stop]
        status = "diverged"
    lr = config["lr"]
    rows = [{"epoch": int(e), "train_loss": float(t), "val_loss": float(v), "train_accuracy": float(1 - t * 0.6),
             "val_accuracy": float(1 - v * 0.6), "lr": lr, "epoch_seconds": 0.01, "grad_norm": float(t),
             "weight_norm": float(3 + e * 0.01)} for e, t, v in zip(epoch, train, val, strict=True)]
    return rows, status


def synthetic_boundary(config: dict) -> dict:
    """A 60 x 60 decision boundary (the size the engine stores): wigglier for wider models."""
    xs = np.linspace(-1.5, 2.5, 60)
    grid_x, grid_y = np.meshgrid(xs, np.linspace(-1.0, 1.5, 60))
    wiggle = 0.05 * math.log2(config["width"]) * np.sin(grid_x * config["width"] ** 0.5)
    predicted = (grid_y < 0.5 - 0.5 * np.sin(grid_x * 2) + wiggle).astype(int)
    points = np.random.default_rng(config["seed"]).uniform(-1, 2, (300, 2))
    return {"x_range": [-1.5, 2.5], "y_range": [-1.0, 1.5], "resolution": 60, "classes": [0, 1],
            "predicted_class": predicted.tolist(), "probability": np.full((60, 60), 0.9).tolist(),
            "train_x": points[:, 0].round(3).tolist(), "train_y": points[:, 1].round(3).tolist(),
            "train_label": (points[:, 1] < 0.5).astype(int).tolist()}


def fill(url: str, *, seeds: int, epochs: int) -> int:
    """Submit the grid and write every trial's rows; returns the experiment id."""
    engine = make_engine(url)
    text = bench_spec(seeds=seeds, epochs=epochs)
    with session_scope(engine) as session:
        submitted = submit(session, spec=parse_spec(text), spec_text=text, submitted_by="bench", max_trials=10_000)
    with session_scope(engine) as session:
        from services.models import Trial

        configs = {trial.id: dict(trial.config) for trial in session.query(Trial).filter_by(
            experiment_id=submitted.experiment_id)}
    batch = 50
    ids = submitted.trial_ids
    for start in range(0, len(ids), batch):
        with session_scope(engine) as session:
            for trial_id in ids[start:start + batch]:
                config = configs[trial_id]
                rows, status = synthetic_run(config, epochs=epochs)
                record_epochs(session, trial_id, rows)
                last = rows[-1]
                best = min(rows, key=lambda row: row["val_loss"])
                final = {"final_train_loss": last["train_loss"], "final_val_loss": last["val_loss"],
                         "final_train_accuracy": last["train_accuracy"], "final_val_accuracy": last["val_accuracy"],
                         "best_val_loss": best["val_loss"], "best_val_accuracy": best["val_accuracy"],
                         "test_loss": best["val_loss"] * 1.02, "test_accuracy": best["val_accuracy"] * 0.99,
                         "baseline_train_loss": 0.693, "baseline_val_loss": 0.693,
                         "parameter_count": 2 * config["width"] + config["width"] ** 2 + 4 * config["width"] + 2}
                finish_trial(session, trial_id, status=TrialStatus(status), final_metrics=final,
                             best_epoch=best["epoch"], artifacts={"boundary_2d": synthetic_boundary(config)})
    engine.dispose()
    return submitted.experiment_id


# --- what each page does with its default choices ----------------------------------------------------

def page_experiments(experiment_id: int) -> list:
    from dashboard import charts, data

    return [charts.progress_bar_chart(data.experiments(limit=50))]


def page_experiment(experiment_id: int) -> list:
    from dashboard import charts, data

    data.experiment(experiment_id)
    trials = data.trials(experiment_id)
    shown = trials[trials["epochs_done"] > 0].head(EXPERIMENT_MAX_CURVES)
    every = data.epoch_step(len(shown), int(shown["epochs_done"].max()), budget=data.LINE_ROW_BUDGET)
    curves = data.curves(experiment_id, trial_ids=tuple(int(i) for i in shown["trial_id"]), every=every,
                         fields=("train_loss", "val_loss", "train_accuracy", "val_accuracy"))
    return [charts.learning_curves(curves, trials, data.varying_parameters(trials)[0])]


def page_fit_analysis(experiment_id: int) -> list:
    from dashboard import charts, data

    trials = data.groupable(data.trials(experiment_id))
    trained = trials[trials["status"].isin(["succeeded", "diverged"])]
    trained = trained.merge(data.sibling_diagnoses(experiment_id), on="trial_id", how="left")
    every = data.epoch_step(len(trained), int(trained["epochs_done"].max()))
    curves = data.curves(experiment_id, every=every)
    loss = {"train": "final_train_loss", "val": "final_val_loss"}
    seed0 = trained[trained["seed"] == 0].sort_values("parameter_count")
    shown = tuple(int(seed0.iloc[i]["trial_id"]) for i in (0, len(seed0) // 2, len(seed0) - 1))
    return [
        charts.learning_curve_bands(curves, trained, color_by="width"),
        charts.metric_against(trained, x="parameter_count", color_by="n_train", columns=loss),
        charts.metric_against(trained, x="n_train", color_by="width", columns=loss),
        charts.metric_heatmap(trained, x="width", y="n_train", metric="final_val_loss"),
        charts.verdict_grid(trained, x="width", y="n_train"),
        charts.prediction_panels(data.artifacts(shown), {trial_id: str(trial_id) for trial_id in shown}),
    ]


def page_optimizers(experiment_id: int) -> list:
    from dashboard import charts, data
    from services.analysis import mean_difference

    trials = data.groupable(data.trials(experiment_id))
    trained = trials[trials["status"].isin(["succeeded", "diverged"])]
    every = data.epoch_step(len(trained), int(trained["epochs_done"].max()))
    curves = data.curves(experiment_id, every=every)
    target = float(trained["best_val_loss"].median())
    reached = data.epochs_to_reach(experiment_id, field="val_loss", target=target)
    with_lr = data.curves(experiment_id, fields=("val_loss", "lr"), every=every)
    a = trained[(trained["optimizer"] == "adam") & (trained["lr"] == 0.01) & (trained["width"] == 64)
                & (trained["n_train"] == 400)].sort_values("seed")
    b = trained[(trained["optimizer"] == "sgd") & (trained["lr"] == 0.01) & (trained["width"] == 64)
                & (trained["n_train"] == 400)].sort_values("seed")
    result = mean_difference(a["final_val_loss"].tolist(), b["final_val_loss"].tolist(), paired=True)
    return [
        charts.learning_curve_bands(curves, trained, color_by="optimizer"),
        charts.metric_against(trained, x="lr", color_by="optimizer", columns={"val": "final_val_loss"}),
        charts.epochs_to_target_bars(reached, trained, target=target, x="lr", color_by="optimizer"),
        charts.divergence_bars(trained, x="lr", color_by="optimizer"),
        charts.schedule_over_loss(with_lr, trained, color_by="optimizer"),
        charts.difference_interval(result, label_a="adam", label_b="sgd", metric="final_val_loss"),
    ]


def page_trial(experiment_id: int) -> list:
    import pandas as pd

    from dashboard import charts, data

    trial_id = int(data.trials(experiment_id)["trial_id"].iloc[500])
    trial = data.trial(trial_id)
    epochs = data.curves(experiment_id, trial_ids=(trial_id,),
                         fields=("train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr"))
    row = pd.DataFrame([{"trial_id": trial_id, "ordinal": trial["ordinal"]}])
    return [charts.learning_curves(epochs, row, "ordinal"),
            charts.learning_curves(epochs, row, "ordinal", metric="accuracy"),
            charts.prediction_panels({trial_id: data.artifacts((trial_id,))[trial_id]}, {trial_id: ""})]


PAGES = {"Experiments": page_experiments, "Experiment": page_experiment, "Fit analysis": page_fit_analysis,
         "Optimizers and schedules": page_optimizers, "Trial": page_trial}


def timed(name: str, page: Callable[[int], list], experiment_id: int) -> tuple[str, float, int, int]:
    import streamlit as st

    from dashboard import charts

    st.cache_data.clear()
    started = time.perf_counter()
    figures = page(experiment_id)
    seconds = time.perf_counter() - started
    return name, seconds, len(figures), sum(charts.points_shipped(figure) for figure in figures)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args()
    import streamlit.logger

    streamlit.logger.set_log_level("error")  # "no runtime found": expected, the pages run without Streamlit's runner
    with tempfile.TemporaryDirectory(prefix="fitscope-dash-bench-") as workdir:
        url = f"sqlite:///{Path(workdir) / 'fitscope.db'}"
        os.environ["FITSCOPE_DATABASE_URL"] = url
        upgrade(url)
        started = time.perf_counter()
        experiment_id = fill(url, seeds=args.seeds, epochs=args.epochs)
        size_mb = (Path(workdir) / "fitscope.db").stat().st_size / 1e6
        print(f"filled {len(WIDTHS) * len(N_TRAIN) * len(OPTIMIZERS) * len(LRS) * args.seeds} trials x "
              f"{args.epochs} epochs in {time.perf_counter() - started:.1f} s ({size_mb:.0f} MB)")
        results = [timed(name, page, experiment_id) for name, page in PAGES.items()]
    print(f"\n{'page':<26} {'seconds':>8} {'figures':>8} {'points shipped':>15}  (bar: < {BAR_S:g} s)")
    for name, seconds, figures, points in results:
        print(f"{name:<26} {seconds:>8.2f} {figures:>8} {points:>15,}  {'ok' if seconds < BAR_S else 'SLOW'}")
    return 0 if all(seconds < BAR_S for _, seconds, _, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
