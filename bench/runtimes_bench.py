"""Benchmark of issue 13: the same compression policies on three CPU runtimes, 1 thread.

    nice .venv/bin/python bench/runtimes_bench.py [--runs 200] [--repeats 3] [--models resnet20 vit]

For the zoo ResNet-20 and ViT trained on MNIST (cached under ``~/.modeltailor/zoo``; trained on
first use), every policy of a small grid is built as the search scores it (``compress`` with
least-squares re-fitting), written as each runtime's deployable file (ONNX Runtime: ONNX with
per-layer int8 QDQ, ``compression.mixed_precision``; ExecuTorch: ``.pte`` lowered to XNNPACK,
PT2E int8; OpenVINO: IR zip, f32 precision hint, NNCF int8) and timed against the dense file
of the same runtime with ``measure_pair`` (interleaved, ``--repeats`` times; the median
speedup is shown with its range). Accuracy is each file's own top-1 on the 1,500 validation
images (int8 files differ a little per runtime). Per runtime, the fastest policy within one
point of the dense accuracy is printed: it need not be the same policy on every runtime.

Figures go to stdout as markdown and to ``~/.modeltailor/bench-runtimes/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compression import Policy, compress
from compression.data import calibration_batches, load_builtin
from compression.export_runtimes import export_for_runtime, int8_layer_names
from compression.mixed_precision import export_policy_onnx
from compression.onnx_export import export_onnx, onnx_accuracy
from compression.resolve import resolve_model
from compression.space_builder import space_for
from latency_models.harness import measure_pair
from latency_models.runtimes_edge import predict

DEVICES = {"onnxruntime": "cpu-ort-1t", "executorch": "cpu-executorch-1t", "openvino": "cpu-openvino-1t"}
GRIDS: dict[str, dict[str, dict[str, Any]]] = {
    "resnet20": {
        "dense": {},
        "half width": {"default": {"width": 0.5}},
        "width 0.75": {"default": {"width": 0.75}},
        "int8": {"default": {"bits": 8}},
        "50% zeros": {"default": {"scheme": "unstructured", "sparsity": 0.5}},
        "width 0.75 + int8": {"default": {"width": 0.75, "bits": 8}},
        "half width + int8": {"default": {"width": 0.5, "bits": 8}},
    },
    "vit": {
        "dense": {},
        "half width": {"default": {"width": 0.5}},
        "int8": {"default": {"bits": 8}},
        "50% zeros": {"default": {"scheme": "unstructured", "sparsity": 0.5}},
    },
}


def write_file(
    runtime: str, cm: Any, example: torch.Tensor, layers: list[str], calib: list[Any], path: Path
) -> Path:
    """The runtime's deployable file of the compressed model ``cm``."""
    if runtime == "onnxruntime":
        fp32 = export_onnx(cm.gm, example, path.with_suffix(".fp32.onnx"), check=False)
        if not layers:
            return fp32
        out, _ = export_policy_onnx(cm, fp32, [b.numpy() for b in calib], path.with_suffix(".onnx"))
        return out
    return export_for_runtime(
        runtime, cm.gm, example[:1], path, int8_layers=layers or None, calibration=calib if layers else None
    )


def file_accuracy(runtime: str, path: Path, x: np.ndarray, y: np.ndarray) -> float:
    if runtime == "onnxruntime":
        return onnx_accuracy(path, x, y)
    return float(np.mean(predict(path, runtime, x).argmax(axis=1) == y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["resnet20", "vit"])
    parser.add_argument("--runtimes", nargs="+", default=list(DEVICES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = load_builtin("mnist")
    calib = calibration_batches(dataset, 4, 16, seed=0)
    out_dir = Path.home() / ".modeltailor" / "bench-runtimes"
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"load_before": os.getloadavg()[0], "runs": args.runs, "repeats": args.repeats}
    started = time.time()
    for arch in args.models:
        model = resolve_model(arch, dataset)
        space = space_for(model)
        example = model.example_input(2)
        rows: dict[str, dict[str, Any]] = {}
        with tempfile.TemporaryDirectory(prefix="mt-rtbench-") as tmp:
            built = {}
            for name, raw in GRIDS[arch].items():
                policy = Policy.from_dict(raw)
                built[name] = (
                    compress(model, policy, calib, reconstruct=True),
                    int8_layer_names(space, policy),
                )
            for runtime in args.runtimes:
                files = {}
                for name, (cm, layers) in built.items():
                    t0 = time.time()
                    files[name] = write_file(
                        runtime, cm, example, layers, calib, Path(tmp) / f"{runtime}-{name.replace(' ', '_')}"
                    )
                    acc = file_accuracy(runtime, files[name], dataset.x_val, dataset.y_val)
                    rows.setdefault(name, {})[runtime] = {"accuracy": acc, "export_s": time.time() - t0}
                for name, path in files.items():
                    speedups, dense_ms = [], []
                    for _ in range(args.repeats):
                        pair = measure_pair(files["dense"], path, DEVICES[runtime], runs=args.runs, warmup=50)
                        speedups.append(pair.speedup)
                        dense_ms.append(pair.a.median_ms)
                    rows[name][runtime].update(
                        speedup=statistics.median(speedups),
                        speedup_range=[min(speedups), max(speedups)],
                        dense_ms=statistics.median(dense_ms),
                    )
                    print(arch, runtime, name, rows[name][runtime], flush=True)
        results[arch] = rows
    results["load_after"] = os.getloadavg()[0]
    results["wall_s"] = time.time() - started
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print_tables(results, args.models, args.runtimes)


def print_tables(results: dict[str, Any], models: list[str], runtimes: list[str]) -> None:
    for arch in models:
        rows = results[arch]
        print(
            f"\n{arch} (speedup over the same runtime's dense file, median of repeats [range]; accuracy %)\n"
        )
        print("| policy | " + " | ".join(runtimes) + " |")
        print("|---|" + "---|" * len(runtimes))
        for name, per in rows.items():
            cells = []
            for rt in runtimes:
                r = per[rt]
                lo, hi = r["speedup_range"]
                cells.append(f"{r['speedup']:.2f}× [{lo:.2f}–{hi:.2f}], {100 * r['accuracy']:.1f} %")
            print(f"| {name} | " + " | ".join(cells) + " |")
        dense_line = ", ".join(f"{rt} {rows['dense'][rt]['dense_ms']:.3f} ms" for rt in runtimes)
        print(f"\ndense latency: {dense_line}")
        for rt in runtimes:
            floor = rows["dense"][rt]["accuracy"] - 0.01
            ok = [(per[rt]["speedup"], name) for name, per in rows.items() if per[rt]["accuracy"] >= floor]
            best = max(ok)
            print(f"fastest within 1 point on {rt}: {best[1]} ({best[0]:.2f}×)")


if __name__ == "__main__":
    main()
