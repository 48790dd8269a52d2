"""``/v1/devices`` and ``/v1/predictors``: latency targets and their predictors."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from db.models import Device
from service import queries
from service.deps import CurrentTenant, SessionDep
from service.routers.models import ERRORS
from service.schemas import DeviceCreate, DevicePublic, DevicesPublic, PredictorPublic, PredictorsPublic

router = APIRouter(prefix="/devices", tags=["devices"])
predictors_router = APIRouter(prefix="/predictors", tags=["devices"])


def to_public(device: Device) -> DevicePublic:
    return DevicePublic(
        id=device.id,
        name=device.name,
        kind=device.kind,
        runtime=device.runtime,
        threads=device.threads,
        settings=device.settings,
        shared=device.tenant_id is None,
        created_at=device.created_at,
    )


@router.get("", response_model=DevicesPublic, responses=ERRORS)
def list_devices(session: SessionDep, tenant: CurrentTenant) -> DevicesPublic:
    """Your devices and the built-in local CPU devices."""
    rows = queries.list_devices(session, tenant_id=tenant.id)
    return DevicesPublic(data=[to_public(d) for d in rows], count=len(rows))


@router.post(
    "",
    response_model=DevicePublic,
    status_code=status.HTTP_201_CREATED,
    responses={**ERRORS, 409: {"description": "name already used"}},
)
def create_device(body: DeviceCreate, session: SessionDep, tenant: CurrentTenant) -> DevicePublic:
    """Register a device (``kind="remote"``: measured by a device agent running on it)."""
    if queries.device_name_taken(session, tenant_id=tenant.id, name=body.name):
        raise HTTPException(status.HTTP_409_CONFLICT, f"a device named {body.name!r} already exists")
    device = queries.add_device(session, tenant_id=tenant.id, **body.model_dump())
    session.commit()
    return to_public(device)


@router.get("/{device_id}", response_model=DevicePublic, responses=ERRORS)
def get_device(device_id: int, session: SessionDep, tenant: CurrentTenant) -> DevicePublic:
    """One device."""
    device = queries.get_device(session, tenant_id=tenant.id, device_id=device_id)
    if device is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"device {device_id} not found")
    return to_public(device)


@predictors_router.get("", response_model=PredictorsPublic, responses=ERRORS)
def list_predictors(device_id: int, session: SessionDep, tenant: CurrentTenant) -> PredictorsPublic:
    """Predictor versions of a device with their held-out metrics."""
    if queries.get_device(session, tenant_id=tenant.id, device_id=device_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"device {device_id} not found")
    rows = queries.list_predictors(session, device_id=device_id)
    return PredictorsPublic(
        data=[PredictorPublic.model_validate(p, from_attributes=True) for p in rows], count=len(rows)
    )
