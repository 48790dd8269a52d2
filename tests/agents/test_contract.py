"""Every agent passes the same contract on real spaces, and the learning agents beat random."""

from __future__ import annotations

import statistics
from typing import Any

import pytest

from agents import AGENTS, Agent, Objective, make
from agents.ddpg.dyna import DynaConfig
from agents.objective import hypervolume_2d
from agents.testing import (
    RESTRICTED_OPTIONS,
    AgentFactory,
    SyntheticProblem,
    best_feasible_accuracy,
    check_ask_returns_valid,
    check_contract,
    check_policy_in_space,
    check_resume,
    synthetic_objective,
)
from compression import CompressibleModel, SearchSpace, space_for

SMALL_DYNA = DynaConfig(batch_size=16, hidden=32, candidates=16, imagined_episodes=8, latency_samples=48)
# Small settings so learning starts within a test's budget; the algorithms are unchanged.
SMALL: dict[str, dict[str, Any]] = {
    "random": {},
    "rule": {},
    "optuna-tpe": {"n_startup_trials": 4},
    "optuna-nsga2": {"population_size": 6},
    "ddpg": {"config": SMALL_DYNA},
    "agmc": {"config": SMALL_DYNA},
}


def factory(name: str, **extra: Any) -> AgentFactory:
    def build(space: SearchSpace, objective: Objective, seed: int) -> Agent:
        return make(name, space, objective, seed, **{**SMALL[name], **extra})

    return build


def test_registry_knows_every_agent_and_rejects_others(fancy_space: SearchSpace) -> None:
    assert set(AGENTS) == set(SMALL)
    with pytest.raises(ValueError, match="random, optuna-tpe, optuna-nsga2, ddpg, agmc, rule"):
        make("amc", fancy_space, Objective())


@pytest.mark.parametrize("name", list(SMALL))
def test_contract_on_fancy_model(name: str, fancy_space: SearchSpace) -> None:
    check_contract(
        factory(name), fancy_space, synthetic_objective(fancy_space, 0.5), seed_matters=name != "rule"
    )


@pytest.mark.parametrize("name", list(SMALL))
def test_contract_on_resnet20_with_blocks(name: str, resnet_space: SearchSpace) -> None:
    assert resnet_space.blocks, "ResNet-20 must offer skippable blocks for this test to mean anything"
    objective = Objective()  # unconstrained: the -error*log(resource) reward path
    check_ask_returns_valid(factory(name), resnet_space, objective)
    check_resume(factory(name), resnet_space, objective, stop_after=6, rounds=8)


@pytest.mark.parametrize("restriction", list(RESTRICTED_OPTIONS))
@pytest.mark.parametrize("name", list(SMALL))
def test_respects_restricted_space(name: str, restriction: str, fancy_model: CompressibleModel) -> None:
    space = space_for(fancy_model, RESTRICTED_OPTIONS[restriction])
    check_ask_returns_valid(factory(name), space, synthetic_objective(space, 0.6))


def test_restricted_space_check_catches_a_foreign_choice(fancy_model: CompressibleModel) -> None:
    # The contract's own checker must fail on a policy outside a restricted space.
    wide = space_for(fancy_model)
    narrow = space_for(fancy_model, RESTRICTED_OPTIONS["bits-only"])
    import random

    policy = next(p for p in (wide.sample(random.Random(i)) for i in range(20)) if p != p.dense())
    with pytest.raises(AssertionError):
        check_policy_in_space(narrow, policy)


def test_synthetic_problem_is_honest(resnet_space: SearchSpace) -> None:
    problem = SyntheticProblem(resnet_space)
    dense = problem.dense_score()
    import random

    rng = random.Random(0)
    for _ in range(20):
        s = problem.score(resnet_space.sample(rng))
        assert s.accuracy < dense.accuracy
    # Fine-grained sparsity alone saves no latency (dense runtimes), only accuracy.
    from compression.policy import LayerPolicy, Policy

    sparse = Policy(default=LayerPolicy(scheme="unstructured", sparsity=0.5))
    assert problem.score(sparse).latency_ms == pytest.approx(dense.latency_ms)


