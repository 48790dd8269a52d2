"""A policy's resolved identity: equal keys build the same model, different kept counts do not."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from compression.apply import apply_policy
from compression.model_io import CompressibleModel, from_module
from compression.policy import LayerPolicy, Policy
from compression.policy_identity import resolved_key
from compression.space import SpaceOptions
from compression.space_builder import space_for
from compression.zoo import build_model
from tests.compression.fancy_model import FancyNet


def _model(arch: str) -> tuple[CompressibleModel, torch.Tensor]:
    torch.manual_seed(0)
    if arch == "fancy":
        x = torch.randn(2, 1, 16, 16)
        return from_module(FancyNet().eval(), x, name=arch), x
    net = build_model("resnet20", in_channels=1, image_size=8, num_classes=10).eval()
    x = torch.randn(2, 1, 8, 8)
    return from_module(net, x, name=arch), x


def _built(model: CompressibleModel, policy: Policy) -> dict[str, torch.Tensor]:
    cm = apply_policy(model, policy)
    return {k: v.detach().clone() for k, v in cm.gm.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def _nudged(policy: Policy, model: CompressibleModel, rng: random.Random) -> Policy:
    """The same policy with every leader's width moved inside its rounding interval."""
    space = space_for(model)
    layers = dict(policy.layers)
    for ls in space.width_leaders:
        lp = policy.for_layer(ls.name)
        n = ls.features.out_channels
        if lp.width >= 1.0:
            continue
        kept = max(1, round(lp.width * n))
        lo, hi = (kept - 0.49) / n, (kept + 0.49) / n
        width = min(0.999, max(lo, min(hi, lp.width + rng.uniform(-0.4, 0.4) / n)))
        if round(width * n) == kept:
            layers[ls.name] = dataclasses.replace(lp, width=round(width, 6))
    return Policy(default=policy.default, layers=layers, skip=policy.skip, act_bits=policy.act_bits)


@pytest.mark.parametrize("arch", ["fancy", "resnet20"])
def test_equal_keys_build_identical_models(arch: str) -> None:
    """Random policies and their width-nudged twins: whenever the keys agree, so do the models."""
    model, _x = _model(arch)
    space = space_for(model, SpaceOptions(round_to=1))
    rng = random.Random(3)
    merged = 0
    for _ in range(12):
        policy = space.sample(rng)
        twin = _nudged(policy, model, rng)
        if twin.hash == policy.hash:
            continue
        if resolved_key(model.graph, twin) == resolved_key(model.graph, policy):
            assert _same(_built(model, policy), _built(model, twin)), "equal keys, different models"
            merged += 1
    assert merged > 0, "no two JSON-different policies resolved alike: the test would prove nothing"


def test_different_kept_counts_are_different_policies() -> None:
    model, _x = _model("resnet20")
    leader = space_for(model).width_leaders[0]
    n = leader.features.out_channels
    a = Policy(layers={leader.name: LayerPolicy(width=(n // 2) / n)})
    b = Policy(layers={leader.name: LayerPolicy(width=(n // 2 + 1) / n)})
    assert resolved_key(model.graph, a) != resolved_key(model.graph, b)
    assert not _same(_built(model, a), _built(model, b))


def test_settings_inside_a_skipped_block_do_not_count() -> None:
    model, _x = _model("resnet20")
    space = space_for(model)
    block = space.blocks[0]
    inner = block.layers[0]
    plain = Policy(skip=frozenset({block.name}))
    busy = Policy(layers={inner: LayerPolicy(bits=8)}, skip=frozenset({block.name}))
    assert plain.hash != busy.hash
    assert resolved_key(model.graph, plain) == resolved_key(model.graph, busy)
    assert _same(_built(model, plain), _built(model, busy))
    # ...while the same setting on a layer that stays is a different model.
    kept = Policy(layers={inner: LayerPolicy(bits=8)})
    assert resolved_key(model.graph, kept) != resolved_key(model.graph, Policy())


def test_round_to_snapped_widths_and_their_raw_values_agree() -> None:
    """A width snapped by round_to and the raw one that rounds to the same count are one policy."""
    model, _x = _model("resnet20")
    options = SpaceOptions(round_to=8)
    leader = next(ls for ls in space_for(model, options).width_leaders if ls.features.out_channels >= 32)
    n = leader.features.out_channels
    snapped = options.snap_width(leader, 0.5)
    raw = (round(snapped * n) + 0.3) / n
    a = Policy(layers={leader.name: LayerPolicy(width=snapped)})
    b = Policy(layers={leader.name: LayerPolicy(width=raw)})
    assert a.hash != b.hash and resolved_key(model.graph, a) == resolved_key(model.graph, b)
