"""Family jobs over REST and the SDK (issue 15): a real server (uvicorn, SQLite) runs the real
family search of LeNet-5 on digits for two latency budgets, marks its nested points, answers
``GET /v1/jobs/{id}/family`` and exports the bundle, which the switch runs; bad specs and
exports of the wrong job are 4xx with the reason.

The device's predictor is a stored stand-in for an earlier calibration: latency proportional
to MACs (a ``macs`` predictor, as ``modeltailor calibrate`` stores one). A fresh 8-sample
calibration of this 0.03 ms model predicts too flat a latency for any move to reach 0.6 of
dense (tried: the chain stalls at 0.96), and the point here is the plumbing, not the
predictor. The end of the job and the bundle time the points on this CPU for real.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy
import torch
from conftest import LiveServer

from compression.family import check_nested_policies
from compression.model_io import from_module
from compression.policy import Policy
from compression.space_builder import space_for
from db.models import Candidate as CandidateRow
from engine.spec import JobSpec
from latency_models.predictors.base import LatencyRecord
from latency_models.predictors.baselines import MacsLinear
from latency_models.sampling import SPACE_OPTIONS, random_policy
from latency_models.store import DeviceStore
from modeltailor.client import Client, ConflictError, NotFoundError, ValidationError
from modeltailor.switch import FamilySwitch
from service.family_schemas import FamilyExportCreate, FamilyExportPublic, FamilyPointPublic, FamilyPublic

SPACE = {"schemes": ["unstructured", "nm"], "bits": [None, 8], "depth": False}
QUICK = {"calibrate": "auto", "active_measurement": {"share": 0.0}, "finetune": {"top_k": 0}}


def _macs_predictor(data_dir: Path) -> None:
    """Version 1 of cpu-ort-1t's own store: 1 ms per million MACs, no intercept."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(384, 10)
    )
    other = from_module(net.eval(), torch.randn(2, 1, 8, 8), "other")
    space, rng = space_for(other, SPACE_OPTIONS), random.Random(0)
    records = [
        LatencyRecord("other", "other@1x8x8", space, random_policy(space, rng), latency_ms=0.05 + i / 100)
        for i in range(4)
    ]
    predictor = MacsLinear().fit(records)
    predictor.coef = np.array([1.0, 0.0])
    DeviceStore("cpu-ort-1t", root=data_dir).save_version({"macs": predictor}, {"predictors": {}}, "macs")


