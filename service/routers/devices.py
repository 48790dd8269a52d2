"""``/v1/devices``, ``/v1/predictors`` and ``/v1/calibrations``: latency targets, their
predictors, calibrations, and the device agent's task pull / result push.

The built-in devices are shared by every tenant: only the admin (``X-Admin-Key``) calibrates
them over REST, and a tenant's job that calibrates one makes a predictor of that tenant only
(``service.predictor_versions``). Nothing a tenant made on a shared device reaches another tenant: its
calibrations and predictors are its own, and the device's own predictors show no uploaded
model's name.

GET handlers only read (a read-only session): ending an abandoned calibration and mirroring
predictor versions written outside the service happen on write paths and in the
housekeeping loop (``service.housekeeping``), and a device agent claims tasks with
``POST /v1/devices/{id}/tasks/claim``.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request, status
from fastapi.responses import FileResponse
from sqlalchemy import select

from db.models import Calibration, Dataset, Device, Predictor
from service import calibrations, device_tasks, queries
from service import predictor_versions as versions
from service.deps import CurrentTenant, ReadSessionDep, SessionDep, SettingsDep, TimeoutsDep
from service.routers.models import ERRORS
from service.schemas import (
    AgentResult,
    CalibrationCreate,
    CalibrationPublic,
    CalibrationsPublic,
    DeviceCreate,
    DevicePublic,
    DevicesPublic,
    Message,
    PredictorPublic,
    PredictorsPublic,
    ResultAccepted,
    TasksPublic,
)
from service.settings import Settings

router = APIRouter(prefix="/devices", tags=["devices"])
predictors_router = APIRouter(prefix="/predictors", tags=["devices"])
calibrations_router = APIRouter(prefix="/calibrations", tags=["devices"])
CONFLICT: dict[int | str, dict[str, object]] = {
    409: {"model": Message, "description": "a calibration of this device is already running"}
}
FORBIDDEN: dict[int | str, dict[str, object]] = {
    403: {"model": Message, "description": "a shared built-in device: calibrating it needs the admin key"}
}
AdminKey = Annotated[
    str | None,
    Header(
        alias="X-Admin-Key",
        description="the server's admin key (MODELTAILOR_ADMIN_KEY): calibrates the shared built-in "
        "devices and cancels any calibration",
    ),
]
# An uploaded model's calibration name, "upload-<sha256 prefix or model name>@<input shape>".
_UPLOAD_NAME = re.compile(r"upload-[^@]*")


def is_admin(key: str | None, settings: Settings) -> bool:
    """Whether ``key`` is the server's admin key (never, when the server has none)."""
    return (
        key is not None
        and settings.admin_key is not None
        and secrets.compare_digest(key.encode(), settings.admin_key.encode())
    )


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


def calibration_public(cal: Calibration) -> CalibrationPublic:
    return CalibrationPublic.model_validate(cal, from_attributes=True)


