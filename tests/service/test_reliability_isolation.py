"""Tenant isolation: every endpoint, called with another tenant's ids, answers 404.

Tenant A (the local tenant) creates one object of every kind on a server process on
127.0.0.1 (the stand-in search and export of ``test_reliability_concurrency.py``; SQLite
and PostgreSQL). Tenant B, created with ``modeltailor admin create-tenant``, then calls
every operation of the OpenAPI document that takes an id, with A's ids, and every
call that names ids in its body or query. The operation list comes from the spec, so a
new endpoint is covered as soon as it exists (the test fails until it knows which id to
put in it). 404, never 403: B learns nothing about which ids exist.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from db.testing import BACKENDS, fresh_database
from tests.live import ServerProcess, modeltailor_cmd, server_process, service_env

STUB = Path(__file__).with_name("test_reliability_concurrency.py")
# A body each POST needs to get past validation, so that only ownership can refuse it.
BODIES: dict[str, Any] = {
    "/v1/devices/{device_id}/calibrate": {"samples": 4, "runs": 5},
    "/v1/devices/{device_id}/measurements": {"task_id": "m-1", "device": "x", "status": "error"},
    "/v1/candidates/{candidate_id}/export": {},
    "/v1/jobs/{job_id}/family-export": {},
}


def _stub_serve(port: int) -> list[str]:
    return [sys.executable, str(STUB), "serve", str(port)]


def _client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=f"{url}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _until(what: str, done: Any, srv: ServerProcess, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{srv.log_tail()}"
        time.sleep(0.1)


def _tenant_a_objects(srv: ServerProcess) -> dict[str, Any]:
    """One object of every kind owned by the local tenant; their ids by path parameter name."""
    with _client(srv.url, srv.key) as a:
        data = a.post("/datasets", json={"builtin": "digits"}).json()
        model = a.post("/models", json={"zoo": "lenet5", "dataset_id": data["id"]}).json()
        remote = {"name": "a-remote", "kind": "remote", "runtime": "onnxruntime"}
        device = a.post("/devices", json=remote).json()
        builtin = next(d for d in a.get("/devices").json()["data"] if d["name"] == "cpu-ort-1t")
        body = {"model_id": model["id"], "dataset_id": data["id"], "device_id": builtin["id"]}
        job = a.post("/jobs", json={**body, "algorithm": "random", "budget": {"candidates": 3}}).json()
        _until("A's job", lambda: a.get(f"/jobs/{job['id']}").json()["status"] == "succeeded", srv)
        candidate = a.get(f"/jobs/{job['id']}/candidates").json()["data"][0]
        artifact = a.post(f"/candidates/{candidate['id']}/export", json={}).json()
        art_url = f"/artifacts/{artifact['artifact_id']}"
        _until("A's export", lambda: a.get(art_url).json()["status"] == "ready", srv)
        calibrate = BODIES["/v1/devices/{device_id}/calibrate"]
        calibration = a.post(f"/devices/{device['id']}/calibrate", json=calibrate)
        assert calibration.status_code == 202, calibration.text
        for path in (f"/models/{model['id']}", f"/jobs/{job['id']}/pareto", f"/devices/{device['id']}"):
            assert a.get(path).status_code == 200, path  # A itself sees them
    return {
        "model_id": model["id"],
        "dataset_id": data["id"],
        "device_id": device["id"],
        "builtin_device_id": builtin["id"],
        "job_id": job["id"],
        "candidate_id": candidate["id"],
        "artifact_id": artifact["artifact_id"],
        "calibration_id": calibration.json()["id"],
        "sha256": "0" * 64,
    }


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_another_tenant_gets_404_from_every_endpoint_for_every_id(backend: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with (
        fresh_database(backend, tmp_path) as db_url,
        server_process(data_dir, db_url, log_path=tmp_path / "a.log", command=_stub_serve, poll_s=0.1) as srv,
    ):
        ids = _tenant_a_objects(srv)
        made = subprocess.run(
            modeltailor_cmd("admin", "create-tenant", "tenant-b"),
            env=service_env(data_dir, db_url), capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        b_key = made.stdout.strip().splitlines()[-1]
        with _client(srv.url, b_key) as b:
            spec = httpx.get(f"{srv.url}/openapi.json", timeout=30).json()
            tried: set[str] = set()
            for path, operations in spec["paths"].items():
                names = re.findall(r"{(\w+)}", path)
                if not path.startswith("/v1/") or not names:
                    continue
                unknown = [n for n in names if n not in ids]
                assert not unknown, f"{path}: the test does not know which of A's ids to use for {unknown}"
                url = path.removeprefix("/v1").format(**ids)
                for method in operations:
                    body = BODIES.get(path) if method == "post" else None
                    r = b.request(method.upper(), url, json=body)
                    assert r.status_code == 404, (method, url, r.status_code, r.text)
                    assert "not found" in r.json()["detail"] or "not a task" in r.json()["detail"], r.text
                    tried.add(f"{method.upper()} {path}")

            # Ids in the query or the body.
            own_data = b.post("/datasets", json={"builtin": "digits"}).json()
            own_model = b.post("/models", json={"zoo": "lenet5", "dataset_id": own_data["id"]}).json()
            builtin = ids["builtin_device_id"]
            job = {"model_id": own_model["id"], "dataset_id": own_data["id"], "device_id": builtin,
                   "algorithm": "random", "budget": {"candidates": 1}}  # fmt: skip
            assert b.post("/jobs", json=job).status_code == 201  # B's own ids work
            for field in ("model_id", "dataset_id", "device_id"):
                r = b.post("/jobs", json={**job, field: ids[field]})
                assert r.status_code == 404, (field, r.text)
            r = b.post("/models", json={"zoo": "lenet5", "dataset_id": ids["dataset_id"]})
            assert r.status_code == 404, r.text
            r = b.post(f"/devices/{builtin}/calibrate", json={"samples": 4, "model_id": ids["model_id"]})
            assert r.status_code == 404, r.text
            assert b.get("/predictors", params={"device_id": ids["device_id"]}).status_code == 404

            # Lists show B nothing of A's; shared built-in devices stay visible.
            assert b.get("/jobs").json()["count"] == 1 and b.get("/models").json()["count"] == 1
            assert b.get("/datasets").json()["count"] == 1
            assert ids["device_id"] not in {d["id"] for d in b.get("/devices").json()["data"]}
            assert b.get(f"/devices/{builtin}").status_code == 200
            assert ids["calibration_id"] not in {
                c["id"] for c in b.get(f"/devices/{builtin}/calibrations").json()["data"]
            }
    with_ids = [(p, ops) for p, ops in spec["paths"].items() if "{" in p and p.startswith("/v1/")]
    every = {f"{m.upper()} {p}" for p, ops in with_ids for m in ops}
    assert tried == every and len(tried) >= 20
