"""Search-quality benchmark: agents replayed against a table of really scored policies.

Every policy is scored once for real (apply, BatchNorm recalibration on 4x64 training images,
accuracy on 1,000 validation images; with ``--reconstruct`` the pruned layers are first
re-fitted as the product does by default) and appended to a gzip JSONL table keyed by policy
hash (``bench/tables/<model>[-refit].jsonl.gz``, kept in git). Latency is not stored: it comes
from ``--latency`` (the device's predictor by default) when the table is read. The table is
read back on start, so an interrupted run resumes where it stopped. Agents are then
replayed: a proposal already in the table costs nothing, a new one is scored and added.

For each agent and seed the search runs to the largest budget; a smaller budget is the
prefix of that run (every agent here is anytime: none is told its budget). Reported per
agent and budget, mean (and spread) over seeds:

- ``hv``: hypervolume of the (accuracy, latency) front found, as a fraction of the
  best-known front's (everything in the table), reference point (dense accuracy - 10
  points, dense latency);
- ``acc@50%``: best accuracy among candidates with latency <= 50 % of dense (0 if none).

Run (niced, resumable)::

    nohup nice -n 10 .venv/bin/python -m bench.search --model resnet20 > /tmp/bench-search.log &
    .venv/bin/python -m bench.search --model resnet20 --report-only   # table from the cache

``--fill-random N`` first adds N uniform random samples to the table (more of the space
known, a better "best-known" front); ``--agents`` / ``--seeds`` / ``--budgets`` choose the grid.
``ddpg`` and ``agmc`` get the latency source as their ``latency_fn`` (the model-based agents'
action wall and acquisition); ``ddpg-classic`` / ``agmc-classic`` are the model-free agents
from before issue 14. ``--ref-drop`` moves the reference point's accuracy (say where random
has points, so "beats random" is against a non-zero hypervolume). ``--synthetic`` scores with
``agents.testing.SyntheticProblem`` (no model run); there ``--model branchy`` is the held-out
branchy CNN of ``tests/compression/branchy_model.py`` and the best-known front is the union
of every agent's points.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents import AGENTS, Objective, Score, make
from agents.base import Agent
from agents.objective import hypervolume_2d
from agents.registry import TAKES_LATENCY_FN, classic_agmc, classic_ddpg
from agents.rule import rule_sweep
from compression.apply import CompressedModel
from compression.data import load_dataset
from compression.model_io import CompressibleModel
from compression.policy import Policy
from compression.resolve import data_dir, resolve_model
from compression.space import SearchSpace
from compression.space_builder import space_for
from engine.device_latency import PROXY_LABEL, PROXY_MACS_PER_MS, macs_proxy, stored_predictor_latency
from engine.search import Evaluator

AGENT_ORDER = ("random", "rule", "optuna-tpe", "optuna-nsga2", "ddpg", "agmc")
#: Model-free agents from before issue 14, for before/after tables (not in the registry).
CLASSIC: dict[str, Callable[..., Agent]] = {"ddpg-classic": classic_ddpg, "agmc-classic": classic_agmc}
BUDGETS = (50, 100, 200)
SEEDS = (0, 1, 2, 3, 4)
ASK_BATCH = 4
MAX_IDLE_ROUNDS = 50
REF_ACCURACY_DROP = 0.10
LATENCY_FRACTION = 0.5
TABLES = Path(__file__).parent / "tables"
#: The predictor the published figures were computed with (kept in git, so that a replay on
#: another machine reproduces them); ``--predictor-root user`` uses your own calibration.
PREDICTOR_ROOT = Path(__file__).parent / "predictor"


EARLY_IMAGES = 250  # a policy hopeless on these is not evaluated on the rest
EARLY_MARGIN = 0.30  # hopeless: more than 10 + 30 points below dense after EARLY_IMAGES


def evaluate_early_stop(evaluator: Evaluator, policy: Policy, hopeless_below: float) -> tuple[Score, int]:
    """``evaluator.evaluate`` but stopping after EARLY_IMAGES when the accuracy is hopeless.

    Such a policy is far below the reference point, so it can never count in a hypervolume;
    its stored accuracy is then the estimate from the first EARLY_IMAGES images, with BatchNorm
    recalibrated on one batch (the table records how many images each accuracy used).
    Everything else is scored exactly as ``Evaluator`` does: all batches, all images.
    """
    from compression.evaluate import predict, recalibrate_bn
    from compression.metrics import measure
    from compression.policy import PolicyError
    from compression.scoring import compress

    start = time.perf_counter()
    try:
        with torch.no_grad():
            cal = evaluator.calibration
            quick = policy.act_bits != 8 and len(cal) > 1  # activation ranges are calibrated once
            # The hopeless check needs only a rough BatchNorm estimate: one calibration batch
            # (recalibration is most of a policy's cost). A policy that passes is recalibrated
            # on all batches, which recomputes the statistics from scratch.
            cm = compress(
                evaluator.model, policy, cal[:1] if quick else cal, reconstruct=evaluator.reconstruct
            )
            x, y = evaluator.x_val, evaluator.y_val
            first = predict(cm.gm, x[:EARLY_IMAGES]).argmax(dim=-1).numpy() == y[:EARLY_IMAGES]
            if first.mean() < hopeless_below:
                correct, n = first, EARLY_IMAGES
            else:
                if quick:
                    if evaluator.reconstruct:  # re-fit on every batch, as Evaluator does
                        cm = compress(evaluator.model, policy, cal, reconstruct=True)
                    else:
                        recalibrate_bn(cm.gm, cal)
                    first = predict(cm.gm, x[:EARLY_IMAGES]).argmax(dim=-1).numpy() == y[:EARLY_IMAGES]
                rest = predict(cm.gm, x[EARLY_IMAGES:]).argmax(dim=-1).numpy()
                correct, n = np.concatenate([first, rest == y[EARLY_IMAGES:]]), len(y)
            m = measure(cm)
        latency = float(evaluator.device_latency(cm))
    except (PolicyError, ValueError, RuntimeError) as exc:
        return Score.failed(f"{type(exc).__name__}: {exc}"), 0
    score = Score(
        accuracy=float(correct.mean()),
        latency_ms=latency,
        size_bytes=float(m.size_bytes),
        macs=float(m.macs),
        eval_seconds=time.perf_counter() - start,
    )
    return score, n


def runs_from_sources(
    path: Path,
    table: Table,
    names: Sequence[str],
    seeds: Sequence[int],
    budget: int,
    prefix: dict[str, list[str]] | None = None,
) -> list[Run]:
    """Runs read back from the table's ``source`` column ("agent/seed", in the order scored).

    No agent is run: this is exact for a run whose proposals were never scored first by
    another run (true of the continuous agents, whose policies never coincide), which is
    what makes it a quick report while the tabulation is still going. ``prefix``: policy
    hashes an agent proposes first whatever its seed (the Optuna agents' warm start, which
    the rule agent scored first), put before its own rows.
    """
    by_source: dict[str, list[tuple[str, Score]]] = {}
    seen: set[tuple[str, str]] = set()  # two processes replaying one run both append its policies
    for raw in _read_lines(path):
        if (raw["source"], raw["hash"]) in seen:
            continue
        seen.add((raw["source"], raw["hash"]))
        # The table's current score: its latency is recomputed for the source in use.
        score = table.scores.get(raw["hash"]) or Score.from_dict(raw["score"])
        by_source.setdefault(raw["source"], []).append((raw["hash"], score))
    runs = []
    for name in names:
        first = [h for h in (prefix or {}).get(name, []) if h in table.scores]
        head = [table.scores[h] for h in first]
        for seed in seeds:
            own = by_source.get(f"{name}/{seed}", [])
            if not own:
                continue
            scores = (head + [s for h, s in own if h not in first])[:budget]
            if scores:
                runs.append(Run(name, seed, scores, 0.0, cut_short=len(scores) < budget))
    return runs


Relatency = Callable[[Sequence[Policy], Sequence[Score]], Sequence[float]]


def _read_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The table's rows; a row cut short by a kill (or a gzip member cut short) ends the read."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f:
            for line in f:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue
    except (EOFError, gzip.BadGzipFile, OSError) as exc:
        print(f"warning: {path}: stopped reading at a damaged row ({exc})", flush=True)


def _append_line(path: Path, row: dict[str, Any]) -> None:
    """Append one row in a single write (O_APPEND), so two processes can share a table.

    A ``.gz`` table gets one gzip member per row: members concatenate into a valid stream.
    """
    data = (json.dumps(row) + "\n").encode()
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def pack(path: Path) -> tuple[int, int]:
    """Rewrite a table as one gzip stream (rows in their order, a repeated row once).

    Appends write one gzip member per row, which compresses each row alone; one stream
    shares the dictionary across rows (several times smaller, for keeping tables in git).
    Returns (bytes before, bytes after).
    """
    before = path.stat().st_size
    seen: set[tuple[str, str]] = set()
    rows = []
    for raw in _read_lines(path):
        key = (raw["source"], raw["hash"])
        if key not in seen:
            seen.add(key)
            rows.append(json.dumps(raw))
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wt", compresslevel=9) as f:
        f.write("\n".join(rows) + "\n")
    os.replace(tmp, path)
    return before, path.stat().st_size


class Table:
    """Scores by policy hash, persisted as one JSON line per policy (append-only, resumable).

    The table is the expensive part, accuracy: latency is whatever ``relatency`` says when
    the table is read (the device's predictor, or the MACs proxy), so one table serves every
    latency source and a refitted predictor does not invalidate it.
    """

    def __init__(
        self,
        path: Path | None,
        score_fn: Callable[[Policy], tuple[Score, int]],
        relatency: Relatency | None = None,
    ) -> None:
        self.path = path
        self.score_fn = score_fn
        self.scores: dict[str, Score] = {}
        self.policies: dict[str, dict[str, Any]] = {}
        self.sources: dict[str, str] = {}
        self.misses = 0
        self.hits = 0
        self.seconds = 0.0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        if path is not None and path.is_file():
            for raw in _read_lines(path):
                self.scores[raw["hash"]] = Score.from_dict(raw["score"])
                self.policies[raw["hash"]] = raw["policy"]
                self.sources.setdefault(raw["hash"], raw["source"])
        if relatency is not None and self.scores:
            self._relatency(relatency)

    def _relatency(self, relatency: Relatency) -> None:
        ok = [h for h, s in self.scores.items() if s.ok]
        policies = [Policy.from_dict(self.policies[h]) for h in ok]
        latencies = relatency(policies, [self.scores[h] for h in ok])
        for h, lat in zip(ok, latencies, strict=True):
            self.scores[h] = replace(self.scores[h], latency_ms=float(lat))

    def __len__(self) -> int:
        return len(self.scores)

    def score(self, policy: Policy, source: str) -> Score:
        """The policy's score: from the table, or scored now and appended."""
        h = policy.hash
        cached = self.scores.get(h)
        if cached is not None:
            self.hits += 1
            return cached
        start = time.perf_counter()
        s, images = self.score_fn(policy)
        self.seconds += time.perf_counter() - start
        self.misses += 1
        self.scores[h] = s
        self.policies[h] = policy.to_dict()
        self.sources[h] = source
        if self.path is not None:
            row = {"hash": h, "source": source, "val_images": images, "policy": policy.to_dict()}
            _append_line(self.path, {**row, "score": s.to_dict()})
        return s


@dataclass
class Run:
    """The distinct candidates one agent proposed, in order."""

    agent: str
    seed: int
    scores: list[Score]
    seconds: float
    cut_short: bool = False  # --report-only met a policy not in the table


def replay(
    name: str,
    space: SearchSpace,
    objective: Objective,
    table: Table,
    seed: int,
    budget: int,
    agent_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> Run:
    """Run agent ``name`` until it has proposed ``budget`` distinct policies (or converged)."""
    if name in CLASSIC:
        agent = CLASSIC[name](space, objective, seed, **(agent_options or {}))
    else:
        agent = make(name, space, objective, seed, **(agent_options or {}))
    seen: set[str] = set()
    out: list[Score] = []
    idle = 0
    start = time.perf_counter()
    while len(out) < budget and idle < MAX_IDLE_ROUNDS:
        policies = agent.ask(min(ASK_BATCH, budget - len(out)))
        scores = []
        new = 0
        for p in policies:
            try:
                s = table.score(p, f"{name}/{seed}")
            except LookupError:
                return Run(name, seed, out, time.perf_counter() - start, cut_short=True)
            scores.append(s)
            if p.hash not in seen:
                seen.add(p.hash)
                out.append(s)
                new += 1
        agent.tell(policies, scores)
        idle = 0 if new else idle + 1
        if progress and new and len(out) % 25 < new:
            print(
                f"  {name}/{seed}: {len(out)}/{budget}, table {len(table)}, "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
    return Run(name, seed, out, time.perf_counter() - start)


def reference(dense: Score) -> tuple[float, float]:
    return (dense.accuracy - REF_ACCURACY_DROP, dense.latency_ms)


def set_reference_drop(drop: float) -> None:
    """Move the reference point's accuracy to ``dense - drop`` for this process."""
    global REF_ACCURACY_DROP
    REF_ACCURACY_DROP = drop


def hypervolume(scores: Sequence[Score], dense: Score) -> float:
    return hypervolume_2d([(s.accuracy, s.latency_ms) for s in scores if s.ok], reference(dense))


def best_under(scores: Sequence[Score], max_latency: float) -> float:
    ok = [s.accuracy for s in scores if s.ok and s.latency_ms <= max_latency]
    return max(ok) if ok else 0.0


def summarise(
    runs: Sequence[Run], dense: Score, best_hv: float, budgets: Sequence[int]
) -> dict[str, dict[int, dict[str, float]]]:
    """agent -> budget -> mean/std of the hv fraction and of acc@50 % over seeds."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name in dict.fromkeys(r.agent for r in runs):
        out[name] = {}
        for b in budgets:
            # A run cut short counts only at the budgets it reached.
            mine = [r for r in runs if r.agent == name and (not r.cut_short or len(r.scores) >= b)]
            if not mine:
                continue
            hv = [hypervolume(r.scores[:b], dense) / best_hv for r in mine]
            acc = [best_under(r.scores[:b], LATENCY_FRACTION * dense.latency_ms) for r in mine]
            out[name][b] = {
                "hv": statistics.mean(hv),
                "hv_std": statistics.pstdev(hv),
                "hv_min": min(hv),
                "acc50": statistics.mean(acc),
                "acc50_std": statistics.pstdev(acc),
                "n": min(len(r.scores) for r in mine),
                "seeds": len(mine),
            }
    return out


def format_table(summary: dict[str, dict[int, dict[str, float]]], budgets: Sequence[int]) -> str:
    head = f"{'agent':13}" + "".join(f" {'hv@' + str(b):>14}" for b in budgets)
    head += "".join(f" {'acc50@' + str(b):>15}" for b in budgets)
    head += "  seeds@" + "/".join(map(str, budgets))
    lines = [head, "-" * len(head)]
    missing = f" {'-':>14}"
    for name, per in summary.items():
        row = f"{name:13}"
        row += "".join(
            f" {per[b]['hv']:7.3f}±{per[b]['hv_std']:5.3f} " if b in per else missing for b in budgets
        )
        row += "".join(
            f" {per[b]['acc50']:8.4f}±{per[b]['acc50_std']:5.3f}" if b in per else missing + " "
            for b in budgets
        )
        row += "  " + "/".join(str(int(per[b]["seeds"])) if b in per else "0" for b in budgets)
        lines.append(row)
    return "\n".join(lines)


def latency_source(
    kind: str, device: str, model: CompressibleModel, root: Path | None = None
) -> tuple[Callable[[CompressedModel], float], Relatency, str]:
    """The evaluator's latency callback, the table's batch re-latency, and a label to print.

    ``root``: the data directory whose ``devices/<device>`` holds the predictor (default: the
    user's, where ``modeltailor calibrate`` stores it).

    Raises:
        SystemExit: ``predicted`` for a device with no stored predictor (says how to make one).
    """
    if kind == "macs-proxy":
        return macs_proxy, lambda _p, scores: [s.macs / PROXY_MACS_PER_MS for s in scores], PROXY_LABEL
    found = stored_predictor_latency(device, model, root)
    if found is None:
        raise SystemExit(
            f"device {device} has no stored predictor: run `modeltailor calibrate --device {device}` "
            "first, or pass --latency macs-proxy"
        )
    callback, label = found
    from latency_models.store import DeviceStore

    predictor, _, _ = DeviceStore(device, root).load()
    space = space_for(model)

    def relatency(policies: Sequence[Policy], _scores: Sequence[Score]) -> Sequence[float]:
        return list(predictor.predict(space, list(policies)))

    return callback, relatency, label


def load_model(arch: str) -> tuple[CompressibleModel, Any]:
    data = load_dataset("mnist")
    model = resolve_model(arch, data, cache_dir=data_dir() / "zoo")
    return model, data


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--agents", default=",".join(AGENT_ORDER))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--fill-random", type=int, default=0, help="uniform samples to add first")
    parser.add_argument(
        "--table", type=Path, default=None, help="default bench/tables/MODEL.jsonl.gz (kept in git)"
    )
    parser.add_argument(
        "--latency",
        choices=("predicted", "macs-proxy"),
        default="predicted",
        help="predicted: the device's stored predictor (modeltailor calibrate); macs-proxy: MACs / 1e6",
    )
    parser.add_argument("--device", default="cpu-ort-1t", help="device whose predictor gives latency")
    parser.add_argument(
        "--predictor-root",
        default=str(PREDICTOR_ROOT),
        help="data directory holding devices/DEVICE/predictors (default: the one kept in bench/, "
        "which the published figures used); 'user' = your own (modeltailor calibrate)",
    )
    parser.add_argument(
        "--reconstruct",
        action="store_true",
        help="score with least-squares reconstruction (the product's default; own table MODEL-refit)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--ref-drop", type=float, default=REF_ACCURACY_DROP, help="reference accuracy = dense - this"
    )
    parser.add_argument("--report-only", action="store_true", help="score nothing new; skip runs with misses")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument(
        "--from-sources",
        action="store_true",
        help="report from the table's source column without running agents (see runs_from_sources)",
    )
    parser.add_argument("--no-early-stop", action="store_true", help="every policy on all validation images")
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="score with agents.testing.SyntheticProblem (no model run, no table)",
    )
    parser.add_argument(
        "--pack", action="store_true", help="rewrite the table as one gzip stream and exit (run alone)"
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n for n in args.agents.split(",") if n]
    set_reference_drop(args.ref_drop)
    for n in names:
        if n not in AGENTS and n not in CLASSIC:
            raise SystemExit(f"unknown agent {n!r}")
    path = args.table or TABLES / f"{args.model}{'-refit' if args.reconstruct else ''}.jsonl.gz"
    if args.pack:
        before, after = pack(path)
        print(f"{path}: {before:,} -> {after:,} bytes")
        return

    if args.synthetic:
        from agents.testing import SyntheticProblem
        from compression.model_io import from_module
        from compression.zoo import build_model

        torch.manual_seed(0)
        if args.model == "branchy":  # held out of the agents' development
            from tests.compression.branchy_model import BranchyNet

            net: torch.nn.Module = BranchyNet(in_channels=1, num_classes=10).eval()
        else:
            net = build_model(args.model, in_channels=1, image_size=28, num_classes=10)
        space = space_for(from_module(net, torch.randn(2, 1, 28, 28), name=args.model))
        problem = SyntheticProblem(space)
        table = Table(None, lambda p: (problem.score(p), 0))
        label = "SyntheticProblem"
        latency_of: Callable[[Sequence[Policy]], Sequence[float]] | None = lambda ps: [  # noqa: E731
            problem.score(p).latency_ms for p in ps
        ]
    else:
        model, data = load_model(args.model)
        space = space_for(model)
        root = None if args.predictor_root == "user" else Path(args.predictor_root)
        latency_fn, relatency, label = latency_source(args.latency, args.device, model, root)
        evaluator = Evaluator(model, data, latency_fn, val_images=1000, seed=0, reconstruct=args.reconstruct)

        hopeless: list[float] = []  # set once the dense accuracy is known

        def score_fn(policy: Policy) -> tuple[Score, int]:
            if args.report_only:
                raise LookupError(policy.hash)
            if not hopeless:
                return evaluator.evaluate(policy), len(evaluator.y_val)
            return evaluate_early_stop(evaluator, policy, hopeless[0])

        table = Table(path, score_fn, relatency)

        def predicted(policies: Sequence[Policy]) -> Sequence[float]:
            return relatency(policies, [])

        # The MACs proxy needs scores: the model-based agents then fit latency on scored points.
        latency_of = None if args.latency == "macs-proxy" else predicted
    print(
        f"{args.model}: {len(space.layers)} layers, {len(space.blocks)} skippable blocks; "
        f"table {path if not args.synthetic else None} holds {len(table)} policies; "
        f"latency: {label if not args.synthetic else 'SyntheticProblem'}",
        flush=True,
    )
    dense = table.score(Policy.dense(), "dense")
    if not args.synthetic and not args.no_early_stop:
        hopeless.append(dense.accuracy - REF_ACCURACY_DROP - EARLY_MARGIN)
    objective = Objective().with_dense(dense)
    print(f"dense: accuracy {dense.accuracy:.4f}, latency {dense.latency_ms:.3f}", flush=True)

    if args.fill_random:
        import random

        rng = random.Random(12345)
        start = time.perf_counter()
        for i in range(args.fill_random):
            table.score(space.sample(rng), "fill")
            if (i + 1) % 100 == 0:
                print(
                    f"fill {i + 1}/{args.fill_random}: table {len(table)}, "
                    f"{(time.perf_counter() - start) / (i + 1):.2f} s/policy",
                    flush=True,
                )

    runs: list[Run] = []
    if args.from_sources:
        sweep = [p.hash for p in rule_sweep(space, objective)]  # the Optuna agents' warm start
        warm = {n: sweep for n in names if n.startswith("optuna-")}
        runs = runs_from_sources(path, table, names, seeds, max(budgets), warm)
        names = []  # nothing to replay
    for name in names:
        for seed in seeds:
            misses = table.misses
            opts = {"latency_fn": latency_of} if name in TAKES_LATENCY_FN and latency_of else {}
            run = replay(name, space, objective, table, seed, max(budgets), opts, progress=not args.synthetic)
            if not run.scores:
                print(f"{name} seed {seed}: not in the table (run without --report-only)", flush=True)
                continue
            runs.append(run)
            print(
                f"{name} seed {seed}: {len(run.scores)} candidates, {table.misses - misses} scored now, "
                f"table {len(table)}, {run.seconds:.0f} s",
                flush=True,
            )

    best_hv = hypervolume(list(table.scores.values()), dense)
    summary = summarise(runs, dense, best_hv, budgets)
    best_acc = best_under(list(table.scores.values()), LATENCY_FRACTION * dense.latency_ms)
    print(
        f"\n{args.model}: best-known hypervolume {best_hv:.5f} from {len(table)} policies; "
        f"best-known acc@50%: {best_acc:.4f}"
    )
    print(format_table(summary, budgets))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": args.model,
                    "table_size": len(table),
                    "best_hv": best_hv,
                    "dense": dense.to_dict(),
                    "summary": summary,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
