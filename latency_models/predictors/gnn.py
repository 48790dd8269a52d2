"""Graph-level predictor: a GNN (torch-geometric) over the layer graph of the compressed model.

Nodes are the kernels present after the policy (``latency_models.rows``: shape after channel
pruning, memory traffic, NCHWc layout flags, int8 ...), edges the space's layer graph
(``space.edges``: layers connected through the non-prunable ops between them), undirected with
self loops. Three GraphSAGE layers give every kernel a view of its neighbourhood (what feeds
it, what it feeds: the layout reorders, adds and quantize nodes around it); a head turns each
node's embedding into that kernel's log inverse efficiency, and the model's latency is the sum
of ``exp(head) · work`` over its kernels plus a model-level term (an MLP of the model row's
features). Summing per-kernel costs, rather than pooling into one number, keeps the inductive
bias that lets a predictor trained on small models price larger ones.

Training minimises the squared log error of the model totals and, where the measurement
carries a profile (``latency_models.profiling``), of each kernel's profiled share of the
model (weighted by that share), exactly as ``KernelGBDT`` does. Weights are stored as
safetensors, the rest as JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch_geometric.nn import SAGEConv

from compression.policy import Policy
from compression.space import SearchSpace
from latency_models.predictors.base import LatencyRecord, Predictor, register
from latency_models.predictors.kernel_gbdt import _Item, _training_targets
from latency_models.rows import ROW_FEATURES, ROW_TYPES, row_index

__all__ = ["GraphGNN"]

_TYPE = ROW_FEATURES.index("type")
_NUMERIC = [i for i, n in enumerate(ROW_FEATURES) if n != "type"]
_N_IN = len(_NUMERIC) + len(ROW_TYPES)


class _Net(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Linear(_N_IN, hidden)
        self.convs = nn.ModuleList([SAGEConv(hidden, hidden) for _ in range(3)])
        self.node_head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.model_head = nn.Sequential(nn.Linear(_N_IN, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, xm: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log inverse efficiency of each kernel node, and of each model row."""
        h0 = torch.relu(self.embed(x))
        h = h0
        for conv in self.convs:
            h = torch.relu(conv(h, edge_index)) + h
        return self.node_head(torch.cat([h0, h], dim=1)).squeeze(-1), self.model_head(xm).squeeze(-1)


def _encode(x: np.ndarray) -> np.ndarray:
    """log1p of the numeric row features plus a one-hot row type."""
    out = np.zeros((len(x), _N_IN))
    out[:, : len(_NUMERIC)] = np.log1p(np.maximum(x[:, _NUMERIC], 0.0))
    out[np.arange(len(x)), len(_NUMERIC) + x[:, _TYPE].astype(np.int64)] = 1.0
    return out


class _Batch:
    """Node and model rows of P policies of one space, with the graph's edges."""

    def __init__(self, space: SearchSpace, policies: Sequence[Policy]) -> None:
        idx = row_index(space)
        pa = idx.arrays(policies)
        keys, owner, kind = idx.keys(pa)
        x, work = idx.features(keys)
        k = kind == 0
        self.owner = owner
        self.kind = kind
        self.x, self.work = x, work
        self.n_kernels = int(k.sum())
        # node number of every present layer of every policy (rows are policy-major, layers in order)
        table = np.full(pa.present.shape, -1, dtype=np.int64)
        pp, ll = np.nonzero(pa.present)
        table[pp, ll] = np.arange(len(pp))
        e = np.asarray(space.edges, dtype=np.int64).reshape(-1, 2)
        src, dst = table[:, e[:, 0]].ravel(), table[:, e[:, 1]].ravel()
        ok = (src >= 0) & (dst >= 0)
        src, dst = src[ok], dst[ok]
        loops = np.arange(len(pp))
        self.edge_index = np.stack([np.concatenate([src, dst, loops]), np.concatenate([dst, src, loops])])


