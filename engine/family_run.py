"""The bodies behind family jobs: the search of a job with ``spec.family`` and its bundle export.

See ``engine.family_job`` for what is stored where. Resuming: a family job keeps no agent
state. A resumed job (its runner died, or it yielded its slot to another tenant) runs the
family search again from the dense model with the job's stored candidates as scored
(``engine.family.search_family``'s ``previous``): the chain is deterministic for a seed, so
it walks through them without scoring any twice and goes on where it stopped. (If the
device's predictor was refitted in between, the stored latencies stay those of the older
version; the chain then may take a different turn from the point where the new predictions
differ, and the new candidates carry the new version.)
"""

from __future__ import annotations

import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from compression.apply import CompressedModel
from compression.data import Dataset, calibration_batches
from compression.model_io import CompressibleModel
from compression.policy import Policy
from compression.space import SpaceOptions
from engine.family import FamilySearchResult, bundle_family, search_family
from engine.family_job import FAMILY_KEY, FamilyExportContext
from engine.job import ExportResult, JobContext, JobLatency
from engine.run import (
    _score_fields,
    device_of,
    load_job_dataset,
    load_job_model,
    report_remeasured,
    stored_candidates,
)
from engine.search import Candidate

__all__ = ["export_family", "family_extra", "run_family"]


def family_extra(job_id: int, result: FamilySearchResult) -> dict[str, dict[str, Any]]:
    """Policy hash -> the ``extra["family"]`` of that point's candidate (see ``engine.family_job``).

    Two budgets met by one policy (the chain already below the next target) are one candidate:
    ``points`` lists both, ``point`` and ``budget`` name the first.
    """
    siblings = [p.policy.hash for p in result.points]
    out: dict[str, dict[str, Any]] = {}
    for k, p in enumerate(result.points):
        h = p.policy.hash
        if h in out:
            out[h]["points"].append(k)
            continue
        out[h] = {
            "job_family": job_id,
            "point": k,
            "points": [k],
            "budget": p.budget,
            "target_ms": p.target_ms,
            "siblings": siblings,
            "moves": [list(m) for m in p.moves],
        }
    return out


def run_family(
    ctx: JobContext,
    model: CompressibleModel,
    dataset: Dataset,
    latency: Callable[[CompressedModel], float],
    options: SpaceOptions,
    version: int | None,
    kind: str | None,
    job_latency: JobLatency | None,
) -> FamilySearchResult | None:
    """Search the job's family, persisting every scored candidate, then mark its points.

    Returns the search's result, or None when the job lost its lease (or yielded its slot)
    before its points were marked: whoever holds it next marks them.

    Raises:
        ValueError: the search reached no point (the message says why).
    """
    spec = ctx.spec
    assert spec.family is not None
    previous = stored_candidates(ctx, feasible=True)  # the family search's cache

    def on_candidate(c: Candidate) -> None:
        ctx.persist_candidate(c.policy.to_dict(), c.policy.hash, _score_fields(c, version, kind))

    # The runner counts the stored candidates against the budget too (should_stop); this
    # limit makes the search's note say so when it is the budget that ends it.
    limit = spec.budget.candidates
    if limit is not None:
        limit = max(limit - len(previous), 0)
    with torch.no_grad():
        result = search_family(
            model,
            dataset,
            device_latency=latency,
            budgets=spec.family.budgets,
            space_options=options,
            budget_candidates=limit,
            seed=spec.seed,
            on_candidate=on_candidate,
            previous=previous,
            should_stop=ctx.should_stop,
        )
    if ctx.cancelled is not None and ctx.cancelled():
        return None
    if not result.points:
        raise ValueError(f"the family search reached no point: {result.note or 'no move saves latency'}")
    dense = Policy.dense()
    if any(p.policy == dense for p in result.points):  # a point at the dense latency: store it too
        scores = _score_fields(Candidate(-1, dense, result.dense, True), version, kind)
        ctx.persist_candidate(dense.to_dict(), dense.hash, scores)
    marks = family_extra(ctx.job_id, result)
    if ctx.rescore is not None:
        for p in result.points:
            mark = marks.pop(p.policy.hash, None)
            if mark is None:  # a policy serving two budgets: marked once
                continue
            # Same accuracy: only the extra changes (rescore merges it, the front stays).
            if not ctx.rescore(p.policy.hash, p.score.accuracy, {FAMILY_KEY: mark}):
                return None  # no longer ours (lease lost or slot yielded): the next claim marks them
    summary = {
        "budgets": list(result.budgets),
        "dense_latency_ms": result.dense.latency_ms,
        "points": [
            {
                "k": k,
                "budget": p.budget,
                "target_ms": p.target_ms,
                "policy_hash": p.policy.hash,
                "accuracy": p.score.accuracy,
                "latency_ms": p.score.latency_ms,
            }
            for k, p in enumerate(result.points)
        ],
        "note": result.note,
        "scored": len(result.candidates),
    }
    ctx.progress("phase", {FAMILY_KEY: summary, **({"note": result.note} if result.note else {})})
    if job_latency is not None and spec.remeasure_top_k > 0:
        _remeasure_points(ctx, job_latency, model, result)
    return result


