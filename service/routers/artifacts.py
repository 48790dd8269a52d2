"""``/v1/artifacts``: exported models, what they proved, and their files."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse

from db.models import Artifact
from latency_models.runtimes_edge import model_suffix
from service import queries
from service.deps import CurrentTenant, ReadSessionDep, SessionDep
from service.routers.models import ERRORS
from service.schemas import ArtifactPublic, Message

router = APIRouter(prefix="/artifacts", tags=["artifacts"])
METRIC_FIELDS = ("measured_latency_ms", "dense_latency_ms", "speedup", "accuracy", "predicted_latency_ms")


def to_public(artifact: Artifact) -> ArtifactPublic:
    metrics = artifact.metrics or {}
    return ArtifactPublic(
        id=artifact.id,
        candidate_id=artifact.candidate_id,
        status=artifact.status,  # type: ignore[arg-type]
        format=artifact.format,
        int8=artifact.int8,
        finetune_epochs=artifact.finetune_epochs,
        sha256=artifact.sha256,
        size_bytes=artifact.size_bytes,
        metrics=metrics,
        error=artifact.error,
        created_at=artifact.created_at,
        finished_at=artifact.finished_at,
        **{k: metrics.get(k) for k in METRIC_FIELDS},
    )


def _artifact_or_404(session: SessionDep, tenant_id: int, artifact_id: int) -> Artifact:
    artifact = queries.get_artifact(session, tenant_id=tenant_id, artifact_id=artifact_id)
    if artifact is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"artifact {artifact_id} not found")
    return artifact


@router.get("/{artifact_id}", response_model=ArtifactPublic, responses=ERRORS)
def get_artifact(artifact_id: int, session: ReadSessionDep, tenant: CurrentTenant) -> ArtifactPublic:
    """Status and proof: measured vs dense latency, speedup, accuracy, predicted latency, sha256."""
    return to_public(_artifact_or_404(session, tenant.id, artifact_id))


@router.get(
    "/{artifact_id}/download",
    response_class=FileResponse,
    responses={
        **ERRORS,
        409: {"model": Message, "description": "not ready"},
        410: {"model": Message, "description": "the file was removed from the server"},
        200: {
            "description": (
                "The exported model: an ONNX file (binary protobuf, opset as exported; int8 QDQ nodes "
                "when the artifact is int8), named `candidate-<id>.onnx` in Content-Disposition; for an "
                "ExecuTorch or OpenVINO device its `.pte` program or OpenVINO IR zip (`.zip`). "
                "Its sha256 and size are the artifact's `sha256` and `size_bytes`."
            ),
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
    },
)
def download_artifact(artifact_id: int, session: ReadSessionDep, tenant: CurrentTenant) -> FileResponse:
    """The exported file (ONNX)."""
    artifact = _artifact_or_404(session, tenant.id, artifact_id)
    if artifact.status != "ready" or artifact.path is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"artifact {artifact_id} is {artifact.status}, not ready"
        )
    path = Path(artifact.path)
    if not path.is_file():
        raise HTTPException(status.HTTP_410_GONE, f"the file of artifact {artifact_id} is gone")
    with path.open("rb") as fh:  # ExecuTorch / OpenVINO devices' exports are .pte / IR zip files
        suffix = model_suffix(fh.read(8))
    return FileResponse(
        path, media_type="application/octet-stream", filename=f"candidate-{artifact.candidate_id}{suffix}"
    )
