"""Feature-map reconstruction: re-fit pruned layers so their outputs match the dense model's.

Removing input channels of a Conv2d / Linear without fine-tuning leaves the remaining
weights tuned for inputs that are gone. As in channel pruning by reconstruction (He et
al. 2017, ThiNet, AMC), each layer whose inputs were pruned is re-fitted by ridge least
squares so that, on a few calibration images, its output matches the dense model's
output on the kept output channels.

How it runs:

* the dense model is run once per calibration batch (eval semantics) and, for every
  layer to re-fit, the output (before BatchNorm) is recorded at a random subset of
  rows (output pixels; at most ``max_rows`` over all batches, fixed seed);
* the compressed model is then run on all batches in lock-step, node by node. At a
  layer to re-fit its *actual* input in the compressed model is read at the same
  rows (im2col of those rows only), the weights are solved for, and the pass goes
  on with the new weights: later layers see, and so compensate, the remaining error
  of earlier ones (sequential reconstruction);
* BatchNorm nodes in that pass normalise with batch statistics. Reconstruction runs
  before ``recalibrate_bn``, so the running statistics are still the dense model's and
  would not fit pruned activations; batch statistics are what recalibration will
  install, so later layers are fitted on the inputs they will see when scored.

The layers right after a skipped residual block (the first conv / linear layers its output
reaches, up to the next block's add) are re-fitted too, pruned inputs or not: their input
lost the block's contribution, and a fit to the dense outputs takes most of that back.

Left alone: depthwise / grouped convs (their inputs are their own output channels, a
per-channel filter has nothing to re-mix), layers with a fine-grained mask (a fit
would fill the zeroed weights), and the other layers whose input channels were not pruned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from compression.apply import CompressedModel, _positions, get_tensor, set_tensor
from compression.evaluate import _BNRecalibrator, install_bn_stats, recalibrate_bn
from compression.graph import CONV, LINEAR, attr_target
from compression.masks import fake_quantize, quantize_weight

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_LINEAR_ARGS = ("input", "weight", "bias")
SEED = 0


def _call_args(node: fx.Node, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a conv2d / linear call by name (positional, keyword or default)."""
    names = _CONV_ARGS if node.target in CONV else _LINEAR_ARGS
    out = dict(_CONV_DEFAULTS)
    out.update(zip(names, args, strict=False))
    out.update(kwargs)
    return out


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


@dataclass
class _Layer:
    """A layer to re-fit: where its weights live and which output channels it kept."""

    node: str
    weight: str
    bias: str | None
    out_keep: torch.Tensor  # dense output channels the compressed layer still computes


@dataclass
class _Rows:
    """Sampled output positions of one batch and the dense outputs there."""

    rows: torch.Tensor  # indices into the flattened output positions (N·H·W, or all leading dims)
    spatial: tuple[int, int]  # conv output (H, W); (1, 1) for linear
    target: torch.Tensor  # [rows, kept out channels], float32


def after_skipped(cm: CompressedModel) -> set[str]:
    """Conv / linear nodes that read a skipped block's output: the first such layers reached
    from its add in the source graph, through any other ops up to the next block's add."""
    if not cm.policy.skip:
        return set()
    src = cm.source
    nodes = {n.name: n for n in src.gm.graph.nodes}
    adds = {b.add_node for b in src.graph.blocks}
    found: set[str] = set()
    for block in src.graph.blocks:
        if block.name not in cm.policy.skip:
            continue
        todo, seen = list(nodes[block.add_node].users), set()
        while todo:
            node = todo.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.op == "call_function" and node.target in CONV | LINEAR:
                found.add(node.name)
            elif node.name not in adds:
                todo.extend(node.users)
    return found


def _layers_to_refit(cm: CompressedModel) -> dict[str, _Layer]:
    """Conv/linear nodes of ``cm.gm`` whose inputs were pruned (or that follow a skipped block)
    and that a fit can change.

    Kept output channels come from ``cm.keep`` via the layer's output space in the
    source graph: that is exactly how ``apply_policy`` sliced dim 0 of the weight (one
    segment of the layer's own group, or one per run for a layer split where a concat's
    runs meet its output).
    """
    graph = cm.source.graph
    by_node = {info.node: info for info in graph.layers}
    layers: dict[str, _Layer] = {}
    after_skip = after_skipped(cm)
    for node in cm.gm.graph.nodes:
        if node.op != "call_function" or node.target not in CONV | LINEAR:
            continue
        info = by_node.get(node.name)
        weight = attr_target(node.args[1]) if len(node.args) > 1 else None
        if info is None or weight is None or weight != info.weight or weight in cm.masks:
            continue
        params = _call_args(node, node.args, dict(node.kwargs))
        if node.target in CONV and int(params["groups"]) != 1:
            continue
        w, dense = get_tensor(cm.gm, weight), get_tensor(cm.source.gm, weight)
        if w.shape[1] >= dense.shape[1] and node.name not in after_skip:
            continue
        keep: torch.Tensor | None = None
        if info.out_space is not None:
            keep = _positions(info.out_space.with_dim(0), cm.keep, graph)
        out_keep = torch.arange(dense.shape[0]) if keep is None else keep
        if len(out_keep) != w.shape[0]:  # not the slicing we expect: do not guess
            continue
        layers[node.name] = _Layer(node.name, weight, attr_target(params["bias"]), out_keep)
    return layers


