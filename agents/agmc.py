"""AGMC: DDPG whose state is a graph neural network's embedding of the layer in its model graph.

Nodes are the prunable layers with their normalised features, edges the data flow between
them (``space.edges``, both directions plus self loops). The GNN is part of the actor and of
the critic, so it is trained end to end by their losses; everything else is the DDPG agent.

:class:`DynaAGMCAgent` (the registry's ``agmc``) is the model-based version: the GCN runs
over the whole compute graph (layers plus the add, concat and block nodes joining them), so
branch structure reaches the policy, inside :class:`~agents.ddpg.dyna.DynaDDPGAgent`.
:class:`AGMCAgent` is the original model-free one, kept for comparison (``bench.search``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import GCNConv
from torch_geometric.utils import to_undirected

from agents.ddpg.agent import DDPGAgent, DDPGConfig
from agents.ddpg.dyna import DynaConfig, DynaDDPGAgent, LatencyFn
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


# --------------------------------------------------------------------------- model-based AGMC

#: Node kinds of the compute graph AGMC embeds: the prunable layers, then the ops that join
#: branches, read off the space: ``add`` (layers whose outputs meet in a residual add, a
#: multiply or a depthwise conv, i.e. a channel group of several layers), ``concat`` (a layer
#: reading channels from several producers) and ``block`` (a skippable residual block's add).
NODE_KINDS = ("layer", "add", "concat", "block")


def compute_graph(space: SearchSpace, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Node features and undirected edges of the whole compute graph, layer nodes first.

    Layer nodes carry their normalised features, op nodes zeros; every node a one-hot kind.
    A concat node sits between a layer and its producers (so branch structure reaches the
    layer through it); an add node links the members of one channel group; a block node
    links a skippable block's layers.
    """
    n = len(space.layers)
    index = {ls.name: i for i, ls in enumerate(space.layers)}
    kinds = [0] * n
    edges: list[tuple[int, int]] = []
    producers: dict[int, list[int]] = {}
    for src, dst in space.edges:
        producers.setdefault(dst, []).append(src)
    for dst, srcs in producers.items():
        if len({s for s in srcs}) > 1 or len(space.layers[dst].in_segments) > 1:
            node = len(kinds)
            kinds.append(NODE_KINDS.index("concat"))
            edges += [(s, node) for s in srcs] + [(node, dst)]
        else:
            edges += [(s, dst) for s in srcs]
    groups: dict[str, list[int]] = {}
    for i, ls in enumerate(space.layers):
        if ls.width_leader is not None:
            groups.setdefault(ls.width_leader, []).append(i)
    for members in groups.values():
        if len(members) > 1:
            node = len(kinds)
            kinds.append(NODE_KINDS.index("add"))
            edges += [(m, node) for m in members]
    for b in space.blocks:
        members = [index[m] for m in b.layers if m in index]
        if members:
            node = len(kinds)
            kinds.append(NODE_KINDS.index("block"))
            edges += [(m, node) for m in members]
    total = len(kinds)
    x = torch.zeros((total, features.shape[1] + len(NODE_KINDS)))
    x[:n, : features.shape[1]] = features
    x[torch.arange(total), features.shape[1] + torch.tensor(kinds)] = 1.0
    if not edges:
        return x, torch.zeros((2, 0), dtype=torch.long)
    e = torch.tensor(edges, dtype=torch.long).t().contiguous()
    return x, to_undirected(e, num_nodes=total)


def whole_graph_encoder(space: SearchSpace, features: torch.Tensor, dynamic_dim: int) -> nn.Module:
    """A GCN over :func:`compute_graph`; a layer's state is its node's embedding (trained with
    the actor and critic that hold it) plus the dynamic state."""
    x, edges = compute_graph(space, features)
    return GraphEncoder(x, edges, dynamic_dim, 32)


class DynaAGMCAgent(DynaDDPGAgent):
    """AGMC in the model-based agent: :class:`DynaDDPGAgent` with a whole-graph GCN state encoder."""

    name = "agmc"

    def __init__(
        self,
        space: SearchSpace,
        objective: Objective,
        seed: int = 0,
        *,
        config: DynaConfig | None = None,
        latency_fn: LatencyFn | None = None,
    ) -> None:
        super().__init__(
            space, objective, seed, config=config, latency_fn=latency_fn, encoder=whole_graph_encoder
        )
