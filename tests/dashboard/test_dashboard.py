"""The dashboard in a real browser (headless Chromium via Playwright) against a real server.

Results are written through the db layer (the search runner is not what is under test);
every page is loaded, its numbers checked against the API, and screenshotted into
test-artifacts/.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.dashboard.conftest import goto, screenshot
from tests.dashboard.harness import (
    LAYERS,
    Live,
    add_candidates,
    add_event,
    expected_fold,
    expected_front,
    seed_device_data,
    seed_job,
    seed_refs,
    set_status,
)

OpenPage = Callable[..., Any]


def api(live: Live, path: str) -> Any:
    response = httpx.get(f"{live.url}{path}", headers={"Authorization": f"Bearer {live.key}"}, timeout=30)
    response.raise_for_status()
    return response.json()


FRONT_IDS = "() => document.querySelector('#scatter').data.find(t => t.name === 'Pareto front').customdata"


def front_trace_len(page: Any) -> int:
    """Points in the plotted front trace, read from plotly's own data (gd.data)."""
    return int(
        page.evaluate(
            "() => document.querySelector('#scatter').data"
            ".find(t => t.name.startsWith('Pareto front')).x.length"
        )
    )


def test_sign_in_then_jobs_list(live: Live, open_page: OpenPage) -> None:
    refs = seed_refs(live.factory, live.tenant_id)
    done = seed_job(live.factory, live.tenant_id, n=120, refs=refs)
    running = seed_job(
        live.factory, live.tenant_id, n=40, status="running", algorithm="ddpg", seed=1, refs=refs
    )
    page = open_page(live, signed_in=False)
    goto(page, live, "")
    assert page.locator("#login-form").is_visible()
    page.fill("#api-key", "mt_not-a-key")
    page.click("#login-form button")
    page.wait_for_selector("#login-error:not([hidden])")
    assert "not accepted" in page.inner_text("#login-error")
    page.fill("#api-key", live.key)
    page.click("#login-form button")
    page.wait_for_selector("#jobs-table")
    rows = page.locator("#jobs-table tbody tr")
    assert rows.count() == 2
    assert rows.nth(0).get_attribute("data-job") == str(running.job_id)  # newest first
    assert "running" in rows.nth(0).inner_text().lower() and "ddpg" in rows.nth(0).inner_text()
    assert "succeeded" in rows.nth(1).inner_text().lower() and "cpu-ort-1t" in rows.nth(1).inner_text()
    best = api(live, f"/v1/jobs/{done.job_id}")["best"][0]
    page.wait_for_function(
        f"document.querySelector('[data-best=\"{done.job_id}\"]').textContent.includes('@')"
    )
    assert f"{100 * best['accuracy']:.2f} %" in page.inner_text(f"[data-best='{done.job_id}']")
    assert page.evaluate("sessionStorage.getItem('modeltailor.apiKey')") == live.key
    screenshot(page, "jobs")
    rows.nth(1).click()
    page.wait_for_selector("#scatter[data-front-count]")
    assert page.url.endswith(f"#/jobs/{done.job_id}")


def test_job_page_draws_the_whole_front_and_opens_a_candidate(live: Live, open_page: OpenPage) -> None:
    job = seed_job(live.factory, live.tenant_id, n=3000)
    pareto = api(live, f"/v1/jobs/{job.job_id}/pareto")
    assert {c["id"] for c in pareto["data"]} == job.front and len(job.front) >= 10
    page = open_page(live)
    goto(page, live, f"#/jobs/{job.job_id}")
    scatter = page.locator("#scatter")
    folded = job.folded_front  # points equal within resolution are one front point
    assert scatter.get_attribute("data-front-count") == str(len(folded))
    assert front_trace_len(page) == len(folded)
    assert scatter.get_attribute("data-total") == "3000"
    assert page.locator("#front-table tbody tr[data-rep-row]").count() == len(folded)
    assert page.locator("#front-table tbody tr").count() == len(job.front)  # duplicates folded, hidden
    # both constraints (latency ≤ 2.5 ms, accuracy drop ≤ 8 %) are drawn as lines
    shapes = page.evaluate("() => document.querySelector('#scatter').layout.shapes.map(s => [s.x0, s.y0])")
    assert [2.5, 0] in shapes and any(abs(y - 0.91) < 1e-9 for _x, y in shapes)
    assert page.evaluate("() => document.querySelector('#scatter').data[0].type") == "scatter"
    screenshot(page, "job")
    page.click(".tabs button[data-metric='size_bytes']")
    page.wait_for_selector("#scatter[data-view='size_bytes']")
    size_front = api(live, f"/v1/jobs/{job.job_id}/scatter")["size_front_ids"]
    assert scatter.get_attribute("data-front-count") == str(len(size_front))
    screenshot(page, "job-size")
    first = page.locator("#front-table tbody tr").first
    target = first.get_attribute("data-href")
    first.click()
    page.wait_for_selector("body[data-page='candidate'][data-ready='1']")
    assert page.url.endswith(target)


