"""Calibration in the loop: a job measures its own model before and during its search.

Shared by the service's jobs (``engine.run``, the device reached through ``JobLatency``: the
harness in the runner's process or a device agent's tasks) and ``modeltailor search`` (a local
device, ``engine.local_measuring``). Both sides implement :class:`MeasuringDevice`.

* **Top-up** (:func:`topup`): before the search, when the device's measurements have none of the
  job's model, ``n`` random policies of the job's own space are timed (each interleaved with
  the dense model and the reference, as a calibration sample is), appended to the device's
  measurements, and the job's predictor kind is refitted on all of them.
* **Active measurement** (:class:`ActiveMeasurer`): during the search, rounds of measurements
  refit the predictor again. Choices the issue leaves open, made here:

  - *Budget*: in candidates, ``ActiveMeasurementSpec.limit`` (``min(max, ceil(share x candidate
    budget))``) split evenly over ``ceil(limit / per_round)`` rounds; round ``i`` starts once the
    search is ``i / (rounds + 1)`` through its budget, by candidates or by seconds, whichever is
    further along. A resumed job counts the measurements its candidates already carry.
  - *What is measured*: the front points not yet measured first (spread from the fastest to the
    most accurate when there are more than a round holds), then the candidates with the largest
    predicted standard deviation (``predict_uncertainty`` of the predictor when it has one; a
    predictor without one is equally unsure everywhere, and the newest candidates go first:
    where the search is looking now). A candidate is measured at most once.
  - *Error before refit*: for each measured point, the speedup the predictor predicted *before*
    seeing it (its dense prediction over its prediction) against the speedup timed in one run
    (by the statistic the predictor learns, ``with_statistic``); reported per round and in total.
  - *After a refit*: the refitted predictor is a new stored version; every candidate of the job
    (and the dense baseline) is re-predicted with it, so the front and feasibility are ranked on
    one predictor and every candidate names the version that scored it. Search agents keep the
    latencies they were told when they asked (their history is not rewritten).
  - *Failure*: a round that cannot measure (no device agent answered, a fit failed) ends active
    measurement for the job with a note in its progress; the search goes on with the predictor
    it has. A cancelled job stops (``CalibrationStopped``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from agents import Objective, Score, pareto_front
from compression.policy import Policy
from engine.device_latency import PredictedLatency
from engine.spec import ActiveMeasurementSpec
from latency_models.calibration_run import CalibrationStopped
from latency_models.incremental import Measured

if TYPE_CHECKING:
    from compression.model_io import CompressibleModel
    from compression.space import SearchSpace
    from engine.job import LoadedPredictor
    from engine.search import Candidate
    from latency_models.predictors import Predictor

log = logging.getLogger("modeltailor.active")

#: Random draws per wanted top-up policy before giving up on new ones (small spaces repeat).
DRAWS_PER_POLICY = 20

Progress = Callable[[int, int], None]
"""(policies timed so far, policies to time)."""


class MeasuringDevice(Protocol):
    """Times policies of a job's model on its device and refits the job's predictor."""

    def measure_policies(
        self,
        model: CompressibleModel,
        ids: tuple[str, str],
        policies: Sequence[Policy],
        *,
        purpose: str,
        progress: Progress | None = None,
    ) -> list[Measured]:
        """Time each policy interleaved with the dense model; keep the records with the device's
        measurements. One result per policy, in order (a failed one carries its error)."""
        ...

    def refit(self, base: LoadedPredictor, note: Mapping[str, Any]) -> LoadedPredictor:
        """``base``'s kind refitted on every measurement of the device, stored as a new version."""
        ...


def predict_with_std(
    predictor: Predictor, space: SearchSpace, policies: Sequence[Policy]
) -> tuple[np.ndarray, np.ndarray]:
    """(latency ms, standard deviation ms) of each policy; the deviation is NaN for a predictor
    that does not say how sure it is (no ``predict_uncertainty``).

    The latency is always ``predict``'s (what the search callback and exports report), the
    deviation ``predict_uncertainty``'s, so a candidate's latency does not depend on whether
    its predictor also estimates its spread.
    """
    if not policies:
        return np.zeros(0), np.zeros(0)
    ms = np.asarray(predictor.predict(space, list(policies)), dtype=np.float64)
    std = np.full(len(policies), np.nan)
    uncertain = getattr(predictor, "predict_uncertainty", None)
    if callable(uncertain):
        got = np.asarray(uncertain(space, list(policies))[1], dtype=np.float64)
        if got.shape == std.shape:
            std = np.where(np.isfinite(got) & (got >= 0), got, np.nan)
    return ms, std


