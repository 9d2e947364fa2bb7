"""Which configurations a comparison draws. A configuration is every parameter but the seed (and
the cross-validation fold): the runs of one configuration differ only by chance, so a band over them
is a band over seeds. Every other varying parameter that a chart does not show (on an axis, as the
colour or as facets) is handled explicitly: held at one value, set to its best value for each line,
or averaged (then a band spans configurations, and the chart must say so). Also how much of a
metric's spread each parameter explains, against seed noise. Pure functions over pandas frames
(imported inside them, like services.analysis)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

SEED_PARAMETERS = ("seed", "fold")
HANDLINGS = {"best": "best for each line", "held": "held at one value", "averaged": "averaged"}


@dataclass(frozen=True)
class Selection:
    """The trials a chart draws, and how each varying parameter it does not show was handled.

    ``trials``: the rows kept; ``handling``: parameter -> best, held or averaged; ``held``: parameter
    -> the value kept; ``best``: one row per line (the shown columns), with the best parameters'
    chosen values and ``metric_mean``, the mean metric over the line's runs at them."""

    trials: pd.DataFrame
    handling: dict[str, str]
    held: dict[str, Any]
    best: pd.DataFrame
    metric: str
    goal: str

    @property
    def averaged(self) -> list[str]:
        return [name for name, how in self.handling.items() if how == "averaged"]

    @property
    def spans_configurations(self) -> bool:
        """True when a band can hold runs of more than one configuration (a parameter was averaged)."""
        return bool(self.averaged)

    def best_values(self, line: str) -> dict[Any, str]:
        """For each value of the shown column ``line``, the best parameters it is drawn at, as text
        ("lr=0.1, schedule=step"), for a legend; empty when no parameter is handled as best or a line
        holds more than one best configuration (another shown column splits it)."""
        best = [name for name, how in self.handling.items() if how == "best"]
        if not best or line not in self.best or self.best[line].duplicated().any():
            return {}
        return {row[line]: ", ".join(f"{name}={_value_text(row[name])}" for name in best)
                for row in self.best.to_dict("records")}

    def describe(self) -> str:
        """One sentence saying how every parameter that the chart does not show was handled."""
        parts = []
        best = [name for name, how in self.handling.items() if how == "best"]
        if best:
            lowest = "lowest" if self.goal == "minimize" else "highest"
            parts.append(f"{_names(best)} at each line's best ({lowest} mean {self.metric} over seeds)")
        parts += [f"{name} held at {_value_text(value)}" for name, value in self.held.items()]
        if self.averaged:
            parts.append(f"{_names(self.averaged)} averaged: each band spans {_names(self.averaged)} as well as "
                         "seeds, so it is not seed noise")
        elif "fold" in self.trials and self.trials["fold"].nunique() > 1:
            parts.append("bands over seeds and cross-validation folds only (the cross-validated mean)")
        else:
            parts.append("bands over seeds only")
        text = "; ".join(parts)
        return text[:1].upper() + text[1:] + "."


def configuration_parameters(trials: pd.DataFrame, parameters: Iterable[str]) -> list[str]:
    """Those of ``parameters`` that take more than one value in ``trials`` and are not a seed or fold:
    the parameters that tell configurations apart."""
    return [name for name in parameters if name in trials and name not in SEED_PARAMETERS and _varies(trials[name])]


def _varies(column: pd.Series) -> bool:
    """More than one value, a missing one counting as a value: ``_distinct(column) > 1``, without
    hashing every value of a number or text column (a page asks this of 50 columns x 10,000 runs)."""
    import numpy as np

    numpy_dtype = isinstance(column.dtype, np.dtype)  # not pandas' nullable Int64, str, ...
    if numpy_dtype and column.dtype.kind in "iub":  # integers and booleans: never missing, compared in numpy
        values = column.to_numpy()
        return len(values) > 1 and bool((values != values[0]).any())
    if numpy_dtype and column.dtype.kind == "f":
        values = column.to_numpy()
        missing = np.isnan(values)
        if missing.any():
            return not missing.all()
        return len(values) > 1 and bool((values != values[0]).any())
    missing = column.isna()
    if missing.any():
        return not missing.all()
    if column.dtype != object:  # text (pandas' str), dates, categories: counted by pandas (pyarrow for text)
        return column.nunique(dropna=False) > 1
    values = column.tolist()  # lists (betas), dicts, mixed values: compared, not written out as text
    first = values[0] if values else None
    try:
        if not any(value != first for value in values):
            return False
    except (TypeError, ValueError):  # values that do not compare to a plain bool
        pass
    return _distinct(column) > 1  # a difference found (or none decidable): counted as before


