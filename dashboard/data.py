"""Where the dashboard's pages get their data, and the two writes they trigger (cancel, re-queue).

Pages never see a session or SQL: they call the functions here, which wrap services.queries in
Streamlit caches (one engine per database URL for the process; query results for a couple of
seconds, so a live panel and several browser tabs share one read). A database that cannot be used
(bad settings, no schema, server down) stops the page with one sentence naming the fix.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import pandas as pd
import streamlit as st
from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from services.config import ConfigError, Settings, get_settings, redact_url
from services.db import DatabaseUnreachable, SchemaNotAtHead, make_engine, session_scope
from services.export import write_rows
from services.migrate import ensure_schema_at_head
from services.models import TrialStatus
from services.queries import ExperimentSummary, epoch_rows, get_experiment, list_experiments, trial_rows
from services.queue import BrokerUnreachable, check_broker, enqueue_trials, make_celery
from services.trial_config import TRIAL_PARAMETERS
from services.trials import EPOCH_METRIC_FIELDS, cancel_experiment, requeue_trials

REFRESH_SECONDS = 2  # live panels rerun this often; query results are cached as long
STATUSES = tuple(status.value for status in TrialStatus)
EXPERIMENT_COLUMNS = ("id", "name", "method", "submitted_by", "created_at", "trials", *STATUSES,
                      "ended", "epochs_done", "epochs_planned", "progress", "finished")
# Columns of services.queries.trial_rows that describe the run rather than a parameter or a metric.
TRIAL_FIELDS = ("trial_id", "ordinal", "status", "attempts", "worker", "epochs_done", "best_epoch",
                "started_at", "finished_at", "error")


# --- settings and connections -------------------------------------------------------------------

def settings() -> Settings:
    try:
        return get_settings()
    except ConfigError as exc:
        _stop(str(exc))


def database_label() -> str:
    """The database URL in force, password hidden."""
    return redact_url(settings().effective_database_url)


def broker_label() -> str:
    """The broker URL in force, password hidden."""
    return redact_url(settings().effective_broker_url)


@st.cache_resource(show_spinner=False, on_release=lambda engine: engine.dispose())
def _engine(url: str) -> Engine:
    return make_engine(url)


@st.cache_resource(show_spinner=False)
def _producer(broker_url: str, _settings: Settings) -> Celery:
    return make_celery(_settings, name="fitscope-dashboard")


@st.cache_data(ttl=30, show_spinner=False)
def _schema_checked(url: str) -> bool:
    # Only success is cached (an exception is not), so a fixed database is noticed on the next run.
    ensure_schema_at_head(_engine(url))
    return True


def _ready_url() -> str:
    """The database URL, once its schema is known to be at head; otherwise the page stops."""
    url = settings().effective_database_url
    try:
        _schema_checked(url)
    except (SchemaNotAtHead, DatabaseUnreachable) as exc:
        _stop(str(exc))
    return url


@contextmanager
def _reading(url: str) -> Iterator[None]:
    try:
        yield
    except OperationalError as exc:
        _schema_checked.clear()
        _ready_url()  # a schema problem or a dead server stops here with its own sentence
        _stop(f"could not read the database at {redact_url(url)} ({_reason(exc)}); "
              "check FITSCOPE_DATABASE_URL and that the database server is running")


# --- reads ----------------------------------------------------------------------------------------

def experiments(*, limit: int = 50) -> pd.DataFrame:
    """The newest ``limit`` experiments, one row each: EXPERIMENT_COLUMNS, with a count per status
    and ``progress`` as the fraction (0..1) of planned epochs done."""
    url = _ready_url()
    with _reading(url):
        return _experiments(url, limit)


def experiment(experiment_id: int) -> dict[str, Any] | None:
    """One experiment's row as in :func:`experiments`, or None when there is no such experiment."""
    url = _ready_url()
    with _reading(url):
        found = _experiment(url, experiment_id)
    return found.iloc[0].to_dict() if len(found) else None


def trials(experiment_id: int) -> pd.DataFrame:
    """One row per trial: TRIAL_FIELDS, every parameter of its config, and its final metrics."""
    url = _ready_url()
    with _reading(url):
        return _trials(url, experiment_id)


def epochs(experiment_id: int) -> pd.DataFrame:
    """One row per trial and epoch: trial_id, epoch, train/val loss and accuracy, lr, epoch_seconds."""
    url = _ready_url()
    with _reading(url):
        return _epochs(url, experiment_id)