class JobPredictor:
    """The predictor a job scores latency with, its version, and each candidate's predicted std."""

    def __init__(self, loaded: LoadedPredictor, space: SearchSpace) -> None:
        self.loaded = loaded
        self.space = space
        self.live = PredictedLatency(loaded.predictor, space)
        self.std: dict[str, float] = {}

    @property
    def version(self) -> int:
        return int(self.loaded.version)

    @property
    def kind(self) -> str:
        return str(self.loaded.kind)

    def swap(self, loaded: LoadedPredictor) -> None:
        self.loaded = loaded
        self.live.predictor = loaded.predictor

    def predict(self, policies: Sequence[Policy]) -> tuple[np.ndarray, np.ndarray]:
        ms, std = predict_with_std(self.loaded.predictor, self.space, policies)
        for p, s in zip(policies, std, strict=True):
            if math.isfinite(float(s)):
                self.std[p.hash] = float(s)
        return ms, std

    def std_of(self, policy_hash: str) -> float | None:
        return self.std.get(policy_hash)

    def rescore(self, policies: Sequence[Policy], scores: Sequence[Score]) -> list[Score]:
        """New candidates' scores with latency from the current predictor (what workers cannot know)."""
        ok = [i for i, s in enumerate(scores) if s.ok]
        if not ok:
            return list(scores)
        ms, _std = self.predict([policies[i] for i in ok])
        out = list(scores)
        for j, i in enumerate(ok):
            out[i] = dataclasses.replace(scores[i], latency_ms=float(ms[j]))
        return out

    def repredict(self, scores: Sequence[Score], policies: Sequence[Policy]) -> list[Score]:
        """Every scored candidate re-predicted with the current predictor (failed ones unchanged)."""
        return self.rescore(policies, scores)


def speedup_errors(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """MAPE and the share within ±10 % / ±5 % of predicted against measured speedups (with n)."""
    from latency_models.predictors.base import error_metrics

    pairs = [
        (p, m)
        for p, m in zip(predicted, measured, strict=True)
        if math.isfinite(p) and math.isfinite(m) and p > 0 and m > 0
    ]
    if not pairs:
        return {"n": 0.0}
    got = error_metrics(np.array([p for p, _ in pairs]), np.array([m for _, m in pairs]), "speedup_")
    return {"n": float(len(pairs)), **{k: round(v, 3) for k, v in got.items() if k != "speedup_rmse"}}


def _spread(items: Sequence[Any], k: int) -> list[Any]:
    n = len(items)
    if k >= n:
        return list(items)
    if k <= 0:
        return []
    if k == 1:
        return [items[0]]
    return [items[i] for i in sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})]


def _predicted_speedups(jp: JobPredictor, policies: Sequence[Policy]) -> tuple[list[float], float]:
    """Predicted speedups over dense of ``policies`` with the job's current predictor, and its
    dense prediction."""
    ms, _std = predict_with_std(jp.loaded.predictor, jp.space, [Policy.dense(), *policies])
    dense = float(ms[0])
    return [dense / float(v) if v > 0 else math.nan for v in ms[1:]], dense


def _measured_info(m: Measured, predicted: float, statistic: str, round_no: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "measured_ms": m.latency_ms,
        "speedup": m.speedup(statistic),
        "predicted_speedup_before": round(predicted, 4) if math.isfinite(predicted) else None,
        "statistic": statistic,
    }
    if round_no is not None:
        out["round"] = round_no
    return out


def draw_policies(space: SearchSpace, n: int, seed: int) -> list[Policy]:
    """``n`` distinct random policies of ``space`` (fewer when the space holds fewer), dense left out."""
    rng = random.Random(seed)
    seen = {Policy.dense().hash}
    out: list[Policy] = []
    for _ in range(n * DRAWS_PER_POLICY):
        if len(out) >= n:
            break
        p = space.sample(rng)
        if p.hash not in seen:
            seen.add(p.hash)
            out.append(p)
    return out


@dataclass(frozen=True)
class TopUp:
    """What a top-up did: the predictor to search with and the report for the job's progress."""

    loaded: LoadedPredictor
    report: dict[str, Any]


