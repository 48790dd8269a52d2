"""CIFAR-style ResNets (He et al. 2016, section 4.2): ResNet-20 and ResNet-56.

Three stages of basic blocks with 16, 32 and 64 channels. Shortcuts that change
shape are option B (1x1 conv + BatchNorm) so every coupled channel lives in conv
parameters that channel surgery can cut; shape-keeping blocks have an identity
shortcut and are the skippable blocks of depth search.
"""

from __future__ import annotations

import torch
from torch import nn

from compression.zoo._common import check_dims, downsample_stride, out_size


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU after the add."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(nn.Module):
    """Stem conv, three stages of ``blocks_per_stage`` basic blocks, global pool, linear head."""

    def __init__(self, blocks_per_stage: int, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        size = image_size
        in_planes = 16
        stages: list[nn.Sequential] = []
        for planes, requested_stride in ((16, 1), (32, 2), (64, 2)):
            blocks: list[nn.Module] = []
            for i in range(blocks_per_stage):
                stride = downsample_stride(size, requested_stride) if i == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
                size = out_size(size, stride)
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.nn.functional.adaptive_avg_pool2d(out, 1)
        out = torch.flatten(out, 1)
        return self.fc(out)


def resnet20(*, in_channels: int, image_size: int, num_classes: int) -> CifarResNet:
    """ResNet-20: 3 blocks per stage, ~0.27 M parameters."""
    check_dims(
        "resnet20", in_channels=in_channels, image_size=image_size, num_classes=num_classes, min_size=1
    )
    return CifarResNet(3, in_channels=in_channels, image_size=image_size, num_classes=num_classes)


def resnet56(*, in_channels: int, image_size: int, num_classes: int) -> CifarResNet:
    """ResNet-56: 9 blocks per stage, ~0.85 M parameters."""
    check_dims(
        "resnet56", in_channels=in_channels, image_size=image_size, num_classes=num_classes, min_size=1
    )
    return CifarResNet(9, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
