"""Submission: one transaction writes an experiment and all its trials. Never commits itself;
the caller commits (session_scope) and only then sends the queue messages."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from services.models import Experiment, Trial, TrialStatus
from services.spec import GridSpec, expand


@dataclass(frozen=True)
class Submitted:
    experiment_id: int
    trials: list[tuple[int, str]]  # (trial id, queue), in grid order

    @property
    def trial_ids(self) -> list[int]:
        return [trial_id for trial_id, _ in self.trials]


def submit(session: Session, *, spec: GridSpec, spec_text: str, submitted_by: str | None,
           max_trials: int) -> Submitted:
    """Write the experiment and one ``queued`` trial per expanded configuration. A second submit of
    the same spec is a new experiment. Raises SpecError before writing anything."""
    configs = expand(spec, max_trials=max_trials)
    experiment = Experiment(
        name=spec.name,
        description=spec.description,
        method=spec.method,
        metric_name=spec.metric_name,
        metric_goal=spec.metric_goal,
        spec=spec.raw,
        spec_text=spec_text,
        submitted_by=submitted_by,
        epochs_planned=sum(config.epochs for config in configs),
    )
    session.add(experiment)
    session.flush()
    rows = [
        {
            "experiment_id": experiment.id,
            "ordinal": ordinal,
            "config": config.model_dump(mode="json"),
            "seed": config.seed,
            "queue": config.queue,
            "status": TrialStatus.queued,
            "attempts": 0,
            "cancel_requested": False,
            "epochs_done": 0,
        }
        for ordinal, config in enumerate(configs)
    ]
    # Executemany in one round trip per batch; ids are read back in grid order.
    session.execute(insert(Trial), rows)
    trials = session.execute(
        select(Trial.id, Trial.queue).where(Trial.experiment_id == experiment.id).order_by(Trial.ordinal)
    ).all()
    return Submitted(experiment_id=experiment.id, trials=[(row.id, row.queue) for row in trials])
