"""Where a running job's checkpoint lives: one row per job in ``job_checkpoints`` (found by the job's
first trial id, its *anchor*), holding the bytes itself (the default) or, with
``FITSCOPE_CHECKPOINT_URL=file:///shared/dir``, the URL of a file in a folder every worker can reach.
No torch here: a checkpoint is opaque bytes to this module.

Like every helper of a noun, these take a session and never commit, so a checkpoint is saved in the
same transaction as the epoch rows up to its epoch. A file store keeps files and rows consistent
across that transaction: each save writes a new file (named by attempt and epoch, written to a
temporary name and renamed into place), and files are removed only once the transaction that
stopped pointing at them has committed, or, for a new file, once its transaction rolled back.

Every save and delete names the attempt's token; the caller guards it by the trials it still holds
in the same transaction (services.trials), and a delete touches only its own attempt's row.

Size: a checkpoint above :data:`MAX_CHECKPOINT_BYTES` is not saved (the job trains on, and would
start over if its worker died). The cap fits the largest job the planner makes: at most
FUSED_WEIGHT_BUDGET weights stacked, kept five times (weights, best weights, two Adam moments and
slack) at 4 bytes, plus 16 MiB for generators and metrics - 176 MiB; a single trial too wide to fuse
gets at least the old 64 MiB (an Adam-trained MLP of about three million parameters).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sqlalchemy import bindparam, delete, event, insert, select, update
from sqlalchemy.orm import Session

from services.config import ConfigError
from services.models import JobCheckpoint, Trial, utcnow
from services.planner import FUSED_WEIGHT_BUDGET

log = logging.getLogger(__name__)
MAX_CHECKPOINT_BYTES = max(64 * 2**20, 5 * 4 * FUSED_WEIGHT_BUDGET + 16 * 2**20)


class CheckpointNotSaved(RuntimeError):
    """This checkpoint could not be stored (too large, or its file could not be written); the job
    goes on without it and keeps its previous one."""


@dataclass(frozen=True)
class StoredCheckpoint:
    first_trial_id: int  # the job's anchor
    trial_ids: list[int]  # the job's trials, in the engine's order
    attempt_token: str  # the attempt that owns it
    epoch: int  # the last epoch whose metrics it includes
    data: bytes


class DatabaseStore:
    """Checkpoint bytes in the ``data`` column: nothing to configure, reachable by every worker."""

    def check(self) -> None:
        """Nothing to check: the database is checked when the worker starts."""

    def save(self, session: Session, *, trial_ids: list[int], token: str, epoch: int, data: bytes,
             first_trial_id: int | None = None) -> None:
        """Replace the checkpoint of the job anchored at ``first_trial_id`` (default: the first of
        ``trial_ids``, the stack it holds) with ``data`` (raises CheckpointNotSaved when too large)."""
        anchor = trial_ids[0] if first_trial_id is None else first_trial_id
        _check_size(data, trial_ids=trial_ids, epoch=epoch)
        previous = _location(session, anchor)
        _upsert(session, anchor, trial_ids=trial_ids, token=token, epoch=epoch, data=data, location=None,
                size=len(data))
        if previous:  # the store was switched from a folder to the database
            _after_commit(session, lambda: _remove_file(previous))


class DirectoryStore:
    """Checkpoint files under ``root``, one folder per job; the row keeps the file's URL."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def check(self) -> None:
        """Raise ConfigError (one sentence) when the folder cannot be created or written."""
        probe = self.root / f".fitscope-write-test-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"FITSCOPE_CHECKPOINT_URL names the folder {self.root}, which cannot be written "
                f"({exc.strerror or exc}); point it at a writable folder every worker can reach"
            ) from None

    def save(self, session: Session, *, trial_ids: list[int], token: str, epoch: int, data: bytes,
             first_trial_id: int | None = None) -> None:
        """Write a new file, point the job's row at it, and remove the old file after the commit
        (or the new one after a rollback). Raises CheckpointNotSaved before touching the database
        when the file cannot be written."""
        anchor = trial_ids[0] if first_trial_id is None else first_trial_id
        _check_size(data, trial_ids=trial_ids, epoch=epoch)
        path = self.root / f"job-{anchor}" / f"attempt-{token}-epoch-{epoch}.pt"
        try:
            _write_atomically(path, data)
        except OSError as exc:
            raise CheckpointNotSaved(f"job of trial {anchor}: cannot write the checkpoint {path} ({exc})") from None
        previous = _location(session, anchor)
        _upsert(session, anchor, trial_ids=trial_ids, token=token, epoch=epoch, data=None, location=path.as_uri(),
                size=len(data))
        if previous and previous != path.as_uri():
            _after_commit(session, lambda: _remove_file(previous))
        _after_rollback(session, lambda: _remove_file(path.as_uri()))


