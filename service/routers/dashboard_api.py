"""Read endpoints the dashboard needs beyond the core contract: a decimated job scatter and measurements.

Mounted under ``/v1`` like every resource router, behind the same API key.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, ConfigDict, Field

from service import queries
from service.dashboard.data import DEFAULT_MAX_POINTS, device_measurements, job_scatter
from service.deps import CurrentTenant, ReadSessionDep
from service.routers.models import ERRORS
from service.schemas import EXAMPLE_JOB, examples

router = APIRouter(tags=["dashboard"])


class _Out(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


_POINTS = {
    "id": [37, 12, 5],
    "accuracy": [0.9112, 0.9034, 0.8751],
    "latency_ms": [1.42, 1.18, 0.91],
    "size_bytes": [612_480, 498_112, 301_960],
    "feasible": [True, True, True],
    "summary": [
        "all layers: width 0.75, 2:4 sparse, int8 | conv1 dense | skip 1 block: layer3.2 | activations int8",
        "all layers: width 0.60, 2:4 sparse, int8",
        "all layers: width 0.40, int8",
    ],
}
_OTHERS = {
    "id": [2, 9],
    "accuracy": [0.8402, 0.7311],
    "latency_ms": [1.95, 1.02],
    "size_bytes": [702_144, 340_016],
    "feasible": [True, False],
    "summary": ["all layers: width 0.90, unstructured 50%", "all layers: width 0.30"],
}
_JOB = {k: EXAMPLE_JOB[k] for k in ("id", "status", "algorithm", "model_id", "dataset_id", "device_id")}
_SCATTER = {
    "job_id": 1,
    "status": "running",
    "job": {**_JOB, "progress": EXAMPLE_JOB["progress"], "error": None},
    "objectives": EXAMPLE_JOB["spec"]["objectives"],
    "constraints": {"accuracy_drop": {"max": 0.01}},
    "baseline": EXAMPLE_JOB["baseline"],
    "total": 37,
    "feasible_total": 36,
    "shown": 5,
    "decimated": False,
    "front": _POINTS,
    "size_front_ids": [5, 12, 37],
    "others": _OTHERS,
}
_MEASUREMENT = {
    "id": 12,
    "device_id": 1,
    "status": "done",
    "purpose": "calibration",
    "latency_ms": 1.47,
    "latency_stats": {"dense_latency_ms": 2.35, "speedup": 1.6, "ratio_to_reference": 0.82},
    "features": {
        "total_macs": 23_101_440.0,
        "n_kernels": 21.0,
        "input_numel": 3072.0,
        "int8": 1.0,
        "total_out_numel": 180_224.0,
        "total_params": 151_914.0,
        "macs": 23_101_440.0,
        "space_id": "resnet20@32",
    },
    "error": None,
    "created_at": "2026-03-02T10:15:30.512000",
    "measured_at": "2026-03-02T10:16:02.104000",
}


class ScatterPoints(_Out):
    """Columnar points (one list per field, same length)."""

    model_config = examples(_POINTS)

    id: list[int]
    accuracy: list[float | None]
    latency_ms: list[float | None]
    size_bytes: list[int | None]
    feasible: list[bool]
    summary: list[str]


class JobScatter(_Out):
    model_config = examples(_SCATTER)

    job_id: int
    status: str
    job: dict[str, Any] = Field(
        description="status, algorithm, ids, progress and error: enough to draw the page"
    )
    objectives: list[dict[str, Any]]
    constraints: dict[str, Any]
    baseline: dict[str, Any]
    total: int
    feasible_total: int
    shown: int
    decimated: bool
    front: ScatterPoints
    size_front_ids: list[int]
    others: ScatterPoints


class MeasurementPublic(_Out):
    model_config = examples(_MEASUREMENT)

    id: int
    device_id: int
    status: str
    purpose: str
    latency_ms: float | None
    latency_stats: dict[str, Any]
    features: dict[str, Any]
    error: str | None
    created_at: dt.datetime
    measured_at: dt.datetime | None


class MeasurementsPublic(_Out):
    model_config = examples({"data": [_MEASUREMENT], "count": 1})

    data: list[MeasurementPublic]
    count: int


@router.get("/jobs/{job_id}/scatter", response_model=JobScatter, responses=ERRORS)
def get_scatter(
    job_id: int,
    session: ReadSessionDep,
    tenant: CurrentTenant,
    max_points: Annotated[int, Query(ge=100, le=100_000)] = DEFAULT_MAX_POINTS,
) -> JobScatter:
    """Every Pareto point plus the dominated candidates thinned on a grid to about ``max_points``."""
    job = queries.get_job(session, tenant_id=tenant.id, job_id=job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return JobScatter.model_validate(job_scatter(session, job=job, max_points=max_points))


@router.get("/devices/{device_id}/measurements", response_model=MeasurementsPublic, responses=ERRORS)
def list_measurements(
    device_id: int,
    session: ReadSessionDep,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 2000,
) -> MeasurementsPublic:
    """Latency measurements on a device (calibration and candidates), newest first."""
    if queries.get_device(session, tenant_id=tenant.id, device_id=device_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"device {device_id} not found")
    rows, total = device_measurements(session, tenant_id=tenant.id, device_id=device_id, limit=limit)
    return MeasurementsPublic(
        data=[MeasurementPublic.model_validate(m, from_attributes=True) for m in rows], count=total
    )
