"""``dense``: no fine-grained zeros (every layer's default; width and bits still apply)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from compression.schemes.base import DENSE, Scheme, register

if TYPE_CHECKING:
    from compression.policy import LayerPolicy
    from compression.space import LayerSpace, SpaceOptions


@register
class Dense(Scheme):
    """The identity scheme: no mask, dense storage, no parameters."""

    name = DENSE
    code = 0
    description = "no fine-grained zeros: the weight is stored dense (width and bits still apply)"

    def target_sparsity(self, lp: LayerPolicy) -> float:
        return 0.0

    def sample(self, rng: random.Random, layer: LayerSpace, options: SpaceOptions) -> dict[str, Any]:
        return {}

    def mask(self, weight: torch.Tensor, lp: LayerPolicy) -> torch.Tensor | None:
        return None

    def encode_batch(self, raw: np.ndarray) -> np.ndarray:
        out = raw.copy()
        out[:, 1] = 0.0  # nothing zeroed, whatever sparsity an unparsed policy carries
        return out
