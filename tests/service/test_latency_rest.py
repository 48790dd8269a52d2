"""The latency REST surface without real measurements: task hand-out and results, blobs,
calibration handles and their conflicts, predictor answers, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from db.engine import make_engine, make_session_factory
from db.models import Calibration, Device, Measurement, utcnow
from modeltailor.client import Client, ConflictError, NotFoundError
from service import calibrations, device_tasks
from service.auth import create_tenant
from service.settings import Settings, Timeouts
from tests.service.conftest import LiveServer, fake_exporter, fake_search, serve


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _factory(live: LiveServer):  # type: ignore[no-untyped-def]
    return make_session_factory(make_engine(live.db_url))


def _queue_tasks(live: LiveServer, device_id: int, files: list[Path]) -> list[int]:
    factory = _factory(live)
    ids = []
    with factory() as session:
        device = session.get(Device, device_id)
        assert device is not None
        for f in files:
            m = device_tasks.add_task(
                session, data_dir=live.settings.data_dir, device=device, tenant_id=device.tenant_id,
                purpose="calibration", model=f, baseline=files[0], runs=7, warmup=1,
            )  # fmt: skip
            ids.append(m.id)
    return ids


@pytest.fixture
def onnx_files(tmp_path: Path) -> list[Path]:
    out = []
    for i in range(3):
        p = tmp_path / f"m{i}.onnx"
        p.write_bytes(b"not really onnx " + bytes([i]) * 10)
        out.append(p)
    return out


def test_agent_pulls_tasks_downloads_blobs_and_posts_results(
    live: LiveServer, onnx_files: list[Path]
) -> None:
    client = Client(live.url, live.key)
    board = client.create_device("board-1", threads=2)
    ids = _queue_tasks(live, board["id"], onnx_files)
    base = f"{live.url}/v1/devices/{board['id']}"
    with httpx.Client(headers=_h(live.key), timeout=30) as http:
        waiting = http.get(f"{base}/tasks", params={"limit": 10}).json()  # a read: claims nothing
        assert [t["id"] for t in waiting["tasks"]] == [f"m-{i}" for i in ids]
        first = http.post(f"{base}/tasks/claim").json()
        assert first["count"] == 1
        task = first["tasks"][0]
        assert task["id"] == f"m-{ids[0]}" and task["runs"] == 7 and task["warmup"] == 1
        assert {"model", "baseline", "reference"} <= set(task)
        blob = http.get(live.url + task["model"]["url"])  # relative to the server, same token
        assert blob.status_code == 200
        assert hashlib.sha256(blob.content).hexdigest() == task["model"]["sha256"]
        assert blob.content == onnx_files[0].read_bytes()
        rest = http.post(f"{base}/tasks/claim", params={"limit": 10}).json()
        assert [t["id"] for t in rest["tasks"]] == [f"m-{i}" for i in ids[1:]]
        assert http.post(f"{base}/tasks/claim").json()["count"] == 0  # all handed out
        assert http.get(f"{base}/tasks").json()["count"] == 0

        # A task whose agent went quiet (its lease lapsed) is handed out again.
        with _factory(live)() as session:
            task_row = session.get(Measurement, ids[0])
            assert task_row is not None and task_row.lease_expires_at is not None
            task_row.lease_expires_at = utcnow() - dt.timedelta(seconds=1)
            session.commit()
        again = http.post(f"{base}/tasks/claim", params={"limit": 1}).json()["tasks"]
        assert [t["id"] for t in again] == [f"m-{ids[0]}"]

        measurement = {
            "model_sha256": task["model"]["sha256"], "input_shape": [1, 3, 8, 8], "device": "board-1",
            "runtime": "onnxruntime", "runtime_version": "1.0", "threads": 2, "settings": {}, "runs": 7,
            "warmup": 1, "median_ms": 1.5, "mean_ms": 1.6, "min_ms": 1.4, "p10_ms": 1.45, "p90_ms": 1.7,
            "iqr_ms": 0.1, "reference_sha256": "r", "reference_median_ms": 3.0, "ratio_to_reference": 0.5,
            "attempts": 1, "noisy": False, "timestamp": "2025-01-01T00:00:00+00:00",
        }  # fmt: skip
        result = {"task_id": task["id"], "device": "board-1", "status": "ok", "measurement": measurement,
                  "baseline": measurement, "speedup": 1.0, "agent": {"onnxruntime": "1.0"}}  # fmt: skip
        posted = http.post(f"{base}/measurements", json=result)
        assert posted.status_code == 200, posted.text
        assert posted.json() == {
            "task_id": task["id"],
            "measurement_id": ids[0],
            "status": "done",
            "stored": True,
        }
        repeat = http.post(f"{base}/measurements", json=result).json()
        assert repeat["stored"] is False  # an agent re-sending after a network error is harmless

        failed = {"task_id": f"m-{ids[1]}", "device": "board-1", "status": "error", "error": "boom"}
        assert http.post(f"{base}/measurements", json=failed).json()["status"] == "failed"
        unknown = http.post(f"{base}/measurements", json={**failed, "task_id": "m-999999"})
        assert unknown.status_code == 404
        malformed = http.post(
            f"{base}/measurements", json={**result, "task_id": f"m-{ids[2]}", "measurement": None}
        )
        assert malformed.status_code == 422 and "needs a measurement" in malformed.json()["detail"]
        junk = {**result, "measurement": {**measurement, "median_ms": "fast"}}
        rejected = http.post(f"{base}/measurements", json=junk)
        assert rejected.status_code == 422 and "median_ms" in rejected.json()["detail"]
        assert http.get(f"{base}/blobs/{'0' * 64}").status_code == 404
        assert http.get(f"{base}/blobs/..%2F..%2Fmodeltailor.db").status_code == 404

    rows = {m["id"]: m for m in client.measurements(board["id"])}
    assert rows[ids[0]]["status"] == "done" and rows[ids[0]]["latency_ms"] == 1.5
    assert rows[ids[1]]["status"] == "failed" and rows[ids[1]]["error"] == "boom"


def test_other_tenants_cannot_reach_a_device_s_tasks(live: LiveServer, onnx_files: list[Path]) -> None:
    client = Client(live.url, live.key)
    board = client.create_device("board-2")
    _queue_tasks(live, board["id"], onnx_files[:1])
    with _factory(live)() as session:
        _tenant, other_key = create_tenant(session, name="other")
    base = f"{live.url}/v1/devices/{board['id']}"
    with httpx.Client(headers=_h(other_key), timeout=30) as http:
        assert http.get(f"{base}/tasks").status_code == 404
        assert http.post(f"{base}/tasks/claim").status_code == 404
        assert http.post(f"{base}/measurements", json={"task_id": "m-1", "device": "x", "status": "error",
                                                       "error": "x"}).status_code == 404  # fmt: skip
        assert http.get(f"{base}/predictor").status_code == 404
        assert http.post(f"{base}/calibrate", json={"samples": 8}).status_code == 404
    with httpx.Client(headers=_h(live.key), timeout=30) as http:
        assert http.get(f"{base}/tasks").json()["count"] == 1  # still there for its owner


@pytest.fixture
def impatient(db_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    """``live`` whose calibrations wait only 2 s for a device agent."""
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, lease_s=2.0, poll_s=0.1)
    timeouts = Timeouts(agent_wait_s=2.0)
    for url in serve(settings, timeouts=timeouts, search=fake_search, exporter=fake_exporter):
        key = settings.local_key_path.read_text().strip()
        yield LiveServer(url=url, key=key, settings=settings, db_url=db_url)


def test_calibration_handle_conflict_and_no_agent_failure(impatient: LiveServer, tiny_pt2: Path) -> None:
    live = impatient
    client = Client(live.url, live.key)
    board = client.create_device("board-3")
    assert client.predictor("board-3") is None
    model = client.upload_model(tiny_pt2, name="tiny")
    cal = client.calibrate("board-3", samples=6, model_id=model["id"])
    assert cal["status"] in ("queued", "running") and cal["params"]["plan"] == "focused"
    with pytest.raises(ConflictError, match="being calibrated already"):
        client.calibrate("board-3", samples=6)
    assert [c["id"] for c in client.calibrations("board-3")] == [cal["id"]]
    deadline = time.monotonic() + 240
    while (now := client.calibration(cal["id"]))["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, now
        time.sleep(0.3)
    assert now["status"] == "failed" and "no device agent" in now["error"], now
    assert f"--device {board['id']}" in now["error"]  # says how to start one
    tasks = client.measurements("board-3")
    assert tasks and all(t["purpose"] == "calibration" for t in tasks)
    with pytest.raises(NotFoundError):
        client.calibration(999_999)
    # The device is free again (and this one fails the same way: no agent).
    again = client.calibrate("board-3", samples=6, model_id=model["id"])
    assert again["id"] != cal["id"]
    while client.calibration(again["id"])["status"] in ("queued", "running"):
        assert time.monotonic() < deadline + 120
        time.sleep(0.3)


def test_an_abandoned_calibration_is_failed_and_frees_its_device(live: LiveServer) -> None:
    client = Client(live.url, live.key)
    board = client.create_device("board-4")
    factory = _factory(live)
    with factory() as session:
        device = session.get(Device, board["id"])
        assert device is not None
        cal = calibrations.create_calibration(
            session, device=device, tenant_id=device.tenant_id, params={"samples": 4}
        )
        assert cal is not None
        assert calibrations.create_calibration(session, device=device, tenant_id=None, params={}) is None
        assert calibrations.claim_calibration(
            session, calibration_id=cal.id, owner="dead-process", lease_s=0.1
        )
        cal_id = cal.id
    # Nobody renews its lease: the server's housekeeping ends it (a GET only reads).
    deadline = time.monotonic() + 30
    while (got := client.calibration(cal_id))["status"] == "running":
        assert time.monotonic() < deadline, got
        time.sleep(0.2)
    assert got["status"] == "failed" and "interrupted" in got["error"]
    with factory() as session:
        assert session.get(Calibration, cal_id).active_device_id is None  # type: ignore[union-attr]


def test_predictor_route_without_predictor(live: LiveServer) -> None:
    with httpx.Client(headers=_h(live.key), timeout=30) as http:
        answer = http.get(f"{live.url}/v1/devices/1/predictor")
        assert answer.status_code == 404 and "calibrate it" in answer.json()["detail"]
        assert http.get(f"{live.url}/v1/predictors", params={"device_id": 1}).json()["count"] == 0
        bad = http.post(f"{live.url}/v1/devices/1/calibrate", json={"samples": 2})
        assert bad.status_code == 422


def test_cli_device_commands(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    started: list[int] = []
    monkeypatch.setattr(
        calibrations, "start_calibration_thread", lambda _f, _d, cal_id, **_kw: started.append(cal_id)
    )
    from modeltailor.cli import app, service_cmds  # noqa: F401  (registers the commands)

    env = {"MODELTAILOR_URL": live.url, "MODELTAILOR_API_KEY": live.key, "COLUMNS": "200"}
    runner = CliRunner()
    created = runner.invoke(app, ["device", "create", "board-cli", "--threads", "4"], env=env)
    assert created.exit_code == 0, created.output
    device_id = int(created.output.strip().splitlines()[-1])
    assert f"--device {device_id}" in created.output  # how to start its agent
    listed = runner.invoke(app, ["device", "list"], env=env)
    assert listed.exit_code == 0 and "board-cli" in listed.output and "cpu-ort-1t" in listed.output
    none = runner.invoke(app, ["device", "predictor", "board-cli"], env=env)
    assert none.exit_code == 1 and "no predictor yet" in none.output
    missing = runner.invoke(app, ["device", "predictor", "no-such-board"], env=env)
    assert missing.exit_code == 1 and "not found" in missing.output
    queued = runner.invoke(app, ["device", "calibrate", "board-cli", "--no-wait", "--samples", "4"], env=env)
    assert queued.exit_code == 0 and f"calibration {started[0]} queued" in queued.output
    busy = runner.invoke(app, ["device", "calibrate", "board-cli", "--no-wait"], env=env)
    assert busy.exit_code == 1 and "being calibrated already" in busy.output
    shared = runner.invoke(app, ["device", "calibrate", "cpu-torch-1t", "--no-wait"], env=env)
    assert shared.exit_code == 1 and "admin key" in shared.output  # built-ins: the admin's only


def test_0002_upgrades_a_0001_database_in_place(db_url: str) -> None:
    from sqlalchemy import text

    from db.migrate import upgrade

    upgrade(db_url, "0001")
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO devices (name, kind, runtime, threads, settings, created_at) "
                    "VALUES ('old', 'remote', 'onnxruntime', 1, '{}', CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO measurements (device_id, status, purpose, spec, features, latency_stats, "
                    "created_at) VALUES ((SELECT id FROM devices WHERE name = 'old'), 'done', 'calibration', "
                    "'{}', '{}', '{}', CURRENT_TIMESTAMP)"
                )
            )
        upgrade(db_url)
        with engine.connect() as conn:
            row = conn.execute(text("SELECT status, attempts, calibration_id FROM measurements")).one()
            assert tuple(row) == ("done", 0, None)
            assert conn.execute(text("SELECT COUNT(*) FROM calibrations")).scalar() == 0
    finally:
        engine.dispose()
