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

import numpy as np
from sqlalchemy import Select, func, or_, select, update
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
from engine.job import Scores
from engine.spec import JobSpec
from service.front import dominance, front_objectives, front_order, signed_points
from service.front_fold import Resolution, fold, resolution_for

# Ids are INTEGER columns (32-bit on PostgreSQL, which refuses a larger parameter; SQLite's
# driver cannot bind past 64 bits): a number outside that range names no row, so getters
# answer None for it (a 404, not a 500), and offsets are bounded to it.
MAX_ID = 2**31 - 1

BUILTIN_DEVICES: tuple[dict[str, Any], ...] = (
    {"name": "cpu-ort-1t", "runtime": "onnxruntime", "threads": 1},
    {"name": "cpu-ort-2t", "runtime": "onnxruntime", "threads": 2},
    {"name": "cpu-torch-1t", "runtime": "torch", "threads": 1},
    {"name": "cpu-executorch-1t", "runtime": "executorch", "threads": 1},
    {"name": "cpu-openvino-1t", "runtime": "openvino", "threads": 1},
)


def storable_id(row_id: int) -> bool:
    """Whether ``row_id`` fits an id column on every backend (else it names no row)."""
    return -MAX_ID - 1 <= row_id <= MAX_ID


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
    device = session.get(Device, device_id) if storable_id(device_id) else None
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
    model = session.get(Model, model_id) if storable_id(model_id) else None
    return model if model is not None and model.tenant_id == tenant_id else None


def list_models(session: Session, *, tenant_id: int) -> Sequence[Model]:
    return session.scalars(select(Model).where(Model.tenant_id == tenant_id).order_by(Model.id)).all()


def add_dataset(session: Session, *, tenant_id: int, **fields: Any) -> Dataset:
    dataset = Dataset(tenant_id=tenant_id, **fields)
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, *, tenant_id: int, dataset_id: int) -> Dataset | None:
    dataset = session.get(Dataset, dataset_id) if storable_id(dataset_id) else None
    return dataset if dataset is not None and dataset.tenant_id == tenant_id else None


def list_datasets(session: Session, *, tenant_id: int) -> Sequence[Dataset]:
    return session.scalars(select(Dataset).where(Dataset.tenant_id == tenant_id).order_by(Dataset.id)).all()


# --- jobs ---------------------------------------------------------------------------


def add_job(session: Session, *, tenant_id: int, spec: JobSpec) -> Job:
    """Store a queued job (its spec as JSON, parsed back with ``JobSpec.model_validate``) and its
    first event (flushes)."""
    job = Job(
        tenant_id=tenant_id,
        model_id=spec.model_id,
        dataset_id=spec.dataset_id,
        device_id=spec.device_id,
        algorithm=spec.algorithm,
        spec=spec.model_dump(mode="json"),
        status="queued",
        progress={"done": 0, "total": spec.budget.candidates, "phase": "queued"},
    )
    session.add(job)
    session.flush()
    add_event(session, job_id=job.id, kind="status", data={"status": "queued"})
    return job


def get_job(session: Session, *, tenant_id: int, job_id: int) -> Job | None:
    job = session.get(Job, job_id) if storable_id(job_id) else None
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
    if not storable_id(candidate_id):
        return None
    row = session.execute(
        select(Candidate, Job)
        .join(Job, Job.id == Candidate.job_id)
        .where(Candidate.id == candidate_id, Job.tenant_id == tenant_id)
    ).first()
    return (row[0], row[1]) if row is not None else None


def is_feasible(scores: Scores, *, spec: JobSpec, baseline: dict[str, Any]) -> bool:
    """Whether the scores meet every bound of the job (values not known yet pass)."""
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
    for name, bound in spec.constraints.items():
        value = values.get(name)
        if value is not None and value > bound.max:
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
    nothing, so a resumed search cannot duplicate work. The job's front flags are
    updated in the same transaction (:func:`_place_on_front`).
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
        feasible=is_feasible(scores, spec=JobSpec.model_validate(job.spec), baseline=job.baseline),
        on_front=False,
    )
    _place_on_front(session, job=job, candidate=candidate)
    session.add(candidate)
    if agent_state is not None:
        job.agent_state = agent_state
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return None
    return candidate


def rescore_candidate(
    session: Session, *, job: Job, policy_hash: str, accuracy: float, extra: dict[str, Any]
) -> bool:
    """Give a stored candidate a new accuracy (fine-tuning after the search) and merge ``extra``
    into its extra; its feasibility and the job's front flags are recomputed. Commits.

    False when the job has no such candidate.
    """
    candidate = session.scalar(
        select(Candidate).where(Candidate.job_id == job.id, Candidate.policy_hash == policy_hash)
    )
    if candidate is None:
        return False
    candidate.accuracy = accuracy
    candidate.extra = {**(candidate.extra or {}), **extra}
    scores = Scores(
        accuracy=accuracy,
        latency_ms=candidate.latency_ms,
        size_bytes=candidate.size_bytes,
        macs=candidate.macs,
    )
    candidate.feasible = is_feasible(scores, spec=JobSpec.model_validate(job.spec), baseline=job.baseline)
    session.flush()
    refresh_front(session, job=job)  # a raised accuracy can dominate others, or leave the front
    return True


