"""Batched rows of the kernel predictor: a policy's compressed model as rows a regressor scores.

A compressed model is described to ``KernelGBDT`` (and ``GraphGNN``) as rows, one per unit of
work the runtime executes, each with a nominal ``work`` (MAC-equivalents) and features; the
predictor learns each row's *inverse efficiency* and the model's latency is the sum over rows:

* one row per **kernel** (a prunable layer; conv+bn+relu is one kernel, as ONNX Runtime fuses
  it) with the ops that serve it (the residual add after a block's last layer, layout
  reorders, quantize / dequantize nodes): its shape after the policy's channel pruning, its
  input / output / weight volume (memory traffic), arithmetic intensity, how it is wired
  (fan-in / fan-out in the layer graph, whether it closes a skippable block), whether the
  model runs as int8 QDQ, and the layout ONNX Runtime picks for it: a convolution whose
  channels suit the NCHWc blocks (16 on AVX-512) runs a kernel several times faster than one
  whose pruned channel count does not, and a layout change between neighbours costs a
  reorder, so pruning 48 channels to 40 can make a model *slower*;
* one **model** row: session overhead, input copy, and the per-op costs that scale with the
  number of kernels (pooling, reshapes).

Optionally (``policy_features``) the rows also carry the per-layer policy fields that change
nothing in the kernel's shape (scheme, sparsity, N:M, block, bits): a runtime with sparse or
low-bit kernels needs them; ONNX Runtime does not, and ``KernelGBDT`` keeps them only when
they improve its held-out error on the training data.

Speed: ``RowIndex`` precomputes everything static once per space; per batch of policies only
the fields a row depends on are read from the policies (widths of the width-leading layers,
bits, skips), and rows are reduced to *unique* rows (a row depends on its layer, its kept
channels, its precision and its neighbours' layouts and precisions, which repeat across
policies) before the regressor sees them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compression.policy import LayerPolicy, Policy
from compression.space import OP_TYPES, SearchSpace
from latency_models.features import (
    POLICY_FIELDS,
    SCHEME_CODES,
    LayerIndex,
    cached_index,
    encode_layer_policies,
)

__all__ = [
    "POLICY_FEATURES",
    "ROW_FEATURES",
    "ROW_TYPES",
    "PolicyArrays",
    "RowIndex",
    "RowSet",
    "row_index",
    "unique_rows",
]

#: Channel blocks of ONNX Runtime's NCHWc convolutions (AVX-512: 16, AVX2: 8); which one a CPU
#: uses is the device's business, so both flags are features and the trees pick.
NCHWC_BLOCKS: tuple[int, ...] = (16, 8)
#: Row types: the four kernel op types, then the weight-free rows.
ROW_TYPES: tuple[str, ...] = (*OP_TYPES, "model")
_MODEL = ROW_TYPES.index("model")

ROW_FEATURES: tuple[str, ...] = (
    "type",
    "in_channels",
    "out_channels",
    "kernel",
    "stride",
    "groups",
    "cin_per_group",
    "in_h",
    "in_w",
    "out_h",
    "out_w",
    "macs",
    "params",
    "in_numel",
    "out_numel",
    "intensity",
    "footprint_kb",
    "tokens",
    "fan_in",
    "fan_out",
    "block_out",
    "cin_mod16",
    "cout_mod16",
    "nchwc16",
    "nchwc8",
    "reorder16",
    "reorder8",
    "n_kernels",
    "n_adds",
    "int8",
    "int4",
    "qdq_edges",
)
#: Extra columns when ``policy_features`` is on (per-layer fields that keep the shape).
POLICY_FEATURES: tuple[str, ...] = POLICY_FIELDS  # scheme, sparsity, nm_n, nm_m, block, bits
_F = {n: i for i, n in enumerate(ROW_FEATURES)}
#: Key columns before the optional policy fields (see ``RowIndex.keys``).
N_KEY = 8 + len(NCHWC_BLOCKS)
#: Fixed cost of one op in MAC-equivalents (in ``work``): small kernels are overhead-bound.
OP_COST = 10_000.0


@dataclass(frozen=True)
class PolicyArrays:
    """What the rows need from P policies of one space (L layers, B blocks).

    Attributes:
        cin / cout: (P, L) kept input / output channels.
        present: (P, L) False for layers of skipped blocks.
        block_present: (P, B) False for skipped blocks.
        int8 / int4: (P, L) whether each layer runs as int8 QDQ / 4-bit MatMulNBits.
        qdq: (P, L) graph neighbours of each layer at another precision.
        fields: (P, L, 6) ``POLICY_FIELDS`` (scheme code, sparsity, N, M, block, bits, from
            ``features.encode_layer_policies``); None unless requested.
        layout: (P, L, 2 * len(NCHWC_BLOCKS)) per block size: NCHWc flag, and how many of the
            layer's graph neighbours (in and out) use the other layout.
    """

    cin: np.ndarray
    cout: np.ndarray
    present: np.ndarray
    block_present: np.ndarray
    int8: np.ndarray
    int4: np.ndarray
    qdq: np.ndarray
    fields: np.ndarray | None
    layout: np.ndarray


def base_design(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row roofline terms (MACs, memory traffic in elements, op count) and group (type, int8).

    The kernel predictor's first stage fits one non-negative cost per term and group on the
    model totals; the boosted trees then learn each row's deviation from it.
    """
    t = x[:, _F["type"]].astype(np.int64)
    int8 = (x[:, _F["int8"]] > 0.5) | (x[:, _F["int4"]] > 0.5)
    model = t == _MODEL
    traffic = x[:, _F["in_numel"]] + x[:, _F["out_numel"]] + x[:, _F["params"]]
    ops = np.where(model, 1.0 + x[:, _F["n_kernels"]], 1.0)
    design = np.stack([x[:, _F["macs"]] * 1e-6, traffic * 1e-6, ops], axis=1)
    return design, t * 2 + int8


