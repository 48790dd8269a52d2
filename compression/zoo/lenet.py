"""LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling.

Kept because its classifier flattens a spatial map (16 x h x w) into a Linear:
the flatten -> Linear channel coupling that graph analysis must get right.
"""

from __future__ import annotations

import torch
from torch import nn

from compression.zoo._common import check_dims


class LeNet5(nn.Module):
    """conv5-ReLU-pool, conv5-ReLU-pool, then 120-84-classes fully connected layers."""

    def __init__(self, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        # conv1 keeps the size (padding 2, as for 28x28 MNIST in the original paper).
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        size = image_size // 2
        # conv2 is "valid" when the map is big enough, "same" on small inputs (8x8 digits).
        padding = 0 if size >= 9 else 2
        self.conv2 = nn.Conv2d(6, 16, 5, padding=padding)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        size = (size + 2 * padding - 4) // 2
        self.fc1 = nn.Linear(16 * size * size, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)
        # He init (PyTorch's default is tuned for tanh-like nets) lets ReLU LeNet learn in a few epochs.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool1(self.relu1(self.conv1(x)))
        out = self.pool2(self.relu2(self.conv2(out)))
        out = torch.flatten(out, 1)
        out = self.relu3(self.fc1(out))
        out = self.relu4(self.fc2(out))
        return self.fc3(out)


def lenet5(*, in_channels: int, image_size: int, num_classes: int) -> LeNet5:
    """LeNet-5 for images of at least 4x4 pixels."""
    check_dims("lenet5", in_channels=in_channels, image_size=image_size, num_classes=num_classes, min_size=4)
    return LeNet5(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
