"""A small VGG-style plain net (VGG-11 layout with BatchNorm, half the CIFAR widths).

No residual connections: every conv's output channels are free for width search,
which makes it the simple counterpart to the ResNets. Widths are halved from
VGG-11 (32..256) so it trains on 2 CPU cores in minutes.
"""

from __future__ import annotations

import torch
from torch import nn

from compression.zoo._common import check_dims

# Conv widths; "M" is a 2x2 max-pool, dropped once the map is smaller than 4 px.
VGG11_HALF: tuple[int | str, ...] = (32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256)


class VGG(nn.Module):
    """conv3x3-BN-ReLU stacks with max-pools, global average pool, two-layer classifier."""

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        config: tuple[int | str, ...] = VGG11_HALF,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        size = image_size
        for item in config:
            if item == "M":
                if size >= 4:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            assert isinstance(item, int)
            layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
            channels = item
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(channels, channels)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        out = torch.nn.functional.adaptive_avg_pool2d(out, 1)
        out = torch.flatten(out, 1)
        return self.fc2(self.relu(self.fc1(out)))


def vgg(*, in_channels: int, image_size: int, num_classes: int) -> VGG:
    """The zoo's VGG: VGG-11 layout, half widths, BatchNorm."""
    check_dims("vgg", in_channels=in_channels, image_size=image_size, num_classes=num_classes, min_size=1)
    return VGG(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
