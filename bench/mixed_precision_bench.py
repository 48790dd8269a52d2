"""Per-layer precision benchmark: ResNet-20 and the ViT (MNIST split), one ONNX Runtime thread.

For each model, the files ``compression.mixed_precision`` writes for:

* ``dense``: float32;
* ``all-int8``: every layer 8-bit (per-layer QDQ, ReLU / add / pooling between int8 layers in
  int8 too), and ``whole-int8``: the old whole-graph static quantization, for comparison;
* ``half-int8``: every layer 8-bit but the first and the last (which stay float);
* ``linear-4bit``: every linear layer 4-bit as MatMulNBits (the ViT; convs float), computed in
  float (``-a4``: ORT's ``accuracy_level`` 4, activations rounded to int8 per block).

Each file is timed interleaved with the dense file in one process (``measure_pair``, 1 thread,
median of ``--runs``): the ratio is dense / file (> 1: faster). Accuracy is the search's score
(``compress`` + ``accuracy`` in torch, with 8-bit activations as ``act_bits: 8`` asks, and
without) next to the exported file's (``onnx_accuracy``), on the same validation images.
Last, an MLP (784-1024-1024-10, untrained: timing only) fp32 vs all-int8 vs 4-bit.

Run: nice .venv/bin/python -m bench.mixed_precision_bench [--archs resnet20,vit] [--runs 300]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from compression.data import calibration_batches, load_dataset
from compression.evaluate import accuracy
from compression.mixed_precision import export_policy_onnx, float_graph, supports_int4_matmul
from compression.model_io import CompressibleModel, from_module
from compression.onnx_export import export_onnx, onnx_accuracy
from compression.policy import LayerPolicy, Policy
from compression.quantize_onnx import quantize_int8
from compression.resolve import data_dir, resolve_model
from compression.scoring import compress
from latency_models.harness import measure_pair


def _policies(model: CompressibleModel) -> dict[str, Policy]:
    layers = model.graph.layers
    names = [layer.name for layer in layers]
    linear = [layer.name for layer in layers if layer.features.op == "linear"]
    out = {
        "all-int8": Policy(default=LayerPolicy(bits=8)),
        "half-int8": Policy(layers={n: LayerPolicy(bits=8) for n in names[1:-1]}),
    }
    if len(linear) > 1:  # a transformer, not a CNN with one linear head
        out["linear-4bit"] = Policy(layers={n: LayerPolicy(bits=4) for n in linear})
    return out


def _bench_model(arch: str, data, calib, tmp: Path, runs: int, cache: Path) -> None:
    model = resolve_model(arch, data, cache_dir=cache)
    xv, yv = data.x_val, data.y_val
    np_calib = [b.numpy() for b in calib]
    dense = compress(model, Policy.dense(), calib, reconstruct=True)
    dense_path = export_onnx(dense.gm, model.example_input(2), tmp / f"{arch}-dense.onnx")
    dense_acc = onnx_accuracy(dense_path, xv, yv)
    rows = [("dense", dense_acc, dense_acc, dense_acc, 1.0, "")]
    whole = quantize_int8(dense_path, np_calib, tmp / f"{arch}-whole.onnx")
    pair = measure_pair(dense_path, whole, "cpu-ort-1t", runs=runs)
    rows.append(
        ("whole-int8", float("nan"), float("nan"), onnx_accuracy(whole, xv, yv), pair.speedup, "old export")
    )
    for label, policy in _policies(model).items():
        accs = []
        for act_bits in (8, None):
            cm = compress(model, replace(policy, act_bits=act_bits), calib, reconstruct=True)
            accs.append(accuracy(cm.gm, xv, yv))
        fp32 = export_onnx(float_graph(cm.gm), model.example_input(2), tmp / f"{arch}-{label}-fp32.onnx")
        path, precision = export_policy_onnx(cm, fp32, np_calib, tmp / f"{arch}-{label}.onnx")
        pair = measure_pair(dense_path, path, "cpu-ort-1t", runs=runs)
        kinds = {k: list(precision.values()).count(k) for k in sorted(set(precision.values()))}
        note = ", ".join(f"{n} {k}" for k, n in kinds.items()) + f" of {len(model.graph.layers)} layers"
        rows.append((label, accs[0], accs[1], onnx_accuracy(path, xv, yv), pair.speedup, note))
        if "int4" in precision.values():  # ORT's int8-compute 4-bit kernels (activations rounded)
            path, _ = export_policy_onnx(
                cm, fp32, np_calib, tmp / f"{arch}-{label}-a4.onnx", int4_accuracy_level=4
            )
            pair = measure_pair(dense_path, path, "cpu-ort-1t", runs=runs)
            rows.append((label + "-a4", accs[0], accs[1], onnx_accuracy(path, xv, yv), pair.speedup, note))
    print(f"\n{arch} (dense fp32 median {pair.a.median_ms:.3f} ms, {len(yv)} val images)")
    print(f"{'file':12} {'search acc (act8)':>17} {'(w only)':>9} {'file acc':>9} {'speedup':>8}  layers")
    for label, a8, aw, af, sp, note in rows:
        print(f"{label:12} {a8:17.4f} {aw:9.4f} {af:9.4f} {sp:7.2f}x  {note}")


def _bench_mlp(tmp: Path, runs: int) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = from_module(net, torch.randn(2, 1, 28, 28), "mlp")
    calib = [torch.randn(16, 1, 28, 28) for _ in range(4)]
    dense = compress(model, Policy.dense(), calib)
    dense_path = export_onnx(dense.gm, model.example_input(2), tmp / "mlp-dense.onnx")
    print("\nmlp 784-1024-1024-10 (batch 1)")
    for label, bits, level in (("all-int8", 8, 0), ("all-4bit", 4, 0), ("all-4bit-a4", 4, 4)):
        cm = compress(model, Policy(default=LayerPolicy(bits=bits)), calib)
        fp32 = export_onnx(cm.gm, model.example_input(2), tmp / f"mlp-{label}-fp32.onnx")
        out = tmp / f"mlp-{label}.onnx"
        path, _ = export_policy_onnx(cm, fp32, [b.numpy() for b in calib], out, int4_accuracy_level=level)
        pair = measure_pair(dense_path, path, "cpu-ort-1t", runs=runs)
        a, b = pair.a.median_ms, pair.b.median_ms
        print(f"{label:10} dense {a:.3f} ms  file {b:.3f} ms  speedup {pair.speedup:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archs", default="resnet20,vit")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--cache", type=Path, default=data_dir() / "zoo")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f}; MatMulNBits available: {supports_int4_matmul()}")
    data = load_dataset("mnist")
    calib = calibration_batches(data, 4, 64, seed=0)  # the search's calibration (Evaluator)
    with tempfile.TemporaryDirectory(prefix="mt-mixed-bench-") as tmp:
        for arch in args.archs.split(","):
            _bench_model(arch, data, calib, Path(tmp), args.runs, args.cache)
        _bench_mlp(Path(tmp), args.runs)
    print(f"\nload average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
