"""Family search: K nested operating points for K latency budgets, one shared weight set.

``search_family`` finds, for budgets ``f_1 > f_2 > … > f_K`` (fractions of the dense model's
latency on the device), K policies that nest (``compression.family``): each keeps a subset of
the previous one's channels and weights, at no more precise bits. It uses the rule agent's
sensitivity machinery (``agents.sensitivity``: single moves — skip a residual block, narrow
a channel group, one layer int8, one layer sparse — probed and ranked by accuracy lost per
latency saved) along **one chain**:

1. from the current policy (the dense model first), every open *tightening* move is probed
   (scored for real: applied, re-fitted, BatchNorm recalibrated, accuracy on the validation
   subset, latency from the device's callback); a kind of move whose first probes save no
   latency on this device is dropped, as the rule agent does;
2. if some probed move alone reaches the current target, the most accurate of them is the
   point; otherwise the moves are applied in order of efficiency, each prefix scored, until
   the estimated saving covers the gap to the target, and step 1 runs again from there
   (effects change as the model shrinks, so the chain is re-probed rather than trusted);
3. the policy that first meets target k is point k, and the chain goes on from it to target
   k + 1. The K points are therefore prefixes of one ordering of moves: nested by construction.

A point is scored as the search scores any candidate (its own least-squares refit); the
family is then built with one shared weight set (``compression.family.build_family``, joint
refit by default) and every point re-scored as it will run, both figures kept. The search
stops early when ``budget_candidates`` scores are spent; points not reached then are missing
from the result (``note`` says so).

``make_family`` runs the whole product path: search, shared weights, joint fine-tuning when
asked (``compression.family_distill``), the bundle (``compression.family_export``), each
point's latency measured against the dense model in one interleaved run
(``latency_models.harness.measure_pair``) and its accuracy on the validation (and test) split
from the bundle's own graph, all in the bundle's ``family.json``, which
``modeltailor.switch.FamilySwitch`` reads.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents import Score
from agents.sensitivity import MIN_SAVING, PROBES_BEFORE_DROP, Move, apply_move, candidate_moves, kind_of
from compression.data import Dataset, calibration_batches
from compression.evaluate import accuracy
from compression.family import Family, FamilyRecovery, build_family
from compression.model_io import CompressibleModel
from compression.policy import Policy
from compression.space import SearchSpace, SpaceOptions
from compression.space_builder import space_for
from engine.search import Candidate, DeviceLatency, Evaluator
from latency_models.devices import Device

__all__ = [
    "FamilyPointResult",
    "FamilySearchResult",
    "check_budgets",
    "make_family",
    "search_family",
]

#: Relative narrowing of one width move (finer than the sensitivity probes' halving, so the
#: chain can stop close to each target).
WIDTH_FACTOR = 0.75
#: Fine-grained schemes whose masks stay valid when intersected with an earlier point's.
NESTABLE_SCHEMES = ("unstructured", "nm")
MAX_BUDGETS = 8
MANIFEST = "family.json"
FORMAT = "modeltailor-family"


def check_budgets(budgets: Sequence[float]) -> tuple[float, ...]:
    """The budgets as a tuple, or ValueError naming the problem and the fix."""
    out = tuple(float(b) for b in budgets)
    if not 1 <= len(out) <= MAX_BUDGETS:
        raise ValueError(f"give 1 to {MAX_BUDGETS} latency budgets, got {len(out)}")
    if any(not (0.0 < b <= 1.0) or not math.isfinite(b) for b in out):
        raise ValueError(f"each budget is a fraction of the dense latency in (0, 1], got {list(out)}")
    if any(b <= c for b, c in itertools.pairwise(out)):
        raise ValueError(f"budgets must decrease strictly (e.g. 1.0, 0.7, 0.5, 0.35), got {list(out)}")
    return out


@dataclass(frozen=True)
class FamilyPointResult:
    """One operating point of a family search.

    Attributes:
        budget: its latency budget as a fraction of the dense latency.
        target_ms: that budget in milliseconds on the device.
        policy: the point's policy (nested in the previous point's).
        score: as the search scored it (the point's own refit).
        moves: the chain's moves from the previous point to this one.
        shared_score: as it runs from the shared weights (filled by :func:`score_family`).
    """

    budget: float
    target_ms: float
    policy: Policy
    score: Score
    moves: tuple[Move, ...] = ()
    shared_score: Score | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "target_ms": self.target_ms,
            "policy": self.policy.to_dict(),
            "policy_hash": self.policy.hash,
            "score": self.score.to_dict(),
            "shared_score": self.shared_score.to_dict() if self.shared_score is not None else None,
            "moves": [list(m) for m in self.moves],
        }


@dataclass
class FamilySearchResult:
    """The points found (in budget order), the dense reference and every scored candidate."""

    dense: Score
    points: list[FamilyPointResult]
    candidates: list[Candidate]
    budgets: tuple[float, ...]
    note: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "dense": self.dense.to_dict(),
            "budgets": list(self.budgets),
            "points": [p.to_dict() for p in self.points],
            "candidates": len(self.candidates),
            "note": self.note,
            "seconds": round(self.seconds, 2),
        }


class _Budget(Exception):
    """The candidate budget ran out."""


class _Stopped(_Budget):
    """``should_stop`` said stop (a job cancelled, out of time, or yielding its slot)."""


class _Chain:
    """Scores policies once each, under the search's candidate budget."""

    def __init__(
        self,
        evaluator: Evaluator,
        space: SearchSpace,
        limit: int | None,
        on_candidate: Callable[[Candidate], None] | None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.evaluator = evaluator
        self.space = space
        self.limit = limit
        self.on_candidate = on_candidate
        self.should_stop = should_stop
        self.cache: dict[str, Candidate] = {}
        self.candidates: list[Candidate] = []
        self.kind_saves: dict[str, list[bool]] = {}

    def score(self, policy: Policy) -> Score:
        hit = self.cache.get(policy.hash)
        if hit is not None:
            return hit.score
        if self.should_stop is not None and self.should_stop():
            raise _Stopped
        if self.limit is not None and len(self.candidates) >= self.limit:
            raise _Budget
        score = self.evaluator.evaluate(policy)
        cand = Candidate(len(self.candidates), policy, score, score.ok)
        self.cache[policy.hash] = cand
        self.candidates.append(cand)
        if self.on_candidate is not None:
            self.on_candidate(cand)
        return score

    def moves(self, policy: Policy) -> list[Move]:
        """Tightening moves open from ``policy``, largest MACs first, of kinds still alive."""
        out: list[tuple[float, Move]] = []
        for macs, move in candidate_moves(self.space, policy):
            if move[0] == "bits" and move[2] is None:
                continue  # back to float: never a tightening
            if move[0] == "width":
                move = ["width", move[1], WIDTH_FACTOR]
            if move[0] == "sparse" and move[2].get("scheme") not in NESTABLE_SCHEMES:
                continue
            history = self.kind_saves.get(kind_of(move, self.space), [])
            if len(history) >= PROBES_BEFORE_DROP and not any(history):
                continue
            out.append((macs, move))
        out.sort(key=lambda mm: -mm[0])
        return [m for _, m in out]

    def probe(self, base: Policy, base_score: Score, moves: list[Move]) -> list[tuple[Move, Policy, Score]]:
        found: list[tuple[Move, Policy, Score]] = []
        for move in moves:
            kind = kind_of(move, self.space)
            history = self.kind_saves.setdefault(kind, [])
            if len(history) >= PROBES_BEFORE_DROP and not any(history):
                continue
            policy = apply_move(self.space, base, move)
            if policy is None:
                continue
            score = self.score(policy)
            if not score.ok:
                continue
            history.append(score.latency_ms <= base_score.latency_ms * (1.0 - MIN_SAVING))
            found.append((move, policy, score))
        return found


def _segment(
    chain: _Chain, start: Policy, start_score: Score, target: float
) -> tuple[Policy, Score, list[Move]]:
    """From ``start``, tighten until the latency is at most ``target`` (see the module docstring)."""
    cur, cur_score = start, start_score
    applied: list[Move] = []
    while cur_score.latency_ms > target:
        probes = chain.probe(cur, cur_score, chain.moves(cur))
        saving = [(m, p, s) for m, p, s in probes if s.latency_ms < cur_score.latency_ms]
        if not saving:
            raise ValueError(
                f"no move lowers the latency below {cur_score.latency_ms:.4g} ms towards the target "
                f"{target:.4g} ms: allow more of the space (width, depth, bits) or a looser budget"
            )
        # Least accuracy lost per millisecond saved first.
        ranked = sorted(
            saving,
            key=lambda mps: (
                (cur_score.accuracy - mps[2].accuracy) / (cur_score.latency_ms - mps[2].latency_ms)
            ),
        )
        reach = [(m, p, s) for m, p, s in saving if s.latency_ms <= target]
        if reach:
            m, p, s = max(reach, key=lambda mps: (mps[2].accuracy, -mps[2].latency_ms))
            # One move that lands on the target, unless the efficient moves together are
            # expected (effects added up) to get there losing less.
            if s.accuracy >= _chain_estimate(ranked, cur_score, target):
                return p, s, [*applied, m]
        base_ms = cur_score.latency_ms
        gap = base_ms - target
        estimated = 0.0
        moved = False
        for m, _p, s in ranked:
            nxt = apply_move(chain.space, cur, m)
            if nxt is None:
                continue
            nxt_score = chain.score(nxt)
            if not nxt_score.ok:
                continue
            cur, cur_score = nxt, nxt_score
            applied.append(m)
            moved = True
            estimated += base_ms - s.latency_ms  # the move's saving when probed alone
            if cur_score.latency_ms <= target or estimated >= gap:
                break
        if not moved:
            raise ValueError(
                f"the chain is stuck at {cur_score.latency_ms:.4g} ms above the target {target:.4g} ms"
            )
    return cur, cur_score, applied


def _chain_estimate(ranked: list[tuple[Move, Policy, Score]], base: Score, target: float) -> float:
    """Accuracy expected at the target from the efficient moves with their effects added up."""
    acc, ms = base.accuracy, base.latency_ms
    for _m, _p, s in ranked:
        acc -= base.accuracy - s.accuracy
        ms -= base.latency_ms - s.latency_ms
        if ms <= target:
            return acc
    return float("-inf")


def search_family(
    model: CompressibleModel,
    dataset: Dataset,
    *,
    device_latency: DeviceLatency,
    budgets: Sequence[float],
    space_options: SpaceOptions | None = None,
    budget_candidates: int | None = None,
    seed: int = 0,
    val_images: int = 1000,
    on_candidate: Callable[[Candidate], None] | None = None,
    previous: Sequence[Candidate] = (),
    should_stop: Callable[[], bool] | None = None,
) -> FamilySearchResult:
    """Find nested policies for ``budgets`` (fractions of the dense latency, strictly decreasing).

    Candidates are scored as ``engine.search.run_search`` scores them (same seed: same
    calibration batches and validation subset; pruned layers re-fitted).

    ``previous`` (a resumed job's stored candidates) are taken as scored: the chain, which is
    deterministic for a seed, walks through them again without scoring them, calling
    ``on_candidate`` or counting them against ``budget_candidates``. ``should_stop`` is polled
    before each new score; once true the search ends with the points reached (``note``).

    Raises:
        ValueError: bad budgets, the dense model cannot be scored, or no move saves latency.
    """
    fractions = check_budgets(budgets)
    evaluator = Evaluator(model, dataset, device_latency, val_images=val_images, seed=seed, reconstruct=True)
    return _search(
        evaluator,
        fractions,
        space_for(model, space_options),
        budget_candidates,
        on_candidate,
        previous=previous,
        should_stop=should_stop,
    )


def _search(
    evaluator: Evaluator,
    fractions: tuple[float, ...],
    space: SearchSpace,
    budget_candidates: int | None,
    on_candidate: Callable[[Candidate], None] | None,
    *,
    previous: Sequence[Candidate] = (),
    should_stop: Callable[[], bool] | None = None,
) -> FamilySearchResult:
    start = time.monotonic()
    dense = evaluator.evaluate(Policy.dense())
    if not dense.ok:
        raise ValueError(f"the dense model cannot be evaluated: {dense.error}")
    chain = _Chain(evaluator, space, budget_candidates, on_candidate, should_stop)
    chain.cache.update({c.policy.hash: c for c in previous})
    chain.cache[Policy.dense().hash] = Candidate(-1, Policy.dense(), dense, True)
    points: list[FamilyPointResult] = []
    cur, cur_score = Policy.dense(), dense
    note = ""
    try:
        for f in fractions:
            target = f * dense.latency_ms
            cur, cur_score, moves = _segment(chain, cur, cur_score, target)
            points.append(FamilyPointResult(f, target, cur, cur_score, tuple(moves)))
    except _Stopped:
        note = (
            f"the search was stopped (cancelled, or its time or candidate budget spent) after "
            f"{len(points)} of {len(fractions)} points"
        )
    except _Budget:
        note = (
            f"the candidate budget ({budget_candidates}) ran out after {len(points)} of {len(fractions)} "
            "points; raise it to reach the tighter budgets"
        )
    return FamilySearchResult(
        dense=dense,
        points=points,
        candidates=chain.candidates,
        budgets=fractions,
        note=note,
        seconds=time.monotonic() - start,
    )


def score_family(family: Family, evaluator: Evaluator) -> list[Score]:
    """Each point as it runs from the shared weights: accuracy on the evaluator's validation
    subset, latency from its device callback, size and MACs."""
    from compression.metrics import measure

    out: list[Score] = []
    for p in family.points:
        start = time.perf_counter()
        with torch.no_grad():
            acc = accuracy(p.cm.gm, evaluator.x_val, evaluator.y_val)
            m = measure(p.cm)
        latency = float(evaluator.device_latency(p.cm))
        out.append(
            Score(
                accuracy=acc,
                latency_ms=latency,
                size_bytes=float(m.size_bytes),
                macs=float(m.macs),
                eval_seconds=time.perf_counter() - start,
            )
        )
    return out


Progress = Callable[[str, dict[str, Any]], None]
"""(phase, details) as a family is made: "search", "shared", "finetune", "bundle", "measure"."""


@dataclass
class FamilyReport:
    """What :func:`make_family` made: the search, the shared-weight family, the bundle."""

    search: FamilySearchResult
    family: Family
    folder: Path
    manifest: dict[str, Any]
    finetune: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def make_family(
    model: CompressibleModel,
    dataset: Dataset,
    *,
    device: str,
    device_latency: DeviceLatency,
    budgets: Sequence[float],
    out: Path,
    latency_label: str = "",
    space_options: SpaceOptions | None = None,
    budget_candidates: int | None = None,
    seed: int = 0,
    recovery: FamilyRecovery = "joint",
    finetune_steps: int = 0,
    runs: int = 200,
    val_images: int = 1000,
    keep_standalone: bool = False,
    progress: Progress | None = None,
) -> FamilyReport:
    """Search a family, share its weights, fine-tune it jointly when ``finetune_steps`` > 0,
    write the bundle into ``out`` and measure every point there (``family.json``).

    ``device`` names the device the points are timed on (against the dense model, interleaved,
    ``runs`` runs each); ``device_latency`` is the search's latency source (its predictor,
    or measurements), ``latency_label`` says which, in the manifest.

    Raises:
        ValueError: bad budgets or recovery, no point found, or the search cannot start.
    """
    from compression.distill import KDBatches
    from compression.family_distill import distill_family
    from engine.finetune_front import config_for

    def say(phase: str, **info: Any) -> None:
        if progress is not None:
            progress(phase, info)

    fractions = check_budgets(budgets)
    evaluator = Evaluator(model, dataset, device_latency, val_images=val_images, seed=seed, reconstruct=True)
    space = space_for(model, space_options)

    def seen(cand: Candidate) -> None:
        say(
            "search",
            candidates=cand.index + 1,
            accuracy=cand.score.accuracy,
            latency_ms=cand.score.latency_ms,
        )

    search = _search(evaluator, fractions, space, budget_candidates, seen)
    if not search.points:
        raise ValueError(search.note or "the family search found no point")
    say("shared", recovery=recovery)
    with torch.no_grad():
        family = build_family(
            model, [p.policy for p in search.points], evaluator.calibration, recovery=recovery
        )
    shared = score_family(family, evaluator)
    search.points = [replace(p, shared_score=s) for p, s in zip(search.points, shared, strict=True)]
    tuned: dict[str, Any] | None = None
    if finetune_steps > 0:
        config = config_for(dataset, seed)
        batches = KDBatches(
            model.gm, dataset, batch_size=config.batch_size, seed=config.seed, augment=config.augment
        )

        def step(i: int, n: int, loss: float) -> None:
            if i == n or i % 10 == 0:
                say("finetune", step=i, steps=n, loss=loss)

        result = distill_family(family, batches, finetune_steps, config=config, progress=step)
        after = score_family(family, evaluator)
        tuned = {
            **result.to_dict(),
            "config": config.to_dict(),
            "one_shot_accuracy": [s.accuracy for s in shared],
            "finetuned_accuracy": [s.accuracy for s in after],
        }
        shared = after
        search.points = [replace(p, shared_score=s) for p, s in zip(search.points, shared, strict=True)]
    infos = [
        {
            "budget": p.budget,
            "target_ms": p.target_ms,
            "predicted_latency_ms": sh.latency_ms,
            "search_accuracy": p.score.accuracy,
            "shared_accuracy": sh.accuracy,
        }
        for p, sh in zip(search.points, shared, strict=True)
    ]
    manifest = bundle_family(
        family,
        dataset,
        device=device,
        out=out,
        runs=runs,
        seed=seed,
        points_info=infos,
        keep_standalone=keep_standalone,
        progress=progress,
        extra={
            "latency_source": latency_label,
            "recovery": recovery,
            "finetune": tuned,
            "dense_predicted_latency_ms": search.dense.latency_ms,
            "note": search.note,
        },
    )
    return FamilyReport(search=search, family=family, folder=out, manifest=manifest, finetune=tuned)


def bundle_family(
    family: Family,
    dataset: Dataset,
    *,
    device: str | Device,
    out: Path,
    runs: int = 200,
    seed: int = 0,
    points_info: Sequence[dict[str, Any]] | None = None,
    keep_standalone: bool = False,
    progress: Progress | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``family`` as a bundle into ``out``, time every point against the dense model on
    ``device`` (interleaved, ``runs`` runs), measure its accuracy from its bundle graph on the
    validation (and test) split, and write ``family.json``; returns the manifest.

    ``device`` is a built-in device's name or a :class:`~latency_models.devices.Device` (a
    service's device row). ``points_info`` adds fields to each point's entry (its budget,
    predicted latency, ...); ``extra`` to the manifest.
    """
    from compression.family_export import write_bundle
    from compression.onnx_export import onnx_accuracy
    from latency_models.harness import measure_pair

    def say(phase: str, **info: Any) -> None:
        if progress is not None:
            progress(phase, info)

    say("bundle", points=len(family.points))
    calib = [b.numpy() for b in calibration_batches(dataset, 8, 64, seed=seed)]
    files = write_bundle(
        family, out, calib, x_check=dataset.x_val[:32], keep_standalone=keep_standalone, with_dense=True
    )
    assert files.dense_file is not None
    x_test, y_test = dataset.x_test, dataset.y_test
    entries: list[dict[str, Any]] = []
    for k, pf in enumerate(files.points):
        say("measure", point=k, points=len(files.points))
        path = out / pf.file
        pair = measure_pair(files.dense_file, path, device, runs=runs)
        entry: dict[str, Any] = {
            "index": k,
            "file": pf.file,
            "accuracy": onnx_accuracy(path, dataset.x_val, dataset.y_val),
            "latency_ms": pair.b.median_ms,
            "dense_latency_ms": pair.a.median_ms,
            "speedup": pair.speedup,
            **(dict(points_info[k]) if points_info is not None else {}),
            "policy": family.points[k].policy.to_dict(),
            "graph_bytes": pf.graph_bytes,
            "standalone_bytes": pf.standalone_bytes,
            "shared_layers": len(pf.shared_layers),
            "private_layers": list(pf.private_layers),
            "max_rel_error": pf.max_rel_error,
        }
        if x_test is not None and y_test is not None:
            entry["test_accuracy"] = onnx_accuracy(path, x_test, y_test)
        entries.append(entry)
    dense: dict[str, Any] = {
        "accuracy": onnx_accuracy(files.dense_file, dataset.x_val, dataset.y_val),
        "latency_ms": float(np.median([e["dense_latency_ms"] for e in entries])),
    }
    if x_test is not None and y_test is not None:
        dense["test_accuracy"] = onnx_accuracy(files.dense_file, x_test, y_test)
    if not keep_standalone:
        import shutil

        shutil.rmtree(out / "standalone", ignore_errors=True)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": 1,
        "model": family.source.name,
        "input": {"name": "x", "shape": [None, *family.source.input_shape]},
        "device": device if isinstance(device, str) else device.name,
        "measured": {"runs": runs, "interleaved_with": "dense", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "recovery": family.recovery,
        "shared_weights": {
            "file": "weights.bin",
            "bytes": files.weights_bytes,
            "sha256": files.weights_sha256,
        },
        "sizes": files.sizes(),
        "dense": dense,
        "points": entries,
        **(extra or {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest
