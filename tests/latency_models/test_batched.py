"""Batched prediction path (rows, de-duplication, memo), profiling shares, statistics, NCHWc rule."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from compression import from_module, space_for
from compression.policy import Policy
from compression.zoo import build_model
from latency_models.calibrate import export_for_device
from latency_models.devices import get_device
from latency_models.harness import Measurement
from latency_models.predictors import GraphGNN, KernelGBDT
from latency_models.predictors.base import LatencyRecord, supports_statistic, with_statistic
from latency_models.profiling import profile_onnx, row_shares, summarize_profile
from latency_models.rows import nchwc_ok, row_index, unique_rows
from latency_models.sampling import SPACE_OPTIONS, random_architecture, random_policy
from latency_models.testing import synthetic_records


@pytest.fixture(scope="module")
def records() -> list:
    return synthetic_records(n_arch=16, per_arch=10, seed=5)


@pytest.fixture(scope="module")
def resnet20() -> tuple:
    cm = from_module(
        build_model("resnet20", in_channels=3, image_size=32, num_classes=10), torch.randn(2, 3, 32, 32)
    )
    return cm, space_for(cm, SPACE_OPTIONS)


@pytest.fixture(scope="module")
def gbdt(records) -> KernelGBDT:
    model = KernelGBDT(target="ratio", n_estimators=80)
    model.fit(records)
    return model


def test_batch_predictions_equal_single_predictions(gbdt, resnet20) -> None:
    _, space = resnet20
    rng = random.Random(0)
    pols = [random_policy(space, rng) for _ in range(120)] + [Policy.dense()]
    batch = gbdt.predict(space, pols)
    gbdt._memo.clear()
    single = np.array([gbdt.predict(space, [p])[0] for p in pols])
    assert np.allclose(batch, single, rtol=1e-12, atol=0.0)
    gbdt._memo.clear()
    cold = gbdt.predict(space, pols[::-1])[::-1]
    warm = gbdt.predict(space, pols)  # served from the memo
    assert np.allclose(cold, batch, rtol=1e-12) and np.allclose(warm, batch, rtol=1e-12)


def test_unique_rows_invert_exactly(resnet20) -> None:
    _, space = resnet20
    idx = row_index(space)
    rng = random.Random(1)
    pols = [random_policy(space, rng) for _ in range(300)]
    for fields in (False, True):
        keys, _, _ = idx.keys(idx.arrays(pols, fields))
        u, inv, packed = unique_rows(idx, keys)
        assert np.array_equal(u[inv], keys)
        assert len(u) < len(keys)
        assert (packed is None) == fields  # the policy fields do not fit one int64 key
        if packed is not None:
            assert len(np.unique(packed)) == len(u)


def test_rows_channels_match_the_legacy_features(resnet20) -> None:
    from latency_models.features import KERNEL_FEATURES, kernel_features

    _, space = resnet20
    rng = random.Random(2)
    pols = [random_policy(space, rng) for _ in range(20)]
    pa = row_index(space).arrays(pols)
    kb = kernel_features(space, pols)
    k = {n: i for i, n in enumerate(KERNEL_FEATURES)}
    assert np.array_equal(pa.present, kb.present)
    assert np.allclose(pa.cout * pa.present, kb.x[:, :, k["out_channels"]])
    assert np.allclose(pa.cin * pa.present, kb.x[:, :, k["in_channels"]])
    assert np.array_equal(pa.int8, kb.x[:, :, k["int8"]] > 0.5)
    assert np.array_equal(pa.int4, kb.x[:, :, k["int4"]] > 0.5)


def test_nchwc_rule() -> None:
    c = np.array
    # dense convs: input channels under a block or a multiple of it; any output count
    assert nchwc_ok(c([3.0]), c([17.0]), c([1.0]), c([False]), c([True]), 16)[0]
    assert nchwc_ok(c([32.0]), c([17.0]), c([1.0]), c([False]), c([True]), 16)[0]
    assert not nchwc_ok(c([24.0]), c([32.0]), c([1.0]), c([False]), c([True]), 16)[0]
    assert nchwc_ok(c([24.0]), c([32.0]), c([1.0]), c([False]), c([True]), 8)[0]
    # depthwise: channels a multiple of the block
    assert nchwc_ok(c([48.0]), c([48.0]), c([48.0]), c([True]), c([True]), 16)[0]
    assert not nchwc_ok(c([23.0]), c([23.0]), c([23.0]), c([True]), c([True]), 16)[0]
    # linear layers never
    assert not nchwc_ok(c([64.0]), c([64.0]), c([1.0]), c([False]), c([False]), 16)[0]


def test_with_statistic_uses_the_fast_tail() -> None:
    def meas(median: float, p10: float, low: float, ref: tuple[float, float, float]) -> dict:
        return {
            "model_sha256": "x", "input_shape": [1, 3, 8, 8], "device": "d", "runtime": "onnxruntime",
            "runtime_version": "1", "threads": 1, "settings": {}, "runs": 10, "warmup": 1,
            "median_ms": median, "mean_ms": median, "min_ms": low, "p10_ms": p10, "p90_ms": median,
            "iqr_ms": 0.0, "reference_sha256": "r", "reference_median_ms": ref[0],
            "ratio_to_reference": median / ref[0], "attempts": 1, "noisy": False, "timestamp": "t",
            "reference_p10_ms": ref[1], "reference_min_ms": ref[2],
        }  # fmt: skip

    space = synthetic_records(n_arch=2, per_arch=2)[0].space
    comp, dense = meas(2.0, 1.6, 1.5, (1.0, 0.9, 0.8)), meas(4.0, 3.5, 3.0, (1.0, 0.9, 0.8))
    Measurement.from_dict(comp)  # a valid harness record
    rec = LatencyRecord(
        "a", "a", space, Policy(layers={}, skip=frozenset({"x"})), latency_ms=2.0, ratio=2.0,
        reference_ms=1.0, dense_latency_ms=4.0, dense_ratio=4.0, speedup=2.0,
        measurement={"compressed": comp, "dense": dense},
    )  # fmt: skip
    (m,) = with_statistic([rec], "min")
    assert (m.latency_ms, m.reference_ms, m.dense_latency_ms) == (1.5, 0.8, 3.0)
    assert m.ratio == pytest.approx(1.5 / 0.8) and m.speedup == pytest.approx(2.0)
    assert with_statistic([rec], "median")[0] is rec
    assert supports_statistic([rec], "min")
    old = dataclasses.replace(
        rec, measurement={"compressed": {**comp, "reference_min_ms": None}, "dense": dense}
    )
    assert not supports_statistic([old], "min") and supports_statistic([old], "median")
    assert with_statistic([old], "min")[0] is old  # kept whole rather than half converted
    assert dataclasses.replace(rec).latency_ms == 2.0


def test_profile_shares_cover_every_layer(tmp_path: Path) -> None:
    dev = get_device("cpu-ort-1t")
    for seed in (1, 5):
        module, shape = random_architecture(random.Random(seed))
        cm = from_module(module, torch.randn(2, *shape), f"r{seed}")
        space = space_for(cm, SPACE_OPTIONS)
        pol = random_policy(space, random.Random(seed))
        path, _, _ = export_for_device(cm, space, pol, dev, tmp_path / f"m{seed}.onnx")
        prof = profile_onnx(path, dev, runs=3, warmup=1)
        assert prof["nodes"] and all(n["us"] >= 0 for n in prof["nodes"])
        shares = row_shares(space, pol, prof)
        assert shares is not None
        n_present = int(row_index(space).arrays([pol]).present.sum())
        assert len(shares) == n_present + 1
        assert np.isfinite(shares[:-1]).mean() == 1.0  # every present layer found its node
        assert np.nansum(shares) == pytest.approx(1.0)


def test_summarize_profile_medians_per_node() -> None:
    ev = [{"name": "model_run", "dur": 10}, {"name": "model_run", "dur": 30}]
    for d in (4, 6, 5):
        ev.append(
            {"cat": "Node", "name": "c_kernel_time", "dur": d, "args": {"op_name": "Conv",
             "output_type_shape": [{"float": [1, 2, 3, 3]}]}}
        )  # fmt: skip
    out = summarize_profile(ev)
    assert out["model_us"] == 20.0
    assert out["nodes"] == [{"name": "c", "op": "Conv", "us": 5.0, "out_numel": 18}]


def _true_kernel_ms(space, policy) -> np.ndarray:
    """Per-kernel ms of the synthetic device (``latency_models.testing``), present layers in order."""
    from latency_models.features import KERNEL_FEATURES, kernel_features
    from latency_models.testing import _RATE

    kb = kernel_features(space, [policy])
    k = {n: i for i, n in enumerate(KERNEL_FEATURES)}
    rate = np.array([_RATE[int(o)] for o in kb.op])
    per = 0.004 + kb.x[0, :, k["macs"]] / rate + kb.x[0, :, k["out_numel"]] * 2e-6
    narrow = kb.x[0, :, k["out_channels"]] < 32
    per = per * np.where(kb.x[0, :, k["int8"]] > 0.5, np.where(narrow, 1.4, 0.6), 1.0)
    return per[kb.present[0]]


def _with_profiles(records: list) -> list:
    """The records with profiles a runtime would report: one node per kernel, true times."""
    out = []
    for r in records:
        pa = row_index(r.space).arrays([r.policy])
        layers = np.flatnonzero(pa.present[0])
        nodes = [
            {
                "name": f"n{i}",
                "op": "Conv",
                "us": 1000.0 * t,
                "out_numel": int(
                    pa.cout[0, i] * r.space.layers[i].features.out_h * r.space.layers[i].features.out_w
                ),
            }
            for i, t in zip(layers, _true_kernel_ms(r.space, r.policy), strict=True)
        ]
        out.append(dataclasses.replace(r, measurement={"profile": {"model_us": 0.0, "nodes": nodes}}))
    return out


def test_profiles_teach_the_split(records) -> None:
    """Given profiles, the fitted per-kernel costs follow the device's true split more closely."""
    profiled = _with_profiles(records)
    test_arch = records[-1].arch_id
    train = [r for r in profiled if r.arch_id != test_arch]
    test = [r for r in records if r.arch_id == test_arch and r.policy.layers]
    errors = {}
    for weight in (0.0, 3.0):
        model = KernelGBDT(target="ms", n_estimators=150, profile_weight=weight)
        model.fit(train)
        errs = []
        for r in test:
            costs = model.kernel_costs(r.space, r.policy)
            pred = np.array([v for k, v in costs.items() if k != "model"])
            errs.append(np.abs(np.log(pred / _true_kernel_ms(r.space, r.policy))))
        errors[weight] = float(np.median(np.concatenate(errs)))
    assert errors[3.0] < errors[0.0], errors
    shares = row_shares(profiled[0].space, profiled[0].policy, profiled[0].measurement["profile"])
    assert shares is not None and np.isfinite(shares[:-1]).all() and shares[-1] == 0.0


def test_gnn_batch_equals_single(records) -> None:
    model = GraphGNN(target="ratio", epochs=20).fit(records)
    space = records[0].space
    pols = [r.policy for r in records if r.space is space]
    batch = model.predict(space, pols)
    single = np.array([model.predict(space, [p])[0] for p in pols])
    assert np.allclose(batch, single, rtol=1e-5)