def _distinct(column: pd.Series) -> int:
    try:
        return int(column.nunique(dropna=False))
    except TypeError:  # list or dict values: compare their text
        return int(column.astype(str).nunique(dropna=False))


def select_configurations(trials: pd.DataFrame, *, shown: list[str], parameters: Iterable[str], metric: str,
                          goal: str = "minimize", handling: dict[str, str] | None = None,
                          held: dict[str, Any] | None = None, codes: dict[str, tuple] | None = None) -> Selection:
    """The trials a chart draws when it shows the ``shown`` columns (axis, colour, facets).

    Every other varying parameter of ``parameters`` is handled as ``handling`` says (default
    ``best``): ``held`` keeps the trials at ``held[name]`` (default: the value of the best
    configuration overall); ``best`` keeps, for each combination of the shown columns, the values of
    the best parameters whose runs have the best mean ``metric`` (a run without a finite metric,
    e.g. a diverged one, counts as the worst); ``averaged`` keeps every value. Ties go to the first
    value in sorted order, so the choice is stable. ``codes``: :func:`text_codes` of ``trials``'
    columns by name, kept by a caller that selects from the same trials several times (filled here)."""
    handling = dict(handling or {})
    shown = list(dict.fromkeys(shown))
    others = [name for name in configuration_parameters(trials, parameters) if name not in shown]
    handling = {name: handling.get(name, "best") for name in others}
    unknown = {how for how in handling.values()} - set(HANDLINGS)
    if unknown:
        raise ValueError(f"handling must be one of {', '.join(HANDLINGS)}, not {', '.join(sorted(unknown))}")
    score = _scores(trials, metric, goal)
    kept = trials
    held_values: dict[str, Any] = {}
    for name in [n for n in others if handling[n] == "held"]:
        value = (held or {}).get(name)
        values = kept[name].astype(str)
        if value is None or str(value) not in set(values):
            value = _best_value(kept, score, name)
        held_values[name] = value
        kept = kept[kept[name].astype(str) == str(value)]
    best = [name for name in others if handling[name] == "best"]
    lines = [name for name in shown if name in kept]
    if not best or kept.empty:
        return Selection(kept, handling, held_values, kept.iloc[:0][lines + best], metric, goal)
    import numpy as np
    import pandas as pd

    # The configurations as integer codes (one per distinct text, in the texts' sorted order), not as
    # text columns: grouping 10,000 runs by strings took most of a page's selections. Same groups, same
    # order, same means (pandas' grouped mean), same winners as grouping by the texts.
    # Each column's codes once for both; once per page run when the caller keeps them (rows not held).
    known = codes if codes is not None and kept is trials else {}
    for name in lines + best:
        if name not in known:
            known[name] = text_codes(kept[name])
    codes = {name: known[name] for name in lines + best}
    line_id, group_id = group_ids(codes, lines), group_ids(codes, lines + best)
    means = pd.Series(score.loc[kept.index].to_numpy()).groupby(group_id, sort=True).mean()
    groups = means.index.to_numpy()
    group_line = pd.Series(line_id).groupby(group_id, sort=True).first().to_numpy()
    ranked = np.lexsort((groups, means.to_numpy(), group_line))  # by line, then score, then the texts' order
    first = np.ones(len(ranked), dtype=bool)
    first[1:] = group_line[ranked][1:] != group_line[ranked][:-1]
    winners = groups[ranked][first] if lines else groups[ranked][:1]
    kept = kept[np.isin(group_id, winners)]
    # The grouped columns alone, and a plain mean: the same frame as a named aggregation over every
    # column of the trials table, at a third of the cost.
    summary = (kept[lines + best].assign(_score=score.loc[kept.index]).groupby(lines + best, sort=True, dropna=False)
               ["_score"].mean().rename("metric_mean").reset_index())
    summary["metric_mean"] *= 1 if goal == "minimize" else -1
    return Selection(kept, handling, held_values, summary, metric, goal)


