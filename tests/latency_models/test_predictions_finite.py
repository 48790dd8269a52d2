"""Finite, positive predictions, always: every registered predictor over the whole space of
several models, extremes included, without a RuntimeWarning (overflow, invalid divide).

The predictors are fitted on the synthetic device's small conv chains (``latency_models.testing``)
and asked about zoo models and a branchy CNN far larger or unlike anything they saw: the place
where an unbounded extrapolation once overflowed ``exp`` (the GNN) and turned the speedup metric
into inf / inf. Policies are random draws of the space with the extremes forced on top: the
smallest width, the largest sparsity, every layer at 8 or 2 bits, every block skipped.
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compression import from_module, space_for
from compression.policy import LayerPolicy, Policy
from compression.space import SearchSpace, SpaceOptions
from compression.zoo import build_model
from latency_models.predictors import REGISTRY, Predictor, evaluate
from latency_models.predictors.base import LatencyRecord
from latency_models.testing import fake_latency_ms, synthetic_records
from tests.compression.branchy_model import BranchyNet, with_random_bn_stats

#: Every bit-width a policy may hold (2-8) beside float, so 2-bit layers are in the space.
OPTIONS = SpaceOptions(bits=(None, 8, 4, 2))
MODELS = ("resnet20", "mobilenetv2", "vit", "branchy")
#: Small fits (a second or two each), as the scheme contract test fits them.
SMALL: dict[str, dict[str, object]] = {
    "kernel_gbdt": {"n_estimators": 60},
    "gnn": {"epochs": 30, "hidden": 32},
}


@functools.cache
def space(name: str) -> SearchSpace:
    if name == "branchy":
        module = with_random_bn_stats(BranchyNet(in_channels=3))
    else:
        module = build_model(name, in_channels=3, image_size=32, num_classes=10)
    return space_for(from_module(module, torch.randn(2, 3, 32, 32), name), OPTIONS)


def _as_older_gnn(p: Predictor, folder: Path) -> Predictor:
    """The GNN as saved before inputs were clipped to the training range and heads kept."""
    meta = json.loads((p.save(folder) / "predictor.json").read_text())
    for key in ("lo", "hi"):
        meta["state"]["stats"].pop(key)
    meta["state"]["ensemble"] = 0
    (folder / "predictor.json").write_text(json.dumps(meta))
    return Predictor.load(folder)


@functools.cache
def predictors() -> dict[str, Predictor]:
    import tempfile

    records = synthetic_records(n_arch=12, per_arch=8, seed=5)
    out: dict[str, Predictor] = {}
    for kind, cls in sorted(REGISTRY.items()):
        for target in ("ms", "ratio"):
            out[f"{kind}/{target}"] = cls(target=target, **SMALL.get(kind, {})).fit(records)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as tmp:
        out["gnn/older-save"] = _as_older_gnn(out["gnn/ratio"], Path(tmp) / "gnn")
    return out


@st.composite
def policies(draw: st.DrawFn, model: str) -> Policy:
    """A random policy of ``model``'s space with some extremes forced on every layer."""
    s = space(model)
    o = s.options
    base = s.sample(draw(st.randoms(use_true_random=False)))
    width = draw(st.sampled_from(["drawn", "min", "full"]))
    sparsity = draw(st.sampled_from(["drawn", "max", "dense"]))
    bits = draw(st.sampled_from(["drawn", "float", "8", "2"]))
    skip = draw(st.sampled_from(["drawn", "all", "none"]))
    layers: dict[str, LayerPolicy] = {}
    for ls in s.layers:
        lp = base.for_layer(ls.name)
        if width != "drawn" and ls.decides_width:
            lp = replace(lp, width=o.min_width if width == "min" else 1.0)
        if sparsity == "max" and "unstructured" in ls.schemes:
            lp = replace(
                lp, scheme="unstructured", sparsity=o.max_sparsity, nm=None, block=None, patterns=None
            )
        elif sparsity == "dense":
            lp = replace(lp, scheme="dense", sparsity=0.0, nm=None, block=None, patterns=None)
        if bits == "float":
            lp = replace(lp, bits=None, pow2=False)
        elif bits != "drawn":
            lp = replace(lp, bits=int(bits))
        layers[ls.name] = lp.validate(ls.name)
    skipped = {"drawn": base.skip, "all": frozenset(b.name for b in s.blocks), "none": frozenset()}[skip]
    return Policy(layers=layers, skip=skipped)


def _check(model: str, pols: list[Policy]) -> None:
    s = space(model)
    pols = [s.validate(p) for p in (*pols, Policy.dense())]
    truth = fake_latency_ms(s, pols, np.random.default_rng(0))
    records = [
        LatencyRecord(
            arch_id=model,
            space_id=model,
            space=s,
            policy=p,
            latency_ms=float(t),
            ratio=float(t) / 0.5,
            reference_ms=0.5,
            dense_latency_ms=float(truth[-1]),
            dense_ratio=float(truth[-1]) / 0.5,
            speedup=float(truth[-1] / t),
        )
        for p, t in zip(pols, truth, strict=True)
    ]
    for name, p in predictors().items():
        ms, std = p.predict_uncertainty(s, pols)
        assert np.all(np.isfinite(ms)) and np.all(ms > 0), (name, ms)
        assert np.all(np.isfinite(std)) and np.all(std > 0), (name, std)
        single = np.array([p.predict(s, [q])[0] for q in pols[:3]])
        assert np.all(np.isfinite(single)) and np.all(single > 0), (name, single)
        # the held-out metric, predicted speedups included, stays finite on the same policies
        metrics = evaluate(p, records)
        assert all(np.isfinite(v) for v in metrics.values()), (name, metrics)


@pytest.mark.slow
@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("model", MODELS)
def test_predictions_are_finite_and_positive_everywhere(model: str) -> None:
    predictors()  # fit outside hypothesis' timing
    space(model)

    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(policies(model), min_size=1, max_size=6))
    def check(pols: list[Policy]) -> None:
        _check(model, pols)

    check()


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("model", MODELS)
def test_the_extreme_corners(model: str) -> None:
    """The corners themselves, every one on every layer at once."""
    s = space(model)
    o = s.options
    every_block = frozenset(b.name for b in s.blocks)

    def each(**fields: object) -> dict[str, LayerPolicy]:
        out = {}
        for ls in s.layers:
            lp = LayerPolicy(**{k: v for k, v in fields.items() if k != "width"})  # type: ignore[arg-type]
            if ls.decides_width and "width" in fields:
                lp = replace(lp, width=float(fields["width"]))  # type: ignore[arg-type]
            if lp.scheme not in ls.schemes:
                lp = replace(lp, scheme="dense", sparsity=0.0)
            out[ls.name] = lp.validate(ls.name)
        return out

    corners = [
        Policy(layers=each(width=o.min_width)),
        Policy(layers=each(scheme="unstructured", sparsity=o.max_sparsity)),
        Policy(layers=each(bits=8)),
        Policy(layers=each(bits=2)),
        Policy(skip=every_block),
        Policy(
            layers=each(width=o.min_width, scheme="unstructured", sparsity=o.max_sparsity, bits=2),
            skip=every_block,
        ),
    ]
    _check(model, corners)
