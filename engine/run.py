"""The bodies behind ``engine.job.run_job`` / ``export_candidate``: one job's search and one export.

Kept apart from the contract so the service imports the contract without torch. In the
service a job's latency comes from its device's predictor (``ctx.latency``, which the
service implements over its database): a device without one is calibrated first (the
job's progress says "calibrating 37/48"), the dense baseline is stored as soon as it is
known, and at the end the top-k points of the front are measured on the device beside
their predicted latency. Without ``ctx.latency`` each candidate is measured instead
(slower, always honest).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from agents import Objective, Score
from compression import Policy, compress
from compression.apply import CompressedModel
from compression.data import Dataset, calibration_batches, load_builtin, load_npz
from compression.mixed_precision import float_graph
from compression.model_io import CompressibleModel
from compression.onnx_export import export_onnx, onnx_accuracy
from compression.resolve import resolve_model
from compression.space import SpaceOptions
from compression.space_builder import space_for
from engine.active_measurement import JobPredictor
from engine.device_latency import measured_latency
from engine.device_space import latency_matters, resolve_space
from engine.job import (
    DatasetRef,
    DeviceRef,
    ExportContext,
    ExportResult,
    JobContext,
    JobLatency,
    ModelRef,
    Scores,
)
from engine.job_measuring import JobLabels, topup_job
from engine.search import Candidate, Evaluator, Progress, SearchResult, run_search
from engine.spec import JobSpec
from latency_models.capabilities import Capabilities
from latency_models.devices import Device
from latency_models.focus import model_ids
from latency_models.harness import measure_pair

SEARCH_RUNS = 60  # timed runs per candidate when measuring during search (no predictor yet)


def load_job_dataset(ref: DatasetRef) -> Dataset:
    if ref.builtin:
        return load_builtin(ref.builtin)
    assert ref.path is not None
    return load_npz(ref.path, name=ref.name)


def load_job_model(ref: ModelRef, dataset: Dataset, data_dir: Path, seed: int = 0) -> CompressibleModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec: str | Path = ref.zoo if ref.zoo else ref.path  # type: ignore[assignment]
        return resolve_model(spec, dataset, seed=seed, cache_dir=data_dir / "zoo")


def device_of(ref: DeviceRef) -> Device:
    return Device.from_dict(
        {"name": ref.name, "runtime": ref.runtime, "threads": ref.threads, "settings": ref.settings}
    )


def _score_fields(c: Candidate, version: int | None = None, kind: str | None = None) -> Scores:
    s = c.score
    extra: dict[str, Any] = {"error": s.error} if s.error else {}
    if kind:
        extra["predictor"] = kind
    return Scores(
        accuracy=s.accuracy,
        latency_ms=s.latency_ms,
        predictor_version=version,
        measured_latency_ms=s.measured_latency_ms,
        size_bytes=int(s.size_bytes),
        macs=int(s.macs),
        eval_seconds=s.eval_seconds,
        extra=extra,
    )


def _pinned_version(ctx: JobContext) -> int | None:
    """The predictor version a resumed job's candidates were last scored with (the newest: a
    refit re-predicts every candidate, and version numbers grow on a device)."""
    versions = [d.scores.predictor_version for d in ctx.done if d.scores.predictor_version is not None]
    return max(versions) if versions else None


def execute(ctx: JobContext) -> None:
    """Resume or start the job's search; persists every candidate as it is scored."""
    spec = ctx.spec
    seed = spec.seed
    ctx.progress("phase", {"phase": "loading", "message": "loading model and data"})
    dataset = load_job_dataset(ctx.dataset)
    model = load_job_model(ctx.model, dataset, ctx.data_dir, seed)
    device = device_of(ctx.device)
    objective = spec.objective()
    # The space's unset keys follow what the device's calibration measured (its predictor's).
    resolved = resolve_space(spec.space, None, latency_objective=latency_matters(spec))
    job_latency = ctx.latency(ctx) if ctx.latency is not None else None
    version: int | None = None
    kind: str | None = None
    jp: JobPredictor | None = None
    ids: tuple[str, str] = ("", "")
    latency: Callable[[CompressedModel], float]
    try:
        if job_latency is not None:
            ids = model_ids(model, ctx.model.sha256, ctx.model.zoo)
            loaded = job_latency.ensure_predictor(model, ids, pinned=_pinned_version(ctx))
            caps = Capabilities.from_stored(loaded.capabilities)
            resolved = resolve_space(spec.space, caps, latency_objective=latency_matters(spec))
            space = space_for(model, resolved.options)
            if spec.calibrate == "model" and not ctx.done and not job_latency.model_seen(ids):
                loaded = topup_job(ctx, job_latency, model, ids, space, loaded)
            version, kind = loaded.version, loaded.kind
            jp = JobPredictor(loaded, space)
            latency = jp.live
            source = f"predictor v{version} ({kind}) of {device.name}"
        else:
            latency = measured_latency(device, runs=SEARCH_RUNS, warmup=10)
            source = f"measured on {device.name}"
        options = resolved.options
        ctx.progress("phase", {"phase": "baseline", "message": "scoring the dense model"})
        with torch.no_grad():
            dense = Evaluator(model, dataset, latency, seed=seed).evaluate(Policy.dense())
        if not dense.ok:
            raise ValueError(f"the dense model cannot be evaluated: {dense.error}")
        dense_measured = job_latency.measure_dense(model) if job_latency is not None else None
        baseline = Scores(
            accuracy=dense.accuracy,
            latency_ms=dense.latency_ms,
            predictor_version=version,
            measured_latency_ms=dense_measured,
            size_bytes=int(dense.size_bytes),
            macs=int(dense.macs),
        )
        ctx.set_baseline(baseline)
        ctx.progress(
            "phase",
            {
                "phase": "searching",
                "latency_source": source,
                "predictor_version": version,
                "space": resolved.to_dict(),
            },
        )
        if spec.family is not None:  # K nested points instead of a front (engine.family_run)
            from engine.family_run import run_family

            run_family(ctx, model, dataset, latency, options, version, kind, job_latency)
            return
        labels = None
        if job_latency is not None and jp is not None:
            labels = JobLabels(ctx, job_latency, jp, baseline, model=model, ids=ids)
        result = _search(ctx, model, dataset, latency, objective, options, version, kind, labels)
        if labels is not None and labels.version != version:  # refitted: dense on the same predictor
            baseline = labels.baseline
            dense_score = dataclasses.replace(result.dense.score, latency_ms=baseline.latency_ms or 0.0)
            result = dataclasses.replace(result, dense=dataclasses.replace(result.dense, score=dense_score))
        if spec.finetune.top_k > 0 and result.pareto:
            from engine.finetune_front import finetune_job_front

            # Before re-measuring: the front may move once fine-tuned accuracies are in.
            result = finetune_job_front(ctx, model, dataset, result)
        if not result.pareto:
            ctx.progress("phase", {"note": no_feasible_note(spec, result)})
        if job_latency is not None:
            _finish_latency(ctx, job_latency, model, result, baseline)
    finally:
        if job_latency is not None:
            job_latency.close()


