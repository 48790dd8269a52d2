"""Quick check: the four latency predictors on a device store's measurements (held-out architectures).

    .venv/bin/python bench/predictors.py [--samples 200] [--reuse DATA_DIR] [--append]

The issue's benchmark (noise floor, fixed held-out test sets, zoo policies, speed) is
``bench/latency.py``; this script is the short version for any store of measurements, e.g. the
one ``modeltailor calibrate`` fills. Records are re-expressed by the ``min`` statistic (see
``latency_models.predictors.base.with_statistic``).

Calibrates ``cpu-ort-1t`` (or reuses a store's measurements), then for each predictor kind
and both targets (ratio to reference, absolute ms) fits on 75 % of the architectures and
reports errors on the other 25 %: MAPE, % within ±5/±10 % of the measured latency, and of the
speedup over the dense model measured interleaved; then predictions per second for 10,000
random ResNet-20 policies on one core. ``--append`` adds the table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compression import from_module, space_for
from compression.zoo import build_model
from latency_models.calibrate import calibrate
from latency_models.predictors import KINDS, REGISTRY, holdout_metrics
from latency_models.predictors.base import with_statistic
from latency_models.sampling import SPACE_OPTIONS, random_policy
from latency_models.store import DeviceStore

COLS = ("mape", "within_5pct", "within_10pct", "speedup_mape", "speedup_within_10pct")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--reuse", type=Path, default=None, help="data dir with devices/cpu-ort-1t measurements")
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.reuse is not None:
        records = with_statistic(DeviceStore("cpu-ort-1t", args.reuse).records(), "min")
        source = f"reused {len(records)} measurements from {args.reuse}"
    else:
        t0 = time.time()
        records = with_statistic(calibrate("cpu-ort-1t", args.samples, seed=0, runs=60, warmup=5), "min")
        source = f"calibrated {args.samples} samples in {time.time() - t0:.0f} s"
    n_arch = len({r.arch_id for r in records})
    lines = [f"{source}; {len(records)} records, {n_arch} architectures; held-out: 25 % of architectures"]
    head = f"{'predictor':<12}{'target':<7}" + "".join(f"{c:>22}" for c in COLS) + f"{'pred/s':>10}"
    lines += [head, "-" * len(head)]
    cm = from_module(
        build_model("resnet20", in_channels=3, image_size=32, num_classes=10), torch.randn(2, 3, 32, 32)
    )
    space = space_for(cm, SPACE_OPTIONS)
    rng = random.Random(0)
    pols = [random_policy(space, rng) for _ in range(10_000)]
    for kind in KINDS:
        for target in ("ratio", "ms"):
            factory = functools.partial(REGISTRY[kind], target=target, seed=0)
            m = holdout_metrics(factory, records, test_fraction=0.25, seed=0)
            speed = float("nan")
            if target == "ratio":
                model = factory().fit(records)
                n = len(pols) if kind != "lookup" else 1000
                t = time.perf_counter()
                model.predict(space, pols[:n])
                speed = n / (time.perf_counter() - t)
            row = f"{kind:<12}{target:<7}" + "".join(f"{m.get(c, float('nan')):>22.1f}" for c in COLS)
            lines.append(row + f"{speed:>10.0f}")
            print(lines[-1], flush=True)
    lines.append(f"(held-out test: {m['n']:.0f} records of {m['n_arch']:.0f} architectures)")
    text = "\n".join(lines)
    print(text)
    if args.append:
        results = Path(__file__).with_name("RESULTS.md")
        section = (
            f"\n## Latency predictors on unseen architectures ({dt.date.today().isoformat()})\n\n"
            f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
            f"device cpu-ort-1t\n"
            f"- command: `.venv/bin/python bench/predictors.py {' '.join(sys.argv[1:])}`\n\n"
            f"```\n{text}\n```\n"
        )
        with results.open("a") as fh:
            fh.write(section)


if __name__ == "__main__":
    main()
