"""Users' CSV data sets: validated at submit, stored by content, parsed the same way by the worker.

A CSV data set is comma-separated UTF-8 text with a header row. The ``target`` column is what the
model predicts (a list of columns, each holding only 0 and 1, makes a multi-label target: one
yes/no label per column, at most ``MAX_LABELS``); the optional ``split_column`` (default ``split``)
says train/val/test per row and is used as given when the file has it; every other column is a
numeric feature. Missing cells are an empty cell or NaN, NA, N/A, null, none (any case). Lines are
counted as in an editor: the header is line 1.

At submit :func:`validate_csv` checks the file and :func:`store_dataset` writes its bytes (gzip) to
the ``datasets`` table under their sha256; the trial's config then carries that hash. The worker
gets the *decompressed* bytes from :func:`load_dataset_content` and calls :func:`parse_csv`, the
same parser that validated them. Every problem a user can cause is a :class:`DatasetError` whose
message is one sentence naming the file, the column and/or line, and the fix.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import ValidationError

from services.paths import confine_csv_path
from services.trial_config import MAX_LABELS, CsvDataset, TrialConfig

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from services.config import Settings

SPLITS = ("train", "val", "test")
MISSING_CELLS = frozenset({"", "nan", "na", "n/a", "null", "none"})  # compared lower-cased
MAX_CLASS_INTEGERS = 20  # task auto: an integer target with at most this many values is a class label


class DatasetError(ValueError):
    """A CSV data set a user got wrong; the message is one sentence naming the file and the fix."""


@dataclass(frozen=True)
class CsvLimits:
    """Caps on a CSV data set, from FITSCOPE_MAX_CSV_BYTES, _ROWS and _COLUMNS."""

    max_bytes: int
    max_rows: int
    max_columns: int
    # Where a spec's CSV paths may point (services/paths.py): its own folder, this one, or anywhere.
    data_root: Path | None = None
    any_path: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> CsvLimits:
        return cls(max_bytes=settings.max_csv_bytes, max_rows=settings.max_csv_rows,
                   max_columns=settings.max_csv_columns, data_root=settings.data_root,
                   any_path=settings.allow_any_csv_path)


@dataclass(frozen=True)
class CsvTable:
    """A parsed CSV data set, ready to split.

    ``features`` is float64 [N, F], NaN only where ``missing: mean`` left a cell to fill; ``target``
    is int64 class indices (into ``classes``, sorted labels) or float64 values; or, for a list of
    target columns (``multilabel``), int64 0/1 [N, labels] with ``classes`` the label columns' names;
    ``split`` is "train"/"val"/"test" per row, or None when the rows are split by fractions.
    """

    columns: tuple[str, ...]
    feature_names: tuple[str, ...]
    features: np.ndarray
    target: np.ndarray
    task: str  # "classification" | "regression"
    classes: tuple[str, ...]  # () for regression
    split: np.ndarray | None
    file_rows: int  # data rows in the file, before missing: drop_rows
    multilabel: bool = False  # target holds one 0/1 column per label

    @property
    def n_rows(self) -> int:
        return len(self.target)


@dataclass(frozen=True)
class ValidatedCsv:
    """A CSV file that passed validation: its bytes, their hash and the parsed table."""

    name: str  # the path as given in the spec
    sha256: str
    content: bytes
    table: CsvTable

    def training_rows(self, *, val_fraction: float, test_fraction: float) -> int:
        return self._split_sizes(val_fraction=val_fraction, test_fraction=test_fraction)[0]

    def validation_rows(self, *, val_fraction: float, test_fraction: float) -> int:
        return self._split_sizes(val_fraction=val_fraction, test_fraction=test_fraction)[1]

    def _split_sizes(self, *, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
        """(train, val, test) rows as the worker splits them (worker/training/data.py, _split_rows)."""
        if self.table.split is not None:
            return tuple(int(np.count_nonzero(self.table.split == name)) for name in ("train", "val", "test"))
        return fraction_sizes(self.table.n_rows, val_fraction=val_fraction, test_fraction=test_fraction)


def fraction_sizes(n: int, *, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) row counts for n rows split by fractions: val and test are rounded down
    (val at least 1), so training keeps at least n * (1 - val_fraction - test_fraction) rows."""
    n_val = max(1, math.floor(n * val_fraction))
    n_test = min(math.floor(n * test_fraction), max(0, n - n_val - 1))
    return n - n_val - n_test, n_val, n_test