def _search(
    ctx: JobContext,
    model: CompressibleModel,
    dataset: Dataset,
    latency: Callable[[Any], float],
    objective: Objective,
    options: SpaceOptions,
    version: int | None,
    kind: str | None,
    labels: JobLabels | None = None,
) -> SearchResult:
    previous = stored_candidates(ctx, feasible=False)  # run_search re-derives it against this run's dense
    if labels is not None:
        versions = [d.scores.predictor_version for d in sorted(ctx.done, key=lambda d: d.index)]
        previous = labels.previous(previous, versions)
    state: dict[str, Any] | None = json.loads(ctx.agent_state) if ctx.agent_state else None
    last_state: list[bytes | None] = [ctx.agent_state]
    budget = ctx.spec.budget

    def on_candidate(c: Candidate) -> None:
        scores = _score_fields(c, version, kind)
        if labels is not None:  # the job's current predictor version, the candidate's std
            extra = {**scores.extra, **labels.extra_of(c.policy.hash)}
            scores = dataclasses.replace(scores, predictor_version=labels.version, extra=extra)
        ctx.persist_candidate(c.policy.to_dict(), c.policy.hash, scores, agent_state=last_state[0])

    def on_progress(p: Progress) -> None:
        last_state[0] = json.dumps(p.agent_state()).encode()

    with torch.no_grad():
        return run_search(
            model,
            dataset,
            device_latency=latency,
            algorithm=ctx.spec.algorithm,
            budget_candidates=budget.candidates,
            budget_seconds=budget.seconds,
            seed=ctx.spec.seed,
            objective=objective,
            space_options=options,
            on_candidate=on_candidate,
            on_progress=on_progress,
            agent_state=state,
            previous=previous,
            should_stop=ctx.should_stop,
            executor=ctx.make_executor,  # local pool or Ray workers, from the settings
            reconstruct=ctx.spec.reconstruct,
            recovery=ctx.spec.recovery,
            rescore=labels.jp.rescore if labels is not None else None,
            between_rounds=labels.between_rounds if labels is not None else None,
        )


