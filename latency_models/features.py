"""Kernel-level features of a compressed model, computed from (SearchSpace, Policy) alone.

The latency predictors see a compressed model as the list of kernels the runtime executes.
ONNX Runtime fuses Conv+BatchNorm+ReLU (and Gemm+activation), so one prunable layer of the
search space is one kernel; ops without weights (adds, pooling, softmax) are left to the
per-model overhead. Building and exporting the compressed model takes ~0.1-1 s, far too slow
for search, so everything here is derived from the space's index arrays and batched numpy:
thousands of ResNet-20 policies per second on one core.

The channel rule is the one ``compression.apply`` uses: a layer keeps
``max(1, round(width * out))`` output channels, ``width`` being its ``width_leader``'s; its
input channels are the sum over ``in_segments`` of the same rule with each segment's leader,
times ``in_expand`` (positions per channel after a flatten). Depthwise convolutions keep one
group per kept channel. Layers inside a skipped block are not kernels at all.

How ``bits`` map to this runtime: per layer, by ``compression.mixed_precision.layer_precision``
(the rule the export follows). A layer with ``bits`` runs as a static int8 QDQ kernel, a linear
layer with ``bits <= 4`` as a 4-bit ``MatMulNBits`` when ORT has that kernel, every other layer
(and a power-of-two ``pow2`` layer, exported with its de-quantized float values: bits 0 here)
in fp32. Each kernel carries its own ``bits``, ``int8`` and ``int4`` flags and its
``qdq_edges`` (graph neighbours at another precision: a quantize / dequantize pair each), and
the model its MAC share in int8; the sampler exports models by this very rule, so the
predictors learn what int8 costs per kernel shape instead of assuming a speedup.

``FEATURE_VERSION`` names this encoding: a predictor saved under another version refuses to
load (``latency_models.predictors.base.StalePredictorError``) and must be refitted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from compression import schemes
from compression.mixed_precision import supports_int4_matmul
from compression.policy import LayerPolicy, Policy
from compression.space import (
    OP_TYPES,
    BlockSpace,
    LayerFeatures,
    LayerSpace,
    SearchSpace,
    SpaceOptions,
)

__all__ = [
    "FEATURE_VERSION",
    "KERNEL_FEATURES",
    "MODEL_FEATURES",
    "POLICY_FIELDS",
    "SCHEME_CODES",
    "KernelBatch",
    "LayerIndex",
    "SpaceIndex",
    "encode_layer_policies",
    "kernel_features",
    "layer_runtime",
    "runtime_int8",
    "space_from_dict",
]

#: Each registered scheme's stable feature code (``Scheme.code``; dense 0, unstructured 1, nm 2, block 3).
SCHEME_CODES: dict[str, int] = {s.name: s.code for s in schemes.schemes()}
#: The per-layer policy fields every predictor sees, in this order: the scheme's encoding
#: (``Scheme.encode``: code, sparsity, N, M, block) and the weight bits (0 = float).
POLICY_FIELDS: tuple[str, ...] = (*schemes.ENCODING_FIELDS, "bits")
#: Version of the feature encoding (1: one whole-model int8 flag; 2: precision per layer;
#: 3: a scheme column for "pattern", pow2 layers as float).
#: Bump it whenever a feature's meaning changes: stored predictors of another version refuse to load.
FEATURE_VERSION = 3

KERNEL_FEATURES: tuple[str, ...] = (
    "op_conv",
    "op_dwconv",
    "op_gconv",
    "op_linear",
    "in_channels",
    "out_channels",
    "kernel",
    "stride",
    "groups",
    "in_h",
    "in_w",
    "out_h",
    "out_w",
    "macs",
    "params",
    *(f"scheme_{name}" for name in SCHEME_CODES),  # one-hot of the scheme
    "sparsity",
    "nm_n",
    "nm_m",
    "block",
    "bits",
    "int8",
    "int4",
    "qdq_edges",
    "in_numel",
    "out_numel",
    "position",
)
MODEL_FEATURES: tuple[str, ...] = (
    "total_macs",
    "n_kernels",
    "input_numel",
    "int8_macs",
    "total_out_numel",
    "total_params",
)
_K = {name: i for i, name in enumerate(KERNEL_FEATURES)}


def encode_layer_policies(lps: Sequence[LayerPolicy]) -> np.ndarray:
    """(N, 6) float64 ``POLICY_FIELDS`` of N layer policies: the one policy encoding of both
    the kernel features here and the batched rows (``latency_models.rows``).

    The raw fields are read column by column (this loop is the cost of prediction, so it
    touches each attribute once), then each scheme present encodes its layers
    (``Scheme.encode_batch``).
    """
    n = len(lps)
    out = np.zeros((n, len(POLICY_FIELDS)))
    if n == 0:
        return out
    codes = np.array([SCHEME_CODES[lp.scheme] for lp in lps], dtype=np.int64)
    out[:, 0] = codes
    out[:, 1] = [lp.sparsity for lp in lps]
    out[:, 2:4] = np.array([lp.nm or (0, 0) for lp in lps], dtype=np.float64)
    out[:, 4] = [lp.block or 0 for lp in lps]
    out[:, 5] = [0 if lp.pow2 else lp.bits or 0 for lp in lps]  # pow2 layers run in float
    for scheme in schemes.schemes():
        sel = codes == scheme.code
        if sel.any():
            out[sel, :5] = scheme.encode_batch(out[sel, :5])
    return out


@dataclass(frozen=True)
class KernelBatch:
    """Kernel features of P policies of one space (L = layers of the space).

    Attributes:
        x: (P, L, F) float64 features named by ``KERNEL_FEATURES``; rows of absent kernels
            are kept (zero MACs) so every policy has the same layout.
        present: (P, L) bool, False for layers in skipped blocks.
        op: (L,) op type index into ``OP_TYPES``.
        model: (P, M) per-model features named by ``MODEL_FEATURES``.
    """

    x: np.ndarray
    present: np.ndarray
    op: np.ndarray
    model: np.ndarray

    @property
    def int8(self) -> np.ndarray:
        """(P,) whether any kernel of each policy runs as int8 QDQ (see ``runtime_int8``)."""
        return np.asarray((self.x[:, :, _K["int8"]] > 0.5).any(axis=1))


class LayerIndex:
    """Static index arrays of one SearchSpace's layers, computed once and shared by the
    batched feature builders (``SpaceIndex`` here, ``latency_models.rows.RowIndex``)."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        layers = space.layers
        self.names = [ls.name for ls in layers]
        pos = self.pos = {n: i for i, n in enumerate(self.names)}
        self.n_layers = len(layers)
        f = [ls.features for ls in layers]
        self.op = np.array([OP_TYPES.index(x.op) for x in f], dtype=np.int64)
        self.cout = np.array([x.out_channels for x in f], dtype=np.float64)
        self.kernel = np.array([x.kernel for x in f], dtype=np.float64)
        self.stride = np.array([x.stride for x in f], dtype=np.float64)
        self.groups = np.array([x.groups for x in f], dtype=np.float64)
        self.in_h = np.array([x.in_h for x in f], dtype=np.float64)
        self.in_w = np.array([x.in_w for x in f], dtype=np.float64)
        self.out_h = np.array([x.out_h for x in f], dtype=np.float64)
        self.out_w = np.array([x.out_w for x in f], dtype=np.float64)
        self.position = np.array([x.position for x in f], dtype=np.float64)
        self.is_dw = self.op == OP_TYPES.index("dwconv")
        self.leader = np.array(
            [pos[ls.width_leader] if ls.width_leader is not None else -1 for ls in layers], dtype=np.int64
        )
        seg_layer, seg_leader, seg_len = [], [], []
        for i, ls in enumerate(layers):
            for leader, length in ls.in_segments or ((None, ls.features.in_channels),):
                seg_layer.append(i)
                seg_leader.append(pos[leader] if leader is not None else -1)
                seg_len.append(length)
        # Grouped convolutions tie a channel group: the same offsets are kept in every conv
        # group, so a leader feeding or led by a gconv with g groups keeps g·round(w·n/g).
        tied = np.ones(self.n_layers)
        for ls in layers:
            if ls.features.op == "gconv":
                for leader in [ls.width_leader, *(seg[0] for seg in ls.in_segments)]:
                    if leader is not None:
                        tied[pos[leader]] = max(tied[pos[leader]], ls.features.groups)
        self.tied = tied
        self.seg_leader = np.array(seg_leader, dtype=np.int64)
        self.seg_len = np.array(seg_len, dtype=np.float64)
        self.seg_to_layer = np.zeros((len(seg_layer), self.n_layers))
        self.seg_to_layer[np.arange(len(seg_layer)), seg_layer] = 1.0
        self.expand = np.array([ls.in_expand for ls in layers], dtype=np.float64)
        self.block_names = {b.name: j for j, b in enumerate(space.blocks)}
        # (B, L) 0/1: which layers each skippable block holds.
        self.block_layers = np.zeros((len(space.blocks), self.n_layers))
        for j, b in enumerate(space.blocks):
            for name in b.layers:
                if name in pos:
                    self.block_layers[j, pos[name]] = 1.0
        first = f[0] if f else None
        self.input_numel = float(first.in_channels * first.in_h * first.in_w) if first else 0.0
        self.is_linear = self.op == OP_TYPES.index("linear")
        e = np.asarray(space.edges, dtype=np.int64).reshape(-1, 2)
        self.edge_src, self.edge_dst = e[:, 0], e[:, 1]
        # each edge counts for both of its layers (a precision change costs a Q/DQ pair)
        self.edge_incidence = np.zeros((len(e), self.n_layers))
        self.edge_incidence[np.arange(len(e)), e[:, 0]] += 1.0
        self.edge_incidence[np.arange(len(e)), e[:, 1]] += 1.0

    def precision(self, bits: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(int8, int4, qdq_edges), each (P, L), of per-layer ``bits`` (0 = float) under
        ``compression.mixed_precision.layer_precision``; ``qdq_edges`` counts the layer's
        present graph neighbours that run at another precision."""
        quant = (bits > 0) & present
        int4 = quant & self.is_linear & (bits <= 4) & supports_int4_matmul()
        int8 = quant & ~int4
        code = int8 + 2 * int4
        edges = np.zeros(bits.shape)
        if len(self.edge_src):
            live = present[:, self.edge_src] & present[:, self.edge_dst]
            diff = (code[:, self.edge_src] != code[:, self.edge_dst]) & live
            edges = diff @ self.edge_incidence
        return int8, int4, edges


class SpaceIndex(LayerIndex):
    """Index arrays of one SearchSpace, computed once; ``features`` batches policies."""

    def encode(self, policies: Sequence[Policy]) -> tuple[np.ndarray, np.ndarray]:
        """Policies as a (P, L, 7) array (width, scheme, sparsity, N, M, block, bits) + (P, B) skips.

        One flat list of LayerPolicy objects, then one list comprehension per field: this
        Python loop is the cost of prediction, so it touches each attribute once.
        """
        names = self.names
        lps: list[LayerPolicy] = []
        skips = np.zeros((len(policies), len(self.block_names)), dtype=bool)
        for p, policy in enumerate(policies):
            get, default = policy.layers.get, policy.default
            lps.extend([get(name, default) for name in names])
            for b in policy.skip:
                j = self.block_names.get(b)
                if j is not None:
                    skips[p, j] = True
        enc = np.zeros((len(lps), 7))
        if lps:
            enc[:, 0] = [lp.width for lp in lps]
            enc[:, 1:] = encode_layer_policies(lps)
        return enc.reshape(len(policies), self.n_layers, 7), skips

    def features(self, policies: Sequence[Policy]) -> KernelBatch:
        """Kernel and model features of every policy (batched; no model is built)."""
        enc, skips = self.encode(policies)
        n_pol = len(policies)
        width = enc[:, :, 0]
        has_leader = self.leader >= 0
        lead_w = np.where(has_leader, width[:, np.maximum(self.leader, 0)], 1.0)
        t_out = self.tied[np.maximum(self.leader, 0)]
        kept = t_out * np.maximum(1.0, np.round(lead_w * (self.cout // t_out)))
        cout = np.where(has_leader, kept, self.cout)
        seg_has = self.seg_leader >= 0
        seg_w = np.where(seg_has, width[:, np.maximum(self.seg_leader, 0)], 1.0)
        t_seg = self.tied[np.maximum(self.seg_leader, 0)]
        seg_kept = np.where(
            seg_has, t_seg * np.maximum(1.0, np.round(seg_w * (self.seg_len // t_seg))), self.seg_len
        )
        cin = (seg_kept @ self.seg_to_layer) * self.expand
        groups = np.where(self.is_dw, cout, self.groups)
        present = ~((skips.astype(np.float64) @ self.block_layers) > 0)
        k2 = self.kernel * self.kernel
        params = cin / groups * cout * k2
        macs = params * self.out_h * self.out_w * present
        x = np.zeros((n_pol, self.n_layers, len(KERNEL_FEATURES)))
        x[:, np.arange(self.n_layers), self.op] = 1.0
        x[:, :, _K["in_channels"]] = cin
        x[:, :, _K["out_channels"]] = cout
        x[:, :, _K["kernel"]] = self.kernel
        x[:, :, _K["stride"]] = self.stride
        x[:, :, _K["groups"]] = groups
        x[:, :, _K["in_h"]] = self.in_h
        x[:, :, _K["in_w"]] = self.in_w
        x[:, :, _K["out_h"]] = self.out_h
        x[:, :, _K["out_w"]] = self.out_w
        x[:, :, _K["macs"]] = macs
        x[:, :, _K["params"]] = params
        scheme = enc[:, :, 1].astype(np.int64)
        for name, code in SCHEME_CODES.items():
            x[:, :, _K[f"scheme_{name}"]] = scheme == code
        x[:, :, _K["sparsity"]] = enc[:, :, 2]
        x[:, :, _K["nm_n"]] = enc[:, :, 3]
        x[:, :, _K["nm_m"]] = enc[:, :, 4]
        x[:, :, _K["block"]] = enc[:, :, 5]
        bits = enc[:, :, 6]
        x[:, :, _K["bits"]] = bits
        total_macs = macs.sum(axis=1)
        int8, int4, qdq_edges = self.precision(bits, present)
        x[:, :, _K["int8"]] = int8
        x[:, :, _K["int4"]] = int4
        x[:, :, _K["qdq_edges"]] = qdq_edges
        int8_macs = (macs * int8).sum(axis=1) / np.maximum(total_macs, 1e-9)
        x[:, :, _K["in_numel"]] = cin * self.in_h * self.in_w
        out_numel = cout * self.out_h * self.out_w
        x[:, :, _K["out_numel"]] = out_numel
        x[:, :, _K["position"]] = self.position
        x *= present[:, :, None]
        model = np.stack(
            [
                total_macs,
                present.sum(axis=1).astype(np.float64),
                np.full(n_pol, self.input_numel),
                int8_macs,
                (out_numel * present).sum(axis=1),
                (params * present).sum(axis=1),
            ],
            axis=1,
        )
        return KernelBatch(x=x, present=present, op=self.op, model=model)


IndexT = TypeVar("IndexT", bound=LayerIndex)
_INDEX_CACHES: dict[type[LayerIndex], dict[int, LayerIndex]] = {}


def cached_index(kind: type[IndexT], space: SearchSpace) -> IndexT:
    """``kind(space)``, cached by the space's identity (spaces are frozen); at most 256 per kind."""
    cache = _INDEX_CACHES.setdefault(kind, {})
    idx = cache.get(id(space))
    if not isinstance(idx, kind) or idx.space is not space:
        if len(cache) > 256:
            cache.clear()
        idx = cache[id(space)] = kind(space)
    return idx


def _index(space: SearchSpace) -> SpaceIndex:
    return cached_index(SpaceIndex, space)


def kernel_features(space: SearchSpace, policies: Sequence[Policy]) -> KernelBatch:
    """Kernel features of ``policies`` over ``space`` (batched, index arrays cached per space)."""
    return _index(space).features(policies)


def runtime_int8(space: SearchSpace, policy: Policy) -> bool:
    """Whether any layer of ``policy`` runs as int8 QDQ on this runtime (see module docstring)."""
    return bool(kernel_features(space, [policy]).int8[0])


def layer_runtime(space: SearchSpace, policy: Policy) -> dict[str, str]:
    """Layer name -> "int8" / "int4" for the layers of ``policy`` that run quantized (present
    layers with bits), as the features encode them and the export writes them."""
    kb = kernel_features(space, [policy])
    out: dict[str, str] = {}
    for i, ls in enumerate(space.layers):
        if kb.x[0, i, _K["int4"]] > 0.5:
            out[ls.name] = "int4"
        elif kb.x[0, i, _K["int8"]] > 0.5:
            out[ls.name] = "int8"
    return out


def space_from_dict(raw: Mapping[str, Any]) -> SearchSpace:
    """Inverse of ``SearchSpace.to_dict`` (calibration data stores the spaces it measured)."""
    layers = []
    for d in raw["layers"]:
        layers.append(
            LayerSpace(
                name=d["name"],
                features=LayerFeatures(**d["features"]),
                width_prunable=bool(d["width_prunable"]),
                width_leader=d["width_leader"],
                schemes=tuple(d["schemes"]),
                nm_choices=tuple((int(a), int(b)) for a, b in d["nm_choices"]),
                block_choices=tuple(int(b) for b in d["block_choices"]),
                bits_choices=tuple(None if b is None else int(b) for b in d["bits_choices"]),
                in_segments=tuple((s[0], int(s[1])) for s in d.get("in_segments", [])),
                in_expand=int(d.get("in_expand", 1)),
            )
        )
    blocks = tuple(BlockSpace(b["name"], tuple(b["layers"])) for b in raw["blocks"])
    opts = dict(raw["options"])
    options = SpaceOptions(
        schemes=tuple(opts["schemes"]),
        bits=tuple(None if b is None else int(b) for b in opts["bits"]),
        width=bool(opts["width"]),
        depth=bool(opts["depth"]),
        min_width=float(opts["min_width"]),
        max_sparsity=float(opts["max_sparsity"]),
        nm_choices=tuple((int(a), int(b)) for a, b in opts["nm_choices"]),
        block_choices=tuple(int(b) for b in opts["block_choices"]),
        round_to=int(opts.get("round_to", 1)),
    )
    edges = tuple((int(a), int(b)) for a, b in raw["edges"])
    return SearchSpace(layers=tuple(layers), blocks=blocks, edges=edges, options=options)
