"""A trial's life in a real database: claims are exclusive, re-delivery is safe, cancel and requeue."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from services.config import get_settings
from services.db import session_scope
from services.models import EpochMetric, Experiment, Trial
from services.spec import parse_spec
from services.submission import submit
from services.trials import (
    cancel_experiment,
    claim_job,
    claim_trial,
    count_epoch_rows,
    finish_trial,
    record_epoch,
    record_epochs,
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
    with session_scope(engine) as session:  # a job of one trial, with no checkpoint: it starts over
        job = claim_job(session, [trial_id], worker="next", max_attempts=3, redelivered=True)
        assert count_epoch_rows(session, trial_id) == 0
    takeover = job.claims[trial_id]
    assert takeover.attempt == 2 and takeover.takeover and job.checkpoint is None
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


def test_a_superseded_attempt_can_write_nothing_more(engine, experiment):
    from services.trials import TrialSuperseded

    trial_id = experiment.trial_ids[0]
    with session_scope(engine) as session:
        first = claim_trial(session, trial_id, worker="slow", max_attempts=3)
    with session_scope(engine) as session:
        record_epochs(session, trial_id, [_epoch(1)], token=first.token)
    with session_scope(engine) as session:  # the broker re-delivered while "slow" still ran
        second = claim_trial(session, trial_id, worker="next", max_attempts=3, redelivered=True)
    with pytest.raises(TrialSuperseded), session_scope(engine) as session:
        record_epochs(session, trial_id, [_epoch(2)], token=first.token)
    with pytest.raises(TrialSuperseded), session_scope(engine) as session:
        finish_trial(session, trial_id, status="succeeded", final_metrics={}, token=first.token)
    with session_scope(engine) as session:
        record_epochs(session, trial_id, [_epoch(1)], token=second.token)
        finish_trial(session, trial_id, status="succeeded", final_metrics={}, token=second.token)
    with session_scope(engine) as session:
        trial = session.get(Trial, trial_id)
        assert (trial.status, trial.worker, trial.attempts) == ("succeeded", "next", 2)
        assert session.scalars(select(EpochMetric.epoch).where(EpochMetric.trial_id == trial_id)).all() == [1]


def test_an_attempt_superseded_by_a_requeue_can_write_nothing_even_with_the_same_attempt_number(engine, experiment):
    """A re-queue resets the attempt count, so the next claim is attempt 1 again: only the token tells
    the stale attempt 1 (still running) from the new one."""
    from services.trials import TrialSuperseded, read_stop_flags

    trial_id = experiment.trial_ids[0]
    with session_scope(engine) as session:
        stale = claim_trial(session, trial_id, worker="stale", max_attempts=3)
        record_epochs(session, trial_id, [_epoch(1)], token=stale.token)
    with session_scope(engine) as session:  # `fitscope cancel`, then `fitscope requeue` while it still runs
        cancel_experiment(session, experiment.experiment_id)
        finish_trial(session, trial_id, status="cancelled")
    with session_scope(engine) as session:
        requeue_trials(session, experiment.experiment_id)
    with session_scope(engine) as session:
        fresh = claim_trial(session, trial_id, worker="fresh", max_attempts=3)
    assert fresh.attempt == stale.attempt == 1 and fresh.token != stale.token
    for write in (lambda s: record_epochs(s, trial_id, [_epoch(2)], token=stale.token),
                  lambda s: record_epochs(s, trial_id, [], token=stale.token),
                  lambda s: finish_trial(s, trial_id, status="succeeded", final_metrics={}, token=stale.token)):
        with pytest.raises(TrialSuperseded), session_scope(engine) as session:
            write(session)
    with engine.connect() as connection:
        assert read_stop_flags(connection, {trial_id: stale.token}) == (set(), {trial_id})
        assert read_stop_flags(connection, {trial_id: fresh.token}) == (set(), set())
    with session_scope(engine) as session:
        trial = session.get(Trial, trial_id)
        assert (trial.status, trial.worker, trial.epochs_done) == ("running", "fresh", 0)
        assert count_epoch_rows(session, trial_id) == 0


def test_a_jobs_trials_finish_together_each_with_its_own_rows_verdict_and_pictures_but_not_a_superseded_one(
        engine, experiment):
    from services.models import TrialArtifact
    from services.trials import Ending, finish_trials

    ours, taken = experiment.trial_ids[:2]
    with session_scope(engine) as session:
        job = claim_job(session, [ours, taken], worker="w", max_attempts=3, redelivered=False)
        record_epochs(session, ours, [_epoch(1)], token=job.token)  # stored; epochs 2 and 3 come with the end
    with session_scope(engine) as session:  # another attempt takes `taken` over meanwhile
        session.get(Trial, taken).attempt_token = "someone-else"
    endings = [Ending(trial_id=trial_id, status="succeeded", final_metrics={"test_loss": 0.5}, best_epoch=3,
                      artifacts={"curve_1d": {"trial": trial_id}}, rows=[_epoch(2), _epoch(3)])
               for trial_id in (ours, taken)]
    with session_scope(engine) as session:
        assert finish_trials(session, endings, token=job.token) == {taken}
    with session_scope(engine) as session:
        trial, other = session.get(Trial, ours), session.get(Trial, taken)
        assert (trial.status, trial.epochs_done, trial.best_epoch, trial.final_metrics) == (
            "succeeded", 3, 3, {"test_loss": 0.5})
        assert trial.verdict is not None and trial.finished_at is not None
        assert session.scalars(select(EpochMetric.epoch).where(EpochMetric.trial_id == ours)
                               .order_by(EpochMetric.epoch)).all() == [1, 2, 3]
        assert session.scalars(select(TrialArtifact.data).where(TrialArtifact.trial_id == ours)).all() == [
            {"trial": ours}]
        # nothing of the superseded one: still running under the other attempt, no rows, no pictures
        assert (other.status, other.epochs_done, other.verdict) == ("running", 0, None)
        assert count_epoch_rows(session, taken) == 0
        assert session.scalars(select(TrialArtifact.trial_id).where(TrialArtifact.trial_id == taken)).all() == []


def test_the_final_write_waits_out_a_database_outage(engine, experiment, monkeypatch):
    from sqlalchemy.exc import OperationalError

    import services.trials as trials_module
    import worker.jobs as jobs

    monkeypatch.setenv("FITSCOPE_DB_RETRY_DELAYS_S", "[0.01, 0.01]")
    get_settings.cache_clear()  # the submit read them already
    real_finish, failures = trials_module.finish_trials, []

    def flaky_finish(*args, **kwargs):
        if len(failures) < 2:  # the database is down for the first two tries
            failures.append(1)
            raise OperationalError("UPDATE trials", {}, Exception("server closed the connection"))
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(jobs, "finish_trials", flaky_finish)
    trial_id = experiment.trial_ids[0]
    statuses = jobs.execute_job(engine, [trial_id], worker="w", redelivered=False)
    assert statuses == {str(trial_id): "succeeded"} and len(failures) == 2
    with session_scope(engine) as session:
        trial = session.get(Trial, trial_id)
        assert trial.status == "succeeded"
        assert count_epoch_rows(session, trial_id) == 3


def test_a_database_down_for_good_raises_database_down_and_keeps_the_trial_takeable(engine, experiment,
                                                                                   monkeypatch):
    from sqlalchemy.exc import OperationalError

    import worker.jobs as jobs

    def always_down(*_args, **_kwargs):
        raise OperationalError("UPDATE trials", {}, Exception("connection refused"))

    monkeypatch.setattr(jobs, "finish_trials", always_down)
    monkeypatch.setenv("FITSCOPE_DB_RETRY_DELAYS_S", "[0.01]")
    monkeypatch.setenv("FITSCOPE_DB_WAIT_S", "0.05")
    get_settings.cache_clear()  # the submit read them already
    trial_id = experiment.trial_ids[0]
    with pytest.raises(jobs.DatabaseDown, match="did not answer"):
        jobs.execute_job(engine, [trial_id], worker="w", redelivered=False)
    with session_scope(engine) as session:  # the task re-queues itself as a takeover: the claim takes it
        takeover = claim_trial(session, trial_id, worker="w2", max_attempts=3, redelivered=True)
    assert takeover is not None and takeover.attempt == 2


def test_writes_wait_for_the_database_as_long_as_the_setting_says_then_give_up(engine, monkeypatch):
    """Outages shorter than FITSCOPE_DB_WAIT_S are waited out however short each retry delay is; the
    delays' last one repeats."""
    from sqlalchemy.exc import OperationalError

    import worker.jobs as jobs
    from services.config import Settings

    def down_for(failures: int):
        calls = []

        def write(_session):
            calls.append(time.monotonic())
            if len(calls) <= failures:
                raise OperationalError("UPDATE trials", {}, Exception("connection refused"))
            return "written"
        return write, calls

    settings = Settings(db_retry_delays_s=(0.01, 0.02), db_wait_s=1.0)
    write, calls = down_for(20)  # 0.01 + 19 x 0.02 = 0.39 s, far past the delays put together (0.03 s)
    assert jobs.write_with_retry(engine, write, settings=settings) == "written" and len(calls) == 21
    write, calls = down_for(1000)
    started = time.monotonic()
    with pytest.raises(jobs.DatabaseDown):
        jobs.write_with_retry(engine, write, settings=settings)
    assert 0.9 <= time.monotonic() - started < 3.0


