"""Everything the dashboard writes: submit (with the New experiment page's live preview of a spec, its
CSV upload and its submitter/tags/note fields), cancel and re-queue, each recorded as the signed-in
user (dashboard/signin.py) when there is one. Each write is the one in
services.actions that `fitscope submit`, `cancel` and `requeue` call: the broker checked first, one
transaction, the messages after the commit, the same sentences.

dashboard/data.py keeps the reads; this module reuses its engine and schema check, so a database
that cannot be used stops the page with the same sentence as everywhere else, and clears its cached
reads after every write.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
from celery import Celery

from dashboard import signin
from dashboard.data import _engine, _forget_reads, _reading, _ready_url, settings
from services import actions
from services.admission import check_admission
from services.config import Settings
from services.datasets import (
    CsvLimits,
    DatasetError,
    load_dataset_content,
    resolve_csv_configs,
    store_dataset,
    validate_csv,
)
from services.db import session_scope
from services.queue import make_celery
from services.spec import UNTITLED, GridSpec, SpecError, count_trials, expand, parse_spec
from services.submission import (
    MAX_NOTE_CHARS,
    MAX_TAG_CHARS,  # noqa: F401  (the page's help text reads it from here)
    MAX_TAGS,
    Submitted,
    tag_problem,
    unique_tags,
)
from services.trial_config import CsvDataset

MAX_SUBMITTER_CHARS = 200
BROKER_TIMEOUT_S = 3.0  # a page waits this long for a broker that does not answer


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


@st.cache_resource(show_spinner=False)
def _producer(broker_url: str, _settings: Settings) -> Celery:
    return make_celery(_settings, name="fitscope-dashboard")


def default_submitter() -> str:
    """Who acts from this page: the signed-in user; without sign-in FITSCOPE_SUBMITTED_BY, else the
    dashboard process's login name (what the CLI records)."""
    return signin.identity() or actions.default_submitter(settings()) or ""


def signed_in() -> bool:
    """Whether writes are recorded as the signed-in user (who then cannot type another name)."""
    return signin.identity() is not None


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
                        current.max_trials_per_experiment, CsvLimits.from_settings(current),
                        current.max_trial_memory_mb)


@st.cache_data(max_entries=64, show_spinner=False)
def _preview(url: str, spec_text: str, uploads: tuple[tuple[str, str], ...], max_spec_bytes: int,
             max_trials: int, csv_limits: CsvLimits, max_trial_memory_mb: int) -> SpecPreview:
    spec = None
    try:
        spec = parse_spec(spec_text, max_bytes=max_spec_bytes, default_name=UNTITLED)
        configs = expand(spec, max_trials=max_trials)
        with _csv_folder(url, spec, dict(uploads)) as folder:
            configs = resolve_csv_configs(configs, base_dir=folder, limits=csv_limits)
        if problems := check_admission(configs, cap_mb=max_trial_memory_mb):  # as submit will refuse them
            raise SpecError(problems)
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
    with actions.writing(_engine(url)), session_scope(_engine(url)) as session:
        store_dataset(session, validated)
    return StoredCsv(name=name, sha256=validated.sha256, target=dataset.target, missing=missing,
                     rows=validated.table.n_rows, columns=validated.table.columns, task=validated.table.task)


def submit(*, spec_text: str, submitted_by: str | None, tags: list[str], note: str | None,
           uploads: dict[str, str]) -> Submitted:
    """`fitscope submit` from the page (services.actions.submit); a spec without a name is called
    "untitled". When someone is signed in, they are the submitter, whatever ``submitted_by`` says.
    Raises SpecError, DatasetError, BrokerUnreachable or DatabaseUnreachable (nothing written), or
    services.actions.NotQueued (written, not queued)."""
    current = settings()
    submitted_by = signin.identity() or submitted_by
    spec = parse_spec(spec_text, max_bytes=current.max_spec_bytes, default_name=UNTITLED)
    url = _ready_url()
    try:
        with _csv_folder(url, spec, uploads) as folder:
            return actions.submit(_engine(url), _producer(current.effective_broker_url, current), spec=spec,
                                  spec_text=spec_text, settings=current, submitted_by=submitted_by, tags=tags,
                                  note=note, base_dir=folder, broker_timeout_s=BROKER_TIMEOUT_S)
    finally:
        _forget_reads()


def cancel(experiment_id: int) -> actions.Cancelled:
    """`fitscope cancel` from the page: queued trials cancelled now, running ones asked to stop.
    Raises ExperimentNotFound or DatabaseUnreachable with one sentence."""
    url = settings().effective_database_url
    try:
        return actions.cancel(_engine(url), experiment_id=experiment_id, cancelled_by=default_submitter() or None)
    finally:
        _forget_reads()


def requeue(experiment_id: int) -> actions.Requeued:
    """`fitscope requeue` from the page: the failed and cancelled trials back in the queue. Raises
    BrokerUnreachable (NotQueued when the rows were reset), ExperimentNotFound or DatabaseUnreachable."""
    current = settings()
    try:
        return actions.requeue(_engine(current.effective_database_url),
                               _producer(current.effective_broker_url, current), experiment_id=experiment_id,
                               settings=current, requeued_by=default_submitter() or None,
                               broker_timeout_s=BROKER_TIMEOUT_S)
    finally:
        _forget_reads()


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


