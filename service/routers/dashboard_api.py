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
from service.deps import CurrentTenant, SessionDep
from service.routers.models import ERRORS

router = APIRouter(tags=["dashboard"])


class _Out(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class ScatterPoints(_Out):
    """Columnar points (one list per field, same length)."""

    id: list[int]
    accuracy: list[float | None]
    latency_ms: list[float | None]
    size_bytes: list[int | None]
    feasible: list[bool]
    summary: list[str]


class JobScatter(_Out):
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
    data: list[MeasurementPublic]
    count: int


@router.get("/jobs/{job_id}/scatter", response_model=JobScatter, responses=ERRORS)
def get_scatter(
    job_id: int,
    session: SessionDep,
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
    session: SessionDep,
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