@register
class GraphGNN(Predictor):
    """GraphSAGE over the kernel graph; the model's latency is a sum of per-kernel costs."""

    kind = "gnn"

    def __init__(
        self,
        target: Any = "ms",
        seed: int = 0,
        hidden: int = 64,
        epochs: int = 400,
        profile_weight: float = 1.0,
    ) -> None:
        super().__init__(target, seed)
        self.hidden = hidden
        self.epochs = epochs
        self.profile_weight = profile_weight
        self.net = _Net(hidden)
        self.stats: dict[str, list[float]] = {}
        self.f0 = 0.0

    # -- tensors
    def _norm(self, x: np.ndarray) -> torch.Tensor:
        z = (_encode(x) - np.asarray(self.stats["mean"])) / np.asarray(self.stats["std"])
        return torch.from_numpy(z.astype(np.float32))

    def _forward(self, parts: list[tuple[_Batch, int]]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Log costs of the rows of ``parts`` (batch, owner offset): all kernel rows, then all
        model rows; returns (log cost, owner, kind)."""
        xs, edges, owners, kinds, works = [], [], [], [], []
        offset = 0
        for b, own_off in parts:
            k = b.kind == 0
            xs.append(b.x[k])
            edges.append(b.edge_index + offset)
            offset += b.n_kernels
            owners.append(b.owner[k] + own_off)
            works.append(b.work[k])
            kinds.append(np.zeros(int(k.sum()), dtype=np.int64))
        xm = np.concatenate([b.x[b.kind != 0] for b, _ in parts])
        om = np.concatenate([b.owner[b.kind != 0] + off for b, off in parts])
        wm = np.concatenate([b.work[b.kind != 0] for b, _ in parts])
        node_log, model_log = self.net(
            self._norm(np.concatenate(xs)), torch.from_numpy(np.concatenate(edges, axis=1)), self._norm(xm)
        )
        logw = torch.from_numpy(np.log(np.concatenate([np.concatenate(works), wm])).astype(np.float32))
        log_cost = torch.cat([node_log, model_log]) + logw + self.f0
        owner = np.concatenate([np.concatenate(owners), om])
        kind = np.concatenate([np.concatenate(kinds), np.full(len(om), 2)])
        return log_cost, owner, kind

    # -- fitting
    def _fit(self, records: Sequence[LatencyRecord], y: np.ndarray) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small graphs: extra threads only add contention on a shared CPU
        try:
            self._train(*_training_targets(records, y, self.target))
        finally:
            torch.set_num_threads(threads)

    def _train(self, items: list[_Item], y: np.ndarray) -> None:
        torch.manual_seed(self.seed)
        groups: dict[int, tuple[SearchSpace, list[int]]] = {}
        for i, it in enumerate(items):
            groups.setdefault(id(it.space), (it.space, []))[1].append(i)
        parts: list[tuple[_Batch, int]] = []
        order: list[int] = []
        share_k: list[np.ndarray] = []
        share_m: list[np.ndarray] = []
        for space, ix in groups.values():
            b = _Batch(space, [items[i].policy for i in ix])
            parts.append((b, len(order)))
            order.extend(ix)
            sh_k = np.full(b.n_kernels, np.nan)
            sh_m = np.full(len(ix), np.nan)
            for j, i in enumerate(ix):
                s_i = items[i].shares
                mine = np.flatnonzero(b.owner == j)  # its kernel rows, then its model row
                if s_i is not None and len(s_i) == len(mine):
                    sh_k[mine[:-1]] = s_i[:-1]
                    sh_m[j] = s_i[-1]
            share_k.append(sh_k)
            share_m.append(sh_m)
        enc = _encode(np.concatenate([b.x for b, _ in parts]))
        self.stats = {"mean": enc.mean(0).tolist(), "std": np.maximum(enc.std(0), 1e-6).tolist()}
        y_ord = y[np.asarray(order)]
        n_models = len(y_ord)
        self.f0 = 0.0
        self.net = _Net(self.hidden)
        with torch.no_grad():
            log_cost, owner, _ = self._forward(parts)
        tot = np.bincount(owner, weights=np.exp(log_cost.numpy()), minlength=n_models)
        self.f0 = float(np.median(np.log(y_ord) - np.log(tot)))
        share = np.concatenate(share_k + share_m)  # the order ``_forward`` emits rows in
        known = np.isfinite(share) & (share > 0)
        target_row = np.zeros(len(share))
        target_row[known] = np.log(share[known] * y_ord[owner[known]])
        w_row = torch.from_numpy(
            (np.where(known, np.nan_to_num(share), 0.0) * self.profile_weight).astype(np.float32)
        )
        t_row = torch.from_numpy(target_row.astype(np.float32))
        owner_t = torch.from_numpy(owner)
        logy = torch.from_numpy(np.log(y_ord).astype(np.float32))
        opt = torch.optim.AdamW(self.net.parameters(), lr=3e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.epochs)
        self.net.train()
        for _ in range(self.epochs):
            opt.zero_grad()
            log_cost, _, _ = self._forward(parts)
            total = torch.zeros(n_models).index_add_(0, owner_t, torch.exp(log_cost))
            loss = ((torch.log(total) - logy) ** 2).mean()
            loss = loss + (w_row * (log_cost - t_row) ** 2).sum() / n_models
            loss.backward()
            opt.step()
            sched.step()
        self.net.eval()

    # -- prediction
    def _predict(self, space: SearchSpace, policies: Sequence[Policy]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(policies), 4096):
                chunk = policies[start : start + 4096]
                b = _Batch(space, chunk)
                log_cost, owner, _ = self._forward([(b, 0)])
                out.append(
                    np.bincount(owner, weights=np.exp(log_cost.double().numpy()), minlength=len(chunk))
                )
        return np.concatenate(out)

    # -- persistence
    def _state(self, directory: Path) -> dict[str, Any]:
        save_file(
            {k: v.contiguous() for k, v in self.net.state_dict().items()}, str(directory / "gnn.safetensors")
        )
        return {
            "format": 2,
            "hidden": self.hidden,
            "epochs": self.epochs,
            "profile_weight": self.profile_weight,
            "stats": self.stats,
            "f0": self.f0,
        }

    def _restore(self, state: dict[str, Any], directory: Path) -> None:
        if int(state.get("format", 1)) != 2:
            raise ValueError(
                f"{directory}: gnn format {state.get('format', 1)} is no longer supported; refit"
            )
        self.hidden = int(state["hidden"])
        self.epochs = int(state["epochs"])
        self.profile_weight = float(state.get("profile_weight", 1.0))
        self.stats = {k: list(v) for k, v in state["stats"].items()}
        self.f0 = float(state["f0"])
        self.net = _Net(self.hidden)
        self.net.load_state_dict(load_file(str(directory / "gnn.safetensors")))
        self.net.eval()
