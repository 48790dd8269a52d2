"""A focused calibration plan always holds other architectures besides the model's own."""

from __future__ import annotations

import warnings

import pytest

from compression.model_io import CompressibleModel
from compression.policy import Policy
from compression.zoo import build_model
from latency_models.focus import RANDOM_MACS_FLOOR, dense_macs, focused_plan
from latency_models.sampling import _export


@pytest.fixture(scope="module")
def small_lenet() -> CompressibleModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _export(
            build_model("lenet5", in_channels=1, image_size=8, num_classes=10), (1, 8, 8), "lenet5"
        )


# 74 and 85: seeds whose first few random architectures are all over the MACs cap; a 16-sample
# plan of those once held LeNet-5 alone, and the calibration failed ("fewer than two architectures").
@pytest.mark.parametrize("seed", [0, 74, 85])
def test_plan_mixes_the_model_with_small_random_architectures(
    small_lenet: CompressibleModel, seed: int
) -> None:
    plan = list(focused_plan(small_lenet, "lenet5", "lenet5@1x8x8", 16, seed=seed))
    assert len(plan) == 16
    own = [s for s in plan if s.arch_id == "lenet5"]
    others = [s for s in plan if s.arch_id != "lenet5"]
    assert len(own) >= 8, "most samples are the model's own policies"
    assert len(others) == 4, "the random share (25 %) is kept"
    assert len({s.arch_id for s in others}) >= 2
    for s in others:
        assert dense_macs(s.space, Policy.dense()) <= RANDOM_MACS_FLOOR
