"""The trials table's columns as the pages use them: which are a trial's fields, its parameters
(and which of them vary), its metrics; and the table with list and dict parameter values as text
so that any parameter can be a group, a colour or an axis. Pure functions over the frame
dashboard.data.trials returns."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from services.selection import SEED_PARAMETERS, configuration_parameters
from services.trial_config import TRIAL_PARAMETERS

# Columns of services.queries.trial_rows that describe the run rather than a parameter or a metric.
TRIAL_FIELDS = ("trial_id", "ordinal", "status", "attempts", "worker", "epochs_done", "best_epoch",
                "started_at", "finished_at", "error")


def parameter_columns(trial_table: pd.DataFrame) -> list[str]:
    """The trial-config parameters present in a trials table, in TrialConfig's order."""
    return [name for name in TRIAL_PARAMETERS if name in trial_table.columns]


def varying_parameters(trial_table: pd.DataFrame) -> list[str]:
    """The parameters that take more than one value across the experiment's trials."""
    return configuration_parameters(trial_table, parameter_columns(trial_table)) + \
        [name for name in SEED_PARAMETERS if name in trial_table and trial_table[name].nunique() > 1]


# Recorded with the final metrics but describing how a trial ran, not what it learned: no chart,
# picker or seed aggregate offers it (the trial page shows it).
NOT_METRICS = ("trained_with",)


def metric_columns(trial_table: pd.DataFrame) -> list[str]:
    """The final-metric columns of a trials table (whatever the engine reported)."""
    known = set(TRIAL_FIELDS) | set(TRIAL_PARAMETERS) | set(NOT_METRICS)
    return [name for name in trial_table.columns if name not in known]


def any_number(column: pd.Series) -> bool:
    """Whether the column holds a number: a numeric column's non-missing values all are (parsing
    each of 10,000 values as a number is for text columns only)."""
    if pd.api.types.is_numeric_dtype(column):  # booleans included, as to_numeric keeps them
        return bool(column.notna().any())
    return bool(pd.to_numeric(_distinct_values(column), errors="coerce").notna().any())


def all_numbers(column: pd.Series) -> bool:
    """Whether the column has a value and every value it has is a number (or text that reads as one):
    it can go on a numeric axis."""
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        return bool(column.notna().any())
    values = _distinct_values(column)
    return pd.to_numeric(values, errors="coerce").notna().sum() == values.notna().sum() > 0


def _distinct_values(column: pd.Series) -> pd.Series:
    """Each distinct value once (a verdict or optimizer column holds a handful among 10,000 runs), so
    that parsing them as numbers reads a few, not all; the column itself when its values are unhashable."""
    try:
        return pd.Series(column.unique(), dtype=column.dtype)
    except TypeError:  # lists or dicts
        return column


def groupable(trial_table: pd.DataFrame) -> pd.DataFrame:
    """The trials table with list and dict parameter values (betas, milestones, a CSV data set,
    early_stopping) as text, so that every parameter can be a group, a colour or an axis."""
    nested = [name for name in parameter_columns(trial_table) if _holds_nested(trial_table[name])]
    return trial_table.assign(**{name: _as_texts(trial_table[name]) for name in nested})


def _holds_nested(column: pd.Series) -> bool:
    """Whether any value is a list or a dict. A grid leaves most object columns all missing (start,
    grad_clip, folds, ...), which pandas' C type inference says at once; the others stop at the first
    list found."""
    if column.dtype != object or pd.api.types.infer_dtype(column, skipna=True) == "empty":
        return False
    return any(isinstance(value, list | dict) for value in column.tolist())


def _as_text(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value


def _as_texts(column: pd.Series) -> list[Any]:
    """:func:`_as_text` of every value, each distinct value written once (10,000 trials share a few)."""
    written: dict[str, Any] = {}  # by repr: equal reprs of JSON values, equal JSON text
    # By identity first: the trials of one configuration share its list and dict values
    # (services.json_columns decodes each configuration once), so most are not written out even as a repr.
    # The values stay alive in ``values`` meanwhile, so an id is never reused for another.
    seen: dict[int, Any] = {}
    texts = []
    values = column.tolist()
    for value in values:
        if not isinstance(value, list | dict):
            texts.append(value)
            continue
        text = seen.get(id(value))
        if text is None:
            key = repr(value)
            if key not in written:
                written[key] = _as_text(value)
            text = seen[id(value)] = written[key]
        texts.append(text)
    return texts
