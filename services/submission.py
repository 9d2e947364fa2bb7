"""Submission: one transaction writes an experiment and all its trials. Never commits itself;
the caller commits (session_scope) and only then sends the queue messages."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from services.admission import check_admission, csv_shape
from services.datasets import CsvLimits, resolve_csv_configs
from services.fine_tuning import parent_problems
from services.models import Experiment, Trial, TrialStatus
from services.planner import plan_jobs
from services.safe_text import bidi_problem
from services.spec import GridSpec, SpecError, expand
from services.trial_config import TrialConfig
from services.workers import training_processes

# Caps on an experiment's attribution, so a shared database stays searchable; the CLI and the
# dashboard check them, each naming its own field.
MAX_TAGS, MAX_TAG_CHARS, MAX_NOTE_CHARS = 20, 50, 2000


def tag_problem(tag: str) -> str | None:
    """What is wrong with one (stripped) tag, as the end of a sentence that starts with the field's
    name and the tag, or None: the CLI and the dashboard refuse the same tags."""
    if len(tag) > MAX_TAG_CHARS:
        return f"is {len(tag)} characters; shorten it to at most {MAX_TAG_CHARS}"
    if any(ord(char) < 32 or 127 <= ord(char) < 160 for char in tag):
        return "contains a newline or another control character; give a tag on one line"
    if problem := bidi_problem("", tag):
        return problem.removeprefix(": ")
    return None


def unique_tags(tags) -> list[str]:
    """Tags stripped of surrounding blanks, empty ones dropped, each kept once in its first place."""
    return list(dict.fromkeys(tag.strip() for tag in tags if tag.strip()))


@dataclass(frozen=True)
class Submitted:
    experiment_id: int
    trials: list[tuple[int, str]]  # (trial id, queue), in grid order
    # What to send (services.planner): (trial ids, queue) per job; several ids train fused, one id
    # is an ordinary trial. Empty: one job per trial.
    jobs: list[tuple[list[int], str]] = field(default_factory=list)

    @property
    def trial_ids(self) -> list[int]:
        return [trial_id for trial_id, _ in self.trials]


def submit(session: Session, *, spec: GridSpec, spec_text: str, submitted_by: str | None,
           max_trials: int, base_dir: Path | None = None, csv_limits: CsvLimits | None = None,
           tags: list[str] | tuple[str, ...] = (), note: str | None = None,
           fuse: bool | None = None, fuse_max_trials: int | None = None,
           fuse_min_trials: int | None = None) -> Submitted:
    """Write the experiment and one ``queued`` trial per expanded configuration. A second submit of
    the same spec is a new experiment. Raises SpecError before writing anything, DatasetError when a
    CSV data set (its path relative to ``base_dir``; default the working directory) is not valid.

    Trials that can train together are planned into fused jobs (services.planner) unless the spec
    says ``fuse: false`` or ``fuse`` (default FITSCOPE_FUSE) is off; at most ``fuse_max_trials``
    (default FITSCOPE_FUSE_MAX_TRIALS) per job. Each queue gets at least as many jobs as the online
    workers that consume it have training processes, while halves of ``fuse_min_trials`` (default
    FITSCOPE_FUSE_MIN_TRIALS) or more can be split off (read in this session: services.workers)."""
    from services.config import get_settings

    # Text every viewer sees must read in the order it is stored (the CLI and the dashboard both land here).
    if problems := [p for field, text in (("name", spec.name), ("description", spec.description), ("note", note),
                                          ("submitted_by", submitted_by), *(("tag", tag) for tag in tags))
                    if (p := bidi_problem(field, text))]:
        raise SpecError(problems[:1])
    configs = expand(spec, max_trials=max_trials)
    settings = get_settings()
    csv_limits = csv_limits or CsvLimits.from_settings(settings)
    fuse = settings.fuse if fuse is None else fuse
    fuse_max_trials = fuse_max_trials or settings.fuse_max_trials
    fuse_min_trials = fuse_min_trials or settings.fuse_min_trials
    configs = resolve_csv_configs(configs, base_dir=base_dir, limits=csv_limits, session=session)
    if problems := check_admission(configs, cap_mb=settings.max_trial_memory_mb,
                                   csv_shape_of=lambda config: csv_shape(session, config)):
        raise SpecError(problems)
    if problems := parent_problems(session, configs, csv_shape_of=lambda config: csv_shape(session, config)):
        raise SpecError(problems)  # init_from: a missing or unfinished parent, or another first layer
    experiment = Experiment(
        name=spec.name,
        description=spec.description,
        method=spec.method,
        metric_name=spec.metric_name,
        metric_goal=spec.metric_goal,
        spec=spec.raw,
        spec_text=spec_text,
        submitted_by=submitted_by,
        tags=list(tags),
        note=note,
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
    trial_list = [(row.id, row.queue) for row in trials]
    if spec.fuse and fuse:
        planned = _plan_per_queue(session, configs, [queue for _, queue in trial_list], max_trials=fuse_max_trials,
                                  min_trials=fuse_min_trials, lost_after_s=settings.worker_lost_after_s)
        jobs = [([trial_list[i][0] for i in job], trial_list[job[0]][1]) for job in planned]
    else:
        jobs = [([trial_id], queue) for trial_id, queue in trial_list]
    return Submitted(experiment_id=experiment.id, trials=trial_list, jobs=jobs)


def plan_requeue(session: Session, trials: list[tuple[int, str]], *, fuse: bool, fuse_max_trials: int,
                 fuse_min_trials: int | None = None) -> list[tuple[list[int], str]]:
    """Jobs for re-queued trials (services.trials.requeue_trials), planned as a submission plans them:
    those that can train together go fused, split to fill the queue's online training processes
    (halves of at least ``fuse_min_trials``, default FITSCOPE_FUSE_MIN_TRIALS), unless the setting or
    their experiment's spec says ``fuse: false``. Call inside the re-queue's transaction; send with
    services.queue.enqueue_jobs."""
    from services.config import get_settings

    if not fuse or len(trials) < 2:
        return [([trial_id], queue) for trial_id, queue in trials]
    settings = get_settings()
    queues = dict(trials)
    rows = session.execute(
        select(Trial.id, Trial.config, Experiment.spec).join(Experiment, Trial.experiment_id == Experiment.id)
        .where(Trial.id.in_(list(queues))).order_by(Trial.experiment_id, Trial.ordinal)
    ).all()
    singles = [row.id for row in rows if (row.spec or {}).get("fuse") is False]
    fusing = [row for row in rows if (row.spec or {}).get("fuse") is not False]
    configs = [TrialConfig.model_validate(row.config) for row in fusing]
    jobs = [([trial_id], queues[trial_id]) for trial_id in singles]
    planned = _plan_per_queue(session, configs, [queues[row.id] for row in fusing], max_trials=fuse_max_trials,
                              min_trials=fuse_min_trials or settings.fuse_min_trials,
                              lost_after_s=settings.worker_lost_after_s,
                              busy=Counter(queues[trial_id] for trial_id in singles))
    for job in planned:
        ids = [fusing[i].id for i in job]
        jobs.append((ids, queues[ids[0]]))
    return jobs


def _plan_per_queue(session: Session, configs: list[TrialConfig], queues: list[str], *, max_trials: int,
                    min_trials: int, lost_after_s: float, busy: Counter[str] | None = None) -> list[list[int]]:
    """services.planner.plan_jobs once per queue (``queues[i]`` is where trial ``i`` is sent), each
    with as many slots as the online workers of that queue have training processes, less the
    ``busy`` ones other jobs of this plan will take; at least 1, which plans as if only one process
    were free (no worker online yet: it plans as before). Jobs in grid order of their first trial."""
    from services.config import get_settings

    memory_budget_mb = get_settings().max_trial_memory_mb
    members: dict[str, list[int]] = {}
    for index, queue in enumerate(queues):
        members.setdefault(queue, []).append(index)
    taken = busy or Counter()
    jobs: list[list[int]] = []
    for queue, indices in members.items():
        slots = training_processes(session, queue, lost_after_s=lost_after_s) - taken[queue]
        planned = plan_jobs([configs[i] for i in indices], max_trials=max_trials, slots=max(1, slots),
                            min_trials=min_trials, memory_budget_mb=memory_budget_mb)
        jobs += [[indices[i] for i in job] for job in planned]
    return sorted(jobs, key=lambda job: job[0])
