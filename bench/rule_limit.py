"""The rule agent under a latency limit: with and without its sensitivity analysis.

A user's job usually carries a limit ("<= 2 ms"). For each limit (a fraction of the dense
model's predicted latency) the rule agent runs twice: with sensitivity (the default) and
without it (``sensitivity=False``: sweep plus coordinate steps only). It prints the best
feasible accuracy found within 50, 100 and 200 candidates. Scoring is as in
``bench.search``, and so is latency: the committed predictor. Scored policies are cached
in a *copy* of the committed table, so the published search figures stay as they are::

    nice -n 10 .venv/bin/python -m bench.rule_limit --model resnet20 --fractions 0.4,0.45,0.6

``--synthetic`` scores with ``agents.testing.SyntheticProblem`` instead (seconds, no model
run), on ResNet-20 and MobileNetV2 search spaces, three problem seeds each.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from agents import Objective
from agents.objective import Score
from bench.search import (
    EARLY_MARGIN,
    PREDICTOR_ROOT,
    REF_ACCURACY_DROP,
    TABLES,
    Table,
    evaluate_early_stop,
    latency_source,
    load_model,
    replay,
)
from compression.policy import Policy
from compression.space import SearchSpace
from compression.space_builder import space_for
from engine.search import Evaluator

BUDGETS = (50, 100, 200)


def best_feasible(
    space: SearchSpace, objective: Objective, table: Table, seed: int, sensitivity: bool
) -> list[float]:
    """Best feasible accuracy among the rule agent's first 50 / 100 / 200 distinct candidates."""
    run = replay("rule", space, objective, table, seed, max(BUDGETS), {"sensitivity": sensitivity})
    return [max((s.accuracy for s in run.scores[:b] if objective.feasible(s)), default=0.0) for b in BUDGETS]


def scored_by(score: Callable[[Policy], Score]) -> Callable[[Policy], tuple[Score, int]]:
    """A table's scoring function from a plain one (no validation images to count)."""
    return lambda policy: (score(policy), 0)


def synthetic(fractions: list[float]) -> None:
    from agents.testing import SyntheticProblem
    from compression.model_io import from_module
    from compression.zoo import build_model

    print(
        f"{'space':<12} {'seed':>4} {'limit':>6} {'agent':<22}"
        + "".join(f"{f'acc@{b}':>10}" for b in BUDGETS)
    )
    for arch, size in (("resnet20", 8), ("mobilenetv2", 16)):
        torch.manual_seed(0)
        net = build_model(arch, in_channels=1, image_size=size, num_classes=10)
        space = space_for(from_module(net, torch.randn(2, 1, size, size), name=arch))
        for seed in range(3):
            problem = SyntheticProblem(space, seed=seed)
            dense = problem.dense_score()
            table = Table(None, scored_by(problem.score))
            for fraction in fractions:
                objective = Objective(max_latency_ms=fraction * dense.latency_ms).with_dense(dense)
                for sensitivity in (True, False):
                    best = best_feasible(space, objective, table, 0, sensitivity)
                    name = "rule" if sensitivity else "rule, no sensitivity"
                    row = f"{arch:<12} {seed:>4} {fraction:>6.2f} {name:<22}"
                    print(row + "".join(f"{a:>10.4f}" for a in best), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--fractions", default="0.4,0.45,0.6", help="latency limits, fractions of dense")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic", action="store_true", help="SyntheticProblem instead of the real model")
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.synthetic:
        synthetic(fractions)
        return
    model, data = load_model(args.model)
    space = space_for(model)
    latency_fn, relatency, label = latency_source("predicted", "cpu-ort-1t", model, PREDICTOR_ROOT)
    evaluator = Evaluator(model, data, latency_fn, val_images=1000, seed=0, reconstruct=False)
    hopeless: list[float] = []

    def score_fn(policy: Policy) -> tuple[Score, int]:
        if not hopeless:
            return evaluator.evaluate(policy), len(evaluator.y_val)
        return evaluate_early_stop(evaluator, policy, hopeless[0])

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "table.jsonl.gz"
        committed = TABLES / f"{args.model}.jsonl.gz"
        if committed.is_file():
            shutil.copy(committed, path)
        table = Table(path, score_fn, relatency)
        dense = table.score(Policy.dense(), "dense")
        hopeless.append(dense.accuracy - REF_ACCURACY_DROP - EARLY_MARGIN)
        print(
            f"{args.model}: dense accuracy {dense.accuracy:.4f}, latency {dense.latency_ms:.3f} ms ({label})"
        )
        print(f"{'limit':>8} {'agent':<22}" + "".join(f"{f'acc@{b}':>10}" for b in BUDGETS), flush=True)
        for fraction in fractions:
            objective = Objective(max_latency_ms=fraction * dense.latency_ms).with_dense(dense)
            for sensitivity in (True, False):
                best = best_feasible(space, objective, table, args.seed, sensitivity)
                name = "rule" if sensitivity else "rule, no sensitivity"
                print(f"{fraction:>8.2f} {name:<22}" + "".join(f"{a:>10.4f}" for a in best), flush=True)


if __name__ == "__main__":
    main()
