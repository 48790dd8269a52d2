"""``pattern``: pattern-based sparsity of 3×3 convolutions (PatDNN), with connectivity pruning.

Every kept 3×3 kernel keeps exactly 4 of its 9 weights, in one of at most K patterns chosen
per layer from the weights (``"patterns": K``, 1–8); ``"sparsity"`` is the *connectivity*
share: that fraction of the layer's kernels (one input channel of one output channel) is
removed whole. The layer's zeroed fraction is therefore ``1 − (1 − sparsity) · 4/9`` (at least
5/9). Choices the issue leaves open:

* **Saliency.** The mask is computed from whatever tensor it is handed: the weight
  (``apply_policy``: magnitude) or the OBS saliency ``|w| / U_jj`` (``compression.obc``, which
  then also updates the kept weights). What dropping a set of weights costs is the sum of
  their squared saliencies (OBS's loss of pruning them, weight by weight).
* **Connectivity first.** The ``round(sparsity · kernels)`` kernels with the smallest sum of
  squared saliency are removed; the library is then chosen on the kernels that stay.
* **Library.** Greedy facility location over the C(9, 4) = 126 patterns: each step adds the
  pattern that most lowers the kernels' summed cost under their best pattern so far (greedy
  is within 1 − 1/e of the best library; PatDNN's "K most frequent top-4 patterns" counts only
  each kernel's first choice). It stops early when no pattern lowers the cost, so a layer may
  use fewer than K patterns.
* **Assignment.** Each kept kernel takes the library pattern that drops the least.

Costs are *dropped* squared saliency, never kept saliency, so a weight that
``compression.obc`` has locked as kept (saliency 1e30, capped at 1e15 before squaring to stay
finite in float32) outweighs any other choice while the free weights still rank exactly
among the patterns that keep it; a locked-pruned weight (saliency 0) costs nothing to drop.
The cost matrix (kernels × 126 patterns, float32) is computed once per mask: 130 MB for a
512×512 conv.

Stored as the kept weights at ``bits``, ``ceil(log2 K)`` bits of pattern index per kept kernel,
1 connectivity bit per kernel and the library itself (9 bits per pattern). Offered at every
conv layer whose kernel is 3 high (dense, grouped or depthwise; the layer features carry the
height only): a weight that is not ``[O, I, 3, 3]`` is left dense, as is any layer a policy's
default reaches that cannot take the scheme. ONNX Runtime runs it as a dense convolution with
zeros (no pattern kernels): the capability probe of a device calibration measures whether a
device gains anything from it.
"""

from __future__ import annotations

import functools
import itertools
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

__all__ = ["KEPT", "MAX_PATTERNS", "SEARCH_PATTERNS", "TAPS", "Pattern", "pattern_library", "pattern_mask"]

#: Weights of a 3×3 kernel, and how many of them a pattern keeps.
TAPS, KEPT = 9, 4
#: Largest library a policy may ask for.
MAX_PATTERNS = 8
#: Library sizes a search draws from (the issue's two). On a runtime without pattern kernels
#: fewer patterns only cost accuracy (K = 8 stores 1 bit more per kept kernel than K = 4).
SEARCH_PATTERNS: tuple[int, ...] = (4, 8)
#: Saliency is capped here before squaring, so squares stay finite in float32 (1e30): a weight
#: ``compression.obc`` locks as kept (saliency 1e30) still outweighs any real one.
_CAP = 1e15
_MAX_CONNECTIVITY = 0.95  # LayerPolicy's MAX_SPARSITY


@functools.cache
def _dropped_taps() -> torch.Tensor:
    """(9, 126) float32: column p is 1 where the p-th 4-of-9 pattern drops a tap."""
    return (~_candidates()).to(torch.float32).T.contiguous()


