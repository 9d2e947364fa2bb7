"""The `fitscope` command line. One small function per command; heavy imports inside commands.

Exit codes: 0 success, 1 a failure inside fitscope or a trial, 2 bad input (a spec, a flag, a
setting or URL, a schema that needs `fitscope db upgrade`), 130 interrupted.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from services.safe_text import terminal_text  # every user text that reaches the terminal goes through it

app = typer.Typer(help="fitscope: grids of training runs through a real queue into a shared database.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
db_app = typer.Typer(help="Database schema commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]

BAD_INPUT = 2


class ExportWhat(StrEnum):
    epochs = "epochs"
    trials = "trials"


class ExportFormat(StrEnum):
    csv = "csv"
    json = "json"
    parquet = "parquet"


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"fitscope {version('fitscope')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            typer.echo("fitscope (not installed; run `pip install -e .`)")
        raise typer.Exit()


@app.callback()
def _main(_version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                                 help="Print fitscope's version and exit.")] = False) -> None:
    """fitscope: grids of training runs through a real queue into a shared database."""


def fail(message: str, code: int = BAD_INPUT) -> NoReturn:
    """Print one sentence to stderr and exit; never a traceback for an error a user can cause."""
    typer.echo(f"error: {terminal_text(message)}", err=True)
    raise typer.Exit(code)


def fail_spec(exc) -> NoReturn:
    """Every problem of a spec, one line each, then exit 2."""
    for problem in exc.problems:
        typer.echo(f"error: {terminal_text(problem)}", err=True)
    raise typer.Exit(BAD_INPUT) from None


def _id_in_range(value: int | None) -> int | None:
    from services.models import MAX_ID

    if value is not None and not 1 <= value <= MAX_ID:
        fail(f"experiment id {value} is not an id; ids are whole numbers from 1 to {MAX_ID} "
             "(`fitscope status` lists them)")
    return value


def _settings():
    from services.config import ConfigError, get_settings

    try:
        return get_settings()
    except ConfigError as exc:
        fail(str(exc))


def _engine(settings, *, check_schema: bool = True):
    from sqlalchemy.engine import make_url

    from services.db import DatabaseUnreachable, SchemaNotAtHead, describe_url, make_engine
    from services.migrate import ensure_schema_at_head

    url = make_url(settings.effective_database_url)
    if check_schema and url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
            and not Path(url.database).exists():  # a read needs no new file, nor folders for one
        fail(f"the database at {url.database} has no fitscope schema yet; run `fitscope db upgrade` to create it "
             "(the file does not exist, and this command creates nothing), or check FITSCOPE_DATABASE_URL")
    try:
        engine = make_engine(settings.effective_database_url)
    except DatabaseUnreachable as exc:
        fail(str(exc))
    if check_schema:
        from sqlalchemy.exc import DatabaseError

        try:
            ensure_schema_at_head(engine)
        except (SchemaNotAtHead, DatabaseUnreachable) as exc:
            fail(str(exc))
        except DatabaseError as exc:  # e.g. FITSCOPE_DATABASE_URL names a file that is not SQLite
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
            fail(f"the database at {describe_url(engine)} cannot be read ({reason}); "
                 "check that FITSCOPE_DATABASE_URL names a fitscope database")
    return engine


def _read_spec(path: Path, settings):
    from services.actions import SpecFileError, read_spec_file
    from services.spec import SpecError, parse_spec

    try:
        text = read_spec_file(path, max_bytes=settings.max_spec_bytes)
        spec = parse_spec(text, max_bytes=settings.max_spec_bytes, default_name=path.stem)
    except SpecFileError as exc:
        fail(str(exc))
    except SpecError as exc:
        fail_spec(exc)
    _warn(spec.warnings)
    return spec, text


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        typer.echo(f"warning: {terminal_text(warning)}", err=True)


@app.command()
def validate(spec_file: Annotated[Path, typer.Argument(help="YAML grid spec.")], json_output: JsonOption = False):
    """Check a spec and print how many trials it expands to, or every problem with its key.

    With --json: {"valid": true, "name", "trials", "warnings"} or {"valid": false, "errors": [{"path",
    "message"}], "warnings"} on stdout; exit 2 when it is not valid."""
    from services.actions import SpecFileError, check_spec, read_spec_file
    from services.datasets import DatasetError
    from services.spec import SpecError, parse_spec

    settings = _settings()
    spec = None
    try:
        text = read_spec_file(spec_file, max_bytes=settings.max_spec_bytes)
        spec = parse_spec(text, max_bytes=settings.max_spec_bytes, default_name=spec_file.stem)
        _warn(spec.warnings)
        configs = check_spec(spec, settings=settings, base_dir=spec_file.parent)
    except (SpecFileError, SpecError, DatasetError) as exc:
        if not json_output:
            fail_spec(exc) if isinstance(exc, SpecError) else fail(str(exc))
        where = "spec_file" if isinstance(exc, SpecFileError) else "dataset"
        problems = exc.problems if isinstance(exc, SpecError) else [f"{where}: {exc}"]
        typer.echo(json.dumps({"valid": False, "errors": [_error_of(problem) for problem in problems],
                               "warnings": spec.warnings if spec else []}))
        raise typer.Exit(BAD_INPUT) from None
    if json_output:
        typer.echo(json.dumps({"valid": True, "name": spec.name, "trials": len(configs), "warnings": spec.warnings}))
    else:
        typer.echo(f"{terminal_text(spec.name)}: {len(configs)} trials ({spec.method}, {len(spec.seeds)} seed(s)"
                   + (f", {spec.folds} folds" if spec.folds else "") + ")")


def _error_of(problem: str) -> dict[str, str]:
    """A ``"path: message"`` problem line as {"path", "message"}."""
    path, sep, message = problem.partition(": ")
    return {"path": path, "message": message} if sep and " " not in path else {"path": "spec", "message": problem}


@app.command()
def submit(spec_file: Annotated[Path, typer.Argument(help="YAML grid spec.")],
           wait: Annotated[bool, typer.Option("--wait", help="Show progress until every trial has ended.")] = False,
           json_output: JsonOption = False,
           timeout: Annotated[float, typer.Option(help="With --wait: give up after this many seconds.")] = 0,
           tag: Annotated[list[str] | None, typer.Option("--tag", help="A label to find it by (repeatable).")]
           = None,
           note: Annotated[str | None, typer.Option(help="Free text kept with the experiment.")] = None):
    """Write an experiment and its trials in one transaction, then queue the trials."""
    from services import actions
    from services.queue import make_celery

    tags, note = _check_attribution(tag or [], note)
    settings = _settings()
    spec, text = _read_spec(spec_file, settings)
    engine = _engine(settings)
    with _action_errors():
        submitted = actions.submit(engine, make_celery(settings), spec=spec, spec_text=text, settings=settings,
                                   submitted_by=actions.default_submitter(settings), tags=tags, note=note,
                                   base_dir=spec_file.parent)
    if not json_output:
        typer.echo(f"experiment {submitted.experiment_id}: {len(submitted.trials)} trials queued")
    summary = _wait(engine, submitted.experiment_id, timeout=timeout, quiet=json_output) if wait else None
    if json_output:
        payload = {"experiment_id": submitted.experiment_id, "name": spec.name, "trial_ids": submitted.trial_ids,
                   "jobs": len(submitted.jobs) or len(submitted.trials)}
        if summary is not None:
            payload["summary"] = summary.as_json()
        typer.echo(json.dumps(payload))
    if summary is not None and summary.counts.get("failed", 0):
        raise typer.Exit(1)


@contextmanager
def _action_errors() -> Iterator[None]:
    """The one sentence of every error services.actions raises, with its exit code: 1 for rows written
    but not queued (the broker went away), 2 for everything a user can fix."""
    from services.actions import ExperimentNotFound, NotQueued
    from services.datasets import DatasetError
    from services.db import DatabaseUnreachable
    from services.queue import BrokerUnreachable
    from services.spec import SpecError

    try:
        yield
    except SpecError as exc:
        fail_spec(exc)
    except NotQueued as exc:
        fail(str(exc), code=1)
    except (DatasetError, BrokerUnreachable, DatabaseUnreachable, ExperimentNotFound) as exc:
        fail(str(exc))


MAX_SEARCH_CHARS = 200
# A trial records its worker as "<name>/<pid>" in 200 characters.
MAX_WORKER_NAME_CHARS = 150


def _check_attribution(tags: list[str], note: str | None) -> tuple[list[str], str | None]:
    """Tags stripped and de-duplicated (in order), an empty note dropped; caps keep them searchable."""
    from services.submission import MAX_NOTE_CHARS, MAX_TAGS, tag_problem, unique_tags

    tags = unique_tags(tags)
    if len(tags) > MAX_TAGS:
        fail(f"--tag was given {len(tags)} times; an experiment takes at most {MAX_TAGS} tags")
    for value in tags:
        if problem := tag_problem(value):
            fail(f"--tag {value[:20]!r} {problem}")
    note = note.strip() if note else None
    if note and len(note) > MAX_NOTE_CHARS:
        fail(f"--note is {len(note)} characters; shorten it to at most {MAX_NOTE_CHARS}")
    return tags, note or None


def _wait(engine, experiment_id: int, *, timeout: float, quiet: bool):
    from services.progress import ProgressReporter, WaitTimedOut, wait_for_experiment

    try:
        return wait_for_experiment(engine, experiment_id, timeout_s=timeout,
                                   reporter=None if quiet else ProgressReporter(sys.stderr))
    except WaitTimedOut as exc:
        fail(str(exc), code=1)


@app.command()
def status(experiment_id: Annotated[int | None, typer.Argument(help="One experiment; default all.",
                                                                   callback=_id_in_range)] = None,
           json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
           limit: Annotated[int, typer.Option(min=1, max=10_000, help="Newest N experiments.")] = 50,
           search: Annotated[str | None, typer.Option(help="Only experiments whose name, description, note, "
                                                          "tags or submitter contain this text.")] = None):
    """Experiments with their trial counts per status."""
    from services.db import session_scope
    from services.queries import list_experiments

    if search is not None and len(search) > MAX_SEARCH_CHARS:
        fail(f"--search is {len(search)} characters; search for at most {MAX_SEARCH_CHARS}")
    settings = _settings()
    engine = _engine(settings)
    with session_scope(engine) as session:
        ids = [experiment_id] if experiment_id is not None else None
        summaries = list_experiments(session, experiment_ids=ids, limit=limit, search=search)
    if experiment_id is not None and not summaries:
        fail(f"experiment {experiment_id} does not exist; `fitscope status` lists them")
    if json_output:
        typer.echo(json.dumps([s.as_json() for s in summaries]))
        return
    if not summaries and search:
        typer.echo(f"no experiment matches {terminal_text(repr(search))}")
        return
    if not summaries:
        typer.echo("no experiments yet; submit one with `fitscope submit examples/quickstart.yaml`")
        return
    statuses = list(summaries[0].counts)
    typer.echo(f"{'id':>5}  {'name':<28} {'trials':>6} " + " ".join(f"{s:>9}" for s in statuses) + "  progress")
    for s in summaries:
        counts = " ".join(f"{s.counts[k]:>9}" for k in statuses)
        typer.echo(f"{s.id:>5}  {terminal_text(s.name)[:28]:<28} {s.trials:>6} {counts}  {s.progress:7.1%}")
        if s.tags or s.note:
            labels = " ".join(f"#{terminal_text(t)}" for t in s.tags)
            note = terminal_text((s.note or "").replace("\n", " "))
            typer.echo(f"{'':>7}{labels}{'  ' if labels and note else ''}{note[:100]}")


@app.command()
def cancel(experiment_id: Annotated[int, typer.Argument(help="Experiment to cancel.", callback=_id_in_range)],
           json_output: JsonOption = False):
    """Cancel queued trials now; running ones stop at their next epoch boundary and keep their rows."""
    from services import actions

    settings = _settings()
    engine = _engine(settings)
    with _action_errors():
        done = actions.cancel(engine, experiment_id=experiment_id, cancelled_by=actions.default_submitter(settings))
    if json_output:
        typer.echo(json.dumps(done.as_json()))
        return
    typer.echo(f"experiment {experiment_id}: {done.cancelled} queued trials cancelled, "
               f"{done.stopping} running trials asked to stop")


@app.command()
def requeue(experiment_id: Annotated[int, typer.Argument(help="Experiment whose trials to re-run.",
                                                                  callback=_id_in_range)],
            status_: Annotated[list[str], typer.Option("--status", help="Statuses to re-queue (repeatable).")]
            = ["failed", "cancelled"],  # noqa: B006 - typer needs a literal default
            json_output: JsonOption = False):
    """Re-queue ended trials (default: failed and cancelled) with fresh attempts."""
    from services import actions
    from services.queue import make_celery

    for value in status_:
        if value not in actions.REQUEUEABLE:
            fail(f"--status {value!r} is not a re-queueable status; use one of {', '.join(actions.REQUEUEABLE)}")
    settings = _settings()
    engine = _engine(settings)
    with _action_errors():
        done = actions.requeue(engine, make_celery(settings), experiment_id=experiment_id, settings=settings,
                               statuses=tuple(status_), requeued_by=actions.default_submitter(settings))
    if json_output:
        typer.echo(json.dumps(done.as_json()))
        return
    typer.echo(f"experiment {experiment_id}: {len(done.trial_ids)} trials re-queued")


@app.command()
def export(experiment_id: Annotated[int, typer.Argument(help="Experiment to export.", callback=_id_in_range)],
           what: Annotated[ExportWhat, typer.Option(help="epochs: one row per trial and epoch; "
                                                         "trials: one row per trial.")] = ExportWhat.trials,
           format_: Annotated[ExportFormat, typer.Option("--format", help="csv, json, or parquet (typed columns; "
                                                                         "needs --output)."
                                                         )] = ExportFormat.csv,
           output: Annotated[Path | None, typer.Option("-o", "--output", help="File; default stdout.")] = None):
    """Export an experiment's trials or per-epoch metrics as CSV, JSON or Parquet."""
    from services.db import session_scope
    from services.export import write_parquet, write_rows
    from services.queries import epoch_rows, get_experiment, trial_rows
    from services.trials import EPOCH_METRIC_FIELDS

    if format_ == ExportFormat.parquet and output is None:
        fail("--format parquet writes a binary file; give one with --output, e.g. -o "
             f"experiment-{experiment_id}-{what.value}.parquet")
    engine = _engine(_settings())
    with session_scope(engine) as session:
        if get_experiment(session, experiment_id) is None:
            fail(f"experiment {experiment_id} does not exist; `fitscope status` lists them")
        rows = epoch_rows(session, experiment_id) if what == ExportWhat.epochs else trial_rows(session, experiment_id)
    if output is not None and output.is_dir():
        fail(f"--output {str(output)!r} is a folder; give a file name such as {output / 'epochs.csv'}")
    if output is not None and not output.parent.is_dir():
        fail(f"--output folder {str(output.parent)!r} does not exist; create it or choose another path")
    try:
        if output is None:
            write_rows(rows, sys.stdout, format_.value)
            return
        if format_ == ExportFormat.parquet:
            columns = ["trial_id", "epoch", *EPOCH_METRIC_FIELDS] if what == ExportWhat.epochs else None
            write_parquet(rows, str(output), columns=columns)
        else:
            with open(output, "w", newline="", encoding="utf-8") as stream:
                write_rows(rows, stream, format_.value)
    except OSError as exc:  # a full disk (/dev/full), a closed pipe, a quota, no permission
        fail(f"--output {str(output or '-')!r} could not be written ({exc.strerror or type(exc).__name__}); "
             "free some space or choose another path", code=1)
    typer.echo(f"wrote {len(rows)} rows to {output}", err=True)


