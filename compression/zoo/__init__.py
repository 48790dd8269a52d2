"""Built-in model zoo: plain-torch architectures that adapt to any small image data set.

Every model is written with standard modules and functional calls that
``torch.export`` traces into plain aten ops (conv2d, batch_norm, linear, add, ...),
with explicit residual adds and no in-place ops, so graph analysis and channel
surgery see the whole model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from compression.tracing import TRACE_LOCK
from compression.zoo.lenet import lenet5
from compression.zoo.mobilenet import mobilenetv2
from compression.zoo.resnet import resnet20, resnet56
from compression.zoo.vgg import vgg
from compression.zoo.vit import vit

__all__ = ["MAX_BATCH", "ZOO", "build_model", "export_model"]

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "vgg": vgg,
    "mobilenetv2": mobilenetv2,
    "lenet5": lenet5,
    "vit": vit,
}

ZOO: tuple[str, ...] = tuple(_BUILDERS)

# Largest batch the exported graph accepts; the batch dimension is symbolic up to it.
MAX_BATCH = 4096


def build_model(arch: str, *, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """Build an untrained zoo model shaped for the data set (channels, square size, classes).

    Raises:
        ValueError: unknown ``arch`` (the message lists the zoo) or impossible dimensions.
    """
    try:
        builder = _BUILDERS[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; the zoo has: {', '.join(ZOO)}") from None
    return builder(in_channels=in_channels, image_size=image_size, num_classes=num_classes)


def export_model(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """Export ``model`` in eval mode with a symbolic batch dimension (1..MAX_BATCH).

    This is the one export every other part of modeltailor works on; the model is
    left in eval mode afterwards.
    """
    if not isinstance(example, torch.Tensor) or example.dim() < 1:
        raise ValueError("export_model needs an example input tensor with a batch dimension")
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with TRACE_LOCK:
        return torch.export.export(model.eval(), (example,), dynamic_shapes={"x": {0: batch}})