def csv_export(experiment_id: int, what: str) -> Callable[[], str]:
    """A function that renders the experiment's ``trials`` or ``epochs`` as CSV text when called.

    Handed to st.download_button, so the export is read only when someone clicks the button,
    not on every refresh of the page.
    """
    url = _ready_url()
    read = trial_rows if what == "trials" else epoch_rows

    def render() -> str:
        with session_scope(_engine(url)) as session:
            rows = read(session, experiment_id)
        stream = io.StringIO()
        write_rows(rows, stream, "csv")
        return stream.getvalue()

    return render


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def _experiments(url: str, limit: int) -> pd.DataFrame:
    with session_scope(_engine(url)) as session:
        return _experiment_frame(list_experiments(session, limit=limit))


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def _experiment(url: str, experiment_id: int) -> pd.DataFrame:
    with session_scope(_engine(url)) as session:
        summary = get_experiment(session, experiment_id)
    return _experiment_frame([summary] if summary else [])


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def _trials(url: str, experiment_id: int) -> pd.DataFrame:
    with session_scope(_engine(url)) as session:
        rows = trial_rows(session, experiment_id)
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=[*TRIAL_FIELDS, *TRIAL_PARAMETERS])


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def _epochs(url: str, experiment_id: int) -> pd.DataFrame:
    with session_scope(_engine(url)) as session:
        rows = epoch_rows(session, experiment_id)
    return pd.DataFrame(rows, columns=["trial_id", "epoch", *EPOCH_METRIC_FIELDS])


def _experiment_frame(summaries: list[ExperimentSummary]) -> pd.DataFrame:
    rows = [
        {"id": s.id, "name": s.name, "method": s.method, "submitted_by": s.submitted_by,
         "created_at": s.created_at, "trials": s.trials, **{status: s.counts.get(status, 0) for status in STATUSES},
         "ended": s.ended, "epochs_done": s.epochs_done, "epochs_planned": s.epochs_planned,
         "progress": s.progress, "finished": s.finished}
        for s in summaries
    ]
    return pd.DataFrame(rows, columns=list(EXPERIMENT_COLUMNS))


# --- shaping trial tables -------------------------------------------------------------------------

def parameter_columns(trial_table: pd.DataFrame) -> list[str]:
    """The trial-config parameters present in a trials table, in TrialConfig's order."""
    return [name for name in TRIAL_PARAMETERS if name in trial_table.columns]


def varying_parameters(trial_table: pd.DataFrame) -> list[str]:
    """The parameters that take more than one value across the experiment's trials."""
    return [name for name in parameter_columns(trial_table) if trial_table[name].astype(str).nunique() > 1]


def metric_columns(trial_table: pd.DataFrame) -> list[str]:
    """The final-metric columns of a trials table (whatever the engine reported)."""
    known = set(TRIAL_FIELDS) | set(TRIAL_PARAMETERS)
    return [name for name in trial_table.columns if name not in known]


# --- writes the pages trigger ---------------------------------------------------------------------

def cancel(experiment_id: int) -> dict[str, int]:
    """Cancel the experiment's queued trials and ask its running ones to stop; returns
    ``{"cancelled": n, "stopping": m}``. Raises DatabaseUnreachable with one sentence."""
    url = settings().effective_database_url
    with _writing(url), session_scope(_engine(url)) as session:
        counts = cancel_experiment(session, experiment_id)
    _forget_reads()
    return counts


def requeue(experiment_id: int) -> int:
    """Put the experiment's failed and cancelled trials back in the queue; returns how many.

    The broker is checked first, so a dead one changes nothing; the messages go out only after the
    database commit. Raises BrokerUnreachable or DatabaseUnreachable with one sentence.
    """
    current = settings()
    producer = _producer(current.effective_broker_url, current)
    check_broker(producer, timeout_s=3.0)
    url = current.effective_database_url
    with _writing(url), session_scope(_engine(url)) as session:
        requeued = requeue_trials(session, experiment_id)
    _forget_reads()
    try:
        return enqueue_trials(producer, requeued)
    except Exception as exc:  # kombu raises several unrelated types for a broker that went away
        raise BrokerUnreachable(
            f"{len(requeued)} trials of experiment {experiment_id} were re-queued in the database but the "
            f"broker at {redact_url(current.effective_broker_url)} stopped answering ({type(exc).__name__}); "
            f"once it is back run `fitscope requeue {experiment_id} --status queued`"
        ) from None


@contextmanager
def _writing(url: str) -> Iterator[None]:
    try:
        yield
    except OperationalError as exc:
        raise DatabaseUnreachable(
            f"could not write to the database at {redact_url(url)} ({_reason(exc)}); "
            "check FITSCOPE_DATABASE_URL and that the database server is running"
        ) from None


def _forget_reads() -> None:
    for cached in (_experiments, _experiment, _trials, _epochs):
        cached.clear()


# --- helpers --------------------------------------------------------------------------------------

def sentence(message: str) -> str:
    """A service's error message (lower-case, no full stop, as the CLI prints it) as a UI sentence."""
    return message[:1].upper() + message[1:] + ("" if message.endswith(".") else ".")


def _stop(message: str) -> NoReturn:
    st.error(sentence(message))
    st.stop()


def _reason(exc: OperationalError) -> str:
    return str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
