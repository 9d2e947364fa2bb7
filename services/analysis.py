"""Fit diagnosis: one verdict per trial, from its learning curves, with the numbers that decided it.

Every loss is measured in units of the data set's *baseline*: the loss of the best constant
predictor (the class frequencies for classification, the mean target for regression). A ratio of 1
means "learned nothing", 0 means "perfect". This makes one set of thresholds mean the same thing
for cross-entropy on moons and MSE on a sine. When the engine did not report a baseline, the
first epoch's train loss stands in for it (``numbers["baseline_source"]`` says which).

The rule, checked in this order (first match wins):

1. No verdict (None) for a trial that failed or was cancelled, or that was a learning-rate range
   test (its rate rises until the loss blows up: that is what it measures, not how it fits).
2. ``diverged``: the trial ended as diverged, a recorded loss is not finite, or the final train
   loss is above ``DIVERGED_RATIO`` x the baseline.
3. ``underfit``: the best train loss is above ``UNDERFIT_RATIO`` x the baseline, or (given the
   best train loss among the experiment's trials on the same data, ``reference_train_loss``) it is
   more than ``REFERENCE_MARGIN`` x the baseline above that reference. Exception: when the train
   loss is still falling steeply (see 5) the verdict is ``not_converged`` instead: more epochs, not
   more capacity, is the first thing to try.
4. ``overfit``: the final generalization gap (val - train) is above ``OVERFIT_GAP`` x the
   baseline, or validation loss rose from its minimum to the last epoch by more than
   ``OVERFIT_RISE`` x the baseline while the train loss kept falling.
5. ``not_converged``: over the last ``TAIL_FRACTION`` of the epochs the train loss fell by more
   than ``NOT_CONVERGED_DROP`` x the baseline.
6. ``good_fit`` otherwise.

Below the verdict: the statistics the dashboard's comparison charts show (seed bands, epochs to a
target loss, divergence rates, a mean difference with its confidence interval).

Pure functions: no torch, no database.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

UNDERFIT_RATIO = 0.30  # best train loss / baseline above this: the model did not fit the training data
REFERENCE_MARGIN = 0.20  # (best train - best sibling train) / baseline above this: far behind its siblings
OVERFIT_GAP = 0.25  # (final val - final train) / baseline above this: memorised, does not generalise
OVERFIT_RISE = 0.10  # (final val - min val) / baseline above this, with train still falling: overfitting
NOT_CONVERGED_DROP = 0.05  # train-loss fall over the tail / baseline above this: still learning
TAIL_FRACTION = 0.2  # the share of the last epochs that "still falling" looks at (at least 2 epochs)
DIVERGED_RATIO = 3.0  # final train loss / baseline above this: blew up without becoming inf

THRESHOLDS = {
    "underfit_ratio_limit": UNDERFIT_RATIO,
    "reference_margin_limit": REFERENCE_MARGIN,
    "overfit_gap_limit": OVERFIT_GAP,
    "overfit_rise_limit": OVERFIT_RISE,
    "not_converged_drop_limit": NOT_CONVERGED_DROP,
    "tail_fraction": TAIL_FRACTION,
    "diverged_ratio_limit": DIVERGED_RATIO,
}
VERDICTS = ("underfit", "overfit", "good_fit", "diverged", "not_converged")

# The trial parameters that decide which data a trial sees: siblings equal on all of them share a
# data set, so their train losses are comparable.
DATA_PARAMETERS = ("dataset", "n_train", "n_val", "n_test", "val_fraction", "test_fraction", "noise",
                   "label_noise", "n_classes", "n_features", "true_degree", "data_seed", "folds", "fold")


@dataclass(frozen=True)
class Diagnosis:
    """A trial's verdict (None when it failed or was cancelled), why in words, and the numbers."""

    verdict: str | None
    reasons: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)  # flat, JSON-able; thresholds end in _limit

    def as_json(self) -> dict[str, Any]:
        """What trials.diagnosis stores."""
        return {"reasons": list(self.reasons), "numbers": dict(self.numbers)}

    @property
    def measured(self) -> dict[str, Any]:
        """The numbers without the thresholds (what a table of trials shows)."""
        return {k: v for k, v in self.numbers.items() if not k.endswith("_limit") and k != "tail_fraction"}


