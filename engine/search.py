"""The search loop shared by the CLI and the service: ask, score for real, tell, until a budget ends.

Every candidate is scored for real: the policy is applied, BatchNorm is recalibrated on a few
training batches, accuracy is measured on a validation subset, and latency comes from the
caller's ``device_latency`` (a predictor or a measurement). A policy is never scored twice:
candidates are cached by the model a policy builds (``compression.policy_identity``: widths
as kept channel counts, nothing inside skipped blocks), so policies that round to one already
scored cost no candidate, and a resumed search is handed the candidates it already has.

Where the scoring runs is the caller's choice: in this process (the default), or in the
workers of an executor (a local process pool or a Ray cluster, see ``engine.executors``).
With an executor, the model and data travel to each worker once, when the worker starts
(the model as a ``torch.export`` archive, which keeps every node name and shape); after
that only policies go out and scores come back.
"""

from __future__ import annotations

import dataclasses
import io
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from agents import Objective, Score, make, pareto_front
from agents.registry import TAKES_LATENCY_FN
from compression.apply import CompressedModel
from compression.data import Dataset, calibration_batches
from compression.evaluate import accuracy
from compression.metrics import measure
from compression.model_io import CompressibleModel, from_exported
from compression.obc import ObcCache, Recovery
from compression.policy import Policy, PolicyError
from compression.policy_identity import resolved_key
from compression.scoring import compress
from compression.space import SpaceOptions
from compression.space_builder import space_for
from compression.tracing import TRACE_LOCK
from engine.executors import Executor, ExecutorFactory

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
        done / budget: candidates scored so far and the candidate budget (None: no limit).
        elapsed_s: wall time since the search started.
        best_feasible_accuracy: best accuracy among feasible candidates (None if none yet).
        agent_state: builds the agent's JSON state on demand (costly for DDPG: call when saving).
    """

    done: int
    budget: int | None
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
        reconstruct: bool = True,
        recovery: Recovery = "magnitude",
    ) -> None:
        self.model = model
        self.device_latency = device_latency
        # Re-fit layers whose inputs were pruned to the dense outputs before scoring
        # (compression.reconstruct): without it channel pruning without fine-tuning loses most
        # of the accuracy (ResNet-20 at width 0.75: 34 % instead of 98 %).
        self.reconstruct = reconstruct
        # Masks and rounding by OBS / GPTQ on the calibration batches (compression.obc); the
        # cache reuses a layer's result while everything upstream of it is unchanged.
        self.recovery: Recovery = recovery
        self.obc_cache = ObcCache()
        self.calibration = calibration_batches(dataset, calibration, calibration_batch, seed=seed)
        n = min(val_images, len(dataset.x_val))
        idx = np.random.default_rng(seed).permutation(len(dataset.x_val))[:n]
        self.x_val, self.y_val = dataset.x_val[idx], dataset.y_val[idx]

    def to_payload(self) -> bytes:
        """Everything a worker needs to score policies exactly as this evaluator does.

        The model goes as a ``torch.export`` archive (a plain pickle of the graph would
        drop the shapes graph analysis reads); the rest (the calibration batches, the
        validation subset and the latency callback, which may be a closure) is
        cloudpickled. Only this process's own workers ever read it back.
        """
        import cloudpickle

        return bytes(
            cloudpickle.dumps(
                {
                    "model": model_archive(self.model),
                    "name": self.model.name,
                    "device_latency": self.device_latency,
                    "calibration": self.calibration,
                    "x_val": self.x_val,
                    "y_val": self.y_val,
                    "reconstruct": self.reconstruct,
                    "recovery": self.recovery,
                }
            )
        )

    @classmethod
    def from_payload(cls, payload: bytes) -> Evaluator:
        """The evaluator :meth:`to_payload` describes (built in a worker)."""
        import cloudpickle

        parts = cloudpickle.loads(payload)
        self = cls.__new__(cls)
        self.model = model_from_archive(parts["model"], parts["name"])
        self.device_latency = parts["device_latency"]
        self.calibration = parts["calibration"]
        self.x_val, self.y_val = parts["x_val"], parts["y_val"]
        self.reconstruct = bool(parts.get("reconstruct", True))
        self.recovery = parts.get("recovery", "magnitude")
        self.obc_cache = ObcCache()
        return self

    def build(self, policy: Policy) -> CompressedModel:
        """The compressed model this evaluator scores for ``policy`` (call under ``no_grad``)."""
        return compress(
            self.model,
            policy,
            self.calibration,
            reconstruct=self.reconstruct,
            recovery=self.recovery,
            cache=self.obc_cache,
        )

    def evaluate(self, policy: Policy) -> Score:
        """Apply, recalibrate, evaluate and time ``policy``; a policy that cannot be applied fails."""
        start = time.perf_counter()
        try:
            with torch.no_grad():
                cm = self.build(policy)
                acc = accuracy(cm.gm, self.x_val, self.y_val)
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


def model_archive(model: CompressibleModel) -> bytes:
    """``model`` as ``torch.export.save`` bytes: same node names, shapes and weights when loaded."""
    example = model.example_input(2)
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if model.dynamic_batch else None
    with TRACE_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model.gm, (example,), dynamic_shapes=shapes)
        buf = io.BytesIO()
        torch.export.save(ep, buf)
    return buf.getvalue()


def model_from_archive(data: bytes, name: str) -> CompressibleModel:
    """Inverse of :func:`model_archive`."""
    with TRACE_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return from_exported(torch.export.load(io.BytesIO(data)), name)


class EvaluatorPayload:
    """An evaluator on its way to executor workers, serialised only if it leaves the process.

    Pickled (for a process pool or Ray) it becomes :meth:`Evaluator.to_payload` bytes, made
    once however many workers receive it; an in-process executor gets the live evaluator
    and so never pays for (or depends on) re-exporting the model.
    """

    def __init__(self, evaluator: Evaluator | None = None, data: bytes | None = None) -> None:
        self._evaluator = evaluator
        self._data = data

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        if self._data is None:
            assert self._evaluator is not None
            self._data = self._evaluator.to_payload()
        return (EvaluatorPayload, (None, self._data))

    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            assert self._data is not None
            self._evaluator = Evaluator.from_payload(self._data)
        return self._evaluator


# Evaluators built in this process by executor initializers, by search token: a worker
# process serves one search, the in-process executor possibly several at once.
_WORKER_EVALUATORS: dict[str, Evaluator] = {}


def load_worker_evaluator(token: str, payload: EvaluatorPayload) -> str:
    """Executor initializer: build the search's evaluator once in this worker."""
    _WORKER_EVALUATORS[token] = payload.evaluator()
    return token


