"""The contract every latency predictor passes, and a synthetic device to test against.

``synthetic_space`` builds search spaces directly (no torch, milliseconds) and
``fake_latency_ms`` is a known device: per-kernel cost from MACs with a different rate per
kernel type, int8 that helps wide kernels and hurts narrow ones, sparsity masks that change
nothing (as in ONNX Runtime), a fixed per-model overhead and ~1 % noise. Predictors are
checked on it for what they must learn, and ``check_predictor`` runs the interface contract.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from compression.policy import LayerPolicy, Policy
from compression.space import BlockSpace, LayerFeatures, LayerSpace, SearchSpace, SpaceOptions
from latency_models.features import KERNEL_FEATURES, kernel_features
from latency_models.predictors.base import LatencyRecord, Predictor, evaluate

__all__ = ["check_predictor", "fake_latency_ms", "synthetic_records", "synthetic_space"]

_OPTIONS = SpaceOptions(bits=(None, 8))
_SAFE_SUFFIXES = {".json", ".txt", ".safetensors", ".onnx"}
#: Synthetic device: MACs per ms by kernel type, int8 factor for wide / narrow kernels.
_RATE = {0: 4e6, 1: 0.6e6, 2: 2e6, 3: 3e6}
_INT8_WIDE, _INT8_NARROW, _NARROW = 0.6, 1.4, 32


def _features(
    op: str, cin: int, cout: int, k: int, stride: int, groups: int, h: int, index: int, n: int
) -> LayerFeatures:
    out_h = (h - 1) // stride + 1
    params = cin // groups * cout * k * k
    return LayerFeatures(
        op=op,  # type: ignore[arg-type]
        in_channels=cin,
        out_channels=cout,
        kernel=k,
        stride=stride,
        groups=groups,
        in_h=h,
        in_w=h,
        out_h=out_h,
        out_w=out_h,
        params=params,
        macs=params * out_h * out_h,
        position=index / max(1, n - 1),
        index=index,
    )


def synthetic_space(rng: random.Random) -> SearchSpace:
    """A chain of conv / depthwise layers with skippable pairs and a linear head (no torch)."""
    n_conv = rng.randint(3, 9)
    h = rng.choice((8, 16, 32))
    c = rng.choice((3, 1))
    specs: list[tuple[str, int, int, int, int, int]] = []  # op, cin, cout, k, stride, h
    for i in range(n_conv):
        if i > 0 and rng.random() < 0.25:
            specs.append(("dwconv", c, c, 3, 1, h))
            continue
        cout = rng.choice((8, 16, 24, 32, 48, 64, 96, 128))
        stride = 2 if h >= 8 and rng.random() < 0.3 else 1
        specs.append(("conv", c, cout, rng.choice((1, 3, 5)) if i else 3, stride, h))
        c, h = cout, (h - 1) // stride + 1
    specs.append(("linear", c, 10, 1, 1, 1))
    n = len(specs)
    layers: list[LayerSpace] = []
    leader: str | None = None  # the leader of the channels currently flowing
    for i, (op, cin, cout, k, stride, hh) in enumerate(specs):
        name = f"l{i}"
        groups = cin if op == "dwconv" else 1
        feats = _features(op, cin, cout, k, stride, groups, hh, i, n)
        in_leader = leader
        if op == "conv":
            width_leader: str | None = name
            leader = name
        elif op == "dwconv":
            width_leader = leader
        else:
            width_leader = None
        layers.append(
            LayerSpace(
                name=name,
                features=feats,
                width_prunable=width_leader is not None,
                width_leader=width_leader,
                schemes=("dense", "unstructured", "block")
                if op != "conv" or i == 0
                else ("dense", "unstructured", "nm", "block"),
                nm_choices=((2, 4),) if op == "conv" and i > 0 and cin >= 4 else (),
                block_choices=tuple(b for b in (4, 8) if b <= cout),
                bits_choices=_OPTIONS.bits,
                in_segments=((in_leader, cin),),
            )
        )
    blocks = tuple(
        BlockSpace(f"b{i}", (f"l{i}",))
        for i in range(1, n - 1)
        if specs[i][1] == specs[i][2] and specs[i][4] == 1
    )
    edges = tuple((i, i + 1) for i in range(n - 1))
    return SearchSpace(layers=tuple(layers), blocks=blocks, edges=edges, options=_OPTIONS)


def fake_latency_ms(space: SearchSpace, policies: list[Policy], rng: np.random.Generator) -> np.ndarray:
    """The synthetic device's latency of each policy (see the module docstring)."""
    kb = kernel_features(space, policies)
    k = {n: i for i, n in enumerate(KERNEL_FEATURES)}
    rate = np.array([_RATE[int(o)] for o in kb.op])
    per = 0.004 + kb.x[:, :, k["macs"]] / rate + kb.x[:, :, k["out_numel"]] * 2e-6
    narrow = kb.x[:, :, k["out_channels"]] < _NARROW
    int8 = kb.x[:, :, k["int8"]] > 0.5
    per = per * np.where(int8, np.where(narrow, _INT8_NARROW, _INT8_WIDE), 1.0)
    total = (per * kb.present).sum(axis=1) + 0.03
    return total * np.exp(rng.normal(0.0, 0.01, len(policies)))


