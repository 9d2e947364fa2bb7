"""dashboard.data.curve_bands against the way it was computed before (a frame per group from
pandas' groupby of the values' texts, a frame per split, merged with the groups' labels): the same
rows, values and column types, on groups of numbers, texts, missing values and none at all. The
database's moments are computed here with pandas from the same epoch rows (tests/dashboard/
test_queries.py checks them against the database)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dashboard import data
from services.analysis import bands_from_moments
from services.queries import MOMENTS


def epoch_rows(trial_ids: list[int], *, seed: int = 0) -> pd.DataFrame:
    """Each trial's epochs (some stop early, one field is never recorded for some trials)."""
    rng = np.random.default_rng(seed)
    rows = []
    for trial_id in trial_ids:
        for epoch in range(1, int(rng.integers(2, 7))):
            rows.append({"trial_id": trial_id, "epoch": epoch, "train_loss": float(rng.uniform(0, 2)),
                         "val_loss": float(rng.uniform(0, 2)),
                         "grad_norm": None if trial_id % 3 == 0 else float(rng.uniform(0, 5))})
    return pd.DataFrame(rows)


def moments_of(epochs: pd.DataFrame):
    """What data._moments returns (the database's GROUP BY), from the epoch rows with pandas."""
    def moments(url: str, groups: tuple[tuple[int, ...], ...], fields: tuple[str, ...]) -> pd.DataFrame:
        parts = []
        for index, ids in enumerate(groups):
            rows = epochs[epochs["trial_id"].isin(ids)]
            grouped = rows.groupby("epoch")
            part = pd.DataFrame({"group": index, "epoch": sorted(rows["epoch"].unique())})
            for name in fields:
                values = rows[name].astype(float)
                stats = {"n": grouped[name].count(), "mean": values.groupby(rows["epoch"]).mean(),
                         "mean_square": (values ** 2).groupby(rows["epoch"]).mean(),
                         "low": values.groupby(rows["epoch"]).min(), "high": values.groupby(rows["epoch"]).max()}
                for moment in MOMENTS:
                    part[f"{name}_{moment}"] = part["epoch"].map(stats[moment]).to_numpy()
            parts.append(part)
        columns = ["group", "epoch", *(f"{name}_{moment}" for name in fields for moment in MOMENTS)]
        found = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
        return found[columns].astype({"group": int, "epoch": int})
    return moments


def old_curve_bands(trials: pd.DataFrame, *, by: list[str], columns: dict[str, str], band: str = "std",
                    moments_read) -> pd.DataFrame:
    """data.curve_bands as it was (commit 33c0310)."""
    by = list(dict.fromkeys(by))
    trials = trials[list(dict.fromkeys([*by, "trial_id"]))]
    grouped = list(trials.groupby([trials[name].astype(str) for name in by], sort=True)) if by and len(trials) \
        else ([((), trials)] if len(trials) else [])
    keys = [rows.iloc[0][by].tolist() for _, rows in grouped]
    groups = tuple(tuple(int(i) for i in rows["trial_id"]) for _, rows in grouped)
    moments = moments_read("url", groups, tuple(dict.fromkeys(columns.values())))
    parts = []
    for split, field in columns.items():
        part = moments[["group", "epoch", *(f"{field}_{m}" for m in MOMENTS)]].rename(
            columns={f"{field}_{m}": m for m in MOMENTS})
        part = part[part["n"] > 0]
        parts.append(bands_from_moments(part, band=band).assign(split=split))
    long = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["group", *data.BAND_COLUMNS])
    labels = pd.DataFrame(keys, columns=by).assign(group=range(len(keys))) if by else \
        pd.DataFrame({"group": range(len(keys))})
    return long.merge(labels, on="group")[[*by, *data.BAND_COLUMNS]].sort_values([*by, "split", "epoch"],
                                                                               ignore_index=True)


def trials_table(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame({
        "trial_id": np.arange(100, 100 + n),
        "width": rng.choice([4, 16, 64, 256], n),  # texts sort 16 < 256 < 4 < 64: values sort otherwise
        "lr": rng.choice([0.0003, 0.001, 0.1, 1.0], n),
        "optimizer": rng.choice(["sgd", "adam", "momentum"], n),
        "grad_clip": pd.Series(rng.choice([1.0, np.nan], n)),  # missing for some: those are in no group
        "schedule": pd.Series(rng.choice(["step", None], n), dtype=object),
        "mixed": pd.Series([[1, 1.0, True, "1", None][i] for i in rng.integers(0, 5, n)], dtype=object),
        "seed": rng.integers(0, 3, n),
    }).sample(frac=1.0, random_state=2).reset_index(drop=True)


CASES = [
    (["width"], {"train": "train_loss", "val": "val_loss"}),
    (["lr"], {"loss": "val_loss", "lr": "grad_norm"}),
    (["optimizer", "width"], {"value": "grad_norm"}),
    (["width", "optimizer", "width"], {"train": "train_loss"}),
    (["grad_clip"], {"train": "train_loss", "val": "val_loss"}),
    (["schedule", "lr"], {"val": "val_loss"}),
    (["mixed"], {"train": "train_loss"}),  # 1, 1.0 and True: three texts, three groups
    ([], {"train": "train_loss", "val": "val_loss"}),
]


@pytest.mark.parametrize("band", ["std", "minmax"])
@pytest.mark.parametrize(("by", "columns"), CASES)
def test_curve_bands_are_what_the_grouped_frames_gave(monkeypatch: pytest.MonkeyPatch, by, columns, band) -> None:
    trials = trials_table()
    read = moments_of(epoch_rows(trials["trial_id"].tolist()))
    monkeypatch.setattr(data, "_ready_url", lambda: "url")
    monkeypatch.setattr(data, "_moments", read)
    for rows in (trials, trials.iloc[:5], trials.iloc[:0]):
        found = data.curve_bands(rows, by=by, columns=columns, band=band)
        expected = old_curve_bands(rows, by=by, columns=columns, band=band, moments_read=read)
        assert list(found.columns) == list(expected.columns)
        typed = len(expected) > 0  # an empty frame's column types were pandas' guesses, never drawn
        pd.testing.assert_frame_equal(found, expected, check_dtype=typed, check_index_type=typed)


def test_a_trial_missing_a_grouped_value_is_in_no_group(monkeypatch: pytest.MonkeyPatch) -> None:
    trials = pd.DataFrame({"trial_id": [1, 2, 3], "grad_clip": [1.0, np.nan, 1.0]})
    seen = []
    monkeypatch.setattr(data, "_ready_url", lambda: "url")

    def read(url, groups, fields):
        seen.append(groups)
        return moments_of(epoch_rows([1, 2, 3]))(url, groups, fields)

    monkeypatch.setattr(data, "_moments", read)
    bands = data.curve_bands(trials, by=["grad_clip"], columns={"train": "train_loss"})
    assert seen == [((1, 3),)]
    assert set(bands["grad_clip"]) == {1.0}


def test_trials_all_missing_the_grouped_value_make_no_group() -> None:
    trials = pd.DataFrame({"trial_id": [1, 2], "grad_clip": [np.nan, np.nan]})

    assert data._trial_groups(trials, ["grad_clip"]) == ([], ())
    assert data._trial_groups(trials.iloc[:1].assign(grad_clip=0.5), ["grad_clip"]) == ([[0.5]], ((1,),))
