"""The REST API against a real server and database: auth, uploads, jobs, isolation, events."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from conftest import LiveServer

from db.engine import make_engine, make_session_factory
from service.auth import create_tenant


def api(live: LiveServer, key: str | None = None) -> httpx.Client:
    return httpx.Client(
        base_url=f"{live.url}/v1", headers={"Authorization": f"Bearer {key or live.key}"}, timeout=30
    )


def npz_bytes(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def good_npz() -> bytes:
    rng = np.random.default_rng(0)
    return npz_bytes(
        x_train=rng.random((20, 1, 8, 8), dtype=np.float32),
        y_train=rng.integers(0, 10, 20),
        x_val=rng.random((10, 1, 8, 8), dtype=np.float32),
        y_val=rng.integers(0, 10, 10),
    )


def wait_status(c: httpx.Client, job_id: int, want: set[str], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = c.get(f"/jobs/{job_id}").json()
        if job["status"] in want:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {want}: {job}")


def setup_inputs(c: httpx.Client) -> tuple[int, int, int]:
    data = c.post("/datasets", json={"builtin": "digits"}).json()
    model = c.post("/models", json={"zoo": "resnet20", "dataset_id": data["id"]}).json()
    device = next(d for d in c.get("/devices").json()["data"] if d["name"] == "cpu-ort-1t")
    return model["id"], data["id"], device["id"]


def test_every_call_needs_a_valid_key(live: LiveServer) -> None:
    plain = httpx.Client(base_url=f"{live.url}/v1", timeout=30)
    for method, path in [("GET", "/devices"), ("POST", "/jobs"), ("GET", "/jobs/1"), ("GET", "/artifacts/1")]:
        r = plain.request(method, path)
        assert r.status_code == 401, path
        assert "Authorization: Bearer" in r.json()["detail"]
    r = plain.get("/devices", headers={"Authorization": "Bearer mt_wrong"})
    assert r.status_code == 401 and r.json()["detail"] == "invalid or revoked API key"
    assert Path(live.settings.local_key_path).stat().st_mode & 0o777 == 0o600
    assert api(live).get("/devices").status_code == 200


def test_devices_builtin_create_get_conflict(live: LiveServer) -> None:
    c = api(live)
    names = {d["name"] for d in c.get("/devices").json()["data"]}
    assert {"cpu-ort-1t", "cpu-ort-2t", "cpu-torch-1t"} <= names
    r = c.post("/devices", json={"name": "rpi4", "runtime": "onnxruntime", "threads": 4})
    assert r.status_code == 201, r.text
    dev = r.json()
    assert (dev["threads"], dev["shared"]) == (4, False)
    assert c.get(f"/devices/{dev['id']}").json()["name"] == "rpi4"
    assert c.post("/devices", json={"name": "rpi4"}).status_code == 409
    assert c.post("/devices", json={"name": "cpu-ort-1t"}).status_code == 409
    bad = c.post("/devices", json={"name": "x", "threads": 0, "runtime": "tvm"})
    assert bad.status_code == 422 and "threads" in bad.json()["detail"] and "runtime" in bad.json()["detail"]


def test_dataset_uploads_are_validated_and_bad_ones_leave_nothing(live: LiveServer) -> None:
    c = api(live)
    ok = c.post("/datasets", files={"file": ("d.npz", good_npz())}, data={"name": "mine"})
    assert ok.status_code == 201, ok.text
    assert ok.json()["shapes"]["x_train"] == [20, 1, 8, 8] and ok.json()["name"] == "mine"
    stored = sorted((live.settings.data_dir / "datasets").iterdir())
    before = [p.read_bytes() for p in stored]
    hostile = npz_bytes(
        x_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1), x_val=np.zeros(1), y_val=np.zeros(1)
    )
    cases = {
        "garbage": b"not a zip at all",
        "missing keys": npz_bytes(x_train=np.zeros((2, 1, 8, 8))),
        "pickled object array": hostile,
    }
    for what, payload in cases.items():
        r = c.post("/datasets", files={"file": ("bad.npz", payload)})
        assert r.status_code == 400, (what, r.text)
        assert r.json()["detail"], what
    too_big = c.post("/datasets", files={"file": ("big.npz", b"0" * 3_000_000)})
    assert too_big.status_code == 413 and "limit" in too_big.json()["detail"]
    assert c.post("/datasets", json={"builtin": "imagenet"}).status_code == 422
    assert c.post("/datasets", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    assert sorted((live.settings.data_dir / "datasets").iterdir()) == stored
    assert [p.read_bytes() for p in stored] == before
    assert list((live.settings.data_dir / "tmp").iterdir()) == []
    assert c.get("/datasets").json()["count"] == 1


def test_model_upload_loads_with_torch_export(live: LiveServer, tiny_pt2: Path) -> None:
    c = api(live)
    r = c.post("/models", files={"file": ("tiny.pt2", tiny_pt2.read_bytes())}, data={"name": "tiny"})
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["params"] == 4 * 9 + 4 + 4 + 4 + 256 * 10 + 10
    assert [layer["name"] for layer in model["layers"]] and model["macs"] > 0
    assert c.get(f"/models/{model['id']}").json()["sha256"] == model["sha256"]
    truncated = tiny_pt2.read_bytes()[:500]
    for payload in (b"garbage", truncated, npz_bytes(a=np.zeros(3))):
        bad = c.post("/models", files={"file": ("x.pt2", payload)})
        assert bad.status_code == 400, bad.text
        assert "torch.export" in bad.json()["detail"] or "archive" in bad.json()["detail"]
    assert c.post("/models", json={"zoo": "nope", "dataset_id": 1}).status_code in (400, 404)
    assert c.get("/models").json()["count"] == 1
    assert c.get("/devices").status_code == 200  # still serving


def test_job_spec_validation_names_the_field(live: LiveServer) -> None:
    c = api(live)
    model_id, data_id, device_id = setup_inputs(c)
    base = {"model_id": model_id, "dataset_id": data_id, "device_id": device_id, "algorithm": "random"}
    bad = {
        "algorithm": {**base, "algorithm": "magic"},
        "space.schemes": {**base, "space": {"schemes": ["weird"]}},
        "budget": {**base, "budget": {"candidates": None, "seconds": None}},
        "objectives": {**base, "objectives": [{"metric": "accuracy", "direction": "min"}]},
        "constraints": {**base, "constraints": {"latency_ms": {}}},
        "extra": {**base, "colour": "blue"},
    }
    for field, body in bad.items():
        r = c.post("/jobs", json=body)
        assert r.status_code == 422, (field, r.text)
        assert r.json()["detail"].startswith("invalid request:"), r.text
    assert c.post("/jobs", json={**base, "model_id": 999}).status_code == 404
    assert c.get("/jobs").json()["count"] == 0


def test_job_runs_to_budget_with_unique_candidates_front_and_events(live: LiveServer) -> None:
    c = api(live)
    model_id, data_id, device_id = setup_inputs(c)
    spec = {
        "model_id": model_id,
        "dataset_id": data_id,
        "device_id": device_id,
        "algorithm": "random",
        "budget": {"candidates": 12},
        "constraints": {"latency_ms": {"max": 9.0}},
    }
    r = c.post("/jobs", json=spec)
    assert r.status_code == 201 and r.json()["status"] == "queued"
    job = wait_status(c, r.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job
    assert job["progress"]["done"] == 12 and job["best"]
    cands = c.get(f"/jobs/{job['id']}/candidates").json()
    assert cands["count"] == 12
    assert len({x["policy_hash"] for x in cands["data"]}) == 12
    assert [x["index"] for x in cands["data"]] == list(range(12))
    front = c.get(f"/jobs/{job['id']}/pareto").json()["data"]
    feasible = [x for x in cands["data"] if x["latency_ms"] <= 9.0]
    assert all(x["feasible"] == (x["latency_ms"] <= 9.0) for x in cands["data"])
    for p in front:  # nothing feasible dominates a front point
        assert not any(
            q["accuracy"] >= p["accuracy"]
            and q["latency_ms"] <= p["latency_ms"]
            and q["id"] != p["id"]
            and (q["accuracy"], q["latency_ms"]) != (p["accuracy"], p["latency_ms"])
            for q in feasible
        )
    with c.stream("GET", f"/jobs/{job['id']}/events") as stream:
        text = "".join(stream.iter_text())
    assert "event: progress" in text and "event: end" in text and '"status": "succeeded"' in text


def test_cancel_stops_a_running_job_within_seconds_and_keeps_candidates(live: LiveServer) -> None:
    c = api(live)
    model_id, data_id, device_id = setup_inputs(c)
    body = {"model_id": model_id, "dataset_id": data_id, "device_id": device_id, "algorithm": "random"}
    slow = c.post("/jobs", json={**body, "seed": 200, "budget": {"candidates": 5_000}}).json()
    wait_status(c, slow["id"], {"running"})
    time.sleep(0.5)
    t0 = time.monotonic()
    assert c.post(f"/jobs/{slow['id']}/cancel").status_code == 200
    job = wait_status(c, slow["id"], {"cancelled", "succeeded", "failed"}, timeout=10)
    assert job["status"] == "cancelled" and time.monotonic() - t0 < 5
    assert c.get(f"/jobs/{slow['id']}/candidates").json()["count"] >= 1
    queued = c.post("/jobs", json={**body, "budget": {"candidates": 1}, "seed": 0}).json()
    assert c.post(f"/jobs/{queued['id']}/cancel").json()["status"] in ("cancelled", "running", "succeeded")


def test_export_produces_a_downloadable_artifact(live: LiveServer) -> None:
    c = api(live)
    model_id, data_id, device_id = setup_inputs(c)
    body = {"model_id": model_id, "dataset_id": data_id, "device_id": device_id, "algorithm": "random"}
    job = c.post("/jobs", json={**body, "budget": {"candidates": 3}}).json()
    wait_status(c, job["id"], {"succeeded"})
    cand = c.get(f"/jobs/{job['id']}/pareto").json()["data"][0]
    acc = c.post(f"/candidates/{cand['id']}/export", json={"format": "onnx", "int8": False})
    assert acc.status_code == 202, acc.text
    art_id = acc.json()["artifact_id"]
    deadline = time.monotonic() + 20
    while (art := c.get(f"/artifacts/{art_id}").json())[
        "status"
    ] == "pending" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert art["status"] == "ready" and art["speedup"] == 2.0 and len(art["sha256"]) == 64
    assert c.get(f"/artifacts/{art_id}/download").content.startswith(b"onnx-bytes-of-")
    assert c.post(f"/candidates/{cand['id']}/export", json={"format": "tflite"}).status_code == 422


def test_another_tenant_gets_404_for_every_id(live: LiveServer, tiny_pt2: Path) -> None:
    c = api(live)
    model_id, data_id, device_id = setup_inputs(c)
    own_dev = c.post("/devices", json={"name": "mine"}).json()["id"]
    body = {"model_id": model_id, "dataset_id": data_id, "device_id": device_id, "algorithm": "random"}
    job_id = c.post("/jobs", json={**body, "budget": {"candidates": 2}}).json()["id"]
    wait_status(c, job_id, {"succeeded"})
    cand_id = c.get(f"/jobs/{job_id}/candidates").json()["data"][0]["id"]
    art_id = c.post(f"/candidates/{cand_id}/export", json={}).json()["artifact_id"]
    engine = make_engine(live.db_url)
    with make_session_factory(engine)() as s:
        _, other_key = create_tenant(s, name="other")
    engine.dispose()
    o = api(live, other_key)
    for path in [
        f"/models/{model_id}",
        f"/datasets/{data_id}",
        f"/devices/{own_dev}",
        f"/jobs/{job_id}",
        f"/jobs/{job_id}/candidates",
        f"/jobs/{job_id}/pareto",
        f"/jobs/{job_id}/events",
        f"/candidates/{cand_id}",
        f"/artifacts/{art_id}",
        f"/artifacts/{art_id}/download",
        f"/predictors?device_id={own_dev}",
    ]:
        r = o.get(path)
        assert r.status_code == 404, (path, r.status_code)
    assert o.post(f"/jobs/{job_id}/cancel").status_code == 404
    assert o.post(f"/candidates/{cand_id}/export", json={}).status_code == 404
    assert o.post("/jobs", json={**body, "device_id": device_id}).status_code == 404
    assert o.post("/models", json={"zoo": "resnet20", "dataset_id": data_id}).status_code == 404
    assert o.get("/jobs").json()["count"] == 0 and o.get("/models").json()["count"] == 0
    assert o.get(f"/devices/{device_id}").status_code == 200  # built-ins are shared