def group_ids(codes_of: dict[str, tuple], names: list[str]):
    """One integer per row for its combination of ``names``' values, numbered in the order of their
    codes (name by name). ``codes_of``: each name's (codes per row, how many distinct), e.g.
    :func:`text_codes` (the texts' sorted order, a missing value a text of its own)."""
    import numpy as np

    rows = len(next(iter(codes_of.values()))[0]) if codes_of else 0
    ids = np.zeros(rows, dtype=np.int64)
    for name in names:
        codes, size = codes_of[name]
        # Renumbered densely, in the same order, so that many names cannot overflow.
        ids = np.unique(ids * max(size, 1) + codes, return_inverse=True)[1].astype(np.int64)
    return ids


def text_codes(column: pd.Series):
    """(codes, number of codes): each value's rank among the column's distinct texts (str of the
    value, as astype(str) writes it). A missing value (grad_clip: null beside 1.0, no init_from) is
    one more value, "nan", so its runs are a configuration like any other and not dropped."""
    import numpy as np
    import pandas as pd

    try:
        codes, uniques = pd.factorize(column, use_na_sentinel=False)
    except TypeError:  # list or dict values
        return text_codes(column.astype(str))
    texts = [str(value) for value in uniques]
    rank = {text: i for i, text in enumerate(sorted(set(texts)))}
    # use_na_sentinel=False: a missing value gets a code like any other, never -1.
    return np.array([rank[text] for text in texts], dtype=np.int64)[codes], len(rank)


def _scores(trials: pd.DataFrame, metric: str, goal: str) -> pd.Series:
    """The metric as a score to minimise: the worst possible where it is missing or not finite."""
    import numpy as np
    import pandas as pd

    values = pd.to_numeric(trials[metric], errors="coerce") if metric in trials else pd.Series(np.nan, trials.index)
    values = values.astype(float) * (1 if goal == "minimize" else -1)
    return values.where(np.isfinite(values), np.inf)


def _best_value(trials: pd.DataFrame, score: pd.Series, name: str) -> Any:
    means = score.loc[trials.index].groupby(trials[name].astype(str), sort=True).mean()
    text = means.idxmin() if len(means) else None
    matches = trials[trials[name].astype(str) == text][name]
    return matches.iloc[0] if len(matches) else None


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _value_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def parameter_importance(trials: pd.DataFrame, *, parameters: Iterable[str], metric: str) -> pd.DataFrame:
    """How much of the spread of ``metric`` over the runs each varying parameter explains: a variance
    decomposition over the grid. For each parameter, the between-group sum of squares of its values'
    means over the total sum of squares (its main effect); ``seed noise``, the within-configuration
    sum of squares (runs that differ only by seed) over the total; ``interactions``, what is left.
    Returns ``parameter`` and ``share`` (0..1, summing to 1), largest main effect first, interactions
    and seed noise last. Runs without a finite metric are left out; empty when fewer than 2 are left."""
    import numpy as np
    import pandas as pd

    values = pd.to_numeric(trials[metric], errors="coerce") if metric in trials else pd.Series(dtype=float)
    runs = trials.loc[np.isfinite(values.astype(float))].assign(_value=values.astype(float))
    names = configuration_parameters(runs, parameters)
    total = float(((runs["_value"] - runs["_value"].mean()) ** 2).sum()) if len(runs) > 1 else 0.0
    if total <= 0:
        return pd.DataFrame(columns=["parameter", "share"])
    grand = runs["_value"].mean()
    shares = {}
    # Each parameter's values as the integer codes of their texts (the groups of astype(str), without
    # writing 10,000 values out as text twice per parameter).
    codes = {name: text_codes(runs[name])[0] for name in names}
    for name in names:
        groups = runs["_value"].groupby(codes[name]).agg(["mean", "size"])
        shares[name] = float((groups["size"] * (groups["mean"] - grand) ** 2).sum()) / total
    keys = [pd.Series(codes[name], index=runs.index) for name in names] or [pd.Series("all", index=runs.index)]
    within = runs["_value"] - runs.groupby(keys)["_value"].transform("mean")
    seed_noise = float((within ** 2).sum()) / total
    rows = sorted(shares.items(), key=lambda item: -item[1])
    rows += [("interactions", max(0.0, 1.0 - seed_noise - sum(shares.values()))), ("seed noise", seed_noise)]
    return pd.DataFrame(rows, columns=["parameter", "share"])
