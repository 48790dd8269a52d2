"""The search loop: real scores, no policy scored twice, budgets, resume without loss or duplicates."""

from __future__ import annotations

from typing import Any

from agents import Objective
from compression import CompressibleModel, SpaceOptions
from compression.apply import CompressedModel
from compression.data import Dataset
from compression.policy import Policy
from engine.device_latency import macs_proxy
from engine.search import Candidate, Progress, run_search


class CountingLatency:
    """The MACs proxy, counting how many models it was asked to time."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, cm: CompressedModel) -> float:
        self.calls += 1
        return macs_proxy(cm)


def test_search_scores_real_accuracy_and_builds_a_front(
    tiny_model: CompressibleModel, digits: Dataset
) -> None:
    latency = CountingLatency()
    seen: list[Candidate] = []
    result = run_search(
        tiny_model,
        digits,
        device_latency=latency,
        algorithm="random",
        budget_candidates=6,
        seed=0,
        objective=Objective(max_accuracy_drop=0.5),
        on_candidate=seen.append,
    )
    assert result.dense.score.accuracy > 0.8  # the tiny CNN really learned digits
    assert len(result.candidates) == 6 == len(seen)
    assert latency.calls == 7  # dense + six candidates, each once
    assert len({c.policy.hash for c in result.candidates}) == 6
    assert all(c.score.accuracy <= 1.0 and c.score.macs <= result.dense.score.macs for c in result.candidates)
    assert result.pareto and {c.index for c in result.pareto} <= {c.index for c in result.candidates}
    doc = result.to_dict()
    assert set(doc) >= {"dense", "candidates", "pareto"}
    assert set(doc["candidates"][0]) >= {"policy", "accuracy", "latency_ms", "size_bytes", "macs"}


def test_never_scores_a_policy_twice_and_stops_when_the_space_is_exhausted(
    tiny_model: CompressibleModel, digits: Dataset
) -> None:
    # Only bits of 3 layers, 2 choices each: at most 8 distinct policies exist.
    options = SpaceOptions(schemes=("dense",), bits=(None, 8), width=False, depth=False)
    latency = CountingLatency()
    result = run_search(
        tiny_model,
        digits,
        device_latency=latency,
        algorithm="random",
        budget_candidates=50,
        space_options=options,
        seed=1,
    )
    assert len(result.candidates) <= 8
    assert latency.calls == len(result.candidates) + 1
    assert result.stopped_because == "converged"


def test_resumed_search_continues_exactly(tiny_model: CompressibleModel, digits: Dataset) -> None:
    common: dict[str, Any] = {
        "device_latency": macs_proxy,
        "algorithm": "optuna-tpe",
        "seed": 3,
        "batch_size": 2,
        "agent_options": {"n_startup_trials": 2},
    }
    whole = run_search(tiny_model, digits, budget_candidates=8, **common)
    saved: list[dict[str, Any]] = []

    def save(p: Progress) -> None:
        saved.append(p.agent_state())

    first = run_search(tiny_model, digits, budget_candidates=4, on_progress=save, **common)
    previous = [Candidate.from_dict(c.to_dict()) for c in first.candidates]
    latency = CountingLatency()
    rest = run_search(
        tiny_model,
        digits,
        budget_candidates=8,
        agent_state=saved[-1],
        previous=previous,
        **{**common, "device_latency": latency},
    )
    assert [c.policy.hash for c in rest.candidates] == [c.policy.hash for c in whole.candidates]
    assert latency.calls == 1 + 4  # dense again, then only the four new candidates


def test_cancel_and_time_budget_stop_the_search(tiny_model: CompressibleModel, digits: Dataset) -> None:
    cancelled = run_search(
        tiny_model,
        digits,
        device_latency=macs_proxy,
        algorithm="rule",
        budget_candidates=20,
        should_stop=lambda: True,
    )
    assert cancelled.candidates == [] and cancelled.stopped_because == "cancelled"
    timed = run_search(
        tiny_model,
        digits,
        device_latency=macs_proxy,
        algorithm="rule",
        budget_candidates=20,
        budget_seconds=0.0,
    )
    assert timed.stopped_because == "time"


class CountingPredictor:
    """A real fitted predictor, counting the policies it was asked about."""

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor
        self.asked = 0

    def predict(self, space: Any, policies: Any) -> Any:
        self.asked += len(policies)
        return self.predictor.predict(space, policies)


def test_planning_agents_plan_with_the_device_predictor(
    tiny_model: CompressibleModel, digits: Dataset
) -> None:
    """DDPG's action wall and surrogate use the predictor the job scores latency with, not MACs."""
    from compression.space_builder import space_for
    from engine.device_latency import PredictedLatency
    from latency_models.predictors.baselines import MacsLinear
    from latency_models.testing import synthetic_records

    counting = CountingPredictor(MacsLinear().fit(synthetic_records(n_arch=6, per_arch=6)))
    latency = PredictedLatency(counting, space_for(tiny_model))  # type: ignore[arg-type]
    dense_ms = latency.of_policies([Policy.dense()])[0]
    result = run_search(
        tiny_model,
        digits,
        device_latency=latency,
        algorithm="ddpg",
        budget_candidates=6,
        seed=0,
        objective=Objective(max_latency_ms=0.7 * dense_ms),
    )
    assert len(result.candidates) == 6
    # the test (1) and the search (dense + 6 candidates) ask 8 times; without the wiring that
    # is all, with it the agent asks about the policies it imagines and walls
    assert counting.asked > 1 + 1 + 6
