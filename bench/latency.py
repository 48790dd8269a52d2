"""Benchmark of issue 3: latency predictors of ``cpu-ort-1t`` against the measurement noise floor.

    .venv/bin/python bench/latency.py [--collect-only] [--no-append] [--train-records 200]

Measurement sets (cached under ``~/.modeltailor/bench-latency/``; a rerun measures only what is
missing, so an interrupted run resumes):

* ``train``: the calibration plan (``sample_plan(seed=0)``, zoo + random architectures), the
  first ``--train-records`` records (≤ 200) are what every predictor is trained on;
* ``heldout``: random architectures from another seed (none of them in ``train``), ≥ 50
  architectures, 1-2 policies each;
* ``resnet20`` / ``mobilenetv2``: random policies of the zoo models at 3×32×32 (their
  architectures are in the training plan, these policies are not);
* ``remeasure``: the first held-out samples measured again later, in another process: how
  well one measurement of this machine agrees with another, i.e. the best any predictor can
  score on these sets;
* ``noise``: the same ResNet-20 pair (dense / width 0.5) timed several times in each of
  several processes spread over the collection: spread within and between processes.

Every measurement is ``measure_pair(dense, compressed)`` interleaved with the reference model,
200 timed runs each (harness default), at normal priority. Then for each predictor (kernel
GBDT, GNN) and both baselines: % within ±10 % and MAPE of the predicted speedup over the dense
model and of the absolute latency, on each test set; and predictions per second for ResNet-20
policies on one core. The table is written to ``bench/RESULTS.md`` (section "Latency
predictors", replaced on each run) unless ``--no-append``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import functools
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEVICE = "cpu-ort-1t"
RUNS, WARMUP = 200, 20
HELDOUT_ARCHS = 60
ZOO_POLICIES = 40
REMEASURE = 30
NOISE_REPEATS = 5
PROBE_EVERY = 60  # samples between two noise probes (each in a fresh process)
QUIET_LOAD = 2.5  # 1-minute load average under which a measurement starts (this one counts ~1)


_ROOT: list[Path] = []  # set by --cache / while reporting on a second cache


def cache_root() -> Path:
    """``$MODELTAILOR_DATA_DIR/bench-latency`` (default ``~/.modeltailor/bench-latency``)."""
    from latency_models.store import data_dir

    return _ROOT[-1] if _ROOT else data_dir() / "bench-latency"


def _store(name: str) -> Any:
    from latency_models.store import DeviceStore

    return DeviceStore(DEVICE, cache_root() / name)


def _state_path(name: str) -> Path:
    return cache_root() / name / "done.json"


def _done(name: str) -> int:
    p = _state_path(name)
    return int(json.loads(p.read_text())["done"]) if p.is_file() else 0


def _set_done(name: str, n: int, complete: bool = False) -> None:
    p = _state_path(name)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"done": n, "complete": complete}))


def _complete(name: str) -> bool:
    p = _state_path(name)
    return p.is_file() and bool(json.loads(p.read_text()).get("complete"))


# --------------------------------------------------------------------------- sample plans


def _train_plan() -> Iterator[Any]:
    from latency_models.sampling import sample_plan

    return sample_plan(10_000, seed=0, zoo_fraction=0.3)


def _heldout_plan() -> Iterator[Any]:
    from latency_models.sampling import sample_plan

    return sample_plan(10_000, seed=1, zoo_fraction=0.0)


@functools.cache
def zoo_model(arch: str, res: int = 32) -> tuple[Any, Any]:
    """(CompressibleModel, SearchSpace) of a zoo model at 3×res×res, as calibration builds it."""
    import torch

    from compression import from_module, space_for
    from compression.zoo import build_model
    from latency_models.sampling import SPACE_OPTIONS

    cm = from_module(
        build_model(arch, in_channels=3, image_size=res, num_classes=10),
        torch.randn(2, 3, res, res),
        f"{arch}@{res}",
    )
    return cm, space_for(cm, SPACE_OPTIONS)


def _zoo_plan(arch: str, seed: int) -> Iterator[Any]:
    from latency_models.sampling import CalibrationSample, random_policy

    cm, space = zoo_model(arch)
    rng = random.Random(seed)
    while True:
        yield CalibrationSample(arch, f"{arch}@32", cm, space, random_policy(space, rng))


# --------------------------------------------------------------------------- collection


def _collect(name: str, plan: Iterator[Any], stop: Any, log: Any, probe_counter: list[int]) -> None:
    """Measure samples of ``plan`` into set ``name`` until ``stop(records)`` is true."""
    import tempfile

    from latency_models.calibrate import measure_sample
    from latency_models.devices import get_device

    if _complete(name):
        return
    store = _store(name)
    records = store.records()
    done = _done(name)
    dev = get_device(DEVICE)
    dense_cache: dict[str, Any] = {}
    seen_spaces = {r.space_id for r in records}
    with tempfile.TemporaryDirectory(prefix="mt-bench-lat-") as tmp:
        for i, sample in enumerate(plan):
            if stop(records):
                break
            if i < done:
                continue
            try:
                t0 = time.time()
                waited = wait_quiet()
                new = measure_sample(
                    sample,
                    dev,
                    Path(tmp),
                    runs=RUNS,
                    warmup=WARMUP,
                    dense_cache=dense_cache,
                    profile=name == "train",
                )
                if sample.space_id in seen_spaces:  # resumed: its dense record is stored already
                    new = new[:1]
            except Exception as exc:  # a model the exporter cannot handle: skip it
                log(f"[{name}] {i}: skipped {sample.space_id}: {type(exc).__name__}: {str(exc)[:120]}")
                _set_done(name, i + 1)
                continue
            store.append(new)
            records.extend(new)
            seen_spaces.add(sample.space_id)
            _set_done(name, i + 1)
            r = new[0]
            log(
                f"[{name}] {i}: {sample.space_id} {r.latency_ms:.3f} ms, speedup {r.speedup:.2f}, "
                f"int8={r.int8} ({time.time() - t0:.1f} s, waited {waited:.0f} s, "
                f"load {os.getloadavg()[0]:.1f})"
            )
            probe_counter[0] += 1
            if probe_counter[0] % PROBE_EVERY == 0:
                run_probe(log)
    _set_done(name, _done(name), complete=True)


def wait_quiet(limit: float | None = None, max_wait: float = 60.0) -> float:
    """Wait (at most ``max_wait`` s) until the 1-minute load average is under ``limit``.

    Other sessions share this machine; under their load big models slow down 2-3x (cache and
    memory contention) while the small interleaved reference barely moves, so timings taken
    then describe the neighbours as much as the model. Returns the seconds waited.
    """
    limit = QUIET_LOAD if limit is None else limit
    t0 = time.time()
    while os.getloadavg()[0] > limit and time.time() - t0 < max_wait:
        time.sleep(5)
    return time.time() - t0


def _n_arch(records: list[Any]) -> int:
    return len({r.arch_id for r in records})


def collect_all(train_records: int, log: Any) -> None:
    """Measure every set that is not complete yet (see the module docstring)."""
    counter = [0]
    if not (cache_root() / "noise.jsonl").is_file():
        run_probe(log)
    _collect("train", _train_plan(), lambda recs: len(recs) >= train_records, log, counter)
    backfill_profiles("train", _train_plan(), log)
    train_arches = {r.arch_id for r in _store("train").records()}

    def heldout_plan() -> Iterator[Any]:
        return (s for s in _heldout_plan() if s.arch_id not in train_arches)

    _collect("heldout", heldout_plan(), lambda recs: _n_arch(recs) >= HELDOUT_ARCHS, log, counter)
    for arch, seed in (("resnet20", 2), ("mobilenetv2", 3)):
        _collect(
            arch,
            _zoo_plan(arch, seed),
            lambda recs: sum(r.policy.layers != {} for r in recs) >= ZOO_POLICIES,
            log,
            counter,
        )
    if not _complete("remeasure"):
        run_probe(log)
    # The first held-out samples again, later and in another process: measurement vs measurement.
    first = _heldout_first_samples(REMEASURE, train_arches)
    _collect("remeasure", iter(first), lambda recs: False, log, counter)
    if _probes() < 4:
        run_probe(log)


def _heldout_first_samples(n: int, train_arches: set[str]) -> list[Any]:
    out = []
    for s in _heldout_plan():
        if s.arch_id in train_arches:
            continue
        out.append(s)
        if len(out) >= n:
            break
    return out


def backfill_profiles(name: str, plan: Iterator[Any], log: Any) -> None:
    """Profile (ONNX Runtime's per-node times) the records of set ``name`` measured without it."""
    import tempfile

    from compression.policy import Policy
    from latency_models.calibrate import export_for_device
    from latency_models.devices import get_device
    from latency_models.profiling import profile_onnx

    store = _store(name)
    if not store.measurements.is_file():
        return
    lines = store.measurements.read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    dense_hash = Policy.dense().hash
    need = {
        (d["space_id"], Policy.from_dict(d["policy"]).hash)
        for d in rows
        if not (d.get("measurement") or {}).get("profile")
    }
    if not need:
        return
    log(f"[{name}] profiling {len(need)} measured models")
    dev = get_device(DEVICE)
    found: dict[tuple[str, str], Any] = {}
    with tempfile.TemporaryDirectory(prefix="mt-bench-prof-") as tmp:
        for sample in plan:
            if len(found) == len(need):
                break
            for pol in (sample.policy, Policy.dense()):
                key = (sample.space_id, pol.hash)
                if key in need and key not in found:
                    path = export_for_device(
                        sample.model, sample.space, pol, dev, Path(tmp) / f"m{len(found)}.onnx"
                    )[0]
                    found[key] = profile_onnx(path, dev)
    out = []
    for d in rows:
        key = (d["space_id"], Policy.from_dict(d["policy"]).hash)
        if key in found:
            d.setdefault("measurement", {})["profile"] = found[key]
        if key[1] != dense_hash and (d["space_id"], dense_hash) in found:
            d["measurement"]["dense_profile"] = found[(d["space_id"], dense_hash)]
        out.append(json.dumps(d, sort_keys=True))
    tmp_path = store.measurements.with_suffix(".tmp")
    tmp_path.write_text("\n".join(out) + "\n")
    os.replace(tmp_path, store.measurements)
    log(f"[{name}] profiled {len(found)} of {len(need)}")


# --------------------------------------------------------------------------- noise floor


def probe(repeats: int = NOISE_REPEATS) -> list[dict[str, float]]:
    """``repeats`` interleaved timings of ResNet-20 dense vs width 0.5 in this process."""
    import tempfile

    from compression.policy import LayerPolicy, Policy
    from latency_models.calibrate import export_for_device
    from latency_models.devices import get_device
    from latency_models.harness import measure_pair

    dev = get_device(DEVICE)
    cm, space = zoo_model("resnet20")
    half = Policy(layers={ls.name: LayerPolicy(width=0.5) for ls in space.layers if ls.decides_width})
    out = []
    with tempfile.TemporaryDirectory(prefix="mt-probe-") as tmp:
        dense = export_for_device(cm, space, Policy.dense(), dev, Path(tmp) / "dense.onnx")[0]
        narrow = export_for_device(cm, space, half, dev, Path(tmp) / "half.onnx")[0]
        for _ in range(repeats):
            pair = measure_pair(dense, narrow, dev, runs=RUNS, warmup=WARMUP, with_reference=True)
            out.append(
                {
                    "dense_ms": pair.a.median_ms,
                    "half_ms": pair.b.median_ms,
                    "dense_ratio": pair.a.ratio_to_reference or float("nan"),
                    "half_ratio": pair.b.ratio_to_reference or float("nan"),
                    "speedup": pair.speedup,
                    "dense_iqr_rel": pair.a.iqr_rel,
                    "dense_p10_ms": pair.a.p10_ms,
                    "half_p10_ms": pair.b.p10_ms,
                    "dense_min_ms": pair.a.min_ms,
                    "half_min_ms": pair.b.min_ms,
                    "speedup_p10": pair.speedup_p10,
                    "load": os.getloadavg()[0],
                }
            )
    return out


def run_probe(log: Any) -> None:
    """One noise probe in a fresh process; appended to noise.jsonl."""
    t0 = time.time()
    res = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--probe"],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        log(f"noise probe failed: {res.stderr[-500:]}")
        return
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    path = cache_root() / "noise.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(
            json.dumps({"time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "rows": rows}) + "\n"
        )
    log(f"noise probe: dense {[round(r['dense_ms'], 3) for r in rows]} ms ({time.time() - t0:.0f} s)")


def _probes() -> int:
    path = cache_root() / "noise.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


# --------------------------------------------------------------------------- report

KINDS_SHOWN = ("kernel_gbdt", "gnn", "macs", "lookup")


def _rel(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """(% within ±10 %, MAPE %) of ``pred`` against ``true``."""
    rel = np.abs(np.asarray(pred) / np.asarray(true) - 1.0)
    return float(100 * np.mean(rel <= 0.10)), float(100 * rel.mean())


def load_sets(stat: str, train_records: int) -> dict[str, list[Any]]:
    """Every cached set, records re-expressed by ``stat`` (median / p10 / min)."""
    from latency_models.predictors.base import with_statistic

    out = {}
    for name in ("train", "heldout", "resnet20", "mobilenetv2", "remeasure"):
        recs = _store(name).records()
        out[name] = with_statistic(recs, stat)
    out["train"] = out["train"][:train_records]
    return out


def _speedup_records(records: list[Any]) -> list[Any]:
    """Compressed records (the dense ones have speedup 1 by construction)."""
    return [r for r in records if r.policy.layers != {} and r.speedup is not None]


def remeasure_floor(sets: dict[str, list[Any]]) -> dict[str, tuple[float, float, int]]:
    """Measurement vs re-measurement of the same held-out models: (within ±10 %, MAPE, n)."""
    first = {(r.space_id, r.policy.hash): r for r in sets["heldout"]}
    pairs = [(first[k], r) for r in sets["remeasure"] if (k := (r.space_id, r.policy.hash)) in first]
    sp = [(a, b) for a, b in pairs if a.policy.layers != {}]
    out = {}
    for what, get, ps in (
        ("speedup", lambda r: r.speedup, sp),
        ("ratio", lambda r: r.ratio, pairs),
        ("ms", lambda r: r.latency_ms, pairs),
    ):
        if ps:
            w, m = _rel(np.array([get(b) for _, b in ps]), np.array([get(a) for a, _ in ps]))
            out[what] = (w, m, len(ps))
    return out


def probe_floor() -> dict[str, Any]:
    """Spread of the ResNet-20 pair within each probe process and between the probes."""
    path = cache_root() / "noise.jsonl"
    probes = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    out: dict[str, Any] = {"probes": len(probes)}
    for key in ("dense_ms", "dense_ratio", "speedup"):
        within = [np.std(v) / np.mean(v) for p in probes if len(v := [r[key] for r in p["rows"]]) > 1]
        ranges = [max(v) / min(v) - 1 for p in probes if (v := [r[key] for r in p["rows"]])]
        means = [np.mean([r[key] for r in p["rows"]]) for p in probes]
        out[key] = {
            "within_cv": 100 * float(np.mean(within)) if within else float("nan"),
            "within_range": 100 * float(np.mean(ranges)) if ranges else float("nan"),
            "between_cv": 100 * float(np.std(means) / np.mean(means)) if len(means) > 1 else float("nan"),
            "between_range": 100 * float(max(means) / min(means) - 1) if len(means) > 1 else float("nan"),
        }
    for key in ("dense_min_ms", "speedup_p10"):
        vals = [[r[key] for r in p["rows"] if key in r] for p in probes]
        vals = [v for v in vals if v]
        if vals:
            means = [float(np.mean(v)) for v in vals]
            out[key] = {
                "within_range": 100 * float(np.mean([max(v) / min(v) - 1 for v in vals])),
                "between_range": 100 * float(max(means) / min(means) - 1) if len(means) > 1 else float("nan"),
            }
    out["loads"] = [round(float(np.mean([r["load"] for r in p["rows"]])), 1) for p in probes]
    return out


def evaluate_sets(model: Any, sets: dict[str, list[Any]]) -> dict[str, dict[str, float]]:
    """Per test set: speedup / ratio / ms (within ±10 %, MAPE) of a fitted predictor."""
    from compression.policy import Policy
    from latency_models.predictors.base import by_space

    out = {}
    for name in ("heldout", "resnet20", "mobilenetv2"):
        recs = sets[name]
        pred = np.zeros(len(recs))
        pred_dense = np.zeros(len(recs))
        for space, ix in by_space(recs):
            p = model.predict(space, [*[recs[i].policy for i in ix], Policy.dense()])
            pred[ix] = p[:-1]
            pred_dense[ix] = p[-1]
        comp = [i for i, r in enumerate(recs) if r.policy.layers != {}]
        sp_w, sp_m = _rel(pred_dense[comp] / pred[comp], np.array([recs[i].speedup for i in comp]))
        ref = model.reference_ms if model.target == "ratio" else 1.0
        ratio_true = np.array([r.ratio for r in recs])
        ratio_pred = (
            pred / ref if model.target == "ratio" else pred / np.array([r.reference_ms for r in recs])
        )
        ra_w, ra_m = _rel(ratio_pred, ratio_true)
        ms_w, ms_m = _rel(pred, np.array([r.latency_ms for r in recs]))
        out[name] = {
            "n": len(recs),
            "n_speedup": len(comp),
            "n_arch": len({r.arch_id for r in recs}),
            "speedup_w10": sp_w,
            "speedup_mape": sp_m,
            "ratio_w10": ra_w,
            "ratio_mape": ra_m,
            "ms_w10": ms_w,
            "ms_mape": ms_m,
        }
    return out


def prediction_speed(model: Any, n: int = 10_000) -> dict[str, float]:
    """Policies per CPU second (one thread) for ResNet-20: a cold batch, then the same batch warm."""
    from latency_models.sampling import random_policy

    _, space = zoo_model("resnet20")
    rng = random.Random(7)
    pols = [random_policy(space, rng) for _ in range(n)]
    fresh = copy.copy(model)
    if hasattr(fresh, "_memo"):
        fresh._memo = {}
    t = time.process_time()
    fresh.predict(space, pols)
    cold = n / (time.process_time() - t)
    t = time.process_time()
    fresh.predict(space, pols)
    warm = n / (time.process_time() - t)
    one = time.perf_counter()
    for pol in pols[:200]:
        fresh.predict(space, [pol])
    single = 200 / (time.perf_counter() - one)
    return {"cold": cold, "warm": warm, "single": single}


def fit_kind(kind: str, train: list[Any], target: str = "ratio") -> Any:
    from latency_models.predictors import REGISTRY

    return REGISTRY[kind](target=target, seed=0).fit(train)  # type: ignore[arg-type]


def _loads() -> str:
    """Load averages seen by the measurements of the cached sets (min / median / max)."""
    loads = []
    for name in ("train", "heldout", "resnet20", "mobilenetv2", "remeasure"):
        for r in _store(name).records():
            m = (r.measurement or {}).get("compressed") or (r.measurement or {}).get("dense") or {}
            if "loadavg_1m" in (m.get("host") or {}):
                loads.append(float(m["host"]["loadavg_1m"]))
    if not loads:
        return "n/a"
    return f"{min(loads):.1f} / {np.median(loads):.1f} / {max(loads):.1f}"


def report_cache(args: Any, out: Any, log: Any, kinds: tuple[str, ...] = KINDS_SHOWN) -> dict[str, Any]:
    """Noise floors and the predictor table of the sets cached under ``cache_root()``."""
    out(
        f"measurements: {cache_root()}; 1-minute load average while measuring "
        f"(min / median / max): {_loads()}"
    )
    pf = probe_floor()
    out(
        f"\n== Noise floor: ResNet-20 (3x32x32) dense vs width 0.5 timed interleaved, {NOISE_REPEATS} times "
        f"in "
        f"each of {pf['probes']} processes spread over the measuring (load at the probes: {pf['loads']})"
    )
    out(f"{'quantity':<28}{'within-process CV':>18}{'range':>8}{'between-process CV':>20}{'range':>8}")
    for key, label in (
        ("dense_ms", "dense median ms"),
        ("dense_ratio", "dense median / reference"),
        ("speedup", "speedup of medians"),
    ):
        d = pf[key]
        out(
            f"{label:<28}{d['within_cv']:>17.1f}%{d['within_range']:>7.1f}%"
            f"{d['between_cv']:>19.1f}%{d['between_range']:>7.1f}%"
        )
    for key, label in (("dense_min_ms", "dense min ms"), ("speedup_p10", "speedup of p10s")):
        if key in pf:
            d = pf[key]
            out(f"{label:<28}{'':>18}{d['within_range']:>7.1f}%{'':>20}{d['between_range']:>7.1f}%")
    floors = {stat: remeasure_floor(load_sets(stat, args.train_records)) for stat in ("median", "p10", "min")}
    n_re = max((v[2] for f in floors.values() for v in f.values()), default=0)
    out(
        f"\n== Noise floor on held-out models: {n_re} of them measured again later in another process, "
        "the second measurement scored as a prediction of the first"
    )
    out(
        f"{'statistic':<10}"
        + "".join(f"{w + ' ±10%':>14}{w + ' MAPE':>14}" for w in ("speedup", "ratio", "ms"))
    )
    for stat, f in floors.items():
        cells = [
            f"{f[w][0]:>13.1f}%{f[w][1]:>13.1f}%" if w in f else f"{'-':>14}{'-':>14}"
            for w in ("speedup", "ratio", "ms")
        ]
        out(f"{stat:<10}" + "".join(cells))
    sets = load_sets(args.statistic, args.train_records)
    tr, h = sets["train"], sets["heldout"]
    n_sp = len(_speedup_records(h))
    out(
        f"\n== Predictors trained on {len(tr)} measurements of {_n_arch(tr)} architectures (target: ratio to "
        f"the reference; statistic: {args.statistic})"
    )
    out(
        f"heldout: {n_sp} compressed + {len(h) - n_sp} dense models of {_n_arch(h)} architectures never "
        "seen in "
        f"training; resnet20 / mobilenetv2: {len(_speedup_records(sets['resnet20']))} / "
        f"{len(_speedup_records(sets['mobilenetv2']))} new policies at 3x32x32"
    )
    cols = ("speedup±10%", "speedup MAPE", "ratio±10%", "ratio MAPE", "ms±10%", "ms MAPE")
    head = f"{'predictor':<12}{'test set':<12}" + "".join(f"{c:>13}" for c in cols)
    out(head + f"{'pred/s cold':>13}{'warm':>9}{'single':>8}")
    out("-" * (len(head) + 30))
    results: dict[str, Any] = {}
    for kind in kinds:
        t0 = time.process_time()
        model = fit_kind(kind, tr)
        fit_s = time.process_time() - t0
        ev = evaluate_sets(model, sets)
        sp = prediction_speed(model)
        results[kind] = {"eval": ev, "speed": sp, "fit_cpu_s": fit_s}
        for j, name in enumerate(("heldout", "resnet20", "mobilenetv2")):
            e = ev[name]
            row = f"{kind if j == 0 else '':<12}{name:<12}" + "".join(
                f"{e[c]:>12.1f}%" if "w10" in c else f"{e[c]:>12.1f} "
                for c in ("speedup_w10", "speedup_mape", "ratio_w10", "ratio_mape", "ms_w10", "ms_mape")
            )
            if j == 0:
                row += f"{sp['cold']:>13,.0f}{sp['warm']:>9,.0f}{sp['single']:>8,.0f}"
            out(row)
        log(f"{kind}: fit {fit_s:.1f} CPU s")
    (cache_root() / "report.json").write_text(
        json.dumps({"probe": pf, "floors": floors, "results": results}, indent=1)
    )
    return {"results": results, "floors": floors}


def goals(run: dict[str, Any], stat: str, out: Any) -> None:
    """The issue's goals against this run's figures (held-out architectures)."""
    res, floor = run["results"], run["floors"].get(stat, {})
    learned = {k: res[k]["eval"]["heldout"] for k in ("kernel_gbdt", "gnn") if k in res}
    base = {k: res[k]["eval"]["heldout"] for k in ("macs", "lookup") if k in res}
    if not learned:
        return
    best = max(learned, key=lambda k: learned[k]["speedup_w10"] + learned[k]["ratio_w10"])
    b = learned[best]
    sp_floor = floor.get("speedup", (float("nan"),))[0]
    ra_floor = floor.get("ratio", (float("nan"), float("nan")))
    out("\n== Goals (held-out architectures)")
    ok = b["speedup_w10"] >= 95.0
    out(
        f"- >= 95 % of predicted speedups within ±10 %: best learned ({best}) {b['speedup_w10']:.1f} % "
        f"(MAPE {b['speedup_mape']:.1f} %) - {'met' if ok else 'NOT met'}; a re-measurement of the same "
        f"models scores {sp_floor:.1f} %"
    )
    out(
        f"- absolute error near the noise floor: {best} ratio-to-reference MAPE {b['ratio_mape']:.1f} % "
        f"(±10 %: {b['ratio_w10']:.1f} %), re-measurement {ra_floor[1]:.1f} % (±10 %: {ra_floor[0]:.1f} %)"
    )
    beats = all(
        b["speedup_w10"] > v["speedup_w10"] and b["ratio_mape"] < v["ratio_mape"] for v in base.values()
    )
    out(
        f"- best learned predictor beats both baselines (speedup ±10 % and ratio MAPE): "
        f"{'met' if beats else 'NOT met'} ("
        + ", ".join(f"{k} {v['speedup_w10']:.1f} % / {v['ratio_mape']:.1f} %" for k, v in base.items())
        + ")"
    )
    if "kernel_gbdt" in res:
        cold = res["kernel_gbdt"]["speed"]["cold"]
        out(
            f"- >= 10,000 ResNet-20 policies/s on one core: kernel_gbdt {cold:,.0f}/s cold - "
            f"{'met' if cold >= 10_000 else 'NOT met'}"
        )


def report(args: Any, log: Any) -> None:
    """Print the benchmark and (unless --no-append) write it into bench/RESULTS.md."""
    import torch

    torch.set_num_threads(1)
    lines: list[str] = []

    def out(text: str = "") -> None:
        lines.append(text)
        print(text, flush=True)

    load_start = os.getloadavg()
    out(
        f"device {DEVICE}; {RUNS} timed runs per model (after {WARMUP}), interleaved with the dense model and"
    )
    out("the reference model; every predictor trained once, then scored on every test set")
    main_run = report_cache(args, out, log)
    out(
        "(pred/s: ResNet-20 policies per CPU second on one thread, batches of 10,000: cold = first batch "
        "of a "
        "space, warm = the same batch again; single = one policy per call, wall clock)"
    )
    goals(main_run, args.statistic, out)
    for extra in args.also or []:
        _ROOT.append(Path(extra).expanduser())
        try:
            out(f"\n==== The same benchmark on measurements taken while the machine was loaded ({extra})")
            report_cache(args, out, log, kinds=("kernel_gbdt", "gnn", "macs", "lookup"))
        finally:
            _ROOT.pop()
    load_end = os.getloadavg()
    out(
        f"\nload average (1/5/15 min) at start {tuple(round(x, 1) for x in load_start)}, "
        f"at end {tuple(round(x, 1) for x in load_end)}; {os.cpu_count()} CPUs"
    )
    if not args.no_append:
        write_results("\n".join(lines), args)


NOTES = """\
What limits the figures (evidence gathered while building this benchmark):

- **The machine.** It is shared. While other sessions loaded it (1-minute load 6-19 on 2 CPUs),
  models with a large working set ran 2-3x slower (a generated 5.0 ms model measured 9.5-17.5 ms;
  its convolutions alone, timed standalone, ran at full speed) while the small interleaved
  reference barely moved, so ratios to the reference do not cancel that load; medians of the
  same model agreed within ±10 % between two processes for only 38-60 % of the held-out models.
  Hence: every measurement waits for a quiet machine (load < 2.5, up to 60 s), and predictors
  learn the *minimum* of the interleaved runs, the steadiest statistic (re-measurement agreement
  in the tables above). Even quiet, the absolute ratio to the reference of one model differs
  between processes (re-measured ±10 %: ~79 %), which bounds absolute accuracy.
- **What ONNX Runtime does with pruned channels.** A convolution runs ONNX Runtime's NCHWc
  kernels only when its channel counts fit 16-channel blocks (AVX-512); pruning 48 channels to
  40 falls back to a kernel several times slower and adds layout reorders. 28 % of the
  compressed fp32 held-out models (50 % of MobileNetV2 policies) are *slower* than their dense
  model, 22 % of the int8 ones. The predictors see these rules as features (NCHWc flags,
  reorders, channels mod 16), but the function is discontinuous and 200 models cover it thinly.
- **Context of a kernel.** ONNX Runtime's profiler (stored with every training measurement,
  used to teach each kernel's share of the model) shows the same convolution shape taking a
  median 1.25x longer in one architecture than in another (neighbour layouts, fused adds,
  cache state); a regressor trained on the profiled per-kernel times of the 71 training
  architectures predicts kernel times of unseen ones with a median error of ~25 %. The models
  here are small (0.02-5 ms, 5-50 kernels), so such errors do not average out.
- **Data.** 200 measurements of 71 architectures; nn-Meter's 99 % comes from tens of thousands
  of kernel measurements on a dedicated phone. More measurements per device (the CLI's
  ``--samples``), a quiet device, or measuring kernels on their own are the ways up.

Search-side consequence: round pruned channel counts to multiples of 16 on this CPU (width
choices that break the alignment often cost more than they save), and treat predicted latency
as a ranking aid with the ±10 % figures above, re-measuring the final candidates.
"""


def write_results(text: str, args: Any) -> None:
    """Replace the latency sections of bench/RESULTS.md with this run's."""
    results = Path(__file__).with_name("RESULTS.md")
    old = results.read_text() if results.is_file() else "# Benchmark results\n"
    head = "## Latency predictors"
    kept = []
    skip = False
    for line in old.splitlines():
        if line.startswith("## "):
            skip = line.startswith(head)
        if not skip:
            kept.append(line)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    section = (
        f"{head} (issue 3; {dt.date.today().isoformat()})\n\n"
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs shared with other "
        f"sessions; `uptime` at the end: `{uptime}`\n"
        f"- command: `.venv/bin/python bench/latency.py {' '.join(sys.argv[1:])}` (measurements cached under "
        f"`~/.modeltailor/bench-latency/`)\n\n```\n{text}\n```\n\n{NOTES}"
    )
    body = "\n".join(kept).rstrip() + "\n\n" + section
    results.write_text(body)


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--collect-only", action="store_true")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--train-records", type=int, default=200)
    ap.add_argument(
        "--statistic",
        choices=("median", "p10", "min"),
        default="min",
        help="which statistic of the timed runs predictors learn and are judged on",
    )
    ap.add_argument(
        "--cache", type=Path, default=None, help="measurement cache (default ~/.modeltailor/bench-latency)"
    )
    ap.add_argument(
        "--also", action="append", help="also report on the measurements cached in this directory"
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    if args.probe:
        print(json.dumps(probe()))
        return

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.cache is not None:
        _ROOT.append(args.cache.expanduser())
    collect_all(args.train_records, log)
    if args.collect_only:
        return
    report(args, log)


if __name__ == "__main__":
    main()