def validate_csv(path: Path, spec: CsvDataset, *, max_bytes: int, max_rows: int, max_columns: int) -> ValidatedCsv:
    """Read and check the CSV at ``path`` (``spec.csv`` resolved); raises DatasetError."""
    try:
        if path.is_dir():
            raise DatasetError(f"CSV file {spec.csv!r} is a folder ({str(path)!r}); name a CSV file in it")
        if path.exists() and not path.is_file():
            raise DatasetError(f"CSV file {spec.csv!r} is not a regular file (a device, pipe or socket); "
                               "save the data as a CSV file and name that")
        if not path.is_file():
            raise DatasetError(f"CSV file {spec.csv!r} not found (looked for {str(path)!r}); a relative path is "
                               "read from the spec file's folder")
        size = path.stat().st_size
        if size > max_bytes:
            raise DatasetError(f"{spec.csv}: the file is {size} bytes, over the cap of {max_bytes} "
                               "(FITSCOPE_MAX_CSV_BYTES); use fewer rows or raise the cap")
        content = path.read_bytes()
    except OSError as exc:  # a name too long for the file system, no permission to read, ...
        raise DatasetError(f"CSV file {spec.csv[:100]!r} cannot be read ({exc.strerror}); check the path and "
                           "its permissions") from None
    table = parse_csv(content, spec, max_rows=max_rows, max_columns=max_columns)
    if (spec.split_column is not None and "split_column" in spec.model_fields_set
            and table.split is None):
        raise DatasetError(f"{spec.csv}: split column {spec.split_column!r} is not in the header; add it, or remove "
                           "split_column to split by val_fraction and test_fraction")
    return ValidatedCsv(name=spec.csv, sha256=hashlib.sha256(content).hexdigest(), content=content, table=table)


def parse_csv(content: bytes, spec: CsvDataset, *, max_rows: int | None = None,
              max_columns: int | None = None) -> CsvTable:
    """Parse CSV bytes by the rules in the module docstring; raises DatasetError."""
    name = spec.csv
    header, rows, lines = _read_rows(_decode(content, name), name, max_rows=max_rows, max_columns=max_columns)
    labels = spec.target if isinstance(spec.target, tuple) else None
    target_columns = _multilabel_indices(header, labels, spec, name) if labels is not None else [
        _target_index(header, spec.target, name)]
    shown_target = spec.target if labels is None else ", ".join(labels)
    split_at = header.index(spec.split_column) if spec.split_column in header else None
    if split_at in target_columns:
        raise DatasetError(f"{name}: column {header[split_at]!r} cannot be both the target and the split column; "
                           "set split_column to another column or to null")
    feature_at = [i for i in range(len(header)) if i not in target_columns and i != split_at]
    if not feature_at:
        raise DatasetError(f"{name}: there is no feature column besides the target {shown_target!r}; add at least "
                           "one numeric column to learn from")
    features, complete = _feature_values(rows, lines, header, feature_at, name=name, missing=spec.missing)
    for target_at in target_columns:
        for index, row in enumerate(rows):
            cell = row[target_at].strip()
            if cell.lower() in MISSING_CELLS:
                if spec.missing == "drop_rows":
                    complete[index] = False
                else:
                    fix = ("missing: mean fills only feature columns, so fill it or use missing: drop_rows"
                           if spec.missing == "mean" else "fill it, or set missing: drop_rows in the dataset mapping")
                    raise DatasetError(f"{name}: target column {header[target_at]!r} has a missing value ({cell!r}) "
                                       f"on line {lines[index]}; {fix}")
    keep = np.flatnonzero(complete)
    if len(keep) < 2:
        raise DatasetError(f"{name}: only {len(keep)} row(s) have no missing value, and a data set needs at least "
                           "2; fill the empty cells or use missing: mean")
    features = features[keep]
    if spec.missing == "mean":
        for column, values in zip(feature_at, features.T, strict=True):
            if np.isnan(values).all():
                raise DatasetError(f"{name}: column {header[column]!r} has no values at all; fill it or remove "
                                   "the column")
    if labels is None:
        target_at = target_columns[0]
        target, task, classes = _encode_target([rows[i][target_at].strip() for i in keep], [lines[i] for i in keep],
                                               spec=spec, name=name)
    else:
        target, task, classes = _multilabel_target(rows, lines, keep, target_columns, header=header, name=name), \
            "classification", tuple(labels)
    split = None
    if split_at is not None:
        split = _split_labels([rows[i][split_at] for i in keep], [lines[i] for i in keep],
                              column=header[split_at], name=name)
    return CsvTable(columns=tuple(header), feature_names=tuple(header[i] for i in feature_at), features=features,
                    target=target, task=task, classes=classes, split=split, file_rows=len(rows),
                    multilabel=labels is not None)


