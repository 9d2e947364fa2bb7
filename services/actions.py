"""Submit, cancel and re-queue, orchestrated once for every front end (the CLI, the dashboard, the
Python API): check the broker before writing, write in one transaction, plan the jobs inside it,
send the messages only after the commit, and say in one sentence what to run when the database
has the rows but the broker lost the messages.

Every error a user can cause is an exception whose message is one sentence naming the fix:
SpecError, DatasetError, ExperimentNotFound, BrokerUnreachable, DatabaseUnreachable, and
NotQueued (a BrokerUnreachable: the rows were committed, the messages were not sent).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from services.config import Settings, redact_url
from services.datasets import CsvLimits
from services.db import DatabaseUnreachable, session_scope
from services.models import TrialStatus
from services.queue import BrokerUnreachable, check_broker, enqueue_jobs, enqueue_submission
from services.spec import GridSpec
from services.submission import Submitted, plan_requeue
from services.submission import submit as write_submission

# Every status a trial can be re-queued from: a running trial belongs to a worker.
REQUEUEABLE = tuple(sorted(status.value for status in TrialStatus if status != TrialStatus.running))
DEFAULT_REQUEUE = ("failed", "cancelled")


class SpecFileError(ValueError):
    """A spec file that cannot be read (missing, a folder, too big, not UTF-8); one sentence."""


class ExperimentNotFound(LookupError):
    """No experiment has this id; the message says where to find the ids."""


class NotQueued(BrokerUnreachable):
    """The database has the rows, the broker does not have the messages; the message says what to run."""


@dataclass(frozen=True)
class Cancelled:
    experiment_id: int
    cancelled: int  # queued trials, now cancelled
    stopping: int  # running trials asked to stop at their next epoch boundary

    def as_json(self) -> dict:
        return {"experiment_id": self.experiment_id, "cancelled": self.cancelled, "stopping": self.stopping}


@dataclass(frozen=True)
class Requeued:
    experiment_id: int
    trial_ids: list[int]
    jobs: int  # queue messages sent

    def as_json(self) -> dict:
        return {"experiment_id": self.experiment_id, "trial_ids": self.trial_ids, "jobs": self.jobs}


def read_spec_file(path: Path, *, max_bytes: int) -> str:
    """The text of a spec file, checked before it is read (a pipe or a device could block for ever).
    Raises SpecFileError naming the file and the fix."""
    try:
        if path.is_dir():
            raise SpecFileError(f"spec file {str(path)!r} is a folder; pass the path of a YAML grid spec")
        if path.exists() and not path.is_file():
            raise SpecFileError(f"spec file {str(path)!r} is not a regular file (a device or pipe); pass the path "
                                "of a YAML grid spec")
        if not path.is_file():
            raise SpecFileError(f"spec file {str(path)!r} not found; pass the path of a YAML grid spec")
        if path.stat().st_size > max_bytes:
            raise SpecFileError(f"spec file {str(path)!r} is {path.stat().st_size} bytes, over the cap of "
                                f"{max_bytes} (FITSCOPE_MAX_SPEC_BYTES)")
    except OSError as exc:  # e.g. a file name longer than the file system allows
        raise SpecFileError(f"spec file {str(path)[:100]!r} cannot be opened ({exc.strerror}); pass the path of a "
                            "YAML grid spec") from None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecFileError(f"spec file {str(path)!r} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise SpecFileError(f"spec file {str(path)!r} cannot be read ({exc.strerror}); check its permissions") from None


def load_spec_source(source: str | Path | dict, *, max_bytes: int) -> tuple[GridSpec, str, Path | None]:
    """A spec from a file path, a YAML string or an already-parsed mapping: (the spec, its text to
    store, the folder its CSV data sets are read from: the file's, else the working directory).
    A spec without a name is called after its file, else "untitled". Raises SpecFileError or SpecError."""
    import yaml

    from services.spec import UNTITLED, parse_spec

    if isinstance(source, dict):
        text = yaml.safe_dump(source, sort_keys=False, allow_unicode=True)
        return parse_spec(text, max_bytes=max_bytes, default_name=UNTITLED), text, None
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source
                                    and source.strip().endswith((".yaml", ".yml"))):
        path = Path(source)
        text = read_spec_file(path, max_bytes=max_bytes)
        return parse_spec(text, max_bytes=max_bytes, default_name=path.stem), text, path.parent
    if not isinstance(source, str):
        raise SpecFileError(f"a spec is a file path, YAML text or a dict, not {type(source).__name__}")
    return parse_spec(source, max_bytes=max_bytes, default_name=UNTITLED), source, None


def check_spec(spec: GridSpec, *, settings: Settings, base_dir: Path | None = None) -> list:
    """Every trial configuration of ``spec``, with its CSV data sets read and checked as submit reads
    them, and refused as submit's admission control would: what `fitscope validate` counts. Raises
    SpecError or DatasetError."""
    from services.admission import check_admission
    from services.datasets import resolve_csv_configs
    from services.spec import SpecError, expand

    configs = expand(spec, max_trials=settings.max_trials_per_experiment)
    configs = resolve_csv_configs(configs, base_dir=base_dir, limits=CsvLimits.from_settings(settings))
    if problems := check_admission(configs, cap_mb=settings.max_trial_memory_mb):
        raise SpecError(problems)
    return configs


def default_submitter(settings: Settings) -> str | None:
    """Who a submission is recorded as when nobody says: FITSCOPE_SUBMITTED_BY, else the login name."""
    import getpass

    if settings.submitted_by:
        return settings.submitted_by
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers
        return None


def submit(engine: Engine, producer: Celery, *, spec: GridSpec, spec_text: str, settings: Settings,
           submitted_by: str | None, tags: list[str] | tuple[str, ...] = (), note: str | None = None,
           base_dir: Path | None = None, broker_timeout_s: float = 5.0) -> Submitted:
    """Write the experiment and its trials in one transaction, then queue them.

    The broker is checked first, so a dead one leaves no rows. ``base_dir`` is where the spec's CSV
    data sets are read from (default the working directory). Raises SpecError, DatasetError,
    BrokerUnreachable, DatabaseUnreachable (nothing written), or NotQueued (written, not sent)."""
    check_broker(producer, timeout_s=broker_timeout_s)
    with writing(engine), session_scope(engine) as session:
        submitted = write_submission(
            session, spec=spec, spec_text=spec_text, submitted_by=submitted_by,
            max_trials=settings.max_trials_per_experiment, base_dir=base_dir,
            csv_limits=CsvLimits.from_settings(settings), tags=tags, note=note,
            fuse=settings.fuse, fuse_max_trials=settings.fuse_max_trials)
    try:
        enqueue_submission(producer, submitted)
    except Exception as exc:  # kombu raises several unrelated types for a broker that went away
        saved = f"experiment {submitted.experiment_id} was saved but its trials could not be queued"
        raise NotQueued(_not_queued(submitted.experiment_id, saved, producer, exc)) from None
    return submitted


def cancel(engine: Engine, *, experiment_id: int, cancelled_by: str | None = None) -> Cancelled:
    """Cancel the experiment's queued trials now and ask its running ones to stop at their next
    epoch boundary (they keep their rows); ``cancelled_by`` is recorded on the experiment in the
    same transaction. Raises ExperimentNotFound or DatabaseUnreachable."""
    from services.queries import get_experiment
    from services.trials import cancel_experiment

    with writing(engine), session_scope(engine) as session:
        if get_experiment(session, experiment_id) is None:
            raise ExperimentNotFound(_no_such(experiment_id))
        counts = cancel_experiment(session, experiment_id)
        _record(session, experiment_id, cancelled_by=cancelled_by)
    return Cancelled(experiment_id=experiment_id, cancelled=counts["cancelled"], stopping=counts["stopping"])


def requeue(engine: Engine, producer: Celery, *, experiment_id: int, settings: Settings,
            statuses: tuple[str, ...] = DEFAULT_REQUEUE, requeued_by: str | None = None,
            broker_timeout_s: float = 5.0) -> Requeued:
    """Reset the experiment's trials of ``statuses`` (fresh attempts, no rows) and queue them, planned
    into jobs as a submission plans them; ``requeued_by`` is recorded on the experiment. The broker is
    checked first; the messages go out after the commit. Raises ValueError (a status that cannot be
    re-queued), ExperimentNotFound, BrokerUnreachable, DatabaseUnreachable, or NotQueued (reset, not sent)."""
    from services.queries import get_experiment
    from services.trials import requeue_trials

    for value in statuses:
        if value not in REQUEUEABLE:
            raise ValueError(f"status {value!r} is not a re-queueable status; use one of {', '.join(REQUEUEABLE)}")
    check_broker(producer, timeout_s=broker_timeout_s)
    with writing(engine), session_scope(engine) as session:
        if get_experiment(session, experiment_id) is None:
            raise ExperimentNotFound(_no_such(experiment_id))
        trials = requeue_trials(session, experiment_id, statuses=tuple(statuses))
        _record(session, experiment_id, requeued_by=requeued_by)
        jobs = plan_requeue(session, trials, fuse=settings.fuse, fuse_max_trials=settings.fuse_max_trials)
    try:
        enqueue_jobs(producer, jobs)
    except Exception as exc:
        reset = f"{len(trials)} trials of experiment {experiment_id} were reset but could not be queued"
        raise NotQueued(_not_queued(experiment_id, reset, producer, exc)) from None
    return Requeued(experiment_id=experiment_id, trial_ids=[trial_id for trial_id, _ in trials], jobs=len(jobs))


def _record(session, experiment_id: int, **who: str | None) -> None:
    # Who acted last (the signed-in dashboard user, or the CLI's FITSCOPE_SUBMITTED_BY / login name).
    from sqlalchemy import update

    from services.models import Experiment

    session.execute(update(Experiment).where(Experiment.id == experiment_id).values(**who))


def _no_such(experiment_id: int) -> str:
    return f"experiment {experiment_id} does not exist; `fitscope status` lists them"


def _not_queued(experiment_id: int, what_happened: str, producer: Celery, exc: Exception) -> str:
    return (f"{what_happened}: the broker at {redact_url(producer.conf.broker_url)} "
            f"stopped answering ({type(exc).__name__}); once it is back run `fitscope requeue {experiment_id} "
            "--status queued`")


@contextmanager
def writing(engine: Engine) -> Iterator[None]:
    """A database that stops answering mid-write is one sentence; the transaction was rolled back."""
    try:
        yield
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        raise DatabaseUnreachable(
            f"could not write to the database at {redact_url(engine.url.render_as_string(hide_password=False))} "
            f"({reason}); check FITSCOPE_DATABASE_URL and that the database server is running"
        ) from None
