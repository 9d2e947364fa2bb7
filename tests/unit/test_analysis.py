"""The fit diagnosis on hand-made learning curves: each verdict, each threshold's boundary."""

from __future__ import annotations

import math

import pytest

from services import analysis
from services.analysis import diagnose, diagnose_experiment
from tests.servers import REPO

BASELINE = {"baseline_train_loss": 1.0, "baseline_val_loss": 1.0}  # losses below are fractions of it


def rows(train: list[float], val: list[float]) -> list[dict]:
    return [{"epoch": i + 1, "train_loss": t, "val_loss": v} for i, (t, v) in enumerate(zip(train, val, strict=True))]


def decaying(start: float, end: float, n: int = 50, rate: float = 0.15) -> list[float]:
    """A loss that falls quickly from start and flattens at end."""
    return [end + (start - end) * math.exp(-rate * i) for i in range(n)]


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
