"""``/v1/jobs/{id}/family`` and ``/v1/jobs/{id}/family-export``: a family job's points and bundle."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, BackgroundTasks, HTTPException, Request, status

from db.models import Artifact, Candidate
from db.models import Device as DeviceRow
from engine.family_job import FAMILY_FORMAT, FAMILY_KEY
from engine.spec import JobSpec
from service import queries
from service.deps import CurrentTenant, ReadSessionDep, SessionDep
from service.family_exports import family_artifacts, family_points, run_family_export
from service.family_schemas import FamilyExportCreate, FamilyExportPublic, FamilyPointPublic, FamilyPublic
from service.routers.jobs import job_or_404
from service.routers.models import ERRORS
from service.schemas import ExportAccepted, Message

router = APIRouter(prefix="/jobs", tags=["jobs"])
CONFLICT: dict[int | str, dict[str, object]] = {
    **ERRORS,
    409: {"model": Message, "description": "not a family job, not finished, or an export is running"},
}


def _bundle_points(artifact: Artifact | None) -> dict[int, dict[str, Any]]:
    """Point index -> its entry in a ready export's manifest."""
    if artifact is None or artifact.status != "ready":
        return {}
    manifest = (artifact.metrics or {}).get(FAMILY_KEY) or {}
    return {int(e["index"]): e for e in manifest.get("points") or [] if isinstance(e, dict) and "index" in e}


def _export_public(artifact: Artifact) -> FamilyExportPublic:
    manifest = (artifact.metrics or {}).get(FAMILY_KEY) or {}
    return FamilyExportPublic(
        artifact_id=artifact.id,
        status=artifact.status,  # type: ignore[arg-type]
        error=artifact.error,
        download=f"/v1/artifacts/{artifact.id}/download" if artifact.status == "ready" else None,
        size_bytes=artifact.size_bytes,
        sizes=dict(manifest.get("sizes") or {}),
        dense=dict(manifest.get("dense") or {}),
    )


def _point(
    entry: dict[str, Any], cand: Candidate | None, siblings: list[int], bundle: dict[str, Any]
) -> FamilyPointPublic:
    return FamilyPointPublic(
        k=int(entry["k"]),
        budget=float(entry["budget"]),
        target_ms=entry.get("target_ms"),
        candidate_id=cand.id if cand is not None else None,
        policy_hash=str(entry["policy_hash"]),
        accuracy=cand.accuracy if cand is not None else entry.get("accuracy"),
        latency_ms=cand.latency_ms if cand is not None else entry.get("latency_ms"),
        measured_latency_ms=cand.measured_latency_ms if cand is not None else None,
        siblings=siblings,
        bundle_latency_ms=bundle.get("latency_ms"),
        bundle_accuracy=bundle.get("accuracy"),
        speedup=bundle.get("speedup"),
    )


@router.get("/{job_id}/family", response_model=FamilyPublic, responses=ERRORS)
def get_family(job_id: int, session: ReadSessionDep, tenant: CurrentTenant) -> FamilyPublic:
    """A family job's points in budget order: budget, candidate, accuracy, predicted and measured
    latency, and each point's measured latency and accuracy from the newest ready bundle.

    A job without ``family`` answers with no points and a note saying so; a family job's points
    appear once its search has marked them (when it finishes).
    """
    job = job_or_404(session, tenant.id, job_id)
    spec = JobSpec.model_validate(job.spec)
    if spec.family is None:
        return FamilyPublic(
            job_id=job.id,
            status=job.status,
            family=None,
            points=[],
            note=f"job {job.id} is not a family job (its spec has no family)",
        )
    pairs = family_points(session, job)
    siblings = list(dict.fromkeys(c.id for _, c in pairs if c is not None))
    artifacts = family_artifacts(session, siblings[:1])
    ready = next((a for a in artifacts if a.status == "ready"), None)
    bundle = _bundle_points(ready)
    summary = (job.progress or {}).get(FAMILY_KEY) or {}
    note = str(summary.get("note") or "") if pairs else f"job {job.id} is {job.status}: no points yet"
    return FamilyPublic(
        job_id=job.id,
        status=job.status,
        family=spec.family,
        dense_latency_ms=summary.get("dense_latency_ms"),
        note=note,
        points=[_point(entry, cand, siblings, bundle.get(k, {})) for k, (entry, cand) in enumerate(pairs)],
        export=_export_public(artifacts[0]) if artifacts else None,
    )


@router.post(
    "/{job_id}/family-export",
    response_model=ExportAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses=CONFLICT,
)
def export_family(
    job_id: int,
    body: FamilyExportCreate,
    request: Request,
    background: BackgroundTasks,
    session: SessionDep,
    tenant: CurrentTenant,
) -> ExportAccepted:
    """Build the bundle of a succeeded family job: its points on one shared weight set (joint
    refit, jointly fine-tuned for the spec's ``finetune_epochs``), one ONNX graph per point
    reading one ``weights.bin``, each point timed against the dense model on the job's device,
    and ``family.json`` (what ``modeltailor.switch.FamilySwitch`` reads), zipped. Poll ``GET
    /v1/artifacts/{id}`` until ready, then download the zip; ``GET /v1/jobs/{id}/family`` shows
    each point's measured figures.
    """
    job = job_or_404(session, tenant.id, job_id)
    spec = JobSpec.model_validate(job.spec)
    if spec.family is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"job {job_id} is not a family job: submit one with 'family': {{'budgets': [...]}} "
            "(or export one of its candidates with POST /v1/candidates/{id}/export)",
        )
    if job.status != "succeeded":
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"job {job_id} is {job.status}: a family is exported once it succeeded"
        )
    pairs = family_points(session, job)
    if not pairs or any(c is None for _, c in pairs):
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} has no stored family points to export")
    device = session.get(DeviceRow, job.device_id)
    if device is None or device.runtime != "onnxruntime" or device.kind == "remote":
        where = f"{device.kind} {device.runtime}" if device is not None else "deleted"
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"job {job_id}'s device is {where}: a family bundle is ONNX timed in the server's process, "
            "so it needs a local onnxruntime device",
        )
    first = pairs[0][1]
    assert first is not None
    if any(a.status == "pending" for a in family_artifacts(session, [first.id])):
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"a family export of job {job_id} is running; poll its artifact"
        )
    artifact = queries.add_artifact(
        session,
        tenant_id=tenant.id,
        candidate_id=first.id,
        format=FAMILY_FORMAT,
        int8=False,
        finetune_epochs=spec.family.finetune_epochs,
    )
    session.commit()
    background.add_task(run_family_export, request.app.state, artifact.id, job.id, body.runs)
    return ExportAccepted(artifact_id=artifact.id, status=artifact.status)
