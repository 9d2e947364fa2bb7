"""services.actions, the one orchestration of submit, cancel and re-queue, on a real broker and a
migrated SQLite file: a dead broker writes nothing, a broker that goes away between the commit and
the send leaves the rows and one sentence naming the command that sends them."""

from __future__ import annotations

import pytest
import redis
from sqlalchemy import func, select

import services.actions as actions
from services.broker import free_port
from services.config import make_settings
from services.db import session_scope
from services.models import Experiment, Trial
from services.queue import BrokerUnreachable, make_celery
from services.spec import parse_spec

pytestmark = pytest.mark.integration

SPEC = "name: three\nfuse: false\nparameters:\n  width: {values: [4, 8, 16]}\n"


def _counts(engine) -> tuple[int, int]:
    with session_scope(engine) as session:
        return (session.scalar(select(func.count()).select_from(Experiment)),
                session.scalar(select(func.count()).select_from(Trial)))


@pytest.fixture
def settings(migrated_sqlite_url, broker_url):
    return make_settings(database_url=migrated_sqlite_url, broker_url=broker_url)


def _submit(engine, settings, producer):
    return actions.submit(engine, producer, spec=parse_spec(SPEC), spec_text=SPEC, settings=settings,
                          submitted_by="tester")


def test_submit_queues_every_trial_after_the_commit(engine_for, settings, broker_url):
    engine = engine_for(settings.database_url)
    submitted = _submit(engine, settings, make_celery(settings))
    assert _counts(engine) == (1, 3) and len(submitted.trial_ids) == 3
    client = redis.Redis.from_url(broker_url)
    try:
        assert client.llen("cpu") == 3
    finally:
        client.close()


def test_a_dead_broker_is_found_before_anything_is_written(engine_for, settings):
    engine = engine_for(settings.database_url)
    dead = make_settings(database_url=settings.database_url, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(BrokerUnreachable, match="cannot reach the broker at redis://127.0.0.1:"):
        actions.submit(engine, make_celery(dead), spec=parse_spec(SPEC), spec_text=SPEC, settings=dead,
                       submitted_by=None, broker_timeout_s=1)
    assert _counts(engine) == (0, 0)


def test_a_broker_lost_after_the_commit_leaves_the_rows_and_says_what_to_run(engine_for, settings, monkeypatch):
    engine = engine_for(settings.database_url)

    def broker_went_away(*_args, **_kwargs):
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(actions, "enqueue_submission", broker_went_away)
    with pytest.raises(actions.NotQueued) as caught:
        _submit(engine, settings, make_celery(settings))
    assert str(caught.value) == (
        f"experiment 1 was saved but its trials could not be queued: the broker at {settings.broker_url} stopped "
        "answering (ConnectionResetError); once it is back run `fitscope requeue 1 --status queued`")
    assert _counts(engine) == (1, 3)

    monkeypatch.setattr(actions, "enqueue_jobs", broker_went_away)
    with pytest.raises(actions.NotQueued, match="3 trials of experiment 1 were reset but could not be queued: "):
        actions.requeue(engine, make_celery(settings), experiment_id=1, settings=settings, statuses=("queued",))


def test_cancel_and_requeue_of_an_experiment_that_does_not_exist_is_one_sentence(engine_for, settings):
    engine = engine_for(settings.database_url)
    sentence = "experiment 7 does not exist; `fitscope status` lists them"
    with pytest.raises(actions.ExperimentNotFound, match=sentence):
        actions.cancel(engine, experiment_id=7)
    with pytest.raises(actions.ExperimentNotFound, match=sentence):
        actions.requeue(engine, make_celery(settings), experiment_id=7, settings=settings)
    with pytest.raises(ValueError, match="status 'running' is not a re-queueable status"):
        actions.requeue(engine, make_celery(settings), experiment_id=7, settings=settings, statuses=("running",))
