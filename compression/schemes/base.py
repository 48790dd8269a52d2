"""A fine-grained sparsity scheme as one registered object, and the registry of them.

``LayerPolicy.scheme`` names a scheme; everything that depends on which one it is (what its
fields must hold, which choices a layer offers, how agents draw and decode it, its mask, its
stored size, its Optuna parameters and its latency-predictor encoding) lives on the scheme's
object, found with :func:`get`. Callers never compare scheme names. This is Torch-Pruning's
per-op pruner registry and Optuna's distributions in spirit: one small object per kind,
looked up by key.

Not schemes: ``width`` (channel pruning: ``"channel"`` in a policy or a space's ``schemes``
is an alias that turns into ``width``, because removed channels combine with any scheme) and
``bits`` (fake quantization, also combinable). Both are fields of their own on
``LayerPolicy``; a scheme is the one fine-grained pattern applied to the (narrowed) weight.

A scheme's parameters are the ``LayerPolicy`` fields in :data:`PARAM_FIELDS` that it names
in ``fields``; the others are reset to their defaults when a policy is parsed, so equal
policies hash equal. The predictor sees every scheme through the same five numbers
(:data:`ENCODING_FIELDS`), so stored predictors stay valid as schemes are added.

Adding one: a module in this package with a ``@register``-ed subclass of :class:`Scheme`
(a new, never reused ``code``), its import in ``compression/schemes/__init__.py``, and a
test; ``tests/compression/test_scheme_contract.py`` runs every registered scheme through
the whole contract on real models. Schemes register when this package is imported: the
predictors' kernel features (one one-hot column per scheme) are laid out then, so a scheme
registered later from elsewhere is not supported.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import torch

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

    from compression.policy import LayerPolicy
    from compression.space import LayerFeatures, LayerSpace, SpaceOptions

__all__ = [
    "CHANNEL",
    "DENSE",
    "ENCODING_FIELDS",
    "PARAM_FIELDS",
    "Scheme",
    "get",
    "names",
    "register",
    "schemes",
]

#: The identity scheme: every layer's default, always allowed.
DENSE = "dense"
#: Not a scheme: ``{"scheme": "channel", "sparsity": s}`` means ``width = 1 - s`` in a policy,
#: and ``"channel"`` in a space's ``schemes`` turns width search on.
CHANNEL = "channel"
#: ``LayerPolicy`` fields that parameterise a scheme (``Scheme.fields`` names a subset).
PARAM_FIELDS: tuple[str, ...] = ("sparsity", "nm", "block", "patterns")
#: What a latency predictor sees of a layer's scheme (``Scheme.encode_batch``), in this order.
ENCODING_FIELDS: tuple[str, ...] = ("scheme", "sparsity", "nm_n", "nm_m", "block")

Encoding = tuple[float, float, float, float, float]


class Scheme(ABC):
    """One fine-grained sparsity scheme: validation, choices, sampling, mask, size, encoding.

    Class attributes:
        name: the value of ``LayerPolicy.scheme`` (and of a space's ``schemes``).
        code: stable integer of the scheme in predictor features; stored predictors were
            trained with it, so a code is never changed or reused.
        description: one line for documentation and ``modeltailor space``.
        fields: the ``PARAM_FIELDS`` this scheme reads (the others are reset on parsing).

    Methods that return policy fields return them as a dict of ``LayerPolicy`` keyword
    arguments (``nm`` as a tuple), without ``scheme``, ``width`` or ``bits``.
    """

    name: ClassVar[str]
    code: ClassVar[int]
    description: ClassVar[str]
    fields: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ policy

    def validate(self, lp: LayerPolicy, layer: LayerSpace | None = None) -> str | None:
        """What is wrong with ``lp`` under this scheme, naming the field and the fix; None if fine.

        Without ``layer`` only the policy's own fields are checked (what parsing a policy
        does); with a layer's space also that the layer can take the scheme and that the
        values are among the layer's choices (what an agent's proposal must satisfy).
        """
        if layer is not None:
            return self.layer_problem(layer.features)
        return None

    def layer_problem(self, features: LayerFeatures) -> str | None:
        """Why a layer of this shape cannot take the scheme at all (None: it can)."""
        return None

    @abstractmethod
    def target_sparsity(self, lp: LayerPolicy) -> float:
        """Fraction of the (narrowed) weight that the scheme zeroes."""

    # ------------------------------------------------------------------ search space

    def space_fields(self, features: LayerFeatures, options: SpaceOptions) -> dict[str, Any]:
        """The ``LayerSpace`` fields this scheme owns (its choices at a layer of this shape).

        Computed for every layer whether or not the scheme is searched, so a space's choices
        do not depend on which schemes are switched on.
        """
        return {}

    def offered(self, layer: LayerSpace) -> bool:
        """Whether the layer has any choice of this scheme (else the space leaves it out)."""
        return True

    @abstractmethod
    def sample(self, rng: random.Random, layer: LayerSpace, options: SpaceOptions) -> dict[str, Any]:
        """Fields drawn uniformly from the layer's choices (``SearchSpace.sample``, random agent)."""

    def from_keep(self, keep: float, layer: LayerSpace, options: SpaceOptions) -> dict[str, Any] | None:
        """Fields for a kept-weight fraction ``keep`` in [0, 1] (DDPG, AGMC and rule actions).

        None means the layer stays dense (nothing to zero at this ``keep``).
        """
        return None

    def probe(self, layer: LayerSpace, sparsity: float) -> dict[str, Any] | None:
        """JSON-able fields that zero about ``sparsity`` of the weight (sensitivity probes).

        None if the layer has no such choice.
        """
        return None

    # ------------------------------------------------------------------ model

    @abstractmethod
    def mask(self, weight: torch.Tensor, lp: LayerPolicy) -> torch.Tensor | None:
        """Boolean mask of ``weight``'s shape (True = kept), or None when nothing is zeroed."""

    def sparse_bytes(self, weight: torch.Tensor, mask: torch.Tensor, bits: int, lp: LayerPolicy) -> int:
        """Bytes of the masked weight stored sparsely: its non-zeros at ``bits`` plus the index.

        The default index is a 1-bit-per-weight bitmap. The caller stores the dense form
        instead when that is smaller, and adds quantization scales.
        """
        nnz = int(mask.sum())
        return math.ceil(nnz * bits / 8) + math.ceil(weight.numel() / 8)

    # ------------------------------------------------------------------ agents (Optuna)

    def optuna_distributions(self, layer: LayerSpace, options: SpaceOptions) -> dict[str, BaseDistribution]:
        """Distributions of this scheme's parameters at ``layer``, keyed by field name.

        A parameter two schemes share (``sparsity``) must get equal distributions from both;
        one with a single choice gets none (``from_optuna`` falls back to it).
        """
        return {}

    def from_optuna(self, params: Mapping[str, Any], layer: LayerSpace) -> dict[str, Any]:
        """Fields from the parameters an Optuna trial suggested (keys as in ``optuna_distributions``)."""
        return {}

    def to_optuna(self, lp: LayerPolicy) -> dict[str, Any]:
        """The Optuna parameters of ``lp`` (inverse of ``from_optuna``, for enqueued trials)."""
        return {}

    # ------------------------------------------------------------------ latency predictors

    def encode_batch(self, raw: np.ndarray) -> np.ndarray:
        """The predictor's encoding of k layers under this scheme, from their raw fields.

        ``raw`` is (k, 5) float64: ``ENCODING_FIELDS`` as the policies hold them (code,
        ``sparsity``, N and M of ``nm`` or 0, ``block`` or 0); the result has the same columns
        as the predictor sees them. Vectorised because it runs for every layer of every policy
        a predictor scores; both the kernel features (``latency_models.features``) and the
        batched rows (``latency_models.rows``) use it, and stored predictors depend on these
        numbers. The default keeps the raw fields.
        """
        return raw

    def encode(self, lp: LayerPolicy) -> Encoding:
        """:meth:`encode_batch` of one layer policy."""
        nm = lp.nm or (0, 0)
        raw = np.array([[self.code, lp.sparsity, nm[0], nm[1], lp.block or 0]], dtype=np.float64)
        row = self.encode_batch(raw)[0]
        return (float(row[0]), float(row[1]), float(row[2]), float(row[3]), float(row[4]))


