"""The data sets: shapes, determinism by data_seed, label noise, real-data splits, CSVs, the truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.trial_config import REAL_DATASETS, CsvDataset, TrialConfig
from worker.training.data import flip_labels, make_dataset, true_function

NEW_SYNTHETIC = ("polynomial", "linear")


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("x_train", "y_train", "x_val", "y_val",
                                                                    "x_test", "y_test"))


def test_polynomial_is_one_dimensional_regression_with_a_truth():
    splits = make_dataset(TrialConfig(dataset="polynomial", n_train=50, n_val=40, n_test=30, true_degree=5))
    assert splits.x_train.shape == (50, 1) and splits.y_train.shape == (50, 1)
    assert splits.x_val.shape == (40, 1) and splits.x_test.shape == (30, 1)
    assert (splits.task, splits.n_features, splits.n_outputs) == ("regression", 1, 1)
    grid = np.linspace(-1, 1, 501)[:, None]
    curve = splits.truth(grid)
    assert curve.shape == (501, 1) and np.abs(curve).max() == pytest.approx(1.0, abs=1e-3)
    # of degree exactly 5: a degree-5 fit is exact, a degree-4 fit is not
    fit = {d: np.polynomial.Polynomial.fit(grid[:, 0], curve[:, 0], d) for d in (4, 5)}
    assert np.abs(fit[5](grid[:, 0]) - curve[:, 0]).max() < 1e-9 < 1e-3 < np.abs(fit[4](grid[:, 0]) - curve[:, 0]).max()


def test_linear_has_n_features_inputs_and_no_curve_to_draw():
    splits = make_dataset(TrialConfig(dataset="linear", n_features=7, n_train=60))
    assert splits.x_train.shape == (60, 7) and splits.y_train.shape == (60, 1)
    assert (splits.task, splits.n_features, splits.n_outputs, splits.truth) == ("regression", 7, 1, None)
    assert make_dataset(TrialConfig(dataset="linear", n_features=1)).truth is not None


@pytest.mark.parametrize("dataset", ["sine", "polynomial", "linear"])
def test_truth_matches_the_noiseless_targets(dataset):
    splits = make_dataset(TrialConfig(dataset=dataset, n_features=1, noise=0.0, n_train=80))
    x_raw = splits.x_train.numpy() * splits.feature_std.numpy() + splits.feature_mean.numpy()
    np.testing.assert_allclose(splits.truth(x_raw), splits.y_train.numpy(), atol=1e-5)
    config = TrialConfig(dataset=dataset, n_features=1)  # the module-level form the artifact code uses
    np.testing.assert_allclose(true_function(config, x_raw), splits.y_train.numpy(), atol=1e-5)
    assert true_function(TrialConfig(dataset="moons"), x_raw) is None


def test_linear_targets_are_an_exact_linear_function_of_the_inputs_without_noise():
    splits = make_dataset(TrialConfig(dataset="linear", n_features=4, noise=0.0, n_train=100))
    x = np.hstack([splits.x_train.numpy().astype(np.float64), np.ones((100, 1))])
    _, residual, *_ = np.linalg.lstsq(x, splits.y_train.numpy().astype(np.float64), rcond=None)
    assert residual.item() < 1e-8


@pytest.mark.parametrize("dataset", NEW_SYNTHETIC + tuple(REAL_DATASETS))
def test_the_same_data_seed_gives_the_same_data_and_another_differs(dataset):
    config = TrialConfig(dataset=dataset, data_seed=3, label_noise=0.1 if dataset in REAL_DATASETS else 0.0)
    assert _same(make_dataset(config), make_dataset(config.model_copy(update={"seed": 99})))
    assert not _same(make_dataset(config), make_dataset(config.model_copy(update={"data_seed": 4})))


def test_the_true_function_does_not_depend_on_split_sizes():
    small = make_dataset(TrialConfig(dataset="polynomial", n_train=20))
    large = make_dataset(TrialConfig(dataset="polynomial", n_train=400))
    grid = np.linspace(-1, 1, 11)
    np.testing.assert_array_equal(small.truth(grid), large.truth(grid))


@pytest.mark.parametrize(("dataset", "rows", "features", "classes"),
                         [("digits", 1797, 64, 10), ("breast_cancer", 569, 30, 2), ("wine", 178, 13, 3)])
def test_real_data_is_split_by_fractions_and_stratified(dataset, rows, features, classes):
    splits = make_dataset(TrialConfig(dataset=dataset, val_fraction=0.25, test_fraction=0.15))
    n_val, n_test = int(rows * 0.25), int(rows * 0.15)
    assert splits.x_val.shape == (n_val, features) and splits.x_test.shape == (n_test, features)
    assert splits.x_train.shape == (rows - n_val - n_test, features)
    assert (splits.task, splits.n_outputs, splits.n_features) == ("classification", classes, features)
    overall = np.bincount(np.concatenate([s.numpy() for s in (splits.y_train, splits.y_val, splits.y_test)]))
    for y in (splits.y_train, splits.y_val):
        share = np.bincount(y.numpy(), minlength=classes) / len(y)
        np.testing.assert_allclose(share, overall / rows, atol=1.5 / len(y) + 0.01)


def test_real_training_rows_are_capped_to_n_train_and_other_splits_keep():
    full = make_dataset(TrialConfig(dataset="wine"))
    capped = make_dataset(TrialConfig(dataset="wine", n_train=30))
    assert capped.x_train.shape == (30, 13)
    assert torch.equal(full.y_val, capped.y_val)


@pytest.mark.parametrize("dataset", ["moons", "spirals", "digits", "wine"])
def test_label_noise_flips_that_fraction_of_training_labels_only(dataset):
    clean = make_dataset(TrialConfig(dataset=dataset, n_train=100, data_seed=1))
    noisy = make_dataset(TrialConfig(dataset=dataset, n_train=100, data_seed=1, label_noise=0.3))
    assert int((clean.y_train != noisy.y_train).sum()) == 30
    assert torch.equal(clean.y_val, noisy.y_val) and torch.equal(clean.y_test, noisy.y_test)
    assert torch.equal(clean.x_train, noisy.x_train)


def test_flip_labels_always_moves_to_another_class():
    y = np.arange(1000) % 3
    flipped = flip_labels(y, fraction=0.5, n_classes=3, rng=np.random.default_rng(0))
    assert int((flipped != y).sum()) == 500 and set(flipped.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("dataset", ["polynomial", "linear", "breast_cancer"])
def test_standardisation_is_fitted_on_training_rows_only(dataset):
    splits = make_dataset(TrialConfig(dataset=dataset, n_train=50))
    np.testing.assert_allclose(splits.x_train.mean(0).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(splits.x_train.std(0, unbiased=False).numpy(), 1, atol=1e-4)
    assert not np.allclose(splits.x_val.mean(0).numpy(), 0, atol=1e-3)


CSV = "f1,f2,label,split\n" + "".join(
    f"{i},{(i * 7) % 5},{'ab'[i % 2]},{['train', 'train', 'train', 'val', 'test'][i % 5]}\n" for i in range(50))


def test_a_csv_with_a_split_column_is_split_as_given():
    config = TrialConfig(dataset=CsvDataset(csv="d.csv", target="label"))
    splits = make_dataset(config, csv_content=CSV.encode())
    assert splits.x_train.shape == (30, 2) and splits.x_val.shape == (10, 2) and splits.x_test.shape == (10, 2)
    assert (splits.task, splits.n_outputs, splits.class_names) == ("classification", 2, ("a", "b"))
    raw_val = splits.x_val * splits.feature_std + splits.feature_mean
    assert sorted(raw_val[:, 0].round().int().tolist()) == [i for i in range(50) if i % 5 == 3]
    capped = make_dataset(config.model_copy(update={"n_train": 12}), csv_content=CSV.encode())
    assert capped.x_train.shape == (12, 2)


def test_a_csv_without_a_split_column_is_split_by_fractions():
    text = "x,y\n" + "".join(f"{i},{i * 0.5}\n" for i in range(40))
    config = TrialConfig(dataset=CsvDataset(csv="d.csv", target="y"), val_fraction=0.25, test_fraction=0.25)
    splits = make_dataset(config, csv_content=text.encode())
    assert (len(splits.x_train), len(splits.x_val), len(splits.x_test)) == (20, 10, 10)
    assert splits.task == "regression" and splits.truth is None


def test_a_csv_with_missing_mean_fills_with_the_training_mean():
    text = "x,y,split\n1,0,train\n3,1,train\n,0,val\n5,1,val\n"
    config = TrialConfig(dataset=CsvDataset(csv="d.csv", target="y", missing="mean"))
    splits = make_dataset(config, csv_content=text.encode())
    raw_val = splits.x_val * splits.feature_std + splits.feature_mean
    assert raw_val[:, 0].tolist() == pytest.approx([2.0, 5.0])


def test_a_csv_config_without_content_says_so():
    with pytest.raises(ValueError, match="pass its bytes as csv_content"):
        make_dataset(TrialConfig(dataset=CsvDataset(csv="d.csv", target="y")))
