"""Every command that changes something answers in JSON with --json, `validate --json` answers for a
bad spec too (on stdout, exit 2), and `fitscope --version` says which fitscope this is: through the
real CLI, a real broker and a migrated SQLite database, no worker (nothing has to train)."""

from __future__ import annotations

import json
from importlib.metadata import version

import pytest
import redis

from tests.servers import fitscope, fitscope_env

pytestmark = pytest.mark.integration

GRID = "program: train.py\nmethod: grid\nparameters:\n  width: {values: [4, 8, 16]}\n  epochs: {value: 2}\n"


@pytest.fixture
def env(migrated_sqlite_url, broker_url, tmp_path):
    return fitscope_env(database_url=migrated_sqlite_url, broker_url=broker_url, home=tmp_path / "home",
                        FITSCOPE_FUSE="false")


def _spec(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_version_names_the_installed_distribution(env):
    result = fitscope("--version", env=env)
    assert result.returncode == 0 and result.stdout == f"fitscope {version('fitscope')}\n"


def test_validate_json_of_a_good_spec_without_a_name_takes_the_file_stem(env, tmp_path):
    result = fitscope("validate", _spec(tmp_path, "width-sweep.yaml", GRID), "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "valid": True, "name": "width-sweep", "trials": 3,
        "warnings": ["program: a W&B sweep key, accepted and ignored (fitscope trains its own models; the script "
                     "is not run)"]}


def test_validate_json_of_a_bad_spec_lists_every_error_with_its_path_on_stdout(env, tmp_path):
    bad = "method: grid\nseeds: [0, 0]\nparameters:\n  widht: {values: [4]}\n  lr: {values: [-1]}\n"
    result = fitscope("validate", _spec(tmp_path, "bad.yaml", bad), "--json", env=env)
    assert result.returncode == 2
    payload = json.loads(result.stdout)
    assert payload["valid"] is False and payload["warnings"] == []
    assert [error["path"] for error in payload["errors"]] == ["seeds[1]", "parameters.widht", "parameters.lr.values[0]"]
    assert all(set(error) == {"path", "message"} and error["message"] for error in payload["errors"])
    assert payload["errors"][1]["message"].startswith("unknown parameter; did you mean width?")


@pytest.mark.parametrize(("files", "argument", "path", "message"), [
    ({}, "missing.yaml", "spec_file", "spec file '{dir}/missing.yaml' not found; pass the path of a YAML grid spec"),
    ({"empty.yaml": "name: empty\n"}, "empty.yaml", "parameters", "is required; say what to vary"),
])
def test_validate_json_names_a_file_problem_and_a_missing_key_too(env, tmp_path, files, argument, path, message):
    for name, text in files.items():
        _spec(tmp_path, name, text)
    result = fitscope("validate", str(tmp_path / argument), "--json", env=env)
    assert result.returncode == 2
    [error] = json.loads(result.stdout)["errors"]
    assert error["path"] == path and error["message"].startswith(message.format(dir=tmp_path))


def test_submit_cancel_requeue_and_db_upgrade_answer_in_json(env, tmp_path, broker_url, migrated_sqlite_url):
    upgraded = fitscope("db", "upgrade", "--json", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    schema = json.loads(upgraded.stdout)
    assert set(schema) == {"database", "from", "to"} and schema["from"] == schema["to"]  # already at head
    assert schema["database"] == migrated_sqlite_url

    submitted = fitscope("submit", _spec(tmp_path, "grid.yaml", GRID), "--json", env=env)
    assert submitted.returncode == 0, submitted.stderr
    payload = json.loads(submitted.stdout)
    experiment_id, trial_ids = payload["experiment_id"], payload["trial_ids"]
    assert payload == {"experiment_id": experiment_id, "name": "grid", "trial_ids": trial_ids, "jobs": 3}
    client = redis.Redis.from_url(broker_url)
    try:
        assert client.llen("cpu") == 3
        client.delete("cpu")  # no worker here: keep the queue for the next test

        cancelled = fitscope("cancel", str(experiment_id), "--json", env=env)
        assert cancelled.returncode == 0, cancelled.stderr
        assert json.loads(cancelled.stdout) == {"experiment_id": experiment_id, "cancelled": 3, "stopping": 0}

        requeued = fitscope("requeue", str(experiment_id), "--json", env=env)
        assert requeued.returncode == 0, requeued.stderr
        assert json.loads(requeued.stdout) == {"experiment_id": experiment_id, "trial_ids": trial_ids, "jobs": 3}
        assert client.llen("cpu") == 3
        client.delete("cpu")
    finally:
        client.close()

    missing = fitscope("cancel", "999", "--json", env=env)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr == "error: experiment 999 does not exist; `fitscope status` lists them\n"


def test_parquet_to_stdout_is_refused_with_the_flag_that_fixes_it(env):
    result = fitscope("export", "1", "--format", "parquet", env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("error: --format parquet writes a binary file; give one with --output, e.g. -o "
                             "experiment-1-trials.parquet\n")