def test_a_family_job_stores_nested_points_and_exports_a_bundle(
    real_live: LiveServer, tmp_path: Path
) -> None:
    _macs_predictor(real_live.settings.data_dir)
    client = Client(real_live.url, real_live.key)
    data = client.builtin_dataset("digits")
    model = client.zoo_model("lenet5", data["id"])
    layers = [layer["name"] for layer in client.request("GET", f"/models/{model['id']}")["layers"]]

    def submit(**spec: object) -> int:
        body = {"space": SPACE, "budget": {"candidates": 30}, "remeasure_top_k": 1, **QUICK, **spec}
        return client.submit_job(model["id"], data["id"], "cpu-ort-1t", **body).id  # type: ignore[arg-type]

    # Bad specs are refused before anything is stored, naming the fix.
    for bad, why in (
        ({"algorithm": "random", "family": {"budgets": [1.0, 0.6]}}, "set algorithm 'rule'"),
        ({"algorithm": "rule", "family": {"budgets": [0.5, 0.7]}}, "decrease strictly"),
        ({"algorithm": "rule", "family": {"budgets": [1.0, 0.0]}}, r"in \(0, 1\]"),
        ({"algorithm": "rule", "family": {"budgets": [1.0]}}, "at least 2"),
        (
            {"algorithm": "rule", "family": {"budgets": [1.0, 0.5], "finetune_epochs": 21}},
            "less than or equal",
        ),
        ({"algorithm": "rule", "reconstruct": False, "family": {"budgets": [1.0, 0.5]}}, "reconstruct"),
    ):
        with pytest.raises(ValidationError, match=why) as err:
            submit(**bad)
        assert err.value.status == 422
    assert client.jobs() == []

    # A front job is no family: its family-export is a 409 saying so, whatever its state.
    front = submit(algorithm="random", budget={"candidates": 1})
    with pytest.raises(ConflictError, match="not a family job"):
        client.export_family(front)
    assert client.family(front)["points"] == [] and "not a family job" in client.family(front)["note"]
    with pytest.raises(NotFoundError):
        client.family(424242)
    with pytest.raises(NotFoundError):
        client.export_family(424242)

    job = client.job(submit(algorithm="rule", family={"budgets": [1.0, 0.6]}))
    with pytest.raises(ConflictError, match="once it succeeded"):
        client.export_family(job.id)  # still queued or running
    info = job.wait(timeout=600, poll_s=0.5, progress=False)
    assert info["status"] == "succeeded", info.get("error")
    assert info["spec"]["family"] == {"budgets": [1.0, 0.6], "finetune_epochs": 0}

    fam = job.family()
    points = fam["points"]
    assert [p["k"] for p in points] == [0, 1] and [p["budget"] for p in points] == [1.0, 0.6], fam
    assert not fam["note"], fam["note"]
    ids = [p["candidate_id"] for p in points]
    assert all(isinstance(i, int) for i in ids) and all(p["siblings"] == ids for p in points)
    # Nested (one shared weight set can serve them) and each faster than the one before.
    policies = [Policy.from_dict(client.candidate(i)["policy"]) for i in ids]
    check_nested_policies(policies, layers)  # kept channels: build_family checks them at export
    assert policies[0] == Policy.dense() and policies[1] != policies[0]
    latencies = [p["latency_ms"] for p in points]
    assert latencies[1] < latencies[0], latencies
    assert latencies[1] <= 0.6 * fam["dense_latency_ms"] + 1e-9
    assert points[1]["target_ms"] == pytest.approx(0.6 * fam["dense_latency_ms"])
    # Every scored candidate is a candidate of the job; the points carry their family mark.
    cands = {c.id: c for c in job.candidates()}
    engine = sqlalchemy.create_engine(real_live.db_url)
    with engine.connect() as conn:
        query = sqlalchemy.select(CandidateRow.id, CandidateRow.extra).where(CandidateRow.id.in_(ids))
        marks = {row.id: row.extra["family"] for row in conn.execute(query)}
    engine.dispose()
    assert [marks[i]["point"] for i in ids] == [0, 1] and [marks[i]["budget"] for i in ids] == [1.0, 0.6]
    assert all(marks[i]["job_family"] == job.id for i in ids)
    assert all(marks[i]["siblings"] == [p["policy_hash"] for p in points] for i in ids)
    assert set(ids) <= set(cands) and 2 < len(cands) <= 30
    assert any(p["measured_latency_ms"] is not None for p in points)  # re-measured at the end
    kinds = [kind for kind, _ in job.events()]
    assert "progress" in kinds and "remeasured" in kinds

    # The bundle: one shared weight file, one graph per point, timed and scored, that runs.
    manifest = job.export_family(tmp_path / "bundle", runs=20)
    assert [p["budget"] for p in manifest["points"]] == [1.0, 0.6]
    assert [p["candidate_id"] for p in manifest["points"]] == ids and manifest["job_id"] == job.id
    for p in manifest["points"]:
        assert (
            (tmp_path / "bundle" / p["file"]).is_file() and p["latency_ms"] > 0 and 0.5 < p["accuracy"] <= 1
        )
    assert (tmp_path / "bundle" / "weights.bin").is_file()
    assert manifest["sizes"]["bundle_bytes"] < manifest["sizes"]["separate_bytes"]
    switch = FamilySwitch(tmp_path / "bundle", target_ms=1e3)
    assert switch.run(np.zeros((1, 1, 8, 8), dtype=np.float32)).shape == (1, 10)
    after = client.family(job.id)
    assert after["export"]["status"] == "ready" and after["export"]["download"]
    assert [p["bundle_latency_ms"] for p in after["points"]] == [p["latency_ms"] for p in manifest["points"]]
    assert [p["bundle_accuracy"] for p in after["points"]] == [p["accuracy"] for p in manifest["points"]]
    artifact = client.artifact(after["export"]["artifact_id"])
    assert artifact["format"] == "family" and artifact["candidate_id"] == ids[0]
    # The REST body of the export is checked like every other.
    with httpx.Client(base_url=real_live.url, headers={"Authorization": f"Bearer {real_live.key}"}) as http:
        r = http.post(f"/v1/jobs/{job.id}/family-export", json={"runs": 5})
        assert r.status_code == 422 and "runs" in r.text


def test_the_family_models_examples_validate() -> None:
    for model in (FamilyPublic, FamilyPointPublic, FamilyExportPublic, FamilyExportCreate):
        examples = model.model_json_schema().get("examples") or []
        assert examples, model.__name__
        for example in examples:
            model.model_validate(json.loads(json.dumps(example)))
    spec = JobSpec.model_validate(
        {
            "model_id": 1,
            "dataset_id": 1,
            "device_id": 1,
            "algorithm": "rule",
            "family": {"budgets": [1.0, 0.5]},
        }
    )
    # What the database stores reads back as the same job.
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_a_resumed_family_search_scores_no_stored_candidate_again_and_stops_when_told(
    tmp_path: Path,
) -> None:
    from compression.data import load_builtin
    from compression.resolve import resolve_model
    from engine.device_latency import macs_proxy
    from engine.family import search_family

    torch.set_num_threads(1)
    data = load_builtin("digits")
    model = resolve_model("lenet5", data, seed=0, cache_dir=tmp_path)
    kw = {"device_latency": macs_proxy, "budgets": [1.0, 0.6], "val_images": 200}
    first = search_family(model, data, **kw)  # type: ignore[arg-type]
    assert len(first.points) == 2 and first.candidates
    # Resumed with every candidate stored: the same points, nothing scored twice.
    again: list[str] = []
    resumed = search_family(
        model, data, previous=first.candidates, on_candidate=lambda c: again.append(c.policy.hash), **kw
    )  # type: ignore[arg-type]
    assert again == [] and [p.policy for p in resumed.points] == [p.policy for p in first.points]
    # Resumed with half of them: only the other half is scored.
    half = len(first.candidates) // 2
    rest: list[str] = []
    search_family(
        model, data, previous=first.candidates[:half], on_candidate=lambda c: rest.append(c.policy.hash), **kw
    )  # type: ignore[arg-type]
    assert rest == [c.policy.hash for c in first.candidates[half:]]
    # A job's should_stop ends the chain where it is, with a note.
    stopped = search_family(model, data, should_stop=lambda: True, **kw)  # type: ignore[arg-type]
    assert len(stopped.points) == 1 and "stopped" in stopped.note and not stopped.candidates
