"""A service job's calibration in the loop: the top-up before its search, the measuring rounds
during it, and what each refit changes in the job's stored candidates and baseline.

The policy (when, what, how much) is ``engine.active_measurement``'s; this module ties it to a
``JobContext``: progress phases (``topping up 5/16``, ``measuring on the device, round 1/4:
3/8``) and the ``topup`` / ``active_measurement`` entries of the job's progress, the
measurements a resumed job's candidates already carry, and the re-predicted latencies stored
through ``JobLatency.relabel`` after each refit (with the dense baseline's, so speedups
compare like for like).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agents import Objective, Score
from compression.policy import Policy
from engine.active_measurement import ActiveMeasurer, JobPredictor, topup
from engine.job import JobContext, JobLatency, LoadedPredictor, Relabelled, Scores

if TYPE_CHECKING:
    from compression.model_io import CompressibleModel
    from compression.space import SearchSpace
    from engine.search import Candidate


def topup_job(
    ctx: JobContext,
    job_latency: JobLatency,
    model: CompressibleModel,
    ids: tuple[str, str],
    space: SearchSpace,
    loaded: LoadedPredictor,
) -> LoadedPredictor:
    """Measure ``spec.topup_samples`` policies of the job's space, refit; the predictor to search with."""
    n = ctx.spec.topup_samples

    def progress(done: int, total: int) -> None:
        ctx.progress(
            "phase", {"phase": f"topping up {done}/{total}", "topup": {"done": done, "total": total}}
        )

    progress(0, n)
    done = topup(job_latency, model, ids, space, loaded, n, seed=ctx.spec.seed, progress=progress)
    ctx.progress("phase", {"phase": "topped up", "topup": done.report})
    return done.loaded


class JobLabels:
    """The search hooks of a job scored by its device's predictor: each candidate's predictor
    version and std, the measuring rounds, and the stored candidates re-predicted after a refit."""

    def __init__(
        self,
        ctx: JobContext,
        job_latency: JobLatency,
        jp: JobPredictor,
        baseline: Scores,
        *,
        model: CompressibleModel,
        ids: tuple[str, str],
    ) -> None:
        self.ctx = ctx
        self.job_latency = job_latency
        self.jp = jp
        self.baseline = baseline
        self.active = self._measurer(model, ids) if ctx.spec.active_measurement.on else None

    def _measurer(self, model: CompressibleModel, ids: tuple[str, str]) -> ActiveMeasurer:
        measured: dict[str, dict[str, Any]] = {}
        for d in self.ctx.done:
            got = (d.scores.extra or {}).get("active")
            if isinstance(got, dict):
                measured[d.policy_hash] = got
        rounds_before = max((int(m.get("round") or 0) for m in measured.values()), default=0)
        spec = self.ctx.spec
        return ActiveMeasurer(
            spec.active_measurement,
            device=self.job_latency,
            model=model,
            ids=ids,
            predictor=self.jp,
            budget_candidates=spec.budget.candidates,
            budget_seconds=spec.budget.seconds,
            progress=self._report,
            phase=lambda phase: self.ctx.progress("phase", {"phase": phase}),
            # A cancel or a lost lease; not a spent budget: the rounds were planned within it, and
            # the last one may fall on the batch that spends it.
            should_stop=self.ctx.cancelled or (lambda: False),
            measured_before=measured,
            rounds_before=rounds_before,
        )

    def _report(self, data: dict[str, Any]) -> None:
        self.ctx.progress("phase", {"phase": "searching", "active_measurement": data})
        if data.get("last_round"):
            self.ctx.progress("active_measurement", dict(data["last_round"]))

    @property
    def version(self) -> int:
        return self.jp.version

    def extra_of(self, policy_hash: str) -> dict[str, Any]:
        """A candidate's extra keys: its predicted std, and its measurement when the job made one."""
        if self.active is not None:
            return self.active.extra_of(policy_hash)
        std = self.jp.std_of(policy_hash)
        return {"latency_std_ms": round(std, 6)} if std is not None else {}

    def previous(self, candidates: Sequence[Candidate], versions: Sequence[int | None]) -> list[Candidate]:
        """A resumed job's stored candidates; re-predicted (and stored so) when any was scored by a
        version other than the job's current one (a refit the job made before it stopped)."""
        if all(v == self.jp.version for v in versions):
            return list(candidates)
        scores = self.jp.repredict([c.score for c in candidates], [c.policy for c in candidates])
        self._store(candidates, scores)
        return [dataclasses.replace(c, score=s) for c, s in zip(candidates, scores, strict=True)]

    def between_rounds(self, candidates: Sequence[Candidate], objective: Objective) -> list[Score] | None:
        """``run_search``'s hook: a measuring round when one is due, then the new scores stored."""
        if self.active is None:
            return None
        scores = self.active.between_rounds(candidates, objective)
        if scores is not None:
            self._store(candidates, scores)
        return scores

    def _store(self, candidates: Sequence[Candidate], scores: Sequence[Score]) -> None:
        points = [
            Relabelled(
                c.policy.hash, float(s.latency_ms), s.measured_latency_ms, self.extra_of(c.policy.hash)
            )
            for c, s in zip(candidates, scores, strict=True)
            if s.ok
        ]
        self.job_latency.relabel(points, self.jp.version)
        ms, _std = self.jp.predict([Policy.dense()])
        self.baseline = dataclasses.replace(
            self.baseline, latency_ms=float(ms[0]), predictor_version=self.jp.version
        )
        self.ctx.set_baseline(self.baseline)
