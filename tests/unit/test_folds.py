"""k-fold cross-validation against scikit-learn, which no one here wrote: the folds are KFold's
(shuffle=True, random_state=data_seed) row for row, a linear model's mean validation R^2 over five
folds of a CSV is cross_val_score's, and the spec's folds: K axis expands and refuses as documented."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression
from sklearn.model_selection import KFold, cross_val_score

from services.spec import SpecError, expand, parse_spec
from services.trial_config import CsvDataset, TrialConfig
from worker.training.data import fold_rows, make_dataset
from worker.training.fused import train_fused


@pytest.mark.parametrize(("n", "folds", "data_seed"), [(10, 3, 0), (103, 5, 7), (40, 20, 3), (57, 2, 11)])
def test_each_fold_is_scikit_learns_kfold_split(n, folds, data_seed):
    for k, (train, val) in enumerate(KFold(folds, shuffle=True, random_state=data_seed).split(np.zeros(n)), start=1):
        ours_train, ours_val = fold_rows(n, folds=folds, fold=k, data_seed=data_seed)
        np.testing.assert_array_equal(ours_train, train)
        np.testing.assert_array_equal(ours_val, val)


def _regression_csv(n: int = 150, seed: int = 0) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3))
    y = x @ np.array([1.5, -2.0, 0.5]) + 0.3 + rng.standard_normal(n) * 0.8
    lines = ["a,b,c,y"] + [f"{a!r},{b!r},{c!r},{t!r}" for (a, b, c), t in zip(x.tolist(), y.tolist(), strict=True)]
    return ("\n".join(lines) + "\n").encode(), x, y


CSV = CsvDataset(csv="data.csv", target="y", task="regression")


def test_a_csv_fold_validates_on_exactly_kfolds_rows_and_trains_on_the_rest():
    content, _, y = _regression_csv()
    for k, (train, val) in enumerate(KFold(5, shuffle=True, random_state=4).split(y), start=1):
        splits = make_dataset(TrialConfig(dataset=CSV, test_fraction=0.0, folds=5, fold=k, data_seed=4),
                              csv_content=content)
        np.testing.assert_array_equal(splits.y_val[:, 0].numpy(), y[val].astype(np.float32))
        np.testing.assert_array_equal(splits.y_train[:, 0].numpy(), y[train].astype(np.float32))


def test_a_linear_models_mean_validation_r2_over_folds_is_cross_val_scores():
    content, x, y = _regression_csv()
    data_seed = 3
    reference = cross_val_score(LinearRegression(), x, y, cv=KFold(5, shuffle=True, random_state=data_seed),
                                scoring="r2")
    ours = []
    for k in range(1, 6):
        config = TrialConfig(dataset=CSV, test_fraction=0.0, folds=5, fold=k, data_seed=data_seed, model="linear",
                             optimizer="momentum", lr=0.1, batch_size="full", epochs=80)
        last = []
        train_fused([config], csv_content=content, on_epoch=lambda rows, last=last: last.append(rows[0]) and None)
        ours.append(last[-1].val_r2)
    assert np.mean(ours) == pytest.approx(reference.mean(), abs=0.02), (ours, reference)
    assert ours == pytest.approx(reference.tolist(), abs=0.02)  # fold by fold, too


def test_synthetic_and_real_folds_re_deal_the_training_and_validation_rows():
    for base in (dict(dataset="sine", n_train=30, n_val=20, n_test=10), dict(dataset="wine"),
                 dict(dataset="multilabel_2d", n_train=30, n_val=20, n_test=10)):
        plain = make_dataset(TrialConfig(**base))
        pool = np.sort(np.concatenate([plain.y_train.numpy().reshape(-1), plain.y_val.numpy().reshape(-1)]))
        seen_val = []
        for k in (1, 2, 3, 4):
            fold = make_dataset(TrialConfig(**base, folds=4, fold=k))
            both = np.concatenate([fold.y_train.numpy().reshape(-1), fold.y_val.numpy().reshape(-1)])
            np.testing.assert_array_equal(np.sort(both), pool)  # the same rows, re-dealt
            np.testing.assert_array_equal(fold.y_test.numpy(), plain.y_test.numpy())  # the test rows stay out
            seen_val.append(fold.x_val.shape[0])
        assert sum(seen_val) == plain.x_train.shape[0] + plain.x_val.shape[0] and max(seen_val) - min(seen_val) <= 1


def test_folds_expand_inside_seeds_and_every_trial_carries_its_fold():
    spec = parse_spec("name: cv\nseeds: [0, 1]\nfolds: 3\nparameters:\n  width: {values: [8, 16]}\n")
    trials = expand(spec)
    assert len(trials) == 12
    assert [(t.width, t.seed, t.fold) for t in trials[:6]] == [(8, 0, 1), (8, 0, 2), (8, 0, 3), (8, 1, 1), (8, 1, 2),
                                                              (8, 1, 3)]
    assert {t.folds for t in trials} == {3}


@pytest.mark.parametrize(("text", "expected"), [
    ("folds: 1\n", "folds: must be a whole number from 2 to 20"),
    ("folds: 21\n", "folds: must be a whole number from 2 to 20"),
    ("folds: five\n", "folds: must be a whole number from 2 to 20"),
    ("folds: true\n", "folds: must be a whole number from 2 to 20"),
    ("parameters:\n  fold: {value: 2}\n", "parameters.fold: set cross-validation with the top-level folds: K"),
    ("parameters:\n  folds: {value: 2}\n", "parameters.folds: set cross-validation with the top-level folds: K"),
    ("folds: 20\nparameters:\n  n_train: {value: 10}\n  n_val: {value: 10}\n",
     "folds 20 needs at least 40 training and validation rows but n_train + n_val is 20"),
])
def test_a_wrong_folds_is_one_sentence_naming_it(text, expected):
    head = "name: t\n" + text + ("" if "parameters:" in text else "parameters:\n  width: {value: 8}\n")
    with pytest.raises(SpecError) as caught:
        expand(parse_spec(head))
    assert len(caught.value.problems) == 1 and expected in caught.value.problems[0], caught.value.problems


def test_folds_are_replicates_of_a_configuration_and_its_band_is_the_cross_validated_mean():
    import pandas as pd

    from services.analysis import seed_bands
    from services.selection import configuration_parameters, select_configurations

    losses = [0.3, 0.5, 0.4, 0.2, 0.25, 0.3]
    trials = pd.DataFrame({"width": [8, 8, 8, 16, 16, 16], "fold": [1, 2, 3] * 2, "folds": [3] * 6, "seed": [0] * 6,
                           "final_val_loss": losses})
    assert configuration_parameters(trials, ["width", "fold", "folds", "seed"]) == ["width"]
    chosen = select_configurations(trials, shown=["width"], parameters=["width", "fold", "seed"],
                                   metric="final_val_loss")
    assert len(chosen.trials) == 6 and "cross-validation folds" in chosen.describe()
    bands = seed_bands(chosen.trials, by=["width"], value="final_val_loss")
    assert bands["mean"].tolist() == pytest.approx([np.mean(losses[:3]), np.mean(losses[3:])])
    assert bands["n"].tolist() == [3, 3]


def test_folds_train_apart_and_different_parents_together():
    from services.planner import fusion_key, plan_jobs

    spec = parse_spec("name: cv\nseeds: [0, 1]\nfolds: 3\nparameters:\n  init_from: {values: [null, 7, 8]}\n"
                      "  freeze: {value: 0}\n")
    trials = expand(spec)
    jobs = plan_jobs(trials, max_trials=64, min_trials=64)
    assert len(jobs) == 3  # one per fold: the folds train on different rows
    for job in jobs:
        assert len({trials[i].fold for i in job}) == 1 and len({trials[i].init_from for i in job}) == 3
    assert fusion_key(trials[0]) == fusion_key(trials[0].model_copy(update={"init_from": 9, "freeze": 2}))


def test_multi_label_folds_validate_on_different_rows():
    # multilabel_2d draws its rows in a branch of its own: each fold must still re-deal them.
    firsts = [make_dataset(TrialConfig(dataset="multilabel_2d", folds=3, fold=k)).x_val[0].tolist() for k in (1, 2, 3)]
    assert len({tuple(first) for first in firsts}) == 3
