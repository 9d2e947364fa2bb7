"""The New experiment page's side of `fitscope validate` and `fitscope submit`: the live preview of a
spec (the CLI's parse, expansion and CSV checks, so the CLI's sentences), the CSV upload (checked
with submit's caps, stored in the database by its sha256), the submitter/tags/note fields, and the
submit itself (broker checked first, one transaction, messages after the commit).

Split from dashboard/data.py, which keeps the reads: this module is the only place the dashboard
writes an experiment. It reuses data.py's engine, schema check and error handling, so a database
that cannot be used stops the page with the same sentence as everywhere else.
"""

from __future__ import annotations

import getpass
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from dashboard.data import _engine, _forget_reads, _producer, _reading, _ready_url, _writing, settings
from services.datasets import (
    CsvLimits,
    DatasetError,
    load_dataset_content,
    resolve_csv_configs,
    store_dataset,
    validate_csv,
)
from services.db import session_scope
from services.queue import BrokerUnreachable, check_broker, enqueue_submission
from services.spec import GridSpec, SpecError, count_trials, expand, parse_spec
from services.submission import (
    MAX_NOTE_CHARS,
    MAX_TAG_CHARS,  # noqa: F401  (the page's help text reads it from here)
    MAX_TAGS,
    Submitted,
    tag_problem,
    unique_tags,
)
from services.submission import submit as submit_spec
from services.trial_config import CsvDataset

MAX_SUBMITTER_CHARS = 200


class FieldError(ValueError):
    """A submission field a user got wrong; the message is one sentence naming the field and the fix."""


@dataclass(frozen=True)
class SpecPreview:
    """What `fitscope validate` says about a spec: its trial count, or every problem as the CLI
    prints it (without the ``error: `` prefix), plus the warnings it prints either way."""

    name: str | None = None
    method: str | None = None
    seeds: int = 0
    trials: int | None = None
    warnings: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class StoredCsv:
    """An uploaded CSV data set that passed submit's checks and is stored in the database."""

    name: str  # what a spec calls it: {csv: NAME, target: ...}
    sha256: str
    target: str
    missing: str
    rows: int
    columns: tuple[str, ...]
    task: str


def default_submitter() -> str:
    """FITSCOPE_SUBMITTED_BY, else the dashboard process's login name (what the CLI records)."""
    if settings().submitted_by:
        return settings().submitted_by
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers
        return ""


def check_fields(*, submitted_by: str, tags_text: str, note: str) -> tuple[str | None, list[str], str | None]:
    """The submitter, the comma-separated tags (deduplicated) and the note, trimmed and held to
    their caps; raises FieldError naming the field."""
    for field, text in (("submitted by", submitted_by), ("tags", tags_text), ("note", note)):
        if "\x00" in text:
            raise FieldError(f"{field} contains a NUL character; remove it")
    submitter = submitted_by.strip()
    if len(submitter) > MAX_SUBMITTER_CHARS:
        raise FieldError(f"submitted by is {len(submitter)} characters long, over the limit of "
                         f"{MAX_SUBMITTER_CHARS}; shorten it")
    tags = unique_tags(tags_text.split(","))
    if len(tags) > MAX_TAGS:
        raise FieldError(f"tags: {len(tags)} given, over the limit of {MAX_TAGS}; keep the ones you will search by")
    for tag in tags:
        if problem := tag_problem(tag):
            raise FieldError(f"tags: {tag[:20]!r} {problem} (tags are separated by commas)")
    note = note.strip()
    if len(note) > MAX_NOTE_CHARS:
        raise FieldError(f"note is {len(note)} characters long, over the limit of {MAX_NOTE_CHARS}; shorten it")
    return submitter or None, tags, note or None


def preview(spec_text: str, uploads: dict[str, str]) -> SpecPreview:
    """What `fitscope validate` would print for ``spec_text``: the same parse, expansion and CSV
    checks, so the same sentences. ``uploads`` maps each CSV data set uploaded on the page (the
    only CSV files the dashboard reads) to its sha256."""
    current = settings()
    url = _ready_url()
    with _reading(url):
        return _preview(url, spec_text, tuple(sorted(uploads.items())), current.max_spec_bytes,
                        current.max_trials_per_experiment, CsvLimits.from_settings(current))