# Within 64 candidates these beat random on the constrained synthetic problem (median of three
# fixed seeds, by a margin); NSGA-II ties it. DDPG and AGMC do since their warm start (prior at
# the budget's uniform width), per-episode budgets and self-imitation -- see the issue 4 notes.
LEARNERS = ["rule", "optuna-tpe", "ddpg", "agmc"]
SLOW_LEARNERS = ["optuna-nsga2"]
BUDGET = 64
SEEDS = (0, 1, 2)
MARGIN = {"rule": 0.0, "optuna-tpe": 0.0, "ddpg": 0.01, "agmc": 0.01}


@pytest.fixture(scope="module")
def random_baseline(resnet_space: SearchSpace) -> float:
    objective = synthetic_objective(resnet_space, 0.35)
    return statistics.median(
        best_feasible_accuracy(factory("random"), resnet_space, objective, s, BUDGET) for s in SEEDS
    )


@pytest.mark.parametrize("name", LEARNERS)
def test_learning_agent_beats_random(name: str, resnet_space: SearchSpace, random_baseline: float) -> None:
    objective = synthetic_objective(resnet_space, 0.35)
    got = statistics.median(
        best_feasible_accuracy(factory(name), resnet_space, objective, s, BUDGET) for s in SEEDS
    )
    print(f"{name}: median best feasible accuracy {got:.4f} vs random {random_baseline:.4f}")
    assert got > random_baseline + MARGIN[name]


@pytest.mark.parametrize("name", SLOW_LEARNERS)
def test_slow_learner_finds_feasible_policies_near_random(
    name: str, resnet_space: SearchSpace, random_baseline: float
) -> None:
    """Not yet better than random at this budget, but a working search: within 15 % of it."""
    objective = synthetic_objective(resnet_space, 0.35)
    got = statistics.median(
        best_feasible_accuracy(factory(name), resnet_space, objective, s, BUDGET) for s in SEEDS
    )
    assert got > 0.85 * random_baseline


HV_BUDGET = 48


def front_hypervolume(name: str, space: SearchSpace, seed: int) -> float:
    """Unconstrained search on the synthetic problem: hypervolume of the (accuracy, latency) front."""
    problem = SyntheticProblem(space)
    dense = problem.dense_score()
    agent = factory(name)(space, Objective().with_dense(dense), seed)
    found = []
    for _ in range(HV_BUDGET // 4):
        policies = agent.ask(4)
        scores = [problem.score(p) for p in policies]
        agent.tell(policies, scores)
        found += [(s.accuracy, s.latency_ms) for s in scores]
    return hypervolume_2d(found, (dense.accuracy - 0.10, dense.latency_ms))


@pytest.mark.parametrize("name", ["ddpg", "agmc", "rule"])
def test_learning_agents_beat_random_on_the_front(name: str, resnet_space: SearchSpace) -> None:
    """Without a constraint, DDPG / AGMC / rule cover the accuracy-latency front better than random."""
    rand = statistics.mean(front_hypervolume("random", resnet_space, s) for s in (0, 1))
    got = statistics.mean(front_hypervolume(name, resnet_space, s) for s in (0, 1))
    print(f"{name}: hypervolume {got:.5f} vs random {rand:.5f}")
    assert got > 1.5 * rand + 0.005


def test_rule_agent_spreads_along_the_front_without_a_limit(resnet_space: SearchSpace) -> None:
    """No resource limit: the rule agent keeps a Pareto front and steps from each member, so its
    proposals cover many latencies instead of converging on one trade-off."""
    from agents.rule import RuleAgent

    problem = SyntheticProblem(resnet_space)
    dense = problem.dense_score()
    agent = RuleAgent(resnet_space, Objective().with_dense(dense), seed=0)
    for _ in range(HV_BUDGET // 4):
        policies = agent.ask(4)
        agent.tell(policies, [problem.score(p) for p in policies])
    latencies = sorted(s.latency_ms / dense.latency_ms for _, s in agent.front)
    assert len(latencies) >= 4, latencies
    assert latencies[-1] - latencies[0] > 0.3, latencies
    # Restored from its state it continues exactly (front and cursor included).
    clone = RuleAgent(resnet_space, Objective().with_dense(dense), seed=0)
    clone.load_state_dict(agent.state_dict())
    assert [p.hash for p in clone.ask(4)] == [p.hash for p in agent.ask(4)]
