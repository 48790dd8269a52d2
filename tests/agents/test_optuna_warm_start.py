"""Optuna agents start from the rule agent's sweep, and policies map to Optuna parameters and back."""

from __future__ import annotations

import random

import pytest

from agents import Objective, make
from agents.optuna_space import from_policy, to_policy
from agents.rule import rule_sweep
from agents.testing import SyntheticProblem
from compression.space import SearchSpace


def test_from_policy_inverts_to_policy(resnet_space: SearchSpace) -> None:
    rng = random.Random(0)
    for _ in range(30):
        policy = resnet_space.sample(rng)
        assert to_policy(resnet_space, from_policy(resnet_space, policy)) == policy


@pytest.mark.parametrize("name", ["optuna-tpe", "optuna-nsga2"])
def test_optuna_agents_begin_with_the_rule_sweep(name: str, resnet_space: SearchSpace) -> None:
    problem = SyntheticProblem(resnet_space)
    objective = Objective().with_dense(problem.dense_score())
    sweep = [p.hash for p in rule_sweep(resnet_space, objective, seed=3)]
    agent = make(name, resnet_space, objective, 3)
    asked = agent.ask(len(sweep) + 2)
    assert [p.hash for p in asked[: len(sweep)]] == sweep
    cold = make(name, resnet_space, objective, 3, warm_start=False)
    assert {p.hash for p in cold.ask(len(sweep))}.isdisjoint(sweep)
    # The warm start lives in the study: a restored agent continues after it, not from it again.
    agent.tell(asked, [problem.score(p) for p in asked])
    clone = make(name, resnet_space, objective, 3)
    clone.load_state_dict(agent.state_dict())
    assert [p.hash for p in clone.ask(3)] == [p.hash for p in agent.ask(3)]