def evaluate_in_worker(item: tuple[str, dict[str, Any]]) -> Score:
    """Executor task: score one policy (as its JSON dict) with this worker's evaluator."""
    token, policy = item
    evaluator = _WORKER_EVALUATORS.get(token)
    if evaluator is None:
        raise RuntimeError(f"no evaluator for search {token} in this worker (its initializer did not run)")
    return evaluator.evaluate(Policy.from_dict(policy))


class _Scorer:
    """Scores batches of new policies in this process, or through an executor's workers."""

    def __init__(self, evaluator: Evaluator, factory: ExecutorFactory | None) -> None:
        self.evaluator = evaluator
        self.token = uuid.uuid4().hex
        self.executor: Executor | None = None
        if factory is not None:
            self.executor = factory(load_worker_evaluator, (self.token, EvaluatorPayload(evaluator)))

    @property
    def workers(self) -> int:
        return self.executor.workers if self.executor is not None else 1

    def score(self, policies: Sequence[Policy]) -> list[Score]:
        if not policies:
            return []
        if self.executor is None:
            return [self.evaluator.evaluate(p) for p in policies]
        items = [(self.token, p.to_dict()) for p in policies]
        return list(self.executor.map(evaluate_in_worker, items))

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
        _WORKER_EVALUATORS.pop(self.token, None)  # where the in-process executor keeps it