def topup(
    device: MeasuringDevice,
    model: CompressibleModel,
    ids: tuple[str, str],
    jp_space: SearchSpace,
    loaded: LoadedPredictor,
    n: int,
    *,
    seed: int = 0,
    progress: Progress | None = None,
) -> TopUp:
    """Measure ``n`` random policies of the job's space on the device, then refit (see the module
    docstring). Returns the refitted predictor, or ``loaded`` when nothing could be timed.

    Raises:
        CalibrationStopped: the job was cancelled meanwhile.
    """
    started = time.monotonic()
    policies = draw_policies(jp_space, n, seed)
    jp = JobPredictor(loaded, jp_space)
    report: dict[str, Any] = {"total": len(policies), "base_version": loaded.version}
    try:
        measured = device.measure_policies(model, ids, policies, purpose="topup", progress=progress)
        ok = [m for m in measured if m.ok]
        report["measured"] = len(ok)
        report["skipped"] = len(measured) - len(ok)
        if not ok:
            report["note"] = "no policy of the model could be timed: " + next(
                (str(m.error) for m in measured if m.error), "nothing to time"
            )
            return TopUp(loaded, _timed(report, started))
        predicted, _dense = _predicted_speedups(jp, [m.policy for m in ok])
        statistic = loaded.predictor.statistic
        report["error_before_refit"] = speedup_errors(
            predicted, [m.speedup(statistic) or math.nan for m in ok]
        )
        new = device.refit(loaded, {"topup": len(ok), "error_before_refit": report["error_before_refit"]})
    except CalibrationStopped:
        raise
    except Exception as exc:  # the device has a predictor: search with it rather than fail the job
        log.warning("top-up failed: %s", exc)
        report["note"] = (
            f"top-up failed, searching with version {loaded.version}: {type(exc).__name__}: {exc}"[:500]
        )
        return TopUp(loaded, _timed(report, started))
    report["version"] = new.version
    return TopUp(new, _timed(report, started))


def _timed(report: dict[str, Any], started: float) -> dict[str, Any]:
    return {**report, "seconds": round(time.monotonic() - started, 1)}


