"""The fit diagnosis on hand-made learning curves: each verdict, each threshold's boundary."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from services import analysis, selection
from services.analysis import diagnose, diagnose_experiment
from tests.servers import REPO

BASELINE = {"baseline_train_loss": 1.0, "baseline_val_loss": 1.0}  # losses below are fractions of it


def rows(train: list[float], val: list[float]) -> list[dict]:
    return [{"epoch": i + 1, "train_loss": t, "val_loss": v} for i, (t, v) in enumerate(zip(train, val, strict=True))]


def decaying(start: float, end: float, n: int = 50, rate: float = 0.15) -> list[float]:
    """A loss that falls quickly from start and flattens at end."""
    return [end + (start - end) * math.exp(-rate * i) for i in range(n)]


def test_a_range_test_gets_no_verdict_but_keeps_its_largest_losses() -> None:
    blown_up = rows([0.7, 0.6, 0.3, 52.0], [0.7, 0.62, 0.35, 60.0])  # the rate rose until the loss blew up

    assert diagnose(blown_up, BASELINE, status="succeeded").verdict == "diverged"
    result = diagnose(blown_up, BASELINE, status="succeeded", range_test=True)
    assert result.verdict is None and "range test" in result.reasons[0]
    assert (result.numbers["max_train_loss"], result.numbers["max_val_loss"]) == (52.0, 60.0)  # what "unstable" reads


def test_a_flat_high_curve_underfits_and_says_by_how_much() -> None:
    result = diagnose(rows(decaying(0.9, 0.6), decaying(0.95, 0.62)), BASELINE, status="succeeded")

    assert result.verdict == "underfit"
    assert result.numbers["train_ratio"] == pytest.approx(0.6, abs=1e-3)
    assert "0.600 x the baseline" in result.reasons[0] and str(analysis.UNDERFIT_RATIO) in result.reasons[0]


def test_train_falling_while_validation_is_u_shaped_overfits() -> None:
    train = decaying(0.8, 0.001, rate=0.2)
    val = [0.3 + 0.0004 * (i - 15) ** 2 for i in range(50)]  # minimum 0.3 at epoch 16, then up to 0.7624
    result = diagnose(rows(train, val), BASELINE, status="succeeded")

    assert result.verdict == "overfit"
    assert result.numbers["min_val_epoch"] == 16
    assert result.numbers["val_rise_ratio"] == pytest.approx(0.4624, abs=1e-4)
    assert any("rose from 0.3 at epoch 16" in reason for reason in result.reasons)


def test_both_falling_and_flattening_close_together_is_a_good_fit() -> None:
    result = diagnose(rows(decaying(0.7, 0.08), decaying(0.72, 0.11)), BASELINE, status="succeeded")

    assert result.verdict == "good_fit"
    assert result.numbers["gap_ratio"] == pytest.approx(0.03, abs=1e-3)
    assert result.reasons[0].startswith("good fit: best train loss 0.080 x baseline")


def test_a_loss_still_falling_steeply_has_not_converged() -> None:
    train = [0.35 - 0.006 * i for i in range(50)]  # straight down, from 0.35 to 0.056, no floor yet
    result = diagnose(rows(train, [t + 0.02 for t in train]), BASELINE, status="succeeded")

    assert result.verdict == "not_converged"
    assert result.numbers["tail_epochs"] == 10
    assert result.numbers["tail_drop_ratio"] == pytest.approx(0.06)  # 10 epochs of 0.006
    assert "over the last 10 epochs the train loss fell by 0.060 x baseline" in result.reasons[0]


def test_a_high_loss_still_falling_steeply_is_not_converged_rather_than_underfit() -> None:
    train = [0.9 - 0.01 * i for i in range(40)]  # 0.9 -> 0.51: poor, but still dropping fast
    result = diagnose(rows(train, [t + 0.01 for t in train]), BASELINE, status="succeeded")

    assert result.verdict == "not_converged"
    assert result.reasons[0].startswith("not converged: over the last 8 epochs")
    assert "0.510 x the baseline" in result.reasons[1]  # the underfit evidence is still reported


@pytest.mark.parametrize("bad", [math.nan, math.inf, None])
def test_a_non_finite_loss_diverges_and_names_the_epoch(bad) -> None:
    train = [1.0, 0.5, bad]
    result = diagnose(rows(train, [1.0, 0.6, 0.7]), BASELINE, status="succeeded")

    assert result.verdict == "diverged"
    assert result.numbers["first_bad_epoch"] == 3
    assert "epoch 3" in result.reasons[0]


def test_the_engine_saying_diverged_is_enough_even_with_finite_rows() -> None:
    result = diagnose(rows([1.0, 0.9], [1.0, 0.9]), BASELINE, status="diverged")
    assert result.verdict == "diverged" and "at epoch 3" in result.reasons[0]  # the unrecorded next epoch


def test_a_loss_that_blew_up_without_becoming_inf_diverged() -> None:
    result = diagnose(rows([1.0, 2.0, 3.5], [1.0, 2.0, 3.5]), BASELINE, status="succeeded")
    assert result.verdict == "diverged" and result.numbers["final_train_ratio"] == 3.5


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_failed_and_cancelled_trials_get_no_verdict(status: str) -> None:
    result = diagnose(rows([0.5], [0.5]), BASELINE, status=status)
    assert result.verdict is None and status in result.reasons[0]


# --- each threshold's boundary ----------------------------------------------------------------

FLAT = 40


def flat(level: float) -> list[float]:
    return [level] * FLAT


@pytest.mark.parametrize(("ratio", "verdict"), [(analysis.UNDERFIT_RATIO - 0.001, "good_fit"),
                                                 (analysis.UNDERFIT_RATIO + 0.001, "underfit")])
def test_underfit_ratio_boundary(ratio: float, verdict: str) -> None:
    assert diagnose(rows(flat(ratio), flat(ratio)), BASELINE, status="succeeded").verdict == verdict


@pytest.mark.parametrize(("excess", "verdict"), [(analysis.REFERENCE_MARGIN - 0.001, "good_fit"),
                                                  (analysis.REFERENCE_MARGIN + 0.001, "underfit")])
def test_reference_margin_boundary(excess: float, verdict: str) -> None:
    level = 0.25  # under UNDERFIT_RATIO on its own; the sibling decides
    result = diagnose(rows(flat(level), flat(level)), BASELINE, status="succeeded",
                      reference_train_loss=level - excess)
    assert result.verdict == verdict
    assert result.numbers["reference_excess"] == pytest.approx(excess)
    if verdict == "underfit":
        assert "best sibling" in result.reasons[0]


@pytest.mark.parametrize(("gap", "verdict"), [(analysis.OVERFIT_GAP - 0.001, "good_fit"),
                                               (analysis.OVERFIT_GAP + 0.001, "overfit")])
def test_overfit_gap_boundary(gap: float, verdict: str) -> None:
    result = diagnose(rows(flat(0.05), flat(0.05 + gap)), BASELINE, status="succeeded")
    assert result.verdict == verdict
    assert result.numbers["gap_ratio"] == pytest.approx(gap)


@pytest.mark.parametrize(("rise", "verdict"), [(analysis.OVERFIT_RISE - 0.001, "good_fit"),
                                                (analysis.OVERFIT_RISE + 0.001, "overfit")])
def test_overfit_rise_boundary(rise: float, verdict: str) -> None:
    # Train falls slowly (under the not-converged drop); val bottoms out at epoch 10 then climbs by `rise`.
    train = [0.10 - 0.0002 * i for i in range(FLAT)]
    val = [0.12] * 10 + [0.12 + rise * (i + 1) / (FLAT - 10) for i in range(FLAT - 10)]
    result = diagnose(rows(train, val), BASELINE, status="succeeded")
    assert result.verdict == verdict
    assert result.numbers["val_rise_ratio"] == pytest.approx(rise)


def test_a_validation_rise_while_train_also_rose_is_not_overfitting() -> None:
    train = [0.1] * 10 + [0.1 + 0.005 * i for i in range(10)]
    val = [0.12] * 10 + [0.12 + 0.02 * i for i in range(10)]
    result = diagnose(rows(train, val), BASELINE, status="succeeded")
    assert result.numbers["val_rise_ratio"] > analysis.OVERFIT_RISE
    assert result.numbers["train_fell_after_min_val"] is False
    assert result.verdict == "good_fit"


@pytest.mark.parametrize(("drop", "verdict"), [(analysis.NOT_CONVERGED_DROP - 0.001, "good_fit"),
                                                (analysis.NOT_CONVERGED_DROP + 0.001, "not_converged")])
def test_not_converged_drop_boundary(drop: float, verdict: str) -> None:
    # 50 epochs: the tail is the last 10 (20%); train is flat until epoch 40, then falls by `drop`.
    train = [0.2] * 40 + [0.2 - drop * (i + 1) / 10 for i in range(10)]
    result = diagnose(rows(train, [t + 0.01 for t in train]), BASELINE, status="succeeded")
    assert result.numbers["tail_epochs"] == 10
    assert result.numbers["tail_drop_ratio"] == pytest.approx(drop)
    assert result.verdict == verdict


def test_every_deciding_number_and_threshold_is_in_numbers() -> None:
    result = diagnose(rows(decaying(0.7, 0.08), decaying(0.72, 0.11)), BASELINE, status="succeeded")
    for name in ("train_ratio", "gap_ratio", "val_rise_ratio", "tail_drop_ratio", "baseline_train_loss",
                 "underfit_ratio_limit", "overfit_gap_limit", "overfit_rise_limit", "not_converged_drop_limit"):
        assert name in result.numbers
    assert result.numbers["baseline_source"] == "constant_predictor"
    assert "underfit_ratio_limit" not in result.measured
    assert set(result.as_json()) == {"reasons", "numbers"}


def test_without_a_baseline_the_first_epoch_is_the_scale() -> None:
    result = diagnose(rows(decaying(2.0, 0.1), decaying(2.0, 0.12)), {}, status="succeeded")
    assert result.numbers["baseline_source"] == "first_epoch"
    assert result.numbers["baseline_train_loss"] == 2.0
    assert result.verdict == "good_fit"


def test_diagnose_experiment_compares_siblings_on_the_same_data_only() -> None:
    def trial(trial_id: int, level: float, noise: float) -> dict:
        return {"trial_id": trial_id, "status": "succeeded", "config": {"dataset": "moons", "noise": noise},
                "final_metrics": BASELINE, "epochs": rows(flat(level), flat(level + 0.02))}

    results = diagnose_experiment([trial(1, 0.02, 0.2), trial(2, 0.25, 0.2), trial(3, 0.25, 0.5)])

    assert results[1].verdict == "good_fit" and results[1].numbers["reference_excess"] == 0
    assert results[2].verdict == "underfit"  # 0.23 x baseline behind trial 1 on the same data
    assert results[2].numbers["reference_train_loss"] == 0.02
    assert results[3].verdict == "good_fit"  # alone on its data: its own reference


def test_an_overfit_sibling_is_no_reference_for_underfitting() -> None:
    memoriser = {"trial_id": 1, "status": "succeeded", "config": {"dataset": "moons"}, "final_metrics": BASELINE,
                 "epochs": rows(flat(0.001), flat(0.9))}
    honest = {"trial_id": 2, "status": "succeeded", "config": {"dataset": "moons"}, "final_metrics": BASELINE,
              "epochs": rows(flat(0.25), flat(0.27))}

    results = diagnose_experiment([memoriser, honest])

    assert results[1].verdict == "overfit"
    assert results[2].numbers["reference_train_loss"] == 0.25 and results[2].verdict == "good_fit"


def test_the_readme_states_the_thresholds_the_code_uses() -> None:
    section = (REPO / "README.md").read_text().split("## Fit diagnosis")[1].split("\n## ")[0]
    for value in (analysis.DIVERGED_RATIO, analysis.UNDERFIT_RATIO, analysis.REFERENCE_MARGIN, analysis.OVERFIT_GAP,
                  analysis.OVERFIT_RISE, analysis.NOT_CONVERGED_DROP):
        assert f"**{value:g}** x baseline" in section, value
    assert f"**{analysis.TAIL_FRACTION:.0%}**" in section


# --- statistics over trials -------------------------------------------------------------------------

def runs_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "width": [4, 4, 4, 64, 64, 64, 64],
        "split": ["val"] * 7,
        "seed": [0, 1, 2, 0, 1, 2, 3],
        "loss": [0.5, 0.7, 0.9, 0.2, 0.2, None, 0.2],
    })


def test_seed_bands_give_mean_and_one_sample_std_per_group() -> None:
    bands = analysis.seed_bands(runs_frame(), by=["width", "split"], value="loss").set_index("width")

    assert bands.loc[4, "mean"] == pytest.approx(0.7)
    assert bands.loc[4, "lower"] == pytest.approx(0.5) and bands.loc[4, "upper"] == pytest.approx(0.9)  # std 0.2
    assert bands.loc[64, "n"] == 3  # the run without a value is left out
    assert bands.loc[64, "lower"] == bands.loc[64, "upper"] == pytest.approx(0.2)


def test_seed_bands_from_min_to_max_and_of_a_single_run() -> None:
    frame = runs_frame()
    bands = analysis.seed_bands(frame, by=["width"], value="loss", band="minmax").set_index("width")
    assert (bands.loc[4, "lower"], bands.loc[4, "upper"]) == (0.5, 0.9)

    single = analysis.seed_bands(frame[frame["seed"] == 0], by=["width"], value="loss")
    assert single["lower"].tolist() == single["mean"].tolist() == single["upper"].tolist()

    with pytest.raises(ValueError, match="band must be one of"):
        analysis.seed_bands(frame, by=["width"], value="loss", band="iqr")
    assert analysis.seed_bands(frame.iloc[:0], by=["width"], value="loss").empty


def test_epochs_to_target_is_the_first_epoch_at_or_below_it() -> None:
    curves = pd.DataFrame({"trial_id": [1] * 4 + [2] * 4, "epoch": [1, 2, 3, 4] * 2,
                           "val_loss": [0.9, 0.5, 0.3, 0.35, 0.9, 0.8, 0.7, 0.6]})

    reached = analysis.epochs_to_target(curves, target=0.5)

    assert reached.loc[1] == 2.0
    assert math.isnan(reached.loc[2])  # never got to 0.5
    assert analysis.epochs_to_target(curves, target=0.3).loc[1] == 3.0


def test_divergence_rate_counts_trained_trials_only() -> None:
    trials = pd.DataFrame({
        "optimizer": ["sgd", "sgd", "sgd", "sgd", "adam", "adam"],
        "status": ["diverged", "succeeded", "succeeded", "failed", "succeeded", "running"],
        "verdict": [None, "diverged", "good_fit", None, "overfit", None],
    })

    rates = analysis.divergence_rate(trials, by=["optimizer"]).set_index("optimizer")

    counted = ["trials", "diverged", "rate"]
    assert rates.loc["sgd", counted].tolist() == [3, 2, pytest.approx(2 / 3)]  # the failed trial is not counted
    assert rates.loc["adam", counted].tolist() == [1, 0, 0.0]


def test_a_paired_difference_has_the_t_interval_of_the_per_seed_differences() -> None:
    a, b = [1.0, 1.2, 1.4, 1.1], [0.8, 0.9, 1.2, 1.0]
    result = analysis.mean_difference(a, b, paired=True)

    differences = [0.2, 0.3, 0.2, 0.1]
    mean = sum(differences) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 3)
    assert result.difference == pytest.approx(mean)
    assert result.degrees_of_freedom == 3
    assert result.low == pytest.approx(mean - 3.182 * sd / 2, abs=1e-4)  # t(0.975, 3) = 3.182
    from scipy import stats

    reference = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (result.low, result.high) == pytest.approx((reference.low, reference.high), rel=1e-9)
    assert result.low > 0  # A is reliably worse than B here


def test_an_unpaired_difference_uses_welch_and_needs_two_runs_a_side() -> None:
    result = analysis.mean_difference([1.0, 2.0, 3.0], [1.0, 1.5], paired=False)
    assert result.difference == pytest.approx(0.75)
    assert 1 < result.degrees_of_freedom < 3
    assert result.low < 0 < result.high

    too_few = analysis.mean_difference([1.0], [1.0, 1.5], paired=False)
    assert too_few.low is None and "two runs" in too_few.reason
    assert analysis.mean_difference([math.nan, 1.0], [2.0, 3.0], paired=True).reason.startswith("an interval")


@pytest.mark.parametrize("df", [0.5, 1, 1.9, 2, 2.5, 5, 9, 29, 30, 33.5, 47, 90, 500, 10_000])
def test_t_quantile_is_scipys_for_fractional_degrees_of_freedom(df: float) -> None:
    from scipy import stats

    assert analysis.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-12)


def test_welch_with_three_runs_a_side_uses_the_fractional_df_not_a_rounded_one() -> None:
    from scipy import stats

    a, b = [1.0, 1.1, 1.3], [2.0, 2.02, 2.01]  # very unequal variances: Welch's df is about 2
    result = analysis.mean_difference(a, b, paired=False)
    assert 1.9 < result.degrees_of_freedom < 2.2
    reference = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (result.low, result.high) == pytest.approx((reference.low, reference.high), rel=1e-9)
    assert 4.3 < analysis.t_quantile_975(1.9) < 4.6  # about 4.5, not the 12.7 of df 1 that rounding down gave


def test_rejudging_stored_diagnoses_agrees_with_diagnosing_the_curves() -> None:
    def trial(trial_id: int, train: list[float], val: list[float], noise: float = 0.2) -> dict:
        return {"trial_id": trial_id, "status": "succeeded", "config": {"dataset": "moons", "noise": noise},
                "final_metrics": BASELINE, "epochs": rows(train, val)}

    trials = [trial(1, flat(0.02), flat(0.04)), trial(2, flat(0.25), flat(0.27)),  # 2 is far behind 1
              trial(3, flat(0.001), flat(0.9)),  # overfit: no yardstick
              trial(4, [0.35 - 0.006 * i for i in range(FLAT)], [0.37 - 0.006 * i for i in range(FLAT)]),
              trial(5, flat(0.25), flat(0.26), noise=0.5),  # alone on its data
              {**trial(6, [1.0, 0.5], [1.0, 0.6]), "status": "diverged"}]
    stored = []
    for item in trials:
        alone = diagnose(item["epochs"], item["final_metrics"], status=item["status"])
        stored.append({"trial_id": item["trial_id"], "config": item["config"], "verdict": alone.verdict,
                       "reasons": alone.reasons, "numbers": alone.numbers})

    from_curves, from_stored = diagnose_experiment(trials), analysis.rejudge_among_siblings(stored)

    assert {k: d.verdict for k, d in from_stored.items()} == {k: d.verdict for k, d in from_curves.items()}
    assert from_stored[2].verdict == "underfit" and from_stored[6].verdict == "diverged"
    for trial_id in (1, 2, 3, 4, 5):
        assert from_stored[trial_id].numbers["reference_excess"] == pytest.approx(
            from_curves[trial_id].numbers["reference_excess"])
        assert from_stored[trial_id].reasons == from_curves[trial_id].reasons

    # The dashboard's table form (services.siblings.rejudge_table, from trial_rows' columns) says the same.
    import pandas as pd

    from services.siblings import rejudge_table

    table = pd.DataFrame([{"trial_id": item["trial_id"], "status": trial["status"], "verdict": item["verdict"],
                           **item["config"], "diag_reasons": item["reasons"],
                           **{f"diag_{name}": value for name, value in item["numbers"].items()}}
                          for item, trial in zip(stored, trials, strict=True)])
    judged = rejudge_table(table).set_index("trial_id")
    for trial_id, found in from_stored.items():
        assert judged.at[trial_id, "sibling_verdict"] == found.verdict
        assert judged.at[trial_id, "reasons"] == "; ".join(found.reasons)
        if "reference_excess" in found.numbers:
            assert judged.at[trial_id, "reference_excess"] == pytest.approx(found.numbers["reference_excess"])


# --- which configurations a comparison draws ----------------------------------------------------------

def optimizer_grid() -> pd.DataFrame:
    """optimizer x lr x schedule x 2 seeds; sgd is best at lr 1 (step), adam at lr 0.01 (constant);
    adam at lr 10 diverged on one seed (no metric)."""
    losses = {("sgd", 0.01, "constant"): 0.60, ("sgd", 0.01, "step"): 0.62, ("sgd", 1.0, "constant"): 0.30,
              ("sgd", 1.0, "step"): 0.20, ("adam", 0.01, "constant"): 0.10, ("adam", 0.01, "step"): 0.15,
              ("adam", 10.0, "constant"): 0.05, ("adam", 10.0, "step"): 0.90}
    rows, trial_id = [], 0
    for (optimizer, lr, schedule), loss in losses.items():
        for seed in (0, 1):
            trial_id += 1
            value = math.nan if (optimizer, lr, schedule, seed) == ("adam", 10.0, "constant", 1) else loss + seed * 0.01
            rows.append({"trial_id": trial_id, "optimizer": optimizer, "lr": lr, "schedule": schedule, "seed": seed,
                         "final_val_loss": value})
    return pd.DataFrame(rows)


PARAMETERS = ("optimizer", "lr", "schedule", "seed")


def test_best_keeps_each_lines_best_rate_and_schedule_with_all_its_seeds() -> None:
    grid = optimizer_grid()
    chosen = selection.select_configurations(grid, shown=["optimizer"], parameters=PARAMETERS, metric="final_val_loss")
    kept = chosen.trials.groupby("optimizer")[["lr", "schedule"]].agg(lambda v: sorted(set(v)))
    assert kept.loc["sgd"].tolist() == [[1.0], ["step"]]
    # adam at lr 10 constant has the lowest loss on one seed but diverged on the other: worst, not best.
    assert kept.loc["adam"].tolist() == [[0.01], ["constant"]]
    assert len(chosen.trials) == 4 and not chosen.spans_configurations
    assert chosen.handling == {"lr": "best", "schedule": "best"}
    assert chosen.best.set_index("optimizer")["metric_mean"].to_dict() == pytest.approx({"adam": 0.105, "sgd": 0.205})
    assert "bands over seeds only" in chosen.describe()
    assert chosen.best_values("optimizer") == {"adam": "lr=0.01, schedule=constant", "sgd": "lr=1, schedule=step"}


def test_the_best_summary_is_the_named_aggregation_over_the_kept_trials() -> None:
    """Selection.best against the expression it replaced (a named aggregation over every column of the
    kept trials), on lines and best parameters that mix numbers, text, missing values and lists."""
    grid = optimizer_grid().assign(width=lambda f: [8, 64, None, 8] * (len(f) // 4),
                                   betas=lambda f: ["[0.9, 0.99]", "[0.5, 0.9]"] * (len(f) // 2))
    parameters = (*PARAMETERS, "width", "betas")
    for shown, handling, goal in ((["optimizer"], {}, "minimize"),
                                  (["optimizer", "width"], {"betas": "held"}, "minimize"),
                                  (["lr"], {}, "maximize"), (["width"], {"lr": "averaged"}, "minimize")):
        chosen = selection.select_configurations(grid, shown=shown, parameters=parameters, metric="final_val_loss",
                                                handling=handling, goal=goal)
        best = [name for name, how in chosen.handling.items() if how == "best"]
        score = selection._scores(grid, "final_val_loss", goal)
        expected = (chosen.trials.assign(_score=score.loc[chosen.trials.index])
                    .groupby([*shown, *best], sort=True, dropna=False)
                    .agg(metric_mean=("_score", "mean")).reset_index())
        expected["metric_mean"] *= 1 if goal == "minimize" else -1
        pd.testing.assert_frame_equal(chosen.best, expected)
        assert len(chosen.best) > 1


def test_each_band_of_a_selection_holds_one_configuration_unless_averaged() -> None:
    grid = optimizer_grid()
    for handling in ({}, {"schedule": "held"}, {"lr": "held", "schedule": "best"}):
        chosen = selection.select_configurations(grid, shown=["optimizer"], parameters=PARAMETERS,
                                                metric="final_val_loss", handling=handling)
        assert (chosen.trials.groupby("optimizer")[["lr", "schedule"]].nunique() == 1).all().all()
    averaged = selection.select_configurations(grid, shown=["optimizer"], parameters=PARAMETERS,
                                              metric="final_val_loss", handling={"lr": "averaged"})
    assert averaged.spans_configurations and "lr averaged" in averaged.describe()
    assert set(averaged.trials["lr"]) == {0.01, 1.0, 10.0}


def test_held_keeps_the_chosen_value_or_the_best_one() -> None:
    grid = optimizer_grid()
    chosen = selection.select_configurations(grid, shown=["optimizer", "lr"], parameters=PARAMETERS,
                                            metric="final_val_loss", handling={"schedule": "held"},
                                            held={"schedule": "constant"})
    assert set(chosen.trials["schedule"]) == {"constant"} and len(chosen.trials) == 8
    assert chosen.describe() == "Schedule held at constant; bands over seeds only."
    default = selection.select_configurations(grid, shown=["optimizer", "lr"], parameters=PARAMETERS,
                                             metric="final_val_loss", handling={"schedule": "held"})
    assert set(default.trials["schedule"]) == {"step"}  # mean over the grid: step 0.47 < constant (inf)


def test_a_goal_of_maximize_picks_the_highest_mean() -> None:
    grid = optimizer_grid().assign(acc=lambda frame: 1 - frame["final_val_loss"])
    chosen = selection.select_configurations(grid, shown=["optimizer"], parameters=PARAMETERS, metric="acc",
                                            goal="maximize")
    assert sorted(set(chosen.trials[chosen.trials["optimizer"] == "sgd"]["lr"])) == [1.0]
    assert "highest mean acc" in chosen.describe()


def test_parameter_importance_splits_the_variance_into_effects_and_seed_noise() -> None:
    rows = []
    for width in (1, 2):
        for n_train in (10, 20):
            for seed, noise in ((0, -0.1), (1, 0.1)):
                rows.append({"width": width, "n_train": n_train, "seed": seed, "loss": 3.0 * width + noise})
    shares = selection.parameter_importance(pd.DataFrame(rows), parameters=("width", "n_train", "seed"),
                                           metric="loss").set_index("parameter")["share"]
    # width moves the loss by 3 (between SS 8 x 1.5^2 = 18), seeds by +-0.1 (SS 8 x 0.01 = 0.08).
    assert shares["width"] == pytest.approx(18 / 18.08)
    assert shares["seed noise"] == pytest.approx(0.08 / 18.08)
    assert shares["n_train"] == pytest.approx(0.0, abs=1e-12)
    assert shares.sum() == pytest.approx(1.0)
    assert list(shares.index) == ["width", "n_train", "interactions", "seed noise"]


def test_a_run_whose_loss_once_rose_tenfold_is_unstable() -> None:
    maximum = pd.Series([0.7, 6.0, 8.0, 1e10, None])
    baseline = pd.Series([0.69, 0.69, 0.0, 0.69, 0.69])
    assert analysis.unstable(maximum, baseline).tolist() == [False, False, False, True, False]
    assert analysis.unstable(pd.Series([7.0]), pd.Series([0.69])).tolist() == [True]


def test_divergence_rate_counts_unstable_runs_apart_from_diverged_ones() -> None:
    trials = pd.DataFrame({"lr": [1, 1, 1, 10], "status": ["succeeded", "succeeded", "diverged", "succeeded"],
                           "verdict": ["good_fit", "good_fit", "diverged", "diverged"],
                           "unstable": [True, False, True, True]})
    rates = analysis.divergence_rate(trials, by=["lr"]).set_index("lr")
    assert rates.loc[1, ["trials", "diverged", "unstable"]].tolist() == [3, 1, 1]
    assert rates.loc[10, ["diverged", "unstable"]].tolist() == [1, 0]


def test_bands_from_database_moments_match_pandas() -> None:
    values = pd.DataFrame({"g": [0, 0, 0, 1], "x": [1.0, 2.0, 4.0, 5.0]})
    moments = values.groupby("g")["x"].agg(n="count", mean="mean", low="min", high="max").reset_index()
    moments["mean_square"] = values.assign(sq=values["x"] ** 2).groupby("g")["sq"].mean().to_numpy()
    banded = analysis.bands_from_moments(moments, band="std")
    std = values[values["g"] == 0]["x"].std()
    assert banded["upper"].tolist() == pytest.approx([7 / 3 + std, 5.0])
    assert analysis.bands_from_moments(moments, band="minmax")["lower"].tolist() == [1.0, 5.0]


def test_a_configuration_with_a_missing_value_competes_and_can_win():
    # grad_clip: [null, 1.0] (or no init_from beside one): the runs without a value are a configuration
    # too; they used to drop out of every chart whenever the parameter was handled as "best".
    grid = pd.DataFrame({"optimizer": ["adam"] * 4, "grad_clip": [None, None, 1.0, 1.0], "seed": [0, 1, 0, 1],
                         "final_val_loss": [0.1, 0.2, 0.5, 0.6]})
    chosen = selection.select_configurations(grid, shown=["optimizer"], parameters=["optimizer", "grad_clip"],
                                             metric="final_val_loss")
    assert sorted(chosen.trials["final_val_loss"]) == [0.1, 0.2]


def _old_best_summary(kept: pd.DataFrame, score: pd.Series, columns: list[str]) -> pd.DataFrame:
    """Selection.best as it was computed before (commit 33c0310): a named aggregation over every column."""
    return (kept.assign(_score=score.loc[kept.index]).groupby(columns, sort=True, dropna=False)
            .agg(metric_mean=("_score", "mean")).reset_index())


@pytest.mark.parametrize("handling", [{}, {"schedule": "held"}, {"lr": "averaged"},
                                      {"lr": "held", "schedule": "averaged"}])
def test_selections_that_share_codes_are_the_selections_made_alone(handling: dict[str, str]) -> None:
    """A page keeps each column's codes across its selections (codes=): every selection, and its best
    configurations, as when made alone; and the best table as the named aggregation gave it."""
    grid = optimizer_grid().assign(grad_clip=[None, 1.0] * 8, tag=["a", "b", "c", "d"] * 4)
    parameters = (*PARAMETERS, "grad_clip", "tag")
    shared: dict[str, tuple] = {}
    for shown in (["optimizer"], ["optimizer", "lr"], ["schedule"], ["optimizer", "lr"], ["grad_clip", "tag"]):
        alone = selection.select_configurations(grid, shown=shown, parameters=parameters, metric="final_val_loss",
                                                handling=handling, held={"lr": 1.0})
        kept = selection.select_configurations(grid, shown=shown, parameters=parameters, metric="final_val_loss",
                                               handling=handling, held={"lr": 1.0}, codes=shared)
        pd.testing.assert_frame_equal(kept.trials, alone.trials)
        pd.testing.assert_frame_equal(kept.best, alone.best)
        assert kept.describe() == alone.describe()
        best = [name for name, how in alone.handling.items() if how == "best"]
        if best:
            score = selection._scores(grid, "final_val_loss", "minimize")
            pd.testing.assert_frame_equal(alone.best, _old_best_summary(
                alone.trials, score, [name for name in shown if name in grid] + best))
    assert shared  # filled, and used by the later selections


def test_a_diagnosis_keeps_the_largest_losses_of_a_run_that_blew_up_and_came_back() -> None:
    train, val = decaying(0.9, 0.1), decaying(0.95, 0.2)
    val[3] = 1e9  # an unstable run: the spike is in its numbers, its verdict is the curves'
    result = diagnose(rows(train, val), BASELINE, status="succeeded")
    assert result.numbers["max_val_loss"] == 1e9 and result.numbers["max_train_loss"] == max(train)
    assert analysis.unstable(pd.Series([result.numbers["max_val_loss"]]), pd.Series([1.0])).tolist() == [True]
    # A non-finite loss has no largest value worth keeping: the epoch rows decide then.
    assert "max_val_loss" not in diagnose(rows([1.0, math.nan], [1.0, 1.0]), BASELINE, status="diverged").numbers


def test_a_parameter_varies_exactly_when_it_takes_more_than_one_value_missing_included() -> None:
    import numpy as np

    columns = [pd.Series([[0.9, 0.999]] * 5), pd.Series([[0.9, 0.999]] * 4 + [[0.8, 0.99]]),
               pd.Series([None] * 3, dtype=object), pd.Series([None, [1]], dtype=object),
               pd.Series([1, 1.0], dtype=object), pd.Series([{"a": 1}, {"a": 2}]), pd.Series(["x"] * 3),
               pd.Series([1.0, np.nan]), pd.Series([np.nan, np.nan]), pd.Series([1, 2]), pd.Series([], dtype=object)]
    assert [selection._varies(column) for column in columns] == [
        selection._distinct(column) > 1 for column in columns] == [
        False, True, False, True, False, True, False, True, False, True, False]
    # Each dtype's own fast path (numpy numbers, pandas' text, nullable integers) against the count.
    typed = [pd.Series(["x", None, "x"], dtype="str"), pd.Series(["x", "y"], dtype="str"),
             pd.Series([None, None], dtype="str"), pd.Series([True, True]), pd.Series([True, False]),
             pd.Series([3, 3, 3]), pd.Series([0.5, 0.5]), pd.Series([np.inf, np.inf]), pd.Series([np.inf, 1.0]),
             pd.Series([2.0]), pd.Series([], dtype=float), pd.Series([1, None], dtype="Int64"),
             pd.Series([1, 1], dtype="Int64")]
    assert [selection._varies(column) for column in typed] == [
        selection._distinct(column) > 1 for column in typed] == [
        True, True, False, False, True, False, False, False, True, False, False, True, False]