@app.command()
def worker(queues: Annotated[str, typer.Option(help="Comma-separated queues: cpu, gpu.")] = "cpu",
           concurrency: Annotated[int | None, typer.Option(
               min=1, max=256, help="Training processes; default FITSCOPE_WORKER_CONCURRENCY, else one per "
               "usable CPU (affinity mask and container CPU quota).")] = None,
           name: Annotated[str | None, typer.Option(help="Worker name, unique among running workers; "
                                                        "default fitscope-PID@HOST.")] = None,
           loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO"):
    """Run a Celery worker that trains trials from the given queues."""
    from services.config import ConfigError
    from services.queue import QUEUES, BrokerUnreachable, check_broker
    from worker.celery_app import create_app, run_worker

    chosen = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in chosen if q not in QUEUES]
    if not chosen or unknown:
        fail(f"--queues {queues!r} names unknown queues; use cpu, gpu or cpu,gpu")
    if name is not None and not 0 < len(name) <= MAX_WORKER_NAME_CHARS:
        fail(f"--name is {len(name)} characters; give a name of 1 to {MAX_WORKER_NAME_CHARS} characters")
    if name is not None and not name.isprintable():  # escapes and bidirectional controls reach every terminal
        fail(f"--name {name[:40]!r} contains control or formatting characters; give a name of letters, digits "
             "and punctuation")
    if name is not None and "/" in name:
        fail(f"--name {name!r} contains '/', which separates a worker's name from its process id in trial "
             "records; give a name without '/'")
    # The name keys the worker's row in the database: two workers on one machine need two names.
    node = name or f"fitscope-{os.getpid()}@{socket.gethostname()}"
    settings = _settings()
    engine = _engine(settings)
    _refuse_a_name_in_use(engine, node, lost_after_s=settings.worker_lost_after_s)
    engine.dispose()  # nothing inherited into the pool's forked processes
    try:
        celery_app = create_app(settings)  # checks the checkpoint store, among others
    except ConfigError as exc:
        fail(str(exc))
    try:
        check_broker(celery_app)
    except BrokerUnreachable as exc:
        fail(str(exc))
    argv = ["worker", f"--loglevel={loglevel}", f"--queues={','.join(chosen)}",
            f"--concurrency={concurrency or settings.effective_worker_concurrency}", "--without-gossip",
            "--without-mingle"]
    argv.append(f"--hostname={node}")
    raise typer.Exit(run_worker(celery_app, argv))  # non-zero when the worker stopped on an error


