"""examples/loss_surfaces.yaml through the real system: the CLI submits it, a real broker carries ONE
job for its 168 trials of three functions and seven optimizers, a real worker trains it, and every
trial ends with its rows, where it ended (also in `fitscope export`) and its stored path."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
from sqlalchemy import func, select

from services.db import session_scope
from services.models import EpochMetric, Trial, TrialArtifact
from tests.servers import REPO, WorkerProcess, fitscope, fitscope_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_loss_surfaces_example_is_one_job_that_stores_every_path(migrated_sqlite_url, broker_url, engine_for,
                                                                     tmp_path):
    env = fitscope_env(database_url=migrated_sqlite_url, broker_url=broker_url, home=tmp_path)
    worker = WorkerProcess(env, tmp_path / "worker.log", "--name", f"surfaces@{tmp_path.name}")
    worker.wait_ready()
    try:
        submitted = fitscope("submit", str(REPO / "examples" / "loss_surfaces.yaml"), "--wait", "--timeout", "300",
                             "--json", env=env)
        assert submitted.returncode == 0, submitted.stderr + worker.log()[-3000:]
        experiment_id = json.loads(submitted.stdout)["experiment_id"]
        log = worker.log()
    finally:
        worker.stop()
    assert len(re.findall(r"Task fitscope\.run_job\[[^\]]+\] received", log)) == 1, log[-3000:]
    assert "job of 168 trials trained" in log

    engine = engine_for(migrated_sqlite_url)
    with session_scope(engine) as session:
        trials = session.scalars(select(Trial).where(Trial.experiment_id == experiment_id)).all()
        rows = dict(session.execute(select(EpochMetric.trial_id, func.count()).group_by(EpochMetric.trial_id)).all())
        paths = {a.trial_id: a.data for a in session.scalars(select(TrialArtifact).where(
            TrialArtifact.kind == "path_2d"))}
    assert len(trials) == 168
    assert {t.status for t in trials} == {"succeeded", "diverged"}
    for trial in trials:
        assert trial.final_metrics["trained_with"] == 168
        path = paths[trial.id]
        assert path["function"] == trial.config["dataset"]
        assert [path["x"][0], path["y"][0]] == trial.config["start"]
        if trial.status == "succeeded":
            assert rows[trial.id] == 200 and path["step"][-1] == 200 and len(path["x"]) == 201
            assert [path["x"][-1], path["y"][-1]] == [trial.final_metrics["final_x"], trial.final_metrics["final_y"]]
            assert trial.verdict is None  # no fit verdict for a point on a function
    # plain SGD on himmelblau at 0.01: its four starts end in its four minima
    sgd = {tuple(t.config["start"]): t.final_metrics["reached"] for t in trials
           if t.config["dataset"] == "himmelblau" and t.config["optimizer"] == "sgd" and t.config["lr"] == 0.01}
    assert len(set(sgd.values())) == 4 and None not in sgd.values()
    # rosenbrock's valley throws plain SGD out at 0.01
    assert any(t.status == "diverged" for t in trials if t.config["dataset"] == "rosenbrock")

    exported = fitscope("export", str(experiment_id), "--what", "trials", env=env)
    assert exported.returncode == 0, exported.stderr
    table = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert {"final_x", "final_y", "final_value", "reached"} <= set(table[0])
    assert len(table) == 168
