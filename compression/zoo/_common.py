"""Small helpers shared by the zoo architectures."""

from __future__ import annotations


def check_dims(arch: str, *, in_channels: int, image_size: int, num_classes: int, min_size: int) -> None:
    """Refuse impossible shapes up front, naming the architecture and the bad value.

    Raising here keeps the error out of the depths of a conv's shape check.
    """
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"{arch}: in_channels must be a positive int, got {in_channels!r}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"{arch}: num_classes must be an int >= 2, got {num_classes!r}")
    if not isinstance(image_size, int) or image_size < min_size:
        raise ValueError(f"{arch}: image_size must be an int >= {min_size}, got {image_size!r}")


def downsample_stride(size: int, requested: int) -> int:
    """Stride of a downsampling stage, kept at 1 once the map is already tiny (< 4 px).

    This is how the CIFAR-scale nets adapt to 8x8 digits without shrinking to nothing.
    """
    return requested if size >= 4 else 1


def out_size(size: int, stride: int) -> int:
    """Spatial size after a 3x3 (or 1x1) conv with padding k//2 and the given stride."""
    return (size - 1) // stride + 1
