"""Calibration sampling: generated architectures, policies, and a tiny real calibration."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from compression import from_module, space_for
from latency_models.calibrate import calibrate, fit_predictors
from latency_models.features import runtime_int8
from latency_models.sampling import SPACE_OPTIONS, random_architecture, random_policy
from latency_models.store import DeviceStore


def test_random_architectures_vary_and_export() -> None:
    ops: set[str] = set()
    sizes: set[int] = set()
    blocks = 0
    for seed in range(10):
        module, shape = random_architecture(random.Random(seed))
        cm = from_module(module, torch.randn(2, *shape), f"r{seed}")
        space = space_for(cm, SPACE_OPTIONS)
        ops |= {ls.features.op for ls in space.layers}
        sizes.add(shape[1])
        blocks += len(space.blocks)
        assert cm.gm(torch.randn(1, *shape)).shape == (1, 10)
    assert {"conv", "linear"} <= ops and ({"dwconv", "gconv"} & ops)
    assert len(sizes) >= 2 and blocks > 0


def test_random_policies_cover_both_runtime_modes() -> None:
    module, shape = random_architecture(random.Random(3))
    space = space_for(from_module(module, torch.randn(2, *shape)), SPACE_OPTIONS)
    rng = random.Random(0)
    modes = [runtime_int8(space, random_policy(space, rng)) for _ in range(40)]
    assert 0 < sum(modes) < len(modes)


def test_small_calibration_measures_and_fits(tmp_path: Path) -> None:
    store = DeviceStore("cpu-ort-1t", tmp_path)
    records = calibrate("cpu-ort-1t", 8, seed=4, runs=8, warmup=2, store=store, zoo_fraction=0.0)
    assert len(records) >= 8
    for r in records:
        assert r.latency_ms > 0 and r.ratio is not None and r.ratio > 0 and r.speedup is not None
    assert any(r.policy.to_dict() == r.policy.dense().to_dict() and r.speedup == 1.0 for r in records)
    assert len(store.records()) == len(records)
    _, doc, version = fit_predictors(store.records(), kinds=("macs", "lookup"), store=store)
    assert version == 1 and set(doc["predictors"]) == {"macs", "lookup"}
    assert doc["predictors"]["macs"]["n_arch"] >= 1
