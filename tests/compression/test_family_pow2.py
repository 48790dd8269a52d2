"""A family cannot hold power-of-two layers: its points share one uniform grid per layer."""

from __future__ import annotations

import pytest
import torch

from compression.data import calibration_batches, load_builtin
from compression.family import NestingError, build_family, check_nested_policies
from compression.model_io import from_module
from compression.policy import Policy


def test_a_pow2_layer_is_refused_naming_the_point_the_layer_and_the_fix() -> None:
    pow2 = Policy.from_dict({"layers": {"fc": {"bits": 4, "pow2": True}}})
    with pytest.raises(NestingError, match=r"point 1, layer 'fc': pow2 .* drop pow2 or use plain bits"):
        check_nested_policies([Policy.dense(), pow2], ["conv", "fc"])
    with pytest.raises(ValueError, match="point 0, layer 'fc'"):  # a NestingError is a ValueError
        check_nested_policies([pow2], ["conv", "fc"])
    # The same bits on the uniform grid nest.
    check_nested_policies([Policy.dense(), Policy.from_dict({"layers": {"fc": {"bits": 4}}})], ["conv", "fc"])


def test_build_family_refuses_it_before_touching_the_model() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(256, 10)
    )
    model = from_module(net.eval(), torch.randn(2, 1, 8, 8), "tiny")
    fc = model.graph.layers[-1].name
    policy = Policy.from_dict({"layers": {fc: {"bits": 4, "pow2": True}}})
    cal = calibration_batches(load_builtin("digits"), 1, 8)
    with pytest.raises(NestingError, match=f"layer '{fc}': pow2"):
        build_family(model, [Policy.dense(), policy], cal)
