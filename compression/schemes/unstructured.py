"""``unstructured``: the smallest-magnitude weights of the layer are zeroed, wherever they are."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from compression.schemes.base import Scheme, register

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

    from compression.policy import LayerPolicy
    from compression.space import LayerSpace, SpaceOptions

__all__ = ["Unstructured", "unstructured_mask"]


def unstructured_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the ``round(sparsity · numel)`` smallest-magnitude weights."""
    k = round(sparsity * w.numel())
    mask = torch.ones(w.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.argsort(w.detach().abs().flatten(), stable=True)
        mask[order[:k]] = False
    return mask.view_as(w)


@register
class Unstructured(Scheme):
    """Exactly ``round(sparsity · numel)`` weights zeroed; stored as non-zeros + a 1-bit mask."""

    name = "unstructured"
    code = 1
    description = "the smallest-magnitude weights anywhere in the layer are zeroed (non-zeros + 1-bit mask)"
    fields = ("sparsity",)

    def target_sparsity(self, lp: LayerPolicy) -> float:
        return lp.sparsity

    def sample(self, rng: random.Random, layer: LayerSpace, options: SpaceOptions) -> dict[str, Any]:
        return {"sparsity": round(rng.uniform(0.0, options.max_sparsity), 3)}

    def from_keep(self, keep: float, layer: LayerSpace, options: SpaceOptions) -> dict[str, Any] | None:
        sparsity = round((1.0 - keep) * options.max_sparsity, 3)
        return {"sparsity": sparsity} if sparsity > 0.0 else None

    def probe(self, layer: LayerSpace, sparsity: float) -> dict[str, Any] | None:
        return {"sparsity": sparsity}

    def mask(self, weight: torch.Tensor, lp: LayerPolicy) -> torch.Tensor | None:
        return unstructured_mask(weight, lp.sparsity) if lp.sparsity > 0 else None

    def optuna_distributions(self, layer: LayerSpace, options: SpaceOptions) -> dict[str, BaseDistribution]:
        from optuna.distributions import FloatDistribution

        return {"sparsity": FloatDistribution(0.0, options.max_sparsity)}

    def from_optuna(self, params: Mapping[str, Any], layer: LayerSpace) -> dict[str, Any]:
        return {"sparsity": round(float(params["sparsity"]), 4)}

    def to_optuna(self, lp: LayerPolicy) -> dict[str, Any]:
        return {"sparsity": float(lp.sparsity)}
