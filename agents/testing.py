"""The contract every agent passes, and a cheap synthetic-but-honest problem to test learning on.

Like ``optuna/testing``: each check takes an agent factory and a space, so every agent's
tests run the same suite (see ``tests/agents/test_contract.py``). The synthetic problem
scores a policy from the policy alone (no model run), in milliseconds, so a test can compare
agents over hundreds of candidates.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from agents.base import Agent
from agents.cost import MacsEstimator
from agents.objective import Objective, Score
from compression import schemes
from compression.policy import Policy
from compression.space import SearchSpace, SpaceOptions

AgentFactory = Callable[[SearchSpace, Objective, int], Agent]

RESTRICTED_OPTIONS: dict[str, SpaceOptions] = {
    "width-only": SpaceOptions(schemes=("dense",), bits=(None,), width=True, depth=False),
    "bits-only": SpaceOptions(schemes=("dense",), bits=(None, 8, 4), width=False, depth=False),
    "unstructured-only": SpaceOptions(schemes=("unstructured",), bits=(None,), width=False, depth=False),
    "nm-only": SpaceOptions(schemes=("nm",), bits=(None,), width=False, depth=False),
    "block-only": SpaceOptions(schemes=("block",), bits=(None,), width=False, depth=False),
    "depth-only": SpaceOptions(schemes=("dense",), bits=(None,), width=False, depth=True),
    "int8-no-float": SpaceOptions(schemes=("dense", "nm"), bits=(8,), width=True, depth=True),
    "width-round-to-4": SpaceOptions(
        schemes=("dense", "nm"), bits=(None, 8), width=True, depth=True, round_to=4
    ),
}


# --------------------------------------------------------------------------- the synthetic problem


class SyntheticProblem:
    """Accuracy and latency computed from a policy, with the structure real models have.

    Accuracy: dense accuracy minus per-layer damage; each layer has a hidden sensitivity (first
    and last layers are the most sensitive), damage grows with removed channels, zeroed weights
    (N:M and blocks hurt a little more than unstructured at equal sparsity) and fewer bits;
    skipping a block costs a fixed amount. Latency: a per-layer overhead plus MACs of the kept
    channels (fine-grained sparsity gains nothing; 8 bits is 20 % faster on layers with many
    MACs, slower on small ones), i.e. not the MACs estimate DDPG's action wall uses.
    """

    def __init__(self, space: SearchSpace, seed: int = 0, dense_accuracy: float = 0.95) -> None:
        self.space = space
        self.dense_accuracy = dense_accuracy
        rng = np.random.default_rng(seed)
        n = len(space.layers)
        self.sensitivity = rng.uniform(0.2, 1.0, n)
        self.sensitivity[0] *= 3.0
        self.sensitivity[-1] *= 3.0
        self.estimator = MacsEstimator(space)
        self.overhead_ms = 0.01
        self.ms_per_mac = 1.0 / max(self.estimator.total, 1.0)  # dense model: ~1 ms of compute
        self._big = self.estimator.dense >= np.median(self.estimator.dense)

    def score(self, policy: Policy) -> Score:
        """Score one policy (deterministic)."""
        macs = self.estimator.per_layer(policy)
        widths = self.estimator.out_width(policy)
        damage = 0.0
        latency = 0.0
        skipped = {n for b in self.space.blocks if b.name in policy.skip for n in b.layers}
        size = 0.0
        for i, ls in enumerate(self.space.layers):
            if ls.name in skipped:
                continue
            lp = policy.for_layer(ls.name)
            sparsity = lp.target_sparsity
            pattern = {"nm": 1.3, "block": 1.5}.get(lp.scheme, 1.0)
            bits_loss = 0.0 if lp.bits is None else ((8 - lp.bits) / 6.0) ** 2 * 0.5 + 0.002
            damage += self.sensitivity[i] * (
                0.05 * (1.0 - widths[i]) ** 2 + 0.04 * pattern * sparsity**3 + 0.03 * bits_loss
            )
            speed = 1.0 if lp.bits is None else (0.8 if self._big[i] else 1.15)
            latency += self.overhead_ms + macs[i] * self.ms_per_mac * speed
            size += (
                ls.features.params * widths[i] * (1.0 - sparsity) * (4 if lp.bits is None else lp.bits / 8)
            )
        damage += 0.04 * len(policy.skip)
        return Score(
            accuracy=float(max(0.0, self.dense_accuracy - damage)),
            latency_ms=float(latency),
            size_bytes=float(size),
            macs=float(macs.sum()),
        )

    def dense_score(self) -> Score:
        return self.score(Policy.dense())


def best_feasible_accuracy(
    factory: AgentFactory, space: SearchSpace, objective: Objective, seed: int, budget: int, batch: int = 4
) -> float:
    """Run one search on the synthetic problem; the best accuracy among feasible candidates (0 if none)."""
    problem = SyntheticProblem(space)
    agent = factory(space, objective, seed)
    best = 0.0
    for _ in range(budget // batch):
        policies = agent.ask(batch)
        scores = [problem.score(p) for p in policies]
        agent.tell(policies, scores)
        best = max([best, *(s.accuracy for s in scores if objective.feasible(s))])
    return best


def synthetic_objective(space: SearchSpace, latency_fraction: float) -> Objective:
    """Accuracy max / latency min with latency bounded at a fraction of the synthetic dense latency."""
    dense = SyntheticProblem(space).dense_score()
    return Objective(max_latency_ms=latency_fraction * dense.latency_ms, dense=dense)


# --------------------------------------------------------------------------- contract checks


def check_policy_in_space(space: SearchSpace, policy: Policy) -> None:
    """Fail unless every choice of ``policy`` is one the space allows (stricter than ``space.validate``)."""
    space.validate(policy)
    o = space.options
    assert not policy.skip or o.depth, f"skips {sorted(policy.skip)} with depth search off"
    assert policy.act_bits is None or 8 in o.bits, "activation bits without 8-bit in the space"
    for ls in space.layers:
        lp = policy.for_layer(ls.name)
        where = f"layer {ls.name}: {lp}"
        if o.width and ls.decides_width:
            assert o.min_width - 1e-9 <= lp.width <= 1.0, where
            n = ls.features.out_channels
            if o.round_to > 1 and lp.width < 1.0:
                kept = max(1, round(lp.width * n))
                assert kept % o.round_to == 0, (
                    f"{where} keeps {kept} of {n} channels, not a multiple of {o.round_to}"
                )
        else:
            assert lp.width == 1.0, f"{where} sets a width it does not decide"
        assert lp.scheme in ls.schemes, where
        assert lp.bits in ls.bits_choices, where
        assert lp.sparsity <= o.max_sparsity + 1e-9, where
        problem = schemes.get(lp.scheme).validate(lp, ls)  # its values among the layer's choices
        assert problem is None, f"{where}: {problem}"


def _drive(agent: Agent, problem: SyntheticProblem, rounds: int, n: int) -> list[list[Policy]]:
    asked = []
    for _ in range(rounds):
        policies = agent.ask(n)
        agent.tell(policies, [problem.score(p) for p in policies])
        asked.append(policies)
    return asked


def check_ask_returns_valid(factory: AgentFactory, space: SearchSpace, objective: Objective) -> None:
    """ask(n) returns n policies, all within the space, over several rounds."""
    agent = factory(space, objective, 0)
    problem = SyntheticProblem(space)
    for n in (1, 3, 5, 2, 4):
        policies = agent.ask(n)
        assert len(policies) == n, f"ask({n}) returned {len(policies)}"
        for p in policies:
            check_policy_in_space(space, p)
        agent.tell(policies, [problem.score(p) for p in policies])


def check_deterministic(
    factory: AgentFactory,
    space: SearchSpace,
    objective: Objective,
    rounds: int = 6,
    seed_matters: bool = True,
) -> None:
    """Same seed and same scores: same proposals; another seed: different ones (if the agent is random)."""
    problem = SyntheticProblem(space)
    a = _drive(factory(space, objective, 3), problem, rounds, 3)
    b = _drive(factory(space, objective, 3), problem, rounds, 3)
    assert a == b, "two agents with the same seed proposed different policies"
    if not seed_matters:
        return
    c = _drive(factory(space, objective, 4), problem, rounds, 3)
    assert a != c, "agents with different seeds proposed identical policies"


def check_resume(
    factory: AgentFactory,
    space: SearchSpace,
    objective: Objective,
    stop_after: int,
    rounds: int = 8,
    n: int = 3,
) -> None:
    """Stopped after ``stop_after`` tells and restored from JSON, an agent continues identically."""
    problem = SyntheticProblem(space)
    whole = factory(space, objective, 7)
    expected = _drive(whole, problem, rounds, n)
    first = factory(space, objective, 7)
    got = _drive(first, problem, stop_after, n)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = factory(space, objective, 7)
    resumed.load_state_dict(state)
    got += _drive(resumed, problem, rounds - stop_after, n)
    for i, (e, g) in enumerate(zip(expected, got, strict=True)):
        assert e == g, f"round {i} after resuming at {stop_after} differs from the uninterrupted run"


def check_survives_bad_scores(factory: AgentFactory, space: SearchSpace, objective: Objective) -> None:
    """Infeasible and failed scores are taken without error and the agent keeps proposing."""
    agent = factory(space, objective, 1)
    bound = replace(objective, max_latency_ms=1e-9, max_accuracy_drop=0.0)
    agent_bound = factory(space, bound, 1)
    for a in (agent, agent_bound):
        for _ in range(4):
            policies = a.ask(3)
            scores = [
                Score(accuracy=0.0, latency_ms=1e6, size_bytes=1e12, macs=1e12),
                Score.failed("apply raised PolicyError"),
                Score(accuracy=float("nan"), latency_ms=1.0, size_bytes=1.0, macs=1.0),
            ]
            a.tell(policies, scores)
        for p in a.ask(2):
            check_policy_in_space(space, p)


def check_contract(
    factory: AgentFactory, space: SearchSpace, objective: Objective, *, seed_matters: bool = True
) -> None:
    """Every check above, on one space (``seed_matters=False`` for deterministic agents such as rule)."""
    check_ask_returns_valid(factory, space, objective)
    check_deterministic(factory, space, objective, seed_matters=seed_matters)
    for stop in (1, 4):
        check_resume(factory, space, objective, stop)
    check_survives_bad_scores(factory, space, objective)
