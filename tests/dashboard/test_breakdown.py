"""Where the time goes and why not faster: ``GET /v1/candidates/{id}/breakdown`` and the candidate page.

The device's predictor is a real ``KernelGBDT`` fitted on the synthetic device of
``latency_models.testing`` for ResNet-20 on 28×28 images (the zoo model the harness's jobs
name), stored in the server's data directory with capabilities as a calibration stores them
(channel block 16; unstructured and N:M sparsity size-only), and mirrored into the
predictors table.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from sqlalchemy import select

from compression.model_io import from_module
from compression.policy import Policy
from compression.space import SearchSpace
from compression.space_builder import space_for
from compression.zoo import build_model
from db.models import Candidate, Device, Job
from engine.job import Scores
from latency_models.capabilities import Capabilities
from latency_models.predictors.base import LatencyRecord
from latency_models.predictors.kernel_gbdt import KernelGBDT
from latency_models.store import DeviceStore
from latency_models.testing import fake_latency_ms
from service import queries
from service.auth import create_tenant
from service.predictor_versions import store_key, sync_predictors
from tests.dashboard.conftest import doc_screenshot, goto, screenshot
from tests.dashboard.harness import Live, live_server, seed_job

OpenPage = Callable[..., Any]
SIZE_ONLY_WORDS = "size-only: unstructured (high sparsity) ran 0.97x the dense speed (below 1.10x)"
CAPS = Capabilities(
    round_to=16,
    accelerated_schemes=("block", "int8"),
    measured_schemes=("unstructured", "nm", "block", "int8"),
    reasons={
        "round_to": "channel counts that are multiples of 16 run at 0.98 of ideal time per channel",
        "unstructured": SIZE_ONLY_WORDS,
        "nm": "size-only: nm (2:4) ran 0.98x the dense speed (below 1.10x): smaller, not faster",
        "block": "accelerated: block (1x4 blocks) ran 1.31x faster than dense",
        "int8": "accelerated: int8 (8-bit weights) ran 2.60x faster than dense",
    },
    scheme_speedups={"unstructured": 0.97, "nm": 0.98, "block": 1.31, "int8": 2.6},
)
# layer3.0.conv1 keeps 24 of 64 channels (off the block of 16); layer3.1.conv1 is 90 % unstructured.
POLICY = {
    "default": {"width": 1.0},
    "layers": {
        "layer3.0.conv1": {"width": 0.375},
        "layer3.1.conv1": {"scheme": "unstructured", "sparsity": 0.9},
    },
    "skip": ["layer1.2"],
}


@pytest.fixture(scope="module")
def fitted() -> tuple[SearchSpace, KernelGBDT]:
    torch.manual_seed(0)
    net = build_model("resnet20", in_channels=1, image_size=28, num_classes=10).eval()
    space = space_for(from_module(net, torch.zeros(2, 1, 28, 28), name="resnet20"))
    rng = random.Random(1)
    policies = [Policy.dense()]
    for _ in range(119):
        p = space.sample(rng)
        if rng.random() < 0.5:
            bits = 8 if rng.random() < 0.5 else None
            p = Policy(layers={n: replace(p.for_layer(n), bits=bits) for n in space.layer_names}, skip=p.skip)
        policies.append(p)
    ms = fake_latency_ms(space, policies, np.random.default_rng(1))
    records = [
        LatencyRecord("resnet20", "resnet20@28", space, p, float(t), dense_latency_ms=float(ms[0]))
        for p, t in zip(policies, ms, strict=True)
    ]
    predictor = KernelGBDT(policy_features=False, n_estimators=120)
    predictor.fit(records)
    return space, predictor


@pytest.fixture
def live_with_predictor(tmp_path: Path, fitted: tuple[SearchSpace, KernelGBDT]) -> Iterator[Live]:
    """A server whose cpu-ort-1t has predictor version 1 (the fitted one) with capabilities."""
    _space, predictor = fitted
    with live_server(tmp_path / "data") as live:
        with live.factory() as session:
            device = session.scalars(select(Device).where(Device.name == "cpu-ort-1t")).one()
            store = DeviceStore(store_key(device), root=tmp_path / "data")
            store.save_version(
                {"kernel_gbdt": predictor}, {"predictors": {}, "capabilities": CAPS.to_dict()}, "kernel_gbdt"
            )
            rows = sync_predictors(session, device=device, data_dir=tmp_path / "data", tenant_id=None)
            assert [r.version for r in rows] == [1]
        yield live


def get(live: Live, path: str, key: str | None = None) -> httpx.Response:
    return httpx.get(f"{live.url}{path}", headers={"Authorization": f"Bearer {key or live.key}"}, timeout=120)


def add_scored(live: Live, job_id: int, policy: dict[str, Any], latency_ms: float | None = 1.9) -> int:
    """Store one candidate of ``policy`` as the runner does (scored by predictor version 1)."""
    with live.factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        scores = Scores(accuracy=0.97, latency_ms=latency_ms, size_bytes=500_000, macs=1, predictor_version=1)
        stored = queries.add_candidate(
            session,
            job=job,
            policy=Policy.from_dict(policy).to_dict(),
            policy_hash=f"bd-{job_id}",
            scores=scores,
        )
        assert stored is not None
        return int(stored.id)


def test_breakdown_over_rest(live_with_predictor: Live, fitted: tuple[SearchSpace, KernelGBDT]) -> None:
    live = live_with_predictor
    space, predictor = fitted
    job = seed_job(live.factory, live.tenant_id, n=5)
    cid = add_scored(live, job.job_id, POLICY)
    body = get(live, f"/v1/candidates/{cid}/breakdown").json()
    policy = Policy.from_dict(POLICY)
    assert (
        body["source"] == "predictor" and "predictor v1 (kernel_gbdt) of cpu-ort-1t" in body["source_words"]
    )
    assert body["total_ms"] == pytest.approx(float(predictor.predict(space, [policy])[0]), rel=1e-9)
    assert body["dense_total_ms"] == pytest.approx(
        float(predictor.predict(space, [Policy.dense()])[0]), rel=1e-9
    )
    assert body["round_to"] == 16 and set(body["size_only"]) == {"unstructured", "nm"}
    layers = {row["name"]: row for row in body["layers"]}
    assert [row["name"] for row in body["layers"]] == space.layer_names
    assert not layers["layer1.2.conv1"]["present"] and layers["layer1.2.conv1"]["predicted_ms"] == 0
    narrowed = layers["layer3.0.conv1"]
    assert (narrowed["kept_out"], narrowed["dense_out"]) == (24, 64)
    assert [f["kind"] for f in narrowed["flags"]] == ["channel_multiple"]
    assert "round 24 channels to 16 or 32" in narrowed["flags"][0]["reason"]
    sparse = layers["layer3.1.conv1"]
    assert sparse["removed"] == pytest.approx(0.9) and abs(sparse["saved"]) < 1e-9
    assert [f["kind"] for f in sparse["flags"]] == ["size_only"] and SIZE_ONLY_WORDS in sparse["flags"][0][
        "reason"
    ]
    assert sum(row["share"] for row in body["layers"]) + body["overhead_ms"] / body[
        "total_ms"
    ] == pytest.approx(1.0)
    advice = {a["layer"]: a for a in body["advice"]}
    assert len(body["advice"]) <= 3 and "layer3.1.conv1" in advice
    assert "prune channels" in advice["layer3.1.conv1"]["suggestion"]
    gaps = [a["removed"] - a["saved"] for a in body["advice"]]
    assert gaps == sorted(gaps, reverse=True)


def test_breakdown_without_a_predictor_is_an_estimate_and_refusals(live: Live) -> None:
    job = seed_job(live.factory, live.tenant_id, n=5)
    cid = add_scored(live, job.job_id, POLICY)
    body = get(live, f"/v1/candidates/{cid}/breakdown").json()
    assert body["source"] == "macs" and body["source_words"].startswith("estimate")
    assert body["total_ms"] == pytest.approx(1.9)
    with live.factory() as session:
        _tenant, other = create_tenant(session, name="other")
    assert get(live, f"/v1/candidates/{cid}/breakdown", key=other).status_code == 404
    assert get(live, "/v1/candidates/999999/breakdown").status_code == 404
    with live.factory() as session:
        row = session.get(Candidate, cid)
        assert row is not None
        row.latency_ms = None
        session.commit()
    refused = get(live, f"/v1/candidates/{cid}/breakdown")
    assert refused.status_code == 409 and "no latency" in refused.json()["detail"]


def test_candidate_page_shows_where_the_time_goes(
    live_with_predictor: Live, fitted: tuple[SearchSpace, KernelGBDT], open_page: OpenPage
) -> None:
    live = live_with_predictor
    space, predictor = fitted
    job = seed_job(live.factory, live.tenant_id, n=5)
    predicted = float(predictor.predict(space, [Policy.from_dict(POLICY)])[0])
    cid = add_scored(live, job.job_id, POLICY, latency_ms=predicted)  # as the runner stores it
    body = get(live, f"/v1/candidates/{cid}/breakdown").json()
    page = open_page(live)
    goto(page, live, f"#/candidates/{cid}")
    page.wait_for_selector("#breakdown[data-state='ready']", timeout=60_000)
    chart = page.locator("#time-chart")
    present = [row for row in body["layers"] if row["present"]]
    assert chart.get_attribute("data-layers") == str(len(present))
    assert chart.get_attribute("data-flagged") == str(sum(1 for row in present if row["flags"]))
    bars = page.evaluate("() => document.querySelector('#time-chart').data[1].y")
    assert bars[:-1] == pytest.approx([row["predicted_ms"] for row in present])
    assert "round 24 channels to 16 or 32" in page.inner_text("#no-speed li[data-layer='layer3.0.conv1']")
    assert page.locator("#why-not-faster li").count() == len(body["advice"])
    assert "prune channels" in page.inner_text("#why-not-faster li[data-layer='layer3.1.conv1']")
    assert "Predicted" in page.inner_text("#breakdown-source")
    screenshot(page, "candidate-breakdown")
    doc_screenshot(page, "candidate")
