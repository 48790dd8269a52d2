"""After a search: fine-tune the top-k front points by distillation and re-score them.

Each chosen point is built exactly as the search scored it (same calibration batches,
re-fitted and BatchNorm-recalibrated), fine-tuned with the dense model as teacher
(:func:`compression.distill.distill`: masks and quantizers held) and re-scored on the same
validation images as its one-shot accuracy, so the two numbers compare like for like.

What a candidate keeps: ``one_shot_accuracy`` and ``finetuned_accuracy`` beside each other,
and the recipe (``finetune``: steps, config, whether it was applied). Its ``accuracy`` becomes
the better of the two: the fine-tuned one when fine-tuning helped, since an export of the
candidate replays the same fine-tuning (:func:`replay`: same batches, same seed) and so
delivers it; otherwise the one-shot accuracy stands and an export builds the one-shot model.
Feasibility and the front are then recomputed from those accuracies (:func:`rescored`).
Latency, size and MACs do not change: fine-tuning moves weights, not the architecture.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agents import pareto_front
from compression.apply import CompressedModel
from compression.data import Dataset
from compression.distill import DistillConfig, KDBatches, distill, steps_for_epochs
from compression.evaluate import accuracy
from compression.model_io import CompressibleModel
from compression.obc import Recovery
from compression.policy import Policy
from engine.job import JobContext
from engine.search import Candidate, Evaluator, SearchResult
from engine.spec import FinetuneSpec

__all__ = ["FinetunedPoint", "FrontFinetuner", "finetune_job_front", "replay", "rescored", "select"]

Progress = Callable[[int, int, float], None]
"""(step from 1, steps, loss) of the point being fine-tuned."""


def select(front: Sequence[Candidate], k: int) -> list[Candidate]:
    """``k`` front points spread from the fastest to the slowest, both ends included.

    The same spread as the end-of-job re-measurement, so the points a user is shown as
    measured are the ones fine-tuned too. One point means the fastest: it lost the most.
    """
    order = sorted((c for c in front if c.score.ok), key=lambda c: (c.score.latency_ms, c.index))
    n = len(order)
    if k <= 0 or n == 0:
        return []
    if k >= n:
        return order
    if k == 1:
        return [order[0]]
    return [order[i] for i in sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})]


@dataclass(frozen=True)
class FinetunedPoint:
    """One fine-tuned front point and both of its accuracies."""

    policy_hash: str
    one_shot_accuracy: float
    finetuned_accuracy: float | None  # None when fine-tuning failed or was stopped
    steps: int
    seconds: float
    config: DistillConfig
    diverged: bool = False
    error: str | None = None

    @property
    def applied(self) -> bool:
        """Fine-tuning beat the one-shot accuracy, so the candidate (and its export) uses it."""
        return self.finetuned_accuracy is not None and self.finetuned_accuracy > self.one_shot_accuracy

    @property
    def accuracy(self) -> float:
        """The candidate's accuracy from now on: the better of the two."""
        if self.applied:
            assert self.finetuned_accuracy is not None
            return self.finetuned_accuracy
        return self.one_shot_accuracy

    def extra(self) -> dict[str, Any]:
        """What the candidate's ``extra`` gains (JSON)."""
        recipe: dict[str, Any] = {
            "applied": self.applied,
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "config": self.config.to_dict(),
        }
        if self.diverged:
            recipe["diverged"] = True
        if self.error:
            recipe["error"] = self.error
        return {
            "one_shot_accuracy": self.one_shot_accuracy,
            "finetuned_accuracy": self.finetuned_accuracy,
            "finetune": recipe,
        }


def config_for(dataset: Dataset, seed: int) -> DistillConfig:
    """The distillation settings of a job with this seed on this data set."""
    return DistillConfig(seed=seed).for_size(len(dataset.x_train))


def steps_of(spec: FinetuneSpec, dataset: Dataset, config: DistillConfig) -> int:
    """Optimizer steps per point: ``spec.steps``, else ``spec.epochs`` passes over the train split."""
    if spec.steps is not None:
        return spec.steps
    return steps_for_epochs(spec.epochs, len(dataset.x_train), config.batch_size)


