"""Calibration in the loop (issue 13): what a top-up and active measurement buy on a model the
predictor never saw, and what they cost.

    .venv/bin/python -m bench.active_measurement [--train 30] [--topup 16] [--budget 60] [--eval 12]

On ``cpu-ort-1t`` in a temporary data directory:

1. a generic predictor (kernel GBDT) from ``--train`` samples of random architectures only, so the
   target model's family (ResNet-20, here at 1x28x28, untrained: latency needs no weights) is
   held out;
2. ``--eval`` random policies of the target's search space timed against its dense model (the
   truth; never shown to any predictor);
3. the job's loop as ``modeltailor search`` runs it: the top-up (``--topup`` policies, refit),
   then a random search of ``--budget`` candidates on MNIST with the default active
   measurement (15 % of the budget, at most 30, 8 a round, a refit after each round);
4. at the end, the three front points spread from fastest to most accurate timed against dense.

Printed: the noise floor (the held-out policies timed a second time, against the first), the
speedup error (±10 % share, MAPE) on the held-out policies with the generic predictor,
after the top-up and after the search's refits; the error the predictor had on each round's
measurements before it refitted on them; the end-of-search front points' predicted against
measured speedups; and the seconds each phase took.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _errors(jp: Any, truth: list[Any], statistic: str) -> dict[str, float]:
    from compression.policy import Policy
    from engine.active_measurement import speedup_errors

    ms, _std = jp.predict([Policy.dense(), *[m.policy for m in truth]])
    predicted = [float(ms[0]) / float(v) for v in ms[1:]]
    return speedup_errors(predicted, [m.speedup(statistic) or math.nan for m in truth])


def _line(name: str, e: dict[str, float]) -> str:
    if not e.get("n"):
        return f"{name:<34} (nothing measured)"
    return (
        f"{name:<34} n={int(e['n']):>3}  within ±10 % {e['speedup_within_10pct']:5.1f} %  "
        f"MAPE {e['speedup_mape']:5.1f} %"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=30, help="generic calibration samples")
    parser.add_argument("--topup", type=int, default=16, help="policies of the model timed before the search")
    parser.add_argument("--budget", type=int, default=60, help="search candidates")
    parser.add_argument("--eval", type=int, default=12, help="held-out policies of the model timed as truth")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from compression.data import load_dataset
    from compression.model_io import from_module
    from compression.policy import Policy
    from compression.space_builder import space_for
    from compression.zoo import build_model
    from engine.active_measurement import ActiveMeasurer, JobPredictor, draw_policies, speedup_errors, topup
    from engine.local_measuring import LocalMeasuringDevice, load_stored
    from engine.search import run_search
    from engine.spec import ActiveMeasurementSpec
    from latency_models.calibrate import calibrate, fit_predictors
    from latency_models.calibration_run import HarnessTransport
    from latency_models.devices import get_device
    from latency_models.focus import model_ids
    from latency_models.incremental import measure_policies
    from latency_models.sampling import sample_plan
    from latency_models.store import DeviceStore

    torch.set_num_threads(1)
    device = get_device("cpu-ort-1t")
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mt-bench-active-") as root:
        store = DeviceStore(device.name, Path(root))
        t = time.monotonic()
        plan = sample_plan(args.train, seed=args.seed, zoo_fraction=0.0)  # no zoo model: ResNet-20 held out
        calibrate(device, args.train, seed=args.seed, store=store, plan=plan)
        fit_predictors(store.records(), kinds=("kernel_gbdt",), seed=args.seed, store=store)
        seconds["generic calibration"] = time.monotonic() - t
        stored = load_stored(store)
        assert stored is not None
        statistic = stored.predictor.statistic

        dataset = load_dataset("mnist")
        module = build_model("resnet20", in_channels=1, image_size=28, num_classes=10).eval()
        model = from_module(module, torch.from_numpy(dataset.x_val[:2]), "resnet20")
        ids = model_ids(model, None, "resnet20")
        space = space_for(model)
        t = time.monotonic()
        held_out = draw_policies(space, args.eval, seed=args.seed + 1000)
        truth = [m for m in measure_policies(HarnessTransport(device), model, ids, held_out) if m.ok]
        # The same policies timed again: how far two timings of this machine agree (the floor).
        again = {m.policy.hash: m for m in measure_policies(HarnessTransport(device), model, ids, held_out)}
        floors = {}
        for stat in dict.fromkeys((statistic, "median")):
            pairs = [(m.speedup(stat), again[m.policy.hash].speedup(stat)) for m in truth]
            kept = [(a, b) for a, b in pairs if a and b]
            floors[stat] = speedup_errors([a for a, _ in kept], [b for _, b in kept])
        seconds["held-out truth (timed twice)"] = time.monotonic() - t

        jp = JobPredictor(stored, space)
        rows = [_line(f"noise floor ({stat}): timed again", floor) for stat, floor in floors.items()]
        rows.append(_line(f"generic v{stored.version}", _errors(jp, truth, statistic)))
        measuring = LocalMeasuringDevice(device, store, seed=args.seed)
        t = time.monotonic()
        done = topup(measuring, model, ids, space, stored, args.topup, seed=args.seed)
        seconds["top-up"] = time.monotonic() - t
        jp.swap(done.loaded)
        rows.append(_line("  its top-up, before the refit", done.report.get("error_before_refit") or {}))
        rows.append(_line(f"after top-up v{jp.version}", _errors(jp, truth, statistic)))

        reports: list[dict[str, Any]] = []
        active = ActiveMeasurer(
            ActiveMeasurementSpec(),
            device=measuring,
            model=model,
            ids=ids,
            predictor=jp,
            budget_candidates=args.budget,
            budget_seconds=None,
            progress=reports.append,
        )
        t = time.monotonic()
        with torch.no_grad():
            result = run_search(
                model, dataset, device_latency=jp.live, algorithm="random", budget_candidates=args.budget,
                seed=args.seed, val_images=200, reconstruct=False, rescore=jp.rescore,
                between_rounds=active.between_rounds,
            )  # fmt: skip
        seconds["search incl. active measurement"] = time.monotonic() - t
        seconds["  of which measuring + refits"] = active.seconds
        for r in reports:
            last = r.get("last_round") or {}
            rows.append(
                _line(f"  round {last.get('round')}, before its refit", last.get("error_before_refit") or {})
            )
        rows.append(_line(f"after the search's refits v{jp.version}", _errors(jp, truth, statistic)))

        t = time.monotonic()
        order = sorted(result.pareto, key=lambda c: c.score.latency_ms)
        picks = (
            [order[i] for i in sorted({round(i * (len(order) - 1) / 2) for i in range(3)})] if order else []
        )
        front = [
            m
            for m in measure_policies(HarnessTransport(device), model, ids, [c.policy for c in picks])
            if m.ok
        ]
        seconds["front re-measurement"] = time.monotonic() - t
        rows.append(_line("front points (end of search)", _errors(jp, front, statistic)))
        ms, _std = jp.predict([Policy.dense(), *[m.policy for m in front]])

    report = active.report()
    print(f"target: resnet20@1x28x28 (held out), device {device.name}, statistic {statistic}")
    print(
        f"active measurement: {report['measured']} of {report['limit']} measured in {report['rounds']} rounds"
    )
    print("\n".join(rows))
    for m, p in zip(front, ms[1:], strict=True):
        measured = m.speedup(statistic) or math.nan
        print(f"  front point: predicted speedup {ms[0] / p:.3f}  measured {measured:.3f}")
    for name, s in seconds.items():
        print(f"{name:<34} {s:7.1f} s")


if __name__ == "__main__":
    main()
