"""The planner: which trials fuse, into which jobs; and what a submission sends."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.planner import FUSED_WEIGHT_BUDGET, fusable, fusion_key, plan_jobs
from services.spec import parse_spec
from services.trial_config import TrialConfig


def test_a_small_mlp_fuses_batch_norm_included_and_a_huge_model_does_not():
    assert fusable(TrialConfig()) is None
    assert fusable(TrialConfig(norm="batch")) is None  # the stack keeps each trial's running statistics
    assert fusion_key(TrialConfig(norm="batch")) != fusion_key(TrialConfig())
    assert "budget" in fusable(TrialConfig(width=4096, depth=2))


def test_numbers_may_differ_inside_a_job_but_shapes_may_not():
    base = TrialConfig()
    same = [base.model_copy(update=change) for change in (
        {"seed": 3}, {"lr": 0.5}, {"weight_decay": 0.1}, {"l1": 0.01}, {"dropout": 0.3}, {"momentum": 0.5},
        {"betas": (0.8, 0.9)}, {"schedule": "one_cycle"}, {"epochs": 90}, {"grad_clip": 1.0}, {"input_noise": 0.1},
        {"early_stopping": {"patience": 3, "min_delta": 0.0}})]
    different = [base.model_copy(update=change) for change in (
        {"dataset": "circles"}, {"n_train": 100}, {"data_seed": 1}, {"noise": 0.3}, {"width": 32}, {"depth": 3},
        {"activation": "tanh"}, {"norm": "layer"}, {"loss": "bce"}, {"batch_size": 16}, {"optimizer": "sgd"},
        {"device": "cuda"}, {"label_smoothing": 0.1})]
    assert all(fusion_key(config) == fusion_key(base) for config in same)
    assert all(fusion_key(config) != fusion_key(base) for config in different)
    # A linear model has no width: linear trials of any width fuse.
    assert fusion_key(TrialConfig(model="linear", width=4)) == fusion_key(TrialConfig(model="linear", width=64))


def test_plan_groups_by_key_caps_the_size_evenly_and_keeps_grid_order():
    configs = [TrialConfig(seed=i, width=8 if i % 2 else 16) for i in range(10)]
    configs.append(TrialConfig(width=4096, depth=2))
    jobs = plan_jobs(configs, max_trials=3)
    assert jobs == [[0, 2, 4], [1, 3, 5], [6, 8], [7, 9], [10]]
    many = plan_jobs([TrialConfig(seed=i) for i in range(70)], max_trials=64)
    assert [len(job) for job in many] == [35, 35]


def test_the_weight_budget_caps_a_job_of_wide_models():
    width = 1024  # about 2.1M weights each at depth 2
    jobs = plan_jobs([TrialConfig(seed=i, width=width) for i in range(10)], max_trials=64)
    per_job = FUSED_WEIGHT_BUDGET // (2 * width * (width + 1) + width)
    assert max(len(job) for job in jobs) <= per_job and sum(len(job) for job in jobs) == 10


@given(st.lists(st.tuples(st.sampled_from([4, 8]), st.sampled_from(["none", "batch"]), st.integers(0, 3)),
                max_size=40), st.integers(1, 5), st.integers(1, 12), st.integers(1, 4))
def test_every_trial_is_in_exactly_one_job_of_compatible_trials(shapes, max_trials, slots, min_trials):
    configs = [TrialConfig(width=width, norm=norm, seed=seed) for width, norm, seed in shapes]
    unsplit = plan_jobs(configs, max_trials=max_trials)
    jobs = plan_jobs(configs, max_trials=max_trials, slots=slots, min_trials=min_trials)
    assert sorted(i for job in jobs for i in job) == list(range(len(configs)))
    assert jobs == sorted(jobs) and all(job == sorted(job) for job in jobs)  # grid order, both ways
    for job in jobs:
        assert len(job) <= max_trials
        assert len(job) == 1 or len({fusion_key(configs[i]) for i in job}) == 1
        assert len(job) == 1 or all(fusable(configs[i]) is None for i in job)
    # Splitting only adds jobs up to ``slots``, and stops short of it only when no half would keep
    # ``min_trials`` trials.
    assert len(unsplit) <= len(jobs) <= max(slots, len(unsplit))
    assert len(jobs) == max(slots, len(unsplit)) or all(len(job) < 2 * min_trials for job in jobs)
    assert plan_jobs(configs, max_trials=max_trials, slots=1, min_trials=min_trials) == unsplit


@pytest.mark.parametrize(("slots", "sizes"), [
    (1, [64]), (2, [32, 32]), (3, [16, 16, 32]), (4, [16] * 4), (5, [8, 8, 16, 16, 16]), (8, [8] * 8),
    (64, [8] * 8)])
def test_a_big_job_is_halved_until_every_slot_has_a_job_or_halves_would_be_too_small(slots, sizes):
    jobs = plan_jobs([TrialConfig(seed=i) for i in range(64)], max_trials=64, slots=slots, min_trials=8)
    assert [len(job) for job in jobs] == sizes
    assert [i for job in jobs for i in job] == list(range(64))  # consecutive runs of the grid


def test_halves_keep_min_trials_and_an_odd_job_puts_the_extra_trial_first():
    configs = [TrialConfig(seed=i) for i in range(25)]
    assert [len(job) for job in plan_jobs(configs, max_trials=64, slots=2, min_trials=8)] == [13, 12]
    assert [len(job) for job in plan_jobs(configs, max_trials=64, slots=4, min_trials=8)] == [13, 12]
    assert [len(job) for job in plan_jobs(configs, max_trials=64, slots=4, min_trials=6)] == [7, 6, 6, 6]
    assert len(plan_jobs(configs, max_trials=64, slots=2, min_trials=13)) == 1


def test_single_trials_count_as_jobs_and_are_never_split_further():
    configs = [TrialConfig(seed=i) for i in range(16)] + [TrialConfig(width=4096, depth=2, seed=i) for i in range(2)]
    assert [len(job) for job in plan_jobs(configs, max_trials=64, slots=3, min_trials=8)] == [16, 1, 1]
    assert [len(job) for job in plan_jobs(configs, max_trials=64, slots=4, min_trials=8)] == [8, 8, 1, 1]
    assert plan_jobs(configs[16:], max_trials=64, slots=8, min_trials=1) == [[0], [1]]


def test_the_largest_of_several_groups_is_split_first():
    configs = [TrialConfig(seed=i, width=16 if i < 20 else 8) for i in range(60)]  # 20 of width 16, 40 of 8
    jobs = plan_jobs(configs, max_trials=64, slots=3, min_trials=8)
    assert jobs == [list(range(20)), list(range(20, 40)), list(range(40, 60))]


def test_trials_for_different_queues_never_share_a_job():
    # A job goes to its first trial's queue: the queue follows from the device, which is in the key.
    configs = [TrialConfig(seed=i, device="cuda" if i % 2 else "cpu") for i in range(32)]
    assert {config.queue for config in configs} == {"cpu", "gpu"}
    jobs = plan_jobs(configs, max_trials=64, slots=4, min_trials=8)
    assert [len(job) for job in jobs] == [8, 8, 8, 8]
    assert all(len({configs[i].queue for i in job}) == 1 for job in jobs)


SPEC = "name: p\nseeds: [0, 1, 2]\nparameters:\n  norm: {values: [none, batch]}\n  epochs: {value: 2}\n"


@pytest.mark.parametrize(("spec_fuse", "setting", "expected_jobs"), [
    ("", "true", [3, 3]), ("fuse: false\n", "true", [1] * 6), ("", "false", [1] * 6)])
def test_a_submission_plans_jobs_unless_the_spec_or_the_setting_says_not_to(
        migrated_sqlite_url, engine_for, monkeypatch, spec_fuse, setting, expected_jobs):
    from services.db import session_scope
    from services.submission import submit

    monkeypatch.setenv("FITSCOPE_FUSE", setting)
    monkeypatch.setenv("FITSCOPE_DATABASE_URL", migrated_sqlite_url)
    spec = parse_spec(SPEC + spec_fuse)
    with session_scope(engine_for(migrated_sqlite_url)) as session:
        submitted = submit(session, spec=spec, spec_text=SPEC, submitted_by="t", max_trials=100)
    assert sorted(len(ids) for ids, _ in submitted.jobs) == sorted(expected_jobs)
    assert sorted(i for ids, _ in submitted.jobs for i in ids) == sorted(submitted.trial_ids)
    assert len(submitted.trials) == 6