class ActiveMeasurer:
    """Rounds of measurements during a search, each followed by a refit (see the module docstring).

    Args:
        spec: the job's ``active_measurement``.
        device: how the job measures and refits.
        model / ids: the job's model and its (arch_id, space_id).
        predictor: the job's predictor (swapped after each refit).
        budget_candidates / budget_seconds: the search's budget (a round's timing follows it).
        progress: receives the report after each round (and when measuring starts).
        should_stop: True when the job was cancelled (no round starts then).
        measured_before: measurements a resumed job's candidates already carry (by policy hash).
        rounds_before: rounds that resumed job already ran.
    """

    def __init__(
        self,
        spec: ActiveMeasurementSpec,
        *,
        device: MeasuringDevice,
        model: CompressibleModel,
        ids: tuple[str, str],
        predictor: JobPredictor,
        budget_candidates: int | None,
        budget_seconds: float | None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        phase: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        measured_before: Mapping[str, Mapping[str, Any]] | None = None,
        rounds_before: int = 0,
    ) -> None:
        self.spec = spec
        self.device = device
        self.model = model
        self.ids = ids
        self.jp = predictor
        self.budget_candidates = budget_candidates
        self.budget_seconds = budget_seconds
        self._progress = progress
        self._phase = phase
        self.should_stop = should_stop
        self.limit = spec.limit(budget_candidates)
        self.rounds = math.ceil(self.limit / spec.per_round) if self.limit else 0
        # the limit split evenly over the rounds (9 in rounds of at most 8: 5 and 4, not 8 and 1)
        self.round_size = math.ceil(self.limit / self.rounds) if self.rounds else 0
        self.measured: dict[str, dict[str, Any]] = {h: dict(v) for h, v in (measured_before or {}).items()}
        self.attempted: set[str] = set(self.measured)
        self.rounds_done = rounds_before
        self.refits = 0
        self.started = time.monotonic()
        self.pairs: list[tuple[float, float]] = []  # (predicted before refit, measured) speedups
        self.last_round: dict[str, Any] | None = None
        self.note: str | None = None
        self.stopped = self.limit == 0
        self.seconds = 0.0

    # -- reporting -------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """What the job's progress shows under ``active_measurement``."""
        out: dict[str, Any] = {
            "measured": len(self.measured),
            "limit": self.limit,
            "rounds": self.rounds_done,
            "rounds_planned": self.rounds,
            "refits": self.refits,
            "predictor_version": self.jp.version,
            "seconds": round(self.seconds, 1),
            "error_before_refit": speedup_errors([p for p, _ in self.pairs], [m for _, m in self.pairs]),
        }
        if self.last_round is not None:
            out["last_round"] = self.last_round
        if self.note:
            out["note"] = self.note
        return out

    def extra_of(self, policy_hash: str) -> dict[str, Any]:
        """Keys a candidate's ``extra`` gets: its predicted std, and its measurement when it had one."""
        out: dict[str, Any] = {}
        std = self.jp.std_of(policy_hash)
        if std is not None:
            out["latency_std_ms"] = round(std, 6)
        if policy_hash in self.measured:
            out["active"] = self.measured[policy_hash]
        return out

    # -- rounds ----------------------------------------------------------------------

    def _due(self, done: int) -> bool:
        if self.stopped or self.rounds_done >= self.rounds or len(self.measured) >= self.limit:
            return False
        fraction = 0.0
        if self.budget_candidates:
            fraction = done / self.budget_candidates
        if self.budget_seconds:
            fraction = max(fraction, (time.monotonic() - self.started) / self.budget_seconds)
        return fraction >= (self.rounds_done + 1) / (self.rounds + 1) - 1e-9

    def _choose(self, candidates: Sequence[Candidate], objective: Objective) -> list[Candidate]:
        want = min(self.round_size, self.limit - len(self.measured))
        open_ = [c for c in candidates if c.score.ok and c.policy.hash not in self.attempted]
        if want <= 0 or not open_:
            return []
        front_ix = pareto_front([c.score for c in candidates], objective)
        front = sorted(
            (candidates[i] for i in front_ix if candidates[i].policy.hash not in self.attempted),
            key=lambda c: (c.score.latency_ms, c.index),
        )
        chosen = _spread(front, want)
        taken = {c.policy.hash for c in chosen}
        rest = [c for c in open_ if c.policy.hash not in taken]
        rest.sort(key=lambda c: (-self._std(c.policy.hash), -c.index))
        return chosen + rest[: want - len(chosen)]

    def _std(self, policy_hash: str) -> float:
        """The predicted std, or -1 when unknown (equally unsure: after every known one)."""
        std = self.jp.std_of(policy_hash)
        return std if std is not None else -1.0

    def between_rounds(self, candidates: Sequence[Candidate], objective: Objective) -> list[Score] | None:
        """After a search round: when a measuring round is due, measure, refit and return every
        candidate's score re-predicted with the refitted predictor (None: nothing changed)."""
        if not self._due(len(candidates)) or self.should_stop():
            return None
        chosen = self._choose(candidates, objective)
        if not chosen:
            return None
        started = time.monotonic()
        round_no = self.rounds_done + 1
        try:
            updated = self._round(round_no, candidates, chosen)
        except CalibrationStopped:
            raise
        except Exception as exc:  # keep searching on the predictor the job has
            log.warning("active measurement stopped: %s", exc)
            self.stopped = True
            self.note = (
                f"active measurement stopped in round {round_no}, searching on version "
                f"{self.jp.version}: {type(exc).__name__}: {exc}"
            )[:500]
            updated = None
        finally:
            self.seconds += time.monotonic() - started
            self.rounds_done = round_no
        if self._progress is not None:
            self._progress(self.report())
        return updated

    def _round(
        self, round_no: int, candidates: Sequence[Candidate], chosen: Sequence[Candidate]
    ) -> list[Score] | None:
        policies = [c.policy for c in chosen]
        self.attempted.update(p.hash for p in policies)
        name = f"measuring on the device, round {round_no}/{self.rounds}"

        def progress(done: int, total: int) -> None:
            if self._phase is not None:
                self._phase(f"{name}: {done}/{total}")

        progress(0, len(policies))
        measured = self.device.measure_policies(
            self.model, self.ids, policies, purpose="active", progress=progress
        )
        ok = [m for m in measured if m.ok]
        statistic = self.jp.loaded.predictor.statistic
        predicted, _dense = _predicted_speedups(self.jp, [m.policy for m in ok])
        speedups = [m.speedup(statistic) for m in ok]
        for m, p in zip(ok, predicted, strict=True):
            self.measured[m.policy.hash] = _measured_info(m, p, statistic, round_no)
        pairs = [(p, s) for p, s in zip(predicted, speedups, strict=True) if s is not None]
        self.pairs.extend(pairs)
        errors = speedup_errors([p for p, _ in pairs], [s for _, s in pairs])
        self.last_round = {
            "round": round_no,
            "measured": len(ok),
            "skipped": len(measured) - len(ok),
            "error_before_refit": errors,
            "points": [
                {
                    "policy_hash": m.policy.hash,
                    "predicted_speedup": round(p, 4) if math.isfinite(p) else None,
                    "measured_speedup": s,
                    "std_ms": self.jp.std_of(m.policy.hash),
                }
                for m, p, s in zip(ok, predicted, speedups, strict=True)
            ],
        }
        if not ok:
            return None
        note = {"round": round_no, "measured": len(ok), "error_before_refit": errors}
        self.jp.swap(self.device.refit(self.jp.loaded, note))
        self.refits += 1
        self.last_round["version"] = self.jp.version
        return self.repredict(candidates)

    def repredict(self, candidates: Sequence[Candidate]) -> list[Score]:
        """Every candidate's score with the current predictor (and its measured latency, if any)."""
        scores = self.jp.repredict([c.score for c in candidates], [c.policy for c in candidates])
        out = []
        for c, s in zip(candidates, scores, strict=True):
            got = self.measured.get(c.policy.hash)
            ms = got.get("measured_ms") if got else None
            out.append(dataclasses.replace(s, measured_latency_ms=float(ms)) if ms is not None else s)
        return out
