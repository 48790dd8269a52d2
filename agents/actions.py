"""Continuous per-layer actions in [0, 1] and the policies they stand for.

DDPG, AGMC and the rule agent all act per layer with a few numbers in [0, 1]; this module is
the one place that turns them into a valid :class:`LayerPolicy` for that layer's choices, so
every agent respects a restricted space the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from compression import schemes as _schemes
from compression.policy import LayerPolicy, Policy, SchemeName
from compression.space import LayerSpace, SearchSpace, SpaceOptions

#: Which fine-grained scheme an agent uses at a layer when it has no preference of its own:
#: the first of these the layer allows, then any other registered scheme (by code).
FINE_SCHEMES: tuple[SchemeName, ...] = ("unstructured", "block", "nm")
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


def preferred_schemes() -> tuple[SchemeName, ...]:
    """``FINE_SCHEMES``, then every other registered scheme except dense (by code)."""
    rest = [s for s in _schemes.names() if s not in FINE_SCHEMES and s != _schemes.DENSE]
    return (*FINE_SCHEMES, *rest)


def fine_scheme(ls: LayerSpace, prefer: Sequence[SchemeName] | None = None) -> SchemeName | None:
    """The first scheme of ``prefer`` (default ``preferred_schemes()``) this layer allows, or
    None if it is dense-only."""
    order = preferred_schemes() if prefer is None else prefer
    return next((s for s in order if s in ls.schemes), None)


def _sorted_bits(ls: LayerSpace) -> list[int | None]:
    return sorted(ls.bits_choices, key=lambda b: 99 if b is None else b)


def layer_policy(
    ls: LayerSpace, options: SpaceOptions, action: LayerAction, scheme: SchemeName | None = None
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
    if scheme is not None:
        own = _schemes.get(scheme).from_keep(action.keep_weights, ls, options)
        if own is not None:
            return LayerPolicy(width=width, scheme=scheme, bits=bits, **own)
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
    schemes: Mapping[int, SchemeName] | None = None,
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