def _refuse_a_name_in_use(engine, node: str, *, lost_after_s: float) -> None:
    """Two live workers of one name would share one row and take each other's trials for a dead
    worker's; a row of this very host and pid is this process's previous life, taken over at start."""
    from services.db import session_scope
    from services.workers import name_in_use

    with session_scope(engine) as session:
        other = name_in_use(session, node, host=socket.gethostname(), pid=os.getpid(), lost_after_s=lost_after_s)
    if other:
        fail(f"--name {node!r} is taken by a running worker on {other['host']} (pid {other['pid']}, last beat "
             f"{other['seconds_since_heartbeat']:.0f} s ago); stop that worker or give this one another --name")


@app.command()
def workers(json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False):
    """Workers that have registered: online, stopped, or lost (silent for FITSCOPE_WORKER_LOST_AFTER_S)."""
    from services.db import session_scope
    from services.workers import list_workers

    settings = _settings()
    engine = _engine(settings)
    with session_scope(engine) as session:
        rows = list_workers(session, lost_after_s=settings.worker_lost_after_s)
    if json_output:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo("no workers yet; start one with `fitscope worker`")
        return
    typer.echo(f"{'name':<36} {'status':<8} {'queues':<8} {'device':<10} {'torch':<12} {'processes':>9} "
               f"{'last beat':>10}  trials")
    for row in rows:
        trials = ",".join(map(str, row["current_trials"][:10])) + ("..." if len(row["current_trials"]) > 10 else "")
        row = {key: terminal_text(value) if isinstance(value, str) else value for key, value in row.items()}
        typer.echo(f"{row['name'][:36]:<36} {row['status']:<8} {terminal_text(','.join(row['queues'])):<8} "
                   f"{row['device'][:10]:<10} {(row['torch_version'] or '-')[:12]:<12} "
                   f"{row['concurrency'] or '-':>9} {row['seconds_since_heartbeat']:>4.0f} s ago  {trials or '-'}")


