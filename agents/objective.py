"""What a search optimises: metrics with directions, hard constraints, and what a candidate scored.

An agent sees a candidate only through :class:`Score` and judges it only through
:class:`Objective`, so every agent ranks candidates the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, TypeVar

Metric = Literal["accuracy", "latency_ms", "size_bytes", "macs"]
METRICS: tuple[Metric, ...] = ("accuracy", "latency_ms", "size_bytes", "macs")
Direction = Literal["max", "min"]
T = TypeVar("T")

# Rewards of infeasible or failed candidates lie below every feasible reward.
INFEASIBLE_REWARD = -2.0


@dataclass(frozen=True)
class Score:
    """What one candidate policy scored.

    Attributes:
        accuracy: top-1 on the validation subset, in [0, 1].
        latency_ms: latency on the target device (predicted, or measured until predictors exist).
        size_bytes / macs: stored size and dense multiply-accumulates of the compressed model.
        measured_latency_ms: latency measured on the real device, when it was.
        eval_seconds: wall time spent scoring.
        error: why scoring failed (the other fields are then meaningless).
    """

    accuracy: float
    latency_ms: float
    size_bytes: float
    macs: float
    measured_latency_ms: float | None = None
    eval_seconds: float = 0.0
    error: str | None = None

    @classmethod
    def failed(cls, error: str) -> Score:
        """A score for a candidate that could not be evaluated."""
        return cls(accuracy=0.0, latency_ms=0.0, size_bytes=0.0, macs=0.0, error=error)

    @property
    def ok(self) -> bool:
        return self.error is None and all(
            math.isfinite(v) for v in (self.accuracy, self.latency_ms, self.size_bytes, self.macs)
        )

    def get(self, metric: Metric) -> float:
        return float(getattr(self, metric))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Score:
        return cls(**dict(raw))


@dataclass(frozen=True)
class Goal:
    """One metric to optimise and its direction."""

    metric: Metric
    direction: Direction

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; use one of {METRICS}")
        if self.direction not in ("max", "min"):
            raise ValueError(f"direction must be 'max' or 'min', got {self.direction!r}")


@dataclass(frozen=True)
class Objective:
    """Metrics to optimise plus hard constraints.

    Attributes:
        goals: metrics with directions; the first minimised one is "the resource".
        max_latency_ms / max_size_bytes: hard upper bounds.
        max_accuracy_drop: largest allowed ``dense_accuracy - accuracy`` (absolute, 0.01 = 1 point).
        dense: the uncompressed model's score, filled in by the search loop once it is scored;
            the accuracy-drop constraint needs it, rewards are taken relative to it, and agents
            that budget latency through a cheap estimate read the dense latency from it.
    """

    goals: tuple[Goal, ...] = (Goal("accuracy", "max"), Goal("latency_ms", "min"))
    max_latency_ms: float | None = None
    max_accuracy_drop: float | None = None
    max_size_bytes: float | None = None
    dense: Score | None = None

    def __post_init__(self) -> None:
        if not self.goals:
            raise ValueError("an objective needs at least one goal")
        metrics = [g.metric for g in self.goals]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"each metric may appear once in goals, got {metrics}")

    def with_dense(self, dense: Score) -> Objective:
        """This objective with the dense model's score filled in."""
        return replace(self, dense=dense)

    @property
    def resource(self) -> Metric | None:
        """The first minimised metric (what AMC's reward trades accuracy against)."""
        return next((g.metric for g in self.goals if g.direction == "min"), None)

    def values(self, score: Score) -> tuple[float, ...]:
        """The goal metrics of ``score``, in goal order (raw, not sign-flipped)."""
        return tuple(score.get(g.metric) for g in self.goals)

    def violations(self, score: Score) -> tuple[float, float, float]:
        """Relative excess over each bound (latency, accuracy drop, size); <= 0 means satisfied.

        Always three entries so Optuna's ``constraints_func`` sees a fixed length.
        """
        lat = size = drop = 0.0
        if self.max_latency_ms is not None:
            lat = (score.latency_ms - self.max_latency_ms) / max(self.max_latency_ms, 1e-12)
        if self.max_size_bytes is not None:
            size = (score.size_bytes - self.max_size_bytes) / max(self.max_size_bytes, 1.0)
        if self.max_accuracy_drop is not None and self.dense is not None:
            drop = (self.dense.accuracy - score.accuracy) - self.max_accuracy_drop
        if not score.ok:
            return (1.0, 1.0, 1.0)
        return (lat, drop, size)

    def feasible(self, score: Score) -> bool:
        return score.ok and all(v <= 0.0 for v in self.violations(score))

    def reward(self, score: Score) -> float:
        """One number for single-objective agents (DDPG, AGMC, rule); larger is better.

        Feasible: the accuracy when a resource is constrained (AMC's resource-constrained
        reward), else ``-error * log(e + resource)`` (AMC's accuracy-guaranteed reward, the resource
        relative to dense when known, so units do not matter). Infeasible: ``-2 - excess`` (excess
        capped at 1), below every feasible reward yet closer to it the closer to feasible; failed: -4.
        """
        if not score.ok:
            return INFEASIBLE_REWARD * 2
        excess = sum(max(0.0, v) for v in self.violations(score))
        if excess > 0.0:
            return INFEASIBLE_REWARD - min(excess, 1.0)
        constrained = self.max_latency_ms is not None or self.max_size_bytes is not None
        resource = self.resource
        if constrained or resource is None:
            return score.accuracy
        value = score.get(resource)
        if self.dense is not None and self.dense.get(resource) > 0:
            value = value / self.dense.get(resource)  # relative, so the reward does not depend on units
        return -(1.0 - score.accuracy) * math.log(math.e + max(value, 0.0))

    def resource_of(self, score: Score) -> float:
        """The score's value of :attr:`resource` (0 when nothing is minimised)."""
        metric = self.resource
        return score.get(metric) if metric is not None else 0.0

    def dominates(self, a: Score, b: Score) -> bool:
        """``a`` is at least as good on every goal and better on one."""
        better = False
        for g in self.goals:
            va, vb = a.get(g.metric), b.get(g.metric)
            if g.direction == "min":
                va, vb = -va, -vb
            if va < vb:
                return False
            better = better or va > vb
        return better

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["goals"] = [asdict(g) for g in self.goals]
        return d