def synthetic_records(n_arch: int = 24, per_arch: int = 12, seed: int = 0) -> list[LatencyRecord]:
    """Records of the synthetic device: ``n_arch`` architectures, dense + random policies each."""
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    out: list[LatencyRecord] = []
    for a in range(n_arch):
        space = synthetic_space(rng)
        pols = [Policy.dense()]
        for _ in range(per_arch - 1):
            p = space.sample(rng)
            if rng.random() < 0.5:  # a whole-model bits mode, as the sampler draws them
                bits = 8 if rng.random() < 0.5 else None
                p = Policy(
                    layers={n: replace(p.for_layer(n), bits=bits) for n in space.layer_names}, skip=p.skip
                )
            pols.append(p)
        ms = fake_latency_ms(space, pols, noise)
        for p, t in zip(pols, ms, strict=True):
            out.append(
                LatencyRecord(
                    arch_id=f"syn-{a}",
                    space_id=f"syn-{a}",
                    space=space,
                    policy=p,
                    latency_ms=float(t),
                    ratio=float(t) / 0.5,
                    reference_ms=0.5,
                    dense_latency_ms=float(ms[0]),
                    dense_ratio=float(ms[0]) / 0.5,
                    speedup=float(ms[0] / t),
                    int8=bool(kernel_features(space, [p]).int8[0]),
                )
            )
    return out


def uniform_policy(space: SearchSpace, **fields: object) -> Policy:
    """The same LayerPolicy on every layer (for what-if checks)."""
    lp = LayerPolicy(**fields).validate()  # type: ignore[arg-type]
    return Policy(layers={n: lp for n in space.layer_names})


def check_predictor(
    factory: Callable[[], Predictor], records: list[LatencyRecord] | None = None
) -> dict[str, float]:
    """Run the interface contract on a predictor kind; returns its metrics on the test records.

    Asserts: predict before fit raises; fit returns self; predictions are finite, positive,
    float64, one per policy, in input order, and deterministic; empty input gives an empty
    array; ``predict_uncertainty`` gives ``predict``'s latencies and a finite, positive std
    each; save writes only safe formats (no pickle) and load gives the same predictions and
    stds; ``evaluate`` reports RMSE, MAPE and ±5/±10 % figures.
    """
    records = records if records is not None else synthetic_records()
    arches = sorted({r.arch_id for r in records})
    test_arches = set(arches[: max(1, len(arches) // 4)])
    train = [r for r in records if r.arch_id not in test_arches]
    test = [r for r in records if r.arch_id in test_arches]
    fresh = factory()
    try:
        fresh.predict(test[0].space, [test[0].policy])
    except RuntimeError:
        pass
    else:
        raise AssertionError(f"{fresh.kind}: predict before fit must raise RuntimeError")
    model = factory()
    assert model.fit(train) is model, "fit must return self"
    space = test[0].space
    pols = [r.policy for r in test if r.space is space]
    pred = model.predict(space, pols)
    assert pred.dtype == np.float64 and pred.shape == (len(pols),), (pred.dtype, pred.shape)
    assert np.all(np.isfinite(pred)) and np.all(pred > 0), pred
    assert np.allclose(model.predict(space, pols[::-1])[::-1], pred), "order must not matter"
    assert np.allclose(model.predict(space, pols), pred), "predictions must be deterministic"
    assert model.predict(space, []).shape == (0,)
    ms, std = model.predict_uncertainty(space, pols)
    assert np.allclose(ms, pred, rtol=1e-12), "predict_uncertainty must return predict's latencies"
    assert std.dtype == np.float64 and std.shape == pred.shape, (std.dtype, std.shape)
    assert np.all(np.isfinite(std)) and np.all(std > 0), std
    assert [a.shape for a in model.predict_uncertainty(space, [])] == [(0,), (0,)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = model.save(Path(tmp) / "p")
        bad = [p.name for p in folder.rglob("*") if p.is_file() and p.suffix not in _SAFE_SUFFIXES]
        assert not bad, f"unsafe artifact formats: {bad}"
        loaded = type(model).load(folder)
        assert np.allclose(loaded.predict(space, pols), pred, rtol=1e-6), "save/load changed predictions"
        assert loaded.uncertainty_source == model.uncertainty_source
        assert np.allclose(loaded.predict_uncertainty(space, pols)[1], std, rtol=1e-5), (
            "save/load changed stds"
        )
        generic = Predictor.load(folder)
        assert type(generic) is type(model)
    metrics = evaluate(model, test)
    for key in ("rmse_ms", "mape", "within_5pct", "within_10pct", "speedup_within_10pct"):
        assert key in metrics and np.isfinite(metrics[key]), (key, metrics)
    return metrics