def test_requeued_trials_are_planned_into_fused_jobs_unless_their_spec_says_not(engine, experiment):
    from services.submission import plan_requeue

    unfused_spec = SPEC.replace("name: t\n", "name: u\nfuse: false\n")
    with session_scope(engine) as session:
        unfused = submit(session, spec=parse_spec(unfused_spec), spec_text=unfused_spec, submitted_by=None,
                         max_trials=100)
        cancel_experiment(session, experiment.experiment_id)
        cancel_experiment(session, unfused.experiment_id)
    with session_scope(engine) as session:
        requeued = requeue_trials(session, experiment.experiment_id) + requeue_trials(session, unfused.experiment_id)
        jobs = plan_requeue(session, requeued, fuse=True, fuse_max_trials=64)
        off = plan_requeue(session, requeued, fuse=False, fuse_max_trials=64)
    by_width = {4: experiment.trial_ids[:2], 8: experiment.trial_ids[2:]}  # widths do not share a model
    assert sorted(ids for ids, _ in jobs if len(ids) > 1) == sorted(by_width.values())
    assert sorted(ids[0] for ids, _ in jobs if len(ids) == 1) == sorted(unfused.trial_ids)
    assert sorted(ids[0] for ids, _ in off) == sorted(experiment.trial_ids + unfused.trial_ids)
    assert all(len(ids) == 1 for ids, _ in off) and {queue for _, queue in jobs} == {"cpu"}


