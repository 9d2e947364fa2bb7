"""Where the dashboard's pages get their data. Reads only: the writes (submit, cancel, re-queue) are
in dashboard/actions.py.

Pages never see a session or SQL: they call the functions here, which wrap services.queries in
Streamlit caches (one engine per database URL for the process; query results for a couple of
seconds, so a live panel and several browser tabs share one read). A database that cannot be used
(bad settings, no schema, server down) stops the page with one sentence naming the fix.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import numpy as np
import pandas as pd
import streamlit as st
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from dashboard import frames
from dashboard.trial_tables import TRIAL_FIELDS, groupable
from services.analysis import (
    UNSTABLE_RATIO,
    bands_from_moments,
    unstable,
)
from services.config import ConfigError, Settings, get_settings, redact_url
from services.db import DatabaseUnreachable, SchemaNotAtHead, make_engine, session_scope
from services.export import write_rows
from services.migrate import ensure_schema_at_head
from services.models import TrialStatus
from services.queries import (
    MOMENTS,
    ExperimentSummary,
    epoch_curves,
    epoch_moments,
    epoch_rows,
    experiment_names,
    get_experiment,
    last_epoch_values,
    last_epoch_values_recorded,
    layer_grad_norm_rows,
    list_experiments,
    loss_maxima,
    trial_artifacts_of,
    trial_detail,
    trial_frame,
    trial_rows,
    trials_stamp,
)
from services.queries import epochs_to_reach as queries_epochs_to_reach
from services.selection import group_ids, text_codes
from services.siblings import rejudge_table
from services.trial_config import TRIAL_PARAMETERS
from services.trials import EPOCH_METRIC_FIELDS
from services.workers import list_workers

REFRESH_SECONDS = 2  # live panels rerun this often; query results are cached as long
STATUSES = tuple(status.value for status in TrialStatus)
EXPERIMENT_COLUMNS = ("id", "name", "method", "submitted_by", "created_at", "trials", *STATUSES,
                      "ended", "epochs_done", "epochs_planned", "progress", "finished", "tags", "note",
                      "cancelled_by", "requeued_by")


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

def experiments(*, limit: int = 50, search: str | None = None) -> pd.DataFrame:
    """The newest ``limit`` experiments, one row each: EXPERIMENT_COLUMNS, with a count per status
    and ``progress`` as the fraction (0..1) of planned epochs done. ``search`` keeps those whose
    name, description, note, tags or submitter contain it (any case)."""
    url = _ready_url()
    with _reading(url):
        return _experiments(url, limit, (search or "").strip() or None)


def experiment_choices(*, limit: int = 500) -> pd.DataFrame:
    """The newest ``limit`` experiments' ``id`` and ``name``, newest first (a picker's list: no counts)."""
    url = _ready_url()
    with _reading(url):
        return _experiment_choices(url, limit)


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
        return _trials(url, experiment_id).drop(columns="diag_reasons", errors="ignore")


def trial_configs(experiment_id: int) -> pd.DataFrame:
    """:func:`trials` without the final metrics and diagnoses (TRIAL_FIELDS, verdict, parameter_count
    and every parameter): enough to name and pick trials, at a third of the read."""
    url = _ready_url()

    def read() -> pd.DataFrame:
        with session_scope(_engine(url)) as session:
            found = trial_frame(session, experiment_id, metrics=False)
        return found if len(found) else pd.DataFrame(columns=[*TRIAL_FIELDS, *TRIAL_PARAMETERS])

    with _reading(url):
        return _per_change(url, experiment_id, "trial_configs", read)


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
        # Runs in the download button's own request, after the page was drawn: a database that went
        # away meanwhile must still read as one sentence (in the file), not as a traceback.
        try:
            with session_scope(_engine(url)) as session:
                rows = read(session, experiment_id)
        except OperationalError as exc:
            return sentence(f"could not read experiment {experiment_id}'s {what} from the database at "
                            f"{redact_url(url)} ({_reason(exc)}); check that the database server is running "
                            "and click again")
        stream = io.StringIO()
        write_rows(rows, stream, "csv")
        return stream.getvalue()

    return render


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def _experiments(url: str, limit: int, search: str | None = None) -> pd.DataFrame:
    with session_scope(_engine(url)) as session:
        return _experiment_frame(list_experiments(session, limit=limit, search=search))


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def _experiment_choices(url: str, limit: int) -> pd.DataFrame:
    with session_scope(_engine(url)) as session:
        return pd.DataFrame(experiment_names(session, limit=limit), columns=["id", "name"])


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def _experiment(url: str, experiment_id: int) -> pd.DataFrame:
    with session_scope(_engine(url)) as session:
        summary = get_experiment(session, experiment_id)
    return _experiment_frame([summary] if summary else [])


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def _stamp(url: str, experiment_id: int) -> tuple:
    with session_scope(_engine(url)) as session:
        return trials_stamp(session, experiment_id)


def _per_change(url: str, experiment_id: int, name: str, build: Callable[[], Any]) -> Any:
    """``build()``, kept until the experiment changes (dashboard.frames)."""
    return frames.per_change(url, experiment_id, name, _stamp(url, experiment_id), build)


def _trials(url: str, experiment_id: int) -> pd.DataFrame:
    # One read of the trials table per experiment and change serves trials() and sibling_diagnoses()
    # (the stored reasons ride along as diag_reasons, which trials() leaves out).
    def read() -> pd.DataFrame:
        with session_scope(_engine(url)) as session:
            found = trial_frame(session, experiment_id, reasons=True)
        return found if len(found) else pd.DataFrame(columns=[*TRIAL_FIELDS, *TRIAL_PARAMETERS])

    return _per_change(url, experiment_id, "trials", read)


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
         "progress": s.progress, "finished": s.finished, "tags": list(s.tags), "note": s.note,
         "cancelled_by": s.cancelled_by, "requeued_by": s.requeued_by}
        for s in summaries
    ]
    return pd.DataFrame(rows, columns=list(EXPERIMENT_COLUMNS))


# --- reads of the analysis pages (Fit analysis, Optimizers and schedules, Trial) ------------------

DIAGNOSIS_COLUMNS = ("trial_id", "sibling_verdict", "reasons", "train_ratio", "gap_ratio", "val_rise_ratio",
                     "tail_drop_ratio", "reference_excess")
BAND_COLUMNS = ("split", "epoch", "mean", "lower", "upper", "low", "n")  # what curve_bands returns after the groups


def curves(experiment_id: int, *, trial_ids: tuple[int, ...] | None = None,
           fields: tuple[str, ...] = ("train_loss", "val_loss")) -> pd.DataFrame:
    """Per-epoch rows (trial_id, epoch, ``fields``) of a few chosen trials, every epoch, for charts
    with one line per trial (services.queries.epoch_curves)."""
    url = _ready_url()
    with _reading(url):
        return _curves(url, experiment_id, trial_ids, fields)


def curve_bands(trials: pd.DataFrame, *, by: list[str], columns: dict[str, str], band: str = "std") -> pd.DataFrame:
    """The mean line and band of every epoch for each group of ``trials`` that shares the ``by``
    columns, computed by the database (services.queries.epoch_moments: exact, every epoch).
    ``columns`` maps a split name (train, val, value) to its epoch-metric field. Returns the ``by``
    columns and BAND_COLUMNS; ``low`` is the smallest run's value, ``n`` the number of runs behind
    each point. A trial missing a ``by`` value is in no group."""
    url = _ready_url()
    by = list(dict.fromkeys(by))
    keys, groups = _trial_groups(trials, by)
    with _reading(url):
        moments = _moments(url, groups, tuple(dict.fromkeys(columns.values())))
    # Every split's rows in one frame, built from the moments' arrays: a frame per split, renamed,
    # concatenated and merged with the groups' labels took several times as long (a page draws two).
    splits = list(columns.items())
    rows = len(moments)
    long = pd.DataFrame({
        "group": np.tile(moments["group"].to_numpy(), len(splits)),
        "epoch": np.tile(moments["epoch"].to_numpy(), len(splits)),
        "split": np.repeat(np.array([split for split, _ in splits], dtype=object), rows),
        **{moment: np.concatenate([moments[f"{field}_{moment}"].to_numpy(dtype=float) for _, field in splits])
           if splits else np.array([], dtype=float) for moment in MOMENTS}})
    long = bands_from_moments(long[long["n"] > 0], band=band)
    labels = pd.DataFrame(keys, columns=by).iloc[long["group"].to_numpy()].reset_index(drop=True)
    found = pd.concat([labels, long[list(BAND_COLUMNS)].reset_index(drop=True).astype({"n": "int64"})], axis=1)
    return found.sort_values([*by, "split", "epoch"], ignore_index=True)


def _trial_groups(trials: pd.DataFrame, by: list[str]) -> tuple[list[list], tuple[tuple[int, ...], ...]]:
    """The groups of ``trials`` that share their ``by`` values, in the sorted order of the values'
    texts: each one's ``by`` values (its first trial's) and its trial ids, in the frame's order. The
    groups of ``trials.groupby([trials[name].astype(str) for name in by], sort=True)``, which leaves
    out a trial missing a value (astype(str) keeps it missing), from integer codes: faster."""
    if not len(trials):
        return [], ()
    ids = trials["trial_id"].to_numpy()
    if not by:
        return [[]], (tuple(int(i) for i in ids),)
    frame = trials[list(dict.fromkeys([*by, "trial_id"]))]
    present = ~frame[by].isna().any(axis=1).to_numpy()
    positions = np.flatnonzero(present)
    if not len(positions):  # every trial misses a value: no group (np.split would make one empty part)
        return [], ()
    # An object column's values as their texts first: text_codes groups equal values (1, 1.0 and True),
    # astype(str) tells them apart.
    codes = {name: text_codes(frame[name].iloc[positions].astype(str) if frame[name].dtype == object else
                              frame[name].iloc[positions]) for name in by}
    group = group_ids(codes, by)
    order = np.argsort(group, kind="stable")
    starts = np.flatnonzero(np.diff(group[order], prepend=-1))
    keys = [frame.iloc[positions[order[start]]][by].tolist() for start in starts]
    members = np.split(ids[positions[order]], starts[1:])
    return keys, tuple(tuple(int(i) for i in part) for part in members)


def with_stability(experiment_id: int, trials: pd.DataFrame) -> pd.DataFrame:
    """``trials`` with a boolean ``unstable`` column: the run's loss once rose above
    services.analysis.UNSTABLE_RATIO x its baseline (even if it came back down)."""
    baselines = {}
    for split in ("train", "val"):
        baseline = trials.get(f"baseline_{split}_loss", pd.Series(float("nan"), index=trials.index))
        if f"diag_baseline_{split}_loss" in trials:
            baseline = baseline.fillna(trials[f"diag_baseline_{split}_loss"])
        baselines[split] = pd.to_numeric(baseline, errors="coerce")
    # Only a loss above UNSTABLE_RATIO x the smallest baseline can flag any run: the database reads
    # those rows' trials alone (the rest are stable whatever their maximum). A hair below, for rounding.
    smallest = pd.concat(baselines.values()).where(lambda b: b > 0).min()
    above = float(UNSTABLE_RATIO * smallest * (1 - 1e-9)) if pd.notna(smallest) else None
    # A diagnosis keeps the run's largest losses (services.analysis.diagnose); the epoch rows are read
    # only for the runs diagnosed before it did, or not at all.
    stored = [f"diag_max_{split}_loss" for split in ("train", "val")]
    known = trials[stored].notna().all(axis=1) if set(stored) <= set(trials.columns) else \
        pd.Series(False, index=trials.index)
    maxima = trials.loc[known, ["trial_id", *stored]].set_axis(["trial_id", "max_train_loss", "max_val_loss"],
                                                               axis=1)
    unknown = tuple(sorted(int(i) for i in trials.loc[~known, "trial_id"]))
    if unknown:
        url = _ready_url()
        with _reading(url):
            among = unknown if known.any() else None  # none known (an older experiment): the whole of it
            ids = "all" if among is None else hashlib.sha256(",".join(map(str, among)).encode()).hexdigest()
            read = _per_change(url, experiment_id, f"loss_maxima {above!r} {ids}",  # a digest: no collisions
                               lambda: _loss_maxima(url, experiment_id, above, among))
        maxima = pd.concat([maxima, read], ignore_index=True)
    merged = trials[["trial_id"]].merge(maxima, on="trial_id", how="left")
    flags = pd.Series(False, index=trials.index)
    for split in ("train", "val"):
        flags |= unstable(pd.Series(pd.to_numeric(merged[f"max_{split}_loss"]).to_numpy(dtype=float),
                                    index=trials.index), baselines[split])
    return trials.assign(unstable=flags.to_numpy())


def epochs_to_reach(experiment_id: int, *, field: str, target: float,
                    trial_ids: tuple[int, ...] | None = None) -> pd.Series:
    """The first epoch at which each trial's (of ``trial_ids``, default all) ``field`` got to
    ``target`` or below, by trial id; trials that never did are absent (services.queries.epochs_to_reach:
    one aggregate query)."""
    url = _ready_url()
    with _reading(url):
        return _epochs_to_reach(url, experiment_id, field, target, trial_ids)


NORM_FIELDS = ("grad_norm", "weight_norm")  # recorded once per epoch
FINAL_NORMS = tuple(f"final_{name}" for name in NORM_FIELDS)  # each trial's at its last epoch (final_norms)


def final_norms(experiment_id: int) -> pd.DataFrame:
    """trial_id, final_grad_norm and final_weight_norm: each trial's gradient and weight norm at its
    last recorded epoch (services.queries.last_epoch_values), to merge into the trials table."""
    url = _ready_url()
    with _reading(url):
        return _per_change(url, experiment_id, "final_norms", lambda: _final_norms(url, experiment_id))


def final_norms_recorded(experiment_id: int, *, statuses: tuple[str, ...]) -> tuple[str, ...]:
    """Which of :func:`final_norms`' columns (final_grad_norm, final_weight_norm) hold a value for at
    least one trial of ``statuses``, without reading them for every trial
    (services.queries.last_epoch_values_recorded): a page offers a norm, and reads it once chosen."""
    url = _ready_url()

    def read() -> tuple[str, ...]:
        with session_scope(_engine(url)) as session:
            found = last_epoch_values_recorded(session, experiment_id, fields=NORM_FIELDS, statuses=statuses)
        return tuple(f"final_{name}" for name in found)

    with _reading(url):
        return _per_change(url, experiment_id, f"final_norms_recorded {statuses!r}", read)


def sibling_diagnoses(experiment_id: int) -> pd.DataFrame:
    """The fit verdict of every ended trial judged among its siblings (services.siblings.rejudge_table,
    the rule of diagnose_experiment applied to the stored diagnoses), from the same read of the trials
    table as :func:`trials`: DIAGNOSIS_COLUMNS, ``reasons`` as one line."""
    url = _ready_url()
    with _reading(url):
        return _per_change(url, experiment_id, "sibling_diagnoses",
                           lambda: rejudge_table(_trials(url, experiment_id))[list(DIAGNOSIS_COLUMNS)])


def artifacts(trial_ids: tuple[int, ...]) -> dict[int, dict[str, dict]]:
    """Prediction artifacts (curve_1d, boundary_2d) of a few trials: trial id -> kind -> data."""
    url = _ready_url()
    with _reading(url):
        return _artifacts(url, trial_ids)


def layer_grad_norms(experiment_id: int, *, trial_ids: tuple[int, ...] | None = None,
                     ends_only: bool = False) -> pd.DataFrame:
    """One row per trial, epoch and Linear layer: trial_id, epoch, layer (1 = the first) and
    grad_norm, the layer's gradient norm (services.queries.layer_grad_norm_rows); of ``trial_ids``
    only when given; each trial's first and latest epoch only with ``ends_only``."""
    url = _ready_url()
    with _reading(url):
        if trial_ids is None:  # the whole experiment's: kept until it changes, like its trials
            return _per_change(url, experiment_id, f"layer_grad_norms {ends_only}",
                               lambda: _layer_grad_norms(url, experiment_id, None, ends_only))
        return _layer_grad_norms(url, experiment_id, trial_ids, ends_only)


