"""A real job end to end: zoo model trained on digits, real search, real export measured on this CPU."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from conftest import LiveServer

from modeltailor.client import Client


def test_real_job_searches_and_exports_a_measured_model(real_live: LiveServer, tmp_path: Path) -> None:
    client = Client(real_live.url, real_live.key)
    data = client.builtin_dataset("digits")
    model = client.zoo_model("lenet5", data["id"])
    job = client.submit_job(
        model["id"], data["id"], "cpu-ort-1t", algorithm="random",
        space={"schemes": ["unstructured", "nm"], "bits": [None, 8], "width": True, "depth": False},
        budget={"candidates": 5}, seed=1,
        calibration_samples=16, finetune={"top_k": 0},  # the default path's other phases: test_job_spec
    )  # fmt: skip
    info = job.wait(timeout=600, poll_s=0.5, progress=False)
    assert info["status"] == "succeeded", info.get("error")
    cands = job.candidates()
    assert len(cands) == 5 and len({c["policy_hash"] for c in cands}) == 5
    for c in cands:
        assert 0.0 <= c["accuracy"] <= 1.0 and c["latency_ms"] > 0 and c["size_bytes"] > 0
    front = job.pareto()
    assert front
    best = max(front, key=lambda c: c["accuracy"])
    meta = best.export(tmp_path / "best.onnx")
    assert meta["status"] == "ready", meta
    assert meta["measured_latency_ms"] > 0 and meta["dense_latency_ms"] > 0 and meta["speedup"] > 0
    assert 0.0 <= meta["accuracy"] <= 1.0 and meta["predicted_latency_ms"] == pytest.approx(
        best["latency_ms"]
    )
    onnx.checker.check_model(str(tmp_path / "best.onnx"))