def resolve_csv_configs(configs: list[TrialConfig], *, base_dir: Path | None, limits: CsvLimits,
                        session: Session | None = None) -> list[TrialConfig]:
    """Validate every CSV data set the configs name (each once), store it when ``session`` is given,
    and return the configs with each CSV's ``sha256`` and decided ``task`` filled in."""
    validated: dict[CsvDataset, ValidatedCsv] = {}
    resolved: list[TrialConfig] = []
    for config in configs:
        dataset = config.dataset
        if not isinstance(dataset, CsvDataset):
            resolved.append(config)
            continue
        if dataset not in validated:
            path = _csv_path(dataset.csv, base_dir)
            if base_dir is not None:  # a spec file's paths stay in its folder; code that passes no folder is trusted
                confine_csv_path(dataset.csv, path, spec_dir=base_dir, data_root=limits.data_root,
                                 any_path=limits.any_path)
            validated[dataset] = validate_csv(path, dataset, max_bytes=limits.max_bytes, max_rows=limits.max_rows,
                                              max_columns=limits.max_columns)
            if session is not None:
                store_dataset(session, validated[dataset])
        resolved.append(_with_stored_dataset(config, validated[dataset]))
    return resolved


def _csv_path(name: str, base_dir: Path | None) -> Path:
    try:
        path = Path(name).expanduser()
    except RuntimeError:  # ~someone, and this machine has no such user
        raise DatasetError(f"CSV file {name!r} starts with a ~ that names no home folder on this machine; "
                           "give the path from / or from the spec file's folder") from None
    return path if path.is_absolute() else (base_dir or Path.cwd()) / path


def _with_stored_dataset(config: TrialConfig, validated: ValidatedCsv) -> TrialConfig:
    table = validated.table
    available = validated.training_rows(val_fraction=config.val_fraction, test_fraction=config.test_fraction)
    if config.n_train is not None and config.n_train > available:
        raise DatasetError(f"{validated.name}: n_train {config.n_train} is more than its {available} training rows; "
                           f"use n_train of at most {available}")
    if config.folds is not None:  # k-fold re-deals the training and validation rows (worker's fold_rows)
        pool = min(available, config.train_size or available) + validated.validation_rows(
            val_fraction=config.val_fraction, test_fraction=config.test_fraction)
        if pool < config.folds:
            raise DatasetError(f"{validated.name}: folds {config.folds} needs at least {config.folds} training and "
                               f"validation rows, but it has {pool}; use at most {pool} folds or more rows")
    if config.loss == "bce" and len(table.classes) != 2 and not table.multilabel:
        raise DatasetError(f"{validated.name}: loss 'bce' needs two classes but target {config.dataset.target!r} "
                           f"has {len(table.classes) or 'none (regression)'}; use cross_entropy or auto")
    dataset = config.dataset.model_copy(update={"sha256": validated.sha256, "task": table.task})
    try:  # validate again: the decided task may not fit the trial's loss
        return TrialConfig.model_validate({**config.model_dump(), "dataset": dataset.model_dump()})
    except ValidationError as exc:
        message = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise DatasetError(f"{validated.name}: {message}") from None


def store_dataset(session: Session, validated: ValidatedCsv) -> str:
    """Insert the file's bytes (gzip) under their sha256 unless that row exists; never commits."""
    from services.db import insert_if_absent
    from services.models import Dataset, utcnow

    if session.get(Dataset, validated.sha256) is None:  # skip compressing a file we already have
        insert_if_absent(session, Dataset, {
            "sha256": validated.sha256, "name": Path(validated.name).name[:300],
            "n_rows": validated.table.file_rows, "n_columns": len(validated.table.columns),
            "columns": list(validated.table.columns), "size_bytes": len(validated.content),
            "content": gzip.compress(validated.content, mtime=0), "created_at": utcnow(),
        })
    return validated.sha256


def load_dataset_content(session: Session, sha256: str) -> bytes:
    """The stored file's original (decompressed) bytes."""
    from services.models import Dataset

    row = session.get(Dataset, sha256)
    if row is None:
        raise DatasetError(f"data set {sha256} is not in the database; submit the spec that names it again")
    return gzip.decompress(row.content)


