"""The real bodies behind ``search_bridge.run_job`` / ``export_candidate``.

Kept apart from the bridge's contract so the runner's tests can import the bridge
without torch. Latency during search comes from the device's newest predictor when
one exists; otherwise each candidate is exported and measured on the device
(slower, always honest), and the progress stream says which.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from agents import Objective
from compression import Policy, compress
from compression.apply import CompressedModel
from compression.data import Dataset, calibration_batches, load_builtin, load_npz
from compression.model_io import CompressibleModel
from compression.onnx_export import export_onnx, onnx_accuracy
from compression.resolve import resolve_model
from compression.space import SpaceOptions
from latency_models.devices import Device
from latency_models.harness import measure_pair
from modeltailor.device_latency import measured_latency
from modeltailor.search import Candidate, run_search
from service.search_bridge import (
    DatasetRef,
    DeviceRef,
    ExportContext,
    ExportResult,
    JobContext,
    ModelRef,
    Scores,
)

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


def _score_fields(c: Candidate) -> Scores:
    s = c.score
    return Scores(
        accuracy=s.accuracy,
        latency_ms=s.latency_ms,
        measured_latency_ms=s.measured_latency_ms,
        size_bytes=int(s.size_bytes),
        macs=int(s.macs),
        eval_seconds=s.eval_seconds,
        extra={"error": s.error} if s.error else {},
    )


def run_job(ctx: JobContext) -> None:
    """Resume or start the job's search; persists every candidate as it is scored."""
    from agents import Score

    spec = ctx.spec
    seed = int(spec.get("seed", 0))
    ctx.progress("phase", {"phase": "loading", "message": "loading model and data"})
    dataset = load_job_dataset(ctx.dataset)
    model = load_job_model(ctx.model, dataset, ctx.data_dir, seed)
    device = device_of(ctx.device)
    latency = measured_latency(device, runs=SEARCH_RUNS, warmup=10)
    ctx.progress("phase", {"phase": "searching", "latency_source": f"measured on {device.name}"})
    objective = Objective.from_dict(spec.get("objectives"), spec.get("constraints"))
    options = SpaceOptions.from_dict(dict(spec.get("space") or {}))
    previous = [
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
            feasible=False,  # run_search re-derives it against this run's dense score
        )
        for d in sorted(ctx.done, key=lambda d: d.index)
    ]
    state: dict[str, Any] | None = json.loads(ctx.agent_state) if ctx.agent_state else None
    last_state: list[bytes | None] = [ctx.agent_state]
    budget = spec.get("budget") or {}

    def on_candidate(c: Candidate) -> None:
        ctx.persist_candidate(c.policy.to_dict(), c.policy.hash, _score_fields(c), agent_state=last_state[0])

    def on_progress(p: Any) -> None:
        last_state[0] = json.dumps(p.agent_state()).encode()

    with torch.no_grad():
        result = run_search(
            model,
            dataset,
            device_latency=latency,
            algorithm=ctx.algorithm,
            budget_candidates=int(budget.get("candidates", 200)),
            budget_seconds=float(budget["seconds"]) if budget.get("seconds") else None,
            seed=seed,
            objective=objective,
            space_options=options,
            on_candidate=on_candidate,
            on_progress=on_progress,
            agent_state=state,
            previous=previous,
            should_stop=ctx.should_stop,
        )
    ctx.set_baseline(_score_fields(result.dense))


def finetune(
    cm: CompressedModel, dataset: Dataset, epochs: int, progress: Callable[[dict[str, Any]], None]
) -> None:
    """A few epochs of SGD on the compressed graph; masks re-applied after every step.

    BatchNorm statistics stay as recalibrated (the exported graph runs BN in eval form).
    """
    params = [p for p in cm.gm.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    x, y = torch.from_numpy(dataset.x_train), torch.from_numpy(dataset.y_train)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 128):
            idx = order[i : i + 128]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(cm.gm(x[idx]), y[idx]).backward()
            opt.step()
            cm.reapply_masks()
        progress({"phase": "finetune", "epoch": epoch + 1, "epochs": epochs})
    for p in params:
        p.requires_grad_(False)


def export_candidate(ctx: ExportContext) -> ExportResult:
    """Build the candidate, write ONNX (int8 QDQ if asked), and measure it against dense."""
    seed = int(ctx.job_spec.get("seed", 0))
    dataset = load_job_dataset(ctx.dataset)
    model = load_job_model(ctx.model, dataset, ctx.data_dir, seed)
    device = device_of(ctx.device)
    calib = calibration_batches(dataset, 8, 64, seed=seed)
    policy = Policy.from_dict(ctx.policy)
    ctx.progress({"phase": "building"})
    cm = compress(model, policy, calib)
    if ctx.finetune_epochs > 0:
        finetune(cm, dataset, ctx.finetune_epochs, ctx.progress)
    dense = compress(model, Policy.dense(), calib)
    ctx.progress({"phase": "exporting"})
    with tempfile.TemporaryDirectory() as tmp:
        example = model.example_input(2)
        dense_path = export_onnx(dense.gm, example, Path(tmp) / "dense.onnx")
        fp32 = export_onnx(cm.gm, example, Path(tmp) / "fp32.onnx")
        if ctx.int8:
            from compression.quantize_onnx import quantize_int8

            quantize_int8(fp32, (b.numpy() for b in calib), ctx.out_path)
        else:
            ctx.out_path.write_bytes(fp32.read_bytes())
        ctx.progress({"phase": "measuring", "device": device.name})
        pair = measure_pair(dense_path, ctx.out_path, device, runs=200)
    data = ctx.out_path.read_bytes()
    metrics = {
        "measured_latency_ms": pair.b.median_ms,
        "dense_latency_ms": pair.a.median_ms,
        "speedup": pair.speedup,
        "accuracy": onnx_accuracy(ctx.out_path, dataset.x_val, dataset.y_val),
        "predicted_latency_ms": ctx.scores.latency_ms,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "device": device.name,
    }
    return ExportResult(path=ctx.out_path, metrics=metrics)