@app.command()
def dashboard():
    """Run the dashboard on FITSCOPE_BIND_HOST:FITSCOPE_DASHBOARD_PORT (the compose file's dashboard)."""
    from services.launcher import dashboard_command, exposure_warning

    settings = _settings()
    _check_sign_in(settings)
    if warning := exposure_warning(settings):
        typer.echo(warning, err=True)
    _engine(settings).dispose()  # refuse a database whose schema is not at head, with the fix
    command = dashboard_command(settings)
    os.execv(command[0], command)


def _check_sign_in(settings) -> None:
    """Refuse (exit 2, one sentence) a dashboard beyond loopback without sign-in, or half-configured sign-in."""
    from services.config import ConfigError
    from services.signin import required_config

    try:
        required_config(settings)
    except ConfigError as exc:
        fail(str(exc))


@app.command()
def up():
    """Run everything on this machine: broker (embedded unless configured), migrations, one worker and
    the dashboard. Ctrl-C stops them all."""
    from services.launcher import LaunchError, run_stack

    settings = _settings()
    _check_sign_in(settings)  # before anything starts
    try:
        raise typer.Exit(run_stack(settings, echo=typer.echo))
    except LaunchError as exc:
        fail(str(exc), code=1)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
               json_output: JsonOption = False):
    """Create or upgrade the schema (safe to run from several processes at once)."""
    from services.db import DatabaseUnreachable, describe_url
    from services.migrate import current_revision, upgrade

    settings = _settings()
    engine = _engine(settings, check_schema=False)
    try:
        before = current_revision(engine)  # one clear sentence when the database does not answer
    except DatabaseUnreachable as exc:
        fail(str(exc))
    from alembic.util import CommandError

    try:
        upgrade(settings.effective_database_url, revision)
    except CommandError as exc:  # e.g. a revision that does not exist
        fail(f"cannot upgrade to revision {revision!r} ({str(exc).splitlines()[0]}); use head, or an id that "
             "`alembic history` lists")
    database, after = describe_url(engine), current_revision(engine)
    if json_output:
        typer.echo(json.dumps({"database": database, "from": before, "to": after}))
    else:
        typer.echo(f"database at {database} is at {after}")


@db_app.command("current")
def db_current():
    """Print the schema revision of the database and the one this fitscope needs."""
    from services.db import DatabaseUnreachable
    from services.migrate import current_revision, head_revision

    engine = _engine(_settings(), check_schema=False)
    try:
        typer.echo(json.dumps({"current": current_revision(engine), "head": head_revision()}))
    except DatabaseUnreachable as exc:
        fail(str(exc))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
