"""Compression benchmark: width x precision on ResNet-20 and MobileNetV2 (MNIST split).

For each model: uniform width {1.0, 0.75, 0.5, 0.25} x {fp32, int8}: accuracy after
BatchNorm recalibration (int8: ONNX Runtime's static QDQ model itself), MACs, bytes,
and ONNX Runtime latency on this CPU (1 thread, median of >= 200 runs after warm-up),
each compressed model timed interleaved with the dense fp32 model in one run so the
speedup is a same-run ratio. Also the honesty check (50 % unstructured sparsity is no
faster in a dense runtime) and the time to apply + score one policy (1,000 val images).

Run: .venv/bin/python -m bench.compression_bench [--archs resnet20,mobilenetv2] [--runs 300]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from compression import Policy, compress, measure, score_policy
from compression.data import calibration_batches, load_dataset
from compression.onnx_export import export_onnx, onnx_accuracy
from compression.quantize_onnx import quantize_int8
from compression.resolve import data_dir, resolve_model
from latency_models.harness import measure_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archs", default="resnet20,mobilenetv2")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--cache", type=Path, default=data_dir() / "zoo")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    data = load_dataset("mnist")
    calib = calibration_batches(data, 8, 64)
    xv, yv = data.x_val[:1000], data.y_val[:1000]
    tmp = Path(tempfile.mkdtemp(prefix="mt-bench-"))
    print(
        f"{'arch':12} {'width':>5} {'prec':>4} {'acc':>7} {'MACs':>11} {'bytes':>9} {'ms':>7} {'speedup':>7}"
    )
    for arch in args.archs.split(","):
        model = resolve_model(arch, data, cache_dir=args.cache)
        dense = compress(model, Policy.dense(), calib)
        dense_onnx = export_onnx(dense.gm, model.example_input(2), tmp / f"{arch}-dense.onnx")
        for width in (1.0, 0.75, 0.5, 0.25):
            for int8 in (False, True):
                pol = Policy.from_dict({"default": {"width": width, "bits": 8 if int8 else None}})
                cm = compress(model, pol, calib)
                fp32 = export_onnx(cm.gm, model.example_input(2), tmp / f"{arch}-{width}.onnx")
                path = (
                    quantize_int8(fp32, (b.numpy() for b in calib), tmp / f"{arch}-{width}-int8.onnx")
                    if int8
                    else fp32
                )
                acc = onnx_accuracy(path, xv, yv)
                m = measure(cm)
                pair = measure_pair(dense_onnx, path, "cpu-ort-1t", runs=args.runs)
                print(
                    f"{arch:12} {width:5.2f} {'int8' if int8 else 'fp32':>4} {acc:7.4f} {m.macs:11,d} "
                    f"{m.size_bytes:9,d} {pair.b.median_ms:7.3f} {pair.speedup:6.2f}x",
                    flush=True,
                )
        sparse = compress(
            model, Policy.from_dict({"default": {"scheme": "unstructured", "sparsity": 0.5}}), calib
        )
        sparse_onnx = export_onnx(sparse.gm, model.example_input(2), tmp / f"{arch}-sparse.onnx")
        pair = measure_pair(dense_onnx, sparse_onnx, "cpu-ort-1t", runs=args.runs)
        print(
            f"{arch}: 50% unstructured sparsity speedup over dense fp32 (ORT, 1 thread): {pair.speedup:.3f}x"
        )
        times = []
        half = Policy.from_dict({"default": {"width": 0.5}})
        for _ in range(7):
            start = time.perf_counter()
            score_policy(model, half, calib[:4], xv, yv)
            times.append(time.perf_counter() - start)
        print(
            f"{arch}: apply + BN recalibration (4x64) + score on 1,000 val images: "
            f"median {statistics.median(times):.3f} s over 7"
        )


if __name__ == "__main__":
    main()