def _show(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _decode(content: bytes, name: str) -> str:
    if not content.strip():
        raise DatasetError(f"{name}: the file is empty; give it a header row and at least 2 data rows")
    if content.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DatasetError(f"{name}: the file is UTF-16 text, not UTF-8; save it as UTF-8 "
                           "(e.g. Excel's 'CSV UTF-8' format)")
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{name}: the file is not UTF-8 text (byte 0x{content[exc.start]:02x} at offset "
                           f"{exc.start} is invalid); save it as UTF-8") from None
    if "\x00" in text:
        raise DatasetError(f"{name}: the file contains NUL bytes, so it is UTF-16 or binary rather than UTF-8 "
                           "text; save it as UTF-8 CSV")
    return text


def _read_rows(text: str, name: str, *, max_rows: int | None,
               max_columns: int | None) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, data rows and each row's line number; blank lines are skipped."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if header is None:
                header = _check_header(row, name, max_columns=max_columns)
                continue
            if len(row) != len(header):
                raise DatasetError(f"{name}: line {reader.line_num} has {len(row)} cells but the header has "
                                   f"{len(header)}; give every row one cell per column (quote cells that "
                                   "contain commas)")
            if max_rows is not None and len(rows) >= max_rows:
                raise DatasetError(f"{name}: the file has more than {max_rows} data rows, over the cap "
                                   "(FITSCOPE_MAX_CSV_ROWS); use fewer rows or raise the cap")
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise DatasetError(f"{name}: line {reader.line_num} is not valid CSV ({exc}); check its quotes") from None
    assert header is not None  # an all-blank file was refused as empty
    if not rows:
        raise DatasetError(f"{name}: the file has a header but no data rows; add at least 2 rows")
    if len(rows) == 1:
        raise DatasetError(f"{name}: the file has only 1 data row; a data set needs at least 2 "
                           "(one to train on, one to validate)")
    return header, rows, lines


def _check_header(row: list[str], name: str, *, max_columns: int | None) -> list[str]:
    header = [cell.strip() for cell in row]
    if max_columns is not None and len(header) > max_columns:
        raise DatasetError(f"{name}: the file has {len(header)} columns, over the cap of {max_columns} "
                           "(FITSCOPE_MAX_CSV_COLUMNS); drop columns or raise the cap")
    if len(header) == 1:
        separator = next((s for s in (";", "\t", "|") if s in header[0]), None)
        if separator:
            raise DatasetError(f"{name}: the columns are separated by {separator!r}, not commas; save the file "
                               "as comma-separated CSV")
        raise DatasetError(f"{name}: the file has a single column {_show(header[0])}; a data set needs the "
                           "target plus at least one feature column")
    seen: dict[str, int] = {}
    for number, column in enumerate(header, start=1):
        if not column:
            raise DatasetError(f"{name}: column {number} of the header has no name; name every column")
        if column in seen:
            raise DatasetError(f"{name}: column name {_show(column)} appears twice in the header (columns "
                               f"{seen[column]} and {number}); rename one")
        seen[column] = number
    return header


def _target_index(header: list[str], target: str, name: str) -> int:
    if target in header:
        return header.index(target)
    close = [c for c in header if c.lower() == target.lower()]
    close += [c for c in difflib.get_close_matches(target, header, n=3, cutoff=0.6) if c not in close]
    if close:
        hint = f"did you mean {', '.join(_show(c) for c in close)}?"
    else:
        shown = ", ".join(_show(c) for c in header[:10]) + (", ..." if len(header) > 10 else "")
        hint = f"the columns are {shown}"
    raise DatasetError(f"{name}: target column {_show(target)} is not in the header; {hint}")


def _multilabel_indices(header: list[str], labels: tuple[str, ...], spec: CsvDataset, name: str) -> list[int]:
    """The columns of a multi-label target list, checked: at least one, each once, at most MAX_LABELS."""
    if not labels:
        raise DatasetError(f"{name}: target is an empty list; name the 0/1 label columns, e.g. target: [a, b]")
    if spec.task == "regression":
        raise DatasetError(f"{name}: target lists {len(labels)} columns but task is regression; a list of target "
                           "columns is multi-label classification, so use task: auto or classification")
    repeated = next((label for label in labels if labels.count(label) > 1), None)
    if repeated is not None:
        raise DatasetError(f"{name}: target lists column {_show(repeated)} more than once; list each label "
                           "column once")
    if len(labels) > MAX_LABELS:
        raise DatasetError(f"{name}: target lists {len(labels)} columns, over the cap of {MAX_LABELS} labels; "
                           f"keep at most {MAX_LABELS} label columns")
    return [_target_index(header, label, name) for label in labels]


def _multilabel_target(rows: list[list[str]], lines: list[int], keep: np.ndarray, columns: list[int], *,
                       header: list[str], name: str) -> np.ndarray:
    """int64 0/1 [rows kept, labels]: each label column must hold only 0 or 1 (1.0 and 0.0 too)."""
    target = np.empty((len(keep), len(columns)), dtype=np.int64)
    for c, column in enumerate(columns):
        for r, index in enumerate(keep):
            number = _number(rows[index][column].strip())
            if number not in (0.0, 1.0):
                # The cell itself is never echoed: a CSV file's contents stay out of messages and logs.
                raise DatasetError(f"{name}: target column {_show(header[column])} has a value other than 0 or 1 "
                                   f"on line {lines[index]}; a multi-label target column holds 1 (the label "
                                   "applies) or 0 (it does not) in every row")
            target[r, c] = int(number)
    return target


def _feature_values(rows: list[list[str]], lines: list[int], header: list[str], feature_at: list[int], *,
                    name: str, missing: str) -> tuple[np.ndarray, list[bool]]:
    """Feature cells as float64 (NaN where missing) and, per row, whether all its features are present."""
    values = np.empty((len(rows), len(feature_at)), dtype=np.float64)
    complete = [True] * len(rows)
    for r, row in enumerate(rows):
        for c, column in enumerate(feature_at):
            cell = row[column].strip()
            if cell.lower() in MISSING_CELLS:
                if missing == "error":
                    raise DatasetError(f"{name}: column {_show(header[column])} has a missing value ({cell!r}) on "
                                       f"line {lines[r]}; fill it, or set missing: drop_rows or missing: mean in "
                                       "the dataset mapping")
                complete[r] = complete[r] and missing != "drop_rows"
                values[r, c] = math.nan
                continue
            try:
                number = float(cell)
            except ValueError:
                # The cell itself is never echoed: a CSV file's contents stay out of messages and logs.
                raise DatasetError(f"{name}: column {_show(header[column])} has text on line {lines[r]}, but "
                                   "feature columns must hold numbers (a decimal comma?); fix the cell or remove "
                                   "the column") from None
            if not math.isfinite(number):
                raise DatasetError(f"{name}: column {_show(header[column])} has the infinite value {_show(cell)} "
                                   f"on line {lines[r]}; use a finite number")
            values[r, c] = number
    return values, complete


def _number(cell: str) -> float | None:
    try:
        number = float(cell)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _encode_target(cells: list[str], lines: list[int], *, spec: CsvDataset,
                   name: str) -> tuple[np.ndarray, str, tuple[str, ...]]:
    numbers = [_number(cell) for cell in cells]
    numeric = all(n is not None for n in numbers)
    task = spec.task
    if task == "auto":
        whole = numeric and all(float(n).is_integer() for n in numbers)
        task = "classification" if not numeric or (whole and len(set(numbers)) <= MAX_CLASS_INTEGERS) \
            else "regression"
    if task == "regression":
        if not numeric:
            index = next(i for i, n in enumerate(numbers) if n is None)
            raise DatasetError(f"{name}: target column {_show(spec.target)} has text on line {lines[index]} "
                               "but task is regression; fix the cell or use task: classification")
        return np.asarray(numbers, dtype=np.float64), task, ()
    if numeric:  # 1 and 1.0 are one class; sort numerically so that 2 comes before 10
        labels = sorted(set(numbers))
        index = {label: i for i, label in enumerate(labels)}
        target = np.asarray([index[n] for n in numbers], dtype=np.int64)
        classes = tuple(str(int(v)) if float(v).is_integer() else repr(v) for v in labels)
    else:
        classes = tuple(sorted(set(cells)))
        index = {label: i for i, label in enumerate(classes)}
        target = np.asarray([index[cell] for cell in cells], dtype=np.int64)
    if len(classes) < 2:
        raise DatasetError(f"{name}: target column {_show(spec.target)} has a single class "
                           f"{_show(classes[0])}; a classifier needs at least two classes")
    return target, task, classes


def _split_labels(cells: list[str], lines: list[int], *, column: str, name: str) -> np.ndarray:
    labels = [cell.strip().lower() for cell in cells]
    for index, label in enumerate(labels):
        if label not in SPLITS:
            raise DatasetError(f"{name}: split column {_show(column)} has {_show(cells[index])} on line "
                               f"{lines[index]}; use only train, val or test (or set split_column: null to split "
                               "by val_fraction and test_fraction)")
    split = np.asarray(labels)
    for needed, why in (("train", "to train on"), ("val", "to validate on")):
        if not np.any(split == needed):
            raise DatasetError(f"{name}: split column {_show(column)} has no {needed} rows; mark some rows "
                               f"{needed} {why}")
    return split
