"""services.siblings' table form of the sibling rule, against services.analysis (the reference):
which trials share data, on the value mixes a trials table holds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from services.analysis import DATA_PARAMETERS, _data_key
from services.siblings import _data_keys


def _partition(keys) -> list[frozenset[int]]:
    """The groups of positions with equal keys, order-free."""
    groups: dict = {}
    for position, key in enumerate(keys):
        groups.setdefault(key, set()).add(position)
    return sorted((frozenset(group) for group in groups.values()), key=min)


def test_data_keys_group_trials_exactly_as_the_reference_data_key():
    # Number columns (n_train as int, noise as float with a missing value), a text column with a missing
    # value, and an object column mixing 1 and 1.0, None and nan: the reference tells those apart by repr.
    rng = np.random.default_rng(0)
    configs = []
    for i in range(400):
        config = {"dataset": ["moons", "circles", None][i % 3], "n_train": int(rng.choice([50, 400])),
                  "noise": [0.1, 0.2, None][int(rng.integers(3))]}
        configs.append(config)
    table = pd.DataFrame(configs)
    table.insert(0, "trial_id", range(1, len(table) + 1))
    # As a column mixing types stays (pandas would make a float column of these alone).
    table["n_val"] = pd.Series([[1, 1.0, None, math.nan, "1"][i % 5] for i in range(len(table))], dtype=object)
    assert table["n_val"].dtype == object and table["noise"].dtype == float  # the mixes a real table holds

    found = _data_keys(table)

    # The reference reads each config as the table holds it (a missing float is nan there too).
    reference = [_data_key({name: row[name] for name in DATA_PARAMETERS if name in table})
                 for row in table.to_dict("records")]
    assert _partition(found.tolist()) == _partition(reference)
    assert len(_partition(reference)) > 20  # the mixes make many groups, not one
    assert found.index.equals(table.index)


def test_data_keys_of_a_table_without_data_parameters_put_every_trial_together():
    table = pd.DataFrame({"trial_id": [1, 2, 3], "lr": [0.1, 0.2, 0.3]})

    assert _data_keys(table).nunique() == 1
