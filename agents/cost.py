"""A cheap, model-free estimate of a policy's compute, from the space alone.

Agents cannot run the model, yet DDPG's action wall and its state need "how much is left"
at every step. MACs of a layer scale with its kept input and output channels; masks and bits
do not change dense MACs (the design's honest-latency rule). This is an estimate for budgeting
only; the search loop always scores candidates for real.
"""

from __future__ import annotations

import numpy as np

from compression.policy import Policy
from compression.space import SearchSpace


class MacsEstimator:
    """Per-layer MACs of a policy: dense MACs × kept-input fraction × kept-output fraction."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.dense = np.asarray([float(ls.features.macs) for ls in space.layers])
        self.total = float(self.dense.sum()) or 1.0
        n = len(space.layers)
        self._producers: list[list[int]] = [[] for _ in range(n)]
        for src, dst in space.edges:
            if 0 <= src < n and 0 <= dst < n:
                self._producers[dst].append(src)
        self._in_block: dict[str, tuple[int, ...]] = {}
        index = {name: i for i, name in enumerate(space.layer_names)}
        for b in space.blocks:
            self._in_block[b.name] = tuple(index[n] for n in b.layers if n in index)

    def out_width(self, policy: Policy) -> np.ndarray:
        """Kept output fraction of each layer (its width leader's width)."""
        widths = np.ones(len(self.space.layers))
        for i, ls in enumerate(self.space.layers):
            if ls.width_prunable and ls.width_leader is not None:
                widths[i] = policy.for_layer(ls.width_leader).width
            elif ls.out_segments:  # output runs with their own leaders: the kept share
                total = sum(n for _, n in ls.out_segments)
                kept = sum(n * (policy.for_layer(lead).width if lead else 1.0) for lead, n in ls.out_segments)
                widths[i] = kept / max(1, total)
        return widths

    def per_layer(self, policy: Policy) -> np.ndarray:
        """Estimated MACs of each layer under ``policy`` (0 for layers in skipped blocks)."""
        out_w = self.out_width(policy)
        macs = self.dense.copy()
        for i, ls in enumerate(self.space.layers):
            prods = self._producers[i]
            in_w = float(np.mean(out_w[prods])) if prods else 1.0
            macs[i] *= out_w[i] if ls.features.op == "dwconv" else in_w * out_w[i]
        for name in policy.skip:
            macs[list(self._in_block.get(name, ()))] = 0.0
        return macs

    def fraction(self, policy: Policy) -> float:
        """Estimated MACs of ``policy`` as a fraction of the dense model's."""
        return float(self.per_layer(policy).sum() / self.total)