def diagnose(
    epochs: list[dict],
    final_metrics: dict,
    *,
    status: str,
    reference_train_loss: float | None = None,
    range_test: bool = False,
) -> Diagnosis:
    """The verdict of one trial from its per-epoch rows (in epoch order; each with train_loss and
    val_loss) and its final metrics (baseline_train_loss / baseline_val_loss when known).
    ``range_test``: the trial was a learning-rate range test, which gets no verdict."""
    numbers: dict[str, Any] = {**THRESHOLDS, "epochs": len(epochs)}
    if status in ("failed", "cancelled"):
        return Diagnosis(None, [f"no verdict: the trial {status} after {len(epochs)} epochs"], numbers)
    if "final_x" in final_metrics and status != "diverged":  # a 2-D test function: a point, no data to fit
        return Diagnosis(None, ["no verdict: a 2-D test function has no data to fit; see where its point ended"],
                         numbers)

    train = [_number(row.get("train_loss")) for row in epochs]
    val = [_number(row.get("val_loss")) for row in epochs]
    if epochs and all(map(_finite, train + val)):
        # What says that a run once blew up (:func:`unstable`), kept so that a chart of 10,000 runs
        # need not read their million epoch rows again for it.
        numbers.update(max_train_loss=max(train), max_val_loss=max(val))
    if range_test:  # its rate rises until the loss blows up: "diverged" or "underfit" would say nothing of its fit
        return Diagnosis(None, ["no verdict: a learning-rate range test raises the rate until the loss blows up, "
                                "by design; its reading is the rate it suggests (the Trial page and the "
                                "Optimizers page)"], numbers)
    if status == "diverged" or not epochs or not all(map(_finite, train + val)):
        bad = next((i for i, (t, v) in enumerate(zip(train, val, strict=True))
                    if not (_finite(t) and _finite(v))), None)
        # The engine stops at the first non-finite epoch without recording it: that is the next one.
        numbers["first_bad_epoch"] = _epoch_of(epochs, bad) if bad is not None else len(epochs) + 1
        return Diagnosis("diverged", [f"diverged: the loss stopped being a finite number at epoch "
                                      f"{numbers['first_bad_epoch']}"], numbers)

    baseline_train, baseline_val, source = _baselines(final_metrics, train)
    numbers.update(baseline_train_loss=baseline_train, baseline_val_loss=baseline_val, baseline_source=source)
    best_train = min(train)
    best_val_index = min(range(len(val)), key=val.__getitem__)  # the first epoch with the lowest val loss
    # The tail is the last ceil(TAIL_FRACTION * n) epochs (at least 2, at most n - 1); its fall is
    # measured from the epoch just before it to the last one.
    tail_epochs = min(len(train) - 1, max(2, math.ceil(TAIL_FRACTION * len(train))))
    numbers.update(
        best_train_loss=best_train,
        final_train_loss=train[-1],
        final_val_loss=val[-1],
        min_val_loss=val[best_val_index],
        min_val_epoch=_epoch_of(epochs, best_val_index),
        train_ratio=best_train / baseline_train,
        final_train_ratio=train[-1] / baseline_train,
        generalization_gap=val[-1] - train[-1],
        gap_ratio=(val[-1] - train[-1]) / baseline_val,
        val_rise=val[-1] - val[best_val_index],
        val_rise_ratio=(val[-1] - val[best_val_index]) / baseline_val,
        train_fell_after_min_val=train[-1] < train[best_val_index],
        tail_epochs=tail_epochs,
        tail_drop_ratio=(train[-1 - tail_epochs] - train[-1]) / baseline_train if tail_epochs > 0 else 0.0,
    )
    if reference_train_loss is not None and _finite(reference_train_loss):
        numbers["reference_train_loss"] = reference_train_loss
        numbers["reference_excess"] = (best_train - reference_train_loss) / baseline_train
    return Diagnosis(*_decide(numbers), numbers)


