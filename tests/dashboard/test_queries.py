"""The read side's aggregates against pandas on the same rows, on SQLite and PostgreSQL: exact
means, bands and counts per (group, epoch), every epoch."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from sqlalchemy import update

from services import json_columns, queries
from services.analysis import bands_from_moments
from services.db import session_scope
from services.models import EpochMetric
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


def test_norms_recorded_are_those_the_last_epochs_hold(database_url: str, engine_for) -> None:
    """last_epoch_values_recorded names a field exactly when last_epoch_values gives it a value for
    some trial: a norm recorded on an earlier epoch only does not count, nor a trial of another status."""
    engine = engine_for(database_url)
    ids, _ = fill(engine)
    with session_scope(engine) as session:
        # ids[1] ran 4 epochs (fill): its gradient norm is on epoch 2 only, its weight norm on its last.
        session.execute(update(EpochMetric).where(
            EpochMetric.trial_id == ids[1], EpochMetric.epoch == 2).values(grad_norm=0.5))
        session.execute(update(EpochMetric).where(
            EpochMetric.trial_id == ids[1], EpochMetric.epoch == 4).values(weight_norm=3.0))
    with session_scope(engine) as session:
        experiment_id = session.execute(queries.select(queries.Trial.experiment_id)).scalars().first()
        status = session.get(queries.Trial, ids[1]).status
        values = queries.last_epoch_values(session, experiment_id)
        recorded = queries.last_epoch_values_recorded(session, experiment_id, fields=("grad_norm", "weight_norm"))
        of_status = queries.last_epoch_values_recorded(session, experiment_id, fields=("grad_norm", "weight_norm"),
                                                       statuses=[status])
        of_others = queries.last_epoch_values_recorded(session, experiment_id, fields=("weight_norm",),
                                                       statuses=["succeeded", "diverged"])
    expected = tuple(name for name in ("grad_norm", "weight_norm")
                     if any(row[name] is not None for row in values.values()))
    assert recorded == of_status == expected == ("weight_norm",)
    assert of_others == () and status not in ("succeeded", "diverged")


def test_json_columns_decode_as_json_does_non_finite_floats_included():
    import json

    from services.json_columns import decode_json

    stored = json.dumps({"loss": float("nan"), "max": float("inf"), "betas": [0.9, 0.999], "name": "é"})
    decoded = decode_json(stored)  # Python's json writes NaN and Infinity; orjson refuses them
    assert math.isnan(decoded["loss"]) and decoded["max"] == math.inf
    assert decoded["betas"] == [0.9, 0.999] and decoded["name"] == "é"
    assert decode_json('{"a": 1, "b": [1.5, null]}') == {"a": 1, "b": [1.5, None]}
    assert decode_json("null") is None and decode_json(None) is None
    # A column's texts at once, as trial_frame reads them: what decode_json(text) or {} gives each.
    texts = [stored, '{"a": 1}', None, "null", "{}", '{"b": [1.5, null]}']
    for column in (texts, texts[1:]):  # with a NaN (decoded by json) and without
        found = json_columns.decoded(column)
        expected = [decode_json(text) or {} for text in column]
        assert json.dumps(found) == json.dumps(expected) and found[-1] == {"b": [1.5, None]}


def test_trial_frame_is_the_frame_of_trial_rows(database_url: str, engine_for) -> None:
    from services.models import Trial

    engine = engine_for(database_url)
    ids, _ = fill(engine)
    with session_scope(engine) as session:
        # Trials with different metric keys (a diverged run records fewer), one without any, and a
        # diagnosis with reasons, numbers and thresholds.
        session.get(Trial, ids[0]).final_metrics = {"final_val_loss": 0.5, "test_loss": 0.6}
        session.get(Trial, ids[1]).final_metrics = {"final_val_loss": 0.7}
        session.get(Trial, ids[2]).diagnosis = {"reasons": ["overfit: ..."],
                                                "numbers": {"gap_ratio": 0.4, "overfit_gap_limit": 0.25}}
    with session_scope(engine) as session:
        experiment_id = session.get(Trial, ids[0]).experiment_id
        rows = queries.trial_rows(session, experiment_id, reasons=True)
        frame = queries.trial_frame(session, experiment_id, reasons=True)
    expected = pd.DataFrame(rows)
    assert set(frame.columns) == set(expected.columns) and frame.columns[-1] == "diag_reasons"
    pd.testing.assert_frame_equal(frame[expected.columns], expected)
    assert "diag_overfit_gap_limit" not in frame and math.isnan(frame.loc[1, "test_loss"])


def test_loss_maxima_of_chosen_trials_and_layer_norms_at_both_ends(database_url: str, engine_for) -> None:
    from services.models import EpochMetric, Trial

    engine = engine_for(database_url)
    ids, rows = fill(engine)
    with session_scope(engine) as session:
        for row in session.scalars(queries.select(EpochMetric).where(EpochMetric.trial_id.in_(ids[:2]))):
            row.layer_grad_norms = [row.epoch * 1.0, row.trial_id * 1.0]
        for trial_id in ids:
            session.get(Trial, trial_id).epochs_done = int((rows["trial_id"] == trial_id).sum())
    with session_scope(engine) as session:
        experiment_id = session.get(Trial, ids[0]).experiment_id
        maxima = queries.loss_maxima(session, experiment_id, trial_ids=[ids[4], ids[5]])
        ends = queries.layer_grad_norm_rows(session, experiment_id, ends_only=True)
        every = queries.layer_grad_norm_rows(session, experiment_id)
    assert set(maxima) == {ids[4], ids[5]} and maxima[ids[4]][1] == 1e10
    last = rows.groupby("trial_id")["epoch"].max()
    assert [(row["trial_id"], row["epoch"]) for row in ends] == [
        (trial_id, epoch) for trial_id in ids[:2] for epoch in (1, int(last[trial_id]))]
    assert [row for row in every if (row["trial_id"], row["epoch"]) in {(r["trial_id"], r["epoch"]) for r in ends}] \
        == ends


def _configs_as_decoded_one_by_one(texts: list[str | None]) -> pd.DataFrame:
    """The reference: every stored config decoded on its own, as trial_frame did before it decoded
    each configuration once."""
    return pd.DataFrame(json_columns.dict_columns([json_columns.decode_json(text) or {} for text in texts]))


@pytest.mark.parametrize("separator", [":", ": "])  # as json/orjson write it, and PostgreSQL's jsonb text
def test_configs_decoded_once_per_configuration_are_the_configs_decoded_one_by_one(
        separator: str, monkeypatch: pytest.MonkeyPatch):
    import json

    def text(**config) -> str:
        return json.dumps(config, separators=(",", separator))

    grid = [text(lr=lr, betas=[0.9, 0.999], width=width, early_stopping=None, seed=seed, name=f"n{width}")
            for seed in (0, 1, 2) for lr in (0.1, 1) for width in (4, 16)]
    shapes = {
        "a grid": grid,
        "configurations with different keys": [*grid, text(lr=0.1, seed=7), text(lr=0.1, seed=8, dropout=0.5)],
        "a seed at the end, and negative": [text(lr=0.1, seed=-3), text(lr=0.1, seed=4)],
        "a nested seed beside the top-level one": [text(lr=0.1, seed=1, start={"seed": 5}), text(lr=0.1, seed=2)],
        "a nested seed only": [text(lr=0.1, start={"seed": 5}), text(lr=0.2, start={"seed": 5})],
        "a float seed": [text(lr=0.1, seed=1.0), text(lr=0.1, seed=2)],
        "no seed": [text(lr=0.1), text(lr=0.2)],
        "a config missing": [text(lr=0.1, seed=0), None],
        "a seed in a string": [text(lr=0.1, seed=1, name='x"seed": 9, y'), text(lr=0.1, seed=2, name="z")],
        "nothing": [],
    }
    for shape, texts in shapes.items():
        found = pd.DataFrame(json_columns.configuration_columns(texts))
        pd.testing.assert_frame_equal(found, _configs_as_decoded_one_by_one(texts), obj=shape)
    # The grid's twelve configs are decoded as four configurations, each seed read from its own text.
    decoded = []
    monkeypatch.setattr(json_columns, "decode_json", lambda text: decoded.append(text) or json.loads(text))
    assert pd.DataFrame(json_columns.configuration_columns(grid))["seed"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert decoded == grid[:4]


def test_dict_columns_are_each_keys_values_in_order_of_appearance():
    """services.json_columns.dict_columns against the plain rule it stands for: a column per key in order
    of first appearance, each dict's value or NaN, whatever order each dict holds its keys in."""
    def reference(dicts):
        keys = list(dict.fromkeys(key for values in dicts for key in values))
        return {key: [values.get(key, math.nan) for values in dicts] for key in keys}

    shapes = {
        "same keys, same order": [{"a": 1, "b": 2.5, "c": "x"}, {"a": 3, "b": None, "c": "y"}],
        "same keys, another order": [{"a": 1, "b": 2}, {"b": 4, "a": 3}, {"a": 5, "b": 6}],
        "a key missing": [{"a": 1, "b": 2}, {"a": 3}, {"b": 6, "a": 5}],
        "as many keys, another one": [{"a": 1, "b": 2}, {"a": 3, "c": 4}],
        "one key": [{"a": 1}, {"a": 2}],
        "empty": [{}, {}],
        "none": [],
        "lists kept": [{"betas": [0.9, 0.99], "n": 1}, {"betas": [0.5, 0.9], "n": 2}],
    }
    for shape, dicts in shapes.items():
        found = json_columns.dict_columns(dicts)
        assert list(found) == list(reference(dicts)), shape
        assert found == reference(dicts), shape  # math.nan is one object: equal to itself in a list
