"""A front that means something: points equal within measurement resolution are one front point.

The issue's case: a search listed seven int8 points of the same accuracy and latency, sizes a
few KB apart, as seven of its ten front points. Candidates are stored through the service's
own write path (``queries.add_candidate``, which keeps the front flags), read back over HTTP
and in headless Chromium.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from db.models import Dataset, Device, Job, Model
from engine.job import Scores
from modeltailor import Client
from service import front_fold, queries
from service.front_fold import Resolution, fold
from tests.dashboard.conftest import goto, screenshot
from tests.dashboard.harness import BASELINE, Live, make_policy

OpenPage = Callable[..., Any]
THREE = [
    {"metric": "accuracy", "direction": "max"},
    {"metric": "latency_ms", "direction": "min"},
    {"metric": "size_bytes", "direction": "min"},
]
# Seven int8 points: accuracy within one image of 1000, latency within 0.3 %, size within 0.8 %,
# each trading a little size for a little latency so that all seven are non-dominated.
INT8 = [(0.982 if k == 3 else 0.981, 1.200 - 0.001 * k, 300_000 + 400 * k) for k in range(7)]
NEAR_BUT_NOT_EQUAL = [
    (0.979, 1.100, 298_000),  # two images below the int8 points, faster: its own point
    (0.981, 1.230, 250_000),  # same accuracy, 2.5 % slower but much smaller: its own point
]
OTHERS = [
    (0.990, 2.000, 1_100_000),
    (0.950, 0.800, 200_000),
    (0.900, 0.600, 150_000),
    (0.950, 1.500, 900_000),  # dominated
    (0.930, 1.400, 800_000),  # dominated
    (0.970, 1.900, 1_000_000),  # dominated
    (0.960, 2.100, 1_050_000),  # dominated
]


def get(live: Live, path: str, key: str | None = None, **params: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or live.key}"}
    return httpx.get(f"{live.url}{path}", headers=headers, params=params, timeout=30)  # type: ignore[arg-type]


def seed_scored(
    live: Live, points: list[tuple[float, float, int]], *, n_val: int = 1500, objectives: Any = None
) -> tuple[int, list[int]]:
    """A finished job whose candidates score ``points`` (accuracy, latency, size), stored one at a
    time as the runner stores them; its data set has ``n_val`` validation images."""
    rng = random.Random(len(points))
    with live.factory() as session:
        dataset = Dataset(
            tenant_id=live.tenant_id,
            name="val",
            builtin=None,
            shapes={"x_train": [7000, 1, 28, 28], "x_val": [n_val, 1, 28, 28], "num_classes": 10},
        )
        session.add(dataset)
        session.flush()
        model = Model(
            tenant_id=live.tenant_id,
            name="net",
            source="zoo",
            zoo="resnet20",
            dataset_id=dataset.id,
            layers=[],
        )
        session.add(model)
        device_id = session.scalars(select(Device.id).where(Device.name == "cpu-ort-1t")).one()
        session.flush()
        spec = {
            "model_id": model.id,
            "dataset_id": dataset.id,
            "device_id": device_id,
            "algorithm": "random",
            "objectives": objectives or THREE,
            "budget": {"candidates": len(points)},
        }
        job = Job(
            tenant_id=live.tenant_id,
            model_id=model.id,
            dataset_id=dataset.id,
            device_id=device_id,
            algorithm="random",
            spec=spec,
            status="succeeded",
            baseline=dict(BASELINE),
            progress={"phase": "succeeded", "done": len(points), "total": len(points)},
            front_candidates=0,
        )
        session.add(job)
        session.commit()
        ids = []
        for i, (acc, lat, size) in enumerate(points):
            scores = Scores(accuracy=acc, latency_ms=lat, size_bytes=size, macs=1_000_000)
            stored = queries.add_candidate(
                session, job=job, policy=make_policy(rng), policy_hash=f"p{i}", scores=scores
            )
            assert stored is not None
            ids.append(stored.id)
        return job.id, ids


def test_equal_points_fold_under_one_and_near_ones_do_not(live: Live) -> None:
    job_id, ids = seed_scored(live, INT8 + NEAR_BUT_NOT_EQUAL + OTHERS)
    int8 = ids[:7]
    rep = int8[3]  # the most accurate of the seven comes first in front order
    whole = get(live, f"/v1/jobs/{job_id}/pareto").json()
    on_front = [p["id"] for p in whole["data"]]
    assert set(int8) <= set(on_front) and set(ids[7:9]) <= set(on_front)  # all non-dominated
    assert whole["folded"] == 6 and whole["count"] == len(on_front)
    by_id = {p["id"]: p for p in whole["data"]}
    assert sorted(by_id[rep]["duplicates"]) == sorted(i for i in int8 if i != rep)
    assert all(by_id[i]["duplicate_of"] == rep for i in int8 if i != rep)
    assert by_id[ids[7]]["duplicates"] == [] and by_id[ids[7]]["duplicate_of"] is None
    assert by_id[ids[8]]["duplicates"] == [] and by_id[ids[8]]["duplicate_of"] is None
    assert whole["resolution"]["accuracy"] == 0.001 and whole["resolution"]["n_val"] == 1000

    folded = get(live, f"/v1/jobs/{job_id}/pareto", fold="true").json()
    assert [p["id"] for p in folded["data"]] == [i for i in on_front if by_id[i]["duplicate_of"] is None]
    assert folded["count"] == len(on_front) - 6 and folded["folded"] == 6
    with Client(live.url, live.key) as sdk:
        assert [c.id for c in sdk.job(job_id).pareto(fold=True)] == [p["id"] for p in folded["data"]]
        assert [c.id for c in sdk.job(job_id).pareto()] == on_front
    best = get(live, f"/v1/jobs/{job_id}").json()["best"]
    assert [b["id"] for b in best] == [p["id"] for p in folded["data"]][:5]  # distinct points only

    scatter = get(live, f"/v1/jobs/{job_id}/scatter").json()
    assert scatter["front"]["id"] == [p["id"] for p in folded["data"]]
    assert sorted(scatter["folded"]["id"]) == sorted(i for i in int8 if i != rep)
    assert set(scatter["folded"]["duplicate_of"]) == {rep}


def test_accuracy_resolution_follows_the_validation_split(live: Live) -> None:
    # 0.9800 and 0.9825 differ by one image of 400, by two and a half of 1000.
    two = [(0.9825, 1.000), (0.9800, 0.999)]
    objectives = THREE[:2]
    small, ids_small = seed_scored(live, [(a, lat, 1000) for a, lat in two], n_val=400, objectives=objectives)
    large, ids_large = seed_scored(
        live, [(a, lat, 1000) for a, lat in two], n_val=5000, objectives=objectives
    )
    on_small = get(live, f"/v1/jobs/{small}/pareto", fold="true").json()
    on_large = get(live, f"/v1/jobs/{large}/pareto", fold="true").json()
    assert on_small["resolution"]["n_val"] == 400 and on_large["resolution"]["n_val"] == 1000
    assert [p["id"] for p in on_small["data"]] == [ids_small[0]]
    assert on_small["data"][0]["duplicates"] == [ids_small[1]]
    assert [p["id"] for p in on_large["data"]] == ids_large


def test_folded_front_in_the_page(live: Live, open_page: OpenPage) -> None:
    job_id, ids = seed_scored(live, INT8 + NEAR_BUT_NOT_EQUAL + OTHERS)
    folded = get(live, f"/v1/jobs/{job_id}/pareto", fold="true").json()
    rep = ids[3]
    page = open_page(live)
    goto(page, live, f"#/jobs/{job_id}")
    assert page.locator("#scatter").get_attribute("data-front-count") == str(folded["count"])
    assert page.locator("#front-table tr[data-rep-row]").count() == folded["count"]
    toggle = page.locator(f"#front-table .fold-toggle[data-rep='{rep}']")
    assert toggle.inner_text() == "+6 equal"
    dups = page.locator(f"#front-table tr[data-dup-of='{rep}']")
    assert dups.count() == 6 and not dups.first.is_visible()
    assert "folded under it" in page.inner_text("#fold-note")
    toggle.click()
    assert all(dups.nth(i).is_visible() for i in range(6))
    assert page.url.endswith(f"#/jobs/{job_id}")  # the toggle opened the rows, not the candidate
    traces = page.evaluate("() => document.querySelector('#scatter').data.map(t => [t.name, t.x.length])")
    assert ["equal within resolution", 6] in traces
    screenshot(page, "job-folded-front")
    target = dups.nth(0).get_attribute("data-href")
    dups.nth(0).click()
    page.wait_for_selector("body[data-page='candidate'][data-ready='1']")
    assert page.url.endswith(target)


def test_large_and_small_fronts_fold_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pairwise path (small fronts) and the row-by-row one (large) give the same groups, and
    every member is within resolution of its representative."""
    rng = np.random.default_rng(0)
    metrics = ["accuracy", "latency_ms", "size_bytes"]
    for trial in range(60):
        m = int(rng.integers(1, 80))
        values = np.column_stack(
            [np.round(rng.uniform(0.9, 0.95, m), 3), rng.uniform(1.0, 1.1, m), rng.uniform(1e5, 1.03e5, m)]
        )
        if trial % 5 == 0:
            values[int(rng.integers(0, m)), 1] = np.nan  # never folds
        resolution = Resolution(n_val=int(rng.integers(100, 2000)))
        small = fold(values, metrics, resolution)
        monkeypatch.setattr(front_fold, "PAIRWISE_MAX", 0)
        assert fold(values, metrics, resolution) == small
        monkeypatch.undo()
        assert sorted(i for g in small for i in g) == list(range(m))
        for group in small:
            rep = values[group[0]]
            for i in group[1:]:
                assert abs(values[i, 0] - rep[0]) <= resolution.accuracy + 1e-9
                assert np.all(
                    np.abs(values[i, 1:] - rep[1:]) <= 0.01 * np.maximum(values[i, 1:], rep[1:]) + 1e-9
                )