def no_feasible_note(spec: JobSpec, result: SearchResult) -> str:
    """Why a finished search has an empty front: what was bounded, and what dense scored."""
    dense = result.dense.score
    bounds = ", ".join(f"{name} <= {bound.max:g}" for name, bound in spec.constraints.items())
    scored = sum(c.score.ok for c in result.candidates)
    return (
        f"no feasible candidate found: none of the {scored} scored candidates met the constraints "
        f"({bounds or 'none'}); dense model: accuracy {dense.accuracy:.4f}, latency "
        f"{dense.latency_ms:.4g} ms, size {dense.size_bytes:.0f} bytes. Loosen a bound or raise the budget."
    )


def _finish_latency(
    ctx: JobContext, job_latency: JobLatency, model: CompressibleModel, result: SearchResult, baseline: Scores
) -> None:
    """Top-k of the front measured on the device; a remote dense timing collected."""
    if job_latency.cancelled():
        return
    k = ctx.spec.remeasure_top_k
    front = [(c.policy, c.score.latency_ms) for c in result.pareto if c.score.ok]
    points = job_latency.remeasure(model, front, k) if k > 0 else []
    if job_latency.remote and baseline.measured_latency_ms is None:
        measured = job_latency.dense_result(5.0 if not points else 60.0)
        if measured is not None:
            ctx.set_baseline(dataclasses.replace(baseline, measured_latency_ms=measured))
    report_remeasured(ctx, points)


def stored_candidates(ctx: JobContext, *, feasible: bool) -> list[Candidate]:
    """The job's stored candidates, in index order, as the search's ``Candidate``s (a resume's
    cache: scored already), each marked ``feasible``."""
    return [
        Candidate(
            d.index,
            Policy.from_dict(d.policy),
            Score(
                accuracy=d.scores.accuracy or 0.0,
                latency_ms=d.scores.latency_ms or 0.0,
                size_bytes=float(d.scores.size_bytes or 0),
                macs=float(d.scores.macs or 0),
                eval_seconds=d.scores.eval_seconds or 0.0,
                error=(d.scores.extra or {}).get("error"),
            ),
            feasible=feasible,
        )
        for d in sorted(ctx.done, key=lambda d: d.index)
    ]


def report_remeasured(ctx: JobContext, points: Sequence[Any]) -> None:
    """The job's ``remeasured`` progress event: each re-measured point, predicted vs measured."""
    if not points:
        return
    ctx.progress(
        "remeasured",
        {
            "points": [
                {
                    "policy_hash": p.policy_hash,
                    "predicted_ms": p.predicted_ms,
                    "measured_ms": p.measured_ms,
                    "speedup": p.speedup,
                    "error": p.error,
                }
                for p in points
            ]
        },
    )


def _export_model(
    ctx: ExportContext, model: CompressibleModel, dataset: Dataset, policy: Policy
) -> CompressedModel | None:
    """The fine-tuned model when the job's fine-tuning raised this candidate's accuracy (replayed:
    same batches, same weights) or the export asks for ``finetune_epochs``; else None.

    Distillation from the dense model, masks and quantizers held (``compression.distill``).
    """
    from compression.distill import steps_for_epochs
    from engine.finetune_front import config_for, replay

    more = 0
    if ctx.finetune_epochs > 0:
        batch = config_for(dataset, ctx.job_spec.seed).batch_size
        more = steps_for_epochs(ctx.finetune_epochs, len(dataset.x_train), batch)

    def progress(step: int, steps: int, loss: float) -> None:
        if step == steps or step % 10 == 0:
            ctx.progress({"phase": "finetune", "step": step, "steps": steps, "loss": loss})

    return replay(
        model,
        dataset,
        policy,
        ctx.scores.extra or {},
        seed=ctx.job_spec.seed,
        reconstruct=ctx.job_spec.reconstruct,
        recovery=ctx.job_spec.recovery,
        min_steps=more,
        progress=progress,
    )


