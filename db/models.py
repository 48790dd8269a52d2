"""SQLAlchemy 2 typed ORM models: the whole persistent state of the service.

Every table a tenant owns carries ``tenant_id`` so that queries can always scope by
it. Files (uploaded models, data sets, exported artifacts) live in the data
directory; a row holds the path and the sha256 of the bytes, never the bytes.
Timestamps are naive UTC (see :func:`utcnow`) so that SQLite and PostgreSQL store
and compare them the same way (the lease compare-and-set depends on that).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import false

# Stable constraint names so Alembic migrations are identical on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_JOB_STATUSES = ("succeeded", "failed", "cancelled")
ARTIFACT_STATUSES = ("pending", "ready", "failed")


def utcnow() -> dt.datetime:
    """Naive UTC now: the one clock every timestamp column uses."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    """Declarative base with the shared naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, dt.datetime: DateTime()}  # noqa: RUF012


class Tenant(Base):
    """A customer: owns keys, models, data sets, devices and jobs."""

    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """An API key, stored only as its sha256 so a database leak leaks no keys."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Model(Base):
    """A trained network: an uploaded ``torch.export`` archive or a zoo request."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(16))  # upload | zoo
    status: Mapped[str] = mapped_column(String(16), default="ready")  # ready | pending | failed
    zoo: Mapped[str | None] = mapped_column(String(64), default=None)
    dataset_id: Mapped[int | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), default=None
    )
    path: Mapped[str | None] = mapped_column(Text, default=None)
    sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    params: Mapped[int | None] = mapped_column(BigInteger, default=None)
    macs: Mapped[int | None] = mapped_column(BigInteger, default=None)
    layers: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Dataset(Base):
    """A data set: an uploaded .npz (x_train, y_train, x_val, y_val) or a built-in one."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    builtin: Mapped[str | None] = mapped_column(String(32), default=None)
    path: Mapped[str | None] = mapped_column(Text, default=None)
    sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    shapes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Device(Base):
    """A latency target: hardware + runtime + settings; ``tenant_id`` NULL = built-in, shared."""

    __tablename__ = "devices"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True, default=None
    )
    name: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(16), default="local")  # local | remote (device agent)
    runtime: Mapped[str] = mapped_column(String(32))
    threads: Mapped[int] = mapped_column(Integer, default=1)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Measurement(Base):
    """One latency measurement task on a device, and its result once measured."""

    __tablename__ = "measurements"

    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[int | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True, default=None
    )
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | claimed | done | failed
    purpose: Mapped[str] = mapped_column(String(16), default="calibration")  # calibration | candidate
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)  # what to build and time
    features: Mapped[dict[str, Any]] = mapped_column(default=dict)  # graph features for predictors
    artifact_path: Mapped[str | None] = mapped_column(Text, default=None)
    latency_ms: Mapped[float | None] = mapped_column(Float, default=None)
    latency_stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    measured_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    # Added in 0002: which calibration or job asked for it, and the agent hand-out state.
    calibration_id: Mapped[int | None] = mapped_column(Integer, index=True, default=None)
    job_id: Mapped[int | None] = mapped_column(Integer, index=True, default=None)
    claimed_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Added in 0006: the lease of a claimed task (``db.work_queue.DEVICE_TASKS``).
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Predictor(Base):
    """A trained latency predictor for one device, versioned, with held-out metrics.

    ``version`` numbers every predictor of the device, whoever made it. ``tenant_id`` (added
    in 0004) is NULL for the device's own predictors; on a shared built-in device it names
    the tenant whose job calibrated it, and only that tenant sees and uses it.
    """

    __tablename__ = "predictors"
    __table_args__ = (UniqueConstraint("device_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    tenant_id: Mapped[int | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True, default=None
    )
    kind: Mapped[str] = mapped_column(String(32), default="")
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    artifact_path: Mapped[str | None] = mapped_column(Text, default=None)
    sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


CALIBRATION_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


class Calibration(Base):
    """One calibration of a device: measure sampled models, then fit a new predictor version.

    ``active_device_id`` equals ``device_id`` while the calibration is queued or running and
    is NULL once it ended: its unique constraint makes "one calibration per device at a
    time" an atomic property of the database on every backend (NULLs never collide).
    Whoever runs it holds a lease (``db.work_queue.CALIBRATIONS``): each heartbeat sets
    ``heartbeat_at`` and pushes ``lease_expires_at`` (added in 0006) forward; a running
    calibration whose lease lapsed was abandoned (its process died) and is ended as failed.
    """

    __tablename__ = "calibrations"

    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[int | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True, default=None
    )
    active_device_id: Mapped[int | None] = mapped_column(Integer, unique=True, default=None)
    job_id: Mapped[int | None] = mapped_column(Integer, default=None)  # the job that asked for it
    model_id: Mapped[int | None] = mapped_column(Integer, default=None)  # focus model, if any
    status: Mapped[str] = mapped_column(String(16), default="queued")
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)  # samples, seed, runs, plan
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)  # done, total, message
    owner: Mapped[str | None] = mapped_column(String(200), default=None)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    predictor_version: Mapped[int | None] = mapped_column(Integer, default=None)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Job(Base):
    """A search job; the lease columns make claiming an atomic compare-and-set.

    ``agent_state`` is opaque bytes written by the search (JSON or safetensors, never
    pickle) so that a runner which takes over an expired lease resumes the search.
    """

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_lease", "status", "lease_expires_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    algorithm: Mapped[str] = mapped_column(String(32))
    spec: Mapped[dict[str, Any]] = mapped_column()
    status: Mapped[str] = mapped_column(String(16), default="queued")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    baseline: Mapped[dict[str, Any]] = mapped_column(default=dict)  # dense model's scores
    lease_owner: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    agent_state: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # Added in 0003: how many of the job's candidates the ``on_front`` flags account for. The
    # flags are exact while it equals the candidate count; NULL or any other value means
    # stale, and the next read of the front recomputes them (see service.queries.pareto).
    front_candidates: Mapped[int | None] = mapped_column(Integer, default=0)


class Candidate(Base):
    """One evaluated policy of a job with every score; unique by (job, policy hash)."""

    __tablename__ = "candidates"
    __table_args__ = (
        UniqueConstraint("job_id", "policy_hash"),
        UniqueConstraint("job_id", "index"),
        Index("ix_candidates_job_id_on_front", "job_id", "on_front"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    policy: Mapped[dict[str, Any]] = mapped_column()
    policy_hash: Mapped[str] = mapped_column(String(64))
    accuracy: Mapped[float | None] = mapped_column(Float, default=None)
    latency_ms: Mapped[float | None] = mapped_column(Float, default=None)  # predicted
    predictor_version: Mapped[int | None] = mapped_column(Integer, default=None)
    measured_latency_ms: Mapped[float | None] = mapped_column(Float, default=None)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    macs: Mapped[int | None] = mapped_column(BigInteger, default=None)
    eval_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    feasible: Mapped[bool] = mapped_column(Boolean, default=True)
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Added in 0003: on the job's Pareto front (feasible, non-dominated), kept as candidates arrive.
    on_front: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Artifact(Base):
    """An exported model of a candidate (ONNX fp32 / int8) and what it proved when measured."""

    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(primary_key=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    format: Mapped[str] = mapped_column(String(16), default="onnx")
    int8: Mapped[bool] = mapped_column(Boolean, default=False)
    finetune_epochs: Mapped[int] = mapped_column(Integer, default=0)
    path: Mapped[str | None] = mapped_column(Text, default=None)
    sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class JobEvent(Base):
    """A progress event of a job; its id orders the server-sent event stream."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
