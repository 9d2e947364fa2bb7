"""A fine-tuned, cross-validated trial whose training process is killed with SIGKILL twice
resumes to exactly the rows and result of the same trial trained without a kill (the runner of
test_kill_resume.py): the parent's weights, the fixed layer and the fold all survive a takeover."""

from __future__ import annotations

import pytest

from services.config import Settings
from services.db import session_scope
from services.fine_tuning import WEIGHTS_KIND
from services.models import Trial, TrialStatus
from services.queue import enqueue_jobs, make_celery
from services.trial_config import TrialConfig
from services.trials import finish_trial
from tests.integration.test_kill_resume import (  # noqa: F401 - killable_worker is a fixture
    _assert_as_uninterrupted,
    _kill_at,
    _submit_all,
    _wait_for,
    killable_worker,
)

pytestmark = pytest.mark.integration

PARENT_SPEC = "name: parent\nparameters:\n  width: {value: 32}\n  epochs: {value: 4}\n  n_train: {value: 100}\n"
# As test_kill_resume's LONG_SPEC (about 40-50 ms an epoch), fine-tuned with its first layer fixed,
# on fold 2 of 3 (the other folds are left queued: one trial is what this is about).
CHILD_SPEC = """name: fine-tuned-cv
fuse: false
seeds: [3]
folds: 3
parameters:
  n_train: {value: 5000}
  width: {value: 32}
  dropout: {value: 0.1}
  schedule: {value: cosine}
  weight_decay: {value: 0.01}
  freeze: {value: 1}
  init_from: {value: PARENT}
  epochs: {value: 50}
"""


@pytest.mark.slow
@pytest.mark.parametrize("killable_worker", [10], indirect=True)
def test_a_fine_tuned_cross_validated_trial_killed_twice_resumes_exactly(
        killable_worker, migrated_sqlite_url, broker_url, engine_for):  # noqa: F811 - the fixture
    from worker.training.fused import train_trial

    engine = engine_for(migrated_sqlite_url)
    [parent] = _submit_all(engine, PARENT_SPEC)
    with session_scope(engine) as session:
        config = TrialConfig.model_validate(session.get(Trial, parent).config)
    kept = train_trial(config).best_weights
    with session_scope(engine) as session:
        finish_trial(session, parent, status=TrialStatus.succeeded, final_metrics={}, artifacts={WEIGHTS_KIND: kept})
    trial_ids = _submit_all(engine, CHILD_SPEC.replace("PARENT", str(parent)))
    fold_2 = trial_ids[1:2]
    with session_scope(engine) as session:
        assert session.get(Trial, fold_2[0]).config["fold"] == 2
    enqueue_jobs(make_celery(Settings(database_url=migrated_sqlite_url, broker_url=broker_url)), [(fold_2, "cpu")])
    killed = _kill_at(engine, fold_2, killable_worker, (7, 28))
    trial = _wait_for(engine, fold_2[0], killable_worker, lambda t: t.status != "running", timeout=180)

    log = killable_worker.log()
    assert trial.status == "succeeded", f"{trial.error}\n{log[-3000:]}"
    assert trial.attempts == 3 and len(set(killed)) == 2 and log.count("resumes after epoch") == 2, log[-3000:]
    _assert_as_uninterrupted(engine, fold_2, parents=[kept])
