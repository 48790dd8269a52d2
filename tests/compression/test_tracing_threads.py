"""Several threads of one process trace models at once (the service runs jobs and calibrations as threads)."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from compression.model_io import from_module
from compression.zoo import build_model


def _trace(seed: int) -> int:
    torch.manual_seed(seed)
    module = build_model("lenet5", in_channels=1, image_size=16, num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = from_module(module, torch.randn(2, 1, 16, 16), f"lenet-{seed}")
    return len(model.graph.layers)


def test_concurrent_tracing_does_not_corrupt_torch_state() -> None:
    with ThreadPoolExecutor(4) as pool:
        layers = list(pool.map(_trace, range(12)))
    assert layers == [layers[0]] * 12 and layers[0] > 0