CheckpointStore = DatabaseStore | DirectoryStore


def checkpoint_store(url: str | None) -> CheckpointStore:
    """The store ``FITSCOPE_CHECKPOINT_URL`` names: None or "" is the database, ``file:///dir`` a
    folder. Anything else raises ConfigError with one sentence naming the setting."""
    if not url:
        return DatabaseStore()
    parts = urlsplit(url)
    if parts.scheme == "file" and parts.netloc in ("", "localhost") and parts.path.startswith("/"):
        return DirectoryStore(Path(unquote(parts.path)))
    raise ConfigError(
        f"FITSCOPE_CHECKPOINT_URL={url!r} is not a checkpoint location fitscope can use; give a folder "
        "every worker can reach as file:///absolute/path, or unset it to keep checkpoints in the database"
    )


def load_checkpoint(session: Session, first_trial_id: int) -> StoredCheckpoint | None:
    """The checkpoint of the job anchored at ``first_trial_id``, wherever its row says the bytes are;
    None when there is none or its file is gone or the wrong size (logged: the job then starts over)."""
    trial_id = first_trial_id
    row = session.execute(
        select(JobCheckpoint.trial_ids, JobCheckpoint.attempt_token, JobCheckpoint.epoch, JobCheckpoint.data,
               JobCheckpoint.location, JobCheckpoint.size_bytes).where(JobCheckpoint.first_trial_id == trial_id)
    ).one_or_none()
    if row is None:
        return None
    data = row.data
    if data is None:
        try:
            path = _path_of(row.location)
            size = path.stat().st_size  # checked before reading: never read more than the cap
            if size != row.size_bytes or size > MAX_CHECKPOINT_BYTES:
                raise ValueError(f"the file has {size} bytes, not the {row.size_bytes} recorded")
            data = path.read_bytes()
        except (OSError, ValueError) as exc:
            log.warning("job of trial %s: its checkpoint %s cannot be read (%s); it starts over", trial_id,
                        row.location, exc)
            return None
    if len(data) != row.size_bytes:
        log.warning("job of trial %s: its checkpoint has %d bytes, not the %d recorded; it starts over", trial_id,
                    len(data), row.size_bytes)
        return None
    return StoredCheckpoint(first_trial_id=trial_id, trial_ids=[int(i) for i in row.trial_ids],
                            attempt_token=row.attempt_token, epoch=row.epoch, data=bytes(data))


def checkpointed_jobs(session: Session, trials: list[tuple[int, str]]
                      ) -> tuple[list[tuple[list[int], str]], list[tuple[int, str]]]:
    """Of these (trial id, queue) pairs (a lost worker's running trials), the jobs that have a checkpoint
    of the attempt that runs them, as the messages that resume them: (the anchor, then the checkpoint's
    stack; the first trial's queue), and the pairs left over."""
    queues = dict(trials)
    tokens = dict(session.execute(select(Trial.id, Trial.attempt_token).where(Trial.id.in_(list(queues)))).all())
    jobs = []
    rows = session.execute(select(JobCheckpoint.first_trial_id, JobCheckpoint.trial_ids, JobCheckpoint.attempt_token))
    for anchor, trial_ids, token in rows.all():
        held = [trial_id for trial_id in trial_ids if trial_id in queues and tokens.get(trial_id) == token]
        if held:
            jobs.append(([anchor, *(trial_id for trial_id in trial_ids if trial_id != anchor)], queues[held[0]]))
            for trial_id in held:
                del queues[trial_id]
    return jobs, list(queues.items())


def adopt_checkpoint(session: Session, first_trial_id: int, *, token: str) -> None:
    """A takeover resumes this checkpoint: it is the new attempt's now (saves and deletes name it)."""
    session.execute(update(JobCheckpoint).where(JobCheckpoint.first_trial_id == first_trial_id)
                    .values(attempt_token=token).execution_options(synchronize_session=False))


