"""The export of a candidate for an ExecuTorch or OpenVINO device (``engine.run.export`` calls it).

The file is the runtime's own (``compression.export_runtimes``): an ExecuTorch ``.pte``
lowered to XNNPACK, or an OpenVINO IR zip (``model.xml`` + ``model.bin``), both with a static
batch-1 input. Per-layer precision: the policy's layers with ``bits`` run int8 (all layers
when the export asks for int8), the rest float32, as the device's calibration measured them.
The speedup is measured against the dense model written the same way, interleaved, on the
device (or through its agent), and the accuracy is the file's own on the validation split.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compression.apply import CompressedModel
from compression.data import Dataset
from compression.export_runtimes import EXPORT_RUNTIMES, export_for_runtime, int8_layer_names
from compression.model_io import CompressibleModel
from compression.policy import Policy
from compression.space_builder import space_for
from engine.job import ExportContext, ExportResult
from latency_models.devices import Device
from latency_models.harness import measure_pair
from latency_models.runtimes_edge import predict

__all__ = ["FILE_FORMATS", "export_runtime_artifact", "runtime_accuracy"]

#: What each runtime's file is, as the artifact's metrics name it.
FILE_FORMATS = {
    "executorch": "executorch-pte (XNNPACK)",
    "openvino": "openvino-ir-zip (model.xml + model.bin)",
}


def runtime_accuracy(path: Path, runtime: str, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a runtime file on ``(x, y)`` (run one sample at a time: batch-1 files)."""
    logits = predict(path, runtime, np.asarray(x, dtype=np.float32))
    return float(np.mean(logits.argmax(axis=1) == np.asarray(y)))


def export_runtime_artifact(
    ctx: ExportContext,
    model: CompressibleModel,
    cm: CompressedModel,
    dense: CompressedModel,
    dataset: Dataset,
    calib: list[torch.Tensor],
    device: Device,
) -> ExportResult:
    """Write ``cm`` as ``device``'s runtime file at ``ctx.out_path`` and measure it against dense."""
    runtime = device.runtime
    if runtime not in EXPORT_RUNTIMES:
        raise ValueError(f"export_runtime_artifact writes {sorted(EXPORT_RUNTIMES)} files, not {runtime}")
    policy = Policy.from_dict(ctx.policy)
    int8: Any = "all" if ctx.int8 else int8_layer_names(space_for(model), policy)
    batches = [b.numpy() for b in calib] if int8 else None
    example = model.example_input(1)
    with tempfile.TemporaryDirectory(prefix="mt-export-") as tmp:
        dense_path = export_for_runtime(runtime, dense.gm, example, Path(tmp) / "dense")
        written = export_for_runtime(
            runtime, cm.gm, example, Path(tmp) / "candidate", int8_layers=int8, calibration=batches
        )
        ctx.out_path.parent.mkdir(parents=True, exist_ok=True)
        ctx.out_path.write_bytes(written.read_bytes())
        ctx.progress({"phase": "measuring", "device": device.name})
        if ctx.device.kind == "remote":
            if ctx.time_on_agent is None:
                raise RuntimeError(f"device {device.name} is remote: only the service can reach its agent")
            measured_ms, dense_ms, speedup = ctx.time_on_agent(written, dense_path)
        else:
            pair = measure_pair(dense_path, written, device, runs=200)
            measured_ms, dense_ms, speedup = pair.b.median_ms, pair.a.median_ms, pair.speedup
        accuracy = runtime_accuracy(written, runtime, dataset.x_val, dataset.y_val)
    data = ctx.out_path.read_bytes()
    layers = [layer.name for layer in space_for(model).layers] if int8 == "all" else list(int8 or [])
    return ExportResult(
        path=ctx.out_path,
        metrics={
            "measured_latency_ms": measured_ms,
            "dense_latency_ms": dense_ms,
            "speedup": speedup,
            "accuracy": accuracy,
            "predicted_latency_ms": ctx.scores.latency_ms,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size_bytes": len(data),
            "device": device.name,
            "int8": bool(layers),
            "layer_precision": dict.fromkeys(layers, "int8"),
            "file_format": FILE_FORMATS[runtime],
        },
    )
