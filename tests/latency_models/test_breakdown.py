"""Where the time goes: per-layer predicted ms of a real model, flags and "why not faster".

The predictor is a real ``KernelGBDT`` fitted on the synthetic device of
``latency_models.testing`` (sparsity masks change nothing, int8 helps wide kernels and hurts
narrow ones) for ResNet-20's real search space.
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from compression.model_io import from_module
from compression.policy import LayerPolicy, Policy
from compression.space import SearchSpace, SpaceOptions
from compression.space_builder import space_for
from compression.zoo import build_model
from latency_models.breakdown import DeviceFacts, explain, layer_costs, macs_costs, without_bits
from latency_models.predictors.base import LatencyRecord
from latency_models.predictors.kernel_gbdt import KernelGBDT
from latency_models.testing import fake_latency_ms

SIZE_ONLY = {"unstructured": "size-only: unstructured (high sparsity) ran 0.97x the dense speed"}


@pytest.fixture(scope="module")
def fitted() -> tuple[SearchSpace, KernelGBDT]:
    torch.manual_seed(0)
    net = build_model("resnet20", in_channels=1, image_size=16, num_classes=10).eval()
    space = space_for(from_module(net, torch.randn(2, 1, 16, 16), name="r20"), SpaceOptions())
    rng = random.Random(0)
    policies = [Policy.dense()]
    for _ in range(159):
        p = space.sample(rng)
        if rng.random() < 0.5:
            bits = 8 if rng.random() < 0.5 else None
            p = Policy(layers={n: replace(p.for_layer(n), bits=bits) for n in space.layer_names}, skip=p.skip)
        policies.append(p)
    ms = fake_latency_ms(space, policies, np.random.default_rng(0))
    records = [
        LatencyRecord(
            arch_id="r20",
            space_id="r20",
            space=space,
            policy=p,
            latency_ms=float(t),
            dense_latency_ms=float(ms[0]),
        )
        for p, t in zip(policies, ms, strict=True)
    ]
    predictor = KernelGBDT(policy_features=False, n_estimators=120)
    predictor.fit(records)
    return space, predictor


def _biggest(space: SearchSpace) -> str:
    return max((ls for ls in space.layers if ls.features.op == "conv"), key=lambda ls: ls.features.macs).name


def test_layer_times_add_up_to_the_prediction(fitted: tuple[SearchSpace, KernelGBDT]) -> None:
    space, predictor = fitted
    rng = random.Random(5)
    for policy in [Policy.dense(), *(space.sample(rng) for _ in range(4))]:
        costs = layer_costs(predictor, space, policy)
        out = explain(space, policy, costs, layer_costs(predictor, space, Policy.dense()), DeviceFacts())
        predicted = float(predictor.predict(space, [policy])[0])
        layer_sum = sum(r.predicted_ms for r in out.layers)
        assert out.total_ms == pytest.approx(predicted, rel=1e-9)
        assert layer_sum + out.overhead_ms == pytest.approx(predicted, rel=1e-9)
        assert sum(r.share for r in out.layers) + out.overhead_ms / out.total_ms == pytest.approx(1.0)
        dense = float(predictor.predict(space, [Policy.dense()])[0])
        assert out.dense_total_ms == pytest.approx(dense, rel=1e-9)
        for r in out.layers:  # a skipped layer costs nothing and lost all its work
            assert r.present or (r.predicted_ms == 0.0 and r.removed == 1.0)


def test_sparsity_the_device_ignores_is_flagged_and_explained(fitted: tuple[SearchSpace, KernelGBDT]) -> None:
    space, predictor = fitted
    big = _biggest(space)
    policy = Policy(layers={big: LayerPolicy(scheme="unstructured", sparsity=0.9)})
    facts = DeviceFacts(name="cpu-ort-1t", size_only=SIZE_ONLY)
    out = explain(
        space,
        policy,
        layer_costs(predictor, space, policy),
        layer_costs(predictor, space, Policy.dense()),
        facts,
    )
    row = next(r for r in out.layers if r.name == big)
    assert row.removed == pytest.approx(0.9) and abs(row.saved) < 1e-9  # the masks buy nothing here
    assert [f.kind for f in row.flags] == ["size_only"]
    assert "buys no speed on cpu-ort-1t" in row.flags[0].reason and "0.97x" in row.flags[0].reason
    assert out.advice[0].layer == big and "prune channels" in out.advice[0].suggestion
    # the same policy where the device accelerates the scheme: no flag
    plain = explain(
        space,
        policy,
        layer_costs(predictor, space, policy),
        layer_costs(predictor, space, Policy.dense()),
        DeviceFacts(),
    )
    assert not next(r for r in plain.layers if r.name == big).flags


def test_a_channel_count_off_the_device_block_is_flagged_with_its_rounding(
    fitted: tuple[SearchSpace, KernelGBDT],
) -> None:
    space, predictor = fitted
    leader = next(ls for ls in space.width_leaders if ls.features.out_channels == 64)
    policy = Policy(layers={leader.name: LayerPolicy(width=24 / 64)})
    facts = DeviceFacts(name="cpu-ort-1t", round_to=16)
    dense = layer_costs(predictor, space, Policy.dense())
    out = explain(space, policy, layer_costs(predictor, space, policy), dense, facts)
    flagged = [r for r in out.layers if any(f.kind == "channel_multiple" for f in r.flags)]
    assert leader.name in [r.name for r in flagged]
    row = next(r for r in flagged if r.name == leader.name)
    assert row.kept_out == 24 and row.dense_out == 64
    assert "round 24 channels to 16 or 32" in row.flags[0].reason
    # every flagged layer keeps a count off the block, every other pruned one is aligned
    for r in out.layers:
        off = r.present and r.kept_out < r.dense_out and r.kept_out % 16 != 0
        assert off == any(f.kind == "channel_multiple" for f in r.flags)
    aligned = Policy(layers={leader.name: LayerPolicy(width=32 / 64)})
    out = explain(space, aligned, layer_costs(predictor, space, aligned), dense, facts)
    assert not any(f.kind == "channel_multiple" for r in out.layers for f in r.flags)
    for advice in out.advice:
        assert advice.layer in {r.name for r in out.layers} and advice.suggestion


def test_int8_flags_follow_the_device_and_the_predictor(fitted: tuple[SearchSpace, KernelGBDT]) -> None:
    space, predictor = fitted
    policy = Policy(default=LayerPolicy(bits=8))
    costs = layer_costs(predictor, space, policy)
    in_float = layer_costs(predictor, space, without_bits(policy))
    dense = layer_costs(predictor, space, Policy.dense())
    out = explain(space, policy, costs, dense, DeviceFacts(), float_costs=in_float)
    for r in out.layers:
        slower = costs[r.name] > 1.02 * in_float[r.name]
        assert slower == any(f.kind == "int8_slower" for f in r.flags), r.name
    # the synthetic device runs int8 narrow kernels 1.4x slower: the predictor learnt some of them
    assert any(f.kind == "int8_slower" for r in out.layers for f in r.flags)
    measured = DeviceFacts(size_only={"int8": "size-only: int8 (8-bit weights) ran 0.90x the dense speed"})
    out = explain(space, policy, costs, dense, measured, float_costs=in_float)
    assert all(any("0.90x" in f.reason for f in r.flags) for r in out.layers if r.present)


def test_without_a_predictor_time_follows_kept_macs(fitted: tuple[SearchSpace, KernelGBDT]) -> None:
    space, _predictor = fitted
    policy = Policy(default=LayerPolicy(width=0.5), skip=frozenset({space.blocks[0].name}))
    costs = macs_costs(space, policy, 2.0)
    assert sum(costs.values()) == pytest.approx(2.0)
    out = explain(space, policy, costs, macs_costs(space, Policy.dense(), 4.0), DeviceFacts(), source="macs")
    assert out.source == "macs" and out.total_ms == pytest.approx(2.0)
    skipped = set(space.blocks[0].layers)
    assert all(r.predicted_ms == 0 for r in out.layers if r.name in skipped)
