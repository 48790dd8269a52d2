"""``/v1/models``: upload a ``torch.export`` archive or request a zoo model."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, status

from db.models import Model
from service import queries
from service.deps import CurrentTenant, SessionDep, SettingsDep
from service.routers._body import is_multipart, json_body, upload_or_json
from service.schemas import Message, ModelPublic, ModelsPublic, ZooModelCreate
from service.uploads import discard, inspected, receive_file, store, upload_slot

router = APIRouter(prefix="/models", tags=["models"])
ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": Message},
    401: {"model": Message},
    404: {"model": Message},
    413: {"model": Message},
}
UPLOAD_ERRORS: dict[int | str, dict[str, object]] = {**ERRORS, 429: {"model": Message}}


def _zoo_names() -> tuple[str, ...]:
    from compression.zoo import ZOO

    return ZOO


def to_public(model: Model) -> ModelPublic:
    return ModelPublic.model_validate(model, from_attributes=True)


@router.post(
    "",
    response_model=ModelPublic,
    status_code=status.HTTP_201_CREATED,
    responses=UPLOAD_ERRORS,
    openapi_extra=upload_or_json(
        ZooModelCreate,
        "multipart `file` (.pt2 from torch.export.save) + `name`, or JSON for a zoo model",
        "a `torch.export` archive (.pt2, written by `torch.export.save`) of a model in eval mode",
    ),
)
async def create_model(
    request: Request, session: SessionDep, settings: SettingsDep, tenant: CurrentTenant
) -> ModelPublic:
    """Upload a model (.pt2, checked in a limited child process; see ``service.uploads``) or
    request a zoo model."""
    if not is_multipart(request):
        body = await json_body(request, ZooModelCreate)
        if body.zoo not in _zoo_names():
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST,
                f"unknown zoo model {body.zoo!r}; available: {list(_zoo_names())}",
            )
        if queries.get_dataset(session, tenant_id=tenant.id, dataset_id=body.dataset_id) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"dataset {body.dataset_id} not found")
        model = queries.add_model(
            session,
            tenant_id=tenant.id,
            name=body.name or body.zoo,
            source="zoo",
            status="pending",
            zoo=body.zoo,
            dataset_id=body.dataset_id,
        )
        session.commit()
        return to_public(model)
    async with upload_slot(request, settings, tenant.id):
        received = await receive_file(request, settings, suffix=".pt2")
        info = await inspected("model", received.tmp_path, settings)
    try:
        path = store(received, settings.data_dir / "models", ".pt2")
    except OSError as exc:
        discard(received.tmp_path)
        raise HTTPException(
            status.HTTP_500_INTERNAL_SERVER_ERROR, f"could not store the model: {exc}"
        ) from None
    model = queries.add_model(
        session,
        tenant_id=tenant.id,
        name=received.name,
        source="upload",
        status="ready",
        path=str(path),
        sha256=received.sha256,
        size_bytes=received.size_bytes,
        params=info["params"],
        macs=info["macs"],
        layers=info["layers"],
    )
    session.commit()
    return to_public(model)


@router.get("", response_model=ModelsPublic, responses=ERRORS)
def list_models(session: SessionDep, tenant: CurrentTenant) -> ModelsPublic:
    """Your models."""
    rows = queries.list_models(session, tenant_id=tenant.id)
    return ModelsPublic(data=[to_public(m) for m in rows], count=len(rows))


@router.get("/{model_id}", response_model=ModelPublic, responses=ERRORS)
def get_model(model_id: int, session: SessionDep, tenant: CurrentTenant) -> ModelPublic:
    """One model with its prunable layers."""
    model = queries.get_model(session, tenant_id=tenant.id, model_id=model_id)
    if model is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model {model_id} not found")
    return to_public(model)
