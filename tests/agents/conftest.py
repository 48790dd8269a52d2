"""Real search spaces for agent tests: concat/SE/depthwise, and ResNet-20 (skippable blocks)."""

from __future__ import annotations

import pytest
import torch

from compression import CompressibleModel, SearchSpace, from_module, space_for
from compression.zoo import build_model
from tests.compression.fancy_model import FancyNet


@pytest.fixture(scope="session")
def fancy_model() -> CompressibleModel:
    torch.manual_seed(0)
    return from_module(FancyNet(), torch.randn(2, 1, 16, 16), name="fancy")


@pytest.fixture(scope="session")
def fancy_space(fancy_model: CompressibleModel) -> SearchSpace:
    return space_for(fancy_model)


@pytest.fixture(scope="session")
def resnet_space() -> SearchSpace:
    torch.manual_seed(0)
    net = build_model("resnet20", in_channels=1, image_size=8, num_classes=10)
    return space_for(from_module(net, torch.randn(2, 1, 8, 8), name="resnet20"))
