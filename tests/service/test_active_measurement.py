"""Calibration in the loop, on a real server with real onnxruntime timings on this CPU.

The device starts with a predictor that never saw the job's model (a stand-in for an earlier
calibration, fitted on another model). A job then tops its model up before the search, measures
front points and uncertain candidates in rounds during it, refits after each round, and ends
with every candidate (and the dense baseline) predicted by the last refit, whose version they
name; a job with ``active_measurement.share`` 0 on the same device measures nothing.

The model is the tiny uploaded conv net on the bundled digits (8x8), so a timing takes a
fraction of a second and a refit of the stand-in's linear predictor milliseconds.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from compression.model_io import from_module, load_pt2
from compression.policy import Policy
from compression.space_builder import space_for
from engine.spec import JobSpec
from latency_models.predictors.base import LatencyRecord
from latency_models.predictors.baselines import MacsLinear
from latency_models.sampling import SPACE_OPTIONS, random_policy
from latency_models.store import DeviceStore
from modeltailor.client import Client, Job
from tests.service.conftest import LiveServer

SPACE = {"schemes": ["unstructured", "nm"], "bits": [None, 8], "width": True, "depth": False}
ROUNDS = {"share": 0.5, "max": 4, "per_round": 2}  # budget 8: 4 measurements in 2 rounds


def _stand_in_predictor(data_dir: Path) -> None:
    """Version 1 of the device's own store: a ratio predictor fitted on another model's records."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 8 * 8, 10),
    )
    other = from_module(net.eval(), torch.randn(2, 1, 8, 8), "other")
    space = space_for(other, SPACE_OPTIONS)
    rng = random.Random(0)
    records = [
        LatencyRecord(
            "other", "other@1x8x8", space, random_policy(space, rng), latency_ms=0.05 + i / 100,
            ratio=0.05 + i / 100, reference_ms=1.0,
        )
        for i in range(8)
    ]  # fmt: skip
    store = DeviceStore("cpu-ort-1t", root=data_dir)
    store.append(records)
    store.save_version({"macs": MacsLinear(target="ratio").fit(records)}, {"predictors": {}}, "macs")