# --- the Pareto front ---------------------------------------------------------------
#
# ``candidates.on_front`` flags the job's front and ``jobs.front_candidates`` says how
# many candidates the flags account for. A candidate stored through add_candidate
# updates both in its own transaction, reading only the current front (O(front)); a
# read of the front finds the flags exact (count matches) and loads the flagged rows
# alone. Rows written any other way (bulk loads, a database migrated from before the
# flags) leave the count behind: reads then compute the front from every candidate
# (writing nothing) until the housekeeping loop recomputes every flag once.
# Writers of one job's front serialise on its row (SELECT ... FOR UPDATE; SQLite's
# write transactions are serial already).


def spec_objectives(job: Job) -> list[dict[str, Any]]:
    """The job's objectives as ``{"metric", "direction"}`` dicts (the front's input)."""
    return [g.model_dump() for g in JobSpec.model_validate(job.spec).objectives]


def _front_columns(job: Job) -> tuple[list[dict[str, Any]], list[Any]]:
    objectives = front_objectives(spec_objectives(job))
    return objectives, [getattr(Candidate, o["metric"]) for o in objectives]


def _lock_front(session: Session, *, job_id: int) -> int | None:
    """Lock the job's row for this transaction; return how many candidates its flags account for."""
    return session.scalar(select(Job.front_candidates).where(Job.id == job_id).with_for_update())


def _place_on_front(session: Session, *, job: Job, candidate: Candidate) -> None:
    """Flag ``candidate`` (not yet added) if it joins the front; unflag the points it dominates."""
    objectives, cols = _front_columns(job)
    if not objectives:
        return
    accounted = _lock_front(session, job_id=job.id)
    if accounted is None or accounted != count_candidates(session, job_id=job.id):
        return  # flags already stale: the next read recomputes them
    job.front_candidates = accounted + 1
    values = [getattr(candidate, o["metric"]) for o in objectives]
    if not candidate.feasible or any(v is None for v in values):
        return
    rows = session.execute(
        select(Candidate.id, *cols).where(Candidate.job_id == job.id, Candidate.on_front.is_(True))
    ).all()
    columns = [np.asarray([r[1 + i] for r in rows], dtype=float) for i in range(len(cols))]
    current = signed_points(columns, objectives)
    point = signed_points([np.asarray([float(v)]) for v in values], objectives)[0]
    dominated, beaten = dominance(current, point)
    if dominated:
        return
    candidate.on_front = True
    leaving = [int(rows[int(i)][0]) for i in np.flatnonzero(beaten)]
    for start in range(0, len(leaving), 900):
        session.execute(
            update(Candidate)
            .where(Candidate.id.in_(leaving[start : start + 900]))
            .values(on_front=False)
            .execution_options(synchronize_session=False)
        )


def raw_rows(session: Session, statement: Select[Any]) -> list[tuple[Any, ...]]:
    """Run a SELECT of plain columns through the DB-API cursor of the session's connection.

    For reads of tens of thousands of rows (fronts, scatters): SQLAlchemy's per-row
    result processing costs more than the query itself at that size. Only for
    statements whose bound values are numbers this module built (they are inlined).
    """
    connection = session.connection()
    sql = str(statement.compile(dialect=connection.dialect, compile_kwargs={"literal_binds": True}))
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(sql)
        return list(cursor.fetchall())
    finally:
        cursor.close()


def _front_ids(session: Session, *, job: Job) -> list[int]:
    """Ids of the job's front computed from all its candidates (a read), best first.

    The slow path: reads the objective columns of every feasible candidate and finds the
    front in numpy (:mod:`service.front`).
    """
    objectives, cols = _front_columns(job)
    if not objectives:
        return []
    rows = raw_rows(
        session,
        select(Candidate.id, *cols).where(
            Candidate.job_id == job.id, Candidate.feasible.is_(True), *[c.is_not(None) for c in cols]
        ),
    )
    if not rows:
        return []
    table = np.asarray(rows, dtype=float)
    order = front_order(signed_points(list(table[:, 1:].T), objectives), table[:, 0])
    return [int(i) for i in table[order, 0]]


