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


def test_groupable_writes_shared_and_equal_values_as_each_one_alone():
    """Rows that share one list object (a configuration decoded once), equal lists that are separate
    objects, and lists equal as values but not as text (1 and 1.0): each written as json.dumps writes it."""
    shared, other = [0.9, 0.999], {"patience": 3, "min_delta": 0.0}
    values = [shared, other, shared, [0.9, 0.999], [1, 2], [1.0, 2.0], other, None, shared]
    table = pd.DataFrame({"trial_id": range(len(values)), "betas": pd.Series(values, dtype=object)})

    found = trial_tables.groupable(table)["betas"].tolist()

    assert found[:7] + found[8:] == [json.dumps(value, sort_keys=True) for value in values if value is not None]
    assert pd.isna(found[7]) and found[4] == "[1, 2]" and found[5] == "[1.0, 2.0]"


def test_number_checks_read_each_distinct_value_as_the_whole_column_would():
    columns = {
        "floats": pd.Series([0.1, None, 0.3]), "ints": pd.Series([1, 2, 3]), "bools": pd.Series([True, False]),
        "text": pd.Series(["adam", "sgd", "adam"], dtype="str"),
        "numeric text": pd.Series(["0.1", "1e-3"], dtype="str"),
        "some numeric text": pd.Series(["0.1", "fast", None], dtype="str"),
        "missing": pd.Series([None, None], dtype=object),
        "mixed": pd.Series([1, "1", 2.5, None], dtype=object), "lists": pd.Series([[1], [2]], dtype=object),
        "empty": pd.Series([], dtype=float),
    }
    for name, column in columns.items():
        parsed = pd.to_numeric(column, errors="coerce")
        assert trial_tables.any_number(column) == bool(parsed.notna().any()), name
        assert trial_tables.all_numbers(column) == bool(parsed.notna().sum() == column.notna().sum() > 0), name
    assert [name for name, column in columns.items() if trial_tables.all_numbers(column)] == [
        "floats", "ints", "bools", "numeric text", "mixed"]