def _run(job: Job, timeout: float = 300) -> tuple[dict[str, Any], list[str]]:
    deadline = time.monotonic() + timeout
    while (info := job.status())["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, info["progress"]
        time.sleep(0.2)
    phases: list[str] = []
    for kind, data in job.events():
        phase = data.get("phase") if kind in ("phase", "progress") and isinstance(data, dict) else None
        if phase is not None and (not phases or phases[-1] != phase):
            phases.append(str(phase))
    return info, phases


def test_a_job_tops_up_its_model_measures_during_the_search_and_refits(
    real_live: LiveServer, tiny_pt2: Path
) -> None:
    data_dir = real_live.settings.data_dir
    _stand_in_predictor(data_dir)
    client = Client(real_live.url, real_live.key)
    data = client.builtin_dataset("digits")
    model = client.upload_model(tiny_pt2, name="tiny")
    job = client.submit_job(
        model["id"], data["id"], "cpu-ort-1t", algorithm="random", space=SPACE, budget={"candidates": 8},
        seed=1, topup_samples=4, active_measurement=ROUNDS, remeasure_top_k=1, finetune={"top_k": 0},
    )  # fmt: skip
    info, phases = _run(job)
    assert info["status"] == "succeeded", info.get("error")

    # Before the search: the model's own policies timed (no calibration: the device has a predictor).
    assert "topping up 4/4" in phases and phases.index("topping up 4/4") < phases.index("searching")
    assert not [p for p in phases if p.startswith("calibrating")], phases
    topup = info["progress"]["topup"]
    assert topup["measured"] >= 3 and topup["measured"] + topup["skipped"] == 4
    assert topup["base_version"] == 1 and topup["version"] > 1
    assert topup["error_before_refit"]["n"] >= 1

    # During it: two rounds of measurements, each followed by a refit, counted in the progress.
    assert any(p.startswith("measuring on the device, round 2/2") for p in phases), phases
    active = info["progress"]["active_measurement"]
    assert active["rounds"] == 2 and active["refits"] == 2 and 3 <= active["measured"] <= 4
    assert active["limit"] == 4 and active["error_before_refit"]["n"] >= 1
    assert active["error_before_refit"]["speedup_mape"] >= 0
    final = active["predictor_version"]
    tenant_versions = [p["version"] for p in client.predictors("cpu-ort-1t") if p["scope"] == "tenant"]
    assert tenant_versions == [topup["version"], topup["version"] + 1, final] and final == max(
        tenant_versions
    )

    rows = client.measurements("cpu-ort-1t")
    by_purpose = {p: [r for r in rows if r["purpose"] == p] for p in ("topup", "active")}
    # each timed policy, plus the dense model's timing from the first pair of each round
    assert len(by_purpose["topup"]) == topup["measured"] + 1
    assert len(by_purpose["active"]) == active["measured"] + active["rounds"]
    assert all(r["status"] == "done" and r["latency_ms"] > 0 for r in by_purpose["active"])

    # Every candidate and the baseline are predicted by the last refit, and say so.
    cands = job.candidates()
    assert len(cands) == 8 and all(c["predictor_version"] == final for c in cands)
    measured = [c for c in cands if c["measured_latency_ms"] is not None]
    assert len(measured) >= active["measured"]
    assert all(c["latency_std_ms"] > 0 for c in cands)  # the predictor's uncertainty, beside latency_ms
    tenant_store = next((data_dir / "devices").glob("cpu-ort-1t@t*"))
    predictor, _version, _kind = DeviceStore(tenant_store.name, root=data_dir).load()  # the newest
    space = space_for(load_pt2(tiny_pt2), SPACE_OPTIONS)
    policies = [Policy.from_dict(c["policy"]) for c in cands]
    expected = predictor.predict(space, [*policies, Policy.dense()])
    assert [c["latency_ms"] for c in cands] == pytest.approx(list(expected[:-1]), rel=1e-6)
    assert info["baseline"]["predictor_version"] == final
    assert info["baseline"]["latency_ms"] == pytest.approx(float(expected[-1]), rel=1e-6)

    # Active measurement off (and a model the device now knows): nothing is measured.
    quiet = client.submit_job(
        model["id"], data["id"], "cpu-ort-1t", algorithm="random", space=SPACE, budget={"candidates": 4},
        seed=2, active_measurement={"share": 0}, remeasure_top_k=0, finetune={"top_k": 0},
    )  # fmt: skip
    info2, phases2 = _run(quiet)
    assert info2["status"] == "succeeded", info2.get("error")
    assert "active_measurement" not in info2["progress"] and "topup" not in info2["progress"]
    assert not [p for p in phases2 if p.startswith(("topping up", "measuring on the device"))], phases2
    after = client.measurements("cpu-ort-1t")
    assert len([r for r in after if r["purpose"] in ("topup", "active")]) == len(
        by_purpose["topup"] + by_purpose["active"]
    )
    assert all(c["predictor_version"] == final for c in quiet.candidates())


def test_active_measurement_settings_are_checked_and_sized_by_the_budget() -> None:
    base = {"model_id": 1, "dataset_id": 1, "device_id": 1, "algorithm": "rule"}
    spec = JobSpec.model_validate(base).active_measurement
    assert spec.limit(200) == 30 and spec.limit(16) == 3 and spec.limit(None) == 30
    assert (
        JobSpec.model_validate({**base, "active_measurement": {"max": 0}}).active_measurement.limit(200) == 0
    )
    for bad in ({"share": 0.9}, {"share": -0.1}, {"per_round": 0}, {"max": 10_000}, {"every": 3}):
        with pytest.raises(ValidationError):
            JobSpec.model_validate({**base, "active_measurement": bad})
    with pytest.raises(ValidationError):
        JobSpec.model_validate({**base, "topup_samples": 1})
