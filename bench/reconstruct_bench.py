"""Accuracy of uniformly pruned zoo models without and with feature-map reconstruction.

For each model and policy: apply, (re-fit pruned layers to the dense outputs,) recalibrate
BatchNorm on the search's 4 x 64 calibration images, evaluate on its 1,000 validation images
(``engine.search.Evaluator``'s subsets). Seconds are per policy: apply + reconstruct +
recalibrate + evaluate; "refit s" is the reconstruction alone.

    PYTHONPATH=. python -m bench.reconstruct_bench [--models resnet20,mobilenetv2] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from bench.search import load_model
from compression.apply import apply_policy
from compression.evaluate import accuracy, recalibrate_bn
from compression.model_io import CompressibleModel
from compression.policy import Policy
from compression.reconstruct import reconstruct
from compression.space_builder import space_for
from engine.device_latency import macs_proxy
from engine.search import Evaluator


def policies(model: CompressibleModel) -> dict[str, Policy]:
    leaders = [layer.name for layer in space_for(model).width_leaders]

    def width(w: float, bits: int | None = None) -> Policy:
        raw: dict = {"layers": {name: {"width": w} for name in leaders}}
        if bits is not None:
            raw["default"] = {"bits": bits}  # named layers keep the default's bits
        return Policy.from_dict(raw)

    return {
        "width 0.9": width(0.9),
        "width 0.75": width(0.75),
        "width 0.5": width(0.5),
        "int8 + width 0.75": width(0.75, bits=8),
    }


def score(ev: Evaluator, policy: Policy, refit: bool) -> tuple[float, float, float, int]:
    """(accuracy, seconds for the policy, seconds reconstructing, layers re-fitted)."""
    start = time.perf_counter()
    with torch.no_grad():
        cm = apply_policy(ev.model, policy)
        t0 = time.perf_counter()
        n = reconstruct(cm, ev.calibration) if refit else 0
        t_refit = time.perf_counter() - t0
        recalibrate_bn(cm.gm, ev.calibration)
        acc = accuracy(cm.gm, ev.x_val, ev.y_val)
    return acc, time.perf_counter() - start, t_refit, n


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="resnet20,mobilenetv2")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| model | policy | acc plain | acc refit | s plain | s refit | refit s | layers |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in args.models.split(","):
        model, data = load_model(arch)
        ev = Evaluator(model, data, macs_proxy, val_images=1000, seed=0)
        dense, t_dense, _, _ = score(ev, Policy.dense(), refit=False)
        print(f"| {arch} | dense | {dense:.3f} | – | {t_dense:.2f} | – | – | 0 |", flush=True)
        for label, policy in policies(model).items():
            a0, t0, _, _ = score(ev, policy, refit=False)
            a1, t1, tr, n = score(ev, policy, refit=True)
            print(
                f"| {arch} | {label} | {a0:.3f} | {a1:.3f} | {t0:.2f} | {t1:.2f} | {tr:.2f} | {n} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
