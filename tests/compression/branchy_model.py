"""A branchy CNN defined only in the tests: channels that meet after a concat.

Held out from the zoo and from ``fancy_model.FancyNet`` on purpose: its concats feed a
squeeze-excitation gate and a residual add, the two places where a concat's channel slices
are coupled to another layer's channels (the SE excitation's output channels, the shortcut
projection's output channels). Also in it: a grouped conv inside a branch, a BatchNorm and a
depthwise conv over concatenated channels, a branch that passes another group's channels on
(max-pool), and a grouped conv reading a concat.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(pool(x))))), the gate as 1x1 convs (with biases)."""

    def __init__(self, c: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class LinearSE(nn.Module):
    """The same gate with Linear layers and a reshape (the other common way to write it)."""

    def __init__(self, c: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c, reduced)
        self.fc2 = nn.Linear(reduced, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s.view(s.shape[0], -1, 1, 1)


class Inception(nn.Module):
    """Three branches concatenated, then squeeze-excitation over the concat."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, 8)
        self.b2_reduce = conv_bn(cin, 8)
        self.b2 = conv_bn(8, 8, 3, groups=2)  # grouped conv producing a concat slice
        self.b3_dw = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.b3 = conv_bn(cin, 16)
        self.se = SqueezeExcite(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.b1(x), self.b2(self.b2_reduce(x)), self.b3(self.b3_dw(x))], dim=1)
        return self.se(y)


class ConcatResidual(nn.Module):
    """relu(proj(x) + bn(cat(branch_a(x), branch_b(x), pool(x)))): the add couples proj's slices."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 1, bias=False)
        self.proj_bn = nn.BatchNorm2d(cout)
        self.branch_a = nn.Conv2d(cin, 16, 3, padding=1, bias=False)
        self.branch_b = nn.Conv2d(cin, cout - 16 - cin, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)  # one BatchNorm over the whole concat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.proj_bn(self.proj(x))
        y = torch.cat([self.branch_a(x), self.branch_b(x), F.max_pool2d(x, 3, 1, 1)], dim=1)
        return F.relu(skip + self.bn(y))


class BranchyNet(nn.Module):
    """Stem, inception block with SE, concat residual, depthwise + grouped conv over concats, head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 16, 3, stride=2)
        self.inception = Inception(16)
        self.res = ConcatResidual(32, 64)
        self.dw = nn.Conv2d(64, 64, 3, stride=2, padding=1, groups=64, bias=False)
        self.dw_bn = nn.BatchNorm2d(64)
        self.mix = conv_bn(64, 64, 1, groups=2)  # grouped conv reading concatenated channels
        self.tail_a = nn.Conv2d(64, 24, 1)
        self.tail_b = nn.Conv2d(64, 24, 3, padding=1)
        self.tail_se = LinearSE(48, 12)
        self.head = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.inception(x)
        x = self.res(x)
        x = F.relu(self.dw_bn(self.dw(x)))
        x = self.mix(x)
        x = torch.cat([F.relu(self.tail_a(x)), F.relu(self.tail_b(x))], dim=1)
        x = self.tail_se(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def with_random_bn_stats(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine terms, then switch to eval.

    A fresh BatchNorm (mean 0, var 1, scale 1, shift 0) hides mistakes in which channels
    its parameters are sliced to; random ones make such a mistake change the outputs.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return net.eval()
