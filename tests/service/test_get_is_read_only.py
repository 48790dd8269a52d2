"""No GET handler writes: every GET route of the OpenAPI document, called with valid ids on a
populated server, executes no INSERT, UPDATE or DELETE.

Writes are seen by a ``before_cursor_execute`` listener on the app's own engine, on SQLite and
PostgreSQL. Background threads of the server (the runner, the housekeeping loop) write too,
so each statement is attributed to the request it ran for through a context variable that a
middleware sets: FastAPI runs handlers and their dependencies in worker threads with the
request's context copied, while threads started at start-up have none.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from db.models import Calibration, Device, Job, Measurement, Predictor, utcnow
from service.app import create_app
from service.device_tasks import add_task
from service.predictor_versions import store_key
from service.settings import Settings
from tests.live import run_app
from tests.service.conftest import LiveServer, fake_exporter, fake_search

WRITE = re.compile(r"^\s*(INSERT|UPDATE|DELETE)\b", re.IGNORECASE)
_REQUEST: contextvars.ContextVar[str | None] = contextvars.ContextVar("request", default=None)


class _Label:
    """Pure ASGI middleware: the request's "METHOD path" in :data:`_REQUEST` while it runs."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = _REQUEST.set(f"{scope['method']} {scope['path']}")
        try:
            await self.app(scope, receive, send)
        finally:
            _REQUEST.reset(token)


@pytest.fixture
def watched(db_url: str, tmp_path: Path) -> Iterator[tuple[LiveServer, list[tuple[str, str]], Any]]:
    """A live server whose writes are recorded as (request, statement); and the app."""
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, lease_s=2.0, poll_s=0.1)
    app = create_app(settings, announce=lambda _msg: None, search=fake_search, exporter=fake_exporter)
    app.add_middleware(_Label)
    writes: list[tuple[str, str]] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        label = _REQUEST.get()
        if label is not None and WRITE.match(statement):
            writes.append((label, statement.split("\n")[0][:200]))

    with run_app(app) as url:
        engine = app.state.session_factory.kw["bind"]
        event.listen(engine, "before_cursor_execute", record)
        key = settings.local_key_path.read_text().strip()
        try:
            yield LiveServer(url=url, key=key, settings=settings, db_url=db_url), writes, app
        finally:
            event.remove(engine, "before_cursor_execute", record)


