"""MobileNetV2 (Sandler et al. 2018), CIFAR-style.

Inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 linear projection) with
ReLU6. For small images the stem has stride 1 and the second stage keeps stride 1
(as in the common CIFAR adaptation), so 32x32 inputs reach 4x4 before pooling;
stride-2 stages become stride 1 once the map is under 4 px (8x8 digits).
"""

from __future__ import annotations

import torch
from torch import nn

from compression.zoo._common import check_dims, downsample_stride, out_size

# (expansion t, output channels c, repeats n, first stride s); stage 2 stride 2 -> 1 for CIFAR.
CIFAR_CONFIG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _conv_bn_relu6(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """Expand (skipped when t = 1), depthwise, project; residual add when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        self.expand = _conv_bn_relu6(in_ch, hidden, 1, 1) if expansion != 1 else nn.Identity()
        self.depthwise = _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        if self.use_residual:
            out = out + x
        return out


class MobileNetV2(nn.Module):
    """Stem, 17 inverted residual blocks, 1x1 conv to 1280, global pool, dropout-free head."""

    def __init__(
        self, *, in_channels: int, image_size: int, num_classes: int, last_channels: int = 1280
    ) -> None:
        super().__init__()
        self.stem = _conv_bn_relu6(in_channels, 32, 3, 1)
        size = image_size
        in_ch = 32
        blocks: list[nn.Module] = []
        for expansion, out_ch, repeats, requested_stride in CIFAR_CONFIG:
            for i in range(repeats):
                stride = downsample_stride(size, requested_stride) if i == 0 else 1
                blocks.append(InvertedResidual(in_ch, out_ch, stride, expansion))
                in_ch = out_ch
                size = out_size(size, stride)
        self.blocks = nn.Sequential(*blocks)
        self.head_conv = _conv_bn_relu6(in_ch, last_channels, 1, 1)
        self.classifier = nn.Linear(last_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head_conv(self.blocks(self.stem(x)))
        out = torch.nn.functional.adaptive_avg_pool2d(out, 1)
        out = torch.flatten(out, 1)
        return self.classifier(out)


def mobilenetv2(*, in_channels: int, image_size: int, num_classes: int) -> MobileNetV2:
    """CIFAR-style MobileNetV2, width 1.0 (~2.2 M parameters)."""
    check_dims(
        "mobilenetv2", in_channels=in_channels, image_size=image_size, num_classes=num_classes, min_size=1
    )
    return MobileNetV2(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