class FrontFinetuner:
    """Fine-tunes points of one search: its calibration batches, validation images and teacher.

    ``seed`` and ``reconstruct`` must be the search's, so a point is built as it was scored.
    """

    def __init__(
        self,
        model: CompressibleModel,
        dataset: Dataset,
        spec: FinetuneSpec,
        *,
        seed: int = 0,
        reconstruct: bool = True,
        recovery: Recovery = "magnitude",
    ) -> None:
        self.model = model
        self.reconstruct = reconstruct
        # The search's evaluator (same seed, reconstruct and recovery): same calibration
        # batches and validation subset, so a point starts from the weights it was scored with.
        self.evaluator = Evaluator(
            model, dataset, lambda _cm: 0.0, seed=seed, reconstruct=reconstruct, recovery=recovery
        )
        self.config = config_for(dataset, seed)
        self.steps = steps_of(spec, dataset, self.config)
        self.batches = KDBatches(
            model.gm,
            dataset,
            batch_size=self.config.batch_size,
            seed=self.config.seed,
            augment=self.config.augment,
        )

    def build(self, policy: Policy) -> CompressedModel:
        return self.evaluator.build(policy)

    def run(
        self,
        policy: Policy,
        *,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> FinetunedPoint | None:
        """Fine-tune and re-score one point; None when ``should_stop`` ended it first."""
        start = time.perf_counter()
        ev = self.evaluator
        cm = self.build(policy)
        one_shot = accuracy(cm.gm, ev.x_val, ev.y_val)
        try:
            result = distill(
                cm,
                None,
                self.batches,
                self.steps,
                config=self.config,
                progress=progress,
                should_stop=should_stop,
            )
        except (RuntimeError, ValueError) as exc:  # a graph that cannot train: keep the one-shot score
            return FinetunedPoint(
                policy.hash, one_shot, None, 0, time.perf_counter() - start, self.config,
                error=f"{type(exc).__name__}: {exc}",
            )  # fmt: skip
        if result.stopped:
            return None
        tuned = None if result.diverged else accuracy(cm.gm, ev.x_val, ev.y_val)
        return FinetunedPoint(
            policy.hash,
            one_shot,
            tuned,
            result.steps,
            time.perf_counter() - start,
            self.config,
            diverged=result.diverged,
        )


def rescored(result: SearchResult, accuracies: Mapping[str, float]) -> SearchResult:
    """``result`` with new accuracies (by policy hash): feasibility and the front recomputed."""
    if not accuracies:
        return result
    objective = result.objective
    candidates = []
    for c in result.candidates:
        acc = accuracies.get(c.policy.hash)
        if acc is not None and c.score.ok:
            score = dataclasses.replace(c.score, accuracy=acc)
            c = dataclasses.replace(c, score=score, feasible=objective.feasible(score))
        candidates.append(c)
    front = pareto_front([c.score for c in candidates], objective)
    return dataclasses.replace(result, candidates=candidates, pareto=[candidates[i] for i in front])


def replay(
    model: CompressibleModel,
    dataset: Dataset,
    policy: Policy,
    extra: Mapping[str, Any],
    *,
    seed: int,
    reconstruct: bool,
    recovery: Recovery = "magnitude",
    min_steps: int = 0,
    progress: Progress | None = None,
) -> CompressedModel | None:
    """The candidate's model as its accuracy was scored: fine-tuned again when the job's
    fine-tuning was applied to it (same batches and settings, so the same weights), for at
    least ``min_steps`` steps (an export asking for more). None when neither applies: the
    caller builds the one-shot model as before.
    """
    recipe = extra.get("finetune") if isinstance(extra.get("finetune"), Mapping) else None
    applied = bool(recipe and recipe.get("applied"))
    if not applied and min_steps <= 0:
        return None
    config = (
        DistillConfig.from_dict(dict(recipe["config"])) if applied and recipe else config_for(dataset, seed)
    )
    steps = max(int(recipe["steps"]) if applied and recipe else 0, min_steps)
    evaluator = Evaluator(
        model, dataset, lambda _cm: 0.0, seed=seed, reconstruct=reconstruct, recovery=recovery
    )
    cm = evaluator.build(policy)
    batches = KDBatches(
        model.gm, dataset, batch_size=config.batch_size, seed=config.seed, augment=config.augment
    )
    result = distill(cm, None, batches, steps, config=config, progress=progress)
    if result.diverged:
        raise RuntimeError(f"fine-tuning diverged in {result.steps} steps; export without finetune_epochs")
    return cm


def finetune_job_front(
    ctx: JobContext, model: CompressibleModel, dataset: Dataset, result: SearchResult
) -> SearchResult:
    """The job's fine-tuning phase: top-k points of the front fine-tuned, stored, re-scored.

    Points are chosen on the one-shot front (a resumed job reads the one-shot accuracies of
    points it fine-tuned before from their ``extra`` and does not fine-tune them again).
    Progress: ``phase`` events "finetune i/k: step s/n" (at most about one a second) with a
    ``finetune`` object, and a ``finetuned`` event per point with both accuracies.
    """
    spec = ctx.spec.finetune
    cancelled = ctx.cancelled or (lambda: False)
    extras = {d.policy_hash: dict(d.scores.extra or {}) for d in ctx.done}
    one_shot = {h: float(e["one_shot_accuracy"]) for h, e in extras.items() if "one_shot_accuracy" in e}
    chosen = select(rescored(result, one_shot).pareto, spec.top_k)
    todo = [c for c in chosen if "finetuned_accuracy" not in extras.get(c.policy.hash, {})]
    if not todo or cancelled():
        return result
    ctx.progress("phase", {"phase": "finetune: preparing", "finetune": {"points": len(chosen)}})
    tuner = FrontFinetuner(
        model, dataset, spec, seed=ctx.spec.seed, reconstruct=ctx.spec.reconstruct, recovery=ctx.spec.recovery
    )
    accuracies: dict[str, float] = {}
    last = [0.0]
    for i, cand in enumerate(todo, start=1):

        def progress(step: int, steps: int, loss: float, i: int = i, h: str = cand.policy.hash) -> None:
            now = time.monotonic()
            if step != 1 and step != steps and now - last[0] < 1.0:
                return  # about one event a second: each is a database row
            last[0] = now
            info = {"point": i, "points": len(todo), "policy_hash": h, "step": step, "steps": steps}
            ctx.progress(
                "phase", {"phase": f"finetune {i}/{len(todo)}: step {step}/{steps}", "finetune": info}
            )

        point = tuner.run(cand.policy, progress=progress, should_stop=cancelled)
        if point is None:  # cancelled: what was stored stays, the rest is not started
            break
        accuracies[point.policy_hash] = point.accuracy
        if ctx.rescore is not None:
            ctx.rescore(point.policy_hash, point.accuracy, point.extra())
        ctx.progress("finetuned", {"policy_hash": point.policy_hash, "point": i, **point.extra()})
    ctx.progress("phase", {"phase": "finetune: done", "finetune": {"points": len(chosen)}})
    return rescored(result, accuracies)
