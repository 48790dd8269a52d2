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

Bounded where it never trained: each encoded input is clipped to its training range widened by
``INPUT_MARGIN`` standard deviations (a feature constant in training is left unscaled), and a
kernel's log inverse efficiency to ±``LOG_EFFICIENCY_BOUND``. Size lives in ``work``, which
is not clipped, so a kernel larger than any seen still costs more; only its efficiency stops
where the training data stop, as ``KernelGBDT``'s trees do. Without the bounds a kernel
unlike the training ones (a ViT's attention on a CNN-only calibration, a feature that was
constant in training and scaled by 1e6) once scored 1e189 ms or overflowed ``exp``.

Uncertainty (``predict_uncertainty``): ``ensemble`` extra pairs of heads (4 by default) over the
trained, frozen graph layers, each fitted from its own random start on a bootstrap resample of
the models (multinomial weights), with the main model's loss. The members read the inputs
unclipped: where the main model holds a kernel's efficiency at the edge of the training range,
the members extrapolate apart, so their disagreement grows with how far outside the training
data a model lies (each member's log efficiency is bounded too, so the std stays finite); on
policies of a training architecture they agree. A whole second GNN per member would cost a
full fit each; the heads train on embeddings computed once, all four together: on 288 records
(idle 2-core machine) the fit took 25.6 s instead of 16.9 s, and ``predict_uncertainty`` of 500
ResNet-20 policies 0.12 s. The main model's training and its predictions are exactly as without
them.
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
#: Training standard deviations at or below this mark a constant feature (scaled by 1 instead).
_CONSTANT_STD = 1e-6
#: Encoded inputs are clipped to their training range widened by this many standard deviations.
INPUT_MARGIN = 1.0
#: Largest |log inverse efficiency| of a kernel or model row (e^12: 160,000 x either way).
LOG_EFFICIENCY_BOUND = 12.0


class _Net(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Linear(_N_IN, hidden)
        self.convs = nn.ModuleList([SAGEConv(hidden, hidden) for _ in range(3)])
        self.node_head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.model_head = nn.Sequential(nn.Linear(_N_IN, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def embed_nodes(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """What the node head reads: each kernel's own embedding beside its neighbourhood's."""
        h0 = torch.relu(self.embed(x))
        h = h0
        for conv in self.convs:
            h = torch.relu(conv(h, edge_index)) + h
        return torch.cat([h0, h], dim=1)

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, xm: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log inverse efficiency of each kernel node, and of each model row (bounded)."""
        node = self.node_head(self.embed_nodes(x, edge_index)).squeeze(-1)
        return _bound(node), _bound(self.model_head(xm).squeeze(-1))


def _bound(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(v, -LOG_EFFICIENCY_BOUND, LOG_EFFICIENCY_BOUND)


class _MLPs(nn.Module):
    """``k`` independent two-layer MLPs (in -> hidden -> 1) evaluated at once: (N, in) -> (k, N)."""

    def __init__(self, k: int, n_in: int, hidden: int, gen: torch.Generator | None = None) -> None:
        super().__init__()

        def draw(*shape: int, fan_in: int) -> nn.Parameter:  # nn.Linear's initial range
            lim = 1.0 / float(np.sqrt(fan_in))
            return nn.Parameter(torch.empty(*shape).uniform_(-lim, lim, generator=gen))

        self.w1 = draw(k, n_in, hidden, fan_in=n_in)
        self.b1 = draw(k, 1, hidden, fan_in=n_in)
        self.w2 = draw(k, hidden, fan_in=hidden)
        self.b2 = draw(k, 1, fan_in=hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.einsum("ni,kih->knh", x, self.w1) + self.b1)
        return torch.einsum("knh,kh->kn", h, self.w2) + self.b2


class _Heads(nn.Module):
    """The ensemble: ``k`` node heads and ``k`` model heads over the frozen graph layers."""

    def __init__(self, k: int, hidden: int, gen: torch.Generator | None = None) -> None:
        super().__init__()
        self.node = _MLPs(k, 2 * hidden, hidden, gen)
        self.model = _MLPs(k, _N_IN, hidden, gen)

    def forward(self, emb: torch.Tensor, xm: torch.Tensor) -> torch.Tensor:
        """Log inverse efficiency of every kernel row then every model row, per member: (k, rows)."""
        return _bound(torch.cat([self.node(emb), self.model(xm)], dim=1))


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
        ensemble: int = 4,
    ) -> None:
        super().__init__(target, seed)
        if ensemble < 0:
            raise ValueError(f"ensemble must be >= 0 (heads besides the main model), got {ensemble}")
        self.hidden = hidden
        self.epochs = epochs
        self.profile_weight = profile_weight
        self.ensemble = ensemble
        self.net = _Net(hidden)
        #: the ensemble's heads (``predict_uncertainty``); None when loaded from an older save
        self.heads: _Heads | None = None
        self.stats: dict[str, list[float]] = {}
        self.f0 = 0.0

    # -- tensors
    def _norm(self, x: np.ndarray, clip: bool = True) -> torch.Tensor:
        std = np.asarray(self.stats["std"])
        # a feature constant in training: unscaled (a 1e-6 scale turned any new value into 1e6)
        z = (_encode(x) - np.asarray(self.stats["mean"])) / np.where(std <= _CONSTANT_STD, 1.0, std)
        if clip and "lo" in self.stats:  # fits before the range was kept are not clipped
            z = np.clip(
                z, np.asarray(self.stats["lo"]) - INPUT_MARGIN, np.asarray(self.stats["hi"]) + INPUT_MARGIN
            )
        return torch.from_numpy(z.astype(np.float32))

    def _forward(self, parts: list[tuple[_Batch, int]]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Log costs of the rows of ``parts`` (batch, owner offset): all kernel rows, then all
        model rows; returns (log cost, owner, kind)."""
        x, edge_index, xm, logw, owner, kind = self._inputs(parts)
        node_log, model_log = self.net(x, edge_index, xm)
        return torch.cat([node_log, model_log]) + logw + self.f0, owner, kind

    def _inputs(
        self, parts: list[tuple[_Batch, int]], clip: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
        """Network inputs of ``parts``: kernel rows, edges, model rows, log work (kernel rows
        then model rows), owner and kind of each row; ``clip``: inputs held to the training range."""
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
        logw = torch.from_numpy(np.log(np.concatenate([np.concatenate(works), wm])).astype(np.float32))
        owner = np.concatenate([np.concatenate(owners), om])
        kind = np.concatenate([np.concatenate(kinds), np.full(len(om), 2)])
        return (
            self._norm(np.concatenate(xs), clip),
            torch.from_numpy(np.concatenate(edges, axis=1)),
            self._norm(xm, clip),
            logw,
            owner,
            kind,
        )

    # -- fitting
    def _fit(self, records: Sequence[LatencyRecord], y: np.ndarray) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small graphs: extra threads only add contention on a shared CPU
        try:
            # A refit can run inside a caller's no_grad (a search scores under it): training needs grad.
            with torch.enable_grad():
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
        mean, std = enc.mean(0), enc.std(0)
        z = (enc - mean) / np.where(std <= _CONSTANT_STD, 1.0, std)
        self.stats = {
            "mean": mean.tolist(),
            "std": np.maximum(std, _CONSTANT_STD).tolist(),
            "lo": z.min(0).tolist(),
            "hi": z.max(0).tolist(),
        }
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
        self.heads = self._train_heads(parts, owner_t, logy, w_row, t_row) if self.ensemble else None

    def _train_heads(
        self,
        parts: list[tuple[_Batch, int]],
        owner: torch.Tensor,
        logy: torch.Tensor,
        w_row: torch.Tensor,
        t_row: torch.Tensor,
    ) -> _Heads:
        """The ensemble's heads on the frozen graph layers' embeddings (computed once), each
        on multinomial bootstrap weights of the models, with the main model's loss."""
        n_models = len(logy)
        gen = torch.Generator().manual_seed(self.seed + 1000)
        heads = _Heads(self.ensemble, self.hidden, gen)  # fresh starts from the ensemble's generator
        draws = torch.randint(0, n_models, (self.ensemble, n_models), generator=gen)
        weights = torch.zeros(self.ensemble, n_models).scatter_add_(
            1, draws, torch.ones(self.ensemble, n_models)
        )
        x, edge_index, xm, logw, _, _ = self._inputs(parts)
        with torch.no_grad():
            emb = self.net.embed_nodes(x, edge_index)
        opt = torch.optim.AdamW(heads.parameters(), lr=3e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.epochs)
        w_rows = weights[:, owner] * w_row  # a resampled model brings its rows' profile targets
        for _ in range(self.epochs):
            opt.zero_grad()
            log_cost = heads(emb, xm) + logw + self.f0
            total = torch.zeros(self.ensemble, n_models).index_add_(1, owner, torch.exp(log_cost))
            loss = (weights * (torch.log(total) - logy) ** 2).sum() / n_models
            loss = loss + (w_rows * (log_cost - t_row) ** 2).sum() / n_models
            loss.backward()
            opt.step()
            sched.step()
        return heads.eval()

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

    def _predict_members(self, space: SearchSpace, policies: Sequence[Policy]) -> np.ndarray | None:
        if self.heads is None:
            return None
        out = []
        with torch.inference_mode():
            for start in range(0, len(policies), 4096):
                chunk = policies[start : start + 4096]
                # unclipped: past the training range the members extrapolate apart (see the module doc)
                x, edge_index, xm, logw, owner, _ = self._inputs([(_Batch(space, chunk), 0)], clip=False)
                log_cost = (self.heads(self.net.embed_nodes(x, edge_index), xm) + logw + self.f0).double()
                own = torch.from_numpy(owner)
                out.append(
                    torch.zeros(len(log_cost), len(chunk), dtype=torch.float64)
                    .index_add_(1, own, torch.exp(log_cost))
                    .numpy()
                )
        return np.concatenate(out, axis=1)

    def _has_members(self) -> bool:
        return self.heads is not None

    # -- persistence
    def _state(self, directory: Path) -> dict[str, Any]:
        save_file(
            {k: v.contiguous() for k, v in self.net.state_dict().items()}, str(directory / "gnn.safetensors")
        )
        if self.heads is not None:
            save_file(
                {k: v.detach().contiguous() for k, v in self.heads.state_dict().items()},
                str(directory / "gnn_heads.safetensors"),
            )
        return {
            "format": 2,
            "hidden": self.hidden,
            "epochs": self.epochs,
            "profile_weight": self.profile_weight,
            "stats": self.stats,
            "f0": self.f0,
            # optional in format 2: a save without heads loads without an ensemble
            "ensemble": self.ensemble if self.heads is not None else 0,
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
        self.ensemble = int(state.get("ensemble", 0))
        self.heads = None
        if self.ensemble:
            self.heads = _Heads(self.ensemble, self.hidden)
            self.heads.load_state_dict(load_file(str(directory / "gnn_heads.safetensors")))
            self.heads.eval()
