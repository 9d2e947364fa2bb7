"""Unit tests of the shared widgets' pure parts, from small hand-made DataFrames."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dashboard import widgets
from services.selection import select_configurations


def test_two_charts_that_draw_the_same_columns_share_one_selection_of_the_same_trials():
    rng = np.random.default_rng(0)
    trials = pd.DataFrame({"trial_id": range(24), "optimizer": ["adam", "sgd"] * 12,
                           "lr": [0.1, 0.1, 0.01, 0.01] * 6, "seed": np.repeat(range(6), 4),
                           "final_val_loss": rng.uniform(size=24)})
    handling = widgets.Handling({"lr": "best"}, {}, "final_val_loss", "minimize")

    first = handling.select(trials, shown=["optimizer"])
    again = handling.select(trials, shown=["optimizer", None])
    other = handling.select(trials.copy(), shown=["optimizer"])

    direct = select_configurations(trials, shown=["optimizer"], parameters=["optimizer", "lr"],
                                   metric="final_val_loss")
    assert again is first and other is not first
    assert first.trials.equals(direct.trials) and other.trials.equals(direct.trials)
    assert handling.select(trials, shown=["optimizer", "lr"]).trials.equals(trials)  # nothing left to choose


def test_a_configuration_missing_a_value_has_a_label_that_sorts_with_the_others():
    # grad_clip: [null, 1.0]: pandas 3's astype(str) keeps None missing, so these runs had no label and
    # sorting the configurations (A against B) raised a TypeError.
    trials = pd.DataFrame({"optimizer": ["adam", "adam", "sgd", "sgd"], "lr": [0.1, float("nan"), 0.1, 0.1],
                           "grad_clip": pd.Series([None, 1.0, None, 1.0], dtype=object)})
    labels = widgets.configuration_labels(trials, ["optimizer", "grad_clip", "lr"])
    assert labels.tolist() == ["optimizer=adam, grad_clip=None, lr=0.1", "optimizer=adam, grad_clip=1.0, lr=nan",
                               "optimizer=sgd, grad_clip=None, lr=0.1", "optimizer=sgd, grad_clip=1.0, lr=0.1"]
    assert sorted(labels.unique())[0] == "optimizer=adam, grad_clip=1.0, lr=nan"
    full = pd.DataFrame({"optimizer": ["adam", "sgd"], "lr": [0.1, 1.0]})  # nothing missing: as astype(str) writes it
    assert widgets.configuration_labels(full, ["optimizer", "lr"]).tolist() == ["optimizer=adam, lr=0.1",
                                                                               "optimizer=sgd, lr=1.0"]
