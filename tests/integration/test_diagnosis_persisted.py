"""A finished trial's verdict, diagnosis, parameter count and prediction artifact reach the database."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from services.analysis import VERDICTS
from services.db import session_scope
from services.models import Trial, TrialArtifact
from services.queries import trial_artifacts, trial_rows
from services.spec import parse_spec
from services.submission import submit
from services.trials import requeue_trials
from worker.jobs import execute_job

pytestmark = pytest.mark.integration

SPEC = """name: diagnosis
method: grid
parameters:
  dataset: {values: [moons, sine]}
  n_train: {value: 60}
  n_val: {value: 40}
  n_test: {value: 0}
  width: {value: 8}
  epochs: {value: 15}
"""
DIVERGING = """name: blows up
method: grid
parameters:
  dataset: {value: sine}
  optimizer: {value: sgd}
  lr: {value: 10}
  epochs: {value: 10}
"""


@pytest.fixture
def engine(database_url, engine_for):
    return engine_for(database_url)


def _run_all(engine, spec_text: str) -> int:
    with session_scope(engine) as session:
        submitted = submit(session, spec=parse_spec(spec_text), spec_text=spec_text, submitted_by=None, max_trials=100)
    for trial_id in submitted.trial_ids:
        assert execute_job(engine, [trial_id], worker="test", redelivered=False)[str(trial_id)] != "skipped"
    return submitted.experiment_id


def test_verdict_diagnosis_parameter_count_and_artifact_are_stored(engine):
    experiment_id = _run_all(engine, SPEC)

    with session_scope(engine) as session:
        trials = session.scalars(select(Trial).order_by(Trial.ordinal)).all()
        expected_kinds = {"moons": "boundary_2d", "sine": "curve_1d"}
        for trial in trials:
            assert trial.status == "succeeded", trial.error
            assert trial.verdict in VERDICTS
            assert trial.diagnosis["reasons"] and trial.diagnosis["numbers"]["epochs"] == 15
            assert trial.diagnosis["numbers"]["baseline_source"] == "constant_predictor"
            assert trial.diagnosis["numbers"]["underfit_ratio_limit"] > 0  # the thresholds travel along
            assert trial.parameter_count == trial.final_metrics["parameter_count"] > 0
            artifacts = trial_artifacts(session, trial.id)
            picture = expected_kinds[trial.config["dataset"]]
            assert set(artifacts) == {picture, "snapshots"}  # the picture, and its frames epoch by epoch
            assert len(json.dumps(artifacts[picture])) < 60_000 and len(json.dumps(artifacts)) < 200_000

        rows = trial_rows(session, experiment_id)
        assert [row["verdict"] for row in rows] == [trial.verdict for trial in trials]
        assert all("diag_train_ratio" in row and "diag_underfit_ratio_limit" not in row for row in rows)


def test_a_diverged_trial_is_diagnosed_diverged(engine):
    _run_all(engine, DIVERGING)

    with session_scope(engine) as session:
        trial = session.scalars(select(Trial)).one()
        assert trial.status == "diverged"
        assert trial.verdict == "diverged"
        assert trial.diagnosis["numbers"]["first_bad_epoch"] >= 1


def test_a_rerun_replaces_the_artifacts_and_a_requeue_clears_the_verdict(engine):
    experiment_id = _run_all(engine, SPEC)
    with session_scope(engine) as session:
        trial = session.scalars(select(Trial).order_by(Trial.ordinal)).first()
        session.execute(Trial.__table__.update().where(Trial.id == trial.id).values(status="failed"))
        requeue_trials(session, experiment_id)
    with session_scope(engine) as session:
        trial = session.get(Trial, trial.id)
        assert (trial.verdict, trial.diagnosis, trial.parameter_count) == (None, None, None)
        assert trial_artifacts(session, trial.id) == {}
    execute_job(engine, [trial.id], worker="again", redelivered=False)
    with session_scope(engine) as session:
        assert session.get(Trial, trial.id).verdict in VERDICTS
        # per trial: its picture, its frames and its best-epoch weights, once each
        assert session.scalar(select(func.count()).select_from(TrialArtifact)) == 2 * 3
