"""Admission control: the memory estimate against the peak measured while real trials train, and
the refusals (at submit, and by a worker) that name the parameters."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.admission import (
    MAX_POLYNOMIAL_FEATURES,
    admission_problem,
    check_admission,
    claim_problem,
    estimate_trial,
    polynomial_feature_count,
)
from services.trial_config import TrialConfig

MEASURE = Path(__file__).with_name("_measure_peak.py")

# Each over 100 MB, so the process's own noise (a few MB) does not decide the ratio; one of each
# dominant part: activations at evaluation, polynomial features, a full batch, weights and Adam.
# Each part is made large where it costs memory, not arithmetic: a long validation split through a
# narrow MLP, a full batch of many rows through a narrow one, few rows through a wide one, and
# the polynomial expansion in four large batches rather than 160 small ones.
MEASURED = {
    "eval-activations": dict(dataset="moons", n_train=2000, n_val=150000, n_test=1000, width=128, depth=2,
                             batch_size=256, epochs=1),
    "polynomial-features": dict(dataset="linear", n_features=40, poly_degree=3, n_train=2000, n_val=1000,
                                n_test=500, width=64, depth=1, batch_size=500, epochs=1),
    "full-batch": dict(dataset="moons", n_train=100000, n_val=20000, n_test=1000, width=128, depth=2,
                       batch_size="full", epochs=1),
    "weights-and-adam": dict(dataset="digits", n_train=200, width=2048, depth=3, epochs=1, optimizer="adam"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MEASURED), ids=list(MEASURED))
def test_the_estimate_is_within_a_factor_of_two_of_the_measured_peak(case: str):
    config = TrialConfig.model_validate(MEASURED[case])
    run = subprocess.run([sys.executable, str(MEASURE), json.dumps(MEASURED[case])], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])["peak_bytes"]
    estimated = estimate_trial(config).total
    print(f"{case}: estimated {estimated / 2**20:.0f} MB, measured {measured / 2**20:.0f} MB, "
          f"ratio {estimated / measured:.2f}")
    assert measured > 100 * 2**20
    assert 0.5 <= estimated / measured <= 2.0


def test_the_polynomial_feature_count_is_the_number_of_monomials():
    import itertools

    for n, d in [(1, 1), (1, 5), (2, 2), (3, 4), (5, 3)]:
        terms = sum(1 for k in range(1, d + 1) for _ in itertools.combinations_with_replacement(range(n), k))
        assert polynomial_feature_count(n, d) == terms


def test_a_thousand_features_at_degree_ten_is_refused_before_a_term_is_enumerated():
    config = TrialConfig(dataset="linear", n_features=1000, poly_degree=10)
    started = time.perf_counter()
    problem = admission_problem(config, cap_mb=4096)
    assert time.perf_counter() - started < 0.05
    assert problem == ("poly_degree 10 on 1000 input features makes 2.91e+23 polynomial features, over the cap "
                       f"of {MAX_POLYNOMIAL_FEATURES}; lower poly_degree or n_features")


def test_a_huge_model_on_a_million_rows_is_refused_naming_its_parameters():
    config = TrialConfig(dataset="moons", n_train=1_000_000, width=4096, depth=16, batch_size="full")
    [problem] = check_admission([TrialConfig(), config], cap_mb=4096)
    assert problem.startswith("trial 2: a trial with width 4096, depth 16, batch_size full, 2 input features "
                              "(poly_degree 1) and 1000000/500/500 train/val/test rows needs about ")
    assert problem.endswith("MB, over FITSCOPE_MAX_TRIAL_MEMORY_MB=4096; make it smaller or raise the cap")


def test_an_ordinary_grid_is_admitted_and_a_worker_takes_its_trials():
    assert check_admission([TrialConfig(), TrialConfig(width=512, depth=4, n_train=10000)], cap_mb=4096) == []
    assert claim_problem(TrialConfig(), cap_mb=4096) is None


def test_a_worker_refuses_a_trial_over_the_cap_or_over_what_the_machine_has(monkeypatch):
    import services.admission as admission

    big = TrialConfig(dataset="moons", n_train=200_000, width=2048, depth=2, batch_size="full")
    assert claim_problem(big, cap_mb=100).startswith("this worker refuses the trial: a trial with width 2048")
    monkeypatch.setattr(admission, "_available_bytes", lambda: 50 * 2**20)
    problem = claim_problem(big, cap_mb=1_000_000)
    assert problem.startswith("this worker refuses the trial: it needs about ")
    assert problem.endswith("MB and this machine has 50 MB available; run it on a larger worker or make it smaller")


def test_a_job_counts_its_data_once_and_every_trial_s_weights_and_activations(monkeypatch):
    import services.admission as admission

    configs = [TrialConfig(dataset="moons", n_train=20000, batch_size="full", width=256, depth=4, seed=seed)
               for seed in range(4)]
    one = estimate_trial(configs[0])
    assert admission.job_estimate(configs) == one.data + one.polynomial + 4 * (one.weights + one.activations)
    monkeypatch.setattr(admission, "_available_bytes", lambda: int(2.5 * one.total))
    assert all(claim_problem(config, cap_mb=4096) is None for config in configs)  # each fits alone
    assert admission.job_problem(configs[:2]) is None
    problem = admission.job_problem(configs)  # four of them together do not
    assert problem.startswith("this worker refuses the job: its 4 trials together need about ")
    assert admission.job_problem(configs[:1]) is None  # a job of one is claim_problem's to judge


def test_the_planner_keeps_each_job_within_the_memory_cap():
    from services.planner import plan_jobs

    configs = [TrialConfig(dataset="moons", n_train=20000, batch_size="full", width=256, depth=4, seed=seed)
               for seed in range(22)]
    one = estimate_trial(configs[0])
    assert [len(job) for job in plan_jobs(configs, max_trials=64)] == [22]
    cap_mb = (one.data + 5 * (one.weights + one.activations)) // 2**20 + 1  # room for five
    jobs = plan_jobs(configs, max_trials=64, memory_budget_mb=cap_mb)
    assert [len(job) for job in jobs] == [5, 5, 4, 4, 4]
    assert all(estimate_trial(configs[0]).data + len(job) * (one.weights + one.activations) <= cap_mb * 2**20
               for job in jobs)
