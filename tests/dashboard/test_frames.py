"""The trials frame kept per experiment until it changes (dashboard/frames.py), on SQLite and
PostgreSQL: the same rows as an uncached read, kept while nothing changes, rebuilt when a trial is
claimed, an epoch row lands, a trial finishes, or the experiment is cancelled; a caller's change to
its copy never reaches the kept frame."""

from __future__ import annotations

import pandas as pd
import pytest
import streamlit as st

from dashboard import data, frames
from services.db import session_scope
from services.models import TrialStatus
from services.queries import last_epoch_values, trial_frame, trial_rows
from services.siblings import rejudge_table
from services.spec import parse_spec
from services.submission import submit
from services.trials import cancel_experiment, claim_trial, finish_trial, record_epochs

SPEC = """
name: kept
seeds: [0, 1]
parameters:
  dataset: {value: moons}
  epochs: {value: 2}
  lr: {values: [0.1, 1.0]}
"""


@pytest.fixture
def experiment(database_url: str, engine_for, monkeypatch: pytest.MonkeyPatch):
    from services.config import get_settings

    monkeypatch.setenv("FITSCOPE_DATABASE_URL", database_url)
    get_settings.cache_clear()
    frames.forget()
    engine = engine_for(database_url)
    with session_scope(engine) as session:
        submitted = submit(session, spec=parse_spec(SPEC), spec_text=SPEC, submitted_by="t", max_trials=10)
    yield engine, submitted.experiment_id, submitted.trial_ids
    frames.forget()
    get_settings.cache_clear()


def uncached(engine, experiment_id: int) -> pd.DataFrame:
    with session_scope(engine) as session:
        return pd.DataFrame(trial_rows(session, experiment_id))


def reads_counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times the dashboard read the trials table (a list, so the count is seen as it grows)."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return trial_frame(*args, **kwargs)

    monkeypatch.setattr(data, "trial_frame", counted)
    return calls


def later() -> None:
    """Streamlit's few seconds of caching have passed (the next page view reads the stamp again)."""
    st.cache_data.clear()


def test_the_kept_frame_is_the_uncached_read_until_a_trial_changes(experiment, monkeypatch):
    engine, experiment_id, ids = experiment
    reads = reads_counted(monkeypatch)
    first = data.trials(experiment_id)
    pd.testing.assert_frame_equal(first, uncached(engine, experiment_id))
    later()
    pd.testing.assert_frame_equal(data.trials(experiment_id), first)
    assert len(reads) == 1  # nothing changed: kept

    with session_scope(engine) as session:
        claim_trial(session, ids[0], worker="w/1", max_attempts=3)
    later()
    assert data.trials(experiment_id).set_index("trial_id").at[ids[0], "status"] == "running"
    assert len(reads) == 2

    with session_scope(engine) as session:
        record_epochs(session, ids[0], [{"epoch": 1, "train_loss": 0.5, "val_loss": 0.6, "weight_norm": 3.0}])
    later()
    assert data.trials(experiment_id).set_index("trial_id").at[ids[0], "epochs_done"] == 1
    assert data.final_norms(experiment_id).set_index("trial_id").at[ids[0], "final_weight_norm"] == 3.0
    assert len(reads) == 3

    with session_scope(engine) as session:
        record_epochs(session, ids[0], [{"epoch": 2, "train_loss": 0.4, "val_loss": 0.5, "weight_norm": 4.0}])
        finish_trial(session, ids[0], status=TrialStatus.succeeded, best_epoch=2,
                     final_metrics={"final_train_loss": 0.4, "final_val_loss": 0.5, "best_val_loss": 0.5,
                                    "baseline_train_loss": 0.69, "baseline_val_loss": 0.69})
    later()
    pd.testing.assert_frame_equal(data.trials(experiment_id), uncached(engine, experiment_id))
    assert data.final_norms(experiment_id).set_index("trial_id").at[ids[0], "final_weight_norm"] == 4.0
    with session_scope(engine) as session:
        expected = rejudge_table(pd.DataFrame(trial_rows(session, experiment_id, reasons=True)))
        norms = last_epoch_values(session, experiment_id)
    pd.testing.assert_frame_equal(data.sibling_diagnoses(experiment_id), expected[list(data.DIAGNOSIS_COLUMNS)])
    assert data.sibling_diagnoses(experiment_id)["trial_id"].tolist() == [ids[0]]  # the one that ended
    assert norms[ids[0]]["weight_norm"] == 4.0

    with session_scope(engine) as session:
        cancel_experiment(session, experiment_id)
    later()
    statuses = data.trials(experiment_id).set_index("trial_id")["status"]
    assert statuses[ids[0]] == "succeeded" and set(statuses[ids[1:]]) == {"cancelled"}
    pd.testing.assert_frame_equal(data.trials(experiment_id), uncached(engine, experiment_id))


def test_a_callers_change_to_its_frame_does_not_reach_the_kept_one(experiment):
    _, experiment_id, _ = experiment
    mine = data.groupable_trials(experiment_id)
    mine["status"] = "changed"
    mine.loc[mine.index[0], "lr"] = -1.0
    later()
    kept = data.groupable_trials(experiment_id)
    assert "changed" not in set(kept["status"]) and -1.0 not in set(kept["lr"])