def _anonymous(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` without the names of uploaded models (held-out names, the focus model)."""
    out = dict(metrics)
    focus = out.get("focus")
    if isinstance(focus, dict) and "space_id" in focus:
        out["focus"] = {**focus, "space_id": _UPLOAD_NAME.sub("upload", str(focus["space_id"]))}
    holdout = out.get("holdout")
    if isinstance(holdout, dict) and isinstance(holdout.get("names"), list):
        names = [_UPLOAD_NAME.sub("upload", str(n)) for n in holdout["names"]]
        out["holdout"] = {**holdout, "names": names}
    return out


def predictor_public(row: Predictor, device: Device) -> PredictorPublic:
    """A predictor as its viewer may see it: the own predictors of a shared device may have
    been focused on someone's upload (the admin's, or a tenant's before predictors were
    scoped), so they show no uploaded model's name."""
    anonymous = device.tenant_id is None and row.tenant_id is None
    return PredictorPublic(
        id=row.id,
        device_id=row.device_id,
        version=row.version,
        kind=row.kind,
        scope="device" if row.tenant_id is None else "tenant",
        metrics=_anonymous(row.metrics) if anonymous else row.metrics,
        created_at=row.created_at,
    )


def _device_or_404(session: SessionDep, tenant_id: int, device_id: int) -> Device:
    device = queries.get_device(session, tenant_id=tenant_id, device_id=device_id)
    if device is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"device {device_id} not found")
    return device


@router.get("", response_model=DevicesPublic, responses=ERRORS)
def list_devices(session: ReadSessionDep, tenant: CurrentTenant) -> DevicesPublic:
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
def get_device(device_id: int, session: ReadSessionDep, tenant: CurrentTenant) -> DevicePublic:
    """One device."""
    return to_public(_device_or_404(session, tenant.id, device_id))


# --- calibration and predictors -----------------------------------------------------------


@router.post(
    "/{device_id}/calibrate",
    response_model=CalibrationPublic,
    status_code=status.HTTP_202_ACCEPTED,
    responses={**ERRORS, **FORBIDDEN, **CONFLICT, 422: {"model": Message}},
)
def calibrate_device(
    device_id: int,
    body: CalibrationCreate,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    timeouts: TimeoutsDep,
    tenant: CurrentTenant,
    admin_key: AdminKey = None,
) -> CalibrationPublic:
    """Start measuring sampled models on the device and fitting a new predictor version.

    Answers at once with the calibration's handle; follow it with
    ``GET /v1/calibrations/{id}`` (progress: done / total), stop it with
    ``POST /v1/calibrations/{id}/cancel``. A local device is measured by the server itself; a
    remote one by its device agents, which pull the measurement tasks from
    ``GET /v1/devices/{id}/tasks``. A shared built-in device is calibrated by the admin only
    (header ``X-Admin-Key``); a job on it calibrates a predictor of your own when it needs one.
    """
    device = _device_or_404(session, tenant.id, device_id)
    if device.kind == "remote" and device.runtime == "torch":
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"device {device.name} is remote with runtime {device.runtime}: device agents time ONNX Runtime, "
            "ExecuTorch and OpenVINO files only",
        )
    if body.samples > settings.max_calibration_samples:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"samples {body.samples} is more than this server's limit of {settings.max_calibration_samples} "
            "(MODELTAILOR_MAX_CALIBRATION_SAMPLES)",
        )
    loader = None
    if body.model_id is not None:
        model = queries.get_model(session, tenant_id=tenant.id, model_id=body.model_id)
        if model is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"model {body.model_id} not found")
        dataset = session.get(Dataset, model.dataset_id) if model.dataset_id is not None else None
        loader = calibrations.focus_loader(
            name=model.name,
            path=model.path,
            zoo=model.zoo,
            sha256=model.sha256,
            shapes=dict(dataset.shapes) if dataset is not None else None,
        )
    admin = is_admin(admin_key, settings)
    if device.tenant_id is None and not admin:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"device {device.name} is shared by every tenant: calibrating it needs the admin key (header "
            "X-Admin-Key, the server's MODELTAILOR_ADMIN_KEY). A job on it calibrates a predictor of your "
            "own when it needs one, or calibrate a device of your own (POST /v1/devices).",
        )
    params = {
        "samples": body.samples,
        "seed": body.seed,
        "runs": body.runs,
        "plan": "focused" if body.model_id is not None else "general",
        "scope": "device",
    }
    cal = calibrations.create_calibration(
        session, device=device, tenant_id=tenant.id, params=params, model_id=body.model_id
    )
    if cal is None:
        active = calibrations.active_calibration(session, device_id=device.id)
        # Another tenant's calibration stays anonymous; its owner and the admin may cancel it.
        if active is not None and (active.tenant_id == tenant.id or admin):
            which = f" (calibration {active.id}: POST /v1/calibrations/{active.id}/cancel stops it)"
        else:
            which = ""
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"device {device.name} is being calibrated already{which}; wait for it to end",
        )
    calibrations.start_calibration_thread(
        request.app.state.session_factory,
        Path(settings.data_dir),
        cal.id,
        timeouts=timeouts,
        model_loader=loader,
    )
    return calibration_public(cal)


@router.get("/{device_id}/calibrations", response_model=CalibrationsPublic, responses=ERRORS)
def list_calibrations(device_id: int, session: ReadSessionDep, tenant: CurrentTenant) -> CalibrationsPublic:
    """Your calibrations of the device, newest first."""
    device = _device_or_404(session, tenant.id, device_id)
    rows = session.scalars(
        select(Calibration)
        .where(Calibration.device_id == device.id, Calibration.tenant_id == tenant.id)
        .order_by(Calibration.id.desc())
        .limit(200)
    ).all()
    return CalibrationsPublic(data=[calibration_public(c) for c in rows], count=len(rows))


@calibrations_router.get("/{calibration_id}", response_model=CalibrationPublic, responses=ERRORS)
def get_calibration(calibration_id: int, session: ReadSessionDep, tenant: CurrentTenant) -> CalibrationPublic:
    """One calibration: status, progress (done / total, message), and the predictor it made."""
    cal = session.get(Calibration, calibration_id) if queries.storable_id(calibration_id) else None
    if cal is None or cal.tenant_id != tenant.id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"calibration {calibration_id} not found")
    return calibration_public(cal)


@calibrations_router.post("/{calibration_id}/cancel", response_model=CalibrationPublic, responses=ERRORS)
def cancel_calibration(
    calibration_id: int,
    session: SessionDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
    admin_key: AdminKey = None,
) -> CalibrationPublic:
    """Stop a calibration of yours (the admin: anyone's); the device is free for the next one at
    once. Its measurements are kept; one that already ended is returned unchanged."""
    cal = session.get(Calibration, calibration_id) if queries.storable_id(calibration_id) else None
    admin = is_admin(admin_key, settings)
    if cal is None or (cal.tenant_id != tenant.id and not admin):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"calibration {calibration_id} not found")
    calibrations.cancel_calibration(session, calibration_id=cal.id, by="the admin" if admin else "its owner")
    session.refresh(cal)
    return calibration_public(cal)


@router.get(
    "/{device_id}/predictor",
    response_model=PredictorPublic,
    responses={**ERRORS, 404: {"model": Message, "description": "no such device, or no predictor yet"}},
)
def current_predictor(
    device_id: int,
    session: ReadSessionDep,
    tenant: CurrentTenant,
    version: Annotated[
        int | None, Query(ge=1, le=queries.MAX_ID, description="a version (default: the newest)")
    ] = None,
) -> PredictorPublic:
    """The predictor your jobs on the device use, or ``version``, with its held-out metrics.

    That is the newest version, except on a shared built-in device where your own newest
    (made by your jobs) comes before the device's own (made by the admin). Metrics are
    measured on architectures the predictor never trained on: ``within_10pct`` and
    ``within_5pct`` (% of predictions), ``mape`` (%), ``rmse_ms``, the same for the
    predicted speedup over the dense model, and every predictor kind's figures under
    ``detail``.
    """
    device = _device_or_404(session, tenant.id, device_id)
    rows = versions.predictor_rows(session, device=device, tenant_id=tenant.id)
    chosen = versions.preferred(rows, version)
    if chosen is None:
        what = f"version {version}" if version is not None else "predictor yet"
        how = f"POST /v1/devices/{device.id}/calibrate"
        if device.tenant_id is None:
            how = f"submit a job on it, or the admin calibrates it ({how})"
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"device {device.name} has no {what}; calibrate it: {how}"
        )
    return predictor_public(chosen, device)


@predictors_router.get("", response_model=PredictorsPublic, responses=ERRORS)
def list_predictors(device_id: int, session: ReadSessionDep, tenant: CurrentTenant) -> PredictorsPublic:
    """Predictor versions of a device with their held-out metrics."""
    device = _device_or_404(session, tenant.id, device_id)
    rows = versions.predictor_rows(session, device=device, tenant_id=tenant.id)
    return PredictorsPublic(data=[predictor_public(p, device) for p in rows], count=len(rows))


# --- the device agent ---------------------------------------------------------------------


@router.get("/{device_id}/tasks", response_model=TasksPublic, responses=ERRORS)
def list_tasks(
    device_id: int,
    session: ReadSessionDep,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=50, description="most tasks to list")] = 1,
) -> TasksPublic:
    """The measurement tasks waiting for a device agent, oldest first, without claiming them
    (an agent claims with ``POST /v1/devices/{id}/tasks/claim``)."""
    device = _device_or_404(session, tenant.id, device_id)
    rows = device_tasks.open_tasks(session, device=device, limit=limit, claimable_only=True)
    tasks = [device_tasks.task_json(m) for m in rows]
    return TasksPublic(tasks=tasks, count=len(tasks))


@router.post("/{device_id}/tasks/claim", response_model=TasksPublic, responses=ERRORS)
def claim_tasks(
    device_id: int,
    session: SessionDep,
    tenant: CurrentTenant,
    timeouts: TimeoutsDep,
    limit: Annotated[int, Query(ge=1, le=50, description="most tasks to hand out")] = 1,
) -> TasksPublic:
    """Hand measurement tasks to a device agent (claims them: each goes to one agent).

    A task not answered within the task lease (``MODELTAILOR_TASK_LEASE_S``, default 10
    minutes) is handed out again, so a crashed agent loses nothing. Each task names its ONNX
    files by sha256 and a ``/v1/devices/{id}/blobs/{sha256}`` URL. An empty list means
    nothing to do.
    """
    device = _device_or_404(session, tenant.id, device_id)
    claimed = device_tasks.claim_tasks(session, device=device, limit=limit, lease_s=timeouts.task_lease_s)
    tasks = [device_tasks.task_json(m) for m in claimed]
    return TasksPublic(tasks=tasks, count=len(tasks))


@router.post(
    "/{device_id}/measurements",
    response_model=ResultAccepted,
    responses={**ERRORS, 422: {"model": Message}},
)
def push_result(
    device_id: int, body: AgentResult, session: SessionDep, tenant: CurrentTenant
) -> ResultAccepted:
    """Store a device agent's result for one task (repeats of a stored result are accepted
    and ignored, so an agent may safely re-send after a network error)."""
    from latency_models.tasks import MeasurementResult, TaskError

    device = _device_or_404(session, tenant.id, device_id)
    try:
        result = MeasurementResult.from_dict(body.model_dump())
    except TaskError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"invalid result: {exc}") from None
    problem = device_tasks.check_result(result)
    if problem is not None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"invalid result: {problem}")
    row, stored = device_tasks.record_result(session, device=device, result=result)
    if row is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"task {result.task_id} is not a task of device {device_id}"
        )
    return ResultAccepted(task_id=result.task_id, measurement_id=row.id, status=row.status, stored=stored)


@router.get(
    "/{device_id}/blobs/{sha256}",
    response_class=FileResponse,
    responses={
        **ERRORS,
        200: {
            "description": (
                "An ONNX model file (binary protobuf) named by a task; its sha256 is the one in the "
                "URL, which the agent checks before timing it."
            ),
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
    },
)
def get_blob(
    device_id: int, sha256: str, session: ReadSessionDep, settings: SettingsDep, tenant: CurrentTenant
) -> FileResponse:
    """An ONNX file of one of the device's tasks, by its sha256."""
    device = _device_or_404(session, tenant.id, device_id)
    path = device_tasks.blob_path(Path(settings.data_dir), device.id, sha256)
    if path is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no file {sha256[:16]} for device {device_id}")
    return FileResponse(path, media_type="application/octet-stream", filename=f"{sha256}.onnx")
