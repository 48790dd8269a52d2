"""The search loop shared by the CLI and the service: ask, score for real, tell, until a budget ends.

Every candidate is scored for real: the policy is applied, BatchNorm is recalibrated on a few
training batches, accuracy is measured on a validation subset, and latency comes from the
caller's ``device_latency`` (a predictor or a measurement). A policy is never scored twice:
candidates are cached by policy hash, and a resumed search is handed the candidates it
already has.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from agents import Objective, Score, make, pareto_front
from compression.apply import CompressedModel
from compression.data import Dataset, calibration_batches
from compression.evaluate import accuracy
from compression.metrics import measure
from compression.model_io import CompressibleModel
from compression.policy import Policy, PolicyError
from compression.scoring import compress
from compression.space import SpaceOptions
from compression.space_builder import space_for

DeviceLatency = Callable[[CompressedModel], float]
MAX_IDLE_ROUNDS = 50  # rounds in a row without a new policy: the agent has converged, stop


@dataclass(frozen=True)
class Candidate:
    """One scored policy of a search."""

    index: int
    policy: Policy
    score: Score
    feasible: bool

    def to_dict(self) -> dict[str, Any]:
        s = self.score
        return {
            "index": self.index,
            "policy": self.policy.to_dict(),
            "policy_hash": self.policy.hash,
            "accuracy": s.accuracy,
            "latency_ms": s.latency_ms,
            "size_bytes": s.size_bytes,
            "macs": s.macs,
            "feasible": self.feasible,
            "eval_seconds": s.eval_seconds,
            "error": s.error,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Candidate:
        """Inverse of :meth:`to_dict` (how a resumed search receives what it already scored)."""
        score = Score(
            accuracy=raw["accuracy"],
            latency_ms=raw["latency_ms"],
            size_bytes=raw["size_bytes"],
            macs=raw["macs"],
            eval_seconds=raw.get("eval_seconds", 0.0),
            error=raw.get("error"),
        )
        return cls(int(raw["index"]), Policy.from_dict(raw["policy"]), score, bool(raw["feasible"]))


@dataclass(frozen=True)
class Progress:
    """Where a search stands after one ask/tell round.

    Attributes:
        done / budget: candidates scored so far and the candidate budget.
        elapsed_s: wall time since the search started.
        best_feasible_accuracy: best accuracy among feasible candidates (None if none yet).
        agent_state: builds the agent's JSON state on demand (costly for DDPG: call when saving).
    """

    done: int
    budget: int
    elapsed_s: float
    best_feasible_accuracy: float | None
    agent_state: Callable[[], dict[str, Any]]


@dataclass
class SearchResult:
    """The dense reference, every candidate, and the Pareto front of the feasible ones."""

    dense: Candidate
    candidates: list[Candidate]
    pareto: list[Candidate]
    objective: Objective
    agent_state: dict[str, Any] = field(default_factory=dict)
    stopped_because: str = "budget"

    def to_dict(self) -> dict[str, Any]:
        return {
            "dense": self.dense.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "pareto": [c.to_dict() for c in self.pareto],
            "stopped_because": self.stopped_because,
        }


class Evaluator:
    """Scores policies of one model on one data set (fixed calibration batches and validation subset)."""

    def __init__(
        self,
        model: CompressibleModel,
        dataset: Dataset,
        device_latency: DeviceLatency,
        *,
        val_images: int = 1000,
        calibration: int = 4,
        calibration_batch: int = 64,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.device_latency = device_latency
        self.calibration = calibration_batches(dataset, calibration, calibration_batch, seed=seed)
        n = min(val_images, len(dataset.x_val))
        idx = np.random.default_rng(seed).permutation(len(dataset.x_val))[:n]
        self.x_val, self.y_val = dataset.x_val[idx], dataset.y_val[idx]

    def evaluate(self, policy: Policy) -> Score:
        """Apply, recalibrate, evaluate and time ``policy``; a policy that cannot be applied fails."""
        start = time.perf_counter()
        try:
            with torch.no_grad():
                cm = compress(self.model, policy, self.calibration)
                acc = accuracy(cm.gm, self.x_val, self.y_val, batch_size=500)
                m = measure(cm)
            latency = float(self.device_latency(cm))
        except (PolicyError, ValueError, RuntimeError) as exc:
            return Score.failed(f"{type(exc).__name__}: {exc}")
        return Score(
            accuracy=acc,
            latency_ms=latency,
            size_bytes=float(m.size_bytes),
            macs=float(m.macs),
            eval_seconds=time.perf_counter() - start,
        )


def run_search(
    model: CompressibleModel,
    dataset: Dataset,
    *,
    device_latency: DeviceLatency,
    algorithm: str,
    budget_candidates: int,
    budget_seconds: float | None = None,
    seed: int = 0,
    objective: Objective | None = None,
    space_options: SpaceOptions | None = None,
    on_candidate: Callable[[Candidate], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    agent_state: dict[str, Any] | None = None,
    previous: Sequence[Candidate] = (),
    should_stop: Callable[[], bool] | None = None,
    batch_size: int = 4,
    val_images: int = 1000,
    agent_options: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Search compression policies of ``model`` until ``budget_candidates`` new policies are scored.

    Also stops when ``budget_seconds`` pass, when ``should_stop()`` says so (cancel), or when
    the agent keeps proposing only policies already scored. ``on_candidate`` sees each new
    candidate as soon as it is scored; ``on_progress`` after each round (persist
    ``progress.agent_state()`` there to make the search resumable). To resume, pass the saved
    ``agent_state`` and the candidates scored so far as ``previous``; they count towards the
    budget and are never scored again.

    Raises:
        ValueError: unknown ``algorithm`` or a budget below 1.
    """
    if budget_candidates < 1:
        raise ValueError(f"budget_candidates must be >= 1, got {budget_candidates}")
    start = time.monotonic()
    space = space_for(model, space_options)
    evaluator = Evaluator(model, dataset, device_latency, val_images=val_images, seed=seed)
    dense_score = evaluator.evaluate(Policy.dense())
    if not dense_score.ok:
        raise ValueError(f"the dense model cannot be evaluated: {dense_score.error}")
    objective = (objective or Objective()).with_dense(dense_score)
    dense = Candidate(-1, Policy.dense(), dense_score, objective.feasible(dense_score))
    agent = make(algorithm, space, objective, seed, **dict(agent_options or {}))
    if agent_state:
        agent.load_state_dict(agent_state)
    # Feasibility depends on the dense score measured just now, not on how it was stored.
    candidates = [dataclasses.replace(c, feasible=objective.feasible(c.score)) for c in previous]
    cache = {c.policy.hash: c for c in candidates}
    stopped = "budget"
    idle = 0
    while len(candidates) < budget_candidates:
        if should_stop is not None and should_stop():
            stopped = "cancelled"
            break
        if budget_seconds is not None and time.monotonic() - start >= budget_seconds:
            stopped = "time"
            break
        policies = agent.ask(min(batch_size, budget_candidates - len(candidates)))
        scores = []
        new = 0
        for policy in policies:
            cand = cache.get(policy.hash)
            if cand is None:
                score = evaluator.evaluate(policy)
                cand = Candidate(len(candidates), policy, score, objective.feasible(score))
                cache[policy.hash] = cand
                candidates.append(cand)
                new += 1
                if on_candidate is not None:
                    on_candidate(cand)
            scores.append(cand.score)
        agent.tell(policies, scores)
        idle = 0 if new else idle + 1
        if on_progress is not None:
            feasible = [c.score.accuracy for c in candidates if c.feasible]
            on_progress(
                Progress(
                    done=len(candidates),
                    budget=budget_candidates,
                    elapsed_s=time.monotonic() - start,
                    best_feasible_accuracy=max(feasible) if feasible else None,
                    agent_state=agent.state_dict,
                )
            )
        if idle >= MAX_IDLE_ROUNDS:
            stopped = "converged"
            break
    front = pareto_front([c.score for c in candidates], objective)
    return SearchResult(
        dense=dense,
        candidates=candidates,
        pareto=[candidates[i] for i in front],
        objective=objective,
        agent_state=agent.state_dict(),
        stopped_because=stopped,
    )
