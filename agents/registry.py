"""Agents by name: the one place the service, the CLI and the benchmarks build them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agents.agmc import AGMCAgent, DynaAGMCAgent
from agents.base import Agent
from agents.cost import MacsEstimator
from agents.ddpg.agent import DDPGAgent
from agents.ddpg.dyna import DynaDDPGAgent
from agents.objective import Objective
from agents.optuna_agents import OptunaAgent
from agents.random_agent import RandomAgent
from agents.rule import RuleAgent
from compression.space import SearchSpace


def _amc_budget(space: SearchSpace, objective: Objective, kw: dict[str, Any]) -> dict[str, Any]:
    """The action wall's default: a latency bound turned into a MACs-fraction budget.

    Latency is taken as proportional to MACs for the wall only (width changes both alike);
    the real latency of every candidate is still measured or predicted, and a candidate
    over the bound is penalised in the reward.
    """
    if "cost_fn" in kw or objective.max_latency_ms is None or objective.dense is None:
        return kw
    if objective.dense.latency_ms <= 0:
        return kw
    budget = objective.max_latency_ms / objective.dense.latency_ms
    return {**kw, "cost_fn": MacsEstimator(space).fraction, "budget": budget}


def _ddpg(space: SearchSpace, objective: Objective, seed: int, **kw: Any) -> Agent:
    """Model-based DDPG (``agents.ddpg.dyna``); ``latency_fn`` = the device's batch latency."""
    return DynaDDPGAgent(space, objective, seed, **kw)


def _agmc(space: SearchSpace, objective: Objective, seed: int, **kw: Any) -> Agent:
    return DynaAGMCAgent(space, objective, seed, **kw)


def classic_ddpg(space: SearchSpace, objective: Objective, seed: int = 0, **kw: Any) -> Agent:
    """The model-free AMC agent with its MACs wall (before issue 14), for comparisons."""
    return DDPGAgent(space, objective, seed, **_amc_budget(space, objective, kw))


def classic_agmc(space: SearchSpace, objective: Objective, seed: int = 0, **kw: Any) -> Agent:
    """The model-free AGMC agent (GCN over prunable layers only), for comparisons."""
    return AGMCAgent(space, objective, seed, **_amc_budget(space, objective, kw))


#: Agents that take the device's latency function (``latency_fn``: a batch of policies ->
#: latencies); the search loop passes its predictor to these.
TAKES_LATENCY_FN = frozenset({"ddpg", "agmc"})


AGENTS: dict[str, Callable[..., Agent]] = {
    "random": RandomAgent,
    "optuna-tpe": lambda space, objective, seed, **kw: OptunaAgent(
        space, objective, seed, sampler="tpe", **kw
    ),
    "optuna-nsga2": lambda space, objective, seed, **kw: OptunaAgent(
        space, objective, seed, sampler="nsga2", **kw
    ),
    "ddpg": _ddpg,
    "agmc": _agmc,
    "rule": RuleAgent,
}


def make(name: str, space: SearchSpace, objective: Objective, seed: int = 0, **kw: Any) -> Agent:
    """Build agent ``name`` for ``space`` and ``objective``; ``kw`` goes to its constructor.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        factory = AGENTS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose one of: {', '.join(AGENTS)}") from None
    return factory(space, objective, seed, **kw)