@st.cache_data(max_entries=64, show_spinner=False)
def _preview(url: str, spec_text: str, uploads: tuple[tuple[str, str], ...], max_spec_bytes: int,
             max_trials: int, csv_limits: CsvLimits) -> SpecPreview:
    spec = None
    try:
        spec = parse_spec(spec_text, max_bytes=max_spec_bytes)
        configs = expand(spec, max_trials=max_trials)
        with _csv_folder(url, spec, dict(uploads)) as folder:
            resolve_csv_configs(configs, base_dir=folder, limits=csv_limits)
    except (SpecError, DatasetError) as exc:
        problems = exc.problems if isinstance(exc, SpecError) else [str(exc)]
        return SpecPreview(name=spec and spec.name, warnings=tuple(spec.warnings if spec else ()),
                           problems=tuple(problems))
    return SpecPreview(name=spec.name, method=spec.method, seeds=len(spec.seeds), trials=count_trials(spec),
                       warnings=tuple(spec.warnings))


def store_csv(*, file_name: str, content: bytes, target: str, missing: str = "error") -> StoredCsv:
    """Check an uploaded CSV as `fitscope submit` checks a spec's CSV (the FITSCOPE_MAX_CSV_* caps,
    the same sentences) and store it in the database by its sha256. Raises DatasetError, and then
    writes nothing."""
    current = settings()
    name = Path(file_name.replace("\\", "/")).name.strip()[:200]
    if name in ("", ".", ".."):
        name = "data.csv"
    if not target.strip():
        raise DatasetError(f"{name}: choose the target column, the one the model should predict")
    try:
        dataset = CsvDataset(csv=name, target=target.strip(), missing=missing)
    except ValueError as exc:  # pydantic's ValidationError: a target name over 200 characters
        raise DatasetError(f"{name}: target {target[:40]!r} is not a usable column name "
                           f"({exc.errors()[0]['msg']}); rename the column") from None
    limits = CsvLimits.from_settings(current)
    with tempfile.TemporaryDirectory(prefix="fitscope-upload-") as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        validated = validate_csv(path, dataset, max_bytes=limits.max_bytes, max_rows=limits.max_rows,
                                 max_columns=limits.max_columns)
    url = _ready_url()
    with _writing(url), session_scope(_engine(url)) as session:
        store_dataset(session, validated)
    return StoredCsv(name=name, sha256=validated.sha256, target=dataset.target, missing=missing,
                     rows=validated.table.n_rows, columns=validated.table.columns, task=validated.table.task)


def submit(*, spec_text: str, submitted_by: str | None, tags: list[str], note: str | None,
           uploads: dict[str, str]) -> Submitted:
    """`fitscope submit` from the page: the broker is checked first, the experiment and its trials
    are written in one transaction, and services.queue.enqueue_submission sends the messages after
    the commit. Raises SpecError, DatasetError, BrokerUnreachable or DatabaseUnreachable; nothing is
    written when one of them is raised before the commit."""
    current = settings()
    spec = parse_spec(spec_text, max_bytes=current.max_spec_bytes)
    producer = _producer(current.effective_broker_url, current)
    check_broker(producer, timeout_s=3.0)  # before writing, so a dead broker leaves no orphan rows
    url = _ready_url()
    with _csv_folder(url, spec, uploads) as folder, _writing(url), session_scope(_engine(url)) as session:
        submitted = submit_spec(session, spec=spec, spec_text=spec_text, submitted_by=submitted_by,
                                max_trials=current.max_trials_per_experiment, base_dir=folder,
                                csv_limits=CsvLimits.from_settings(current), tags=tags, note=note)
    _forget_reads()
    try:
        enqueue_submission(producer, submitted)
    except Exception as exc:  # kombu raises several unrelated types for a broker that went away
        raise BrokerUnreachable(
            f"experiment {submitted.experiment_id} was saved but its trials could not be queued "
            f"({type(exc).__name__}); once the broker is back run `fitscope requeue {submitted.experiment_id} "
            "--status queued`"
        ) from None
    return submitted


@contextmanager
def _csv_folder(url: str, spec: GridSpec, uploads: dict[str, str]) -> Iterator[Path | None]:
    """A temporary folder holding the uploaded CSV data sets the spec names, for the checks that read
    files. A name that was not uploaded is refused: the dashboard never reads its server's files."""
    dataset = spec.parameters.get("dataset")
    names = sorted({value.csv for value in (dataset.values if dataset else ()) if isinstance(value, CsvDataset)})
    if not names:
        yield None
        return
    for name in names:
        if name not in uploads:
            raise DatasetError(f"{name}: the dashboard reads only CSV data sets uploaded on this page; upload it "
                               "under 'Your own data (CSV)', or name one that is uploaded")
    with tempfile.TemporaryDirectory(prefix="fitscope-csv-") as folder:
        with session_scope(_engine(url)) as session:
            for name in names:
                (Path(folder) / name).write_bytes(load_dataset_content(session, uploads[name]))
        yield Path(folder)


