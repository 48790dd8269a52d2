"""A tiny trained CNN on digits (a few seconds) and its .pt2 / .npz files, shared by the search tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from compression import CompressibleModel, from_module, save_pt2
from compression.data import Dataset, load_dataset, save_npz


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="session")
def tiny_net(digits: Dataset) -> nn.Module:
    torch.manual_seed(0)
    net = TinyCNN()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    x, y = torch.from_numpy(digits.x_train), torch.from_numpy(digits.y_train)
    for _ in range(8):
        for i in range(0, len(x), 64):
            loss = nn.functional.cross_entropy(net(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="session")
def tiny_model(tiny_net: nn.Module, digits: Dataset) -> CompressibleModel:
    return from_module(tiny_net, torch.from_numpy(digits.x_val[:2]), name="tiny")


@pytest.fixture(scope="session")
def tiny_files(
    tiny_net: nn.Module, digits: Dataset, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    pt2 = save_pt2(tiny_net, torch.from_numpy(digits.x_val[:2]), root / "tiny.pt2")
    npz = save_npz(digits, root / "digits.npz")
    return pt2, npz
