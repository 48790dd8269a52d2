"""AGMC: DDPG whose state is a graph neural network's embedding of the layer in its model graph.

Nodes are the prunable layers with their normalised features, edges the data flow between
them (``space.edges``, both directions plus self loops). The GNN is part of the actor and of
the critic, so it is trained end to end by their losses; everything else is the DDPG agent.
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import GCNConv
from torch_geometric.utils import to_undirected

from agents.ddpg.agent import DDPGAgent, DDPGConfig
from agents.ddpg.env import CostFn
from agents.objective import Objective
from compression.space import SearchSpace


class GraphEncoder(nn.Module):
    """Two GCN layers over the layer graph; the state is the node embedding plus the dynamic state."""

    def __init__(
        self, features: torch.Tensor, edges: torch.Tensor, dynamic_dim: int, hidden: int = 32
    ) -> None:
        super().__init__()
        self.register_buffer("features", features.float())
        self.register_buffer("edge_index", edges)
        self.conv1 = GCNConv(features.shape[1], hidden, cached=True)  # the graph never changes
        self.conv2 = GCNConv(hidden, hidden, cached=True)
        self.out_dim = hidden + dynamic_dim

    def embed(self) -> torch.Tensor:
        """One embedding per layer (recomputed each call: the weights change as it trains)."""
        h = torch.relu(self.conv1(self.features, self.edge_index))
        return self.conv2(h, self.edge_index)

    def forward(self, layer: torch.Tensor, dynamic: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.embed()[layer], dynamic], dim=1)


def _edge_index(space: SearchSpace) -> torch.Tensor:
    if not space.edges:
        return torch.zeros((2, 0), dtype=torch.long)
    e = torch.tensor(space.edges, dtype=torch.long).t().contiguous()
    return to_undirected(e, num_nodes=len(space.layers))


class AGMCAgent(DDPGAgent):
    """DDPG (see :class:`DDPGAgent`) with a GCN state encoder trained end to end."""

    name = "agmc"

    def __init__(
        self,
        space: SearchSpace,
        objective: Objective,
        seed: int = 0,
        *,
        config: DDPGConfig | None = None,
        cost_fn: CostFn | None = None,
        budget: float | None = None,
        gnn_hidden: int = 32,
    ) -> None:
        edges = _edge_index(space)

        def encoder(space: SearchSpace, features: torch.Tensor, dynamic_dim: int) -> nn.Module:
            return GraphEncoder(features, edges, dynamic_dim, gnn_hidden)

        super().__init__(
            space, objective, seed, config=config, cost_fn=cost_fn, budget=budget, encoder=encoder
        )
