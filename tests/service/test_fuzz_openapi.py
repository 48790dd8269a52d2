"""Schema fuzzing of the OpenAPI spec with schemathesis: no request gets a 5xx.

Every operation of ``/openapi.json`` is called with generated valid and invalid path,
query, header and body values against a real server (uvicorn on 127.0.0.1) on a
fresh SQLite and a fresh PostgreSQL database. The database is seeded first (a data set,
a model, a finished job with candidates, an exported artifact, a device) and ids are
drawn mostly among small numbers, so generated requests reach existing objects as well
as missing ones. Jobs the fuzzer submits run a stand-in search (three candidates);
calibrations it starts stay queued (their measuring thread is not started), so the run
is bounded and loads no CPU beyond the requests.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from db.testing import BACKENDS, fresh_database
from engine.job import ExportContext, ExportResult, JobContext, Scores
from service import calibrations
from service.app import create_app
from service.settings import Settings
from tests.live import run_app

EXAMPLES = 40
CALL_TIMEOUT_S = 30


def quick_search(ctx: JobContext) -> None:
    """Three deterministic candidates through the real persistence, then done."""
    seen = {d.policy_hash for d in ctx.done}
    ctx.set_baseline(Scores(accuracy=0.99, latency_ms=10.0))
    for i in range(3):
        if ctx.should_stop():
            return
        if f"q{i}" not in seen:
            width = 1.0 - 0.2 * i
            scores = Scores(accuracy=0.5 + 0.49 * width, latency_ms=10.0 * width, size_bytes=int(1e6 * width))
            ctx.persist_candidate({"default": {"width": width}}, f"q{i}", scores, agent_state=b"{}")


def quick_export(ctx: ExportContext) -> ExportResult:
    ctx.out_path.write_bytes(b"onnx-bytes-of-" + json.dumps(ctx.policy, sort_keys=True).encode())
    return ExportResult(ctx.out_path, {"measured_latency_ms": 1.0, "dense_latency_ms": 2.0, "speedup": 2.0})


def _seed(url: str, key: str) -> None:
    """One of each object, so that small generated ids name existing rows."""
    with httpx.Client(base_url=f"{url}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        data = c.post("/datasets", json={"builtin": "digits"}).json()
        model = c.post("/models", json={"zoo": "lenet5", "dataset_id": data["id"]}).json()
        c.post("/devices", json={"name": "fuzz-remote", "kind": "remote", "runtime": "onnxruntime"})
        device = next(d for d in c.get("/devices").json()["data"] if d["name"] == "cpu-ort-1t")
        body = {"model_id": model["id"], "dataset_id": data["id"], "device_id": device["id"]}
        body["algorithm"] = "random"
        job = c.post("/jobs", json={**body, "budget": {"candidates": 3}}).json()
        deadline = time.monotonic() + 60
        while c.get(f"/jobs/{job['id']}").json()["status"] != "succeeded":
            assert time.monotonic() < deadline, "the seeded job did not finish"
            time.sleep(0.1)
        cand = c.get(f"/jobs/{job['id']}/candidates").json()["data"][0]
        art = c.post(f"/candidates/{cand['id']}/export", json={}).json()
        while c.get(f"/artifacts/{art['artifact_id']}").json()["status"] == "pending":
            assert time.monotonic() < deadline, "the seeded export did not finish"
            time.sleep(0.1)


@pytest.fixture(scope="module", params=BACKENDS)
def fuzz_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    patch = pytest.MonkeyPatch()
    patch.setattr(calibrations, "start_calibration_thread", lambda *args, **kwargs: None)
    try:
        with fresh_database(request.param, tmp) as db_url:
            cfg = Settings(data_dir=tmp / "data", database_url=db_url, lease_s=5.0, poll_s=0.1,
                           runner_slots=2, max_upload_bytes=2_000_000)  # fmt: skip
            app = create_app(cfg, search=quick_search, exporter=quick_export, announce=lambda _msg: None)
            with run_app(app) as url:
                key = cfg.local_key_path.read_text().strip()
                _seed(url, key)
                yield f"{url}|{key}"
    finally:
        patch.undo()


def _spec() -> dict[str, Any]:
    """The OpenAPI document, built without starting anything (create_app does no I/O)."""
    return create_app(Settings(data_dir=Path("/nonexistent")), announce=lambda _msg: None).openapi()


SCHEMA = schemathesis.openapi.from_dict(_spec())
OPERATIONS = {op.label: op for op in (r.ok() for r in SCHEMA.get_all_operations())}  # type: ignore[union-attr]
# Ids: mostly the few that exist, sometimes the edges of 32- and 64-bit columns, or anything.
_EDGES = [0, -1, 2**31 - 1, 2**31, -(2**31) - 1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64]
_ids = st.one_of(st.integers(1, 4), st.integers(1, 4), st.sampled_from(_EDGES), st.integers(-(2**70), 2**70))


def _cases(label: str) -> st.SearchStrategy[Any]:
    """Valid and invalid requests for one operation, with integer path ids steered to existing rows."""
    op = OPERATIONS[label]
    both = st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE))

    def steer(case: Any, ids: dict[str, int]) -> Any:
        params = case.path_parameters or {}
        for name, value in params.items():
            if name.endswith("_id") and isinstance(value, int) and not isinstance(value, bool):
                params[name] = ids[name]
        return case

    names = [p.name for p in op.path_parameters]
    return st.tuples(both, st.fixed_dictionaries({n: _ids for n in names})).map(lambda t: steer(*t))


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_no_generated_request_gets_a_server_error(label: str, fuzz_server: str) -> None:
    url, key = fuzz_server.split("|")

    @given(case=_cases(label))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def call(case: Any) -> None:
        headers = {**(case.headers or {}), "Authorization": f"Bearer {key}"}
        response = case.call(base_url=url, headers=headers, timeout=CALL_TIMEOUT_S)
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:800]}\n"
            f"{case.as_curl_command()}"
        )

    call()


CONTRACT = [  # the REST contract of DESIGN.md: every call must be documented, hence fuzzed
    "POST /v1/models", "POST /v1/datasets", "POST /v1/devices", "POST /v1/devices/{device_id}/calibrate",
    "GET /v1/devices/{device_id}/tasks", "POST /v1/devices/{device_id}/tasks/claim",
    "POST /v1/devices/{device_id}/measurements", "GET /v1/predictors",
    "POST /v1/jobs", "GET /v1/jobs/{job_id}", "POST /v1/jobs/{job_id}/cancel", "GET /v1/jobs/{job_id}/events",
    "GET /v1/jobs/{job_id}/candidates", "GET /v1/jobs/{job_id}/pareto",
    "POST /v1/candidates/{candidate_id}/export", "GET /v1/artifacts/{artifact_id}",
    "GET /v1/artifacts/{artifact_id}/download",
]  # fmt: skip


def test_the_fuzzed_spec_documents_every_call_of_the_contract() -> None:
    assert set(CONTRACT) <= set(OPERATIONS), set(CONTRACT) - set(OPERATIONS)
