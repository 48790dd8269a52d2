"""``round_to``: searched widths keep a multiple of N channels in the really compressed model."""

from __future__ import annotations

import json
import random

import pytest
import torch

from compression.apply import apply_policy
from compression.model_io import from_module
from compression.space import SpaceOptions
from compression.space_builder import space_for
from compression.zoo import build_model
from tests.compression.fancy_model import FancyNet


@pytest.mark.parametrize("arch", ["fancy", "resnet20"])
def test_sampled_widths_keep_multiples_of_round_to(arch: str) -> None:
    torch.manual_seed(0)
    if arch == "fancy":
        net: torch.nn.Module = FancyNet()
        x = torch.randn(2, 1, 16, 16)
        m = 4
    else:
        net = build_model("resnet20", in_channels=1, image_size=8, num_classes=10)
        x = torch.randn(2, 1, 8, 8)
        m = 8
    model = from_module(net, x, name=arch)
    space = space_for(model, SpaceOptions(round_to=m, min_width=0.2))
    rng = random.Random(0)
    pruned = 0
    for _ in range(25):
        policy = space.sample(rng)
        cm = apply_policy(model, policy)
        for kept in cm.keep.values():
            assert len(kept) % m == 0, f"{arch}: kept {len(kept)} channels with round_to={m}"
            pruned += 1
        out = cm.gm(x)
        assert out.shape == (2, 10)
    assert pruned > 0, "no group was pruned: the test would prove nothing"


def test_round_to_one_changes_nothing() -> None:
    opts = SpaceOptions()
    model = from_module(FancyNet(), torch.randn(2, 1, 16, 16), name="fancy")
    leader = space_for(model).width_leaders[0]
    assert opts.snap_width(leader, 0.613) == 0.613


@pytest.mark.parametrize("bad", [0, -8, 2048, 2.5, "16", True])
def test_round_to_must_be_a_positive_integer(bad: object) -> None:
    from engine.spec import parse_space

    with pytest.raises(ValueError, match="round_to"):
        parse_space(json.dumps({"round_to": bad}))
