"""``/v1/candidates``: one candidate, and exporting it as a model file."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, HTTPException, Request, status

from service import queries
from service.deps import CurrentTenant, ReadSessionDep, SessionDep
from service.exports import run_export
from service.routers.jobs import to_candidate
from service.routers.models import ERRORS
from service.schemas import CandidatePublic, ExportAccepted, ExportCreate

router = APIRouter(prefix="/candidates", tags=["candidates"])


@router.get("/{candidate_id}", response_model=CandidatePublic, responses=ERRORS)
def get_candidate(candidate_id: int, session: ReadSessionDep, tenant: CurrentTenant) -> CandidatePublic:
    """One candidate with its policy and scores."""
    found = queries.get_candidate(session, tenant_id=tenant.id, candidate_id=candidate_id)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"candidate {candidate_id} not found")
    return to_candidate(found[0])


@router.post(
    "/{candidate_id}/export",
    response_model=ExportAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses=ERRORS,
)
def export_candidate(
    candidate_id: int,
    body: ExportCreate,
    request: Request,
    background: BackgroundTasks,
    session: SessionDep,
    tenant: CurrentTenant,
) -> ExportAccepted:
    """Build the candidate's compressed model; poll ``GET /v1/artifacts/{id}`` until ready."""
    found = queries.get_candidate(session, tenant_id=tenant.id, candidate_id=candidate_id)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"candidate {candidate_id} not found")
    artifact = queries.add_artifact(
        session,
        tenant_id=tenant.id,
        candidate_id=candidate_id,
        format=body.format,
        int8=body.int8,
        finetune_epochs=body.finetune_epochs,
    )
    session.commit()
    background.add_task(run_export, request.app.state, artifact.id)
    return ExportAccepted(artifact_id=artifact.id, status=artifact.status)
