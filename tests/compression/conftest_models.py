"""Small zoo models shared by the compression tests (built once per session)."""

from __future__ import annotations

import functools
import warnings

import torch

from compression.model_io import CompressibleModel, from_module
from compression.zoo import ZOO, build_model

# Small inputs keep the property tests fast; every architecture adapts to them.
SIZES = {"vit": 16, "mobilenetv2": 16}


@functools.cache
def zoo_model(arch: str) -> CompressibleModel:
    torch.manual_seed(0)
    size = SIZES.get(arch, 16)
    module = build_model(arch, in_channels=1, image_size=size, num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return from_module(module, torch.randn(2, 1, size, size), arch)


ARCHS = list(ZOO)
