"""Predictor-backed latency in real jobs, on a real server with real onnxruntime timings.

* A job on a device with no predictor calibrates one first (its progress says so), stores
  the dense baseline before its first candidate, scores every candidate with that predictor
  version, and re-measures top front points on the device; a second job reuses the predictor.
* A remote device is calibrated by a device agent process pulling tasks over REST, and a job
  on it gets its top-k re-measured by the same agent.

The model is a tiny uploaded conv net on the bundled digits data (8x8), so nothing trains and
a sample takes well under a second to export and time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from db.engine import make_engine, make_session_factory
from modeltailor.client import Client, Job
from service.auth import create_tenant
from tests.service.conftest import LiveServer

REPO = Path(__file__).resolve().parents[2]
SPACE = {"schemes": ["unstructured", "nm"], "bits": [None, 8], "width": True, "depth": False}


def _watch(job: Job, timeout: float = 600) -> tuple[dict[str, Any], list[str], list[dict[str, Any]]]:
    """Poll a job to its end: (final info, its phases in order, baselines seen while candidates existed).

    Phases come from the job's stored event log (replayed over SSE from the start), not from
    polling, which can miss a short phase.
    """
    with_candidates: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        info = job.status()
        if info["progress"].get("done"):
            with_candidates.append(dict(info["baseline"]))
        if info["status"] in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, f"job still {info['status']} ({info['progress'].get('phase')})"
        time.sleep(0.2)
    phases: list[str] = []
    for kind, data in job.events():
        phase = data.get("phase") if kind in ("phase", "progress") and isinstance(data, dict) else None
        if phase is not None and (not phases or phases[-1] != phase):
            phases.append(str(phase))
    return info, phases, with_candidates


def test_job_calibrates_the_device_first_then_uses_its_predictor(
    real_live: LiveServer, tiny_pt2: Path
) -> None:
    client = Client(real_live.url, real_live.key)
    data = client.builtin_dataset("digits")
    model = client.upload_model(tiny_pt2, name="tiny")
    assert client.predictor("cpu-ort-1t") is None
    job = client.submit_job(
        model["id"], data["id"], "cpu-ort-1t", algorithm="random", space=SPACE,
        budget={"candidates": 6}, seed=1, calibration_samples=12, remeasure_top_k=2,
        active_measurement={"share": 0},  # measuring during the search: test_active_measurement.py
    )  # fmt: skip
    info, phases, baselines = _watch(job)
    assert info["status"] == "succeeded", info.get("error")
    calibrating = [p for p in phases if p.startswith("calibrating ")]
    assert calibrating and calibrating[-1] == "calibrating 12/12", phases
    assert phases.index(calibrating[-1]) < phases.index("searching")

    pred = client.predictor("cpu-ort-1t")
    assert pred is not None and pred["version"] == 1
    assert pred["scope"] == "tenant"  # a shared device: the job calibrated for its own tenant
    metrics = pred["metrics"]
    assert 0 <= metrics["within_10pct"] <= 100 and metrics["records"] >= 12 and metrics["architectures"] >= 2
    assert set(metrics["detail"]["predictors"]) >= {"kernel_gbdt", "macs"}
    assert [p["version"] for p in client.predictors("cpu-ort-1t")] == [1]

    # The dense baseline (accuracy, predicted and measured latency) was there before any candidate.
    base = info["baseline"]
    assert baselines and all(b == base for b in baselines)
    assert base["predictor_version"] == 1 and base["latency_ms"] > 0 and base["measured_latency_ms"] > 0
    assert 0 <= base["accuracy"] <= 1

    cands = job.candidates()
    assert len(cands) == 6
    assert all(c["predictor_version"] == 1 and c["latency_ms"] > 0 for c in cands)
    measured = [c for c in cands if c["measured_latency_ms"] is not None]
    front_ids = {c.id for c in job.pareto()}
    assert 1 <= len(measured) <= 2 and {c.id for c in measured} <= front_ids
    for c in measured:
        assert c["measured_latency_ms"] > 0

    rows = client.measurements("cpu-ort-1t")
    purposes = {r["purpose"] for r in rows}
    assert {"calibration", "dense", "candidate"} <= purposes
    assert all(r["status"] == "done" and r["latency_ms"] > 0 for r in rows)
    cals = client.calibrations("cpu-ort-1t")
    assert [c["status"] for c in cals] == ["succeeded"] and cals[0]["job_id"] == job.id
    assert cals[0]["predictor_version"] == 1

    # A second job on the same device reuses the predictor: no calibration.
    second = client.submit_job(
        model["id"], data["id"], "cpu-ort-1t", algorithm="random", space=SPACE,
        budget={"candidates": 3}, seed=2, remeasure_top_k=0, active_measurement={"share": 0},
    )  # fmt: skip
    info2, phases2, _ = _watch(second)
    assert info2["status"] == "succeeded", info2.get("error")
    assert not [p for p in phases2 if p.startswith("calibrat")], phases2
    assert all(c["predictor_version"] == 1 and c["measured_latency_ms"] is None for c in second.candidates())
    assert len(client.calibrations("cpu-ort-1t")) == 1

    # Another tenant sees nothing of it: no predictor, no calibration, no measurement.
    engine = make_engine(real_live.db_url)
    with make_session_factory(engine)() as session:
        _tenant, other_key = create_tenant(session, name="other")
    engine.dispose()
    other = Client(real_live.url, other_key)
    assert other.predictor("cpu-ort-1t") is None and other.predictors("cpu-ort-1t") == []
    assert other.calibrations("cpu-ort-1t") == [] and other.measurements("cpu-ort-1t") == []


def test_job_that_may_not_calibrate_fails_with_a_clear_message(real_live: LiveServer, tiny_pt2: Path) -> None:
    client = Client(real_live.url, real_live.key)
    data = client.builtin_dataset("digits")
    model = client.upload_model(tiny_pt2, name="tiny")
    job = client.submit_job(
        model["id"], data["id"], "cpu-ort-2t", algorithm="random", budget={"candidates": 2}, calibrate="never"
    )
    info, _, _ = _watch(job, timeout=300)
    assert info["status"] == "failed" and "calibrate='never'" in info["error"]
    assert "/v1/devices/" in info["error"]


@contextmanager
def agent_process(server: LiveServer, device: str, folder: Path) -> Iterator[subprocess.Popen[str]]:
    """A device agent process (the torch-free entry point, real onnxruntime); SIGTERM at the end."""
    env = {**os.environ, "MODELTAILOR_TOKEN": server.key}
    log = (folder / "agent.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "latency_models.agent", "--server", server.url, "--device", device,
         "--poll-s", "0.2", "--cache-dir", str(folder / "agent-cache")],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def test_remote_device_is_calibrated_and_remeasured_by_its_agent(
    real_live: LiveServer, tiny_pt2: Path, tmp_path: Path
) -> None:
    client = Client(real_live.url, real_live.key)
    board = client.create_device("board-1", threads=1, kind="remote")
    data = client.builtin_dataset("digits")
    model = client.upload_model(tiny_pt2, name="tiny")
    # The agent starts after the device exists (it resolves "board-1" to its id).
    with agent_process(real_live, "board-1", tmp_path) as proc:
        cal = client.calibrate(
            "board-1", samples=8, model_id=model["id"], wait=True, timeout=400, progress=False
        )
        assert cal["status"] == "succeeded" and cal["predictor_version"] == 1, cal
        assert cal["progress"]["done"] == 8
        rows = client.measurements("board-1")
        done = [r for r in rows if r["purpose"] == "calibration" and r["status"] == "done"]
        # one row per timing the agent did: a sample re-timed under load (the load guard) has two
        retimed = int((cal["metrics"].get("noise") or {}).get("retimings", 0))
        kept = 8 - cal["progress"].get("skipped", 0)
        assert kept <= len(done) <= kept + retimed and kept >= 6, (len(done), cal["metrics"].get("noise"))
        agent_info = done[0]["latency_stats"]["agent"]
        assert agent_info["onnxruntime"] and agent_info["host"]["cpu_count"]
        assert all(r["latency_stats"]["speedup"] > 0 for r in done)  # timed against the dense model

        # The job measures one candidate during its search (15 % of 4) through the same agent.
        job = client.submit_job(
            model["id"], data["id"], board["id"], algorithm="random", space=SPACE,
            budget={"candidates": 4}, seed=3, remeasure_top_k=2,
        )  # fmt: skip
        info, phases, _ = _watch(job, timeout=400)
        assert info["status"] == "succeeded", info.get("error")
        assert not [p for p in phases if p.startswith(("calibrating", "topping up"))]
        active = info["progress"]["active_measurement"]
        assert active["measured"] == 1 and active["refits"] == 1 and active["predictor_version"] == 2
        cands = job.candidates()
        assert all(c["predictor_version"] == 2 for c in cands)
        timed = [r for r in client.measurements("board-1") if r["purpose"] == "active"]
        assert timed and all(r["status"] == "done" and r["latency_stats"]["agent"] for r in timed)
        measured = [c for c in cands if c["measured_latency_ms"] is not None]
        assert 1 <= len(measured) <= 3, [c.data for c in cands]
        assert info["baseline"]["measured_latency_ms"] > 0  # the dense task, timed by the agent too
        # An export of a candidate is proven on the device too: timed by the agent against dense.
        best = max(job.pareto(), key=lambda c: c["accuracy"])
        meta = best.export(tmp_path / "best.onnx", timeout=300, poll_s=0.3)
        assert meta["measured_latency_ms"] > 0 and meta["dense_latency_ms"] > 0 and meta["speedup"] > 0
        purposes = {r["purpose"] for r in client.measurements("board-1")}
        assert {"calibration", "dense", "candidate", "active", "export"} <= purposes
        assert proc.poll() is None  # still serving
    assert proc.returncode == 0, (tmp_path / "agent.log").read_text()[-2000:]  # SIGTERM stops it cleanly