def test_a_jobs_rows_written_at_once_match_one_trial_at_a_time(engine, experiment):
    """record_job_epochs, the job's write of all its trials' rows in a few statements, does what
    record_epochs with the token does for each trial: rows and progress for the trials the attempt
    holds, the cancel flags read back, nothing written for a trial another attempt took over."""
    from sqlalchemy import update

    from services.trials import TrialSuperseded, record_job_epochs

    a, b, c, d = experiment.trial_ids
    with session_scope(engine) as session:
        job = claim_job(session, [a, b, c, d], worker="w", max_attempts=3)
    with session_scope(engine) as session:  # c: asked to stop; d: taken over by another attempt
        session.execute(update(Trial).where(Trial.id == c).values(cancel_requested=True))
        session.execute(update(Trial).where(Trial.id == d).values(attempt_token="another"))
    rows = {a: [_epoch(1), _epoch(2)], b: [], c: [_epoch(1)], d: [_epoch(1)]}
    with session_scope(engine) as session:
        assert record_job_epochs(session, rows, token=job.token) == ({c}, {d})
    with session_scope(engine) as session:  # the same through record_epochs, one trial at a time
        assert [record_epochs(session, trial_id, [], token=job.token) for trial_id in (a, b, c)] == [
            False, False, True]
        with pytest.raises(TrialSuperseded):
            record_epochs(session, d, [], token=job.token)
    with session_scope(engine) as session:
        assert {t.id: t.epochs_done for t in session.scalars(select(Trial))} == {a: 2, b: 0, c: 1, d: 0}
        written = session.execute(select(EpochMetric.trial_id, EpochMetric.epoch, EpochMetric.val_loss)).all()
        assert sorted(written) == [(a, 1, _epoch(1)["val_loss"]), (a, 2, _epoch(2)["val_loss"]),
                                   (c, 1, _epoch(1)["val_loss"])]
        assert record_job_epochs(session, {}, token=job.token) == (set(), set())