_REGISTRY: dict[str, Scheme] = {}
_ORDERED: list[tuple[Scheme, ...]] = []  # cache of ``schemes()``, cleared by ``register``
SchemeT = TypeVar("SchemeT", bound=type[Scheme])


def register(cls: SchemeT) -> SchemeT:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    scheme = cls()
    name = getattr(cls, "name", "")
    if not name or name == CHANNEL:
        raise ValueError(f"{cls.__name__}: a scheme needs a name other than {CHANNEL!r}")
    if name in _REGISTRY and type(_REGISTRY[name]) is not cls:
        raise ValueError(f"scheme {name!r} is already registered by {type(_REGISTRY[name]).__name__}")
    taken = {s.code: s.name for s in _REGISTRY.values() if s.name != name}
    if cls.code in taken:
        raise ValueError(f"scheme {name!r}: code {cls.code} is taken by {taken[cls.code]!r}")
    unknown = set(cls.fields) - set(PARAM_FIELDS)
    if unknown:
        raise ValueError(f"scheme {name!r}: fields {sorted(unknown)} are not among {PARAM_FIELDS}")
    if not getattr(cls, "description", ""):
        raise ValueError(f"scheme {name!r} needs a one-line description")
    _REGISTRY[name] = scheme
    _ORDERED.clear()
    return cls


def get(name: str) -> Scheme:
    """The registered scheme ``name``; KeyError naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown scheme {name!r}; registered: {names()}") from None


def schemes() -> tuple[Scheme, ...]:
    """Every registered scheme, by code."""
    if not _ORDERED:
        _ORDERED.append(tuple(sorted(_REGISTRY.values(), key=lambda s: s.code)))
    return _ORDERED[0]


def names() -> tuple[str, ...]:
    """Names of the registered schemes, by code (``dense`` first)."""
    return tuple(s.name for s in schemes())