def run_search(
    model: CompressibleModel,
    dataset: Dataset,
    *,
    device_latency: DeviceLatency,
    algorithm: str,
    budget_candidates: int | None,
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
    executor: ExecutorFactory | None = None,
    reconstruct: bool = True,
    recovery: Recovery = "magnitude",
    rescore: Callable[[Sequence[Policy], Sequence[Score]], Sequence[Score]] | None = None,
    between_rounds: Callable[[Sequence[Candidate], Objective], Sequence[Score] | None] | None = None,
) -> SearchResult:
    """Search compression policies of ``model`` until ``budget_candidates`` new policies are scored.

    ``budget_candidates`` None means no candidate limit (``budget_seconds`` must then be set).
    Also stops when ``budget_seconds`` pass, when ``should_stop()`` says so (cancel), or when
    the agent keeps proposing only policies already scored. ``on_candidate`` sees each new
    candidate as soon as it is scored; ``on_progress`` after each round (persist
    ``progress.agent_state()`` there to make the search resumable). To resume, pass the saved
    ``agent_state`` and the candidates scored so far as ``previous``; they count towards the
    budget and are never scored again.

    ``reconstruct`` re-fits pruned layers to the dense model's outputs before scoring (see
    ``compression.reconstruct``; about twice the scoring time, far higher accuracy when
    channels are pruned). ``recovery="obc"`` chooses masks and rounding by OBS / GPTQ on
    the calibration batches (``compression.obc``) instead of by magnitude.

    ``executor`` builds the workers that score candidates (None: this process scores them).
    The agent is asked for ``max(batch_size, workers)`` policies a round and the new ones
    are scored in parallel; a policy scores the same wherever it is scored.

    A latency source that changes during the search (``engine.active_measurement``: the job's
    predictor refitted on new measurements) hooks in twice: ``rescore(policies, scores)`` gives
    each new batch its scores before ``on_candidate`` sees them (here, where the current
    predictor lives, not in the workers), and ``between_rounds(candidates, objective)``, after
    each round, may return every candidate's new score (in order); feasibility and the front
    follow them, and agents keep the scores they were told.

    Raises:
        ValueError: unknown ``algorithm``, a budget below 1, or neither budget set.
    """
    if budget_candidates is not None and budget_candidates < 1:
        raise ValueError(f"budget_candidates must be >= 1, got {budget_candidates}")
    if budget_candidates is None and budget_seconds is None:
        raise ValueError("a search needs budget_candidates or budget_seconds (it would never end)")
    limit = budget_candidates if budget_candidates is not None else float("inf")
    start = time.monotonic()
    space = space_for(model, space_options)
    evaluator = Evaluator(
        model,
        dataset,
        device_latency,
        val_images=val_images,
        seed=seed,
        reconstruct=reconstruct,
        recovery=recovery,
    )
    dense_score = evaluator.evaluate(Policy.dense())
    if not dense_score.ok:
        raise ValueError(f"the dense model cannot be evaluated: {dense_score.error}")
    objective = (objective or Objective()).with_dense(dense_score)
    dense = Candidate(-1, Policy.dense(), dense_score, objective.feasible(dense_score))
    options = dict(agent_options or {})
    plan_latency = getattr(device_latency, "of_policies", None)
    if algorithm in TAKES_LATENCY_FN and "latency_fn" not in options and callable(plan_latency):
        # the agents that plan with latency (DDPG's action wall, the surrogate) plan with the
        # device's predictor, not with MACs (a measured or proxy callback has no batch form)
        options["latency_fn"] = plan_latency
    agent = make(algorithm, space, objective, seed, **options)
    if agent_state:
        agent.load_state_dict(agent_state)
    # Feasibility depends on the dense score measured just now, not on how it was stored.
    candidates = [dataclasses.replace(c, feasible=objective.feasible(c.score)) for c in previous]
    # Cached by the model a policy builds, not its JSON: policies that round to the same kept
    # channels (or differ only inside skipped blocks) are scored once (compression.policy_identity).
    graph = model.graph

    def key(policy: Policy) -> str:
        return resolved_key(graph, policy)

    cache = {key(c.policy): c for c in candidates}
    stopped = "budget"
    idle = 0
    scorer = _Scorer(evaluator, executor) if len(candidates) < limit else None
    try:
        while scorer is not None and len(candidates) < limit:
            if should_stop is not None and should_stop():
                stopped = "cancelled"
                break
            if budget_seconds is not None and time.monotonic() - start >= budget_seconds:
                stopped = "time"
                break
            ask = max(batch_size, scorer.workers)
            policies = agent.ask(int(min(ask, limit - len(candidates))))
            keys = [key(p) for p in policies]
            fresh_by_key: dict[str, Policy] = {}
            for k, p in zip(keys, policies, strict=True):
                if k not in cache:
                    fresh_by_key.setdefault(k, p)
            fresh = list(fresh_by_key.values())
            scored = scorer.score(fresh)
            if rescore is not None and fresh:
                scored = list(rescore(fresh, scored))
            for (k, policy), score in zip(fresh_by_key.items(), scored, strict=True):
                cand = Candidate(len(candidates), policy, score, objective.feasible(score))
                cache[k] = cand
                candidates.append(cand)
                if on_candidate is not None:
                    on_candidate(cand)
            agent.tell(policies, [cache[k].score for k in keys])
            idle = 0 if fresh else idle + 1
            updated = between_rounds(candidates, objective) if between_rounds is not None else None
            if updated is not None:
                candidates = [
                    dataclasses.replace(c, score=u, feasible=objective.feasible(u))
                    for c, u in zip(candidates, updated, strict=True)
                ]
                cache = {key(c.policy): c for c in candidates}
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
    finally:
        if scorer is not None:
            scorer.close()
    front = pareto_front([c.score for c in candidates], objective)
    return SearchResult(
        dense=dense,
        candidates=candidates,
        pareto=[candidates[i] for i in front],
        objective=objective,
        agent_state=agent.state_dict(),
        stopped_because=stopped,
    )