def trial(trial_id: int) -> dict[str, Any] | None:
    """One trial with its config, final metrics and stored diagnosis (services.queries.trial_detail)."""
    url = _ready_url()
    with _reading(url):
        return _trial(url, trial_id)


def groupable_trials(experiment_id: int) -> pd.DataFrame:
    """:func:`groupable` of :func:`trials`, kept until the experiment changes."""
    url = _ready_url()
    with _reading(url):
        return _per_change(url, experiment_id, "groupable",
                           lambda: groupable(_trials(url, experiment_id).drop(columns="diag_reasons", errors="ignore")))


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def _curves(url: str, experiment_id: int, trial_ids: tuple[int, ...] | None, fields: tuple[str, ...]) -> pd.DataFrame:
    with session_scope(_engine(url)) as session:
        rows = epoch_curves(session, experiment_id, fields=fields,
                            trial_ids=list(trial_ids) if trial_ids is not None else None)
    return pd.DataFrame(rows, columns=["trial_id", "epoch", *fields])


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def _moments(url: str, groups: tuple[tuple[int, ...], ...], fields: tuple[str, ...]) -> pd.DataFrame:
    with session_scope(_engine(url)) as session:
        rows = epoch_moments(session, groups=[list(group) for group in groups], fields=fields)
    columns = ["group", "epoch", *(f"{name}_{moment}" for name in fields for moment in MOMENTS)]
    return pd.DataFrame(rows, columns=columns).astype({"group": int, "epoch": int})