@functools.cache
def _candidates() -> torch.Tensor:
    """Every 4-of-9 pattern, (126, 9) bool, in ``itertools.combinations`` order."""
    rows = [[t in c for t in range(TAPS)] for c in itertools.combinations(range(TAPS), KEPT)]
    return torch.tensor(rows, dtype=torch.bool)


def pattern_library(cost: torch.Tensor, k: int) -> list[int]:
    """Indices into the 126 patterns of a library of at most ``k``, chosen greedily for kernels
    whose cost (squared saliency dropped) under every pattern is ``cost`` (n, 126)."""
    best = torch.full((cost.shape[0],), float("inf"))  # no pattern yet
    gap = torch.empty_like(cost)
    chosen: list[int] = []
    for _ in range(k):
        if chosen:
            gain = torch.sub(best[:, None], cost, out=gap).clamp_(min=0.0).sum(dim=0)
            gain[chosen] = -1.0
        else:
            gain = -cost.sum(dim=0)  # the first pattern: least total cost
        j = int(torch.argmax(gain))
        if chosen and float(gain[j]) <= 0.0:
            break  # no pattern lowers the cost: a smaller library loses nothing
        chosen.append(j)
        best = torch.minimum(best, cost[:, j])
    return chosen


def pattern_mask(w: torch.Tensor, k: int, sparsity: float) -> torch.Tensor:
    """Keep 4 of 9 weights of every kernel of ``w`` ``[O, I, 3, 3]`` in one of at most ``k``
    patterns, after removing ``round(sparsity · O·I)`` whole kernels (``w``: the weight or a
    saliency of its shape)."""
    if w.dim() != 4 or tuple(w.shape[2:]) != (3, 3):
        raise ValueError(f"pattern sparsity needs a [O, I, 3, 3] conv weight, got {tuple(w.shape)}")
    n = w.shape[0] * w.shape[1]
    sq = w.detach().to(torch.float32).abs().clamp(max=_CAP).reshape(n, TAPS) ** 2
    kept = torch.ones(n, dtype=torch.bool)
    removed = round(sparsity * n)
    if removed > 0:
        kept[torch.argsort(sq.sum(dim=1), stable=True)[:removed]] = False
    mask = torch.zeros(n, TAPS, dtype=torch.bool)
    if bool(kept.any()):
        cost = sq[kept] @ _dropped_taps()
        library = pattern_library(cost, k)
        pick = torch.argmin(cost[:, library], dim=1)
        mask[kept] = _candidates()[library][pick]
    return mask.reshape(w.shape)


def _max_connectivity(options: SpaceOptions) -> float:
    """Largest connectivity share whose total zeroed fraction stays within ``max_sparsity``
    (0 when even the 5/9 of the patterns alone exceed it: as N:M, the patterns always zero)."""
    return round(max(0.0, 1.0 - (1.0 - options.max_sparsity) * TAPS / KEPT), 3)


def _connectivity(zeroed: float) -> float:
    """The connectivity share whose total zeroed fraction is ``zeroed`` (0 below 5/9)."""
    share = 1.0 - (1.0 - zeroed) * TAPS / KEPT
    return round(min(_MAX_CONNECTIVITY, max(0.0, share)), 4)


