"""Executors benchmark: candidates evaluated per minute in process, local pool (1, 2 workers), Ray.

ResNet-20 trained on the MNIST split (the zoo cache), a fixed list of random policies of
its search space, each scored for real exactly as the search does (apply, BatchNorm
recalibration on 4 batches, accuracy on 1,000 validation images, size and MACs, and the
latency callback: by default the ONNX Runtime latency measured on this CPU, 1 thread,
median of 50 runs, as ``modeltailor search`` does by default).

For each executor: start-up (workers started, model and data loaded, first ``workers``
policies scored) and the steady rate over the remaining policies, in candidates per
minute. Every executor scores the same policies; the bench checks their accuracies agree.

Run: .venv/bin/python -m bench.executors [--candidates 16] [--executors inproc,pool1,pool2,ray2]
     [--latency measured|macs-proxy]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agents import Objective, make
from compression.data import load_dataset
from compression.policy import Policy
from compression.resolve import data_dir, resolve_model
from compression.space_builder import space_for
from engine.device_latency import latency_callback
from engine.executors import InProcessExecutor, LocalPoolExecutor, RayExecutor, ensure_ray
from engine.search import Evaluator, EvaluatorPayload, evaluate_in_worker, load_worker_evaluator


def executor_for(name: str) -> Callable[[Callable[..., Any], tuple[Any, ...]], Any]:
    if name == "inproc":
        return InProcessExecutor
    if name.startswith("pool"):
        n = int(name[4:])
        return lambda init, args: LocalPoolExecutor(n, init, args)
    if name.startswith("ray"):
        n = int(name[3:])
        ensure_ray(num_cpus=n)
        return lambda init, args: RayExecutor(n, init, args)
    raise ValueError(f"unknown executor {name!r}: inproc, poolN or rayN")


def bench(name: str, evaluator: Evaluator, policies: list[Policy]) -> dict[str, Any]:
    token = uuid.uuid4().hex
    start = time.perf_counter()
    executor = executor_for(name)(load_worker_evaluator, (token, EvaluatorPayload(evaluator)))
    items = [(token, p.to_dict()) for p in policies]
    try:
        first = executor.map(evaluate_in_worker, items[: executor.workers])
        startup = time.perf_counter() - start
        t0 = time.perf_counter()
        rest = executor.map(evaluate_in_worker, items[executor.workers :])
        steady = time.perf_counter() - t0
    finally:
        executor.close()
    scores = first + rest
    return {
        "name": name,
        "workers": executor.workers,
        "startup_s": startup,
        "per_min": 60 * len(rest) / steady,
        "accuracies": [s.accuracy for s in scores],
        "errors": sum(s.error is not None for s in scores),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--executors", default="inproc,pool1,pool2,ray2")
    parser.add_argument("--latency", default="measured", choices=("measured", "macs-proxy"))
    parser.add_argument("--cache", type=Path, default=data_dir() / "zoo")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    data = load_dataset("mnist")
    model = resolve_model("resnet20", data, cache_dir=args.cache)
    latency, label = latency_callback(args.latency, "cpu-ort-1t")  # type: ignore[arg-type]
    evaluator = Evaluator(model, data, latency, val_images=1000)
    agent = make("random", space_for(model), Objective(), 0)
    policies = agent.ask(args.candidates)
    print(f"ResNet-20 on MNIST, {len(policies)} random policies; latency: {label}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; load average {os.getloadavg()}")
    print(f"{'executor':10} {'workers':>7} {'start-up s':>10} {'cand/min':>9} {'errors':>6}")
    reference: list[float] | None = None
    for name in args.executors.split(","):
        row = bench(name, evaluator, policies)
        w, startup, rate, errors = row["workers"], row["startup_s"], row["per_min"], row["errors"]
        print(f"{name:10} {w:>7} {startup:>10.1f} {rate:>9.1f} {errors:>6}")
        if reference is None:
            reference = row["accuracies"]
        elif row["accuracies"] != reference:
            print(f"  !! {name}: accuracies differ from {args.executors.split(',')[0]}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
