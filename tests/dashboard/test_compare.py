"""Comparing searches over REST and in the page: fronts, hypervolume over candidates, best under a bound."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from agents.objective import hypervolume_2d
from modeltailor import Client
from service.auth import create_tenant
from service.dashboard.compare import hypervolume_curve
from tests.dashboard.conftest import doc_screenshot, goto, screenshot
from tests.dashboard.harness import Live, add_candidates, seed_job, seed_refs

OpenPage = Callable[..., Any]


def get(
    live: Live, path: str, key: str | None = None, params: dict[str, Any] | None = None, **more: Any
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or live.key}"}
    return httpx.get(f"{live.url}{path}", headers=headers, params={**(params or {}), **more}, timeout=60)


def candidates(live: Live, job_id: int) -> list[dict[str, Any]]:
    return list(get(live, f"/v1/jobs/{job_id}/candidates", limit=10_000).json()["data"])


def test_hypervolume_curve_matches_the_plain_sweep_at_every_prefix() -> None:
    rng = random.Random(0)
    acc = np.array([rng.uniform(0.5, 1.0) if rng.random() > 0.1 else np.nan for _ in range(400)])
    lat = np.array([rng.uniform(0.2, 5.0) for _ in range(400)])
    lat[::37] = lat[1::37][: len(lat[::37])]  # some equal latencies
    marks = np.array([1, 2, 7, 50, 51, 199, 400])
    curve = hypervolume_curve(acc, lat, marks, 0.6, 4.0)
    for n, value in zip(marks, curve, strict=True):
        pts = [(a, t) for a, t in zip(acc[:n], lat[:n], strict=True) if not np.isnan(a)]
        assert value == pytest.approx(hypervolume_2d(pts, (0.6, 4.0)), rel=1e-12, abs=1e-15)
    assert all(b >= a for a, b in itertools.pairwise(curve))


def test_compare_two_jobs_over_rest(live: Live) -> None:
    refs = seed_refs(live.factory, live.tenant_id)
    plain = seed_job(live.factory, live.tenant_id, n=600, algorithm="random", seed=1, refs=refs)
    better = seed_job(live.factory, live.tenant_id, n=300, algorithm="rule", seed=2, refs=refs)
    add_candidates(live.factory, better.job_id, n=300, seed=3, boost=0.02)
    body = get(live, "/v1/compare", jobs=f"{plain.job_id},{better.job_id},{plain.job_id}").json()
    assert [j["id"] for j in body["jobs"]] == [plain.job_id, better.job_id]  # order kept, repeat dropped
    assert body["bound"] is None and all(j["best"] is None for j in body["jobs"])
    for j in body["jobs"]:
        rows = candidates(live, j["id"])
        # the overlaid front is the job's own folded front (its objectives are accuracy / latency)
        folded = get(live, f"/v1/jobs/{j['id']}/pareto", fold="true").json()["data"]
        assert j["front"]["id"] == [p["id"] for p in folded]
        assert j["front"]["duplicates"] == [len(p["duplicates"]) for p in folded]
        hv = j["hypervolume"]
        ref = (j["baseline"]["accuracy"] - 0.10, j["baseline"]["latency_ms"])
        assert hv["reference"] == {"accuracy": ref[0], "latency_ms": ref[1]}
        assert hv["candidates"][-1] == len(rows) == j["total"] and len(hv["candidates"]) <= 120
        feasible = [(r["accuracy"], r["latency_ms"]) for r in rows if r["feasible"]]
        assert hv["final"] == pytest.approx(hypervolume_2d(feasible, ref), rel=1e-9)
        assert hv["final_normalized"] == pytest.approx(hv["final"] / (0.10 * ref[1]), rel=1e-9)
        half = hv["candidates"][len(hv["candidates"]) // 2]
        early = [(r["accuracy"], r["latency_ms"]) for r in rows[:half] if r["feasible"]]
        assert hv["hypervolume"][len(hv["candidates"]) // 2] == pytest.approx(
            hypervolume_2d(early, ref), rel=1e-9
        )
        assert all(e is not None and e >= 0 for e in hv["elapsed_s"])
    # the boosted search's later candidates are more accurate: its front dominates more
    assert body["jobs"][1]["hypervolume"]["final"] > body["jobs"][0]["hypervolume"]["final"]


@pytest.mark.parametrize(
    ("param", "value"), [("max_latency_ms", 1.6), ("min_accuracy", 0.95), ("max_accuracy_drop", 0.03)]
)
def test_best_point_under_a_bound(live: Live, param: str, value: float) -> None:
    refs = seed_refs(live.factory, live.tenant_id)
    jobs = [seed_job(live.factory, live.tenant_id, n=400, seed=s, refs=refs) for s in (5, 6)]
    body = get(
        live, "/v1/compare", params={"jobs": ",".join(str(j.job_id) for j in jobs), param: value}
    ).json()
    assert body["bound"] == {"kind": param, "value": value}
    for j in body["jobs"]:
        rows = [r for r in candidates(live, j["id"]) if r["feasible"]]
        if param == "max_latency_ms":
            ok = [r for r in rows if r["latency_ms"] <= value]
            want = max(ok, key=lambda r: (r["accuracy"], -r["latency_ms"], -r["index"]))
        else:
            floor = value if param == "min_accuracy" else j["baseline"]["accuracy"] - value
            ok = [r for r in rows if r["accuracy"] >= floor]
            want = min(ok, key=lambda r: (r["latency_ms"], -r["accuracy"], r["index"]))
        assert j["best"] == {"id": want["id"], "accuracy": want["accuracy"], "latency_ms": want["latency_ms"]}
    none = get(live, "/v1/compare", jobs=str(jobs[0].job_id), max_latency_ms=0.001).json()
    assert none["jobs"][0]["best"] is None
    with Client(live.url, live.key) as sdk:  # the SDK asks the same question
        assert sdk.compare([j.job_id for j in jobs], **{param: value}) == body


def test_compare_refuses_bad_input_and_other_tenants_jobs(live: Live) -> None:
    refs = seed_refs(live.factory, live.tenant_id)
    mine = seed_job(live.factory, live.tenant_id, n=20, refs=refs)
    with live.factory() as session:
        other_tenant, other_key = create_tenant(session, name="other")
        other_id = other_tenant.id
    theirs = seed_job(live.factory, other_id, n=20, seed=9)
    missing = get(live, "/v1/compare", jobs=f"{mine.job_id},{theirs.job_id}")
    assert missing.status_code == 404 and f"job {theirs.job_id} not found" in missing.json()["detail"]
    assert get(live, "/v1/compare", key=other_key, jobs=str(mine.job_id)).status_code == 404
    assert get(live, "/v1/compare", key=other_key, jobs=str(theirs.job_id)).status_code == 200
    cases: list[tuple[dict[str, Any], str]] = [
        ({"jobs": "1,x"}, "separated by commas"),
        ({"jobs": ",".join(str(i) for i in range(1, 10))}, "1 to 8 jobs"),
        ({"jobs": str(mine.job_id), "max_latency_ms": 2, "min_accuracy": 0.9}, "at most one bound"),
        ({"jobs": str(mine.job_id), "min_accuracy": 1.5}, "min_accuracy"),
        ({"jobs": str(mine.job_id), "max_latency_ms": "nan"}, "max_latency_ms"),
    ]
    for bad, words in cases:
        r = get(live, "/v1/compare", params=bad)
        assert r.status_code == 422, bad
        assert words in r.text, (bad, r.text)
    assert get(live, "/v1/compare", key="mt_wrong", jobs=str(mine.job_id)).status_code == 401


def test_compare_page_from_the_jobs_list(live: Live, open_page: OpenPage) -> None:
    refs = seed_refs(live.factory, live.tenant_id)
    a = seed_job(live.factory, live.tenant_id, n=800, algorithm="random", seed=11, refs=refs)
    b = seed_job(live.factory, live.tenant_id, n=400, algorithm="rule", seed=12, refs=refs)
    add_candidates(live.factory, b.job_id, n=400, seed=13, boost=0.02)
    page = open_page(live)
    goto(page, live, "#/jobs")
    assert page.locator("#compare-button").is_disabled()
    page.check(f".compare-pick[data-job='{a.job_id}']")
    assert page.url.endswith("#/jobs")  # ticking a row does not open the job
    page.check(f".compare-pick[data-job='{b.job_id}']")
    assert page.inner_text("#compare-button") == "Compare 2 jobs"
    page.click("#compare-button")
    page.wait_for_selector("body[data-page='compare'][data-ready='1']")
    assert page.url.endswith(f"#/compare/{a.job_id},{b.job_id}")
    body = get(live, "/v1/compare", jobs=f"{a.job_id},{b.job_id}").json()
    fronts = page.locator("#compare-fronts")
    assert fronts.get_attribute("data-jobs") == "2"
    assert fronts.get_attribute("data-points") == str(sum(len(j["front"]["id"]) for j in body["jobs"]))
    assert page.locator("#compare-hv").get_attribute("data-curves") == "2"
    plotted = page.evaluate("() => document.querySelector('#compare-hv').data.map(t => t.y[t.y.length - 1])")
    assert plotted == pytest.approx([j["hypervolume"]["final_normalized"] for j in body["jobs"]])
    assert page.locator("#compare-table tbody tr").count() == 2
    # a bound: latency at most 2 ms, each job's best point appears in its row
    page.select_option("#bound-kind", "max_latency_ms")
    page.fill("#bound-value", "2")
    page.click("#bound-form button")
    page.wait_for_selector("#bound-words")
    bounded = get(live, "/v1/compare", jobs=f"{a.job_id},{b.job_id}", max_latency_ms=2).json()
    for j in bounded["jobs"]:
        cell = page.locator(f"#compare-table tr[data-job='{j['id']}'] td.best-under")
        assert cell.get_attribute("data-best") == str(j["best"]["id"])
        assert f"{100 * j['best']['accuracy']:.2f} %" in cell.inner_text()
    screenshot(page, "compare")
    doc_screenshot(page, "compare")
    # an accuracy bound in percent on the form is a fraction over REST
    page.select_option("#bound-kind", "min_accuracy")
    page.fill("#bound-value", "95")
    page.click("#bound-form button")
    page.wait_for_selector("#bound-words:has-text('accuracy ≥ 95 %')")
    page.locator(f"#compare-table tr[data-job='{a.job_id}'] td.best-under a").click()
    page.wait_for_selector("body[data-page='candidate'][data-ready='1']")
