"""One-shot second-order recovery: masks and rounding chosen with the layer's Hessian (OBC).

Magnitude masks and round-to-nearest quantization (``compression.masks``) ignore what the
layer's inputs look like. Here every compressed Conv2d / Linear is treated as the
layer-wise problem of Optimal Brain Compression (Frantar & Alistarh 2022): keep the
layer's output on calibration inputs ``X`` as close as possible to what the uncompressed
weights gave, ``min ‖X Wᵀ − X Ŵᵀ‖²``, whose Hessian is ``H = 2 XᵀX`` (rows of ``X`` are
sampled output positions: im2col patches for a conv, tokens for a linear layer).

The solver is the column-blocked form of OBS used by SparseGPT and GPTQ (Frantar & Alistarh
2023; Frantar et al. 2023): with ``U`` the upper Cholesky factor of ``H⁻¹`` (damped by
``damp`` × the mean diagonal), columns are compressed one at a time, left to right, and each
column's error ``(w − q) / U_jj`` is pushed onto the columns still to come, so they
compensate for it. Compression of a column is:

* the mask: at the start of every block of ``blocksize`` columns the scheme's own
  :meth:`~compression.schemes.Scheme.mask` is called on the OBS saliency ``|w| / U_jj``
  (the root of ``w² / [H⁻¹]_jj``) of the weights as updated so far, with the decisions
  already taken locked in (kept: +huge, pruned: 0). The mask therefore satisfies its scheme
  exactly (N:M per run, whole 1×N blocks, exactly ``round(s · numel)`` zeros) by the scheme's
  own contract, adapts to the updates, and no code here knows which scheme it is;
* the rounding: symmetric per output channel on the grid of ``fake_quantize`` (scale =
  the channel's largest kept weight / ``2^(b−1) − 1``); that weight is put on the top level
  so the grid stays the one ``fake_quantize`` would find again, and the result is passed
  through ``fake_quantize`` at the end (idempotent on it, up to float rounding). Pruned
  weights are exactly zero, and zeros stay zero. A ``pow2`` layer rounds onto its
  power-of-two grid instead (``compression.pow2``: the per-channel scale chosen on the masked
  starting weights, the largest weight locked on the top level the same way, and
  ``pow2_quantize`` at the end finding that grid again).

A layer with a bias gets the bias as one more column of the problem (never pruned or
rounded, last): the error of every other column flows into it. Masked layers take their
columns in GPTQ's order (decreasing Hessian diagonal), and small ones then get their kept
weights solved exactly for the chosen mask before rounding (:class:`ObcOptions`, measured in
``bench/obc_bench.py`` and ``bench/RESULTS.md``).

Layers are done in graph order on the *compressed* model (sequential, as GPTQ and
``compression.reconstruct``): all calibration batches go through one node before the
next, so each layer's Hessian comes from the inputs the compressed upstream layers produce.
Layers that ``compression.reconstruct`` would re-fit (pruned input channels, or right after
a skipped block) are first fitted by least squares to the dense model's outputs on the
same rows, then compressed from that fit: the OBS error is measured from the fit, which is
the dense target up to an error no weight change can remove. BatchNorm runs on batch
statistics in the pass and those statistics are installed at the end (the pass is the
BatchNorm recalibration).

Grouped / depthwise convs are masked and rounded by magnitude (their per-group Hessians
are not implemented). :class:`ObcCache` (one per job) keeps results across candidates; see
its docstring for what is reused.
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx

from compression import schemes
from compression.apply import CompressedModel, get_tensor, set_tensor
from compression.evaluate import install_bn_stats, recalibrate_bn
from compression.graph import CONV, LINEAR, attr_target
from compression.masks import layer_mask, quantize_weight
from compression.policy import LayerPolicy
from compression.pow2 import pow2_round, pow2_scale
from compression.reconstruct import (
    _call_args,
    _CompressedPass,
    _Layer,
    _layers_to_refit,
    _pair,
    _solve,
    compressed_passes,
    conv_patches,
)

__all__ = [
    "HESSIANS",
    "RECOVERIES",
    "Hessians",
    "ObcCache",
    "ObcOptions",
    "Recovery",
    "RecoveryStats",
    "obs_compress",
    "recover",
]

Recovery = Literal["obc", "magnitude"]
#: ``obc``: this module; ``magnitude``: magnitude masks and round-to-nearest (``apply_policy``).
RECOVERIES: tuple[str, ...] = ("obc", "magnitude")
Hessians = Literal["sequential", "dense"]
HESSIANS: tuple[str, ...] = ("sequential", "dense")

_HUGE = 1e30  # saliency of a weight that must stay (kept earlier, or its channel's top level)
_FLOOR = 1e-20  # added to every free saliency, so a free zero weight still ranks above a locked prune


@dataclass
class RecoveryStats:
    """What one :func:`recover` call did (layer counts; ``cache_hits`` of the compressed ones)."""

    compressed: int = 0
    refitted: int = 0
    magnitude: int = 0  # left to magnitude masks / round-to-nearest (grouped convs, failed solves)
    cache_hits: int = 0


@dataclass(frozen=True)
class ObcOptions:
    """Knobs of :func:`recover` (defaults as measured in ``bench/obc_bench.py``).

    Attributes:
        max_rows: sampled rows (output pixels / tokens) per layer over all batches.
        damp: added to the Hessian's diagonal, as a fraction of its mean.
        blocksize: columns per lazy-update block (the mask is re-chosen at each block).
        ridge: strength of the least-squares re-fit (``compression.reconstruct._solve``).
        act_order: columns of *masked* layers by decreasing Hessian diagonal (GPTQ's order)
            instead of left to right (it helped masks and slightly hurt rounding alone on the
            ViT and ResNet-20; layers that are only quantized keep left to right).
        exact_flops: masked layers with ``O·(d+1)³`` up to this get their kept weights solved
            exactly for the chosen mask (:func:`obs_compress`).
        dense_target: every compressed layer is first fitted by least squares to the dense
            model's outputs (as a re-fitted layer is), not only those ``reconstruct`` picks.
    """

    max_rows: int = 8192
    damp: float = 0.01
    blocksize: int = 128
    ridge: float = 1e-3
    act_order: bool = True
    dense_target: bool = False
    exact_flops: float = 2e8


# --------------------------------------------------------------------------- the layer solver


Select = Callable[[torch.Tensor], torch.Tensor]
"""Saliency ``[O, d]`` (weight order) -> kept mask ``[O, d]`` that satisfies the scheme."""


def _upper_inverse_factor(h: torch.Tensor, damp: float, n_weights: int) -> tuple[torch.Tensor, float] | None:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` and λ (``damp`` × the mean diagonal over weight
    columns, raised tenfold up to 1000× while H + λI is not positive definite); None beyond."""
    h = h.clone()
    mean = float(h.diagonal()[:n_weights].mean())
    base = mean if mean > 0 else 1.0
    for scale in (1.0, 10.0, 100.0, 1000.0):
        lam = damp * scale * base
        try:
            low = torch.linalg.cholesky(h + lam * torch.eye(h.shape[0], dtype=h.dtype))
            return torch.linalg.cholesky(torch.cholesky_inverse(low), upper=True), lam
        except RuntimeError:  # torch.linalg.LinAlgError: not positive definite at this damping
            continue
    return None


def obs_compress(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    select: Select | None = None,
    bits: int | None = None,
    bias: torch.Tensor | None = None,
    damp: float = 0.01,
    blocksize: int = 128,
    act_order: bool = False,
    exact_flops: float = 0.0,
    pow2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """Prune (``select``) and/or quantize (``bits``) ``w`` ``[O, d]`` against ``hessian``.

    ``hessian`` is ``[d, d]``, or ``[d + 1, d + 1]`` with ``bias`` (its input column of ones
    last). ``act_order`` processes columns by decreasing Hessian diagonal (GPTQ's order)
    instead of left to right. Returns ``(weight, bias, mask)`` (bias None without one, mask
    None without ``select``), weights exactly zero where the mask is False and on
    ``fake_quantize``'s grid with ``bits`` (the power-of-two grid with ``pow2``); None if
    the Hessian cannot be factored even
    with heavy damping.

    When the layer is small enough (``O·(d+1)³ <= exact_flops``), the kept weights of every
    output channel are then solved exactly for the chosen mask (least squares on H, which the
    column-by-column pass only approximates: a pruned column's error reaches only the columns
    after it), and rounding runs as a second pass on that solution with the mask fixed.
    """
    out_ch, d = w.shape
    wide = torch.cat([w, bias[:, None]], dim=1) if bias is not None else w
    width = wide.shape[1]
    if hessian.shape != (width, width):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({width}, {width})")
    exact = select is not None and out_ch * float(width) ** 3 <= exact_flops
    if exact and bits is not None:
        pruned = obs_compress(
            w, hessian, select=select, bias=bias, damp=damp, blocksize=blocksize,
            act_order=act_order, exact_flops=exact_flops,
        )  # fmt: skip
        if pruned is None:
            return None
        fixed = pruned[2]
        assert fixed is not None
        return obs_compress(
            pruned[0], hessian, select=lambda _sal: fixed, bits=bits, bias=pruned[1], damp=damp,
            blocksize=blocksize, act_order=act_order, pow2=pow2,
        )  # fmt: skip
    h = hessian.double()
    perm = torch.arange(width)
    if act_order:
        perm[:d] = torch.argsort(h.diagonal()[:d], descending=True, stable=True)
        h = h[perm][:, perm]
    inv = torch.argsort(perm[:d])
    factored = _upper_inverse_factor(h, damp, d)
    if factored is None:
        return None
    u, lam = factored
    W = wide.detach().double()[:, perm].clone()
    diag = u.diagonal()[:d]
    locked = torch.zeros(out_ch, d, dtype=torch.int8)  # 1 kept, -1 pruned, 0 undecided

    def choose() -> torch.Tensor:
        assert select is not None
        sal = (W[:, :d].abs() / diag).float() + _FLOOR
        sal[locked == 1] = _HUGE
        sal[locked == -1] = 0.0
        return select(sal[:, inv])[:, perm[:d]]  # the scheme sees the weight's own layout

    mask = choose() if select is not None else None
    qmax = 2 ** (bits - 1) - 1 if bits is not None else 0
    scale = torch.ones(out_ch, dtype=torch.float64)
    at_top: dict[int, torch.Tensor] = {}  # column -> channels whose top level it holds
    if bits is not None:
        kept = W[:, :d].abs() * (mask if mask is not None else 1.0)
        amax, top = kept.max(dim=1)
        scale = pow2_scale(kept, bits) if pow2 else amax.clamp(min=1e-12) / qmax
        rows = torch.nonzero(amax > 0).flatten()
        locked[rows, top[rows]] = 1  # the channel's largest weight stays: it sets the grid
        for r, c in zip(rows.tolist(), top[rows].tolist(), strict=True):
            at_top.setdefault(c, torch.zeros(out_ch, dtype=torch.bool))[r] = True
    for i1 in range(0, width, blocksize):
        i2 = min(i1 + blocksize, width)
        if select is not None and 0 < i1 < d:
            mask = choose()
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        U1 = u[i1:i2, i1:i2]
        M1 = mask[:, i1:i2].double() if mask is not None and i1 < d else None
        for i in range(i2 - i1):
            col = i1 + i
            wc = W1[:, i]
            if col < d:
                q = wc * M1[:, i] if M1 is not None else wc
                if bits is not None and pow2:
                    rows_top = at_top.get(col)
                    q = pow2_round(q, scale, bits)
                    if rows_top is not None:
                        q = torch.where(rows_top, torch.where(wc >= 0, scale, -scale), q)
                elif bits is not None:
                    level = torch.clamp(torch.round(q / scale), -qmax, qmax)
                    rows_top = at_top.get(col)
                    if rows_top is not None:
                        level = torch.where(rows_top, torch.where(wc >= 0, qmax, -qmax).double(), level)
                    q = level * scale
            else:
                q = wc  # the bias: never pruned or rounded, takes the others' error
            Q1[:, i] = q
            err = (wc - q) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            E1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ u[i1:i2, i2:]
        if mask is not None and i1 < d:
            j2 = min(i2, d)
            locked[:, i1:j2] = torch.where(mask[:, i1:j2], 1, -1).to(torch.int8)
    W = W[:, torch.cat([inv, torch.arange(d, width)])]
    out_mask = mask[:, inv] if mask is not None else None
    if exact and out_mask is not None:
        solved = _solve_kept(wide.detach().double(), hessian.double(), lam, out_mask)
        W = solved if solved is not None else W  # not factorable: keep the OBS result
    new_w = W[:, :d].to(w.dtype)
    if out_mask is not None:
        new_w = torch.where(out_mask, new_w, torch.zeros_like(new_w))
    if bits is not None:
        new_w = quantize_weight(new_w, bits, pow2=pow2)
    new_b = W[:, d].to(bias.dtype) if bias is not None else None
    return new_w, new_b, out_mask


def _solve_kept(w0: torch.Tensor, h: torch.Tensor, lam: float, mask: torch.Tensor) -> torch.Tensor | None:
    """Per output channel, the kept weights that best make up for the pruned ones:
    ``w_K = w0_K + H_KK⁻¹ H_KP w0_P`` (pruned ``w_P = 0``; a bias column, if any, is kept),
    as one batched solve with the pruned rows and columns of H replaced by the identity."""
    out_ch, width = w0.shape
    keep = torch.ones(out_ch, width, dtype=torch.float64)
    keep[:, : mask.shape[1]] = mask.double()
    hd = h + lam * torch.eye(width, dtype=h.dtype)
    a = hd[None] * keep[:, :, None] * keep[:, None, :] + torch.diag_embed(1.0 - keep)
    rhs = keep * ((w0 * (1.0 - keep)) @ hd)  # H is symmetric: row r of (w0 ⊙ p) H = H (w0_r ⊙ p_r)
    # ``a`` is symmetric positive definite (damped H on the kept block, identity elsewhere), so a
    # Cholesky solve: LAPACK's pivoted LU (torch.linalg.solve) was seen to hang, printing
    # "DLASWP parameter 6", in a runner thread of the server. None when it does not factor.
    if not (torch.isfinite(a).all() and torch.isfinite(rhs).all()):
        return None
    chol, info = torch.linalg.cholesky_ex(a)
    if bool((info != 0).any()):
        return None
    return w0 * keep + torch.cholesky_solve(rhs[:, :, None], chol)[:, :, 0]


def _selector(lp: LayerPolicy, shape: torch.Size) -> Select | None:
    """The scheme's mask on a saliency tensor laid out like the weight (None: nothing zeroed)."""
    scheme = schemes.get(lp.scheme)
    probe = scheme.mask(torch.ones(shape), lp)
    if probe is None:
        return None

    def select(sal: torch.Tensor) -> torch.Tensor:
        mask = scheme.mask(sal.reshape(shape), lp)
        assert mask is not None
        return mask.reshape(shape[0], -1)

    return select


# --------------------------------------------------------------------------- cache


class ObcCache:
    """Results kept across the candidates of one job (one model, one set of calibration batches).

    * compressed layers, keyed by their exact inputs: a digest of everything upstream of the
      layer in the compressed graph (node names, ops and arguments, every tensor they read,
      after compression) and of the calibration batches, plus the layer's own uncompressed
      weight and policy. A hit is the very result the layer would get again (the computation
      is deterministic), so candidates that share their first layers' choices skip their
      Hessians and solves. Least-recently used entries go beyond ``max_bytes``;
    * with ``hessians="dense"`` (:func:`recover`), the dense model's Hessians per layer
      (computed once) and the results made from them, keyed by the layer's own weight and
      policy only (the upstream compressed choices are ignored: an approximation).
    """

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self._results: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = (
            OrderedDict()
        )
        self._bytes = 0
        self.dense_hessians: dict[str, dict[str, torch.Tensor]] = {}  # batches digest -> node -> H
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        found = self._results.get(key)
        if found is None:
            self.misses += 1
            return None
        self._results.move_to_end(key)
        self.hits += 1
        return found

    def put(self, key: str, value: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]) -> None:
        size = sum(t.numel() * t.element_size() for t in value if t is not None)
        if key in self._results or size > self.max_bytes:
            return
        self._results[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._results.popitem(last=False)
            self._bytes -= sum(t.numel() * t.element_size() for t in old if t is not None)

    def __len__(self) -> int:
        return len(self._results)


def _digest_tensor(h: Any, t: torch.Tensor) -> None:
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().contiguous().cpu().numpy().tobytes())


def _batches_digest(batches: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha1()
    for x in batches:
        _digest_tensor(h, x)
    return h.hexdigest()


# --------------------------------------------------------------------------- the pass


@dataclass
class _Target:
    """A layer to compress here: its weights and what its policy asks for."""

    name: str
    weight: str
    bias: str | None
    lp: LayerPolicy


@functools.lru_cache(maxsize=4096)
def _rows(node: str, batch: int, total: int, per_batch: int) -> torch.Tensor:
    """Sampled row indices of one layer in one batch: fixed by the layer's name, so a layer
    samples the same rows whatever else the policy does (which the cache relies on)."""
    if total <= per_batch:
        return torch.arange(total)
    gen = torch.Generator().manual_seed(zlib.crc32(node.encode()) * 131 + batch)
    return torch.randperm(total, generator=gen)[:per_batch].sort().values


def _out_hw(x: torch.Tensor, params: dict[str, Any], kernel: tuple[int, int]) -> tuple[int, int]:
    sh, sw = _pair(params["stride"])
    dh, dw = _pair(params["dilation"])
    pad = params["padding"]
    if isinstance(pad, str):
        if pad == "same":
            return (int(x.shape[2]), int(x.shape[3]))
        ph = pw = 0
    else:
        ph, pw = _pair(pad)
    h = (int(x.shape[2]) + 2 * ph - dh * (kernel[0] - 1) - 1) // sh + 1
    w = (int(x.shape[3]) + 2 * pw - dw * (kernel[1] - 1) - 1) // sw + 1
    return (h, w)


def _inputs(node: fx.Node, params: dict[str, Any], batch: int, per_batch: int) -> torch.Tensor:
    """The layer's input rows (im2col patches of sampled output pixels, or sampled tokens)."""
    x, w = params["input"], params["weight"]
    if node.target in CONV:
        kernel = (int(w.shape[2]), int(w.shape[3]))
        hw = _out_hw(x, params, kernel)
        rows = _rows(node.name, batch, int(x.shape[0]) * hw[0] * hw[1], per_batch)
        return conv_patches(
            x, rows, hw, kernel, params["stride"], params["padding"], params["dilation"]
        ).float()
    flat = x.reshape(-1, x.shape[-1])
    return flat[_rows(node.name, batch, flat.shape[0], per_batch)].float()


def _outputs(
    node: fx.Node, out: torch.Tensor, keep: torch.Tensor, batch: int, per_batch: int
) -> torch.Tensor:
    """The dense layer's output at the rows :func:`_inputs` samples, on the kept channels."""
    if node.target in CONV:
        h, w = int(out.shape[2]), int(out.shape[3])
        rows = _rows(node.name, batch, int(out.shape[0]) * h * w, per_batch)
        b, rem = rows // (h * w), rows % (h * w)
        return out[b, :, rem // w, rem % w][:, keep].float()
    flat = out.reshape(-1, out.shape[-1])
    return flat[_rows(node.name, batch, flat.shape[0], per_batch)][:, keep].float()


class _DenseRecorder(fx.Interpreter):
    """Runs the dense model once per batch; keeps the refit layers' outputs and, if asked,
    the Gram matrices of every groups-1 layer's inputs (for ``hessians="dense"``)."""

    def __init__(
        self, gm: fx.GraphModule, refit: dict[str, _Layer], grams: bool, batch: int, per_batch: int
    ) -> None:
        super().__init__(gm)
        self.refit, self.grams, self.batch, self.per_batch = refit, grams, batch, per_batch
        self.targets: dict[str, torch.Tensor] = {}
        self.gram: dict[str, torch.Tensor] = {}
        self._node: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self._node = n  # call_function sees values only
        out = super().run_node(n)
        layer = self.refit.get(n.name)
        if layer is not None:
            self.targets[n.name] = _outputs(n, out, layer.out_keep, self.batch, self.per_batch)
        return out

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if self.grams and target in CONV | LINEAR:
            node = self._node
            assert node is not None
            params = _call_args(node, args, kwargs)
            if target not in CONV or int(params["groups"]) == 1:
                xs = _inputs(node, params, self.batch, self.per_batch)
                if params["bias"] is not None:
                    xs = torch.cat([xs, torch.ones(len(xs), 1)], dim=1)
                self.gram[node.name] = (xs.T @ xs).double()
        return super().call_function(target, args, kwargs)


def _magnitude(cm: CompressedModel, target: _Target) -> None:
    """What ``apply_policy`` does to a layer: magnitude mask, then round-to-nearest."""
    w = get_tensor(cm.gm, target.weight)
    mask = layer_mask(w, target.lp)
    if mask is not None:
        w = w * mask
        cm.masks[target.weight] = mask
    if target.lp.bits is not None:
        w = quantize_weight(w, target.lp.bits, pow2=target.lp.pow2)
        (cm.pow2 if target.lp.pow2 else cm.bits)[target.weight] = target.lp.bits
    if mask is not None or target.lp.bits is not None:
        set_tensor(cm.gm, target.weight, w)


def _out_keep(cm: CompressedModel, target: _Target) -> torch.Tensor:
    """Dense output channels the layer still computes (as ``reconstruct`` finds them)."""
    graph = cm.source.graph
    info = graph.layer(target.name)
    keep = cm.keep.get(graph.groups.find(info.out_group)) if info.out_group is not None else None
    return keep if keep is not None else torch.arange(get_tensor(cm.gm, target.weight).shape[0])


def _targets(cm: CompressedModel) -> tuple[dict[str, _Target], list[_Target]]:
    """Layers to compress by OBS (by node), and grouped convs left to magnitude."""
    by_node = {info.node: info for info in cm.source.graph.layers}
    obs: dict[str, _Target] = {}
    grouped: list[_Target] = []
    for node in cm.gm.graph.nodes:
        info = by_node.get(node.name)
        if info is None or node.op != "call_function" or node.target not in CONV | LINEAR:
            continue
        lp = cm.policy.for_layer(info.name)
        params = _call_args(node, node.args, dict(node.kwargs))
        weight = attr_target(params["weight"])
        if weight is None or weight != info.weight:
            continue
        if lp.bits is None and _selector(lp, get_tensor(cm.gm, weight).shape) is None:
            continue
        target = _Target(info.name, weight, attr_target(params["bias"]), lp)
        if node.target in CONV and int(params["groups"]) != 1:
            grouped.append(target)
        else:
            obs[node.name] = target
    return obs, grouped


@torch.no_grad()
def recover(
    cm: CompressedModel,
    batches: Sequence[torch.Tensor],
    *,
    refit: bool = True,
    cache: ObcCache | None = None,
    hessians: Hessians = "sequential",
    options: ObcOptions | None = None,
) -> RecoveryStats:
    """Mask and quantize ``cm``'s layers by OBS / GPTQ, in graph order; recalibrate BatchNorm.

    ``cm`` must come from ``apply_policy(..., fine_grained=False)`` (channels removed, weights
    still dense); this fills ``cm.masks``, ``cm.bits`` and ``cm.pow2`` as ``apply_policy`` would. With
    ``refit`` the layers ``compression.reconstruct`` re-fits are fitted to the dense outputs
    first. ``hessians="dense"`` takes each layer's Hessian from the dense model's inputs
    (cached in ``cache`` once per job) where the layer's inputs are not pruned and it is not
    re-fitted, instead of from the compressed model's: cheaper across a search, less exact.
    Changes ``cm.gm`` in place.
    """
    if hessians not in HESSIANS:
        raise ValueError(f"hessians must be one of {HESSIANS}, got {hessians!r}")
    stats = RecoveryStats()
    targets, grouped = _targets(cm)
    for t in grouped:
        _magnitude(cm, t)
        stats.magnitude += 1
    opts = options or ObcOptions()
    refits = _layers_to_refit(cm) if refit else {}
    if opts.dense_target:
        for name, t in targets.items():
            if name not in refits:
                refits[name] = _Layer(name, t.weight, t.bias, _out_keep(cm, t))
    if not batches or (not targets and not refits):
        recalibrate_bn(cm.gm, batches)
        return stats
    per_batch = max(1, opts.max_rows // len(batches))
    digest = _batches_digest(batches) if cache is not None or hessians == "dense" else ""
    cache = cache if cache is not None else (ObcCache() if hessians == "dense" else None)
    want_grams = hessians == "dense" and cache is not None and digest not in cache.dense_hessians
    targets_out: list[dict[str, torch.Tensor]] = []
    if refits or want_grams:
        grams: dict[str, torch.Tensor] = {}
        for b, x in enumerate(batches):
            rec = _DenseRecorder(cm.source.gm, refits, want_grams, b, per_batch)
            rec.run(x)
            targets_out.append(rec.targets)
            for k, g in rec.gram.items():
                grams[k] = grams[k] + g if k in grams else g
        if want_grams and cache is not None:
            cache.dense_hessians[digest] = {k: 2.0 * g for k, g in grams.items()}
    dense_h = cache.dense_hessians.get(digest, {}) if cache is not None and hessians == "dense" else {}

    gm = cm.gm
    nodes, last_use, passes = compressed_passes(gm, batches)
    upstream = hashlib.sha1(digest.encode())
    for node in nodes:
        target, layer = targets.get(node.name), refits.get(node.name)
        if target is not None or layer is not None:
            _layer(
                cm,
                node,
                target,
                layer,
                passes,
                targets_out,
                upstream,
                cache,
                dense_h,
                stats,
                per_batch=per_batch,
                opts=opts,
            )
        for p in passes:
            p.env[node] = p.run_node(node)
            for inp in node.all_input_nodes:
                if last_use.get(inp) is node:
                    del p.env[inp]
        if cache is not None:  # what this node computed from, for the next layers' keys
            upstream.update(f"{node.name}|{node.op}|{node.target}|{node.args}|{node.kwargs}".encode())
            if node.op == "call_function":
                for arg in node.all_input_nodes:
                    if arg.op == "get_attr":
                        _digest_tensor(upstream, get_tensor(gm, str(arg.target)))
    install_bn_stats(gm, passes, len(passes))
    return stats


def _layer(
    cm: CompressedModel,
    node: fx.Node,
    target: _Target | None,
    layer: _Layer | None,
    passes: Sequence[_CompressedPass],
    dense_targets: Sequence[dict[str, torch.Tensor]],
    upstream: Any,
    cache: ObcCache | None,
    dense_h: dict[str, torch.Tensor],
    stats: RecoveryStats,
    *,
    per_batch: int,
    opts: ObcOptions,
) -> None:
    """Re-fit and/or compress one layer from its inputs in every pass; hand the passes the result."""
    weight_t = target.weight if target is not None else layer.weight  # type: ignore[union-attr]
    bias_t = target.bias if target is not None else layer.bias  # type: ignore[union-attr]
    w = get_tensor(cm.gm, weight_t)
    bias = get_tensor(cm.gm, bias_t) if bias_t is not None else None
    use_dense = (
        layer is None
        and node.name in dense_h
        and dense_h[node.name].shape[0] == (w[0].numel() + int(bias is not None))
    )
    key = None
    if cache is not None:
        h = hashlib.sha1(b"dense" if use_dense else upstream.digest())
        h.update(node.name.encode())
        _digest_tensor(h, w)
        if bias is not None:
            _digest_tensor(h, bias)
        lp = target.lp.to_dict() if target is not None else None
        h.update(f"{lp}|{layer is not None}|{per_batch}|{opts}".encode())
        key = h.hexdigest()
        found = cache.get(key)
        if found is not None:
            stats.cache_hits += 1
            _install(cm, node, target, layer, weight_t, bias_t, found, passes, stats)
            return
    if use_dense:
        gram = dense_h[node.name] / 2.0
        cross = None
    else:
        gram, cross = _grams(cm, node, layer, bias is not None, passes, dense_targets, per_batch)
    new_w, new_b = w, bias
    if layer is not None and cross is not None:
        w0 = w.detach().reshape(w.shape[0], -1).double()
        if bias is not None:
            w0 = torch.cat([w0, bias.detach().double()[:, None]], dim=1)
        sol = _solve(gram, cross, w0, bias is not None, opts.ridge)
        if sol is not None:
            new_w = sol[:, : w0.shape[1] - int(bias is not None)].reshape(w.shape).to(w.dtype)
            new_b = sol[:, -1].to(w.dtype) if bias is not None else None
    if target is not None:
        solved = obs_compress(
            new_w.reshape(w.shape[0], -1),
            2.0 * gram,
            select=_selector(target.lp, w.shape),
            bits=target.lp.bits,
            pow2=target.lp.pow2,
            bias=new_b,
            damp=opts.damp,
            blocksize=opts.blocksize,
            act_order=opts.act_order and target.lp.target_sparsity > 0,
            exact_flops=opts.exact_flops,
        )
        if solved is None:
            set_tensor(cm.gm, weight_t, new_w)
            _magnitude(cm, target)
            stats.magnitude += 1
            result = (get_tensor(cm.gm, weight_t), new_b, cm.masks.get(weight_t))
            _install(cm, node, target, layer, weight_t, bias_t, result, passes, stats, count=False)
            return
        sw, sb, smask = solved
        result = (sw.reshape(w.shape), sb, smask.reshape(w.shape) if smask is not None else None)
    else:
        result = (new_w, new_b, None)
    if cache is not None and key is not None:
        cache.put(key, result)
    _install(cm, node, target, layer, weight_t, bias_t, result, passes, stats)


def _grams(
    cm: CompressedModel,
    node: fx.Node,
    layer: _Layer | None,
    has_bias: bool,
    passes: Sequence[_CompressedPass],
    dense_targets: Sequence[dict[str, torch.Tensor]],
    per_batch: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """XᵀX over the sampled rows of every batch (and Xᵀ·dense output for a re-fitted layer)."""
    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    for b, p in enumerate(passes):
        args, kwargs = p.fetch_args_kwargs_from_env(node)
        xs = _inputs(node, _call_args(node, args, kwargs), b, per_batch)
        if has_bias:
            xs = torch.cat([xs, torch.ones(len(xs), 1)], dim=1)
        g = (xs.T @ xs).double()
        gram = g if gram is None else gram + g
        if layer is not None:
            c = (xs.T @ dense_targets[b][node.name]).double()
            cross = c if cross is None else cross + c
    assert gram is not None
    return gram, cross


def _install(
    cm: CompressedModel,
    node: fx.Node,
    target: _Target | None,
    layer: _Layer | None,
    weight_t: str,
    bias_t: str | None,
    result: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    passes: Sequence[_CompressedPass],
    stats: RecoveryStats,
    *,
    count: bool = True,
) -> None:
    new_w, new_b, mask = result
    set_tensor(cm.gm, weight_t, new_w)
    updated = {weight_t: get_tensor(cm.gm, weight_t)}
    if bias_t is not None and new_b is not None:
        set_tensor(cm.gm, bias_t, new_b)
        updated[bias_t] = get_tensor(cm.gm, bias_t)
    if target is not None:
        if mask is not None:
            cm.masks[weight_t] = mask
        if target.lp.bits is not None:
            (cm.pow2 if target.lp.pow2 else cm.bits)[weight_t] = target.lp.bits
        stats.compressed += int(count)
    if layer is not None:
        stats.refitted += 1
    for arg in node.all_input_nodes:  # the weight's get_attr already ran in every pass
        t = attr_target(arg)
        if t in updated:
            for p in passes:
                p.env[arg] = updated[t]
