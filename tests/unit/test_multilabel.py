"""Multi-label targets: a CSV's list of 0/1 columns and multilabel_2d train one sigmoid per label with
binary cross-entropy per label, against references no one here wrote (scikit-learn's one logistic
regression per label, torch's binary_cross_entropy_with_logits); bad label columns are one sentence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.multioutput import MultiOutputClassifier

from services.datasets import DatasetError, parse_csv
from services.trial_config import MAX_LABELS, CsvDataset, TrialConfig
from worker.training.data import make_dataset, multilabel_2d_labels
from worker.training.fused import train_trial
from worker.training.fused_results import MULTILABEL_ARTIFACT, per_trial_loss
from worker.training.losses import build_loss, measure
from worker.training.models import build_model


def _labelled_rows(n: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three features and three noisy linear labels (not separable, so C=inf has a finite optimum)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3))
    noise = rng.logistic(size=(n, 3))
    scores = np.stack([2 * x[:, 0] + x[:, 1], 1.5 * x[:, 1] - 2 * x[:, 2] - 0.5, x[:, 0] + x[:, 2] + 0.8], 1)
    return x, (scores + noise > 0).astype(int)


def _csv(x: np.ndarray, y: np.ndarray, *, val_rows: int = 60) -> bytes:
    # The validation rows repeat the first training rows: the best-validation epoch is then the
    # training optimum, the weights scikit-learn's fit is compared with.
    lines = ["x1,x2,x3,a,b,c,split"]
    for split, rows in (("train", range(len(x))), ("val", range(val_rows))):
        lines += [",".join([*(f"{v:.6f}" for v in x[i]), *(str(v) for v in y[i]), split]) for i in rows]
    return ("\n".join(lines) + "\n").encode()


def test_per_label_training_accuracy_matches_scikit_learns_logistic_regression_per_label() -> None:
    x, y = _labelled_rows()
    content = _csv(x, y)
    config = TrialConfig(dataset=CsvDataset(csv="labels.csv", target=("a", "b", "c")), model="linear",
                         optimizer="adam", lr=0.1, batch_size="full", epochs=150)
    result = train_trial(config, csv_content=content)

    reference = MultiOutputClassifier(LogisticRegression(C=np.inf, max_iter=10_000)).fit(x, y)
    expected = (reference.predict(x) == y).mean(axis=0)
    found = result.artifacts[MULTILABEL_ARTIFACT]
    assert found["labels"] == ["a", "b", "c"]
    np.testing.assert_allclose(found["best_label_accuracy"]["train"], expected, atol=0.02)
    # accuracy is the mean of the per-label accuracies; exact match asks every label of a row
    assert result.final_metrics["best_val_accuracy"] == pytest.approx(np.mean(found["best_label_accuracy"]["val"]))
    assert result.final_metrics["final_train_exact_match"] == pytest.approx(
        (reference.predict(x) == y).all(axis=1).mean(), abs=0.03)
    assert found["epoch"] == list(range(1, 151)) and len(found["train_exact_match"]) == 150


def test_the_reported_loss_is_torchs_bce_with_logits_per_label_averaged() -> None:
    config = TrialConfig(dataset="multilabel_2d", n_train=50, n_val=20, n_test=0, width=8, depth=1,
                         optimizer="sgd", momentum=0.0, lr=1e-9, batch_size="full", epochs=1, seed=3)
    rows = []
    train_trial(config, on_epoch=rows.append)
    splits = make_dataset(config)
    model = build_model(config, splits.n_features, splits.n_outputs, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # an SGD step of 1e-9 leaves the initial weights as they were, to float rounding
        expected = [F.binary_cross_entropy_with_logits(model(splits.x_train)[:, k], splits.y_train[:, k]).item()
                    for k in range(2)]
    assert rows[0].train_loss == pytest.approx(np.mean(expected), abs=1e-6)


def test_the_stacked_loss_and_metrics_are_torchs_per_row() -> None:
    generator = torch.Generator().manual_seed(0)
    output = torch.randn(4, 3, 50, generator=generator)  # [slots, labels, n]
    y = (torch.rand(50, 3, generator=generator) > 0.5).float()
    config = TrialConfig(dataset="multilabel_2d")
    stacked = per_trial_loss(config, "multilabel_bce")(output, y.expand(4, 50, 3))
    for slot in range(4):
        expected = F.binary_cross_entropy_with_logits(output[slot].T, y)
        assert stacked[slot].item() == pytest.approx(expected.item(), rel=1e-6)
        measured = measure(output[slot].T, y, loss_fn=build_loss(config, "multilabel_bce"), loss="multilabel_bce")
        right = (output[slot].T > 0).float() == y
        assert measured["accuracy"] == pytest.approx(right.float().mean(0).mean().item())
        assert measured["exact_match"] == pytest.approx(right.all(1).float().mean().item())


def test_multilabel_2d_labels_are_the_circle_and_the_line_of_each_clean_point() -> None:
    splits = make_dataset(TrialConfig(dataset="multilabel_2d", noise=0.0, n_train=400))
    raw = (splits.x_train * splits.feature_std + splits.feature_mean).double().numpy()
    assert splits.task == "multilabel" and splits.label_names == ("inside_circle", "above_line")
    np.testing.assert_array_equal(splits.y_train.numpy(), multilabel_2d_labels(raw))
    np.testing.assert_array_equal(multilabel_2d_labels(np.array([[0.0, 0.0], [0.9, -0.9], [-0.9, 0.9]])),
                                  [[1, 1], [0, 0], [0, 1]])
    shares = splits.y_train.mean(0).numpy()
    assert ((shares > 0.3) & (shares < 0.7)).all(), shares  # neither label is nearly always on or off


def test_a_single_target_column_still_trains_as_one_class_label() -> None:
    table = parse_csv(b"a,b,y\n1,2,0\n3,4,1\n5,6,0\n", CsvDataset(csv="d.csv", target="y"))
    assert not table.multilabel and table.classes == ("0", "1") and table.target.tolist() == [0, 1, 0]
    table = parse_csv(b"a,y,z\n1,0,1\n3,1,1.0\n5,0,0\n", CsvDataset(csv="d.csv", target=["y", "z"]))
    assert table.multilabel and table.classes == ("y", "z") and table.target.tolist() == [[0, 1], [1, 1], [0, 0]]


BAD_TARGETS = {
    "not_0_or_1": ("a,y,z\n1,0,1\n2,2,0\n3,1,0\n", ["y", "z"], {},
                   "d.csv: target column 'y' has a value other than 0 or 1 on line 3; a multi-label target column "
                   "holds 1 (the label applies) or 0 (it does not) in every row"),
    "text_label": ("a,y,z\n1,0,1\n2,1,yes\n3,1,0\n", ["y", "z"], {}, "target column 'z' has a value other than 0 or 1"),
    "repeated": ("a,y,z\n1,0,1\n2,1,0\n", ["y", "z", "y"], {},
                 "d.csv: target lists column 'y' more than once; list each label column once"),
    "absent": ("a,y,z\n1,0,1\n2,1,0\n", ["y", "Z"], {}, "target column 'Z' is not in the header; did you mean 'z'?"),
    "empty_list": ("a,y,z\n1,0,1\n2,1,0\n", [], {}, "target is an empty list; name the 0/1 label columns"),
    "regression": ("a,y,z\n1,0,1\n2,1,0\n", ["y", "z"], {"task": "regression"},
                   "target lists 2 columns but task is regression"),
    "split_is_a_label": ("a,y,split\n1,0,train\n2,1,val\n", ["y", "split"], {},
                         "column 'split' cannot be both the target and the split column"),
    "missing_label": ("a,y,z\n1,0,1\n2,,0\n", ["y", "z"], {}, "target column 'y' has a missing value ('') on line 3"),
}


@pytest.mark.parametrize("case", BAD_TARGETS)
def test_a_bad_label_column_is_one_sentence_naming_it_and_the_fix(case: str) -> None:
    content, target, options, expected = BAD_TARGETS[case]
    with pytest.raises(DatasetError) as raised:
        parse_csv(content.encode(), CsvDataset(csv="d.csv", target=target, **options))
    message = str(raised.value)
    assert expected in message and "\n" not in message
    assert "yes" not in message  # a cell's contents are never echoed


def test_more_labels_than_the_cap_is_refused() -> None:
    names = [f"l{k}" for k in range(MAX_LABELS + 1)]
    content = ",".join(["a", *names]) + "\n" + "\n".join(",".join(["1", *"0" * len(names)]) for _ in range(3))
    with pytest.raises(DatasetError, match=f"target lists {MAX_LABELS + 1} columns, over the cap of {MAX_LABELS} "
                                           "labels; keep at most"):
        parse_csv(content.encode(), CsvDataset(csv="d.csv", target=names))


def test_a_loss_other_than_bce_is_refused_for_multi_label_data() -> None:
    with pytest.raises(ValueError, match="loss 'cross_entropy' does not fit the multi-label data of multilabel_2d"):
        TrialConfig(dataset="multilabel_2d", loss="cross_entropy")
    assert TrialConfig(dataset="multilabel_2d", loss="bce").resolved_loss == "bce"
    assert TrialConfig(dataset="multilabel_2d").multilabel and not TrialConfig(dataset="moons").multilabel


def test_the_worker_admits_a_multilabel_2d_trial() -> None:
    from services.admission import claim_problem

    assert claim_problem(TrialConfig(dataset="multilabel_2d"), csv_shape=None) is None


def test_label_smoothing_on_multi_label_data_is_refused_naming_it():
    with pytest.raises(ValueError, match="leave label_smoothing at 0"):
        TrialConfig(dataset="multilabel_2d", label_smoothing=0.1)


def test_a_multi_label_linear_models_first_layer_has_one_row_per_label():
    from services.fine_tuning import first_layer_shape

    assert first_layer_shape(TrialConfig(dataset="multilabel_2d", model="linear")) == (2, 2)
    assert first_layer_shape(TrialConfig(dataset="moons", model="linear", loss="bce")) == (1, 2)
