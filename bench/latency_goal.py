"""Issue 13's goal figures for the latency predictors, on architectures held out from calibration.

    .venv/bin/python -m bench.latency_goal [--samples 40] [--own 20] [--test 8] [--runs 30]

On ``cpu-ort-1t``, in this process (nothing is stored):

1. a generic calibration: ``--samples`` of the general plan (zoo models and random
   architectures) with every ViT sample left out, so both held-out models are unseen;
2. two held-out models, the issue's: the branchy CNN of the tests (concats, squeeze-excitation,
   grouped and depthwise convs) and the zoo's small ViT, both at 3x32x32 and untrained (latency
   needs no weights); of each, ``--test`` random policies timed twice (the truth and its
   re-measurement) and ``--own`` more timed once (what a job would measure of its own model);
3. for each predictor kind with an ensemble (kernel GBDT, GNN), fitted as a calibration fits
   them (ratio target, ``min`` statistic): the share of the test policies' predicted speedups
   over dense within ±10 % of the measured one (and MAPE), with the generic predictor alone
   and refitted with the ``--own`` measurements added; and how well its std ranks its errors
   (Spearman of the relative std against the |log error| of the speedup, and the share of
   errors within two stds).

Printed beside them: the noise floor, the share of the test policies whose two measured
speedups agree within ±10 %; and how many samples the load guard re-timed and refused.
Every timing is a sample timed interleaved with its dense model and the reference
(``latency_models.calibrate.measure_sample``), so every figure is a ratio taken in one run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEVICE = "cpu-ort-1t"


def _held_out_models() -> list[tuple[str, Any]]:
    import torch

    from compression.zoo import build_model
    from latency_models.sampling import _export
    from tests.compression.branchy_model import BranchyNet, with_random_bn_stats

    shape = (3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        branchy = _export(with_random_bn_stats(BranchyNet(in_channels=3)), shape, "branchy")
        vit = _export(build_model("vit", in_channels=3, image_size=32, num_classes=10), shape, "vit")
    return [("branchy", branchy), ("vit", vit)]


def _measure(samples: list[Any], runs: int, guard: Any, workdir: Path) -> list[Any]:
    """One record (the compressed model's) per sample that was timed; None where refused or failed."""
    from latency_models.calibrate import measure_sample
    from latency_models.devices import get_device

    dev = get_device(DEVICE)
    out: list[Any] = []
    cache: dict[str, Any] = {}
    for s in samples:
        try:
            out.append(
                measure_sample(s, dev, workdir, runs=runs, warmup=5, dense_cache=cache, guard=guard)[0]
            )
        except Exception as exc:  # a refused or failed sample is left out of the figures
            print(f"  {s.space_id}: not timed ({type(exc).__name__}: {str(exc)[:80]})", flush=True)
            out.append(None)
    return out


def _speedup_figures(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    rel = np.abs(pred / true - 1)
    return 100 * float(np.mean(rel <= 0.10)), 100 * float(np.mean(rel))


def _evaluate(p: Any, space: Any, test: list[Any]) -> dict[str, float]:
    from scipy.stats import spearmanr

    from compression.policy import Policy

    ms, std = p.predict_uncertainty(space, [Policy.dense(), *[r.policy for r in test]])
    pred = ms[0] / ms[1:]
    true = np.array([r.speedup for r in test])
    within, mape = _speedup_figures(pred, true)
    rel = std[1:] / ms[1:]
    err = np.abs(np.log(pred / true))
    both = np.sqrt(rel**2 + (std[0] / ms[0]) ** 2)  # the speedup's std, as a ratio of two predictions
    rho = float(spearmanr(rel, err)[0]) if len(test) > 2 else float("nan")
    return {"within": within, "mape": mape, "rho": rho, "in_2std": 100 * float(np.mean(err <= 2 * both))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=40, help="generic calibration samples")
    parser.add_argument(
        "--own", type=int, default=20, help="measurements of each held-out model for the refit"
    )
    parser.add_argument(
        "--test", type=int, default=8, help="test policies of each held-out model (timed twice)"
    )
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model and sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from compression.space_builder import space_for
    from latency_models.load_guard import LoadGuard
    from latency_models.predictors import GraphGNN, KernelGBDT
    from latency_models.predictors.base import with_statistic
    from latency_models.sampling import SPACE_OPTIONS, CalibrationSample, random_policy, sample_plan

    torch.set_num_threads(1)
    started = time.time()
    print(f"# {dt.datetime.now().isoformat(timespec='seconds')}  load average {os.getloadavg()}", flush=True)
    guard = LoadGuard()
    with tempfile.TemporaryDirectory(prefix="mt-goal-") as tmp:
        work = Path(tmp)
        plan = itertools.islice(
            (s for s in sample_plan(10**6, seed=args.seed) if s.arch_id != "vit"), args.samples
        )
        from latency_models.calibrate import calibrate

        generic = calibrate(DEVICE, args.samples, plan=plan, runs=args.runs, warmup=5, guard=guard)
        print(f"generic calibration: {len(generic)} records, {time.time() - started:.0f} s", flush=True)
        held: dict[str, tuple[Any, list[Any], list[Any], list[Any]]] = {}
        for name, cm in _held_out_models():
            space = space_for(cm, SPACE_OPTIONS)
            rng = random.Random(args.seed + 1)
            pols = [random_policy(space, rng) for _ in range(args.test + args.own)]
            samples = [CalibrationSample(name, f"{name}@32", cm, space, p) for p in pols]
            first = _measure(samples[: args.test], args.runs, guard, work)
            own = _measure(samples[args.test :], args.runs, guard, work)
            again = _measure(samples[: args.test], args.runs, guard, work)
            held[name] = (space, first, again, own)
            print(f"{name}: timed, {time.time() - started:.0f} s", flush=True)
    stat = "min"
    base = with_statistic(generic, stat)
    rows = []
    for name, (space, first, again, own) in held.items():
        pairs = [(a, b) for a, b in zip(first, again, strict=True) if a is not None and b is not None]
        s1 = np.array([r.speedup for r in with_statistic([a for a, _ in pairs], stat)])
        s2 = np.array([r.speedup for r in with_statistic([b for _, b in pairs], stat)])
        floor = _speedup_figures(s2, s1)
        test = with_statistic([r for r in first if r is not None], stat)
        own_records = with_statistic([r for r in own if r is not None], stat)
        for cls in (KernelGBDT, GraphGNN):
            alone = cls(target="ratio").fit(base)
            refit = cls(target="ratio").fit([*base, *own_records])
            a, b = _evaluate(alone, space, test), _evaluate(refit, space, test)
            rows.append((name, cls.kind, len(test), a, len(own_records), b, floor))
    print()
    print(
        f"{'model':<8} {'kind':<12} {'n':>3} | generic alone: ±10 %  MAPE  rho  in 2 std | "
        f"+own n: ±10 %  MAPE  rho  in 2 std | noise floor ±10 %  MAPE"
    )
    for name, kind, n, a, n_own, b, floor in rows:
        print(
            f"{name:<8} {kind:<12} {n:>3} | {a['within']:13.0f} % {a['mape']:5.1f} {a['rho']:5.2f} "
            f"{a['in_2std']:6.0f} % | {n_own:>5}: {b['within']:4.0f} % {b['mape']:5.1f} {b['rho']:5.2f} "
            f"{b['in_2std']:6.0f} % | {floor[0]:12.0f} % {floor[1]:5.1f}"
        )
    s = guard.summary()
    print(
        f"\nload guard: {s['samples']} samples, {s['retried']} re-timed, {s['refused']} refused; "
        f"statistic {stat}; runs {args.runs}; {time.time() - started:.0f} s in all; "
        f"load average at the end {os.getloadavg()}"
    )


if __name__ == "__main__":
    main()
