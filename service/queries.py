"""Every database query of the service, as keyword-only functions.

Tenant scoping lives here: each getter takes ``tenant_id`` and returns None for rows of
another tenant, so routes answer 404 without learning that the id exists.
Functions that change rows flush but do not commit unless their name says so; the
caller owns the transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.models import (
    TERMINAL_JOB_STATUSES,
    Artifact,
    Candidate,
    Dataset,
    Device,
    Job,
    JobEvent,
    Model,
    Predictor,
    utcnow,
)
from service.search_bridge import Scores

BUILTIN_DEVICES: tuple[dict[str, Any], ...] = (
    {"name": "cpu-ort-1t", "runtime": "onnxruntime", "threads": 1},
    {"name": "cpu-ort-2t", "runtime": "onnxruntime", "threads": 2},
    {"name": "cpu-torch-1t", "runtime": "torch", "threads": 1},
)
OBJECTIVE_COLUMNS = {"accuracy", "latency_ms", "size_bytes", "macs"}


# --- devices ------------------------------------------------------------------------


def ensure_builtin_devices(session: Session) -> None:
    """Create the shared local CPU devices if missing. Commits."""
    have = set(session.scalars(select(Device.name).where(Device.tenant_id.is_(None))))
    for spec in BUILTIN_DEVICES:
        if spec["name"] not in have:
            session.add(Device(tenant_id=None, kind="local", settings={}, **spec))
    try:
        session.commit()
    except IntegrityError:  # a concurrent start created them
        session.rollback()


def list_devices(session: Session, *, tenant_id: int) -> Sequence[Device]:
    """The tenant's devices and the shared built-ins."""
    return session.scalars(
        select(Device)
        .where(or_(Device.tenant_id == tenant_id, Device.tenant_id.is_(None)))
        .order_by(Device.id)
    ).all()


def get_device(session: Session, *, tenant_id: int, device_id: int) -> Device | None:
    """A device the tenant may use (its own or a shared built-in)."""
    device = session.get(Device, device_id)
    if device is None or device.tenant_id not in (None, tenant_id):
        return None
    return device


def device_name_taken(session: Session, *, tenant_id: int, name: str) -> bool:
    """Whether ``name`` already names one of the tenant's or a shared device."""
    return (
        session.scalar(
            select(Device.id).where(
                Device.name == name, or_(Device.tenant_id == tenant_id, Device.tenant_id.is_(None))
            )
        )
        is not None
    )


def add_device(session: Session, *, tenant_id: int, **fields: Any) -> Device:
    device = Device(tenant_id=tenant_id, **fields)
    session.add(device)
    session.flush()
    return device


def list_predictors(session: Session, *, device_id: int) -> Sequence[Predictor]:
    return session.scalars(
        select(Predictor).where(Predictor.device_id == device_id).order_by(Predictor.version)
    ).all()


# --- models and data sets -------------------------------------------------------------


def add_model(session: Session, *, tenant_id: int, **fields: Any) -> Model:
    model = Model(tenant_id=tenant_id, **fields)
    session.add(model)
    session.flush()
    return model


def get_model(session: Session, *, tenant_id: int, model_id: int) -> Model | None:
    model = session.get(Model, model_id)
    return model if model is not None and model.tenant_id == tenant_id else None


def list_models(session: Session, *, tenant_id: int) -> Sequence[Model]:
    return session.scalars(select(Model).where(Model.tenant_id == tenant_id).order_by(Model.id)).all()


def add_dataset(session: Session, *, tenant_id: int, **fields: Any) -> Dataset:
    dataset = Dataset(tenant_id=tenant_id, **fields)
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, *, tenant_id: int, dataset_id: int) -> Dataset | None:
    dataset = session.get(Dataset, dataset_id)
    return dataset if dataset is not None and dataset.tenant_id == tenant_id else None


def list_datasets(session: Session, *, tenant_id: int) -> Sequence[Dataset]:
    return session.scalars(select(Dataset).where(Dataset.tenant_id == tenant_id).order_by(Dataset.id)).all()


# --- jobs ---------------------------------------------------------------------------