def export(ctx: ExportContext) -> ExportResult:
    """Build the candidate, write ONNX and measure it against dense.

    The file is all int8 QDQ when asked; otherwise each layer runs at the precision its bits
    give it on ONNX Runtime (``compression.mixed_precision``: int8 QDQ, 4-bit MatMulNBits for
    linear layers, float elsewhere: the rule its latency was predicted and re-measured with),
    so the exported speedup and accuracy are the ones the search saw.
    """
    seed = ctx.job_spec.seed
    dataset = load_job_dataset(ctx.dataset)
    model = load_job_model(ctx.model, dataset, ctx.data_dir, seed)
    device = device_of(ctx.device)
    calib = calibration_batches(dataset, 8, 64, seed=seed)
    policy = Policy.from_dict(ctx.policy)
    ctx.progress({"phase": "building"})
    # Built as the search scored it: re-fitted to the dense outputs unless the job said not to,
    # masks and rounding by the job's recovery. OBC's masks depend on the calibration images,
    # so it gets exactly the search's (engine.search.Evaluator: 4 batches of 64, same seed).
    recovery = ctx.job_spec.recovery
    build_calib = calibration_batches(dataset, 4, 64, seed=seed) if recovery == "obc" else calib
    cm = _export_model(ctx, model, dataset, policy) or compress(
        model, policy, build_calib, reconstruct=ctx.job_spec.reconstruct, recovery=recovery
    )
    dense = compress(model, Policy.dense(), calib)
    ctx.progress({"phase": "exporting"})
    if device.runtime in ("executorch", "openvino"):  # their own files: .pte / OpenVINO IR zip
        from engine.export_runtimes import export_runtime_artifact

        return export_runtime_artifact(ctx, model, cm, dense, dataset, calib, device)
    with tempfile.TemporaryDirectory() as tmp:
        example = model.example_input(2)
        dense_path = export_onnx(dense.gm, example, Path(tmp) / "dense.onnx")
        # without act_bits' fake-quant nodes: activations are the quantizer's job in the file
        fp32 = export_onnx(float_graph(cm.gm), example, Path(tmp) / "fp32.onnx")
        precision: dict[str, str] = {}
        if ctx.int8:
            from compression.quantize_onnx import quantize_int8

            quantize_int8(fp32, (b.numpy() for b in calib), ctx.out_path)
        elif device.runtime == "onnxruntime" and cm.bits:
            from compression.mixed_precision import export_policy_onnx

            _, layer_precision = export_policy_onnx(cm, fp32, [b.numpy() for b in calib], ctx.out_path)
            precision = dict(layer_precision)
        else:
            ctx.out_path.write_bytes(fp32.read_bytes())
        int8 = ctx.int8 or "int8" in precision.values()
        ctx.progress({"phase": "measuring", "device": device.name})
        if ctx.device.kind == "remote":
            if ctx.time_on_agent is None:
                raise RuntimeError(f"device {device.name} is remote: only the service can reach its agent")
            measured_ms, dense_ms, speedup = ctx.time_on_agent(ctx.out_path, dense_path)
        else:
            pair = measure_pair(dense_path, ctx.out_path, device, runs=200)
            measured_ms, dense_ms, speedup = pair.b.median_ms, pair.a.median_ms, pair.speedup
    data = ctx.out_path.read_bytes()
    metrics = {
        "measured_latency_ms": measured_ms,
        "dense_latency_ms": dense_ms,
        "speedup": speedup,
        "accuracy": onnx_accuracy(ctx.out_path, dataset.x_val, dataset.y_val),
        "predicted_latency_ms": ctx.scores.latency_ms,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "device": device.name,
        "int8": int8,
        "layer_precision": precision,  # quantized layers: "int8" / "int4" (the rest is float)
    }
    return ExportResult(path=ctx.out_path, metrics=metrics)