def test_finish_with_its_last_rows_writes_what_rows_then_finish_write(engine, experiment):
    """A job ends a trial in one write: finish_trial given the trial's unwritten rows stores them, its
    progress and the verdict that record_epochs then finish_trial store, whether its earlier rows are in
    memory (rows_stored=False) or already written (rows_stored=True); nothing for a trial taken over."""
    from sqlalchemy import update

    from services.trials import TrialSuperseded

    a, b, c, d = experiment.trial_ids
    rows = [_epoch(1), _epoch(2), {**_epoch(3), "val_loss": 0.5}, {**_epoch(4), "val_loss": 0.7}]
    ended = {"status": "succeeded", "final_metrics": {"final_val_loss": 0.7}, "best_epoch": 3}
    with session_scope(engine) as session:
        job = claim_job(session, [a, b, c, d], worker="w", max_attempts=3)
    with session_scope(engine) as session:  # a: rows, then the end, as before
        record_epochs(session, a, rows, token=job.token)
        finish_trial(session, a, **ended, token=job.token)
    with session_scope(engine) as session:  # b: all its rows with the end
        finish_trial(session, b, **ended, token=job.token, rows=rows, rows_stored=False)
    with session_scope(engine) as session:  # c: two rows written earlier, the last two with the end
        record_epochs(session, c, rows[:2], token=job.token)
    with session_scope(engine) as session:
        finish_trial(session, c, **ended, token=job.token, rows=rows[2:], rows_stored=True)
    with session_scope(engine) as session:
        session.execute(update(Trial).where(Trial.id == d).values(attempt_token="another"))
    with pytest.raises(TrialSuperseded), session_scope(engine) as session:
        finish_trial(session, d, **ended, token=job.token, rows=rows, rows_stored=False)
    with session_scope(engine) as session:
        trials = {t.id: t for t in session.scalars(select(Trial))}
        stored = session.execute(select(EpochMetric.trial_id, EpochMetric.epoch, EpochMetric.val_loss)).all()
    expected = sorted((trial_id, row["epoch"], row["val_loss"]) for trial_id in (a, b, c) for row in rows)
    assert sorted(stored) == expected
    assert trials[a].verdict is not None and trials[a].diagnosis["numbers"]["epochs"] == 4
    for trial_id in (b, c):
        assert (trials[trial_id].status, trials[trial_id].epochs_done, trials[trial_id].best_epoch) == (
            "succeeded", 4, 3)
        assert (trials[trial_id].verdict, trials[trial_id].diagnosis) == (trials[a].verdict, trials[a].diagnosis)
    assert (trials[d].status, trials[d].epochs_done) == ("running", 0)


def test_a_retried_write_of_rows_keeps_one_copy(engine, experiment):
    """A write whose COMMIT reached the database but whose reply was lost is sent again: its rows are
    skipped (INSERT ... ON CONFLICT DO NOTHING), not an error."""
    from services.trials import TrialSuperseded, record_job_epochs

    a, b = experiment.trial_ids[:2]
    with session_scope(engine) as session:
        job = claim_job(session, [a, b], worker="w", max_attempts=3)
    rows = {a: [_epoch(1), _epoch(2)], b: [_epoch(1)]}
    for _ in range(2):
        with session_scope(engine) as session:
            assert record_job_epochs(session, rows, token=job.token) == (set(), set())
    with session_scope(engine) as session:
        record_epochs(session, a, [_epoch(2), _epoch(3)], token=job.token)
        finish_trial(session, b, status="succeeded", token=job.token, rows=[_epoch(1), _epoch(2)])
    with pytest.raises(TrialSuperseded), session_scope(engine) as session:  # the finish, sent again
        finish_trial(session, b, status="succeeded", token=job.token, rows=[_epoch(2)])
    with session_scope(engine) as session:
        stored = session.execute(select(EpochMetric.trial_id, EpochMetric.epoch)).all()
        assert sorted(stored) == [(a, 1), (a, 2), (a, 3), (b, 1), (b, 2)]
        assert session.get(Trial, a).epochs_done == 3 and session.get(Trial, b).epochs_done == 2