def pareto_front(scores: Sequence[Score], objective: Objective, *, feasible_only: bool = True) -> list[int]:
    """Indices of the non-dominated scores (feasible ones only, by default), in input order.

    Duplicated points keep their first occurrence only.
    """
    pool = [i for i, s in enumerate(scores) if s.ok and (not feasible_only or objective.feasible(s))]
    front: list[int] = []
    seen: set[tuple[float, ...]] = set()
    for i in pool:
        key = objective.values(scores[i])
        if key in seen:
            continue
        if not any(objective.dominates(scores[j], scores[i]) for j in pool if j != i):
            front.append(i)
            seen.add(key)
    return front


def with_nondominated(
    front: list[tuple[T, Score]], item: T, score: Score, objective: Objective
) -> list[tuple[T, Score]]:
    """``front`` with ``(item, score)`` added and what it dominates removed; ``front`` itself
    when a member dominates it or scores the same (an incremental :func:`pareto_front`)."""
    mine = objective.values(score)
    if any(objective.dominates(other, score) or objective.values(other) == mine for _, other in front):
        return front
    return [(i, s) for i, s in front if not objective.dominates(score, s)] + [(item, score)]


def hypervolume_2d(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by ``(accuracy, latency_ms)`` points (accuracy max, latency min) up to ``reference``.

    ``reference`` is (lowest accuracy worth anything, highest latency worth anything); points
    outside it add nothing.
    """
    ref_acc, ref_lat = reference
    pts = sorted({(a, lat) for a, lat in points if a > ref_acc and lat < ref_lat}, key=lambda p: p[1])
    area = 0.0
    best_acc = ref_acc
    # Sweep by increasing latency: each point adds the strip between the best accuracy so far and its own.
    for i, (acc, lat) in enumerate(pts):
        if acc > best_acc:
            best_acc = acc
        next_lat = pts[i + 1][1] if i + 1 < len(pts) else ref_lat
        area += (best_acc - ref_acc) * (next_lat - lat)
    return area