def test_clicking_a_point_opens_its_candidate(live: Live, open_page: OpenPage) -> None:
    job = seed_job(live.factory, live.tenant_id, n=200)
    page = open_page(live)
    goto(page, live, f"#/jobs/{job.job_id}")
    # hover + click where plotly drew the first front point
    box = page.evaluate(
        """() => {
          const gd = document.querySelector('#scatter');
          const t = gd.data.find(t => t.name === 'Pareto front');
          const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
          const r = gd.querySelector('.nsewdrag').getBoundingClientRect();
          return {x: r.left + xa.l2p(t.x[0]), y: r.top + ya.l2p(t.y[0]), id: t.customdata[0]};
        }"""
    )
    page.mouse.move(box["x"], box["y"])
    page.mouse.click(box["x"], box["y"])
    page.wait_for_url(f"**#/candidates/{box['id']}")
    page.wait_for_selector("body[data-page='candidate'][data-ready='1']")


def test_candidate_page_and_a_failed_export(live: Live, open_page: OpenPage) -> None:
    job = seed_job(live.factory, live.tenant_id, n=300)
    candidates = api(live, f"/v1/jobs/{job.job_id}/candidates?limit=300")["data"]
    chosen = next(c for c in candidates if c["policy"]["skip"] and c["policy"]["layers"])
    page = open_page(live)
    goto(page, live, f"#/candidates/{chosen['id']}")
    chart = page.locator("#layer-chart")
    assert chart.get_attribute("data-layers") == str(len(LAYERS))
    skipped_convs = 2 * len(chosen["policy"]["skip"])  # two convs per residual block
    assert chart.get_attribute("data-skipped") == str(skipped_convs)
    assert page.locator("#layer-table tbody tr").count() == len(LAYERS)
    name, spec = next(iter(chosen["policy"]["layers"].items()))
    row = page.locator("#layer-table tbody tr", has=page.locator(f"td:text-is('{name}')"))
    if not any(name.startswith(f"{b}.") for b in chosen["policy"]["skip"]):
        assert f"{spec['width']:.2f}" in row.inner_text()
    assert f"{100 * chosen['accuracy']:.2f} %" in page.inner_text("main")
    page.click("#export-button")
    page.wait_for_selector("#export-result[data-status='failed']")
    assert "the device cpu-ort-1t did not answer within 60 s" in page.inner_text("#export-error")
    artifact_id = int(page.inner_text("#export-result dd").split("·")[0].strip().lstrip("#"))
    assert api(live, f"/v1/artifacts/{artifact_id}")["status"] == "failed"
    screenshot(page, "candidate-export-failed")


def test_export_that_succeeds_shows_its_proof_and_downloads(
    live_exporting: Live, open_page: OpenPage
) -> None:
    live = live_exporting
    job = seed_job(live.factory, live.tenant_id, n=100)
    cid = sorted(job.front)[0]
    page = open_page(live)
    goto(page, live, f"#/candidates/{cid}")
    page.check("#export-int8")
    page.click("#export-button")
    page.wait_for_selector("#export-result[data-status='ready']")
    text = page.inner_text("#export-result")
    assert "2.00×" in text and "1.250 ms" in text and "97.12 %" in text and "int8" in text
    bars = page.evaluate("() => document.querySelector('#latency-chart').data[0].y")
    assert "measured (export)" in bars
    screenshot(page, "candidate")
    with page.expect_download() as download:
        page.click("#download")
    assert Path(download.value.path()).read_bytes() == b"onnx-model-of-candidate"