def refresh_front(session: Session, *, job: Job) -> None:
    """Recompute every front flag of ``job`` from all its candidates. Commits.

    Once per job whose flags are stale, from the housekeeping loop (:func:`stale_fronts`),
    never from a read.
    """
    _lock_front(session, job_id=job.id)
    total = count_candidates(session, job_id=job.id)
    front_ids = _front_ids(session, job=job)
    session.execute(
        update(Candidate)
        .where(Candidate.job_id == job.id, Candidate.on_front.is_(True))
        .values(on_front=False)
        .execution_options(synchronize_session=False)
    )
    for start in range(0, len(front_ids), 900):  # under SQLite's bound-parameter limit
        session.execute(
            update(Candidate)
            .where(Candidate.id.in_(front_ids[start : start + 900]))
            .values(on_front=True)
            .execution_options(synchronize_session=False)
        )
    job.front_candidates = total
    session.commit()


def stale_fronts(session: Session, *, limit: int = 20) -> list[int]:
    """Jobs whose front flags do not account for all their candidates (a read)."""
    counted = select(func.count(Candidate.id)).where(Candidate.job_id == Job.id).scalar_subquery()
    stale = or_(Job.front_candidates.is_(None), Job.front_candidates != counted)
    return list(session.scalars(select(Job.id).where(stale).order_by(Job.id).limit(limit)))


def pareto(session: Session, *, job: Job) -> list[Candidate]:
    """The non-dominated feasible candidates under the job's objectives, best first.

    Reads the flagged rows only (the front, not the job's 50,000 candidates). When the
    flags are stale it computes the front from every candidate instead, and writes nothing:
    the housekeeping loop brings the flags up to date (:func:`refresh_front`).
    Order: lexicographic in the signed objectives (first objective best first), then id.
    """
    objectives = front_objectives(spec_objectives(job))
    if not objectives:
        return []
    counted = select(func.count(Candidate.id)).where(Candidate.job_id == Job.id).scalar_subquery()
    accounted, total = session.execute(select(Job.front_candidates, counted).where(Job.id == job.id)).one()
    if accounted != total:
        ids = _front_ids(session, job=job)
        by_id = (
            {c.id: c for c in session.scalars(select(Candidate).where(Candidate.id.in_(ids)))} if ids else {}
        )
        return [by_id[i] for i in ids if i in by_id]
    rows = session.scalars(
        select(Candidate).where(Candidate.job_id == job.id, Candidate.on_front.is_(True))
    ).all()
    if not rows:
        return []
    values = [np.asarray([getattr(r, o["metric"]) for r in rows], dtype=float) for o in objectives]
    order = front_order(signed_points(values, objectives), np.asarray([r.id for r in rows]))
    return [rows[int(i)] for i in order]


def job_resolution(session: Session, *, job: Job) -> Resolution:
    """How close two of the job's scores must be to count as equal (``service.front_fold``)."""
    shapes = session.scalar(select(Dataset.shapes).where(Dataset.id == job.dataset_id))
    return resolution_for(shapes)


def front_groups(
    session: Session, *, job: Job, front: Sequence[Candidate], resolution: Resolution | None = None
) -> list[list[int]]:
    """``front`` (the job's, in front order) folded: one list of indices into it per
    representative, its own index first (``service.front_fold`` says which point represents)."""
    metrics = [o["metric"] for o in front_objectives(spec_objectives(job))]
    if not front or not metrics:
        return [[i] for i in range(len(front))]
    values = np.asarray([[getattr(c, m) for m in metrics] for c in front], dtype=float)
    return fold(values, metrics, resolution or job_resolution(session, job=job))


def folded_pareto(session: Session, *, job: Job) -> list[tuple[Candidate, list[Candidate]]]:
    """The front with points equal within resolution folded: (representative, its duplicates),
    in front order."""
    front = pareto(session, job=job)
    return [(front[g[0]], [front[i] for i in g[1:]]) for g in front_groups(session, job=job, front=front)]


def best_candidates(session: Session, *, job: Job, limit: int = 5) -> list[Candidate]:
    """A few front points for the job summary: distinct ones (duplicates folded)."""
    return [rep for rep, _ in folded_pareto(session, job=job)[:limit]]


# --- artifacts ----------------------------------------------------------------------


def add_artifact(session: Session, *, tenant_id: int, candidate_id: int, **fields: Any) -> Artifact:
    artifact = Artifact(tenant_id=tenant_id, candidate_id=candidate_id, status="pending", **fields)
    session.add(artifact)
    session.flush()
    return artifact


def get_artifact(session: Session, *, tenant_id: int, artifact_id: int) -> Artifact | None:
    artifact = session.get(Artifact, artifact_id) if storable_id(artifact_id) else None
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
    if isinstance(artifact.metrics.get("int8"), bool):  # the exporter may choose int8 from the policy
        artifact.int8 = artifact.metrics["int8"]
    artifact.error = error
    artifact.finished_at = utcnow()
    session.commit()


def seconds_since(start: dt.datetime | None) -> float:
    """Seconds from ``start`` (naive UTC) to now; 0 if unknown."""
    return 0.0 if start is None else max(0.0, (utcnow() - start).total_seconds())
