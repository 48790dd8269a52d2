"""Per-layer sensitivity: the rule agent's measured single moves over REST, the SDK and the page.

The state is a real rule agent's (``agents.rule.RuleAgent`` on ``agents.testing.SyntheticProblem``
over a real ResNet-20 search space), stored on a job as the search runner stores it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch

from agents import Objective
from agents.rule import RuleAgent
from agents.testing import SyntheticProblem
from compression import from_module, space_for
from compression.zoo import build_model
from db.models import Job
from modeltailor import Client
from tests.dashboard.conftest import goto, screenshot
from tests.dashboard.harness import Live, seed_job, seed_refs

OpenPage = Callable[..., Any]


@pytest.fixture(scope="module")
def rule_agent() -> RuleAgent:
    torch.manual_seed(0)
    net = build_model("resnet20", in_channels=1, image_size=8, num_classes=10)
    space = space_for(from_module(net, torch.randn(2, 1, 8, 8), name="resnet20"))
    problem = SyntheticProblem(space)
    agent = RuleAgent(space, Objective().with_dense(problem.dense_score()), seed=0)
    for _ in range(40):  # 160 candidates: the sweep, then single moves from the anchor
        policies = agent.ask(4)
        agent.tell(policies, [problem.score(p) for p in policies])
    assert agent.sensitivity is not None and agent.sensitivity.effects
    return agent


def _store_state(live: Live, job_id: int, agent: RuleAgent) -> None:
    with live.factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.agent_state = json.dumps(agent.state_dict()).encode()
        session.commit()


def test_sensitivity_lists_every_measured_move_cheapest_first(
    live: Live, open_page: OpenPage, rule_agent: RuleAgent
) -> None:
    refs = seed_refs(live.factory, live.tenant_id)
    job = seed_job(live.factory, live.tenant_id, n=50, algorithm="rule", seed=7, refs=refs)
    _store_state(live, job.job_id, rule_agent)
    other = seed_job(live.factory, live.tenant_id, n=20, algorithm="optuna-tpe", seed=8, refs=refs)
    headers = {"Authorization": f"Bearer {live.key}"}
    body = httpx.get(f"{live.url}/v1/jobs/{job.job_id}/sensitivity", headers=headers, timeout=30).json()

    sens = rule_agent.sensitivity
    assert sens is not None and sens.anchor is not None
    assert body["resource"] == "latency_ms"
    assert body["anchor"]["accuracy"] == pytest.approx(sens.anchor[1].accuracy)
    assert len(body["moves"]) == len(sens.effects)
    # each row is the agent's own measurement of one move
    measured = sorted((json.loads(k)[0], json.loads(k)[1], v[0], v[1]) for k, v in sens.effects.items())
    rows = sorted((r["kind"], r["target"], r["accuracy_delta"], r["resource_delta"]) for r in body["moves"])
    assert rows == measured
    for row in body["moves"]:
        if row["saves"]:
            assert row["resource_delta"] < 0
            assert row["cost"] == pytest.approx(
                max(0.0, -row["accuracy_delta"]) * 100 / -row["resource_delta"]
            )
    saving = [r for r in body["moves"] if r["saves"]]
    assert saving and [r["cost"] for r in saving] == sorted(r["cost"] for r in saving)
    assert body["moves"][: len(saving)] == saving  # the moves that save nothing come last
    assert all(r["cost"] is None for r in body["moves"][len(saving) :])
    assert Client(live.url, live.key).sensitivity(job.job_id) == body

    plain = httpx.get(f"{live.url}/v1/jobs/{other.job_id}/sensitivity", headers=headers, timeout=30).json()
    assert plain["moves"] == [] and "only the rule agent" in plain["note"]
    missing = httpx.get(f"{live.url}/v1/jobs/999999/sensitivity", headers=headers, timeout=30)
    assert missing.status_code == 404 and "not found" in missing.json()["detail"]

    page = open_page(live)
    goto(page, live, f"#/jobs/{job.job_id}")
    page.wait_for_selector("#sensitivity-card[data-state='ready']")
    card = page.locator("#sensitivity-card")
    assert card.get_attribute("data-moves") == str(len(body["moves"]))
    assert card.get_attribute("data-saving") == str(len(saving))
    page.wait_for_selector("#sensitivity-chart[data-bars]")
    labels = page.evaluate("() => document.querySelector('#sensitivity-chart').data[0].y")
    assert len(labels) == min(30, len(saving))
    assert labels[-1] == f"{saving[0]['target']} · {saving[0]['move']}"  # cheapest drawn at the top
    assert page.locator("#sensitivity-none li").count() == len(body["moves"]) - len(saving)
    screenshot(page, "job-sensitivity")

    goto(page, live, f"#/jobs/{other.job_id}")
    assert page.locator("#sensitivity-card").count() == 0  # only rule jobs measure it
