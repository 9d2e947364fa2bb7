"""ORM tables. Only table definitions live here; reads are in queries.py, writes in their nouns' modules."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from services.db import Base

# The largest id a command line or a queue message may name: a 64-bit integer, the largest SQLite
# binds (a larger one is refused with a sentence, not an OverflowError from the driver).
MAX_ID = 2**63 - 1


def utcnow() -> datetime:
    return datetime.now(UTC)


class TrialStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    diverged = "diverged"
    cancelled = "cancelled"


TERMINAL_STATUSES = frozenset(
    {TrialStatus.succeeded, TrialStatus.failed, TrialStatus.diverged, TrialStatus.cancelled}
)


class Experiment(Base):
    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    method: Mapped[str] = mapped_column(String(16))
    metric_name: Mapped[str] = mapped_column(String(100))
    metric_goal: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    spec_text: Mapped[str] = mapped_column(Text)
    submitted_by: Mapped[str | None] = mapped_column(String(200))
    cancelled_by: Mapped[str | None] = mapped_column(String(200), comment="who last cancelled it")
    requeued_by: Mapped[str | None] = mapped_column(String(200), comment="who last re-queued its trials")
    epochs_planned: Mapped[int] = mapped_column(Integer, comment="sum of the trials' epochs, for progress")
    tags: Mapped[list[str]] = mapped_column(JSON, default=list, comment="short labels to find it by")
    note: Mapped[str | None] = mapped_column(Text, comment="free text from the submitter")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    trials: Mapped[list[Trial]] = relationship(back_populates="experiment", order_by="Trial.ordinal")


class Trial(Base):
    __tablename__ = "trials"
    __table_args__ = (
        UniqueConstraint("experiment_id", "ordinal"),
        Index("ix_trials_experiment_id_status", "experiment_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    ordinal: Mapped[int] = mapped_column(Integer, comment="0-based position in the expanded grid")
    config: Mapped[dict[str, Any]] = mapped_column(JSON, comment="the resolved TrialConfig")
    seed: Mapped[int] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default=TrialStatus.queued)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    attempt_token: Mapped[str | None] = mapped_column(
        String(32), comment="the running attempt's token: every write of that attempt is guarded by it")
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    worker: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    epochs_done: Mapped[int] = mapped_column(Integer, default=0)
    best_epoch: Mapped[int | None] = mapped_column(Integer)
    final_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    parameter_count: Mapped[int | None] = mapped_column(Integer, comment="the x-axis of capacity plots")
    verdict: Mapped[str | None] = mapped_column(
        String(16), comment="fit diagnosis: underfit, overfit, good_fit, diverged, not_converged")
    diagnosis: Mapped[dict[str, Any] | None] = mapped_column(JSON, comment="the numbers that decided the verdict")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    experiment: Mapped[Experiment] = relationship(back_populates="trials")


class EpochMetric(Base):
    """One row per trial and epoch; the unique pair is what makes re-delivery safe."""

    __tablename__ = "epoch_metrics"
    __table_args__ = (UniqueConstraint("trial_id", "epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer, comment="1-based")
    train_loss: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    train_accuracy: Mapped[float | None] = mapped_column(Float)
    val_accuracy: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    epoch_seconds: Mapped[float | None] = mapped_column(Float)
    train_rmse: Mapped[float | None] = mapped_column(Float)
    val_rmse: Mapped[float | None] = mapped_column(Float)
    train_mae: Mapped[float | None] = mapped_column(Float)
    val_mae: Mapped[float | None] = mapped_column(Float)
    train_r2: Mapped[float | None] = mapped_column(Float)
    val_r2: Mapped[float | None] = mapped_column(Float)
    grad_norm: Mapped[float | None] = mapped_column(Float, comment="L2 norm of the last step's gradient")
    weight_norm: Mapped[float | None] = mapped_column(Float, comment="L2 norm of all weights at epoch end")
    layer_grad_norms: Mapped[list[float | None] | None] = mapped_column(
        JSON(none_as_null=True),
        comment="L2 norm of each linear layer's gradient at grad_norm's step, first layer first")
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TrialArtifact(Base):
    """A small picture of what a trial learned, for plotting: kilobytes of JSON, one per trial and kind."""

    __tablename__ = "trial_artifacts"

    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), primary_key=True, comment="curve_1d or boundary_2d")
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Dataset(Base):
    """A user's CSV, validated at submit and stored by content, so every worker trains on the same rows."""

    __tablename__ = "datasets"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(300), comment="file name as first submitted")
    n_rows: Mapped[int] = mapped_column(Integer)
    n_columns: Mapped[int] = mapped_column(Integer)
    columns: Mapped[list[str]] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(Integer, comment="size of the original file")
    content: Mapped[bytes] = mapped_column(LargeBinary, comment="the file's bytes, gzip-compressed")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobCheckpoint(Base):
    """The latest checkpoint of a running job (every trial's weights, optimizer and schedule state,
    generators, best epoch, early stopper, which trials ended), so a job re-delivered after its worker
    died resumes instead of starting over. One row per job, found by the job's first trial id; each
    save replaces the last. ``data`` holds torch.save bytes (read back with weights_only=True), or is
    NULL when the bytes live at ``location`` (FITSCOPE_CHECKPOINT_URL)."""

    __tablename__ = "job_checkpoints"

    first_trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"), primary_key=True)
    trial_ids: Mapped[list[int]] = mapped_column(JSON, comment="the job's trials, in the engine's order")
    attempt_token: Mapped[str] = mapped_column(String(32), comment="the attempt that owns it")
    epoch: Mapped[int] = mapped_column(Integer, comment="last epoch whose metrics it includes")
    data: Mapped[bytes | None] = mapped_column(LargeBinary)
    location: Mapped[str | None] = mapped_column(String(1000), comment="where the bytes are, when not in data")
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WorkerNode(Base):
    """A Celery worker that has announced itself. It beats every FITSCOPE_HEARTBEAT_S; one silent
    for FITSCOPE_WORKER_LOST_AFTER_S is lost, and its running trials are re-queued once.
    Trials name their worker as ``f"{name}/{pid}"`` (pid of the training process)."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True, comment="Celery node name, e.g. cpu1@host")
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[list[str]] = mapped_column(JSON)
    device: Mapped[str] = mapped_column(String(200), comment="cpu, or cuda and the GPU's name")
    torch_version: Mapped[str | None] = mapped_column(String(64))
    concurrency: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), comment="online, stopped or lost")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