def diagnose_experiment(trials: list[dict]) -> dict[int, Diagnosis]:
    """Re-diagnose an experiment's trials against each other. Each trial is a dict with trial_id,
    status, epochs (rows in order), final_metrics and config. Trials whose config agrees on every
    DATA_PARAMETERS entry share a reference: the lowest best-train loss among those of them that,
    judged alone, are good_fit, underfit or not_converged. Overfit siblings are left out: a loss
    reached by memorising the noise is no yardstick for how well the data can be fitted."""
    references: dict[tuple, float] = {}
    for trial in trials:
        epochs = trial.get("epochs") or []
        alone = diagnose(epochs, trial.get("final_metrics") or {}, status=trial.get("status", "succeeded"))
        best = _best_train(epochs)
        if alone.verdict in ("good_fit", "underfit", "not_converged") and best is not None:
            key = _data_key(trial.get("config") or {})
            references[key] = min(best, references.get(key, math.inf))
    return {
        trial["trial_id"]: diagnose(
            trial.get("epochs") or [], trial.get("final_metrics") or {}, status=trial.get("status", "succeeded"),
            reference_train_loss=references.get(_data_key(trial.get("config") or {})),
        )
        for trial in trials
    }


def rejudge_among_siblings(trials: list[dict]) -> dict[int, Diagnosis]:
    """What :func:`diagnose_experiment` returns, from the diagnoses stored when the trials ended
    instead of their curves: each trial is a dict with trial_id, config, verdict and ``numbers`` (the
    stored ``diagnosis["numbers"]``). The stored numbers hold everything the rule reads, so only the
    sibling reference is new; an experiment of 1,000 trials is re-judged without reading its 100,000
    epoch rows. Trials without a verdict or without numbers (failed, cancelled) keep what they have."""
    references: dict[tuple, float] = {}
    keys = [_data_key(trial.get("config") or {}) for trial in trials]
    for trial, key in zip(trials, keys, strict=True):
        best = _number((trial.get("numbers") or {}).get("best_train_loss"))
        if trial.get("verdict") in ("good_fit", "underfit", "not_converged") and _finite(best):
            references[key] = min(best, references.get(key, math.inf))
    judged = {}
    for trial, key in zip(trials, keys, strict=True):
        numbers = dict(trial.get("numbers") or {})
        reference = references.get(key)
        if trial.get("verdict") in (None, "diverged") or "train_ratio" not in numbers or reference is None:
            judged[trial["trial_id"]] = Diagnosis(trial.get("verdict"), list(trial.get("reasons") or []), numbers)
            continue
        numbers["reference_train_loss"] = reference
        numbers["reference_excess"] = (numbers["best_train_loss"] - reference) / numbers["baseline_train_loss"]
        judged[trial["trial_id"]] = Diagnosis(*_decide(numbers), numbers)
    return judged


