"""`import fitscope` from a notebook: submit a grid (a dict, as a notebook writes it) to a real broker
with a real `fitscope worker`, wait, read the trials and epochs back as DataFrames, draw the
dashboard's figure on them; and the Parquet export holds the same values as the CSV export."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fitscope
from tests.servers import WorkerProcess, fitscope_env
from tests.servers import fitscope as run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GRID = {
    "method": "grid",
    "seeds": [0],
    "parameters": {
        "dataset": {"value": "moons"},
        "epochs": {"value": 4},
        "width": {"values": [4, 16]},
        "lr": {"values": [0.01, 0.1]},
        "betas": {"value": [0.9, 0.99]},  # a list-valued parameter: JSON text in CSV and Parquet
    },
}


@pytest.fixture
def stack(migrated_sqlite_url, broker_url, tmp_path, monkeypatch):
    env = fitscope_env(database_url=migrated_sqlite_url, broker_url=broker_url, home=tmp_path / "home")
    worker = WorkerProcess(env, tmp_path / "worker.log", "--name", f"api@{tmp_path.name}")
    worker.wait_ready()
    yield env, worker
    worker.stop()


def test_the_api_submits_a_grid_waits_and_reads_the_results_back(stack, migrated_sqlite_url, broker_url, tmp_path,
                                                                  capsys):
    env, worker = stack
    with fitscope.connect(database_url=migrated_sqlite_url, broker_url=broker_url, home=tmp_path / "home") as client:
        assert client.validate(GRID).trials == 4
        experiment = client.submit(GRID, tags=["api"], note="from a notebook")
        assert experiment.name == "untitled" and len(experiment.trial_ids) == 4
        summary = client.wait(experiment.id, timeout=240)
        assert summary.counts["succeeded"] == 4, worker.log()[-3000:]

        experiments = client.experiments()
        trials = client.trials(experiment.id)
        epochs = client.epochs(experiment.id)

    assert experiments.loc[0, "id"] == experiment.id and experiments.loc[0, "succeeded"] == 4
    assert experiments.loc[0, "tags"] == ["api"] and experiments.loc[0, "finished"]
    assert trials["trial_id"].tolist() == experiment.trial_ids
    assert [(row.width, row.lr) for row in trials.itertuples()] == [(4, 0.01), (4, 0.1), (16, 0.01), (16, 0.1)]
    assert set(trials["status"]) == {"succeeded"} and trials["final_val_loss"].notna().all()
    assert len(epochs) == 4 * 4 and sorted(epochs["epoch"].unique()) == [1, 2, 3, 4]
    assert epochs.groupby("trial_id")["val_loss"].count().tolist() == [4, 4, 4, 4]
    # the last line of the wait shows the finished grid
    progress = capsys.readouterr().err  # not a terminal here: plain lines, no carriage returns
    assert "\r" not in progress and progress.splitlines()[-1].endswith("4/4 trials ended  succeeded=4")

    figure = fitscope.charts.learning_curves(epochs, trials, "width")
    traces = [trace for trace in figure.data if len(trace.x)]
    assert len(traces) == 2 * 2  # train and validation per width, each line through its trials with gaps
    assert all(np.isfinite(np.asarray(trace.y, dtype=float)).sum() == 2 * 4 for trace in traces)  # 2 trials x 4

    for what in ("trials", "epochs"):
        _parquet_holds_what_the_csv_holds(env, experiment.id, what, tmp_path)


def _parquet_holds_what_the_csv_holds(env, experiment_id: int, what: str, tmp_path) -> None:
    csv_path, parquet_path = tmp_path / f"{what}.csv", tmp_path / f"{what}.parquet"
    for fmt, path in (("csv", csv_path), ("parquet", parquet_path)):
        result = run_cli("export", str(experiment_id), "--what", what, "--format", fmt, "-o", str(path), env=env)
        assert result.returncode == 0, result.stderr
    from_csv, from_parquet = pd.read_csv(csv_path), pd.read_parquet(parquet_path)
    assert list(from_parquet.columns) == list(from_csv.columns) and len(from_parquet) == len(from_csv) > 0

    schema = pq.read_schema(parquet_path)
    if what == "epochs":
        assert schema.field("trial_id").type == pa.int64() and schema.field("epoch").type == pa.int64()
        assert schema.field("val_loss").type == pa.float64()
    else:
        assert schema.field("width").type == pa.int64() and schema.field("lr").type == pa.float64()
        assert schema.field("status").type == pa.string()
        assert schema.field("started_at").type == pa.timestamp("us", tz="UTC")
        assert [json.loads(text) for text in from_parquet["betas"]] == [[0.9, 0.99]] * 4
        for column in ("started_at", "finished_at"):  # CSV holds the text, Parquet the instant
            assert (pd.to_datetime(from_csv[column], utc=True) == from_parquet[column]).all()
            from_csv[column] = from_parquet[column]
    pd.testing.assert_frame_equal(from_parquet, from_csv, check_dtype=False)

    # DuckDB reads the file as it is, with SQL types for the columns
    types = {row[0]: row[1] for row in duckdb.sql(f"DESCRIBE SELECT * FROM '{parquet_path}'").fetchall()}
    assert types["trial_id"] == "BIGINT" and types[("val_loss" if what == "epochs" else "lr")] == "DOUBLE"
    if what == "trials":
        assert types["started_at"] == "TIMESTAMP WITH TIME ZONE" and types["status"] == "VARCHAR"
    [(rows,)] = duckdb.sql(f"SELECT count(*) FROM '{parquet_path}'").fetchall()
    assert rows == len(from_csv)
