"""A multi-label CSV through the real CLI and database: a bad label column is refused with one
sentence and no rows; a good file trains one sigmoid per label, stores the mean per-label accuracy
per epoch, the exact match in the final metrics, and the picture's snapshots as artifact rows."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from services.db import session_scope
from services.models import EpochMetric, Experiment, Trial, TrialArtifact
from services.snapshot_codec import decode_bytes
from tests.servers import fitscope, fitscope_env
from worker.jobs import execute_job

pytestmark = pytest.mark.integration

# Two features, two labels: "right" (x1 > 3) and "high" (x2 > 5); a few rows break the rule.
ROWS = [(i % 7, (i * 3) % 11) for i in range(80)]
GOOD_CSV = "x1,x2,right,high\n" + "".join(
    f"{x1},{x2},{int(x1 > 3) ^ (i % 17 == 0)},{int(x2 > 5)}\n" for i, (x1, x2) in enumerate(ROWS))
SPEC = """name: multi-label
method: grid
parameters:
  dataset: {csv: labels.csv, target: [right, high]}
  width: {value: 16}
  epochs: {value: 30}
"""


@pytest.fixture
def env(migrated_sqlite_url, broker_url, tmp_path):
    return fitscope_env(database_url=migrated_sqlite_url, broker_url=broker_url, home=tmp_path / "home")


def _write(tmp_path, csv: str) -> str:
    (tmp_path / "labels.csv").write_text(csv)
    (tmp_path / "spec.yaml").write_text(SPEC)
    return str(tmp_path / "spec.yaml")


def test_a_label_column_that_is_not_0_or_1_exits_2_and_writes_nothing(env, tmp_path, migrated_sqlite_url,
                                                                    engine_for):
    spec = _write(tmp_path, GOOD_CSV.replace("\n3,9,0,1\n", "\n3,9,0,maybe\n", 1))
    assert "maybe" in (tmp_path / "labels.csv").read_text()
    result = fitscope("submit", spec, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("error: labels.csv: target column 'high' has a value other than 0 or 1 "
                                            "on line ")
    assert "maybe" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    with session_scope(engine_for(migrated_sqlite_url)) as session:
        assert session.scalar(select(func.count()).select_from(Experiment)) == 0


def test_a_multi_label_csv_trains_and_stores_accuracy_exact_match_and_snapshots(env, tmp_path, migrated_sqlite_url,
                                                                               engine_for):
    submitted = fitscope("submit", _write(tmp_path, GOOD_CSV), "--json", env=env)
    assert submitted.returncode == 0, submitted.stderr
    [trial_id] = json.loads(submitted.stdout)["trial_ids"]
    engine = engine_for(migrated_sqlite_url)
    assert execute_job(engine, [trial_id], worker="test", redelivered=False) == {str(trial_id): "succeeded"}

    with session_scope(engine) as session:
        trial = session.get(Trial, trial_id)
        assert trial.config["dataset"]["target"] == ["right", "high"] and trial.config["dataset"]["task"] == \
            "classification"
        rows = session.scalars(select(EpochMetric).where(EpochMetric.trial_id == trial_id)
                               .order_by(EpochMetric.epoch)).all()
        assert [row.epoch for row in rows] == list(range(1, 31))
        assert all(0 <= row.train_accuracy <= 1 and row.val_accuracy is not None for row in rows)
        metrics = trial.final_metrics
        assert metrics["final_train_accuracy"] == rows[-1].train_accuracy
        assert 0 <= metrics["final_train_exact_match"] <= metrics["final_train_accuracy"]
        assert metrics["test_exact_match"] is not None and trial.verdict
        kinds = {artifact.kind: artifact.data for artifact in session.scalars(
            select(TrialArtifact).where(TrialArtifact.trial_id == trial_id))}
    # and, as every finished trial under the cap, its best-epoch weights for a fine-tuned child
    assert set(kinds) == {"boundary_2d", "snapshots", "multilabel", "best_weights"}
    assert kinds["boundary_2d"]["class_names"] == ["none", "right", "high", "right + high"]
    frames = kinds["snapshots"]["frames"]
    assert frames[0]["epoch"] == 1 and frames[-1]["epoch"] == 30 and len(frames) <= 20
    assert frames[-1]["val_loss"] == rows[-1].val_loss
    assert decode_bytes(frames[-1]["predicted_class"]).max() <= 3
    assert kinds["multilabel"]["labels"] == ["right", "high"] and len(kinds["multilabel"]["epoch"]) == 30
    assert kinds["multilabel"]["train_exact_match"][-1] == metrics["final_train_exact_match"]
