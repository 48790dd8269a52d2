"""Runs one export in the background and records its outcome on the artifact row."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from db.models import Artifact, Candidate, Job
from service import queries
from service.runner import candidate_scores, job_refs
from service.search_bridge import ExportContext

log = logging.getLogger("modeltailor.exports")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def run_export(state: Any, artifact_id: int) -> None:
    """Build artifact ``artifact_id`` with ``state.exporter``; mark it ready or failed with why."""
    factory = state.session_factory
    with factory() as session:
        artifact = session.get(Artifact, artifact_id)
        candidate = session.get(Candidate, artifact.candidate_id) if artifact else None
        job = session.get(Job, candidate.job_id) if candidate else None
        if artifact is None or candidate is None or job is None:
            return
        model, dataset, device = job_refs(session, job)
        out = Path(state.settings.data_dir) / "artifacts" / f"{artifact_id}.{artifact.format}"
        ctx = ExportContext(
            artifact_id=artifact_id,
            policy=dict(candidate.policy),
            scores=candidate_scores(candidate),
            job_spec=dict(job.spec),
            model=model,
            dataset=dataset,
            device=device,
            int8=artifact.int8,
            finetune_epochs=artifact.finetune_epochs,
            out_path=out,
            data_dir=Path(state.settings.data_dir),
            progress=lambda data: None,
            session_factory=factory,
        )
    try:
        result = state.exporter(ctx)
        path = Path(result.path)
        metrics = dict(result.metrics)
        with factory() as session:
            queries.finish_artifact(
                session,
                artifact_id=artifact_id,
                status="ready",
                path=str(path),
                sha256=_sha256(path),
                size_bytes=path.stat().st_size,
                metrics=metrics,
            )
    except Exception as exc:
        log.info("export %s failed: %s", artifact_id, exc)
        message = str(exc) if isinstance(exc, NotImplementedError) else f"{type(exc).__name__}: {exc}"
        with factory() as session:
            queries.finish_artifact(session, artifact_id=artifact_id, status="failed", error=message)
