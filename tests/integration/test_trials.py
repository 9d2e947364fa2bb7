"""A trial's life in a real database: claims are exclusive, re-delivery is safe, cancel and requeue."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from services.db import session_scope
from services.models import EpochMetric, Experiment, Trial
from services.spec import parse_spec
from services.submission import submit
from services.trials import (
    cancel_experiment,
    claim_trial,
    count_epoch_rows,
    finish_trial,
    record_epoch,
    requeue_trials,
)

pytestmark = pytest.mark.integration

SPEC = "name: t\nmethod: grid\nseeds: [0, 1]\nparameters:\n  width: {values: [4, 8]}\n  epochs: {value: 3}\n"


@pytest.fixture
def engine(database_url, engine_for):
    return engine_for(database_url)


@pytest.fixture
def experiment(engine):
    with session_scope(engine) as session:
        return submit(session, spec=parse_spec(SPEC), spec_text=SPEC, submitted_by="tester", max_trials=100)


def _epoch(epoch: int) -> dict:
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.2 / epoch, "train_accuracy": 0.5,
            "val_accuracy": 0.4, "lr": 0.01, "epoch_seconds": 0.1}


def test_submit_writes_one_queued_trial_per_grid_point_in_one_transaction(engine, experiment):
    assert len(experiment.trials) == 4
    with session_scope(engine) as session:
        trials = session.scalars(select(Trial).order_by(Trial.ordinal)).all()
        assert [(t.config["width"], t.seed) for t in trials] == [(4, 0), (4, 1), (8, 0), (8, 1)]
        assert {t.status for t in trials} == {"queued"}
        assert session.get(Experiment, experiment.experiment_id).submitted_by == "tester"


def test_a_failing_submit_leaves_no_rows(engine):
    spec = parse_spec("name: x\nmethod: grid\nparameters:\n  dataset: {value: sine}\n"
                      "  loss: {value: cross_entropy}\n")
    with pytest.raises(ValueError), session_scope(engine) as session:
        submit(session, spec=spec, spec_text="", submitted_by=None, max_trials=100)
    with session_scope(engine) as session:
        assert session.scalars(select(Experiment)).all() == []


def test_only_one_claim_wins_and_a_duplicate_message_is_ignored(engine, experiment):
    trial_id = experiment.trial_ids[0]
    with session_scope(engine) as session:
        first = claim_trial(session, trial_id, worker="a", max_attempts=3)
    with session_scope(engine) as session:
        duplicate = claim_trial(session, trial_id, worker="b", max_attempts=3)
    assert first is not None and first.attempt == 1 and first.config["width"] == 4
    assert duplicate is None
    with session_scope(engine) as session:
        assert session.get(Trial, trial_id).worker == "a"


def test_a_redelivery_after_a_dead_worker_takes_over_without_doubling_rows(engine, experiment):
    trial_id = experiment.trial_ids[0]
    with session_scope(engine) as session:
        claim_trial(session, trial_id, worker="dies", max_attempts=3)
    for epoch in (1, 2):
        with session_scope(engine) as session:
            record_epoch(session, trial_id, _epoch(epoch))
    with session_scope(engine) as session:
        takeover = claim_trial(session, trial_id, worker="next", max_attempts=3, redelivered=True)
    assert takeover is not None and takeover.attempt == 2
    for epoch in (1, 2, 3):
        with session_scope(engine) as session:
            record_epoch(session, trial_id, _epoch(epoch))
    with session_scope(engine) as session:
        epochs = session.scalars(select(EpochMetric.epoch).where(EpochMetric.trial_id == trial_id)).all()
        assert sorted(epochs) == [1, 2, 3]
        assert session.get(Trial, trial_id).epochs_done == 3


def test_a_trial_whose_worker_keeps_dying_is_failed_after_max_attempts(engine, experiment):
    trial_id = experiment.trial_ids[0]
    for _ in range(2):
        with session_scope(engine) as session:
            assert claim_trial(session, trial_id, worker="w", max_attempts=2, redelivered=True) is not None
    with session_scope(engine) as session:
        assert claim_trial(session, trial_id, worker="w", max_attempts=2, redelivered=True) is None
    with session_scope(engine) as session:
        trial = session.get(Trial, trial_id)
        assert trial.status == "failed" and "2 attempts" in trial.error


def test_finished_trials_are_never_claimed_again(engine, experiment):
    trial_id = experiment.trial_ids[0]
    with session_scope(engine) as session:
        claim_trial(session, trial_id, worker="w", max_attempts=3)
        finish_trial(session, trial_id, status="succeeded", final_metrics={"final_val_loss": 0.5,
                                                                          "nan": float("nan")}, best_epoch=3)
    with session_scope(engine) as session:
        assert claim_trial(session, trial_id, worker="w", max_attempts=3, redelivered=True) is None
        trial = session.get(Trial, trial_id)
        assert trial.final_metrics == {"final_val_loss": 0.5, "nan": None}


def test_cancel_stops_queued_now_and_flags_running_ones(engine, experiment):
    running_id = experiment.trial_ids[0]
    with session_scope(engine) as session:
        claim_trial(session, running_id, worker="w", max_attempts=3)
        assert record_epoch(session, running_id, _epoch(1)) is False
    with session_scope(engine) as session:
        assert cancel_experiment(session, experiment.experiment_id) == {"cancelled": 3, "stopping": 1}
    with session_scope(engine) as session:
        assert record_epoch(session, running_id, _epoch(2)) is True  # the engine stops here
        for trial_id in experiment.trial_ids[1:]:
            assert claim_trial(session, trial_id, worker="w", max_attempts=3) is None
            assert session.get(Trial, trial_id).status == "cancelled"


def test_requeue_resets_ended_trials_and_their_rows(engine, experiment):
    trial_id = experiment.trial_ids[0]
    with session_scope(engine) as session:
        claim_trial(session, trial_id, worker="w", max_attempts=3)
        record_epoch(session, trial_id, _epoch(1))
        finish_trial(session, trial_id, status="failed", error="boom")
    with session_scope(engine) as session:
        assert requeue_trials(session, experiment.experiment_id) == [(trial_id, "cpu")]
    with session_scope(engine) as session:
        trial = session.get(Trial, trial_id)
        assert (trial.status, trial.attempts, trial.error) == ("queued", 0, None)
        assert count_epoch_rows(session, trial_id) == 0
