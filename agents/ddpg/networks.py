"""Actor and critic, each an encoder of the step state followed by a small MLP.

The encoder turns (layer index, dynamic state) into the state vector. DDPG's encoder looks up
the layer's static features; AGMC's runs a graph neural network over the whole model and
looks up the layer's node embedding, so the GNN is trained end to end through the actor
and critic losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn


class StateEncoder(Protocol):
    """(layer index [B], dynamic state [B, D]) -> state [B, out_dim]; may hold trainable weights."""

    out_dim: int

    def __call__(self, layer: torch.Tensor, dynamic: torch.Tensor) -> torch.Tensor: ...


class FeatureEncoder(nn.Module):
    """AMC's state: the layer's static features next to the dynamic state (nothing trained)."""

    def __init__(self, features: torch.Tensor, dynamic_dim: int) -> None:
        super().__init__()
        self.features: torch.Tensor
        self.register_buffer("features", features.float())
        self.out_dim = features.shape[1] + dynamic_dim

    def forward(self, layer: torch.Tensor, dynamic: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.features[layer], dynamic], dim=1)


def _mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out)
    )


class Actor(nn.Module):
    """Deterministic policy: state -> action in [0, 1]^A."""

    def __init__(self, encoder: nn.Module, action_dim: int, hidden: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.net = _mlp(int(encoder.out_dim), hidden, action_dim)  # type: ignore[arg-type]

    def start_at(self, action: Sequence[float]) -> None:
        """Make the untrained actor output about ``action`` everywhere (small last-layer weights)."""
        last = self.net[-1]
        assert isinstance(last, nn.Linear)
        a = torch.tensor(action, dtype=torch.float32).clamp(0.01, 0.99)
        with torch.no_grad():
            last.weight.mul_(0.1)
            last.bias.copy_(torch.log(a / (1.0 - a)))

    def forward(self, layer: torch.Tensor, dynamic: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(self.encoder(layer, dynamic)))


class Critic(nn.Module):
    """Q(state, action)."""

    def __init__(self, encoder: nn.Module, action_dim: int, hidden: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.net = _mlp(int(encoder.out_dim) + action_dim, hidden, 1)  # type: ignore[arg-type]

    def forward(self, layer: torch.Tensor, dynamic: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([self.encoder(layer, dynamic), action], dim=1)).squeeze(1)
