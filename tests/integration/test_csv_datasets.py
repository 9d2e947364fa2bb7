"""A user's CSV through the real CLI: a bad file is refused with one sentence and no rows; a good one
is stored once by content and a worker trains on exactly its rows."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from services.db import session_scope
from services.models import Dataset, Experiment, Trial
from tests.servers import fitscope, fitscope_env
from worker.jobs import execute_job

pytestmark = pytest.mark.integration

GOOD_CSV = "x1,x2,label\n" + "".join(f"{i % 7},{(i * 3) % 11},{'yes' if (i % 7) > 3 else 'no'}\n"
                                       for i in range(60))
SPEC = """name: csv
method: grid
parameters:
  dataset: {csv: data/points.csv, target: label}
  width: {value: 8}
  epochs: {value: 3}
"""


@pytest.fixture
def env(migrated_sqlite_url, broker_url, tmp_path):
    return fitscope_env(database_url=migrated_sqlite_url, broker_url=broker_url, home=tmp_path / "home")


def _write(tmp_path, *, csv: str | bytes, spec: str = SPEC):
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "data" / "points.csv"
    path.write_bytes(csv.encode() if isinstance(csv, str) else csv)
    (tmp_path / "spec.yaml").write_text(spec)
    return str(tmp_path / "spec.yaml")


def _counts(engine) -> tuple[int, int, int]:
    with session_scope(engine) as session:
        return tuple(session.scalar(select(func.count()).select_from(table)) for table in (Experiment, Trial, Dataset))


def test_a_bad_csv_exits_2_with_one_sentence_and_writes_nothing(env, tmp_path, migrated_sqlite_url, engine_for):
    spec = _write(tmp_path, csv="x1,x2,label\n1,2,yes\n3,oops,no\n4,5,yes\n")
    for command in ("validate", "submit"):
        result = fitscope(command, spec, env=env, cwd=tmp_path / "data")  # paths are relative to the spec file
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == ("error: data/points.csv: column 'x2' has text on line 3, but feature "
                                         "columns must hold numbers (a decimal comma?); fix the cell or remove the "
                                         "column")
        assert "oops" not in result.stderr  # the file's contents are never echoed, only its column names
    assert _counts(engine_for(migrated_sqlite_url)) == (0, 0, 0)


def test_a_missing_csv_exits_2(env, tmp_path, migrated_sqlite_url, engine_for):
    spec = _write(tmp_path, csv=GOOD_CSV, spec=SPEC.replace("points.csv", "nope.csv"))
    result = fitscope("submit", spec, env=env)
    assert result.returncode == 2 and "CSV file 'data/nope.csv' not found" in result.stderr
    assert _counts(engine_for(migrated_sqlite_url)) == (0, 0, 0)


def test_validate_accepts_a_csv_among_values(env, tmp_path):
    spec = _write(tmp_path, csv=GOOD_CSV, spec=SPEC.replace(
        "dataset: {csv: data/points.csv, target: label}",
        "dataset: {values: [{csv: data/points.csv, target: label}, moons]}"))
    result = fitscope("validate", spec, "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["trials"] == 2


def test_a_good_csv_is_stored_once_and_a_trial_trains_on_it(env, tmp_path, migrated_sqlite_url, engine_for):
    spec = _write(tmp_path, csv=GOOD_CSV)
    first = fitscope("submit", spec, "--json", env=env)
    assert first.returncode == 0, first.stderr
    second = fitscope("submit", spec, "--json", env=env)
    assert second.returncode == 0, second.stderr
    engine = engine_for(migrated_sqlite_url)
    assert _counts(engine) == (2, 2, 1)

    trial_id = json.loads(first.stdout)["trial_ids"][0]
    with session_scope(engine) as session:
        stored = session.scalars(select(Dataset)).one()
        assert (stored.name, stored.n_rows, stored.columns) == ("points.csv", 60, ["x1", "x2", "label"])
        assert stored.size_bytes == len(GOOD_CSV.encode())
        dataset = session.get(Trial, trial_id).config["dataset"]
        assert dataset["sha256"] == stored.sha256 and dataset["task"] == "classification"
    assert execute_job(engine, [trial_id], worker="test", redelivered=False) == {str(trial_id): "succeeded"}
    with session_scope(engine) as session:
        trial = session.get(Trial, trial_id)
        assert (trial.status, trial.epochs_done) == ("succeeded", 3)