N_GROUPS = 2 * len(ROW_TYPES)


@dataclass(frozen=True)
class RowSet:
    """Rows of a batch: ``x`` (R, F) features, ``work`` (R,), ``owner`` (R,) policy index."""

    x: np.ndarray
    work: np.ndarray
    owner: np.ndarray


def nchwc_ok(
    cin: np.ndarray, cout: np.ndarray, groups: np.ndarray, is_dw: np.ndarray, is_conv: np.ndarray, block: int
) -> np.ndarray:
    """Whether ONNX Runtime's NCHWc transformer takes a convolution (block size ``block``).

    Dense convolutions need fewer input channels than a block or a multiple of it (output
    channels are padded); depthwise ones a multiple of the block in channels; grouped ones
    multiples of the block per group on both sides. Others run the slower NCHW path, and a
    change of layout between neighbours costs a reorder of the tensor.
    """
    cpg = cin / groups
    dense = (groups == 1) & ((cin < block) | (cin % block == 0))
    dw = is_dw & (cout % block == 0)
    grouped = (
        (groups > 1) & ~is_dw & (cout % block == 0) & (cpg % block == 0) & ((cout / groups) % block == 0)
    )
    return is_conv & (dense | dw | grouped)


class RowIndex(LayerIndex):
    """Static facts of one space, computed once; ``arrays`` / ``rows`` batch policies."""

    def __init__(self, space: SearchSpace) -> None:
        super().__init__(space)
        L = self.n_layers
        f = [ls.features for ls in space.layers]
        self.tokens = np.where(self.op == OP_TYPES.index("linear"), self.in_h * self.in_w, 0.0)
        # Only the widths of layers that lead a channel group are ever read from a policy.
        used = sorted({int(i) for i in (*self.leader, *self.seg_leader) if i >= 0})
        self.width_layers = used
        self.width_names = [self.names[i] for i in used]
        col = {layer: j for j, layer in enumerate(used)}
        self.leader_col = np.array([col.get(int(i), -1) for i in self.leader], dtype=np.int64)
        self.seg_col = np.array([col.get(int(i), -1) for i in self.seg_leader], dtype=np.int64)
        self.t_out = self.tied[np.maximum(self.leader, 0)]
        self.t_seg = self.tied[np.maximum(self.seg_leader, 0)]
        # Blocks: skipping removes their layers and their residual add (on the block's output).
        B = len(space.blocks)
        self.block_out = np.zeros(B, dtype=np.int64)
        for j in range(B):
            idx = np.flatnonzero(self.block_layers[j])
            self.block_out[j] = int(idx.max()) if len(idx) else 0
        self.is_block_out = np.zeros(L)
        self.is_block_out[self.block_out[[j for j, b in enumerate(space.blocks) if b.layers]]] = 1.0
        e = np.asarray(space.edges, dtype=np.int64).reshape(-1, 2)
        self.is_conv = self.op != OP_TYPES.index("linear")
        #: layouts only meet between convolutions (linear layers see pooled / flattened tensors)
        self.conv_edge = self.is_conv[self.edge_src] & self.is_conv[self.edge_dst]
        self.fan_in = np.bincount(e[:, 1], minlength=L).astype(np.float64) if L else np.zeros(0)
        self.fan_out = np.bincount(e[:, 0], minlength=L).astype(np.float64) if L else np.zeros(0)
        first = f[0] if f else None
        self.input_channels = float(first.in_channels) if first else 0.0
        self.input_h = float(first.in_h) if first else 0.0
        cin_max = max([int(x.in_channels * e) for x, e in zip(f, self.expand, strict=True)] + [1])
        cout_max = max([x.out_channels for x in f] + [1])
        items = max(L, B, 1)
        #: Bit widths of the key columns (``keys``): fixed per space, so keys pack the same way
        #: in every batch and a memo of row predictions stays valid across calls.
        self.key_bits = [
            2,
            items.bit_length(),
            cin_max.bit_length(),
            cout_max.bit_length(),
            2,
            max(L, 1).bit_length(),
            max(B, 1).bit_length(),
            4,
        ] + [4] * len(NCHWC_BLOCKS)
        #: scheme code, sparsity in thousandths, N, M, block, bits
        self.field_bits = [max(max(SCHEME_CODES.values()), 1).bit_length(), 10, 7, 7, 7, 4]

    # -- policies -> arrays
    def arrays(self, policies: Sequence[Policy], fields: bool = False) -> PolicyArrays:
        """Kept channels, presence, per-layer precision (and the policy fields when ``fields``)."""
        P, L = len(policies), self.n_layers
        names, wnames = self.names, self.width_names
        widths: list[float] = []
        bits: list[int] = []
        skips = np.zeros((P, len(self.block_names)), dtype=np.float64)
        lps: list[LayerPolicy] = []
        blocks = self.block_names
        for p, policy in enumerate(policies):
            get, default = policy.layers.get, policy.default
            layer_pols = [get(n, default) for n in names]
            if fields:
                lps.extend(layer_pols)
            bits.extend([lp.bits or 0 for lp in layer_pols])
            widths.extend([get(n, default).width for n in wnames])
            for b in policy.skip:
                j = blocks.get(b)
                if j is not None:
                    skips[p, j] = 1.0
        w = np.asarray(widths, dtype=np.float64).reshape(P, len(wnames))
        bits_pl = np.asarray(bits, dtype=np.float64).reshape(P, L)
        if len(wnames):
            lead_w = np.where(self.leader_col >= 0, w[:, np.maximum(self.leader_col, 0)], 1.0)
            seg_w = np.where(self.seg_col >= 0, w[:, np.maximum(self.seg_col, 0)], 1.0)
        else:
            lead_w = np.ones((P, L))
            seg_w = np.ones((P, len(self.seg_len)))
        cout = np.where(
            self.leader_col >= 0,
            self.t_out * np.maximum(1.0, np.round(lead_w * (self.cout // self.t_out))),
            self.cout,
        )
        seg = np.where(
            self.seg_col >= 0,
            self.t_seg * np.maximum(1.0, np.round(seg_w * (self.seg_len // self.t_seg))),
            self.seg_len,
        )
        cin = (seg @ self.seg_to_layer) * self.expand
        present = (skips @ self.block_layers) < 0.5
        groups = np.where(self.is_dw, cout, self.groups)
        int8, int4, qdq = self.precision(bits_pl, present)
        out_fields: np.ndarray | None = None
        if fields:
            out_fields = encode_layer_policies(lps).reshape(P, L, len(POLICY_FIELDS))
        layout = np.zeros((P, L, 2 * len(NCHWC_BLOCKS)))
        fp32 = ~int8  # int8 QDQ convolutions run as QLinearConv: no NCHWc
        for bi, block in enumerate(NCHWC_BLOCKS):
            ok = nchwc_ok(cin, cout, groups, self.is_dw, self.is_conv, block) & present & fp32
            layout[:, :, 2 * bi] = ok
            if len(self.edge_src):
                live = present[:, self.edge_src] & present[:, self.edge_dst] & self.conv_edge
                diff = (ok[:, self.edge_src] != ok[:, self.edge_dst]) & live
                layout[:, :, 2 * bi + 1] = diff @ self.edge_incidence
        return PolicyArrays(cin, cout, present, skips < 0.5, int8, int4, qdq, out_fields, layout)

    # -- arrays -> unique row keys
    def keys(self, pa: PolicyArrays) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Integer key columns of every row, with its owner policy; rows that do not exist dropped.

        Returns (keys (R, K) int64, owner (R,), kind (R,) 0 kernel / 2 model), kernels first
        (policy-major, layers in order), then one model row per policy. Key
        columns: kind, item (layer or block index), cin, cout, precision (kernels: 0 fp32, 1 int8,
        2 int4; the model row: 1 if any layer is quantized), n_kernels, n_adds, precision changes
        to neighbours, layout changes at each NCHWc block size, then the 6 policy fields
        (sparsity in thousandths) when present. Equal keys mean equal rows.
        """
        P = pa.cin.shape[0]
        code = pa.int8.astype(np.int64) + 2 * pa.int4.astype(np.int64)
        pp, ll = np.nonzero(pa.present)
        base = N_KEY
        n_k = base + (6 if pa.fields is not None else 0)
        kern = np.zeros((len(pp), n_k), dtype=np.int64)
        kern[:, 1] = ll
        kern[:, 2] = pa.cin[pp, ll]
        kern[:, 3] = pa.cout[pp, ll]
        kern[:, 4] = code[pp, ll]
        kern[:, 7] = np.minimum(pa.qdq[pp, ll], 15)
        kern[:, 8:base] = np.minimum(pa.layout[pp, ll][:, 1::2], 15)
        if pa.fields is not None:
            fl = pa.fields[pp, ll]
            kern[:, base:] = fl
            kern[:, base + 1] = np.round(fl[:, 1] * 1000.0)
        model = np.zeros((P, n_k), dtype=np.int64)
        model[:, 0] = 2
        model[:, 4] = (code > 0).any(axis=1)
        model[:, 5] = pa.present.sum(axis=1)
        model[:, 6] = pa.block_present.sum(axis=1)
        keys = np.concatenate([kern, model])
        owner = np.concatenate([pp, np.arange(P)])
        return keys, owner, keys[:, 0]

    # -- unique keys -> feature rows
    def features(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feature rows (R, F [+ 6]) and ``work`` (R,) of key rows from ``keys``."""
        R = len(keys)
        policy_cols = keys.shape[1] > N_KEY
        x = np.zeros((R, len(ROW_FEATURES) + (len(POLICY_FEATURES) if policy_cols else 0)))
        kind = keys[:, 0]
        item = keys[:, 1]
        cin = keys[:, 2].astype(np.float64)
        cout = keys[:, 3].astype(np.float64)
        int8 = (keys[:, 4] == 1).astype(np.float64)
        int4 = (keys[:, 4] == 2).astype(np.float64)
        work = np.zeros(R)
        # kernels
        k = kind == 0
        li = item[k]
        kc, kcin = cout[k], cin[k]
        groups = np.where(self.is_dw[li], kc, self.groups[li])
        kk = self.kernel[li]
        ohw = self.out_h[li] * self.out_w[li]
        params = kcin / groups * kc * kk * kk
        macs = params * ohw
        in_numel = kcin * self.in_h[li] * self.in_w[li]
        out_numel = kc * ohw
        cols = {
            "type": self.op[li].astype(np.float64),
            "in_channels": kcin,
            "out_channels": kc,
            "kernel": kk,
            "stride": self.stride[li],
            "groups": groups,
            "cin_per_group": kcin / groups,
            "in_h": self.in_h[li],
            "in_w": self.in_w[li],
            "out_h": self.out_h[li],
            "out_w": self.out_w[li],
            "macs": macs,
            "params": params,
            "in_numel": in_numel,
            "out_numel": out_numel,
            "intensity": macs / (in_numel + out_numel + params),
            # bytes the kernel touches (fp32: 4 per element, int8: 1, int4: float activations and
            # half a byte per weight): cache-size cliffs
            "footprint_kb": (
                (in_numel + out_numel) * np.where(int8[k] > 0.5, 1.0, 4.0)
                + params * np.where(int8[k] > 0.5, 1.0, np.where(int4[k] > 0.5, 0.5, 4.0))
            )
            / 1024.0,
            "tokens": self.tokens[li],
            "fan_in": self.fan_in[li],
            "fan_out": self.fan_out[li],
            "block_out": self.is_block_out[li],
            "cin_mod16": kcin % 16,
            "cout_mod16": kc % 16,
            "int8": int8[k],
            "int4": int4[k],
            "qdq_edges": keys[k, 7].astype(np.float64),
        }
        is_conv = self.is_conv[li]
        fp32 = int8[k] < 0.5
        for b, block in enumerate(NCHWC_BLOCKS):
            cols[f"nchwc{block}"] = nchwc_ok(kcin, kc, groups, self.is_dw[li], is_conv, block) & fp32
            cols[f"reorder{block}"] = keys[k, 8 + b]
        for name, v in cols.items():
            x[k, _F[name]] = v
        work[k] = macs + in_numel + out_numel + params + OP_COST
        # the model row
        m = kind == 2
        x[m, _F["type"]] = _MODEL
        x[m, _F["in_channels"]] = self.input_channels
        x[m, _F["in_h"]] = self.input_h
        x[m, _F["in_numel"]] = self.input_numel
        x[m, _F["n_kernels"]] = keys[m, 5]
        x[m, _F["n_adds"]] = keys[m, 6]
        x[m, _F["int8"]] = keys[m, 4].astype(np.float64)
        work[m] = OP_COST * (1.0 + keys[m, 5]) + self.input_numel
        if policy_cols:
            x[:, len(ROW_FEATURES) :] = keys[:, N_KEY:]
            x[:, len(ROW_FEATURES) + 1] = keys[:, N_KEY + 1] / 1000.0
        return x, work

    def rows(self, policies: Sequence[Policy], fields: bool = False) -> RowSet:
        """Every row of every policy (no de-duplication; for fitting)."""
        keys, owner, _ = self.keys(self.arrays(policies, fields))
        x, work = self.features(keys)
        return RowSet(x, work, owner)


def row_index(space: SearchSpace) -> RowIndex:
    """The RowIndex of ``space``, cached by identity (spaces are frozen)."""
    return cached_index(RowIndex, space)


def unique_rows(idx: RowIndex, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(unique key rows, inverse index, their packed int64 keys or None).

    Keys pack into one int64 per row with ``idx.key_bits`` (fixed per space) when they fit in
    63 bits, which makes de-duplication a 1-D ``np.unique``; otherwise rows are compared whole.
    """
    if len(keys) == 0:
        return keys, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    bits = idx.key_bits + (idx.field_bits if keys.shape[1] > len(idx.key_bits) else [])
    b = np.asarray(bits, dtype=np.int64)
    if b.sum() <= 63 and keys.min() >= 0 and bool(np.all(keys.max(axis=0) < (np.int64(1) << b))):
        shifts = np.concatenate([np.cumsum(b[::-1])[::-1][1:], [0]]).astype(np.int64)
        packed = (keys << shifts).sum(axis=1)
        upacked, first, inv = np.unique(packed, return_index=True, return_inverse=True)
        return keys[first], inv.reshape(-1), upacked
    u, inv = np.unique(keys, axis=0, return_inverse=True)
    return u, inv.reshape(-1), None
