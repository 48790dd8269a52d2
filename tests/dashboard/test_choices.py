"""Search insight: per-layer choices of a job's candidates as parallel coordinates coloured by accuracy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from service.auth import create_tenant
from tests.dashboard.conftest import goto, screenshot
from tests.dashboard.harness import LAYERS, Live, seed_job

OpenPage = Callable[..., Any]


def get(live: Live, path: str, key: str | None = None, **params: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or live.key}"}
    return httpx.get(f"{live.url}{path}", headers=headers, params=params, timeout=60)  # type: ignore[arg-type]


def kept_width(policy: dict[str, Any], layer: str) -> float:
    """What the policy keeps of ``layer`` (0 in a skipped block), read the plain way."""
    if any(layer.startswith(f"{block}.") for block in policy["skip"]):
        return 0.0
    return float({**policy["default"], **policy["layers"].get(layer, {})}["width"])


def test_choices_are_the_policies_widths(live: Live) -> None:
    job = seed_job(live.factory, live.tenant_id, n=900)
    body = get(live, f"/v1/jobs/{job.job_id}/choices", max_points=200).json()
    front = [p["id"] for p in get(live, f"/v1/jobs/{job.job_id}/pareto", fold="true").json()["data"]]
    assert body["id"][: len(front)] == front and body["on_front"] == [
        i < len(front) for i in range(len(body["id"]))
    ]
    assert len(body["id"]) <= len(front) + 200 and body["total"] == 900
    rows = {c["id"]: c for c in get(live, f"/v1/jobs/{job.job_id}/candidates", limit=1000).json()["data"]}
    shown = [rows[i] for i in body["id"]]
    varying = [name for name in LAYERS if len({kept_width(c["policy"], name) for c in shown}) > 1]
    assert body["layers"] == varying and varying
    for c, widths, acc in zip(shown, body["width"], body["accuracy"], strict=True):
        assert widths == [kept_width(c["policy"], name) for name in varying]
        assert acc == c["accuracy"]
    with live.factory() as session:
        _tenant, other = create_tenant(session, name="other")
    assert get(live, f"/v1/jobs/{job.job_id}/choices", key=other).status_code == 404


def test_parallel_coordinates_in_the_job_page(live: Live, open_page: OpenPage) -> None:
    job = seed_job(live.factory, live.tenant_id, n=600)
    body = get(live, f"/v1/jobs/{job.job_id}/choices").json()
    page = open_page(live)
    goto(page, live, f"#/jobs/{job.job_id}")
    assert not page.locator("#choices-chart").is_visible()  # drawn on request: the first view stays fast
    page.click("#choices-button")
    page.wait_for_selector("#choices-chart[data-lines]")
    chart = page.locator("#choices-chart")
    assert chart.get_attribute("data-lines") == str(sum(a is not None for a in body["accuracy"]))
    assert chart.get_attribute("data-axes") == str(len(body["layers"]))
    ticks = page.evaluate("() => document.querySelector('#choices-chart').layout.xaxis.ticktext")
    assert ticks == body["layers"]
    screenshot(page, "job-choices")
