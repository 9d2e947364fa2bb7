"""Fit verdicts judged among siblings, from a table of trials (one row each, as
services.queries.trial_rows returns them with ``reasons=True``) instead of a list of dicts.

The same rule as services.analysis.rejudge_among_siblings (which stays the reference, and the tests
hold the two equal): trials whose config agrees on every DATA_PARAMETERS entry share a reference,
the lowest best-train loss among those of them whose stored verdict is good_fit, underfit or
not_converged; a trial with a verdict other than diverged, stored numbers and a reference is decided
again with that reference. The references are one pandas group-by instead of a Python loop over
10,000 config dicts, and a trial the reference cannot move keeps its stored verdict and reasons
without being decided again (see :func:`rejudge_table`).
"""

from __future__ import annotations

import math

from services.analysis import DATA_PARAMETERS, REFERENCE_MARGIN, _decide
from services.models import TERMINAL_STATUSES
from services.selection import group_ids

# What services.analysis._decide reads, as columns of the trials table (diag_<name>).
DECIDED_ON = ("tail_drop_ratio", "tail_epochs", "final_train_ratio", "final_train_loss", "train_ratio",
              "best_train_loss", "baseline_train_loss", "gap_ratio", "generalization_gap", "val_rise_ratio",
              "train_fell_after_min_val", "min_val_loss", "min_val_epoch", "final_val_loss")
NUMBERS = ("train_ratio", "gap_ratio", "val_rise_ratio", "tail_drop_ratio", "reference_excess")  # returned
ELIGIBLE = ("good_fit", "underfit", "not_converged")  # verdicts whose best train loss can be a reference


def rejudge_table(trials):
    """trial_id, sibling_verdict, reasons (one line) and NUMBERS for every ended trial of ``trials``
    (a DataFrame with trial_id, status, verdict, the config columns, ``diag_<name>`` numbers and
    ``diag_reasons``), judged among its siblings on the same data.

    A trial is decided again only where the sibling reference can change the outcome: where its
    reference excess is above REFERENCE_MARGIN, or its stored numbers held a reference already.
    Everywhere else _decide would read the stored numbers with a reference clause that does not
    fire, which is how the stored verdict and reasons were made, so they are kept as they are."""
    import pandas as pd

    ended = trials[trials["status"].isin(TERMINAL_STATUSES)].reset_index(drop=True)
    out = pd.DataFrame({"trial_id": ended["trial_id"].to_numpy(), "sibling_verdict": ended["verdict"].to_numpy()})
    reasons = ["; ".join(r) if isinstance(r, list) else "" for r in _column(ended, "diag_reasons")]
    for name in NUMBERS:
        out[name] = _column(ended, f"diag_{name}")
    if ended.empty or "diag_train_ratio" not in ended:
        return out.assign(reasons=reasons)[["trial_id", "sibling_verdict", "reasons", *NUMBERS]]

    best = pd.to_numeric(_column(ended, "diag_best_train_loss"), errors="coerce")
    key = _data_keys(ended)
    eligible = ended["verdict"].isin(ELIGIBLE).to_numpy() & best.map(math.isfinite).to_numpy()
    reference = key.map(best[eligible].groupby(key[eligible]).min()).to_numpy(dtype=float)
    baseline = pd.to_numeric(_column(ended, "diag_baseline_train_loss"), errors="coerce").to_numpy(dtype=float)
    excess = (best.to_numpy(dtype=float) - reference) / baseline
    judged = ((ended["verdict"].notna() & (ended["verdict"] != "diverged") & ended["diag_train_ratio"].notna())
              .to_numpy() & ~pd.isna(reference))
    out.loc[judged, "reference_excess"] = excess[judged]
    had_reference = _column(ended, "diag_reference_excess").notna().to_numpy()
    again = judged & ((excess > REFERENCE_MARGIN) | had_reference)
    if again.any():
        # One list per column, the integers and the flag set column by column, and a dict per row from
        # them: DataFrame.to_dict("records") boxed the same Python values at several times the cost, and
        # fixing each row's dict after it was made took as long as deciding it.
        columns = {name: ended[f"diag_{name}"].to_numpy(dtype=object)[again].tolist()
                   for name in DECIDED_ON if f"diag_{name}" in ended}
        for name in ("tail_epochs", "min_val_epoch"):  # integers, in the sentences
            if name in columns:
                columns[name] = [int(value) if isinstance(value, float) and math.isfinite(value) else value
                                 for value in columns[name]]
        flags = columns.get("train_fell_after_min_val", [None] * int(again.sum()))
        columns["train_fell_after_min_val"] = [bool(flag) for flag in flags]
        columns["reference_train_loss"], columns["reference_excess"] = reference[again].tolist(), excess[again].tolist()
        names = list(columns)
        decided = [_decide(dict(zip(names, values, strict=True))) for values in zip(*columns.values(), strict=True)]
        out.loc[again, "sibling_verdict"] = [verdict for verdict, _ in decided]
        for position, (_, why) in zip(again.nonzero()[0], decided, strict=True):
            reasons[position] = "; ".join(why)
    return out.assign(reasons=reasons)[["trial_id", "sibling_verdict", "reasons", *NUMBERS]]


def _data_keys(trials):
    """One number per trial for the DATA_PARAMETERS values of its config (services.analysis._data_key):
    equal numbers, equal data."""
    import numpy as np
    import pandas as pd

    codes_of = {}
    for name in DATA_PARAMETERS:
        if name not in trials:
            continue
        column = trials[name]
        if column.dtype == object:  # mixed values: by repr, so 1 and 1.0, or None and nan, stay apart
            column = column.map(repr)
        # A typed column holds one kind of value (a number column's missing ones are all NaN): its
        # distinct values are its distinct reprs, without writing 10,000 of them out.
        codes, uniques = pd.factorize(column, use_na_sentinel=False)
        codes_of[name] = (codes, len(uniques))
    keys = group_ids(codes_of, list(codes_of)) if codes_of else np.zeros(len(trials), dtype=np.int64)
    return pd.Series(keys, index=trials.index)


def _column(trials, name: str):
    import pandas as pd

    return trials[name] if name in trials else pd.Series([None] * len(trials), index=trials.index, dtype=object)
