"""The FastAPI application: ``create_app(settings)`` builds it; nothing happens at import.

Start-up (the lifespan) creates the data directory, applies Alembic migrations, adds
the built-in local devices, creates the local tenant on a first start (printing its
key) and, in the embedded default, starts the job runner inside the API process.
Every request passes :class:`~service.body_limit.BodyLimit` (bodies over
``max_json_body_bytes`` answer 413 unread) and every answer gets the headers of
:class:`~service.security_headers.SecurityHeaders`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel

import modeltailor
from db.engine import make_engine, make_session_factory
from db.migrate import upgrade
from engine.job import ExportContext, ExportResult
from engine.job import export_candidate as default_exporter
from service import queries
from service.auth import ensure_local_tenant
from service.body_limit import BodyLimit
from service.dashboard.routes import router as dashboard_router
from service.housekeeping import Housekeeper
from service.routers import artifacts, candidates, dashboard_api, datasets, devices, family, jobs, models
from service.runner import Runner, SearchFn
from service.security_headers import SecurityHeaders, docs_policy
from service.settings import Settings, Timeouts

log = logging.getLogger("modeltailor.service")
Exporter = Callable[[ExportContext], ExportResult]
#: The routes that take multipart uploads, under their own limit (``Settings.max_upload_bytes``).
UPLOAD_PATHS = ("/v1/models", "/v1/datasets")


def _loc(loc: Any) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """422 whose ``detail`` is one readable sentence; the raw list stays in ``errors``."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    text = "; ".join(f"{_loc(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors)
    safe = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")} for e in errors
    ]
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={"detail": f"invalid request: {text}", "errors": safe},
    )


def _service_models() -> dict[str, type[BaseModel]]:
    """The pydantic models defined in ``service.*``, by class name (their schema title)."""
    found: dict[str, type[BaseModel]] = {}
    stack: list[type[BaseModel]] = [BaseModel]
    while stack:
        for sub in stack.pop().__subclasses__():
            stack.append(sub)
            if sub.__module__.startswith("service."):
                found.setdefault(sub.__name__, sub)
    return found


def restore_example_nulls(spec: Any, models: dict[str, type[BaseModel]]) -> None:
    """Put back the ``null`` values FastAPI drops from schema examples (fastapi#5559).

    FastAPI serialises the whole document with ``exclude_none``, so ``{"error": None}`` in a
    model's examples would reach ``/docs`` without its required ``error`` key. Every schema
    titled like one of ``models`` that shows examples gets the model's own examples back.
    """
    if isinstance(spec, list):
        for item in spec:
            restore_example_nulls(item, models)
        return
    if not isinstance(spec, dict):
        return
    title = spec.get("title")
    model = models.get(title) if isinstance(title, str) else None
    if model is not None and "examples" in spec:
        own = model.model_json_schema().get("examples")
        if own:
            spec["examples"] = own
    for value in spec.values():
        restore_example_nulls(value, models)


def create_app(
    settings: Settings,
    *,
    timeouts: Timeouts | None = None,
    search: SearchFn | None = None,
    exporter: Exporter | None = None,
    announce: Callable[[str], None] = print,
) -> FastAPI:
    """Build the app for ``settings``.

    Args:
        settings: read once by the caller (``Settings()`` reads the environment).
        timeouts: the device-latency timeouts; default ``Timeouts()``, read from the
            environment here, at start (a bad value raises ``ValidationError`` naming it).
        search: job search entry point; default ``engine.job.run_job``.
        exporter: candidate export; default ``engine.job.export_candidate``.
        announce: where the first-start API key is printed.
    """

    timeouts = timeouts if timeouts is not None else Timeouts()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.ensure_dirs()
        upgrade(settings.db_url)
        # Requests queue for an HTTP thread, not for a database connection: a burst of
        # submissions that waited on the pool would fail after its 30 s timeout under load.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.http_threads
        engine = make_engine(settings.db_url, pool_size=settings.db_pool_size, max_overflow=0)
        factory = make_session_factory(engine)
        app.state.session_factory = factory
        with factory() as session:
            queries.ensure_builtin_devices(session)
        if settings.create_local_tenant:
            key = ensure_local_tenant(factory, settings)
            if key is not None:
                announce(f"Created tenant 'local'; its API key is saved in {settings.local_key_path}:\n{key}")
        housekeeper = Housekeeper(factory, settings.data_dir, interval_s=settings.poll_s)
        housekeeper.start()
        runner: Runner | None = None
        if settings.run_jobs:
            runner = Runner(factory, settings, timeouts=timeouts, search=search)
            runner.start(settings.runner_slots)
        app.state.runner = runner
        try:
            yield
        finally:
            if runner is not None:
                runner.stop()
            housekeeper.stop()
            engine.dispose()

    app = FastAPI(
        title="modeltailor",
        version=modeltailor.__version__,
        description=(
            "Search per-layer compression policies of a trained model for one edge device. "
            "Every `/v1` call needs `Authorization: Bearer <api key>`."
        ),
        lifespan=lifespan,
        docs_url=None,  # served below, under a policy that lets their CDN assets load
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.timeouts = timeouts
    app.state.exporter = exporter or default_exporter
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(BodyLimit, max_bytes=settings.max_json_body_bytes, upload_paths=UPLOAD_PATHS)
    app.add_middleware(SecurityHeaders)  # outermost: a 413 of BodyLimit gets the headers too

    v1 = APIRouter(prefix="/v1")
    for module in (models, datasets, devices, jobs, family, candidates, artifacts, dashboard_api):
        v1.include_router(module.router)
    v1.include_router(devices.predictors_router)
    v1.include_router(devices.calibrations_router)
    app.include_router(v1)
    app.include_router(dashboard_router)

    @app.get(
        "/healthz",
        tags=["meta"],
        responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
    )
    def healthz() -> dict[str, str]:
        """Liveness probe (no auth)."""
        return {"status": "ok"}

    def docs_page(page: HTMLResponse) -> HTMLResponse:
        page.headers["Content-Security-Policy"] = docs_policy(bytes(page.body))
        return page

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        """Swagger UI, its script and stylesheet from cdn.jsdelivr.net."""
        openapi_url = request.scope.get("root_path", "") + str(app.openapi_url)
        return docs_page(get_swagger_ui_html(openapi_url=openapi_url, title=f"{app.title} - Swagger UI"))

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        """ReDoc, its script from cdn.jsdelivr.net."""
        openapi_url = request.scope.get("root_path", "") + str(app.openapi_url)
        return docs_page(get_redoc_html(openapi_url=openapi_url, title=f"{app.title} - ReDoc"))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            restore_example_nulls(FastAPI.openapi(app), _service_models())
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory service.app:app_from_env``: settings from the environment."""
    return create_app(Settings(), timeouts=Timeouts())