def add_job(session: Session, *, tenant_id: int, spec: dict[str, Any]) -> Job:
    """Store a queued job and its first event (flushes)."""
    job = Job(
        tenant_id=tenant_id,
        model_id=spec["model_id"],
        dataset_id=spec["dataset_id"],
        device_id=spec["device_id"],
        algorithm=spec["algorithm"],
        spec=spec,
        status="queued",
        progress={"done": 0, "total": spec["budget"].get("candidates"), "phase": "queued"},
    )
    session.add(job)
    session.flush()
    add_event(session, job_id=job.id, kind="status", data={"status": "queued"})
    return job


def get_job(session: Session, *, tenant_id: int, job_id: int) -> Job | None:
    job = session.get(Job, job_id)
    return job if job is not None and job.tenant_id == tenant_id else None


def list_jobs(
    session: Session, *, tenant_id: int, status: str | None = None, limit: int = 100, offset: int = 0
) -> tuple[Sequence[Job], int]:
    """The tenant's jobs, newest first, and their total count."""
    where = [Job.tenant_id == tenant_id]
    if status is not None:
        where.append(Job.status == status)
    total = session.scalar(select(func.count(Job.id)).where(*where)) or 0
    rows = session.scalars(
        select(Job).where(*where).order_by(Job.id.desc()).limit(limit).offset(offset)
    ).all()
    return rows, total


def request_cancel(session: Session, *, job: Job) -> Job:
    """Cancel a queued job now; flag a running one (its runner stops within seconds). Commits."""
    if job.status in TERMINAL_JOB_STATUSES:
        return job
    job.cancel_requested = True
    if job.status == "queued":
        job.status = "cancelled"
        job.finished_at = utcnow()
        add_event(session, job_id=job.id, kind="status", data={"status": "cancelled"})
    else:
        add_event(session, job_id=job.id, kind="cancel_requested", data={})
    session.commit()
    return job


def add_event(session: Session, *, job_id: int, kind: str, data: dict[str, Any]) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, data=data))


def events_after(session: Session, *, job_id: int, after_id: int, limit: int = 500) -> Sequence[JobEvent]:
    return session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.id > after_id)
        .order_by(JobEvent.id)
        .limit(limit)
    ).all()


# --- candidates ---------------------------------------------------------------------


def count_candidates(session: Session, *, job_id: int) -> int:
    return session.scalar(select(func.count(Candidate.id)).where(Candidate.job_id == job_id)) or 0


def list_candidates(
    session: Session, *, job_id: int, limit: int = 1000, offset: int = 0
) -> Sequence[Candidate]:
    return session.scalars(
        select(Candidate)
        .where(Candidate.job_id == job_id)
        .order_by(Candidate.index)
        .limit(limit)
        .offset(offset)
    ).all()


def get_candidate(session: Session, *, tenant_id: int, candidate_id: int) -> tuple[Candidate, Job] | None:
    row = session.execute(
        select(Candidate, Job)
        .join(Job, Job.id == Candidate.job_id)
        .where(Candidate.id == candidate_id, Job.tenant_id == tenant_id)
    ).first()
    return (row[0], row[1]) if row is not None else None


def is_feasible(scores: Scores, *, constraints: dict[str, Any], baseline: dict[str, Any]) -> bool:
    """Whether the scores meet every constraint that can be checked (unknown values pass)."""
    values: dict[str, float | None] = {
        "accuracy": scores.accuracy,
        "latency_ms": scores.latency_ms,
        "size_bytes": scores.size_bytes,
        "macs": scores.macs,
    }
    base_acc = baseline.get("accuracy")
    values["accuracy_drop"] = (
        base_acc - scores.accuracy if base_acc is not None and scores.accuracy is not None else None
    )
    for name, bound in constraints.items():
        value = values.get(name)
        if value is None:
            continue
        if bound.get("max") is not None and value > bound["max"]:
            return False
        if bound.get("min") is not None and value < bound["min"]:
            return False
    return True