def test_export_refused_by_the_server_is_shown(live: Live, open_page: OpenPage) -> None:
    job = seed_job(live.factory, live.tenant_id, n=20)
    page = open_page(live)
    goto(page, live, f"#/candidates/{job.candidate_ids[0]}")
    page.fill("#export-epochs", "1000")  # the API allows at most 100
    page.click("#export-button")
    page.wait_for_selector("#export-result[data-status='error']")
    assert "422" in page.inner_text("#export-error") and "finetune_epochs" in page.inner_text("#export-error")


def test_devices_page_shows_measurements_and_the_predictor(live: Live, open_page: OpenPage) -> None:
    refs = seed_refs(live.factory, live.tenant_id)
    metrics = seed_device_data(live.factory, live.tenant_id, refs[2])
    page = open_page(live)
    goto(page, live, "#/devices")
    from latency_models.devices import BUILTIN_DEVICES

    assert page.locator("#devices-table tbody tr").count() == len(BUILTIN_DEVICES)
    page.locator("#devices-table tr", has_text="cpu-ort-1t").click()
    page.wait_for_selector("#predictor-chart[data-points]")
    pairs = metrics["holdout"]
    in_band = sum(
        abs(p - m) <= 0.1 * m for m, p in zip(pairs["measured_ms"], pairs["predicted_ms"], strict=True)
    )
    chart = page.locator("#predictor-chart")
    assert chart.get_attribute("data-points") == "60"
    assert chart.get_attribute("data-in-band") == str(in_band)
    assert page.inner_text("#measurement-count") == "80"
    assert page.locator("#measurement-chart").get_attribute("data-points") == "79"
    table = page.inner_text("#predictor-table")
    assert "v2" in table and "v1" in table and f"{100 * metrics['within_10pct']:.1f} %" in table
    band = page.evaluate("() => document.querySelector('#predictor-chart').data[0].name")
    assert band == "±10 %"
    screenshot(page, "devices")


def test_running_job_updates_live(live: Live, open_page: OpenPage) -> None:
    job = seed_job(live.factory, live.tenant_id, n=150, status="running")
    page = open_page(live)
    goto(page, live, f"#/jobs/{job.job_id}")
    assert page.locator("#job-live .live").is_visible()
    assert page.locator("#scatter").get_attribute("data-front-count") == str(len(job.folded_front))
    added = add_candidates(live.factory, job.job_id, n=150, seed=99, boost=0.004)
    add_event(live.factory, job.job_id, "progress", {"done": 300, "total": 300})
    new_front = expected_front(job.rows + added)
    assert new_front != job.front
    folded = expected_fold(job.rows + added, new_front)
    page.wait_for_selector(f"#scatter[data-front-count='{len(folded)}']", timeout=15_000)
    assert {int(i) for i in page.evaluate(FRONT_IDS)} == set(folded)
    assert page.locator("#scatter").get_attribute("data-total") == "300"
    set_status(live.factory, job.job_id, "succeeded")
    page.wait_for_selector(".page-head .badge.succeeded", timeout=15_000)
    assert page.locator("#job-live .live").count() == 0


def test_fifty_thousand_candidates_render_the_front_and_a_bounded_sample(
    live: Live, open_page: OpenPage
) -> None:
    # How fast it renders is a figure of bench/dashboard.py (bench/RESULTS.md), not a timed test.
    job = seed_job(live.factory, live.tenant_id, n=50_000)
    small = seed_job(live.factory, live.tenant_id, n=10, seed=5)
    page = open_page(live)
    goto(page, live, f"#/jobs/{small.job_id}")  # plotly.js loaded and parsed once, as for any user
    page.evaluate(f"location.hash = '#/jobs/{job.job_id}'")
    page.wait_for_selector(f"#scatter[data-total='50000'][data-front-count='{len(job.folded_front)}']")
    assert int(page.locator("#scatter").get_attribute("data-shown") or 0) <= 4000 + 2 * len(job.front)
    screenshot(page, "job-50k")
