"""The search space: one decision point per prunable layer and per skippable block.

Built from the model graph by :func:`compression.space_for`; nothing is listed by
hand per architecture. Agents see only these types, the ``Policy`` they produce
and the scores they are told.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np

from compression import schemes as _schemes
from compression.policy import LayerPolicy, Policy, SchemeName

OpType = Literal["conv", "dwconv", "gconv", "linear"]
OP_TYPES: tuple[OpType, ...] = ("conv", "dwconv", "gconv", "linear")


@dataclass(frozen=True)
class LayerFeatures:
    """Shape facts of one prunable layer: RL state and latency-predictor input.

    Attributes:
        op: conv (dense), dwconv (depthwise), gconv (grouped), linear.
        in_channels / out_channels: of the weight (linear: features).
        kernel: kernel height (1 for linear); stride: stride height (1 for linear).
        groups: convolution groups (1 for linear).
        in_h / in_w: spatial size of the input (linear: tokens × 1, or 1 × 1).
        out_h / out_w: spatial size of the output.
        params: weight + bias elements.
        macs: multiply-accumulates for one sample.
        position: index / (number of layers - 1), 0 for the first layer, 1 for the last.
        index: the layer's index in topological order.
    """

    op: OpType
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    groups: int
    in_h: int
    in_w: int
    out_h: int
    out_w: int
    params: int
    macs: int
    position: float
    index: int

    @classmethod
    def vector_names(cls) -> list[str]:
        """Names of the entries of :meth:`as_vector`, in order."""
        numeric = [f.name for f in fields(cls) if f.name not in ("op", "index")]
        return [f"op_{o}" for o in OP_TYPES] + numeric

    def as_vector(self) -> np.ndarray:
        """One-hot op type + raw numeric features (float64); normalise downstream."""
        onehot = [1.0 if self.op == o else 0.0 for o in OP_TYPES]
        numeric = [float(getattr(self, n)) for n in self.vector_names()[len(OP_TYPES) :]]
        return np.asarray(onehot + numeric, dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LayerSpace:
    """The choices open to one prunable layer.

    Attributes:
        name: layer name used in policies (the module path of its weight).
        features: shape facts.
        width_prunable: whether the layer's output channels can be removed.
        width_leader: name of the layer whose ``width`` decides this layer's output
            channels (layers coupled by a residual add or similar share one choice);
            equals ``name`` for the leader itself, None if not width-prunable.
        schemes: fine-grained schemes allowed here.
        nm_choices: allowed (N, M) for scheme ``nm``.
        block_choices: allowed N for scheme ``block``.
        bits_choices: allowed weight bit-widths (None = float32).
        in_segments: where the input channels come from, as (leader layer name or
            None for channels never pruned, channel count) runs; with ``in_expand``
            (positions per channel after a flatten) this lets a latency predictor
            compute the narrowed input of a layer from a policy without building it.
        in_expand: positions per input channel (H·W after a flatten, else 1).
        out_segments: for a layer that is not ``width_prunable`` yet whose output channels
            are pruned run by run (an SE excitation or shortcut whose channels meet a
            concat's runs, a depthwise conv after a concat), the runs as (leader or None,
            channel count), like ``in_segments``; empty otherwise.
    """

    name: str
    features: LayerFeatures
    width_prunable: bool
    width_leader: str | None
    schemes: tuple[SchemeName, ...]
    nm_choices: tuple[tuple[int, int], ...]
    block_choices: tuple[int, ...]
    bits_choices: tuple[int | None, ...]
    in_segments: tuple[tuple[str | None, int], ...] = ()
    in_expand: int = 1
    out_segments: tuple[tuple[str | None, int], ...] = ()

    @property
    def decides_width(self) -> bool:
        """True if this layer's ``width`` is a free choice (it leads its group)."""
        return self.width_prunable and self.width_leader == self.name


@dataclass(frozen=True)
class BlockSpace:
    """A residual block whose input and output shapes match: it may be skipped.

    Attributes:
        name: block name used in ``Policy.skip`` (module path of the block).
        layers: prunable layers inside the block (their policies are moot if skipped).
    """

    name: str
    layers: tuple[str, ...]


