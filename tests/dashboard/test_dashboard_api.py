"""The dashboard's server side: the page and its files, the decimated scatter, measurements."""

from __future__ import annotations

import re

import httpx
import pytest

from service.auth import create_tenant
from service.dashboard.data import policy_summary
from tests.dashboard.harness import Live, seed_device_data, seed_job, seed_refs


def get(live: Live, path: str, key: str | None = None, **params: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or live.key}"}
    return httpx.get(f"{live.url}{path}", headers=headers, params=params, timeout=30)  # type: ignore[arg-type]


def test_page_and_assets_are_served_without_the_internet(live: Live) -> None:
    page = httpx.get(f"{live.url}/", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and not [s for s in sources if s.startswith(("http:", "https:", "//"))]
    for src in [s for s in sources if s.startswith("/dashboard/")]:
        asset = httpx.get(f"{live.url}{src}", timeout=30)
        assert asset.status_code == 200, src
    plotly = httpx.get(f"{live.url}/dashboard/static/plotly.min.js", timeout=30)
    assert plotly.headers["content-type"].startswith("text/javascript") and len(plotly.content) > 1_000_000
    assert b"https://cdn" not in plotly.content[:2000]
    for bad in ("nope.js", "..%2Froutes.py", "index.html", "routes.py"):
        assert httpx.get(f"{live.url}/dashboard/static/{bad}", timeout=30).status_code == 404, bad


def test_scatter_keeps_the_whole_front_and_thins_the_rest(live: Live) -> None:
    job = seed_job(live.factory, live.tenant_id, n=20_000)
    body = get(live, f"/v1/jobs/{job.job_id}/scatter", max_points=1000).json()
    pareto = get(live, f"/v1/jobs/{job.job_id}/pareto", fold="true").json()
    assert body["front"]["id"] == [c["id"] for c in pareto["data"]]
    assert body["front_duplicates"] == [c["duplicates"] for c in pareto["data"]]
    folded = job.folded_front
    assert set(body["front"]["id"]) == set(folded) and len(folded) < len(job.front)
    assert dict(zip(body["front"]["id"], body["front_duplicates"], strict=True)) == folded
    assert set(body["front"]["id"]) | set(body["folded"]["id"]) == job.front
    assert body["total"] == 20_000 and body["decimated"] is True
    others = body["others"]["id"]
    assert len(others) <= 1000 + len(body["size_front_ids"])
    assert body["shown"] == len(others) + len(body["front"]["id"]) + len(body["folded"]["id"])
    sent = set(others) | set(body["front"]["id"]) | set(body["folded"]["id"])
    assert len(sent) == body["shown"]  # no point twice
    assert set(others) <= set(job.candidate_ids)
    # dominated points still span the cloud: both ends of the latency range survive thinning
    lat = [r[2] for r in job.rows]
    shown = body["others"]["latency_ms"] + body["front"]["latency_ms"]
    assert min(shown) <= min(lat) + 0.05 * (max(lat) - min(lat))
    assert max(shown) >= max(lat) - 0.05 * (max(lat) - min(lat))
    assert any(not f for f in body["others"]["feasible"])  # infeasible points are shown too
    assert body["constraints"] == {"latency_ms": {"max": 2.5}, "accuracy_drop": {"max": 0.08}}
    assert all(s.startswith("all layers:") for s in body["front"]["summary"])
    # the accuracy-vs-size front is exact
    feas = [(r[0], r[1]) for r in job.rows if r[3]]
    sizes = dict(
        zip(
            body["others"]["id"] + body["front"]["id"] + body["folded"]["id"],
            body["others"]["size_bytes"] + body["front"]["size_bytes"] + body["folded"]["size_bytes"],
            strict=True,
        )
    )
    for cid in body["size_front_ids"]:
        acc = dict(feas)[cid]
        assert not any(a > acc and sizes.get(o, 1 << 62) < sizes[cid] for o, a in feas if o in sizes)


def test_small_job_is_sent_whole(live: Live) -> None:
    job = seed_job(live.factory, live.tenant_id, n=300)
    body = get(live, f"/v1/jobs/{job.job_id}/scatter").json()
    assert body["decimated"] is False and body["shown"] == 300


def test_other_tenants_see_nothing(live: Live) -> None:
    refs = seed_refs(live.factory, live.tenant_id)
    job = seed_job(live.factory, live.tenant_id, n=10, refs=refs)
    seed_device_data(live.factory, live.tenant_id, refs[2], n=5)
    with live.factory() as session:
        _tenant, other = create_tenant(session, name="other")
    assert get(live, f"/v1/jobs/{job.job_id}/scatter", key=other).status_code == 404
    assert get(live, "/v1/jobs/999999/scatter").status_code == 404
    mine = get(live, f"/v1/devices/{refs[2]}/measurements").json()
    theirs = get(live, f"/v1/devices/{refs[2]}/measurements", key=other).json()  # shared device
    assert mine["count"] == 5 and theirs["count"] == 0
    assert get(live, "/v1/devices/999999/measurements").status_code == 404
    assert get(live, f"/v1/jobs/{job.job_id}/scatter", key="mt_wrong").status_code == 401


def test_measurements_listing(live: Live) -> None:
    refs = seed_refs(live.factory, live.tenant_id)
    seed_device_data(live.factory, live.tenant_id, refs[2], n=30)
    body = get(live, f"/v1/devices/{refs[2]}/measurements", limit=10).json()
    assert body["count"] == 30 and len(body["data"]) == 10
    ids = [m["id"] for m in body["data"]]
    assert ids == sorted(ids, reverse=True)
    assert body["data"][0]["status"] == "failed" and body["data"][0]["error"]
    assert all(m["latency_ms"] > 0 for m in body["data"][1:])


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ({}, "all layers: dense"),
        ({"default": {"width": 0.5, "bits": 8}}, "all layers: width 0.50, int8"),
        (
            {
                "default": {"width": 1.0},
                "layers": {"fc": {"scheme": "nm", "nm": [2, 4]}},
                "skip": ["layer2.1"],
            },
            "all layers: dense | fc 2:4 sparse | skip 1 block: layer2.1",
        ),
        (
            {"layers": {f"l{i}": {"scheme": "unstructured", "sparsity": 0.5} for i in range(5)}},
            "all layers: dense | l0 unstructured 50%; l1 unstructured 50%; l2 unstructured 50% (+2 more)",
        ),
    ],
)
def test_policy_summary(policy: dict[str, object], expected: str) -> None:
    assert policy_summary(policy) == expected
