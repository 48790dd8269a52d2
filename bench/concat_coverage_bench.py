"""Concat coverage: what uniform width 0.5 removes from a branchy CNN before and after
channels that meet a concat's runs (SE gate, residual add, grouped conv) became prunable.

Model: ``tests/compression/branchy_model.BranchyNet`` (inception block with a grouped conv
and squeeze-excitation over the concat, a concat residual with a shortcut projection, a
depthwise and a grouped conv over the concat, a Linear-SE tail), trained briefly on the
MNIST split with ``compression.train.train_model`` (seed 0). "before" is the graph analysis
without run splitting (``analyze(gm, split_runs=False)``: such blocks left whole), "after"
the default. For each: width-prunable groups, the parameter / MAC fraction removed at
uniform width 0.5 (every width leader at 0.5), validation accuracy on 1,500 images after
BatchNorm recalibration with least-squares reconstruction (8 x 64 calibration images), and
the ONNX Runtime latency (1 thread, batch 1) of the pruned model vs the dense one, timed
interleaved in one run (``latency_models.harness.measure_pair``).

Run: PYTHONPATH=. .venv/bin/python -m bench.concat_coverage_bench [--epochs 3] [--runs 300]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from compression import Policy, compress, from_module, measure, space_for
from compression.data import calibration_batches, load_dataset
from compression.evaluate import accuracy
from compression.graph import analyze
from compression.onnx_export import export_onnx
from compression.train import train_model
from latency_models.harness import measure_pair
from tests.compression.branchy_model import BranchyNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--width", type=float, default=0.5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    data = load_dataset("mnist")
    torch.manual_seed(0)
    net = BranchyNet(in_channels=1, num_classes=10)
    start = time.perf_counter()
    acc = train_model(net, data, epochs=args.epochs, seed=0, lr=0.05, batch_size=64)
    print(f"trained {args.epochs} epochs in {time.perf_counter() - start:.0f} s: val accuracy {acc:.4f}")
    model = from_module(net.eval(), torch.from_numpy(data.x_train[:2]), name="branchy")
    calib = calibration_batches(data, 8, 64, seed=0)
    xv, yv = data.x_val, data.y_val
    tmp = Path(tempfile.mkdtemp(prefix="mt-concat-"))
    dense = compress(model, Policy.dense(), calib)
    dense_m = measure(dense)
    dense_onnx = export_onnx(dense.gm, model.example_input(2), tmp / "dense.onnx")
    dense_acc = accuracy(dense.gm, xv, yv)
    print(f"dense: {dense_m.params:,d} params, {dense_m.macs:,d} MACs, accuracy {dense_acc:.4f}")
    print(
        "| analysis | prunable groups | params removed | MACs removed | acc (refit + BN) "
        "| ORT ms dense | ORT ms pruned | speedup |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, split in (("before (concat blocks whole)", False), ("after (runs split)", True)):
        variant = replace(model, _graph=analyze(model.gm, split_runs=split))
        leaders = [ls.name for ls in space_for(variant).width_leaders]
        policy = Policy.from_dict({"layers": {name: {"width": args.width} for name in leaders}})
        cm = compress(variant, policy, calib, reconstruct=True)
        m = measure(cm)
        path = export_onnx(cm.gm, model.example_input(2), tmp / f"{split}.onnx")
        pair = measure_pair(dense_onnx, path, "cpu-ort-1t", runs=args.runs)
        print(
            f"| {label} | {len(leaders)} | {1 - m.params / dense_m.params:.1%} "
            f"| {1 - m.macs / dense_m.macs:.1%} | {accuracy(cm.gm, xv, yv):.4f} "
            f"| {pair.a_median_ms:.3f} | {pair.b_median_ms:.3f} | {pair.speedup:.2f}x |",
            flush=True,
        )
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
