"""The Python API's one object: a connection to fitscope's database and broker.

Every method is a thin call into the services the CLI and the dashboard use: services.actions
(validate, submit, cancel, requeue), services.progress (wait) and services.queries (the reads).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from services import actions
from services.config import Settings, make_settings
from services.progress import ProgressReporter, wait_for_experiment
from services.queries import ExperimentSummary


@dataclass(frozen=True)
class Validation:
    """What `fitscope validate` says of a valid spec."""

    name: str
    method: str
    trials: int
    warnings: list[str]


@dataclass(frozen=True)
class Experiment:
    """A submitted experiment: its id, name and trial ids (in grid order)."""

    id: int
    name: str
    trial_ids: list[int]


def connect(*, database_url: str | None = None, broker_url: str | None = None, **settings: Any) -> Client:
    """A Client over the database and broker the CLI would use: the FITSCOPE_* environment, with
    ``database_url``, ``broker_url`` or any other setting (field names of services.config.Settings,
    e.g. ``home=``) given here on top. Raises ConfigError, DatabaseUnreachable or SchemaNotAtHead
    (with the command that fixes it)."""
    overrides = {key: value for key, value in
                 {"database_url": database_url, "broker_url": broker_url, **settings}.items() if value is not None}
    return Client(make_settings(**overrides))


class Client:
    """Submit, wait, read. Build one with :func:`connect`."""

    def __init__(self, settings: Settings) -> None:
        from services.db import make_engine
        from services.migrate import ensure_schema_at_head
        from services.queue import make_celery

        self.settings = settings
        self.engine = make_engine(settings.effective_database_url)
        ensure_schema_at_head(self.engine)
        self._producer = make_celery(settings, name="fitscope-api")

    def __repr__(self) -> str:
        from services.config import redact_url

        return (f"fitscope.Client(database={redact_url(self.settings.effective_database_url)!r}, "
                f"broker={redact_url(self.settings.effective_broker_url)!r})")

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    # --- writes -------------------------------------------------------------------------------

    def validate(self, spec: str | Path | dict) -> Validation:
        """Check a spec (a file path, YAML text or a dict) as `fitscope validate` does. Raises
        SpecFileError, SpecError (``.problems``: every problem as "path: message") or DatasetError."""
        grid, _text, base_dir = actions.load_spec_source(spec, max_bytes=self.settings.max_spec_bytes)
        configs = actions.check_spec(grid, settings=self.settings, base_dir=base_dir)
        return Validation(name=grid.name, method=grid.method, trials=len(configs), warnings=list(grid.warnings))

    def submit(self, spec: str | Path | dict, *, tags: list[str] | tuple[str, ...] = (), note: str | None = None,
               submitted_by: str | None = None, wait: bool = False, timeout: float = 0,
               progress: bool = True) -> Experiment:
        """Submit a spec (a file path, YAML text or a dict) as `fitscope submit` does: one transaction,
        then the queue. ``submitted_by`` defaults to FITSCOPE_SUBMITTED_BY or the login name. With
        ``wait``, returns once every trial has ended (see :meth:`wait`)."""
        from services.submission import MAX_NOTE_CHARS, MAX_TAGS, tag_problem, unique_tags

        tags = unique_tags(tags)
        if len(tags) > MAX_TAGS:
            raise ValueError(f"tags: {len(tags)} given; an experiment takes at most {MAX_TAGS}")
        for tag in tags:
            if problem := tag_problem(tag):
                raise ValueError(f"tags: {tag[:20]!r} {problem}")
        note = note.strip() if note else None
        if note and len(note) > MAX_NOTE_CHARS:
            raise ValueError(f"note: is {len(note)} characters; shorten it to at most {MAX_NOTE_CHARS}")
        grid, text, base_dir = actions.load_spec_source(spec, max_bytes=self.settings.max_spec_bytes)
        submitted = actions.submit(self.engine, self._producer, spec=grid, spec_text=text, settings=self.settings,
                                   submitted_by=submitted_by or actions.default_submitter(self.settings),
                                   tags=tags, note=note or None, base_dir=base_dir)
        experiment = Experiment(id=submitted.experiment_id, name=grid.name, trial_ids=submitted.trial_ids)
        if wait:
            self.wait(experiment.id, timeout=timeout, progress=progress)
        return experiment

    def cancel(self, experiment_id: int) -> actions.Cancelled:
        """Cancel queued trials now; running ones stop at their next epoch boundary. Recorded as
        cancelled by FITSCOPE_SUBMITTED_BY or the login name, as `fitscope cancel` records it."""
        return actions.cancel(self.engine, experiment_id=experiment_id,
                              cancelled_by=actions.default_submitter(self.settings))

    def requeue(self, experiment_id: int, *, statuses: tuple[str, ...] = actions.DEFAULT_REQUEUE) -> actions.Requeued:
        """Re-queue the experiment's trials of ``statuses`` (default failed and cancelled), recorded as
        re-queued by FITSCOPE_SUBMITTED_BY or the login name."""
        return actions.requeue(self.engine, self._producer, experiment_id=experiment_id, settings=self.settings,
                               statuses=statuses, requeued_by=actions.default_submitter(self.settings))

    # --- waiting and reading ------------------------------------------------------------------

    def wait(self, experiment_id: int, *, timeout: float = 0, progress: bool = True) -> ExperimentSummary:
        """Block until every trial of the experiment has ended, showing a progress bar on stderr
        (redrawn in place in a terminal or notebook, a line every few seconds in a log). ``timeout``
        > 0 gives up after that many seconds with WaitTimedOut."""
        return wait_for_experiment(self.engine, experiment_id, timeout_s=timeout,
                                   reporter=ProgressReporter(sys.stderr) if progress else None)

    def experiments(self, *, limit: int = 50, search: str | None = None) -> pd.DataFrame:
        """The newest ``limit`` experiments, one row each: id, name, method, submitted_by,
        created_at, trials, a column per trial status, epochs_done, epochs_planned, progress (0..1),
        finished, tags, note. ``search`` keeps those whose name, description, note, tags or
        submitter contain it."""
        from services.db import session_scope
        from services.queries import list_experiments

        with session_scope(self.engine) as session:
            summaries = list_experiments(session, limit=limit, search=search)
        rows = [{**{k: v for k, v in s.as_json().items() if k != "counts"}, **s.counts} for s in summaries]
        frame = pd.DataFrame(rows)
        if "created_at" in frame:
            frame["created_at"] = pd.to_datetime(frame["created_at"])
        return frame

    def experiment(self, experiment_id: int) -> ExperimentSummary:
        """One experiment's summary (counts per status, progress); ExperimentNotFound if none."""
        from services.db import session_scope
        from services.queries import get_experiment

        with session_scope(self.engine) as session:
            found = get_experiment(session, experiment_id)
        if found is None:
            raise actions.ExperimentNotFound(f"experiment {experiment_id} does not exist; `fitscope status` lists them")
        return found

    def trials(self, experiment_id: int) -> pd.DataFrame:
        """One row per trial, as the dashboard and `fitscope export --what trials` have it: trial_id,
        ordinal, status, attempts, worker, epochs_done, best_epoch, started_at, finished_at, error,
        verdict, parameter_count, every parameter of its config, and its final metrics."""
        from services.queries import trial_rows

        return pd.DataFrame(self._rows(experiment_id, trial_rows))

    def epochs(self, experiment_id: int) -> pd.DataFrame:
        """One row per trial and epoch: trial_id, epoch, train/val loss and accuracy, lr,
        epoch_seconds, the regression metrics and the gradient and weight norms."""
        from services.queries import epoch_rows
        from services.trials import EPOCH_METRIC_FIELDS

        return pd.DataFrame(self._rows(experiment_id, epoch_rows), columns=["trial_id", "epoch", *EPOCH_METRIC_FIELDS])

    def _rows(self, experiment_id: int, read) -> list[dict[str, Any]]:
        from services.db import session_scope

        self.experiment(experiment_id)  # one sentence for an id that does not exist
        with session_scope(self.engine) as session:
            return read(session, experiment_id)