@register
class Pattern(Scheme):
    """4-of-9 kernel patterns from a per-layer library of K, plus whole kernels removed."""

    name = "pattern"
    code = 4
    description = (
        "3×3 convs: each kept kernel keeps 4 of 9 weights in one of K per-layer patterns; "
        "sparsity = share of whole kernels removed"
    )
    fields = ("sparsity", "patterns")

    def validate(self, lp: LayerPolicy, layer: LayerSpace | None = None) -> str | None:
        if lp.patterns is None or not 1 <= lp.patterns <= MAX_PATTERNS:
            return (
                f"scheme 'pattern' needs patterns K in [1, {MAX_PATTERNS}] (4-of-9 kernel patterns "
                f'per layer), got {lp.patterns}; e.g. "patterns": 4'
            )
        if layer is not None:
            return self.layer_problem(layer.features)
        return None

    def layer_problem(self, features: LayerFeatures) -> str | None:
        if features.op == "linear" or features.kernel != 3:
            return "pattern sparsity needs a 3×3 convolution; use another scheme for this layer"
        return None

    def target_sparsity(self, lp: LayerPolicy) -> float:
        return 1.0 - (1.0 - lp.sparsity) * KEPT / TAPS

    def offered(self, layer: LayerSpace) -> bool:
        return self.layer_problem(layer.features) is None

    def sample(self, rng: random.Random, layer: LayerSpace, options: SpaceOptions) -> dict[str, Any]:
        share = round(rng.uniform(0.0, _max_connectivity(options)), 3)
        return {"patterns": rng.choice(SEARCH_PATTERNS), "sparsity": share}

    def from_keep(self, keep: float, layer: LayerSpace, options: SpaceOptions) -> dict[str, Any] | None:
        # As unstructured: zero (1 - keep) · max_sparsity; nearer 0 than 5/9 stays dense.
        zeroed = (1.0 - keep) * options.max_sparsity
        if zeroed < (1.0 - KEPT / TAPS) / 2:
            return None
        share = min(_connectivity(zeroed), _max_connectivity(options))
        return {"patterns": max(SEARCH_PATTERNS), "sparsity": round(share, 3)}

    def probe(self, layer: LayerSpace, sparsity: float) -> dict[str, Any] | None:
        if not self.offered(layer):
            return None
        return {"patterns": max(SEARCH_PATTERNS), "sparsity": round(_connectivity(sparsity), 3)}

    def mask(self, weight: torch.Tensor, lp: LayerPolicy) -> torch.Tensor | None:
        if lp.patterns is None or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
            return None  # a layer the scheme cannot take stays dense (a policy default reaches it)
        return pattern_mask(weight, lp.patterns, lp.sparsity)

    def sparse_bytes(self, weight: torch.Tensor, mask: torch.Tensor, bits: int, lp: LayerPolicy) -> int:
        if lp.patterns is None or weight.numel() % TAPS:
            return super().sparse_bytes(weight, mask, bits, lp)
        nnz = int(mask.sum())
        kernels = weight.numel() // TAPS
        kept = int(mask.reshape(kernels, TAPS).any(dim=1).sum())
        index = kept * math.ceil(math.log2(lp.patterns)) + kernels + TAPS * lp.patterns
        return math.ceil(nnz * bits / 8) + math.ceil(index / 8)

    def optuna_distributions(self, layer: LayerSpace, options: SpaceOptions) -> dict[str, BaseDistribution]:
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        # ``sparsity`` is shared with unstructured and block, so it is the same distribution:
        # here it means the zeroed fraction, turned into a connectivity share by ``from_optuna``.
        return {
            "sparsity": FloatDistribution(0.0, options.max_sparsity),
            "patterns": CategoricalDistribution(SEARCH_PATTERNS),
        }

    def from_optuna(self, params: Mapping[str, Any], layer: LayerSpace) -> dict[str, Any]:
        zeroed = float(params.get("sparsity", 0.0))
        return {
            "sparsity": _connectivity(zeroed),
            "patterns": int(params.get("patterns", max(SEARCH_PATTERNS))),
        }

    def to_optuna(self, lp: LayerPolicy) -> dict[str, Any]:
        params: dict[str, Any] = {"sparsity": self.target_sparsity(lp)}
        if lp.patterns is not None:
            params["patterns"] = int(lp.patterns)
        return params

    def encode_batch(self, raw: np.ndarray) -> np.ndarray:
        # The predictors see the zeroed fraction (as for unstructured) under the scheme's own
        # code; K changes no runtime's speed here, so it is not encoded.
        out = raw.copy()
        out[:, 1] = 1.0 - (1.0 - raw[:, 1]) * KEPT / TAPS
        out[:, 2:5] = 0.0
        return out
