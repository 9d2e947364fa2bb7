"""The read side's aggregates against pandas on the same rows, on SQLite and PostgreSQL: exact
means, bands and counts per (group, epoch), every epoch."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from services import queries
from services.analysis import bands_from_moments
from services.db import session_scope
from services.spec import parse_spec
from services.submission import submit
from services.trials import record_epochs

SPEC = """
name: moments
seeds: [0, 1, 2]
parameters:
  dataset: {value: moons}
  epochs: {value: 5}
  lr: {values: [0.1, 10.0]}
"""


def fill(engine) -> tuple[list[int], pd.DataFrame]:
    with session_scope(engine) as session:
        ids = submit(session, spec=parse_spec(SPEC), spec_text=SPEC, submitted_by="t", max_trials=10).trial_ids
    rows = []
    with session_scope(engine) as session:
        for k, trial_id in enumerate(ids):
            # Trial k stops after 5 - k % 3 epochs, one blows up to 1e10 at epoch 2 and comes back.
            epochs = [{"epoch": e, "train_loss": 1.0 / e + 0.1 * k, "val_loss": (1e10 if (k, e) == (4, 2) else 2.0 / e),
                       "lr": 0.1} for e in range(1, 6 - k % 3)]
            record_epochs(session, trial_id, epochs)
            rows += [{"trial_id": trial_id, **row} for row in epochs]
    return ids, pd.DataFrame(rows)


def test_epoch_moments_are_the_exact_group_by_of_every_epoch(database_url: str, engine_for) -> None:
    engine = engine_for(database_url)
    ids, rows = fill(engine)
    groups = [ids[:3], ids[3:], []]
    with session_scope(engine) as session:
        found = pd.DataFrame(queries.epoch_moments(session, groups=groups, fields=("train_loss", "val_loss")))
    assert sorted(set(found["group"])) == [0, 1]
    for index, members in enumerate(groups[:2]):
        expected = rows[rows["trial_id"].isin(members)].groupby("epoch")
        got = found[found["group"] == index].set_index("epoch").sort_index()
        assert got.index.tolist() == [1, 2, 3, 4, 5]  # every epoch, the short runs' too
        for field in ("train_loss", "val_loss"):
            assert got[f"{field}_n"].tolist() == expected[field].count().tolist()
            assert got[f"{field}_mean"].tolist() == pytest.approx(expected[field].mean().tolist(), rel=1e-9)
            assert got[f"{field}_high"].tolist() == pytest.approx(expected[field].max().tolist())
            moments = got.rename(columns={f"{field}_{m}": m for m in queries.MOMENTS})[list(queries.MOMENTS)]
            banded = bands_from_moments(moments, band="std")
            std = expected[field].std().fillna(0.0)
            assert (banded["upper"] - banded["mean"]).tolist() == pytest.approx(std.tolist(), rel=1e-6, abs=1e-9)


def test_loss_maxima_and_epochs_to_reach_among_chosen_trials(database_url: str, engine_for) -> None:
    engine = engine_for(database_url)
    ids, rows = fill(engine)
    with session_scope(engine) as session:
        experiment_id = session.execute(queries.select(queries.Trial.experiment_id)).scalars().first()
        maxima = queries.loss_maxima(session, experiment_id)
        reached = queries.epochs_to_reach(session, experiment_id, field="val_loss", target=0.5, trial_ids=ids[:2])
    assert maxima[ids[4]][1] == 1e10 and math.isclose(maxima[ids[0]][0], 1.0)
    assert reached == {ids[0]: 4, ids[1]: 4}


def test_json_columns_decode_as_json_does_non_finite_floats_included():
    import json

    from services.queries import decode_json

    stored = json.dumps({"loss": float("nan"), "max": float("inf"), "betas": [0.9, 0.999], "name": "é"})
    decoded = decode_json(stored)  # Python's json writes NaN and Infinity; orjson refuses them
    assert math.isnan(decoded["loss"]) and decoded["max"] == math.inf
    assert decoded["betas"] == [0.9, 0.999] and decoded["name"] == "é"
    assert decode_json('{"a": 1, "b": [1.5, null]}') == {"a": 1, "b": [1.5, None]}
    assert decode_json("null") is None and decode_json(None) is None