def _decide(n: dict[str, Any]) -> tuple[str, list[str]]:
    still_falling = n["tail_drop_ratio"] > NOT_CONVERGED_DROP
    # Written only for a verdict that says it (a page re-judges thousands of trials; few are not converged).
    falling = (f"over the last {n['tail_epochs']} epochs the train loss fell by {n['tail_drop_ratio']:.3f} "
               f"x baseline (> {NOT_CONVERGED_DROP})") if still_falling else ""
    if n["final_train_ratio"] > DIVERGED_RATIO:
        return "diverged", [f"diverged: the final train loss {n['final_train_loss']:.4g} is "
                            f"{n['final_train_ratio']:.2f} x the baseline (> {DIVERGED_RATIO})"]

    underfit = []
    if n["train_ratio"] > UNDERFIT_RATIO:
        underfit.append(f"the best train loss {n['best_train_loss']:.4g} is {n['train_ratio']:.3f} x the "
                        f"baseline {n['baseline_train_loss']:.4g} (> {UNDERFIT_RATIO})")
    if n.get("reference_excess", -math.inf) > REFERENCE_MARGIN:
        underfit.append(f"the best train loss is {n['reference_excess']:.3f} x baseline above the best "
                        f"sibling's {n['reference_train_loss']:.4g} (> {REFERENCE_MARGIN})")
    if underfit and still_falling:
        return "not_converged", [f"not converged: {falling}", *underfit]
    if underfit:
        return "underfit", [f"underfit: {reason}" for reason in underfit]

    overfit = []
    if n["gap_ratio"] > OVERFIT_GAP:
        overfit.append(f"the final gap val - train = {n['generalization_gap']:.4g} is {n['gap_ratio']:.3f} x the "
                       f"baseline (> {OVERFIT_GAP})")
    if n["val_rise_ratio"] > OVERFIT_RISE and n["train_fell_after_min_val"]:
        overfit.append(f"validation loss rose from {n['min_val_loss']:.4g} at epoch {n['min_val_epoch']} to "
                       f"{n['final_val_loss']:.4g}, {n['val_rise_ratio']:.3f} x baseline (> {OVERFIT_RISE}), "
                       "while the train loss kept falling")
    if overfit:
        return "overfit", [f"overfit: {reason}" for reason in overfit]
    if still_falling:
        return "not_converged", [f"not converged: {falling}"]
    return "good_fit", [
        f"good fit: best train loss {n['train_ratio']:.3f} x baseline (<= {UNDERFIT_RATIO}), final gap "
        f"{n['gap_ratio']:.3f} x baseline (<= {OVERFIT_GAP}), validation rise {n['val_rise_ratio']:.3f} x "
        f"baseline, train-loss fall over the tail {n['tail_drop_ratio']:.3f} x baseline (<= {NOT_CONVERGED_DROP})"
    ]


# --- statistics over trials: what the dashboard's comparison charts show --------------------------
# These take pandas DataFrames (imported inside them: the worker and the CLI import this module and
# never need pandas) and return small ones, so a chart ships aggregates rather than every trial.

BANDS = {"std": "mean ± 1 std", "minmax": "mean, band from min to max"}