_CHECKPOINTS = JobCheckpoint.__table__
_DELETE_CHECKPOINTS = delete(_CHECKPOINTS).where(
    _CHECKPOINTS.c.first_trial_id.in_(bindparam("first_trial_ids", expanding=True))).returning(_CHECKPOINTS.c.location)
_DELETE_ATTEMPTS_CHECKPOINTS = delete(_CHECKPOINTS).where(
    _CHECKPOINTS.c.first_trial_id.in_(bindparam("first_trial_ids", expanding=True)),
    _CHECKPOINTS.c.attempt_token == bindparam("token")).returning(_CHECKPOINTS.c.location)


def delete_checkpoints(session: Session, first_trial_ids: Iterable[int], *, token: str | None = None) -> None:
    """Remove the checkpoints of the jobs anchored at these trials (with ``token``, only the one that
    attempt owns): rows now, files once the transaction has committed."""
    ids = list(first_trial_ids)
    if not ids:
        return
    # One statement, built once (a claim runs this for every job): the rows go and their files' names come back.
    if token is None:
        deleted = session.execute(_DELETE_CHECKPOINTS, {"first_trial_ids": ids})
    else:
        deleted = session.execute(_DELETE_ATTEMPTS_CHECKPOINTS, {"first_trial_ids": ids, "token": token})
    locations = [location for location in deleted.scalars() if location is not None]
    if locations:
        _after_commit(session, lambda: [_remove_file(location, folder_too=True) for location in locations])


def _check_size(data: bytes, *, trial_ids: list[int], epoch: int) -> None:
    if len(data) > MAX_CHECKPOINT_BYTES:
        raise CheckpointNotSaved(
            f"job of trials {trial_ids[:5]}{'...' if len(trial_ids) > 5 else ''}: the checkpoint of epoch {epoch} is "
            f"{len(data) / 2**20:.0f} MiB, over the {MAX_CHECKPOINT_BYTES / 2**20:.0f} MiB cap; the job trains on "
            "without checkpoints")


def _location(session: Session, first_trial_id: int) -> str | None:
    return session.scalar(select(JobCheckpoint.location).where(JobCheckpoint.first_trial_id == first_trial_id))


def _upsert(session: Session, first_trial_id: int, *, trial_ids: list[int], token: str, epoch: int,
            data: bytes | None, location: str | None, size: int) -> None:
    # UPDATE, then INSERT when there was no row: portable, and only an attempt that holds trials of the
    # job (checked by the caller in this transaction) ever writes its checkpoint.
    values = {"trial_ids": list(trial_ids), "attempt_token": token, "epoch": epoch, "data": data,
              "location": location, "size_bytes": size, "created_at": utcnow()}
    updated = session.execute(
        update(JobCheckpoint).where(JobCheckpoint.first_trial_id == first_trial_id).values(**values)
        .execution_options(synchronize_session=False)
    ).rowcount
    if updated == 0:
        session.execute(insert(JobCheckpoint).values(first_trial_id=first_trial_id, **values))


def _write_atomically(path: Path, data: bytes) -> None:
    """Readers see the whole file or none: write a temporary file, flush it to disk, rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _path_of(location: str | None) -> Path:
    parts = urlsplit(location or "")
    if parts.scheme != "file":
        raise ValueError(f"{location!r} is not a file:// URL")
    return Path(unquote(parts.path))


def _remove_file(location: str, *, folder_too: bool = False) -> None:
    """Best effort: a file left behind wastes space but is never read (no row points to it)."""
    try:
        path = _path_of(location)
        path.unlink(missing_ok=True)
        if folder_too:
            # Left by a worker that died between commit and removal (*.pt), or mid-write (.*.tmp).
            for stray in [*path.parent.glob("*.pt"), *path.parent.glob(".*.tmp")]:
                stray.unlink(missing_ok=True)
            path.parent.rmdir()
    except FileNotFoundError:
        pass  # already gone: removing is all that was asked
    except (OSError, ValueError) as exc:
        log.warning("could not remove the checkpoint file %s (%s)", location, exc)


def _after_commit(session: Session, action: Callable[[], object]) -> None:
    event.listen(session, "after_commit", lambda _session: action(), once=True)


def _after_rollback(session: Session, action: Callable[[], object]) -> None:
    event.listen(session, "after_soft_rollback", lambda _session, _previous: action(), once=True)
