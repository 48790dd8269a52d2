"""Families (issue 15): one weight set, K operating points, against K independent searches.

Phases (``--phases``, comma-separated; default all):

* ``family``: ``engine.family.make_family`` on the model (MNIST), K = len(--budgets): the
  nested chain search, shared weights (``--recovery``), optional joint fine-tuning, the bundle.
  Per point: the search's accuracy (its own refit), the shared-weight accuracy, the bundle
  graph's validation and test accuracy, its latency measured against dense in one interleaved
  run (harness, ``--runs``), and the same point's standalone file timed against its bundle
  graph (ONNX Runtime folds the shared-weight ops at load: the two should tie). Bundle size
  against the K standalone files and the largest point.
* ``recovery``: the family's policies built with every recovery (``joint``, ``largest``, ``none``)
  and independently (each point its own least-squares refit, not shareable): what sharing
  costs in one-shot accuracy.
* ``independent``: for each budget below 1, a rule search (``--candidates``) under a latency
  limit of that budget; its best feasible point exported like the family's and measured the
  same way (accuracy val/test, speedup against dense).
* ``finetune`` (``--finetune-steps`` > 0): each point fine-tuned alone from the family's
  one-shot weights (``compression.distill``, same steps and batches) against the joint
  fine-tuning of the family.
* ``slowdown``: ``modeltailor.switch.FamilySwitch`` on the bundle, pinned to one core, target =
  ``--target-factor`` x point 0's profiled latency; quiet, then two CPU-burning processes on
  the same core, then quiet again (``--phase-s`` each). The same schedule with the most
  accurate point fixed. p50 / p95 latency, share of inferences over the target, points used;
  at batch 1 and 8 (``--slowdown-batches``): an inference of a millisecond is either not
  preempted or preempted for a whole time slice of the burners, while one of several
  milliseconds is slowed about evenly, as frequency scaling slows it.

Run (niced; about 10-20 min on 2 idle cores for ResNet-20)::

    PYTHONPATH=. nice -n 10 python -m bench.family_bench --model resnet20 --latency predicted

``--latency predicted`` needs the device's predictor in the data directory
(``modeltailor calibrate --device cpu-ort-1t --samples 64 --model resnet20``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.search import load_model
from compression.data import Dataset, calibration_batches
from compression.model_io import CompressibleModel


def _latency(kind: str, device: str, model: CompressibleModel) -> tuple[Any, str]:
    from engine.device_latency import latency_callback

    return latency_callback(kind, device, model)  # type: ignore[arg-type]


def _space(device: str) -> Any:
    """The space a latency search on ``device`` uses (its channel multiple, no size-only schemes)."""
    from engine.device_space import resolve_space, stored_capabilities
    from engine.spec import SpaceSpec

    return resolve_space(SpaceSpec(), stored_capabilities(device), latency_objective=True).options


def _export_measure(
    model: CompressibleModel, data: Dataset, cm: Any, device: str, runs: int, folder: Path
) -> dict[str, float]:
    """Export a compressed model as the product does and measure it against dense."""
    from compression.mixed_precision import export_policy_onnx, float_graph
    from compression.onnx_export import export_onnx, onnx_accuracy
    from latency_models.harness import measure_pair

    example = model.example_input(2)
    dense = export_onnx(model.gm, example, folder / "dense.onnx")
    fp32 = export_onnx(float_graph(cm.gm), example, folder / "fp32.onnx")
    path = folder / "point.onnx"
    if cm.bits:
        calib = [b.numpy() for b in calibration_batches(data, 8, 64)]
        export_policy_onnx(cm, fp32, calib, path)
    else:
        path.write_bytes(fp32.read_bytes())
    pair = measure_pair(dense, path, device, runs=runs)
    out = {
        "val": onnx_accuracy(path, data.x_val, data.y_val),
        "latency_ms": pair.b.median_ms,
        "speedup": pair.speedup,
        "bytes": path.stat().st_size,
    }
    if data.x_test is not None and data.y_test is not None:
        out["test"] = onnx_accuracy(path, data.x_test, data.y_test)
    return out


def phase_family(
    args: argparse.Namespace, model: CompressibleModel, data: Dataset, out: Path
) -> dict[str, Any]:
    from engine.family import make_family
    from latency_models.harness import measure_pair

    callback, label = _latency(args.latency, args.device, model)
    print(f"latency during the search: {label}", flush=True)
    start = time.perf_counter()
    last = [0.0]

    def progress(phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        if phase != "search" or now - last[0] > 30:
            last[0] = now
            print(f"  [{now - start:6.0f} s] {phase} {json.dumps(info)}", flush=True)

    report = make_family(
        model,
        data,
        device=args.device,
        device_latency=callback,
        budgets=args.budgets,
        out=out,
        latency_label=label,
        recovery=args.recovery,
        finetune_steps=args.finetune_steps,
        runs=args.runs,
        budget_candidates=args.family_candidates,
        space_options=_space(args.device),
        keep_standalone=True,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    m = report.manifest
    print(
        f"\nfamily of {len(m['points'])} points in {seconds:.0f} s, "
        f"{len(report.search.candidates)} candidates scored; dense val {m['dense']['accuracy']:.4f} "
        f"test {m['dense'].get('test_accuracy', float('nan')):.4f}"
    )
    print(
        f"{'pt':>2} {'budget':>6} {'pred/dense':>10} {'search':>7} {'shared':>7} {'val':>7} {'test':>7} "
        f"{'ms':>7} {'speedup':>7} {'bundle/alone ms':>15}"
    )
    for k, p in enumerate(m["points"]):
        alone = out / "standalone" / f"point_{k}.onnx"
        tie = measure_pair(alone, out / p["file"], args.device, runs=args.runs)
        p["bundle_over_standalone_ms"] = 1.0 / tie.speedup
        print(
            f"{k:>2} {p['budget']:>6.2f} "
            f"{p['predicted_latency_ms'] / m['dense_predicted_latency_ms']:>10.3f} "
            f"{p['search_accuracy']:>7.4f} {p['shared_accuracy']:>7.4f} {p['accuracy']:>7.4f} "
            f"{p.get('test_accuracy', float('nan')):>7.4f} {p['latency_ms']:>7.4f} {p['speedup']:>7.2f} "
            f"{p['bundle_over_standalone_ms']:>15.3f}",
            flush=True,
        )
    s = m["sizes"]
    print(
        f"bundle {s['bundle_bytes']} B (weights.bin {s['weights_bytes']} B) = "
        f"{s['bundle_over_largest']:.3f} x the largest point ({s['largest_point_bytes']} B), "
        f"{s['bundle_over_separate']:.3f} x the {len(m['points'])} separate files ({s['separate_bytes']} B)"
    )
    if report.finetune:
        print(f"joint fine-tuning: {report.finetune['steps']} steps in {report.finetune['seconds']:.0f} s")
    m["search_seconds"] = report.search.seconds
    m["candidates"] = len(report.search.candidates)
    return {"manifest": m, "report": report}


def phase_recovery(model: CompressibleModel, data: Dataset, policies: list[Any]) -> dict[str, list[float]]:
    from compression.evaluate import accuracy
    from compression.family import FAMILY_RECOVERIES, build_family
    from compression.scoring import compress
    from engine.search import Evaluator

    ev = Evaluator(model, data, lambda _cm: 0.0, seed=0, reconstruct=True)
    rows: dict[str, list[float]] = {}
    for recovery in FAMILY_RECOVERIES:
        with torch.no_grad():
            fam = build_family(model, policies, ev.calibration, recovery=recovery)
            rows[recovery] = [accuracy(p.cm.gm, ev.x_val, ev.y_val) for p in fam.points]
    with torch.no_grad():
        rows["independent"] = [
            accuracy(compress(model, p, ev.calibration, reconstruct=True).gm, ev.x_val, ev.y_val)
            for p in policies
        ]
    print("\none-shot accuracy of the family's policies (1,000 validation images) by recovery:")
    for name, accs in rows.items():
        print(f"  {name:<12}" + "".join(f" {a:7.4f}" for a in accs), flush=True)
    return rows


def phase_independent(
    args: argparse.Namespace, model: CompressibleModel, data: Dataset
) -> list[dict[str, Any]]:
    from agents import Objective
    from compression.policy import Policy
    from compression.scoring import compress
    from engine.search import Evaluator, run_search

    callback, _label = _latency(args.latency, args.device, model)
    ev = Evaluator(model, data, callback, seed=0, reconstruct=True)
    dense = ev.evaluate(Policy.dense())
    rows: list[dict[str, Any]] = []
    print(f"\nindependent rule searches, {args.candidates} candidates each:")
    for f in args.budgets:
        if f >= 1.0:
            continue
        start = time.perf_counter()
        objective = Objective(max_latency_ms=f * dense.latency_ms)
        result = run_search(
            model,
            data,
            device_latency=callback,
            algorithm="rule",
            budget_candidates=args.candidates,
            objective=objective,
            space_options=_space(args.device),
            reconstruct=True,
        )
        feasible = [c for c in result.candidates if c.feasible]
        if not feasible:
            print(f"  budget {f:.2f}: no feasible candidate", flush=True)
            continue
        best = max(feasible, key=lambda c: c.score.accuracy)
        with torch.no_grad():
            cm = compress(model, best.policy, ev.calibration, reconstruct=True)
        with tempfile.TemporaryDirectory() as tmp:
            measured = _export_measure(model, data, cm, args.device, args.runs, Path(tmp))
        row = {
            "budget": f,
            "search_accuracy": best.score.accuracy,
            "seconds": time.perf_counter() - start,
            **measured,
        }
        rows.append(row)
        print(
            f"  budget {f:.2f}: search {best.score.accuracy:.4f}, val {measured['val']:.4f}, "
            f"test {measured.get('test', float('nan')):.4f}, {measured['latency_ms']:.4f} ms "
            f"({measured['speedup']:.2f}x dense), {measured['bytes']} B, {row['seconds']:.0f} s",
            flush=True,
        )
    return rows


def phase_finetune(
    args: argparse.Namespace, model: CompressibleModel, data: Dataset, policies: list[Any]
) -> None:
    from compression.distill import KDBatches, distill
    from compression.evaluate import accuracy
    from compression.family import build_family
    from compression.family_distill import distill_family
    from engine.finetune_front import config_for
    from engine.search import Evaluator

    ev = Evaluator(model, data, lambda _cm: 0.0, seed=0, reconstruct=True)
    with torch.no_grad():
        fam = build_family(model, policies, ev.calibration, recovery=args.recovery)
    config = config_for(data, 0)
    batches = KDBatches(
        model.gm, data, batch_size=config.batch_size, seed=config.seed, augment=config.augment
    )
    one_shot = [accuracy(p.cm.gm, ev.x_val, ev.y_val) for p in fam.points]
    alone: list[float] = []
    start = time.perf_counter()
    for p in fam.points:
        cm = copy.deepcopy(p.cm)
        distill(cm, None, batches, args.finetune_steps, config=config)
        alone.append(accuracy(cm.gm, ev.x_val, ev.y_val))
    alone_s = time.perf_counter() - start
    start = time.perf_counter()
    distill_family(fam, batches, args.finetune_steps, config=config)
    joint_s = time.perf_counter() - start
    joint = [accuracy(p.cm.gm, ev.x_val, ev.y_val) for p in fam.points]
    print(f"\nfine-tuning, {args.finetune_steps} steps of {config.batch_size} (1,000 validation images):")
    print(f"  {'one-shot':<22}" + "".join(f" {a:7.4f}" for a in one_shot))
    print(f"  {'alone (not shared)':<22}" + "".join(f" {a:7.4f}" for a in alone) + f"   {alone_s:.0f} s")
    print(f"  {'joint (shared)':<22}" + "".join(f" {a:7.4f}" for a in joint) + f"   {joint_s:.0f} s")
    worst = max(a - j for a, j in zip(alone, joint, strict=True))
    print(f"  largest loss of a point against fine-tuning it alone: {100 * worst:.2f} points", flush=True)


BURN = textwrap.dedent(
    """
    import os, sys, time
    os.sched_setaffinity(0, {int(sys.argv[1])})
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        pass
    """
)


def _schedule(run: Any, seconds: float, burners: int, cpu: int) -> list[tuple[bool, float]]:
    """(busy phase?, inference latency in ms) over quiet / busy / quiet phases of ``seconds`` each."""
    times: list[tuple[bool, float]] = []
    for busy in (False, True, False):
        procs = [
            subprocess.Popen([sys.executable, "-c", BURN, str(cpu), str(seconds + 5)])
            for _ in range(burners if busy else 0)
        ]
        try:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                times.append((busy, run()))
        finally:
            for p in procs:
                p.kill()
                p.wait()
    return times


def phase_slowdown(args: argparse.Namespace, bundle: Path, batch: int) -> None:
    import onnxruntime as ort

    from modeltailor.switch import FamilySwitch

    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        switch = FamilySwitch(bundle, target_ms=1e3, window=args.window, quantile=args.quantile)
        shape = (batch, *json.loads((bundle / "family.json").read_text())["input"]["shape"][1:])
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        expected = switch.profile(x, runs=50)
        best = switch.order[0]
        target = args.target_factor * expected[best]
        switch.target_ms = target
        switch.current = switch.choose(1.0)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        fixed = ort.InferenceSession(
            str(switch.points[best].file), options, providers=["CPUExecutionProvider"]
        )
        name = fixed.get_inputs()[0].name

        def run_fixed() -> float:
            t = time.perf_counter()
            fixed.run(None, {name: x})
            return (time.perf_counter() - t) * 1000.0

        used: list[int] = []

        def run_switch() -> float:
            switch.run(x)
            used.append(switch.last_point or 0)
            return float(switch.last_ms or 0.0)

        print(
            f"\nslowdown, batch {batch}, switch window {args.window} quantile {args.quantile}: "
            f"target {target:.4f} ms ({args.target_factor} x point {best}'s "
            f"{expected[best]:.4f} ms), phases of {args.phase_s} s quiet / 2 burners on core {cpu} / "
            f"quiet; expected {[round(e, 4) for e in expected]}"
        )
        for label, run in (("fixed point", run_fixed), ("switch", run_switch)):
            runs = _schedule(run, args.phase_s, 2, cpu)
            times = np.asarray([t for _, t in runs])
            busy = np.asarray([t for b, t in runs if b])
            print(
                f"  {label:<12} {len(times):6d} inferences, p50 {np.percentile(times, 50):.4f} ms, "
                f"p95 {np.percentile(times, 95):.4f} ms, over target {100 * np.mean(times > target):.1f} % "
                f"(busy phase: {len(busy)} inferences, p50 {np.percentile(busy, 50):.4f} ms, "
                f"p95 {np.percentile(busy, 95):.4f} ms, over target {100 * np.mean(busy > target):.1f} %)",
                flush=True,
            )
        counts = np.bincount(used, minlength=len(switch.points))
        accs = [p.accuracy for p in switch.points]
        mean_acc = float(np.dot(counts, accs) / max(1, counts.sum()))
        print(
            f"  switch: {switch.switches} switches, inferences per point {counts.tolist()}, "
            f"mean accuracy of the points run {mean_acc:.4f} (fixed point {accs[best]:.4f})",
            flush=True,
        )
    finally:
        os.sched_setaffinity(0, before)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--budgets", default="1.0,0.7,0.5,0.35")
    parser.add_argument("--device", default="cpu-ort-1t")
    parser.add_argument("--latency", default="predicted", choices=("predicted", "measured", "macs-proxy"))
    parser.add_argument("--recovery", default="joint", choices=("joint", "largest", "none"))
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--candidates", type=int, default=60, help="per independent search")
    parser.add_argument("--family-candidates", type=int, default=None, help="limit of the family search")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--target-factor", type=float, default=1.3)
    parser.add_argument("--phase-s", type=float, default=5.0)
    parser.add_argument("--window", type=int, default=10, help="FamilySwitch window")
    parser.add_argument("--quantile", type=float, default=0.9, help="FamilySwitch quantile")
    parser.add_argument("--slowdown-batches", default="1,8", help="input batch sizes of the slowdown phase")
    parser.add_argument("--phases", default="family,recovery,independent,finetune,slowdown")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="bundle folder (default: a temporary one; without the "
        "family phase, the bundle an earlier run wrote there)",
    )
    args = parser.parse_args(argv)
    args.budgets = [float(b) for b in args.budgets.split(",")]
    phases = set(args.phases.split(","))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  load {os.getloadavg()}", flush=True)
    model, data = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "bundle"
        if "family" in phases:
            fam = phase_family(args, model, data, out)
            policies = [p.policy for p in fam["report"].search.points]
        else:  # the other phases on a bundle written before (--out)
            from compression.policy import Policy

            manifest = json.loads((out / "family.json").read_text())
            policies = [Policy.from_dict(p["policy"]) for p in manifest["points"]]
        if "recovery" in phases:
            phase_recovery(model, data, policies)
        if "independent" in phases:
            phase_independent(args, model, data)
        if "finetune" in phases and args.finetune_steps > 0:
            phase_finetune(args, model, data, policies)
        if "slowdown" in phases:
            for batch in (int(b) for b in args.slowdown_batches.split(",")):
                phase_slowdown(args, out, batch)
    print(f"done  load {os.getloadavg()}")


if __name__ == "__main__":
    main()
