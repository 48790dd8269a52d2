"""Continuous per-layer actions in [0, 1] and the policies they stand for.

DDPG, AGMC and the rule agent all act per layer with a few numbers in [0, 1]; this module is
the one place that turns them into a valid :class:`LayerPolicy` for that layer's choices, so
every agent respects a restricted space the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from compression.policy import LayerPolicy, Policy, Scheme
from compression.space import LayerSpace, SearchSpace, SpaceOptions

FINE_SCHEMES: tuple[Scheme, ...] = ("unstructured", "block", "nm")
SKIP_THRESHOLD = 0.75  # uniform warm-up actions then skip a quarter of the blocks, as SearchSpace.sample does


@dataclass(frozen=True)
class LayerAction:
    """What an agent decides for one layer; every field in [0, 1], 1 = keep everything.

    Attributes:
        keep_width: kept output-channel fraction, mapped onto [min_width, 1] (width leaders only).
        keep_weights: kept weight fraction under the layer's fine-grained scheme.
        bits: position in the layer's bit-width choices (0 = fewest bits, 1 = float when allowed).
        skip: > SKIP_THRESHOLD skips the block this layer opens (if it opens a skippable one).
    """

    keep_width: float = 1.0
    keep_weights: float = 1.0
    bits: float = 1.0
    skip: float = 0.0

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return ("keep_width", "keep_weights", "bits", "skip")

    @classmethod
    def from_array(cls, a: Sequence[float] | np.ndarray) -> LayerAction:
        v = [float(min(1.0, max(0.0, x))) for x in a]
        return cls(*v)

    def as_array(self) -> np.ndarray:
        return np.asarray([self.keep_width, self.keep_weights, self.bits, self.skip], dtype=np.float32)

    def shrunk(self, s: float) -> LayerAction:
        """The action scaled towards maximum compression (s = 1: unchanged, 0: compress fully)."""
        return LayerAction(self.keep_width * s, self.keep_weights * s, self.bits * s, self.skip)


ACTION_DIM = len(LayerAction.names())
MOST_COMPRESSED = LayerAction(0.0, 0.0, 0.0, 1.0)


def fine_scheme(ls: LayerSpace, prefer: Sequence[Scheme] = FINE_SCHEMES) -> Scheme | None:
    """The first scheme of ``prefer`` this layer allows, or None if it is dense-only."""
    return next((s for s in prefer if s in ls.schemes), None)


def _sorted_bits(ls: LayerSpace) -> list[int | None]:
    return sorted(ls.bits_choices, key=lambda b: 99 if b is None else b)


def layer_policy(
    ls: LayerSpace, options: SpaceOptions, action: LayerAction, scheme: Scheme | None = None
) -> LayerPolicy:
    """The policy ``action`` stands for at layer ``ls`` (``scheme`` defaults to its first fine scheme)."""
    width = 1.0
    if options.width and ls.decides_width:
        width = options.snap_width(
            ls, round(options.min_width + action.keep_width * (1.0 - options.min_width), 3)
        )
    scheme = scheme if scheme in ls.schemes else fine_scheme(ls)
    bits_choices = _sorted_bits(ls)
    bits = bits_choices[min(int(action.bits * len(bits_choices)), len(bits_choices) - 1)]
    density = action.keep_weights
    if scheme in ("unstructured", "block"):
        sparsity = round((1.0 - density) * options.max_sparsity, 3)
        if sparsity <= 0.0:
            return LayerPolicy(width=width, bits=bits)
        block = ls.block_choices[len(ls.block_choices) // 2] if scheme == "block" else None
        return LayerPolicy(width=width, scheme=scheme, sparsity=sparsity, block=block, bits=bits)
    if scheme == "nm":
        # Dense counts as density 1; pick the pattern whose kept fraction is nearest.
        options_nm: list[tuple[int, int] | None] = [None, *ls.nm_choices]
        best = min(options_nm, key=lambda p: abs((1.0 if p is None else p[0] / p[1]) - density))
        if best is not None:
            return LayerPolicy(width=width, scheme="nm", nm=best, bits=bits)
    return LayerPolicy(width=width, bits=bits)


def block_openers(space: SearchSpace) -> dict[int, str]:
    """Layer index -> skippable block whose first layer it is (where the skip decision is taken)."""
    index = {name: i for i, name in enumerate(space.layer_names)}
    openers: dict[int, str] = {}
    for b in space.blocks:
        idx = [index[n] for n in b.layers if n in index]
        if idx:
            openers[min(idx)] = b.name
    return openers


def policy_from_actions(
    space: SearchSpace,
    actions: Mapping[int, LayerAction],
    *,
    rest: LayerAction | None = None,
    schemes: Mapping[int, Scheme] | None = None,
) -> Policy:
    """The policy of per-layer ``actions`` (layer index -> action); layers without one take ``rest``.

    ``rest`` defaults to keeping everything. Skips apply only when depth search is on.
    """
    rest = rest or LayerAction()
    layers: dict[str, LayerPolicy] = {}
    skip: set[str] = set()
    openers = block_openers(space) if space.options.depth else {}
    for i, ls in enumerate(space.layers):
        act = actions.get(i, rest)
        layers[ls.name] = layer_policy(ls, space.options, act, (schemes or {}).get(i))
        if i in openers and act.skip > SKIP_THRESHOLD:
            skip.add(openers[i])
    return Policy(layers=layers, skip=frozenset(skip))