def _populate(live: LiveServer, app: Any) -> dict[str, Any]:
    """A finished job with candidates and an exported artifact; a device of the tenant with a
    calibration, a predictor and a waiting device-agent task. The ids of each."""
    c = httpx.Client(base_url=f"{live.url}/v1", headers={"Authorization": f"Bearer {live.key}"}, timeout=30)
    data = c.post("/datasets", json={"builtin": "digits"}).json()
    model = c.post("/models", json={"zoo": "resnet20", "dataset_id": data["id"]}).json()
    builtin = next(d for d in c.get("/devices").json()["data"] if d["name"] == "cpu-ort-1t")
    body = {
        "model_id": model["id"],
        "dataset_id": data["id"],
        "device_id": builtin["id"],
        "algorithm": "random",
    }
    job = c.post("/jobs", json={**body, "budget": {"candidates": 4}}).json()
    deadline = time.monotonic() + 60
    while c.get(f"/jobs/{job['id']}").json()["status"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    candidate = c.get(f"/jobs/{job['id']}/pareto").json()["data"][0]
    artifact = c.post(f"/candidates/{candidate['id']}/export", json={}).json()["artifact_id"]
    while c.get(f"/artifacts/{artifact}").json()["status"] == "pending":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    board = c.post("/devices", json={"name": "board", "kind": "remote"}).json()
    factory = app.state.session_factory
    onnx = live.settings.data_dir / "m.onnx"
    onnx.write_bytes(b"not really onnx")
    with factory() as session:
        device = session.get(Device, board["id"])
        assert device is not None
        cal = Calibration(
            device_id=device.id, tenant_id=device.tenant_id, status="succeeded", params={"samples": 4},
            progress={"done": 4, "total": 4}, predictor_version=1, finished_at=utcnow(),
        )  # fmt: skip
        session.add(cal)
        session.add(Predictor(device_id=device.id, version=1, kind="macs", metrics={"within_10pct": 80.0}))
        session.add(
            Measurement(
                device_id=device.id, tenant_id=device.tenant_id, status="done", purpose="calibration",
                latency_ms=1.0, measured_at=utcnow(),
            )
        )  # fmt: skip
        session.commit()
        task = add_task(
            session, data_dir=live.settings.data_dir, device=device, tenant_id=device.tenant_id,
            purpose="calibration", model=onnx,
        )  # fmt: skip
        blob = task.spec["model_sha256"]
        cal_id = cal.id
    return {
        "job_id": job["id"],
        "jobs": str(job["id"]),  # GET /v1/compare?jobs=
        "candidate_id": candidate["id"],
        "artifact_id": artifact,
        "device_id": board["id"],
        "calibration_id": cal_id,
        "model_id": model["id"],
        "dataset_id": data["id"],
        "sha256": blob,
        "name": "app.js",
    }


def _tempt(live: LiveServer, app: Any, ids: dict[str, Any]) -> None:
    """State a read used to "fix" by writing: an unmirrored predictor version on disk, stale
    front flags, and a running calibration whose lease lapsed (the housekeeping loop may get
    to some of them first; the GETs must not write either way)."""
    with app.state.session_factory() as session:
        job = session.get(Job, ids["job_id"])
        assert job is not None
        job.front_candidates = None
        board = session.get(Device, ids["device_id"])
        assert board is not None
        folder = live.settings.data_dir / "devices" / store_key(board) / "predictors" / "v0001"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text('{"version": 1, "default": "macs", "predictors": {}}')
        other = Device(tenant_id=board.tenant_id, name="board-2", kind="remote", runtime="onnxruntime")
        session.add(other)
        session.flush()
        lapsed = utcnow() - dt.timedelta(seconds=5)
        session.add(
            Calibration(
                device_id=other.id, tenant_id=board.tenant_id, active_device_id=other.id, status="running",
                owner="dead", heartbeat_at=lapsed, lease_expires_at=lapsed, params={"samples": 4},
            )
        )  # fmt: skip
        session.commit()


def _get_routes(app: Any) -> list[tuple[str, dict[str, Any]]]:
    spec = app.openapi()
    return [(path, ops["get"]) for path, ops in spec["paths"].items() if "get" in ops]


def test_no_get_route_writes(watched: tuple[LiveServer, list[tuple[str, str]], Any]) -> None:
    live, writes, app = watched
    ids = _populate(live, app)
    routes = _get_routes(app)
    assert len(routes) >= 15, [p for p, _ in routes]
    _tempt(live, app, ids)
    writes.clear()
    called: list[str] = []
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {live.key}"}, timeout=30) as http:
        for path, op in routes:
            url = re.sub(r"\{(\w+)\}", lambda m: str(ids[m.group(1)]), path)
            query = {
                p["name"]: ids[p["name"]]
                for p in op.get("parameters", [])
                if p.get("in") == "query" and (p.get("required") or p["name"] in ids)
            }
            if path.endswith("/events"):  # a stream: its first bytes are enough
                with http.stream("GET", url, params=query, timeout=10) as response:
                    assert response.status_code == 200, path
                    next(response.iter_bytes(), None)
            else:
                response = http.get(url, params=query)
                assert response.status_code == 200, f"{path}: {response.status_code} {response.text[:300]}"
            called.append(path)
            if path.endswith("/predictor"):  # and a named version
                assert http.get(url, params={"version": 1}).status_code == 200
    time.sleep(0.3)  # a write of a handler's thread that outlived its answer would land by now
    gets = [(label, sql) for label, sql in writes if label.startswith("GET ")]
    assert not gets, "GET requests that wrote:\n" + "\n".join(f"{label}: {sql}" for label, sql in gets)
    assert {
        "/v1/devices/{device_id}/predictor",
        "/v1/jobs/{job_id}/pareto",
        "/v1/calibrations/{calibration_id}",
    } <= set(called)


def test_the_recorder_sees_writes(watched: tuple[LiveServer, list[tuple[str, str]], Any]) -> None:
    """Guards the test itself: a POST's writes are recorded under its label."""
    live, writes, _app = watched
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {live.key}"}, timeout=30) as http:
        assert http.post("/v1/devices", json={"name": "seen"}).status_code == 201
    assert any(label == "POST /v1/devices" and sql.upper().startswith("INSERT") for label, sql in writes)
