"""init_from and folds through the real CLI against a migrated database and a running broker: a parent
that is missing, unfinished or of another first layer, and a freeze deeper than the model, are each
one sentence, exit 2 and no rows; a good fine-tuned, cross-validated spec is written with its folds,
and `fitscope export --what trials` carries each trial's fold and parent."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from services.cli import app
from services.config import get_settings
from services.db import make_engine, session_scope
from services.fine_tuning import WEIGHTS_KIND
from services.models import EpochMetric, Experiment, Trial, TrialArtifact, TrialStatus
from services.spec import parse_spec
from services.submission import submit
from services.trial_config import TrialConfig
from services.trials import finish_trial

pytestmark = pytest.mark.integration

PARENT = "name: parent\nparameters:\n  width: {value: 16}\n  epochs: {value: 3}\n  n_train: {value: 60}\n"


@pytest.fixture
def database(migrated_sqlite_url: str, broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """(engine, finished parent trial id, queued trial id) with the CLI's settings pointing at them."""
    from worker.training.fused import train_trial

    for name, value in {"FITSCOPE_DATABASE_URL": migrated_sqlite_url, "FITSCOPE_BROKER_URL": broker_url,
                        "FITSCOPE_HOME": str(tmp_path / "home")}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    engine = make_engine(migrated_sqlite_url)
    with session_scope(engine) as session:
        finished, queued = (submit(session, spec=parse_spec(PARENT), spec_text=PARENT, submitted_by="t",
                                   max_trials=10).trial_ids[0] for _ in range(2))
        config = TrialConfig.model_validate(session.get(Trial, finished).config)
    result = train_trial(config)  # the parent's real best weights, kept as the worker keeps them
    with session_scope(engine) as session:
        finish_trial(session, finished, status=TrialStatus.succeeded, final_metrics=result.final_metrics,
                     best_epoch=result.best_epoch, artifacts={WEIGHTS_KIND: result.best_weights})
    yield engine, finished, queued
    engine.dispose()


def _counts(engine) -> dict[str, int]:
    with session_scope(engine) as session:
        return {model.__tablename__: session.scalar(select(func.count()).select_from(model))
                for model in (Experiment, Trial, EpochMetric, TrialArtifact)}


def _cli(tmp_path: Path, spec_text: str, *args: str):
    spec = tmp_path / "child.yaml"
    spec.write_text(spec_text)
    get_settings.cache_clear()
    return CliRunner().invoke(app, ["submit", str(spec), *args])


@pytest.mark.parametrize(("parameters", "expected"), [
    ("init_from: {value: 999999}", "trial 999999, which does not exist in this database"),
    ("init_from: {value: QUEUED}", "which is queued, not succeeded"),
    ("init_from: {value: PARENT}\n  width: {value: 8}", "has a first layer of 16 x 2 but this trial's is 8 x 2"),
    ("init_from: {value: PARENT}\n  dataset: {value: linear}\n  n_features: {value: 3}",
     "has a first layer of 16 x 2 but this trial's is 16 x 3"),
    ("init_from: {value: PARENT}\n  freeze: {value: 4}", "freeze 4 is more than the 3 linear layers"),
])
def test_a_parent_that_cannot_be_honoured_is_one_sentence_exit_2_and_no_rows(database, tmp_path, parameters,
                                                                               expected):
    engine, parent, queued = database
    parameters = parameters.replace("QUEUED", str(queued)).replace("PARENT", str(parent))
    before = _counts(engine)
    width = "" if "width" in parameters else "  width: {value: 16}\n"
    result = _cli(tmp_path, f"name: child\nparameters:\n{width}  {parameters}\n")
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert expected in result.stderr, result.stderr
    assert _counts(engine) == before


def test_a_fine_tuned_cross_validated_spec_is_written_with_its_folds_and_exports_them(database, tmp_path):
    engine, parent, _ = database
    spec = (f"name: child\nfolds: 3\nparameters:\n  width: {{value: 16}}\n  n_train: {{value: 20}}\n"
            f"  init_from: {{values: [null, {parent}]}}\n  freeze: {{value: 1}}\n")
    result = _cli(tmp_path, spec, "--json")
    assert result.exit_code == 0, result.stderr
    with session_scope(engine) as session:
        experiment_id = session.scalar(select(func.max(Experiment.id)))
    get_settings.cache_clear()
    exported = CliRunner().invoke(app, ["export", str(experiment_id), "--what", "trials"])
    assert exported.exit_code == 0, exported.stderr
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert [(row["init_from"], row["fold"], row["folds"]) for row in rows] == [
        ("", "1", "3"), ("", "2", "3"), ("", "3", "3"), (str(parent), "1", "3"), (str(parent), "2", "3"),
        (str(parent), "3", "3")]
