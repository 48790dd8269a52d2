"""``/v1/datasets``: upload an .npz or pick a built-in data set."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, status
from starlette.concurrency import run_in_threadpool

from db.models import Dataset
from service import queries
from service.deps import CurrentTenant, SessionDep, SettingsDep
from service.routers._body import is_multipart, json_body, upload_or_json
from service.routers.models import ERRORS, UPLOAD_ERRORS
from service.schemas import BuiltinDatasetCreate, DatasetPublic, DatasetsPublic
from service.uploads import builtin_shapes, discard, inspected, receive_file, store, upload_slot

router = APIRouter(prefix="/datasets", tags=["datasets"])


def to_public(dataset: Dataset) -> DatasetPublic:
    return DatasetPublic.model_validate(dataset, from_attributes=True)


@router.post(
    "",
    response_model=DatasetPublic,
    status_code=status.HTTP_201_CREATED,
    responses=UPLOAD_ERRORS,
    openapi_extra=upload_or_json(
        BuiltinDatasetCreate,
        "multipart `file` (.npz with x_train, y_train, x_val, y_val) + `name`, or JSON",
        "a NumPy .npz archive with arrays x_train, y_train, x_val, y_val (x_test, y_test optional); "
        "x is float (N, C, H, W), y integer class labels; pickled arrays are refused",
    ),
)
async def create_dataset(
    request: Request, session: SessionDep, settings: SettingsDep, tenant: CurrentTenant
) -> DatasetPublic:
    """Register a built-in data set or upload an .npz (validated; pickled arrays are refused)."""
    if not is_multipart(request):
        body = await json_body(request, BuiltinDatasetCreate)
        dataset = queries.add_dataset(
            session,
            tenant_id=tenant.id,
            name=body.name or body.builtin,
            builtin=body.builtin,
            shapes=await run_in_threadpool(builtin_shapes, body.builtin),
        )
        session.commit()
        return to_public(dataset)
    async with upload_slot(request, settings, tenant.id):
        received = await receive_file(request, settings, suffix=".npz")
        shapes = await inspected("dataset", received.tmp_path, settings)
    try:
        path = store(received, settings.data_dir / "datasets", ".npz")
    except OSError as exc:
        discard(received.tmp_path)
        raise HTTPException(
            status.HTTP_500_INTERNAL_SERVER_ERROR, f"could not store the data: {exc}"
        ) from None
    dataset = queries.add_dataset(
        session,
        tenant_id=tenant.id,
        name=received.name,
        path=str(path),
        sha256=received.sha256,
        size_bytes=received.size_bytes,
        shapes=shapes,
    )
    session.commit()
    return to_public(dataset)


@router.get("", response_model=DatasetsPublic, responses=ERRORS)
def list_datasets(session: SessionDep, tenant: CurrentTenant) -> DatasetsPublic:
    """Your data sets."""
    rows = queries.list_datasets(session, tenant_id=tenant.id)
    return DatasetsPublic(data=[to_public(d) for d in rows], count=len(rows))


@router.get("/{dataset_id}", response_model=DatasetPublic, responses=ERRORS)
def get_dataset(dataset_id: int, session: SessionDep, tenant: CurrentTenant) -> DatasetPublic:
    """One data set with the shapes of its splits."""
    dataset = queries.get_dataset(session, tenant_id=tenant.id, dataset_id=dataset_id)
    if dataset is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"dataset {dataset_id} not found")
    return to_public(dataset)
