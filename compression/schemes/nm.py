"""``nm``: at most N non-zeros in every M consecutive input weights (N:M, e.g. 2:4)."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from compression.schemes.base import Scheme, register

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

    from compression.policy import LayerPolicy
    from compression.space import LayerFeatures, LayerSpace, SpaceOptions

__all__ = ["NM", "nm_mask"]

MAX_M = 64


def _to_input_last(w: torch.Tensor) -> torch.Tensor:
    """[O, I, kh, kw] -> [O, kh, kw, I]; [O, I] unchanged."""
    return w.permute(0, 2, 3, 1) if w.dim() == 4 else w


def _from_input_last(w: torch.Tensor) -> torch.Tensor:
    return w.permute(0, 3, 1, 2) if w.dim() == 4 else w


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N largest of every M consecutive weights along the input dimension.

    Runs are taken per output channel and kernel position; a trailing shorter run keeps at
    most N.
    """
    wl = _to_input_last(w.detach().abs())
    lead, i = wl.shape[:-1], wl.shape[-1]
    pad = (-i) % m
    padded = torch.nn.functional.pad(wl, (0, pad), value=-1.0)  # padding is never kept
    runs = padded.reshape(*lead, (i + pad) // m, m)
    top = runs.topk(min(n, m), dim=-1).indices
    keep = torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, top, True)
    keep = keep & (runs >= 0)
    keep = keep.reshape(*lead, i + pad)[..., :i]
    return _from_input_last(keep).contiguous()


def _key(nm: tuple[int, int]) -> str:
    return f"{nm[0]}:{nm[1]}"


@register
class NM(Scheme):
    """N:M along the input dimension; stored as non-zeros + ``ceil(log2 M)`` position bits each."""

    name = "nm"
    code = 2
    description = "at most N non-zeros in every M consecutive input weights (non-zeros + log2 M bits each)"
    fields = ("nm",)

    def validate(self, lp: LayerPolicy, layer: LayerSpace | None = None) -> str | None:
        if lp.nm is None:
            return "scheme 'nm' needs nm: [N, M], e.g. \"nm\": [2, 4]"
        n, m = lp.nm
        if not 1 <= n < m <= MAX_M:
            return f"nm needs 1 <= N < M <= {MAX_M}, got [{n}, {m}]; e.g. [2, 4]"
        if layer is not None:
            problem = self.layer_problem(layer.features)
            if problem is None and tuple(lp.nm) not in layer.nm_choices:
                allowed = [list(p) for p in layer.nm_choices]
                problem = f"nm [{n}, {m}] is not offered at this layer; use one of {allowed}"
            return problem
        return None

    def layer_problem(self, features: LayerFeatures) -> str | None:
        if features.op == "dwconv" or features.in_channels // features.groups < 2:
            return "N:M needs several input channels per group; use another scheme for this layer"
        return None

    def target_sparsity(self, lp: LayerPolicy) -> float:
        return 1.0 - lp.nm[0] / lp.nm[1] if lp.nm is not None else 0.0

    def space_fields(self, features: LayerFeatures, options: SpaceOptions) -> dict[str, Any]:
        per_group = features.in_channels // features.groups
        usable = features.op != "dwconv"
        return {"nm_choices": tuple(p for p in options.nm_choices if usable and per_group >= p[1])}

    def offered(self, layer: LayerSpace) -> bool:
        return bool(layer.nm_choices)

    def sample(self, rng: random.Random, layer: LayerSpace, options: SpaceOptions) -> dict[str, Any]:
        return {"nm": rng.choice(layer.nm_choices)}

    def from_keep(self, keep: float, layer: LayerSpace, options: SpaceOptions) -> dict[str, Any] | None:
        # Dense counts as density 1; pick the pattern whose kept fraction is nearest.
        patterns: list[tuple[int, int] | None] = [None, *layer.nm_choices]
        best = min(patterns, key=lambda p: abs((1.0 if p is None else p[0] / p[1]) - keep))
        return {"nm": best} if best is not None else None

    def probe(self, layer: LayerSpace, sparsity: float) -> dict[str, Any] | None:
        if not layer.nm_choices:
            return None
        nm = min(layer.nm_choices, key=lambda p: abs(p[0] / p[1] - (1.0 - sparsity)))
        return {"nm": list(nm)}

    def mask(self, weight: torch.Tensor, lp: LayerPolicy) -> torch.Tensor | None:
        return nm_mask(weight, *lp.nm) if lp.nm is not None else None

    def sparse_bytes(self, weight: torch.Tensor, mask: torch.Tensor, bits: int, lp: LayerPolicy) -> int:
        if lp.nm is None:
            return super().sparse_bytes(weight, mask, bits, lp)
        nnz = int(mask.sum())
        return math.ceil(nnz * bits / 8) + math.ceil(nnz * math.ceil(math.log2(lp.nm[1])) / 8)

    def optuna_distributions(self, layer: LayerSpace, options: SpaceOptions) -> dict[str, BaseDistribution]:
        from optuna.distributions import CategoricalDistribution

        if len(layer.nm_choices) < 2:
            return {}
        return {"nm": CategoricalDistribution([_key(p) for p in layer.nm_choices])}

    def from_optuna(self, params: Mapping[str, Any], layer: LayerSpace) -> dict[str, Any]:
        n, m = str(params.get("nm", _key(layer.nm_choices[0]))).split(":")
        return {"nm": (int(n), int(m))}

    def to_optuna(self, lp: LayerPolicy) -> dict[str, Any]:
        return {"nm": _key(lp.nm)} if lp.nm is not None else {}

    def encode_batch(self, raw: np.ndarray) -> np.ndarray:
        out = raw.copy()
        # sparsity: 1 - N / max(M, 1), as the predictors were trained (1.0 without a pattern)
        out[:, 1] = 1.0 - raw[:, 2] / np.maximum(raw[:, 3], 1.0)
        return out
