"""dashboard.trial_tables.groupable: list and dict parameter values as text, whatever else the
column holds."""

from __future__ import annotations

import json
import math

import pandas as pd

from dashboard import trial_tables


def test_groupable_writes_exactly_the_columns_that_hold_a_list_or_a_dict():
    table = pd.DataFrame({
        "trial_id": [1, 2, 3],
        "betas": [[0.9, 0.999], [0.8, 0.99], [0.9, 0.999]],  # lists in every row
        "milestones": [None, [5, 10], None],  # a list after a missing value
        "early_stopping": [math.nan, None, {"patience": 3}],  # a dict after missing values
        "grad_clip": [None, None, None],  # all missing: left as it is
        "init_from": [None, 12, None],  # numbers and missing values: left as they are
        "activation": ["relu", "tanh", "relu"],  # text: left as it is
    })

    found = trial_tables.groupable(table)

    assert found["betas"].tolist() == ["[0.9, 0.999]", "[0.8, 0.99]", "[0.9, 0.999]"]
    assert found["milestones"].tolist()[1] == "[5, 10]" and found["milestones"].isna().tolist() == [True, False, True]
    assert found["early_stopping"].tolist()[2] == json.dumps({"patience": 3})
    for name in ("grad_clip", "init_from", "activation"):
        pd.testing.assert_series_equal(found[name], table[name])
    # The rule it stands for: a column is rewritten when any value is a list or a dict.
    rewritten = {name for name in table if not found[name].equals(table[name])}
    assert rewritten == {name for name in trial_tables.parameter_columns(table)
                         if table[name].map(lambda value: isinstance(value, list | dict)).any()}
    assert rewritten == {"betas", "milestones", "early_stopping"}
