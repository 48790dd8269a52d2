"""Graph-level predictor: a small GNN (torch-geometric) over the layer graph of the space.

Nodes are the prunable layers (``space.edges`` connect them through the non-prunable ops
between); node features are the kernel features of ``latency_models.features`` (log-scaled,
standardised), zero for layers of skipped blocks, so every policy of one space shares one
graph. Three GraphSAGE layers, sum- and mean-pooling, concatenated with the per-model
features, then an MLP that predicts log latency. Learning the whole model at once lets it
see interactions a sum of kernels misses (cache effects between neighbouring layers), at the
price of needing more data. Weights are stored as safetensors, the rest as JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch_geometric.nn import SAGEConv, global_add_pool, global_mean_pool

from compression.policy import Policy
from compression.space import SearchSpace
from latency_models.features import KERNEL_FEATURES, MODEL_FEATURES, KernelBatch, kernel_features
from latency_models.predictors.base import LatencyRecord, Predictor, record_features, register

__all__ = ["GraphGNN"]

_NODE = len(KERNEL_FEATURES) + 1  # + present flag
_MODEL = len(MODEL_FEATURES)


class _Net(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([SAGEConv(_NODE if i == 0 else hidden, hidden) for i in range(3)])
        self.head = nn.Sequential(
            nn.Linear(2 * hidden + _MODEL, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, batch: torch.Tensor, model: torch.Tensor
    ) -> torch.Tensor:
        h = x
        for conv in self.convs:
            h = torch.relu(conv(h, edge_index))
        size = model.shape[0]
        pooled = torch.cat(
            [global_add_pool(h, batch, size) / 10.0, global_mean_pool(h, batch, size), model], dim=1
        )
        return self.head(pooled).squeeze(-1)


def _node_raw(kb: KernelBatch) -> np.ndarray:
    x = np.log1p(np.maximum(kb.x, 0.0))
    return np.concatenate([x, kb.present[:, :, None].astype(np.float64)], axis=2)


def _edges(space: SearchSpace) -> np.ndarray:
    e = np.asarray(space.edges, dtype=np.int64).reshape(-1, 2).T
    n = len(space.layers)
    loops = np.stack([np.arange(n), np.arange(n)])
    return np.concatenate([e, e[::-1], loops], axis=1)  # undirected + self loops


@register
class GraphGNN(Predictor):
    """GraphSAGE over the layer graph, predicting log latency of the whole model."""

    kind = "gnn"

    def __init__(self, target: Any = "ms", seed: int = 0, hidden: int = 64, epochs: int = 150) -> None:
        super().__init__(target, seed)
        self.hidden = hidden
        self.epochs = epochs
        self.net = _Net(hidden)
        self.stats: dict[str, list[float]] = {}
        self.y_mean = 0.0

    def _tensors(
        self, space: SearchSpace, kb: KernelBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        n_pol, n_layers = kb.present.shape
        node = (_node_raw(kb).reshape(-1, _NODE) - self._mu) / self._sd
        model = (np.log1p(kb.model) - self._mmu) / self._msd
        e = _edges(space)
        offsets = (np.arange(n_pol) * n_layers)[:, None, None]
        edge_index = (e[None, :, :] + offsets).transpose(1, 0, 2).reshape(2, -1)
        batch = np.repeat(np.arange(n_pol), n_layers)
        return (
            torch.from_numpy(node.astype(np.float32)),
            torch.from_numpy(edge_index),
            torch.from_numpy(batch),
            torch.from_numpy(model.astype(np.float32)),
        )

    @property
    def _mu(self) -> np.ndarray:
        return np.asarray(self.stats["node_mean"])

    @property
    def _sd(self) -> np.ndarray:
        return np.asarray(self.stats["node_std"])

    @property
    def _mmu(self) -> np.ndarray:
        return np.asarray(self.stats["model_mean"])

    @property
    def _msd(self) -> np.ndarray:
        return np.asarray(self.stats["model_std"])

    def _fit(self, records: Sequence[LatencyRecord], y: np.ndarray) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny graphs: extra threads only add contention on a shared CPU
        try:
            self._train(records, y)
        finally:
            torch.set_num_threads(threads)

    def _train(self, records: Sequence[LatencyRecord], y: np.ndarray) -> None:
        torch.manual_seed(self.seed)
        feats = record_features(records)
        nodes = np.concatenate([_node_raw(kb).reshape(-1, _NODE) for _, kb in feats])
        models = np.concatenate([np.log1p(kb.model) for _, kb in feats])
        self.stats = {
            "node_mean": nodes.mean(0).tolist(),
            "node_std": np.maximum(nodes.std(0), 1e-6).tolist(),
            "model_mean": models.mean(0).tolist(),
            "model_std": np.maximum(models.std(0), 1e-6).tolist(),
        }
        spaces = {id(records[ix[0]].space): records[ix[0]].space for ix, _ in feats}
        parts = [self._tensors(spaces[id(records[ix[0]].space)], kb) for ix, kb in feats]
        # One graph batch of every record: one forward pass per epoch.
        node_off = np.cumsum([0] + [p[0].shape[0] for p in parts])
        graph_off = np.cumsum([0] + [p[3].shape[0] for p in parts])
        x = torch.cat([p[0] for p in parts])
        edge_index = torch.cat([p[1] + int(node_off[i]) for i, p in enumerate(parts)], dim=1)
        batch = torch.cat([p[2] + int(graph_off[i]) for i, p in enumerate(parts)])
        model = torch.cat([p[3] for p in parts])
        order = np.concatenate([ix for ix, _ in feats])
        target = torch.from_numpy(np.log(y[order]).astype(np.float32))
        self.y_mean = float(np.log(y).mean())
        self.net = _Net(self.hidden)
        opt = torch.optim.AdamW(self.net.parameters(), lr=3e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.epochs)
        self.net.train()
        for _ in range(self.epochs):
            opt.zero_grad()
            loss = ((self.net(x, edge_index, batch, model) + self.y_mean - target) ** 2).mean()
            loss.backward()
            opt.step()
            sched.step()
        self.net.eval()

    def _predict(self, space: SearchSpace, policies: Sequence[Policy]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(policies), 2048):
                kb = kernel_features(space, policies[start : start + 2048])
                out.append(self.net(*self._tensors(space, kb)).double().numpy() + self.y_mean)
        return np.exp(np.concatenate(out))

    def _state(self, directory: Path) -> dict[str, Any]:
        save_file(
            {k: v.contiguous() for k, v in self.net.state_dict().items()}, str(directory / "gnn.safetensors")
        )
        return {"hidden": self.hidden, "epochs": self.epochs, "stats": self.stats, "y_mean": self.y_mean}

    def _restore(self, state: dict[str, Any], directory: Path) -> None:
        self.hidden = int(state["hidden"])
        self.epochs = int(state["epochs"])
        self.stats = {k: list(v) for k, v in state["stats"].items()}
        self.y_mean = float(state["y_mean"])
        self.net = _Net(self.hidden)
        self.net.load_state_dict(load_file(str(directory / "gnn.safetensors")))
        self.net.eval()