def seed_bands(frame: pd.DataFrame, *, by: list[str], value: str, band: str = "std") -> pd.DataFrame:
    """The mean of ``value`` for each distinct combination of the ``by`` columns, with a band around
    it: ``std`` is mean ± one sample standard deviation (0 for a single run), ``minmax`` the smallest
    and largest run. Returns the ``by`` columns and ``mean``, ``lower``, ``upper``, ``n`` (runs in the
    group). Rows with no value (a trial that has not reached that epoch, a failed trial) are left out."""
    import pandas as pd

    if band not in BANDS:
        raise ValueError(f"band must be one of {', '.join(BANDS)}, not {band!r}")
    rows = frame.loc[frame[value].notna(), [*by, value]]
    columns = [*by, "mean", "lower", "upper", "n"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    grouped = rows.astype({value: float}).groupby(by, sort=False, dropna=False)[value]
    stats = grouped.agg(["mean", "std", "min", "max", "count"]).reset_index()
    if band == "std":
        spread = stats["std"].fillna(0.0)
        stats["lower"], stats["upper"] = stats["mean"] - spread, stats["mean"] + spread
    else:
        stats["lower"], stats["upper"] = stats["min"], stats["max"]
    return stats.rename(columns={"count": "n"})[columns]


def epochs_to_target(curves: pd.DataFrame, *, target: float, column: str = "val_loss") -> pd.Series:
    """For each trial in ``curves`` (rows with trial_id, epoch and ``column``), the first epoch at which
    ``column`` is at or below ``target``; NaN for a trial that never got there. Indexed by trial_id."""
    trial_ids = curves["trial_id"].drop_duplicates()
    reached = curves[curves[column] <= target]
    return reached.groupby("trial_id")["epoch"].min().reindex(trial_ids).astype(float).rename("epochs_to_target")


def divergence_rate(trials: pd.DataFrame, *, by: list[str]) -> pd.DataFrame:
    """The share of trained trials that diverged, per combination of the ``by`` columns: the ``by``
    columns and ``trials``, ``diverged``, ``rate`` (0..1), and ``unstable``, ``unstable_rate``: the
    runs that did not diverge but whose loss once rose above UNSTABLE_RATIO x their baseline (a
    boolean ``unstable`` column of ``trials``; none when it is absent). Trained means succeeded or
    diverged; a failed, cancelled or unfinished trial says nothing about the optimizer and is not
    counted. A trial counts as diverged when the engine said so or its verdict is ``diverged`` (a
    loss that blew up without becoming infinite)."""
    import pandas as pd

    # The columns counted here only: filtering and copying all of a trials table's 90 took most of the time.
    used = list(dict.fromkeys([*by, *(name for name in ("status", "verdict", "unstable") if name in trials)]))
    trained = trials.loc[trials["status"].isin(["succeeded", "diverged"]), used]
    columns = [*by, "trials", "diverged", "rate", "unstable", "unstable_rate"]
    if trained.empty:
        return pd.DataFrame(columns=columns)
    verdict = trained["verdict"] if "verdict" in trained else pd.Series(None, index=trained.index)
    diverged = (trained["status"] == "diverged") | (verdict == "diverged")
    shaky = trained["unstable"].fillna(False).astype(bool) if "unstable" in trained else False
    flagged = trained.assign(_diverged=diverged, _unstable=shaky & ~diverged)
    counts = flagged.groupby(by, sort=False, dropna=False).agg(
        trials=("_diverged", "size"), diverged=("_diverged", "sum"), unstable=("_unstable", "sum")).reset_index()
    counts[["diverged", "unstable"]] = counts[["diverged", "unstable"]].astype(int)
    counts["rate"] = counts["diverged"] / counts["trials"]
    counts["unstable_rate"] = counts["unstable"] / counts["trials"]
    return counts[columns]


@dataclass(frozen=True)
class MeanDifference:
    """Mean of A minus mean of B with a 95% confidence interval (Student's t). ``low``/``high`` are
    None when there are too few runs for an interval (``reason`` says why)."""

    mean_a: float
    mean_b: float
    difference: float
    low: float | None
    high: float | None
    n_a: int
    n_b: int
    paired: bool
    degrees_of_freedom: float | None
    reason: str | None = None


def t_quantile_975(degrees_of_freedom: float) -> float:
    """The 97.5% quantile of Student's t (the half-width factor of a two-sided 95% interval), for any
    degrees of freedom above 0, fractional ones (Welch's) included: scipy.stats.t."""
    from scipy import stats

    if not degrees_of_freedom > 0:
        raise ValueError("a t quantile needs more than 0 degrees of freedom")
    return float(stats.t.ppf(0.975, degrees_of_freedom))


def mean_difference(a: Iterable[float], b: Iterable[float], *, paired: bool) -> MeanDifference:
    """mean(a) - mean(b) with a 95% confidence interval. ``paired``: a[i] and b[i] are runs with the
    same seed (so the same data order and initial-weight draw): the interval comes from the per-seed
    differences, which cancels the seed's own effect. Otherwise Welch's interval for two groups with
    unequal variances. Non-finite values are dropped (pairwise when paired)."""
    a, b = [_number(x) for x in a], [_number(x) for x in b]
    if paired:
        if len(a) != len(b):
            raise ValueError("paired runs need as many values in a as in b")
        pairs = [(x, y) for x, y in zip(a, b, strict=True) if _finite(x) and _finite(y)]
        a, b = [x for x, _ in pairs], [y for _, y in pairs]
    else:
        a, b = [x for x in a if _finite(x)], [y for y in b if _finite(y)]
    if not a or not b:
        return MeanDifference(math.nan, math.nan, math.nan, None, None, len(a), len(b), paired, None,
                              "no finished run on one side")
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    base = {"mean_a": mean_a, "mean_b": mean_b, "difference": mean_a - mean_b, "n_a": len(a), "n_b": len(b),
            "paired": paired}
    if paired:
        if len(a) < 2:
            return MeanDifference(**base, low=None, high=None, degrees_of_freedom=None,
                                  reason="an interval needs at least two seeds")
        differences = [x - y for x, y in zip(a, b, strict=True)]
        df = len(differences) - 1
        standard_error = math.sqrt(_variance(differences) / len(differences))
    else:
        if len(a) < 2 or len(b) < 2:
            return MeanDifference(**base, low=None, high=None, degrees_of_freedom=None,
                                  reason="an interval needs at least two runs on each side")
        share_a, share_b = _variance(a) / len(a), _variance(b) / len(b)
        standard_error = math.sqrt(share_a + share_b)
        # Welch-Satterthwaite; with both variances 0 the interval is a point, any df will do.
        df = ((share_a + share_b) ** 2 / (share_a ** 2 / (len(a) - 1) + share_b ** 2 / (len(b) - 1))
              if standard_error > 0 else len(a) + len(b) - 2)
    half_width = t_quantile_975(df) * standard_error
    return MeanDifference(**base, low=mean_a - mean_b - half_width, high=mean_a - mean_b + half_width,
                          degrees_of_freedom=df)


UNSTABLE_RATIO = 10.0  # a loss that ever rose above this x its baseline: the run is unstable


def unstable(max_loss: pd.Series, baseline: pd.Series) -> pd.Series:
    """True for the runs whose loss ever rose above UNSTABLE_RATIO x their baseline (a blow-up, even one
    the run recovered from). Both series are indexed alike; a missing baseline or maximum is False.
    The stored fit verdicts are not changed: this is a flag for charts."""
    ratio = max_loss.astype(float) / baseline.astype(float).where(baseline > 0)
    return (ratio > UNSTABLE_RATIO).fillna(False).astype(bool)


def bands_from_moments(moments: pd.DataFrame, *, band: str = "std") -> pd.DataFrame:
    """Mean lines and bands from per-group moments as a database computes them: ``n``, ``mean``,
    ``mean_square`` (the mean of the squared values), ``low`` and ``high`` (the smallest and largest
    value). Adds ``lower`` and ``upper``: mean ± the sample standard deviation (0 for one run) for
    ``std``, low to high for ``minmax``."""
    import numpy as np

    if band not in BANDS:
        raise ValueError(f"band must be one of {', '.join(BANDS)}, not {band!r}")
    frame = moments.copy()
    if band == "std":
        n = frame["n"].astype(float)
        variance = (frame["mean_square"] - frame["mean"] ** 2).clip(lower=0) * n / (n - 1).where(n > 1)
        spread = np.sqrt(variance.fillna(0.0))
        frame["lower"], frame["upper"] = frame["mean"] - spread, frame["mean"] + spread
    else:
        frame["lower"], frame["upper"] = frame["low"], frame["high"]
    return frame


def _variance(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def _baselines(final_metrics: dict, train: list[float]) -> tuple[float, float, str]:
    baseline_train = _number(final_metrics.get("baseline_train_loss"))
    baseline_val = _number(final_metrics.get("baseline_val_loss"))
    if _positive(baseline_train):
        return baseline_train, baseline_val if _positive(baseline_val) else baseline_train, "constant_predictor"
    # Unknown baseline: the loss after the first epoch is the scale (a weaker yardstick; it is said).
    first = train[0] if train[0] > 0 else max(max(train), 1e-12)
    return first, first, "first_epoch"


def _best_train(epochs: Iterable[dict]) -> float | None:
    losses = [loss for loss in (_number(row.get("train_loss")) for row in epochs) if _finite(loss)]
    return min(losses) if losses else None


def _data_key(config: dict) -> tuple:
    get = config.get
    return tuple(repr(get(name)) for name in DATA_PARAMETERS)


def _epoch_of(epochs: list[dict], index: int) -> int:
    return int(epochs[index].get("epoch", index + 1))


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


__all__ = ["BANDS", "DATA_PARAMETERS", "THRESHOLDS", "UNSTABLE_RATIO", "VERDICTS",
           "Diagnosis", "MeanDifference", "bands_from_moments", "diagnose",
           "diagnose_experiment", "divergence_rate", "epochs_to_target", "mean_difference",
           "rejudge_among_siblings", "seed_bands", "t_quantile_975", "unstable"]