def _remeasure_points(
    ctx: JobContext, job_latency: JobLatency, model: CompressibleModel, result: FamilySearchResult
) -> None:
    """Every distinct point timed on the device against dense (stored on its candidate)."""
    if job_latency.cancelled():
        return
    seen: dict[str, tuple[Policy, float | None]] = {}
    for p in result.points:
        seen.setdefault(p.policy.hash, (p.policy, p.score.latency_ms))
    report_remeasured(ctx, job_latency.remeasure(model, list(seen.values()), len(seen)))


def export_family(ctx: FamilyExportContext) -> ExportResult:
    """Build, write, measure and zip the family bundle of a finished family job.

    The shared weights are the joint least-squares refit of every point to the dense outputs
    (``compression.family``, on the search's calibration images), fine-tuned jointly for
    ``family.finetune_epochs`` epochs when the job asks; then ``engine.family.bundle_family``
    times each point against the dense model on the job's device (``runs`` interleaved runs)
    and scores it from its own graph on the validation (and test) split.

    Raises:
        ValueError: the job has no point, or its device does not run ONNX files in this process.
    """
    from compression.family import build_family

    spec = ctx.job_spec
    if spec.family is None or not ctx.points:
        raise ValueError(f"job {ctx.job_id} has no family points to export")
    if ctx.device.runtime != "onnxruntime" or ctx.device.kind == "remote":
        raise ValueError(
            f"a family bundle is ONNX timed in the server's process: device {ctx.device.name} "
            f"({ctx.device.kind}, {ctx.device.runtime}) cannot run it; use a local onnxruntime device"
        )
    seed = spec.seed
    dataset = load_job_dataset(ctx.dataset)
    model = load_job_model(ctx.model, dataset, ctx.data_dir, seed)
    device = device_of(ctx.device)
    # The search's calibration images (engine.search.Evaluator: 4 batches of 64, same seed).
    calibration = calibration_batches(dataset, 4, 64, seed=seed)
    ctx.progress({"phase": "sharing", "points": len(ctx.points)})
    with torch.no_grad():
        family = build_family(model, [Policy.from_dict(p.policy) for p in ctx.points], calibration)
    tuned = _finetune(ctx, model, dataset, family) if spec.family.finetune_epochs > 0 else None
    infos = [
        {
            "budget": p.budget,
            "target_ms": p.target_ms,
            "candidate_id": p.candidate_id,
            "policy_hash": p.policy_hash,
            "predicted_latency_ms": p.latency_ms,
            "search_accuracy": p.accuracy,
        }
        for p in ctx.points
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bundle"

        def say(phase: str, info: dict[str, Any]) -> None:
            ctx.progress({"phase": phase, **info})

        manifest = bundle_family(
            family,
            dataset,
            device=device,
            out=folder,
            runs=ctx.runs,
            seed=seed,
            points_info=infos,
            progress=say,
            extra={
                "job_id": ctx.job_id,
                "latency_source": f"the job's predictor of {device.name} (search); measured (points)",
                "recovery": family.recovery,
                "finetune": tuned,
                "budgets": list(spec.family.budgets),
            },
        )
        ctx.out_path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(ctx.out_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(folder).as_posix())
    # The artifact's metrics: the manifest less the points' policies (on their candidates).
    summary = {
        **manifest,
        "points": [{k: v for k, v in e.items() if k != "policy"} for e in manifest["points"]],
    }
    return ExportResult(path=ctx.out_path, metrics={FAMILY_KEY: summary})


def _finetune(
    ctx: FamilyExportContext, model: CompressibleModel, dataset: Dataset, family: Any
) -> dict[str, Any]:
    """Joint distillation of the shared weights (``compression.family_distill``), the job's epochs."""
    from compression.distill import KDBatches, steps_for_epochs
    from compression.family_distill import distill_family
    from engine.finetune_front import config_for

    assert ctx.job_spec.family is not None
    epochs = ctx.job_spec.family.finetune_epochs
    config = config_for(dataset, ctx.job_spec.seed)
    steps = steps_for_epochs(epochs, len(dataset.x_train), config.batch_size)
    batches = KDBatches(
        model.gm, dataset, batch_size=config.batch_size, seed=config.seed, augment=config.augment
    )

    def step(i: int, n: int, loss: float) -> None:
        if i == n or i % 10 == 0:
            ctx.progress({"phase": "finetune", "step": i, "steps": n, "loss": loss})

    result = distill_family(family, batches, steps, config=config, progress=step)
    return {**result.to_dict(), "config": config.to_dict(), "epochs": epochs}
