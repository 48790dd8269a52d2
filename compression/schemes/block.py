"""``block``: 1×N blocks (N consecutive output channels at one input position) zeroed together."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from compression.schemes.base import Scheme, register

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

    from compression.policy import LayerPolicy
    from compression.space import LayerFeatures, LayerSpace, SpaceOptions

__all__ = ["Block", "block_mask"]

MIN_BLOCK, MAX_BLOCK = 2, 64


def block_mask(w: torch.Tensor, block: int, sparsity: float) -> torch.Tensor:
    """Zero whole 1×N blocks (N consecutive output channels at one input position).

    Blocks are ranked by mean magnitude (fair to a short tail block); exactly
    ``round(sparsity · blocks)`` of them are zeroed.
    """
    o = w.shape[0]
    flat = w.detach().abs().reshape(o, -1)
    pad = (-o) % block
    padded = torch.nn.functional.pad(flat, (0, 0, 0, pad))
    blocks = padded.reshape((o + pad) // block, block, -1)
    sizes = torch.full((blocks.shape[0], 1), float(block))
    if pad:
        sizes[-1] = block - pad
    score = blocks.sum(dim=1) / sizes  # mean magnitude, fair to a short tail block
    k = round(sparsity * score.numel())
    keep_blocks = torch.ones(score.numel(), dtype=torch.bool)
    if k > 0:
        keep_blocks[torch.argsort(score.flatten(), stable=True)[:k]] = False
    keep = keep_blocks.view_as(score).unsqueeze(1).expand_as(blocks).reshape(o + pad, -1)[:o]
    return keep.reshape(w.shape).contiguous()


def _middle(layer: LayerSpace) -> int:
    return layer.block_choices[len(layer.block_choices) // 2]


@register
class Block(Scheme):
    """1×N blocks by mean magnitude; stored as kept weights + a 1-bit-per-block mask."""

    name = "block"
    code = 3
    description = "1×N blocks (N consecutive output channels at one input position) zeroed together"
    fields = ("sparsity", "block")

    def validate(self, lp: LayerPolicy, layer: LayerSpace | None = None) -> str | None:
        if lp.block is None or not MIN_BLOCK <= lp.block <= MAX_BLOCK:
            return (
                f"scheme 'block' needs block N in [{MIN_BLOCK}, {MAX_BLOCK}], got {lp.block}; "
                'e.g. "block": 8'
            )
        if layer is not None and lp.block not in layer.block_choices:
            return f"block {lp.block} is not offered at this layer; use one of {list(layer.block_choices)}"
        return None

    def target_sparsity(self, lp: LayerPolicy) -> float:
        return lp.sparsity

    def space_fields(self, features: LayerFeatures, options: SpaceOptions) -> dict[str, Any]:
        return {"block_choices": tuple(b for b in options.block_choices if b <= features.out_channels)}

    def offered(self, layer: LayerSpace) -> bool:
        return bool(layer.block_choices)

    def sample(self, rng: random.Random, layer: LayerSpace, options: SpaceOptions) -> dict[str, Any]:
        block = rng.choice(layer.block_choices)
        return {"block": block, "sparsity": round(rng.uniform(0.0, options.max_sparsity), 3)}

    def from_keep(self, keep: float, layer: LayerSpace, options: SpaceOptions) -> dict[str, Any] | None:
        sparsity = round((1.0 - keep) * options.max_sparsity, 3)
        return {"sparsity": sparsity, "block": _middle(layer)} if sparsity > 0.0 else None

    def probe(self, layer: LayerSpace, sparsity: float) -> dict[str, Any] | None:
        return {"sparsity": sparsity, "block": _middle(layer)} if layer.block_choices else None

    def mask(self, weight: torch.Tensor, lp: LayerPolicy) -> torch.Tensor | None:
        if lp.block is None or lp.sparsity <= 0:
            return None
        return block_mask(weight, lp.block, lp.sparsity)

    def sparse_bytes(self, weight: torch.Tensor, mask: torch.Tensor, bits: int, lp: LayerPolicy) -> int:
        if lp.block is None:
            return super().sparse_bytes(weight, mask, bits, lp)
        nnz = int(mask.sum())
        n_blocks = math.ceil(weight.shape[0] / lp.block) * (weight.numel() // weight.shape[0])
        return math.ceil(nnz * bits / 8) + math.ceil(n_blocks / 8)

    def optuna_distributions(self, layer: LayerSpace, options: SpaceOptions) -> dict[str, BaseDistribution]:
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        dists: dict[str, BaseDistribution] = {"sparsity": FloatDistribution(0.0, options.max_sparsity)}
        if len(layer.block_choices) > 1:
            dists["block"] = CategoricalDistribution(layer.block_choices)
        return dists

    def from_optuna(self, params: Mapping[str, Any], layer: LayerSpace) -> dict[str, Any]:
        return {
            "sparsity": round(float(params["sparsity"]), 4),
            "block": int(params.get("block", layer.block_choices[0])),
        }

    def to_optuna(self, lp: LayerPolicy) -> dict[str, Any]:
        params: dict[str, Any] = {"sparsity": float(lp.sparsity)}
        if lp.block is not None:
            params["block"] = int(lp.block)
        return params
