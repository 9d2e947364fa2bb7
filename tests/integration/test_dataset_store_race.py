"""Two submits storing the same new CSV at the same moment both succeed and one row remains."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from services.datasets import store_dataset, validate_csv
from services.db import session_scope
from services.models import Dataset
from services.trial_config import CsvDataset

pytestmark = pytest.mark.integration


def test_concurrent_stores_of_one_file_leave_one_row(database_url, engine_for, tmp_path):
    path = tmp_path / "points.csv"
    path.write_text("x,y\n" + "".join(f"{i},{i % 2}\n" for i in range(40)))
    validated = validate_csv(path, CsvDataset(csv=str(path), target="y"), max_bytes=10**6, max_rows=10**4,
                             max_columns=10)
    engine = engine_for(database_url)
    both_looked, errors = threading.Barrier(2), []

    def store() -> None:
        try:
            with session_scope(engine) as session:
                assert session.get(Dataset, validated.sha256) is None
                both_looked.wait(timeout=10)  # both have seen no row; now both store it
                store_dataset(session, validated)
        except Exception as exc:  # a plain INSERT raised IntegrityError in the second transaction here
            errors.append(exc)

    threads = [threading.Thread(target=store) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == 1
