"""The seam for family jobs (``JobSpec.family``) and their bundle export; imports no torch.

A family job runs through ``engine.job.run_job`` like any job (``engine.run.execute`` hands
it to :func:`engine.family_run.run_family`). Its K points are candidates of the job: each
one's ``extra["family"]`` is ``{"job_family": job id, "point": k, "points": [k, ...],
"budget": f_k, "target_ms": ..., "siblings": [policy hash of every point, in order],
"moves": the chain's moves from the previous point}`` and
the job's ``progress["family"]`` summarises them (budgets, each point's policy hash, the note
when the search stopped short), which ``GET /v1/jobs/{id}/family`` reads.

:func:`export_family` builds the bundle of a finished family job (``POST
/v1/jobs/{id}/family-export``): the points' policies on one shared weight set (joint refit),
jointly fine-tuned when the spec asks, written as ``compression.family_export`` bundle,
every point timed against the dense model and scored from its own graph, zipped into one
artifact file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.job import DatasetRef, DeviceRef, ExportResult, ModelRef
from engine.spec import JobSpec

#: ``Artifact.format`` of a family bundle (a zip of the bundle folder).
FAMILY_FORMAT = "family"
#: The key of a point's candidate extra, and of the job's progress summary.
FAMILY_KEY = "family"


@dataclass(frozen=True)
class FamilyPointRef:
    """One stored point of a family job, as the export reads it."""

    k: int
    budget: float
    candidate_id: int
    policy: dict[str, Any]
    policy_hash: str
    accuracy: float | None
    latency_ms: float | None  # predicted in the search
    target_ms: float | None = None


@dataclass(frozen=True)
class FamilyExportContext:
    """Everything a family export needs: the job's inputs and its points in budget order."""

    artifact_id: int
    job_id: int
    job_spec: JobSpec
    model: ModelRef
    dataset: DatasetRef
    device: DeviceRef
    points: tuple[FamilyPointRef, ...]
    out_path: Path  # write the zipped bundle here
    data_dir: Path  # the service's data directory (zoo weights cache, as for the job)
    runs: int = 200  # timed runs per point, interleaved with dense
    progress: Callable[[dict[str, Any]], None] = lambda _data: None


def export_family(ctx: FamilyExportContext) -> ExportResult:
    """Share the points' weights, fine-tune jointly if asked, write, measure and zip the bundle."""
    from engine.family_run import export_family as body

    return body(ctx)