def _loss_maxima(url: str, experiment_id: int, above: float | None,
                 trial_ids: tuple[int, ...] | None) -> pd.DataFrame:
    with session_scope(_engine(url)) as session:
        found = loss_maxima(session, experiment_id, above=above, trial_ids=trial_ids)
    return pd.DataFrame([(trial_id, train, val) for trial_id, (train, val) in found.items()],
                        columns=["trial_id", "max_train_loss", "max_val_loss"])


def _final_norms(url: str, experiment_id: int) -> pd.DataFrame:
    with session_scope(_engine(url)) as session:
        found = last_epoch_values(session, experiment_id, fields=NORM_FIELDS)
    # Column by column: a DataFrame from 10,000 row dicts took several times as long.
    return pd.DataFrame({"trial_id": pd.Series(list(found), dtype="int64"),
                         **{f"final_{name}": pd.Series([values[name] for values in found.values()], dtype="float64")
                            for name in NORM_FIELDS}})


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def _epochs_to_reach(url: str, experiment_id: int, field: str, target: float,
                     trial_ids: tuple[int, ...] | None) -> pd.Series:
    with session_scope(_engine(url)) as session:
        reached = queries_epochs_to_reach(session, experiment_id, field=field, target=target,
                                          trial_ids=list(trial_ids) if trial_ids is not None else None)
    return pd.Series(reached, name="epochs_to_target", dtype=float).rename_axis("trial_id")


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def _artifacts(url: str, trial_ids: tuple[int, ...]) -> dict[int, dict[str, dict]]:
    with session_scope(_engine(url)) as session:
        return trial_artifacts_of(session, list(trial_ids))


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def _layer_grad_norms(url: str, experiment_id: int, trial_ids: tuple[int, ...] | None,
                      ends_only: bool) -> pd.DataFrame:
    with session_scope(_engine(url)) as session:
        rows = layer_grad_norm_rows(session, experiment_id, trial_ids=trial_ids, ends_only=ends_only)
    return pd.DataFrame([{"trial_id": row["trial_id"], "epoch": row["epoch"], "layer": layer, "grad_norm": norm}
                         for row in rows for layer, norm in enumerate(row["layer_grad_norms"], start=1)],
                        columns=["trial_id", "epoch", "layer", "grad_norm"])


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def _trial(url: str, trial_id: int) -> dict[str, Any] | None:
    with session_scope(_engine(url)) as session:
        return trial_detail(session, trial_id)


