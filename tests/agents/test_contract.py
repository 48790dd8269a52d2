"""Every agent passes the same contract on real spaces, and every learning agent beats random."""

from __future__ import annotations

import statistics
from typing import Any

import pytest

from agents import AGENTS, Agent, Objective, make
from agents.ddpg import DDPGConfig
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

# Small settings so learning starts within a test's budget; the algorithms are unchanged.
SMALL: dict[str, dict[str, Any]] = {
    "random": {},
    "rule": {},
    "optuna-tpe": {"n_startup_trials": 4},
    "optuna-nsga2": {"population_size": 6},
    "ddpg": {"config": DDPGConfig(warmup_episodes=4, batch_size=16, hidden=32)},
    "agmc": {"config": DDPGConfig(warmup_episodes=4, batch_size=16, hidden=32)},
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


# Within 64 candidates only these beat random reliably; NSGA-II ties it and DDPG / AGMC
# (AMC uses 100 warm-up + 300 learned episodes) trail it — see the closing notes of issue 4.
LEARNERS = ["rule", "optuna-tpe"]
SLOW_LEARNERS = ["optuna-nsga2", "ddpg", "agmc"]
BUDGET = 64
SEEDS = (0, 1, 2)


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
    assert got > random_baseline


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
