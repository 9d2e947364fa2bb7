"""CSV data sets: a corpus of bad files, each refused with one sentence naming the problem and the fix,
and the parsing rules the worker shares with validation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from services.datasets import (
    CsvLimits,
    DatasetError,
    fraction_sizes,
    parse_csv,
    resolve_csv_configs,
    validate_csv,
)
from services.trial_config import CsvDataset, TrialConfig

LIMITS = {"max_bytes": 100_000, "max_rows": 1000, "max_columns": 50}
GOOD = "a,b,y\n1,2,0\n3,4,1\n5,6,0\n7,8,1\n"


# (file bytes, dataset options, expected substring); each must raise DatasetError with one line.
BAD_FILES: dict[str, tuple[bytes, dict, str]] = {
    "empty": (b"", {}, "the file is empty"),
    "only_whitespace": (b"\n \n\n", {}, "the file is empty"),
    "header_only": (b"a,b,y\n", {}, "a header but no data rows"),
    "one_row": (b"a,b,y\n1,2,0\n", {}, "only 1 data row"),
    "latin1": ("a,b,y\n1,2,café\n3,4,thé\n".encode("latin-1"), {}, "not UTF-8 text (byte 0xe9"),
    "utf16_bom": (GOOD.encode("utf-16"), {}, "UTF-16 text, not UTF-8"),
    "utf16_no_bom": (GOOD.encode("utf-16-le"), {}, "contains NUL bytes"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", {}, "not UTF-8 text"),
    "ragged_short": (b"a,b,y\n1,2,0\n3,4\n5,6,1\n", {}, "line 3 has 2 cells but the header has 3"),
    "ragged_long": (b"a,b,y\n1,2,0\n3,4,1,9\n", {}, "line 3 has 4 cells but the header has 3"),
    "text_in_feature": (b"a,b,y\n1,2,0\n3,abc,1\n", {}, "column 'b' has text on line 3"),
    "comma_decimal": (b'a,b,y\n1,"2,5",0\n3,4,1\n', {}, "column 'b' has text on line 2"),
    "infinite_feature": (b"a,b,y\n1,inf,0\n3,4,1\n", {}, "infinite value 'inf' on line 2"),
    "empty_cell": (b"a,b,y\n1,2,0\n3,,1\n", {}, "column 'b' has a missing value ('') on line 3"),
    "nan_cell": (b"a,b,y\n1,NaN,0\n3,4,1\n", {}, "column 'b' has a missing value ('NaN') on line 2"),
    "target_missing_cell": (b"a,b,y\n1,2,0\n3,4,\n", {}, "target column 'y' has a missing value"),
    "target_missing_cell_mean": (b"a,b,y\n1,2,0\n3,4,\n5,6,1\n", {"missing": "mean"}, "missing: mean fills only"),
    "drop_rows_leaves_one": (b"a,b,y\n1,,0\n3,4,1\n5,,0\n", {"missing": "drop_rows"}, "only 1 row(s) have no"),
    "all_missing_column_mean": (b"a,b,y\n1,,0\n3,,1\n", {"missing": "mean"}, "column 'b' has no values at all"),
    "missing_target_column": (b"a,b,label\n1,2,0\n3,4,1\n", {}, "target column 'y' is not in the header"),
    "target_wrong_case": (b"a,b,Y\n1,2,0\n3,4,1\n", {}, "did you mean 'Y'?"),
    "duplicate_column": (b"a,a,y\n1,2,0\n3,4,1\n", {}, "column name 'a' appears twice in the header (columns 1 and 2)"),
    "empty_column_name": (b"a,,y\n1,2,0\n3,4,1\n", {}, "column 2 of the header has no name"),
    "semicolons": (b"a;b;y\n1;2;0\n3;4;1\n", {}, "separated by ';', not commas"),
    "single_column": (b"y\n0\n1\n", {}, "a single column 'y'"),
    "only_target_and_split": (b"y,split\n0,train\n1,val\n", {}, "no feature column besides the target"),
    "bad_split_value": (b"a,y,split\n1,0,train\n2,1,valid\n3,0,val\n", {},
                        "split column 'split' has 'valid' on line 3"),
    "empty_split_value": (b"a,y,split\n1,0,train\n2,1,\n", {}, "split column 'split' has '' on line 3"),
    "no_train_rows": (b"a,y,split\n1,0,val\n2,1,test\n", {}, "has no train rows"),
    "no_val_rows": (b"a,y,split\n1,0,train\n2,1,train\n", {}, "has no val rows"),
    "single_class": (b"a,b,y\n1,2,cat\n3,4,cat\n", {}, "has a single class 'cat'"),
    "text_target_regression": (b"a,y\n1,2.5\n2,cat\n", {"task": "regression"},
                               "has text on line 3 but task is regression"),
    "unclosed_quote": (b'a,b,y\n1,"2,0\n3,4,1\n', {}, "is not valid CSV"),
    "too_many_columns": ((",".join(f"c{i}" for i in range(60)) + ",y\n" + "1," * 60 + "0\n").encode(), {},
                         "61 columns, over the cap of 50 (FITSCOPE_MAX_CSV_COLUMNS)"),
    "too_many_rows": (("a,y\n" + "1,0\n" * 1001).encode(), {}, "more than 1000 data rows"),
    "split_column_named_but_absent": (GOOD.encode(), {"split_column": "fold"},
                                      "split column 'fold' is not in the header"),
    "target_is_split_column": (b"a,split\n1,train\n2,val\n", {"target": "split"},
                               "both the target and the split column"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_csv_is_refused_with_one_sentence(tmp_path: Path, case: str):
    content, options, expected = BAD_FILES[case]
    path = tmp_path / f"{case}.csv"
    path.write_bytes(content)
    spec = CsvDataset(csv=f"{case}.csv", **{"target": "y", **options})
    with pytest.raises(DatasetError) as error:
        validate_csv(path, spec, **LIMITS)
    message = str(error.value)
    assert expected in message, message
    assert "\n" not in message and message.startswith(f"{case}.csv: "), message


def test_the_corpus_is_large():
    assert len(BAD_FILES) >= 25


def test_a_missing_file_names_where_it_looked(tmp_path: Path):
    with pytest.raises(DatasetError, match=r"CSV file 'nope.csv' not found .*relative path is read from the spec"):
        validate_csv(tmp_path / "nope.csv", CsvDataset(csv="nope.csv", target="y"), **LIMITS)


def test_a_file_over_the_size_cap_is_refused_before_reading(tmp_path: Path):
    path = tmp_path / "big.csv"
    path.write_text(GOOD + "9,9,1\n" * 20_000)
    with pytest.raises(DatasetError, match=r"big.csv: the file is \d+ bytes, over the cap of 100000 "
                                           r"\(FITSCOPE_MAX_CSV_BYTES\)"):
        validate_csv(path, CsvDataset(csv="big.csv", target="y"), **LIMITS)


def test_a_million_columns_is_refused_by_the_column_cap(tmp_path: Path):
    path = tmp_path / "wide.csv"
    path.write_text(",".join(f"c{i}" for i in range(1_000_000)) + ",y\n")
    with pytest.raises(DatasetError, match="1000001 columns, over the cap of 1000"):
        validate_csv(path, CsvDataset(csv="wide.csv", target="y"), max_bytes=50_000_000, max_rows=10,
                     max_columns=1000)


def test_a_good_file_is_parsed_hashed_and_a_constant_feature_is_fine(tmp_path: Path):
    text = "\ufeffa, const ,y,split\n1,5,b,train\n2,5,a,train\n\n3,5,b,val\n4,5,a,test\n"
    path = tmp_path / "ok.csv"
    path.write_bytes(text.encode())
    validated = validate_csv(path, CsvDataset(csv="ok.csv", target="y"), **LIMITS)
    table = validated.table
    assert validated.sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert table.columns == ("a", "const", "y", "split") and table.feature_names == ("a", "const")
    assert table.task == "classification" and table.classes == ("a", "b")
    assert table.target.tolist() == [1, 0, 1, 0]
    assert table.split.tolist() == ["train", "train", "val", "test"]
    np.testing.assert_array_equal(table.features, [[1, 5], [2, 5], [3, 5], [4, 5]])


@pytest.mark.parametrize(("targets", "task", "classes"), [
    (["0", "1", "2", "10"], "classification", ("0", "1", "2", "10")),  # integers, sorted numerically
    (["1", "1.0", "2", "2"], "classification", ("1", "2")),
    ([str(i) for i in range(21)], "regression", ()),  # more than 20 distinct integers
    (["0.5", "1.5", "0.5", "2"], "regression", ()),
    (["yes", "no", "yes", "no"], "classification", ("no", "yes")),
])
def test_task_auto_decides_from_the_target(targets, task, classes):
    text = "x,t\n" + "".join(f"{i},{t}\n" for i, t in enumerate(targets))
    table = parse_csv(text.encode(), CsvDataset(csv="f.csv", target="t"))
    assert (table.task, table.classes) == (task, classes)


def test_missing_drop_rows_and_mean():
    text = b"a,b,y\n1,2,0\n,4,1\n5,nan,0\n7,8,1\n"
    dropped = parse_csv(text, CsvDataset(csv="f.csv", target="y", missing="drop_rows"))
    assert dropped.features.tolist() == [[1, 2], [7, 8]] and dropped.file_rows == 4
    kept = parse_csv(text, CsvDataset(csv="f.csv", target="y", missing="mean"))
    assert kept.n_rows == 4 and int(np.isnan(kept.features).sum()) == 2


def test_fraction_sizes_keep_the_training_share_and_one_val_row():
    assert fraction_sizes(1797, val_fraction=0.2, test_fraction=0.2) == (1079, 359, 359)
    assert fraction_sizes(2, val_fraction=0.2, test_fraction=0.2) == (1, 1, 0)
    for n in range(2, 200):
        train, val, test = fraction_sizes(n, val_fraction=0.25, test_fraction=0.3)
        assert train + val + test == n and train >= int(n * 0.45) and val >= 1 and train >= 1


def test_resolve_fills_sha256_and_task_and_checks_n_train(tmp_path: Path):
    (tmp_path / "d.csv").write_text("x,y\n" + "".join(f"{i},{i * 0.37}\n" for i in range(50)))
    limits = CsvLimits(**LIMITS)
    config = TrialConfig(dataset=CsvDataset(csv="d.csv", target="y"))
    [resolved] = resolve_csv_configs([config], base_dir=tmp_path, limits=limits)
    assert resolved.dataset.task == "regression" and resolved.resolved_loss == "mse"
    assert len(resolved.dataset.sha256) == 64
    with pytest.raises(DatasetError, match="n_train 40 is more than its 30 training rows"):
        resolve_csv_configs([config.model_copy(update={"n_train": 40})], base_dir=tmp_path, limits=limits)
    wrong_loss = TrialConfig(dataset=CsvDataset(csv="d.csv", target="y"), loss="cross_entropy")
    with pytest.raises(DatasetError, match="d.csv: loss 'cross_entropy' does not fit"):
        resolve_csv_configs([wrong_loss], base_dir=tmp_path, limits=limits)



def test_resolve_checks_folds_against_the_rows_the_worker_would_deal(tmp_path: Path):
    """A CSV with fewer training plus validation rows than folds is refused at submit, with the
    count the worker's split would give (it used to fail only in the worker, trial by trial)."""
    from worker.training.data import fold_rows

    (tmp_path / "d.csv").write_text("x,y\n" + "".join(f"{i},{i % 2}\n" for i in range(10)))
    limits = CsvLimits(**LIMITS)
    base = TrialConfig(dataset=CsvDataset(csv="d.csv", target="y"), folds=2, fold=1)
    # 10 rows: 2 validation, 2 test, 6 training; n_train 4 leaves 4 + 2 = 6 rows to deal
    for folds, n_train in ((6, 4), (8, None), (7, 4)):
        config = base.model_copy(update={"folds": folds, "n_train": n_train})
        pool = 6 if n_train == 4 else 8
        if folds <= pool:
            [resolved] = resolve_csv_configs([config], base_dir=tmp_path, limits=limits)
            assert resolved.folds == folds
            train, val = fold_rows(pool, folds=folds, fold=1, data_seed=0)  # the worker can deal them
            assert len(train) + len(val) == pool
        else:
            with pytest.raises(DatasetError, match=f"d.csv: folds {folds} needs at least {folds} training and "
                                                   f"validation rows, but it has {pool}; use at most {pool} folds"):
                resolve_csv_configs([config], base_dir=tmp_path, limits=limits)
            with pytest.raises(ValueError, match=f"there are {pool}"):
                fold_rows(pool, folds=folds, fold=1, data_seed=0)  # what the worker would have said


def test_the_spec_shorthand_names_a_csv_alone_or_among_values():
    from services.spec import expand, parse_spec

    alone = expand(parse_spec("name: s\nparameters:\n  dataset: {csv: d.csv, target: y, missing: mean}\n"))
    assert [c.dataset for c in alone] == [CsvDataset(csv="d.csv", target="y", missing="mean")]
    mixed = expand(parse_spec("name: s\nparameters:\n  dataset: {values: [{csv: d.csv, target: y}, moons]}\n"))
    assert [c.dataset_name for c in mixed] == ["csv:d.csv", "moons"]
