"""Per-layer gradient norms and the range test's curve through the real system: the CLI submits, a
real broker carries the job, a real worker trains it and writes PostgreSQL rows (JSON columns there
refuse NaN, so the lists must arrive clean)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from services.db import session_scope
from services.migrate import upgrade
from services.models import EpochMetric, Trial, TrialArtifact
from services.queries import layer_grad_norm_rows
from tests.servers import WorkerProcess, fitscope, fitscope_env

pytestmark = pytest.mark.integration

EPOCHS = 3
# Two depths x (constant, range test): 64 rows in batches of 16 are 4 steps per epoch.
SPEC = f"""name: layers-and-range
parameters:
  activation: {{value: sigmoid}}
  depth: {{values: [2, 5]}}
  schedule: {{values: [constant, lr_range_test]}}
  min_lr: {{value: 0.0001}}
  lr: {{value: 1.0}}
  optimizer: {{value: sgd}}
  width: {{value: 8}}
  n_train: {{value: 64}}
  n_val: {{value: 32}}
  n_test: {{value: 0}}
  batch_size: {{value: 16}}
  epochs: {{value: {EPOCHS}}}
"""


def test_every_epoch_row_has_each_layers_gradient_norm_and_a_range_test_its_curve(
        postgres_url, broker_url, engine_for, tmp_path):
    upgrade(postgres_url)
    env = fitscope_env(database_url=postgres_url, broker_url=broker_url, home=tmp_path)
    worker = WorkerProcess(env, tmp_path / "worker.log", "--name", f"layers@{tmp_path.name}")
    worker.wait_ready()
    try:
        spec = tmp_path / "spec.yaml"
        spec.write_text(SPEC)
        submitted = fitscope("submit", str(spec), "--wait", "--timeout", "180", "--json", env=env)
        assert submitted.returncode == 0, submitted.stderr + worker.log()[-3000:]
    finally:
        worker.stop()
    experiment_id = json.loads(submitted.stdout)["experiment_id"]

    engine = engine_for(postgres_url)
    with session_scope(engine) as session:
        trials = session.scalars(select(Trial).where(Trial.experiment_id == experiment_id)).all()
        rows = session.execute(select(EpochMetric.trial_id, EpochMetric.grad_norm, EpochMetric.layer_grad_norms)).all()
        curves = dict(session.execute(select(TrialArtifact.trial_id, TrialArtifact.data)
                                      .where(TrialArtifact.kind == "lr_range")).all())
        read = layer_grad_norm_rows(session, experiment_id)
        ends = layer_grad_norm_rows(session, experiment_id, ends_only=True)
    assert len(trials) == 4 and all(t.status == "succeeded" for t in trials)
    depth = {t.id: t.config["depth"] for t in trials}
    assert len(rows) == 4 * EPOCHS
    for trial_id, grad_norm, layers in rows:
        assert len(layers) == depth[trial_id] + 1 and all(v > 0 for v in layers)
        assert grad_norm == pytest.approx(sum(v * v for v in layers) ** 0.5, rel=1e-5)
    assert len(read) == 4 * EPOCHS and read[0]["layer_grad_norms"] == next(
        layers for trial_id, _, layers in rows if trial_id == read[0]["trial_id"])
    assert [(row["trial_id"], row["epoch"]) for row in ends] == [
        (t.id, epoch) for t in sorted(trials, key=lambda t: t.id) for epoch in (1, EPOCHS)]
    assert all(row in read for row in ends)

    range_tests = {t.id for t in trials if t.config["schedule"] == "lr_range_test"}
    assert set(curves) == range_tests
    # A range test raises its rate until the loss blows up: it gets no fit verdict, the others one.
    assert {t.id for t in trials if t.verdict is None} == range_tests
    assert all("range test" in t.diagnosis["reasons"][0] for t in trials if t.id in range_tests)
    for curve in curves.values():
        assert curve["steps"] == len(curve["lr"]) == EPOCHS * 4
        assert curve["lr"][0] == pytest.approx(1e-4) and curve["lr"][-1] == pytest.approx(1.0)
