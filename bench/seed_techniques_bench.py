"""Pattern sparsity (PatDNN) and power-of-two weights (SmartDeal) against their plain counterparts.

For each zoo model trained on MNIST (zoo cache, trained on first use; ``--models resnet20,vgg``):

* **pattern vs unstructured at the same density**: every 3×3 convolution (the layers the
  ``pattern`` scheme is offered at) gets K = 4 or 8 patterns of 4 of 9 weights with a
  connectivity share of 0 and 0.3 (55.6 % and 68.9 % of those layers' weights zeroed), and
  ``unstructured`` on the same layers at exactly that zeroed fraction;
* **pow2 vs uniform at the same bits**: every conv and linear layer at 4 and 5 bits
  (``--bits``), power-of-two levels (``"pow2": true``) or the uniform symmetric grid.

Every policy is scored like a search candidate (``engine.search.Evaluator``: 4 × 64 calibration
images, least-squares re-fit on) with ``magnitude`` (magnitude masks / round-to-nearest) and
``obc`` recovery (``compression.obc``), on the 1,500 validation images. "onnx" is the accuracy
of the exported float ONNX file in ONNX Runtime for the pattern and pow2 rows (they export as
float: zeros in dense kernels, de-quantized power-of-two values); uniform-bit rows would export
as int8 containers and are not re-checked here. "KB" is ``compression.metrics`` size.

    PYTHONPATH=. python -m bench.seed_techniques_bench [--models resnet20,vgg] [--bits 4,5] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.search import load_model
from compression.evaluate import accuracy
from compression.metrics import measure
from compression.model_io import CompressibleModel
from compression.obc import Recovery
from compression.onnx_export import export_onnx, onnx_accuracy
from compression.policy import Policy
from compression.schemes.pattern import KEPT, TAPS
from compression.scoring import compress
from compression.space_builder import space_for
from engine.device_latency import macs_proxy
from engine.search import Evaluator

RECOVERIES: tuple[Recovery, ...] = ("magnitude", "obc")


def pattern_rows(model: CompressibleModel) -> list[tuple[str, str, Policy, bool]]:
    """(technique, setting, policy, check onnx) for pattern K = 4, 8 and unstructured alike."""
    names = [ls.name for ls in space_for(model).layers if "pattern" in ls.schemes]
    rows: list[tuple[str, str, Policy, bool]] = []
    for share in (0.0, 0.3):
        zeroed = 1.0 - (1.0 - share) * KEPT / TAPS
        for k in (4, 8):
            spec = {"scheme": "pattern", "patterns": k, "sparsity": share}
            policy = Policy.from_dict({"layers": {n: spec for n in names}})
            rows.append(("pattern", f"K={k}, conn {share:.0%}, {zeroed:.1%} zero", policy, True))
        spec_u = {"scheme": "unstructured", "sparsity": round(zeroed, 4)}
        policy_u = Policy.from_dict({"layers": {n: spec_u for n in names}})
        rows.append(("unstructured", f"same layers, {zeroed:.1%} zero", policy_u, False))
    return rows


def bits_rows(bits: Sequence[int]) -> list[tuple[str, str, Policy, bool]]:
    rows: list[tuple[str, str, Policy, bool]] = []
    for b in bits:
        rows.append(
            ("pow2", f"{b} bits, every layer", Policy.from_dict({"default": {"bits": b, "pow2": True}}), True)
        )
        rows.append(("uniform", f"{b} bits, every layer", Policy.from_dict({"default": {"bits": b}}), False))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="resnet20")
    parser.add_argument("--bits", default="4,5")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bits = [int(b) for b in args.bits.split(",")]
    print("| model | technique | setting | recovery | accuracy | onnx | KB | s |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in args.models.split(","):
        model, data = load_model(arch)
        ev = Evaluator(model, data, macs_proxy, val_images=1500, seed=0)
        dense_acc = accuracy(model.gm, ev.x_val, ev.y_val)
        dense_kb = measure(compress(model, Policy.dense(), ev.calibration)).size_bytes / 1024
        print(f"| {arch} | dense | – | – | {dense_acc:.4f} | – | {dense_kb:.0f} | – |", flush=True)
        for technique, setting, policy, check in pattern_rows(model) + bits_rows(bits):
            for how in RECOVERIES:
                start = time.perf_counter()
                with torch.no_grad():
                    cm = compress(model, policy, ev.calibration, reconstruct=True, recovery=how)
                acc = accuracy(cm.gm, ev.x_val, ev.y_val)
                seconds = time.perf_counter() - start
                onnx = "–"
                if check:
                    with tempfile.TemporaryDirectory() as tmp:
                        path = export_onnx(cm.gm, cm.example_input(2), Path(tmp) / "m.onnx")
                        onnx = f"{onnx_accuracy(path, ev.x_val, ev.y_val):.4f}"
                kb = measure(cm).size_bytes / 1024
                row = f"| {arch} | {technique} | {setting} | {how} | {acc:.4f} | {onnx} | {kb:.0f}"
                print(f"{row} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
