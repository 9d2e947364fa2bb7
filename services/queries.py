"""The read side that the CLI and the dashboard share. Returns plain DTOs and rows, never ORM objects."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import String, cast, func, or_, select
from sqlalchemy.orm import Session

from services.models import TERMINAL_STATUSES, EpochMetric, Experiment, Trial, TrialArtifact, TrialStatus
from services.trials import EPOCH_METRIC_FIELDS


@dataclass(frozen=True)
class ExperimentSummary:
    id: int
    name: str
    method: str
    submitted_by: str | None
    created_at: datetime
    trials: int
    counts: dict[str, int] = field(default_factory=dict)  # every TrialStatus, zeros included
    epochs_done: int = 0
    epochs_planned: int = 0
    tags: list[str] = field(default_factory=list)
    note: str | None = None

    @property
    def ended(self) -> int:
        return sum(self.counts.get(status, 0) for status in TERMINAL_STATUSES)

    @property
    def finished(self) -> bool:
        return self.ended == self.trials

    @property
    def progress(self) -> float:
        """Fraction of planned epochs done, counting ended trials as complete (0..1)."""
        return 1.0 if self.finished else (self.epochs_done / self.epochs_planned if self.epochs_planned else 0.0)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        data["progress"] = round(self.progress, 4)
        data["finished"] = self.finished
        return data


def list_experiments(session: Session, *, experiment_ids: list[int] | None = None,
                     limit: int = 500, search: str | None = None) -> list[ExperimentSummary]:
    """Experiments newest first, each with trial counts per status and epoch progress. ``search``
    keeps those whose name, description, note, tags or submitter contain it (any case)."""
    query = select(Experiment).order_by(Experiment.id.desc()).limit(limit)
    if experiment_ids is not None:
        query = query.where(Experiment.id.in_(experiment_ids))
    if search and search.strip():
        pattern = f"%{_escape_like(search.strip().lower())}%"
        query = query.where(or_(*(
            func.lower(column).like(pattern, escape="\\")
            for column in (Experiment.name, Experiment.description, Experiment.note, Experiment.submitted_by,
                           cast(Experiment.tags, String))
        )))
    experiments = session.scalars(query).all()
    if not experiments:
        return []
    ids = [experiment.id for experiment in experiments]
    counts: dict[int, dict[str, int]] = {i: {status.value: 0 for status in TrialStatus} for i in ids}
    epochs_done: dict[int, int] = dict.fromkeys(ids, 0)
    for experiment_id, status, n, done in session.execute(
        select(Trial.experiment_id, Trial.status, func.count(), func.sum(Trial.epochs_done))
        .where(Trial.experiment_id.in_(ids)).group_by(Trial.experiment_id, Trial.status)
    ):
        counts[experiment_id][status] = n
        epochs_done[experiment_id] += int(done or 0)
    return [
        ExperimentSummary(
            id=e.id, name=e.name, method=e.method, submitted_by=e.submitted_by, created_at=e.created_at,
            trials=sum(counts[e.id].values()), counts=counts[e.id],
            epochs_done=epochs_done[e.id], epochs_planned=e.epochs_planned,
            tags=list(e.tags or []), note=e.note,
        )
        for e in experiments
    ]


def get_experiment(session: Session, experiment_id: int) -> ExperimentSummary | None:
    found = list_experiments(session, experiment_ids=[experiment_id])
    return found[0] if found else None


def trial_rows(session: Session, experiment_id: int) -> list[dict[str, Any]]:
    """One flat row per trial: id, status, verdict, parameter count, every config parameter, every
    final metric, and the diagnosis's measured numbers as ``diag_<name>`` (thresholds left out)."""
    trials = session.scalars(
        select(Trial).where(Trial.experiment_id == experiment_id).order_by(Trial.ordinal)
    ).all()
    rows = []
    for trial in trials:
        row: dict[str, Any] = {
            "trial_id": trial.id, "ordinal": trial.ordinal, "status": trial.status, "attempts": trial.attempts,
            "worker": trial.worker, "epochs_done": trial.epochs_done, "best_epoch": trial.best_epoch,
            "started_at": _iso(trial.started_at), "finished_at": _iso(trial.finished_at), "error": trial.error,
            "verdict": trial.verdict, "parameter_count": trial.parameter_count,
        }
        row.update(trial.config)
        row.update(trial.final_metrics or {})
        numbers = (trial.diagnosis or {}).get("numbers", {})
        row.update({f"diag_{name}": value for name, value in numbers.items()
                    if not name.endswith("_limit") and name != "tail_fraction"})
        rows.append(row)
    return rows


def trial_artifacts(session: Session, trial_id: int) -> dict[str, dict]:
    """A trial's prediction artifacts, kind (curve_1d, boundary_2d) -> its JSON data; {} when none."""
    result = session.execute(select(TrialArtifact.kind, TrialArtifact.data).where(TrialArtifact.trial_id == trial_id))
    return {kind: data for kind, data in result}


def epoch_rows(session: Session, experiment_id: int) -> list[dict[str, Any]]:
    """Every per-epoch row of an experiment, with its trial id, ordered by trial then epoch."""
    columns = [getattr(EpochMetric, name) for name in EPOCH_METRIC_FIELDS]
    result = session.execute(
        select(EpochMetric.trial_id, EpochMetric.epoch, *columns)
        .join(Trial, Trial.id == EpochMetric.trial_id)
        .where(Trial.experiment_id == experiment_id)
        .order_by(EpochMetric.trial_id, EpochMetric.epoch)
    )
    return [dict(row._mapping) for row in result]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