class _DenseRecorder(fx.Interpreter):
    """Runs the dense model and keeps the watched layers' outputs at sampled rows."""

    def __init__(self, gm: fx.GraphModule, layers: dict[str, _Layer], rows: int, gen: torch.Generator):
        super().__init__(gm)
        self.layers = layers
        self.rows = rows
        self.gen = gen
        self.seen: dict[str, _Rows] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        layer = self.layers.get(n.name)
        if layer is not None:
            conv = n.target in CONV
            spatial = (int(out.shape[2]), int(out.shape[3])) if conv else (1, 1)
            total = out.numel() // out.shape[1 if conv else -1]
            if total > self.rows:
                rows = torch.randperm(total, generator=self.gen)[: self.rows].sort().values
            else:
                rows = torch.arange(total)
            keep = layer.out_keep
            if conv:  # index the sampled pixels directly: a permuted copy of the map costs more
                h, w = spatial
                b, rem = rows // (h * w), rows % (h * w)
                target = out[b, :, rem // w, rem % w][:, keep]
            else:
                target = out.reshape(-1, out.shape[-1])[rows][:, keep]
            self.seen[n.name] = _Rows(rows, spatial, target)
        return out


def conv_patches(
    x: torch.Tensor,
    rows: torch.Tensor,
    out_hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: Any,
    padding: Any,
    dilation: Any,
) -> torch.Tensor:
    """im2col of the given output positions only: ``[len(rows), C·kh·kw]``.

    Row ``r`` is output pixel ``(n, oh, ow)`` flattened as ``n·H·W + oh·W + ow``; columns
    are ordered like a flattened ``[C, kh, kw]`` weight, so the result equals the rows of
    ``F.unfold(x, ...).transpose(1, 2).reshape(-1, C·kh·kw)`` without building all of it.
    """
    kh, kw = kernel
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        else:  # "same": PyTorch puts the odd pixel of padding on the right/bottom
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        ph, pw = _pair(padding)
        pads = (pw, pw, ph, ph)
    h, w = out_hw
    n, rem = rows // (h * w), rows % (h * w)
    oh, ow = rem // w, rem % w
    if kh == kw == 1 and not any(pads):  # pointwise: the patch is one input pixel
        return x[n, :, oh * sh, ow * sw]
    xp = F.pad(x, pads) if any(pads) else x
    ki = torch.arange(kh).repeat_interleave(kw)
    kj = torch.arange(kw).repeat(kh)
    hi = oh[:, None] * sh + ki[None, :] * dh  # [R, K]
    wi = ow[:, None] * sw + kj[None, :] * dw
    c = torch.arange(x.shape[1])
    patches = xp[n[:, None, None], c[None, :, None], hi[:, None, :], wi[:, None, :]]  # [R, C, K]
    return patches.reshape(len(rows), -1)


def _layer_inputs(node: fx.Node, x: torch.Tensor, params: dict[str, Any], sample: _Rows) -> torch.Tensor:
    if node.target in CONV:
        w = params["weight"]
        return conv_patches(
            x,
            sample.rows,
            sample.spatial,
            (int(w.shape[2]), int(w.shape[3])),
            params["stride"],
            params["padding"],
            params["dilation"],
        )
    return x.reshape(-1, x.shape[-1])[sample.rows]


def _solve(
    gram: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, has_bias: bool, ridge: float
) -> torch.Tensor | None:
    """argmin_W ‖X Wᵀ − Y‖² + λ‖W − W0‖² from XᵀX and XᵀY (bias column, if any, last).

    λ = ``ridge`` × the mean diagonal of XᵀX over weight columns, so the strength does not
    depend on the scale of the activations. Shrinking towards the pruned weights W0 rather
    than towards zero keeps directions the calibration rows do not excite as they were.
    The bias is not shrunk.
    """
    d = gram.shape[0]
    nw = d - 1 if has_bias else d
    lam = ridge * float(gram.diagonal()[:nw].mean().clamp(min=1e-12))
    reg = torch.full((d,), lam, dtype=gram.dtype)
    if has_bias:
        reg[-1] = 0.0
    lhs = gram + torch.diag(reg)
    rhs = cross + reg[:, None] * w0.T
    try:
        sol = torch.linalg.solve(lhs, rhs)
    except RuntimeError:  # singular (e.g. an input that is constant zero and a bias column)
        sol = torch.linalg.lstsq(lhs, rhs).solution
    if not torch.isfinite(sol).all():
        return None
    return sol.T  # [out, d]


class _CompressedPass(_BNRecalibrator):
    """The compressed model with batch-statistics BatchNorm, stepped node by node from outside."""


@torch.no_grad()
def compressed_passes(
    gm: fx.GraphModule, batches: Sequence[torch.Tensor]
) -> tuple[list[fx.Node], dict[fx.Node, fx.Node], list[_CompressedPass]]:
    """The graph's nodes, each value's last user (to free it after), and one node-by-node
    pass of the compressed graph per batch, ready to run: what a layer-by-layer refit walks."""
    nodes = list(gm.graph.nodes)
    last_use: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        for inp in node.all_input_nodes:
            last_use[inp] = node
    passes = [_CompressedPass(gm) for _ in batches]
    for p, x in zip(passes, batches, strict=True):
        p.args_iter = iter(gm.graph.process_inputs(x))
    return nodes, last_use, passes


def reconstruct(
    cm: CompressedModel,
    batches: Sequence[torch.Tensor],
    *,
    max_rows: int = 8192,
    ridge: float = 1e-3,
    recalibrate: bool = False,
) -> int:
    """Re-fit, in graph order, every layer of ``cm.gm`` whose input channels were pruned
    (or that follows a skipped block, :func:`after_skipped`).

    Each such layer (groups 1, no fine-grained mask) gets the weights (and bias, if it
    has one) that best map its input in the compressed model to the dense model's output
    on the kept output channels, over at most ``max_rows`` sampled output positions of
    ``batches``; quantized layers are quantized again. Run it before ``recalibrate_bn``, or
    pass ``recalibrate=True``: the pass already normalises every BatchNorm with the statistics
    of ``batches`` under the final upstream weights (all batches go through one node before
    the next), which are exactly what ``recalibrate_bn`` would compute, so they are installed
    and one forward pass over the calibration set is saved.
    Changes ``cm.gm`` in place; returns the number of layers re-fitted.
    """
    layers = _layers_to_refit(cm)
    if not layers or not batches:
        if recalibrate:
            recalibrate_bn(cm.gm, batches)
        return 0
    per_batch = max(1, max_rows // len(batches))
    gen = torch.Generator().manual_seed(SEED)
    samples: list[dict[str, _Rows]] = []
    for x in batches:
        rec = _DenseRecorder(cm.source.gm, layers, per_batch, gen)
        rec.run(x)
        samples.append(rec.seen)

    gm = cm.gm
    nodes, last_use, passes = compressed_passes(gm, batches)
    refitted = 0
    for node in nodes:
        layer = layers.get(node.name)
        if layer is not None and _refit(cm, node, layer, passes, samples, ridge):
            refitted += 1
        for p in passes:
            p.env[node] = p.run_node(node)
            for inp in node.all_input_nodes:
                if last_use.get(inp) is node:
                    del p.env[inp]  # keep only live activations of every batch
    if recalibrate:
        install_bn_stats(gm, passes, len(passes))
    return refitted


def _refit(
    cm: CompressedModel,
    node: fx.Node,
    layer: _Layer,
    passes: Sequence[_CompressedPass],
    samples: Sequence[dict[str, _Rows]],
    ridge: float,
) -> bool:
    has_bias = layer.bias is not None
    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    for p, seen in zip(passes, samples, strict=True):
        sample = seen.get(node.name)
        if sample is None:
            return False
        args, kwargs = p.fetch_args_kwargs_from_env(node)
        params = _call_args(node, args, kwargs)
        xs = _layer_inputs(node, params["input"], params, sample)
        if has_bias:
            xs = torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype)], dim=1)
        # Products in float32 (twice as fast as float64, the bulk of the cost on wide 1x1
        # layers); sums across batches and the solve in float64.
        g, c = (xs.T @ xs).double(), (xs.T @ sample.target).double()
        gram = g if gram is None else gram + g
        cross = c if cross is None else cross + c
    assert gram is not None and cross is not None
    w = get_tensor(cm.gm, layer.weight)
    w0 = w.detach().reshape(w.shape[0], -1).double()
    if layer.bias is not None:
        w0 = torch.cat([w0, get_tensor(cm.gm, layer.bias).detach().double()[:, None]], dim=1)
    sol = _solve(gram, cross, w0, has_bias, ridge)
    if sol is None:
        return False
    new_w = sol[:, : w0.shape[1] - int(has_bias)].reshape(w.shape).to(w.dtype)
    if layer.weight in cm.bits:
        new_w = fake_quantize(new_w, cm.bits[layer.weight])
    elif layer.weight in cm.pow2:
        new_w = quantize_weight(new_w, cm.pow2[layer.weight], pow2=True)
    set_tensor(cm.gm, layer.weight, new_w)
    updated = {layer.weight: get_tensor(cm.gm, layer.weight)}
    if layer.bias is not None:
        set_tensor(cm.gm, layer.bias, sol[:, -1].to(w.dtype))
        updated[layer.bias] = get_tensor(cm.gm, layer.bias)
    # The weight's get_attr node already ran in every pass: hand them the new tensors.
    for arg in node.all_input_nodes:
        target = attr_target(arg)
        if target in updated:
            for p in passes:
                p.env[arg] = updated[target]
    return True