# --- after a write (dashboard/actions.py) -----------------------------------------------------------

def _forget_reads() -> None:
    """Drop every cached read, so the page shows what a write changed on its next run."""
    for cached in (_experiments, _experiment_choices, _experiment, _stamp, _epochs, _curves, _epochs_to_reach,
                   _moments, _artifacts, _trial, _layer_grad_norms):
        cached.clear()
    frames.forget()


# --- workers --------------------------------------------------------------------------------------

def workers() -> list[dict[str, Any]]:
    """Every known worker (services.workers.list_workers), online ones first: name, host, queues,
    device, status (``lost`` when silent longer than FITSCOPE_WORKER_LOST_AFTER_S), current_trials..."""
    url = _ready_url()
    with _reading(url):
        return _workers(url, settings().worker_lost_after_s)


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def _workers(url: str, lost_after_s: float) -> list[dict[str, Any]]:
    with session_scope(_engine(url)) as session:
        return list_workers(session, lost_after_s=lost_after_s)


# --- helpers --------------------------------------------------------------------------------------

def sentence(message: str) -> str:
    """A service's error message (lower-case, no full stop, as the CLI prints it) as a UI sentence."""
    return message[:1].upper() + message[1:] + ("" if message.endswith(".") else ".")


def _stop(message: str) -> NoReturn:
    st.error(sentence(message))
    st.stop()


def _reason(exc: OperationalError) -> str:
    return str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
