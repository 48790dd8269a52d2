"""A family job's points as stored, and its bundle export run in the background.

The export follows the candidate export (``service.exports``): an artifact row (format
``family``, attached to the first point's candidate: no migration), built in a background
task, marked ready (the zipped bundle, its sha256 and the manifest less the policies as its
metrics) or failed with why. One family export of a job runs at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Artifact, Candidate, Job
from engine.family_job import FAMILY_FORMAT, FAMILY_KEY, FamilyExportContext, FamilyPointRef, export_family
from engine.spec import JobSpec
from service import queries
from service.exports import finish_ready
from service.runner import job_refs

log = logging.getLogger("modeltailor.family_exports")


def family_summary(job: Job) -> dict[str, Any] | None:
    """The job's ``progress["family"]`` (its points' hashes, budgets), None before they are marked."""
    summary = (job.progress or {}).get(FAMILY_KEY)
    return summary if isinstance(summary, dict) and isinstance(summary.get("points"), list) else None


def family_points(session: Session, job: Job) -> list[tuple[dict[str, Any], Candidate | None]]:
    """(summary entry, its candidate) per point, in budget order; empty before the points exist."""
    summary = family_summary(job)
    if summary is None:
        return []
    entries = [p for p in summary["points"] if isinstance(p, dict) and isinstance(p.get("policy_hash"), str)]
    hashes = {p["policy_hash"] for p in entries}
    rows = session.scalars(
        select(Candidate).where(Candidate.job_id == job.id, Candidate.policy_hash.in_(hashes))
    ).all()
    by_hash = {c.policy_hash: c for c in rows}
    return [(p, by_hash.get(p["policy_hash"])) for p in entries]


def family_artifacts(session: Session, candidate_ids: Sequence[int]) -> list[Artifact]:
    """The family exports attached to these candidates (the first point's), newest first."""
    if not candidate_ids:
        return []
    return list(
        session.scalars(
            select(Artifact)
            .where(Artifact.candidate_id.in_(list(candidate_ids)), Artifact.format == FAMILY_FORMAT)
            .order_by(Artifact.id.desc())
        )
    )


def run_family_export(state: Any, artifact_id: int, job_id: int, runs: int) -> None:
    """Build family artifact ``artifact_id`` of job ``job_id``; mark it ready or failed with why."""
    factory = state.session_factory
    data_dir = Path(state.settings.data_dir)
    try:
        with factory() as session:
            ctx = _context(session, data_dir, artifact_id, job_id, runs)
        if ctx is None:
            return
        exporter = getattr(state, "family_exporter", None) or export_family
        finish_ready(factory, artifact_id, exporter(ctx))
    except Exception as exc:
        log.info("family export %s of job %s failed: %s", artifact_id, job_id, exc)
        with factory() as session:
            queries.finish_artifact(
                session, artifact_id=artifact_id, status="failed", error=f"{type(exc).__name__}: {exc}"
            )


def _context(
    session: Session, data_dir: Path, artifact_id: int, job_id: int, runs: int
) -> FamilyExportContext | None:
    """The export's inputs read from the job and its points; None if the job or artifact is gone."""
    job = session.get(Job, job_id)
    artifact = session.get(Artifact, artifact_id)
    if job is None or artifact is None:
        return None
    points: list[FamilyPointRef] = []
    for entry, cand in family_points(session, job):
        if cand is None:
            raise RuntimeError(f"point {entry.get('k')} of job {job_id} has no stored candidate")
        points.append(
            FamilyPointRef(
                k=int(entry["k"]),
                budget=float(entry["budget"]),
                candidate_id=cand.id,
                policy=dict(cand.policy),
                policy_hash=cand.policy_hash,
                accuracy=cand.accuracy,
                latency_ms=cand.latency_ms,
                target_ms=entry.get("target_ms"),
            )
        )
    model, dataset, device = job_refs(session, job)
    return FamilyExportContext(
        artifact_id=artifact_id,
        job_id=job_id,
        job_spec=JobSpec.model_validate(job.spec),
        model=model,
        dataset=dataset,
        device=device,
        points=tuple(points),
        out_path=data_dir / "artifacts" / f"{artifact_id}.zip",
        data_dir=data_dir,
        runs=runs,
    )