@dataclass(frozen=True)
class SpaceOptions:
    """Which kinds of compression a search may use (a job may restrict the space).

    Attributes:
        schemes: fine-grained schemes to search over ("dense" is always allowed); every
            registered scheme (``compression.schemes.names()``) by default.
        bits: weight bit-widths to search over (None = float32).
        width: search per-group widths (channel pruning).
        depth: search skipping residual blocks.
        min_width: smallest kept width fraction.
        max_sparsity: largest sparsity for unstructured / block.
        nm_choices: N:M patterns offered.
        block_choices: 1×N block sizes offered.
        round_to: kept channels of a pruned group are a multiple of this (at least one
            multiple, never more than the layer has; Torch-Pruning's ``round_to``). Runtimes
            vectorise over channel blocks (ONNX Runtime's NCHWc kernels on AVX-512 take 16
            channels at a time; GPUs and NPUs want 8 or 32), and an unaligned width can run
            slower than the dense layer. 1 = any count.
    """

    schemes: tuple[SchemeName, ...] = field(default_factory=_schemes.names)
    bits: tuple[int | None, ...] = (None, 8)
    width: bool = True
    depth: bool = True
    min_width: float = 0.2
    max_sparsity: float = 0.9
    nm_choices: tuple[tuple[int, int], ...] = ((1, 4), (2, 4), (4, 8))
    block_choices: tuple[int, ...] = (4, 8, 16)
    round_to: int = 1

    def snap_width(self, ls: LayerSpace, width: float) -> float:
        """``width`` of group leader ``ls`` moved to the nearest width whose kept channel count
        is a multiple of ``round_to`` (the count ``compression.apply`` keeps is then exact).
        A group of at most ``round_to`` channels is not narrowed."""
        n = ls.features.out_channels
        m = self.round_to
        if m <= 1 or width >= 1.0:
            return width
        if n <= m:
            return 1.0  # too narrow to keep a multiple of round_to: not pruned
        kept = min(n, max(m, m * round(max(1, round(width * n)) / m)))
        while kept < self.min_width * n - 1e-9 and kept + m <= n:
            kept += m  # never below the space's smallest width
        return round(kept / n, 6)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["nm_choices"] = [list(x) for x in self.nm_choices]
        return d


@dataclass(frozen=True)
class SearchSpace:
    """All decision points of one model under one set of options.

    Attributes:
        layers: prunable layers in topological order.
        blocks: skippable residual blocks (empty if depth search is off).
        edges: data-flow edges between layers, as (producer index, consumer index)
            into ``layers`` (a layer feeds another through non-prunable ops).
        options: the options the space was built with.
    """

    layers: tuple[LayerSpace, ...]
    blocks: tuple[BlockSpace, ...]
    edges: tuple[tuple[int, int], ...]
    options: SpaceOptions

    def layer(self, name: str) -> LayerSpace:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def width_leaders(self) -> list[LayerSpace]:
        """Layers whose width is a free choice, in order."""
        return [layer for layer in self.layers if layer.decides_width]

    def validate(self, policy: Policy) -> Policy:
        """Raise PolicyError if the policy names unknown layers/blocks or disallowed values."""
        policy.check_names(self.layer_names, (b.name for b in self.blocks))
        return policy

    def sample(self, rng: random.Random) -> Policy:
        """A policy drawn uniformly from the space (every free choice independent)."""
        o = self.options
        layers: dict[str, LayerPolicy] = {}
        for ls in self.layers:
            width = 1.0
            if o.width and ls.decides_width:
                width = o.snap_width(ls, round(rng.uniform(o.min_width, 1.0), 3))
            scheme = rng.choice(ls.schemes)
            bits = rng.choice(ls.bits_choices)
            own = _schemes.get(scheme).sample(rng, ls, o)
            layers[ls.name] = LayerPolicy(width=width, scheme=scheme, bits=bits, **own).validate(ls.name)
        skip = frozenset(b.name for b in self.blocks if o.depth and rng.random() < 0.25)
        return Policy(layers=layers, skip=skip)

    def feature_matrix(self) -> np.ndarray:
        """Layer features stacked (n_layers × n_features), in layer order."""
        return np.stack([ls.features.as_vector() for ls in self.layers])

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [
                {
                    "name": ls.name,
                    "features": ls.features.to_dict(),
                    "width_prunable": ls.width_prunable,
                    "width_leader": ls.width_leader,
                    "schemes": list(ls.schemes),
                    "nm_choices": [list(x) for x in ls.nm_choices],
                    "block_choices": list(ls.block_choices),
                    "bits_choices": list(ls.bits_choices),
                    "in_segments": [list(x) for x in ls.in_segments],
                    "in_expand": ls.in_expand,
                    "out_segments": [list(x) for x in ls.out_segments],
                }
                for ls in self.layers
            ],
            "blocks": [{"name": b.name, "layers": list(b.layers)} for b in self.blocks],
            "edges": [list(e) for e in self.edges],
            "options": self.options.to_dict(),
        }
