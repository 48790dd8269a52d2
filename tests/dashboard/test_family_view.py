"""A family job in the dashboard: its points linked on the front, a point's page linking its siblings.

The family is written through the db layer as a finished family job leaves it (the spec's
``family``, ``progress["family"]`` naming each point's policy hash); the page reads it through
``GET /v1/jobs/{id}/family`` like any client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from sqlalchemy import select

from db.models import Candidate, Job
from tests.dashboard.conftest import goto, screenshot
from tests.dashboard.harness import Live, seed_job

OpenPage = Callable[..., Any]
BUDGETS = [1.0, 0.6, 0.35]
FAMILY_IDS = "() => document.querySelector('#scatter').data.find(t => t.name.startsWith('family')).customdata"


def _make_family(live: Live, job_id: int, ids: list[int]) -> None:
    """Mark ``ids`` (budget order) as the job's family points, as engine.family_job does."""
    with live.factory() as session:
        hashes = dict(
            session.execute(select(Candidate.id, Candidate.policy_hash).where(Candidate.id.in_(ids))).all()
        )
        job = session.get(Job, job_id)
        assert job is not None
        job.spec = {**job.spec, "algorithm": "rule", "family": {"budgets": BUDGETS}}
        points = [
            {"k": k, "budget": b, "policy_hash": hashes[i], "target_ms": 1.0 * b}
            for k, (b, i) in enumerate(zip(BUDGETS, ids, strict=True))
        ]
        job.progress = {**job.progress, "family": {"points": points, "dense_latency_ms": 1.0}}
        session.commit()


def test_family_points_are_linked_on_the_front_and_each_page_links_its_siblings(
    live: Live, open_page: OpenPage
) -> None:
    job = seed_job(live.factory, live.tenant_id, n=80, algorithm="rule", seed=4)
    by_id = {r[0]: r for r in job.rows}
    front = sorted(job.front, key=lambda i: -by_id[i][2])  # slowest (most accurate) first
    ids = [front[0], front[len(front) // 2], front[-1]]
    _make_family(live, job.job_id, ids)
    body = httpx.get(
        f"{live.url}/v1/jobs/{job.job_id}/family", headers={"Authorization": f"Bearer {live.key}"}, timeout=30
    ).json()
    assert [p["candidate_id"] for p in body["points"]] == ids

    page = open_page(live)
    goto(page, live, f"#/jobs/{job.job_id}")
    page.wait_for_selector("#scatter[data-family-count='3']")
    assert [int(i) for i in page.evaluate(FAMILY_IDS)] == ids  # linked in budget order
    note = page.inner_text("#family-note")
    assert "3 nested operating points" in note and "35 %" in note
    page.click(".tabs button[data-metric='size_bytes']")  # front points carry their sizes: drawn there too
    page.wait_for_selector("#scatter[data-view='size_bytes'][data-family-count='3']")
    screenshot(page, "job-family")

    goto(page, live, f"#/candidates/{ids[1]}")
    card = page.inner_text("#family-card")
    assert "Family point 2 of 3" in card and "(this candidate)" in card
    siblings = [
        int(a.get_attribute("data-sibling")) for a in page.locator("#family-card a[data-sibling]").all()
    ]
    assert siblings == [ids[0], ids[2]]
    page.click(f"#family-card a[data-sibling='{ids[2]}']")
    page.wait_for_function(
        f"() => location.hash === '#/candidates/{ids[2]}' && document.body.dataset.ready === '1'"
    )
    page.wait_for_selector("#family-card")
    assert "Family point 3 of 3" in page.inner_text("#family-card")

    other = next(i for i in by_id if i not in ids)
    goto(page, live, f"#/candidates/{other}")
    assert page.locator("#family-card").count() == 0  # not a point of the family
