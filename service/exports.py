"""Runs one export in the background and records its outcome on the artifact row."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db.models import Artifact, Candidate, Job, Measurement
from db.models import Device as DeviceRow
from engine.job import DeviceRef, ExportContext, ExportResult
from engine.spec import JobSpec
from service import queries
from service.device_tasks import POLL_S, add_task
from service.runner import candidate_scores, job_refs

log = logging.getLogger("modeltailor.exports")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def time_on_agent(
    factory: sessionmaker[Session],
    data_dir: Path,
    device: DeviceRef,
    artifact_id: int,
    model: Path,
    dense: Path,
    wait_s: float,
) -> tuple[float, float, float]:
    """Time ``model`` against ``dense`` on a remote device through its agent's task, waiting up
    to ``wait_s`` (``Timeouts.remeasure_wait_s``): (measured ms, dense ms, speedup)."""
    with factory() as session:
        row = session.get(DeviceRow, device.id)
        if row is None:
            raise RuntimeError(f"device {device.name} was deleted")
        task = add_task(
            session,
            data_dir=data_dir,
            device=row,
            tenant_id=row.tenant_id,
            purpose="export",
            model=model,
            baseline=dense,
            runs=200,
            warmup=20,
            info={"artifact_id": artifact_id},
        )
        task_id = task.id
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        with factory() as session:
            m = session.get(Measurement, task_id)
            if m is not None and m.status == "failed":
                raise RuntimeError(f"the device agent could not time the export: {m.error}")
            if m is not None and m.status == "done":
                stats = dict(m.latency_stats)
                dense_ms = (stats.get("baseline") or {}).get("median_ms")
                if m.latency_ms is None or dense_ms is None or not stats.get("speedup"):
                    raise RuntimeError("the device agent's result lacks the dense timing")
                return float(m.latency_ms), float(dense_ms), float(stats["speedup"])
        time.sleep(POLL_S)
    raise RuntimeError(
        f"no device agent timed the export on {device.name} within {wait_s:.0f} s; "
        f"is `modeltailor device-agent --device {device.id}` running?"
    )


def finish_ready(factory: sessionmaker[Session], artifact_id: int, result: ExportResult) -> None:
    """Mark artifact ``artifact_id`` ready with the file ``result`` wrote (its hash and size)."""
    path = Path(result.path)
    with factory() as session:
        queries.finish_artifact(
            session,
            artifact_id=artifact_id,
            status="ready",
            path=str(path),
            sha256=_sha256(path),
            size_bytes=path.stat().st_size,
            metrics=dict(result.metrics),
        )


def run_export(state: Any, artifact_id: int) -> None:
    """Build artifact ``artifact_id`` with ``state.exporter``; mark it ready or failed with why."""
    factory = state.session_factory
    try:
        ctx = _context(factory, Path(state.settings.data_dir), artifact_id, state.timeouts.remeasure_wait_s)
        if ctx is None:
            return
        finish_ready(factory, artifact_id, state.exporter(ctx))
    except Exception as exc:
        log.info("export %s failed: %s", artifact_id, exc)
        message = str(exc) if isinstance(exc, NotImplementedError) else f"{type(exc).__name__}: {exc}"
        with factory() as session:
            queries.finish_artifact(session, artifact_id=artifact_id, status="failed", error=message)


def _context(
    factory: sessionmaker[Session], data_dir: Path, artifact_id: int, wait_s: float
) -> ExportContext | None:
    """The export's inputs read from its artifact, candidate and job; None if one was deleted."""
    with factory() as session:
        artifact = session.get(Artifact, artifact_id)
        candidate = session.get(Candidate, artifact.candidate_id) if artifact else None
        job = session.get(Job, candidate.job_id) if candidate else None
        if artifact is None or candidate is None or job is None:
            return None
        model, dataset, device = job_refs(session, job)
        return ExportContext(
            artifact_id=artifact_id,
            policy=dict(candidate.policy),
            scores=candidate_scores(candidate),
            job_spec=JobSpec.model_validate(job.spec),
            model=model,
            dataset=dataset,
            device=device,
            int8=artifact.int8,
            finetune_epochs=artifact.finetune_epochs,
            out_path=data_dir / "artifacts" / f"{artifact_id}.{artifact.format}",
            data_dir=data_dir,
            progress=lambda data: None,
            time_on_agent=lambda m, d: time_on_agent(factory, data_dir, device, artifact_id, m, d, wait_s),
        )