def add_candidate(
    session: Session,
    *,
    job: Job,
    policy: dict[str, Any],
    policy_hash: str,
    scores: Scores,
    agent_state: bytes | None = None,
) -> Candidate | None:
    """Store one evaluated candidate (and the agent state) in one transaction. Commits.

    Idempotent by (job, policy hash): a policy already stored returns None and stores
    nothing, so a resumed search cannot duplicate work.
    """
    exists = session.scalar(
        select(Candidate.id).where(Candidate.job_id == job.id, Candidate.policy_hash == policy_hash)
    )
    if exists is not None:
        session.rollback()
        return None
    index = session.scalar(
        select(func.coalesce(func.max(Candidate.index) + 1, 0)).where(Candidate.job_id == job.id)
    )
    candidate = Candidate(
        job_id=job.id,
        index=int(index or 0),
        policy=policy,
        policy_hash=policy_hash,
        accuracy=scores.accuracy,
        latency_ms=scores.latency_ms,
        predictor_version=scores.predictor_version,
        measured_latency_ms=scores.measured_latency_ms,
        size_bytes=scores.size_bytes,
        macs=scores.macs,
        eval_seconds=scores.eval_seconds,
        extra=scores.extra,
        feasible=is_feasible(scores, constraints=job.spec.get("constraints", {}), baseline=job.baseline),
    )
    session.add(candidate)
    if agent_state is not None:
        job.agent_state = agent_state
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return None
    return candidate


def pareto(session: Session, *, job: Job) -> list[Candidate]:
    """The non-dominated feasible candidates under the job's objectives, best first.

    O(n log n) for two objectives (sort + sweep) and O(n·front) beyond; only the
    objective columns of all candidates are loaded, full rows only for the front.
    """
    objectives = [o for o in job.spec.get("objectives", []) if o["metric"] in OBJECTIVE_COLUMNS]
    if not objectives:
        return []
    cols = [getattr(Candidate, o["metric"]) for o in objectives]
    signs = [-1.0 if o["direction"] == "max" else 1.0 for o in objectives]
    rows = session.execute(
        select(Candidate.id, *cols).where(
            Candidate.job_id == job.id, Candidate.feasible.is_(True), *[c.is_not(None) for c in cols]
        )
    ).all()
    points = sorted(
        ((tuple(s * float(v) for s, v in zip(signs, row[1:], strict=True)), int(row[0])) for row in rows),
    )
    front: list[tuple[tuple[float, ...], int]] = []
    if len(signs) == 1:
        front = [p for p in points if p[0] == points[0][0]] if points else []
    elif len(signs) == 2:
        best = float("inf")
        for vec, cid in points:
            if vec[1] < best or (front and vec == front[-1][0]):
                front.append((vec, cid))
                best = min(best, vec[1])
    else:
        for vec, cid in points:  # lexicographic order: no later point dominates an earlier one
            if not any(_dominates(f, vec) for f, _ in front):
                front.append((vec, cid))
    ids = [cid for _, cid in front]
    if not ids:
        return []
    by_id = {c.id: c for c in session.scalars(select(Candidate).where(Candidate.id.in_(ids)))}
    return [by_id[i] for i in ids]


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and a != b


def best_candidates(session: Session, *, job: Job, limit: int = 5) -> list[Candidate]:
    """A few front points for the job summary."""
    return pareto(session, job=job)[:limit]


# --- artifacts ----------------------------------------------------------------------


def add_artifact(session: Session, *, tenant_id: int, candidate_id: int, **fields: Any) -> Artifact:
    artifact = Artifact(tenant_id=tenant_id, candidate_id=candidate_id, status="pending", **fields)
    session.add(artifact)
    session.flush()
    return artifact


def get_artifact(session: Session, *, tenant_id: int, artifact_id: int) -> Artifact | None:
    artifact = session.get(Artifact, artifact_id)
    return artifact if artifact is not None and artifact.tenant_id == tenant_id else None


def finish_artifact(
    session: Session,
    *,
    artifact_id: int,
    status: str,
    path: str | None = None,
    sha256: str | None = None,
    size_bytes: int | None = None,
    metrics: dict[str, Any] | None = None,
    error: str | None = None,
) -> None:
    """Record an export's outcome. Commits."""
    artifact = session.get(Artifact, artifact_id)
    if artifact is None:
        return
    artifact.status = status
    artifact.path, artifact.sha256, artifact.size_bytes = path, sha256, size_bytes
    artifact.metrics = metrics or {}
    artifact.error = error
    artifact.finished_at = utcnow()
    session.commit()


def seconds_since(start: dt.datetime | None) -> float:
    """Seconds from ``start`` (naive UTC) to now; 0 if unknown."""
    return 0.0 if start is None else max(0.0, (utcnow() - start).total_seconds())
