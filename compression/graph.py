# fx node arguments are typed as a wide ``Argument`` union; the checks here are structural
# (op target decides the argument layout), so these codes are noise in this module.
# mypy: disable-error-code="arg-type,union-attr,assignment,misc,return-value"
"""Graph analysis of an exported model: prunable layers, channel coupling, skippable blocks.

Works on the aten-level ``torch.fx.GraphModule`` that ``torch.export`` produces,
so a zoo model and a user's ``.pt2`` archive take the same path. Nothing is
listed per architecture: ops are classified by what they do to the channel
dimension (see the tables below), and any op we do not know conservatively
blocks pruning of the channels that reach it.
"""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from compression.channels import (
    ChanSpace,
    Groups,
    Segment,
    merge_spaces,
    request_cuts,
    reshape_dim_groups,
)
from compression.space import LayerFeatures, OpType

aten = torch.ops.aten
_SYMBOLIC = 1_000_003  # stand-in size for a symbolic (batch) dimension
# Analysis passes at most: each pass after the first splits more layer outputs where a
# concat's runs meet them (nested concats need one pass per level); a graph still asking
# for cuts after that keeps those channels whole.
MAX_SPLIT_PASSES = 16

# Ops that keep every dimension of their first input (channels pass through).
UNARY_PASS: set[Any] = {
    aten.relu.default,
    aten.relu_.default,
    aten.relu6.default,
    aten.hardtanh.default,
    aten.hardtanh_.default,
    aten.gelu.default,
    aten.silu.default,
    aten.silu_.default,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.hardswish.default,
    aten.hardswish_.default,
    aten.hardsigmoid.default,
    aten.leaky_relu.default,
    aten.elu.default,
    aten.mish.default,
    aten.dropout.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten.abs.default,
    aten.neg.default,
    aten.exp.default,
    aten.sqrt.default,
    aten.rsqrt.default,
    aten.pow.Tensor_Scalar,
    aten.mul.Scalar,
    aten.add.Scalar,
    aten.sub.Scalar,
    aten.div.Scalar,
    aten.clamp.default,
    aten.clamp_min.default,
    aten.clamp_max.default,
    aten.feature_dropout.default,
    aten.log_sigmoid.default,
    aten.softplus.default,
    aten.to.dtype,
    aten._to_copy.default,
    aten.type_as.default,
    aten.dropout_.default,
}
# NCHW spatial ops: channel dim 1 passes through.
SPATIAL_PASS: set[Any] = {
    aten.adaptive_avg_pool2d.default,
    aten.avg_pool2d.default,
    aten.max_pool2d.default,
    aten.adaptive_max_pool2d.default,
    aten.upsample_nearest2d.vec,
    aten.upsample_bilinear2d.vec,
    aten.pad.default,
    aten.constant_pad_nd.default,
}
BINARY: set[Any] = {
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.maximum.default,
    aten.minimum.default,
    aten.add_.Tensor,
    aten.mul_.Tensor,
    aten.where.self,
}
REDUCE: set[Any] = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
RESHAPE: set[Any] = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
BATCH_NORM: set[Any] = {
    aten.batch_norm.default,
    aten._native_batch_norm_legit_no_training.default,
    aten.native_batch_norm.default,
}
CONV: set[Any] = {aten.conv2d.default, aten.conv2d.padding}
LINEAR: set[Any] = {aten.linear.default}
SHAPE_ONLY: set[Any] = {aten.sym_size.int, aten.sym_numel.default, aten.size.default}


class GraphError(ValueError):
    """The model graph cannot be analysed (names the node and op at fault)."""


@dataclass
class SliceAction:
    """Slice one tensor attribute along ``space.dim`` when channels are removed."""

    target: str
    space: ChanSpace


@dataclass
class ArgFix:
    """A node argument that states a channel count and must follow pruning."""

    node: str
    kind: str  # "reshape" | "layer_norm" | "groups"
    arg_index: int
    out_dim: int = 0
    space: ChanSpace | None = None


@dataclass
class LayerInfo:
    """One prunable Conv2d / Linear as found in the graph."""

    name: str
    node: str
    weight: str
    bias: str | None
    op: OpType
    features: LayerFeatures
    out_group: int | None  # None: depthwise (output follows input) or split (see out_space)
    in_space: ChanSpace | None
    # The output channels' space: one segment of ``out_group``; a depthwise conv's input
    # space; or, for a layer whose output meets a concat's runs (an SE gate, a shortcut
    # added to a concat), one segment per run, each its own group.
    out_space: ChanSpace | None = None

    @property
    def split(self) -> bool:
        """True if the output channels belong to several groups (cut where a concat's runs meet them)."""
        return self.out_group is None and self.op != "dwconv"


@dataclass
class BlockInfo:
    """A residual add whose skip path can replace it (input and output shapes equal)."""

    name: str
    add_node: str
    input_node: str
    layers: list[str]


@dataclass
class ModelGraph:
    """Everything known about the model's structure that pruning needs."""

    layers: list[LayerInfo]
    blocks: list[BlockInfo]
    groups: Groups
    slices: list[SliceAction]
    fixes: list[ArgFix]
    edges: list[tuple[int, int]]
    bn_scales: list[SliceAction] = field(default_factory=list)

    def layer(self, name: str) -> LayerInfo:
        for info in self.layers:
            if info.name == name:
                return info
        raise KeyError(name)

    @functools.cached_property
    def split_layers(self) -> frozenset[str]:
        """Names of the layers whose output channels span several groups."""
        return frozenset(info.name for info in self.layers if info.split)

    def group_leader(self, gid: int) -> str:
        """The layer whose ``width`` decides group ``gid``: its first producer that owns all
        of its output channels (a split layer's output spans several groups)."""
        data = self.groups.data(gid)
        for name in data.producers:
            if name not in self.split_layers:
                return name
        return data.producers[0]  # only split producers: analyze() blocks such a group

    def group_of(self, layer: LayerInfo) -> int | None:
        """The group that decides this layer's output channels (depthwise: its input's;
        None for a split layer, whose output channels span several groups)."""
        if layer.out_group is not None:
            return self.groups.find(layer.out_group)
        if layer.op == "dwconv" and layer.in_space is not None and len(layer.in_space.segments) == 1:
            seg = layer.in_space.segments[0]
            if seg.group is not None and self.groups.is_full(seg):
                return self.groups.find(seg.group)
        return None

    def width_prunable(self, layer: LayerInfo) -> bool:
        gid = self.group_of(layer)
        return gid is not None and not self.groups.data(gid).blocked_by

    def run_leaders(self, space: ChanSpace) -> list[tuple[str | None, int]]:
        """(leader of the run's group, None where the run is not width-prunable; its length), per run."""
        out: list[tuple[str | None, int]] = []
        for seg in space.segments:
            root = self.groups.find(seg.group) if seg.group is not None else None
            free = root is not None and not self.groups.data(root).blocked_by
            out.append((self.group_leader(root) if free and root is not None else None, seg.length))
        return out

    def split_leaders(self, layer: LayerInfo) -> list[str]:
        """The leaders whose widths decide a split layer's output runs (empty otherwise)."""
        if not layer.split or layer.out_space is None:
            return []
        return [name for name, _ in self.run_leaders(layer.out_space) if name is not None]


def _shape(node: Any) -> list[int] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    out = []
    for s in val.shape:
        # int() of a SymInt may return its example hint; a symbolic dim must stay symbolic.
        out.append(_SYMBOLIC if isinstance(s, torch.SymInt) else int(s))
    return out


def _has_symbolic(shape: list[int]) -> bool:
    return any(s == _SYMBOLIC for s in shape)


def attr_target(node: Any) -> str | None:
    """The parameter/buffer name a ``get_attr`` node reads, else None."""
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _param_root(node: Any) -> tuple[str, Callable[[int], int | None]] | None:
    """If ``node`` is a parameter seen through shape-only ops, its target and a dim map.

    The map takes a dim of ``node`` to the parameter's dim (None if the dim does not
    exist there), applying each op's inverse from the use back to the parameter.
    """
    maps: list[Callable[[int], int | None]] = []  # in walk order: use first, parameter last
    cur = node
    while isinstance(cur, fx.Node):
        if cur.op == "get_attr":
            if _shape(cur) is None:
                return None

            def to_param(d: int) -> int | None:
                res: int | None = d
                for m in maps:
                    if res is None:
                        return None
                    res = m(res)
                return res

            return str(cur.target), to_param
        if cur.op != "call_function":
            return None
        src = cur.args[0] if cur.args else None
        out_shape, in_shape = _shape(cur), _shape(src)
        if out_shape is None or in_shape is None:
            return None
        if cur.target in (
            aten.expand.default,
            aten.clone.default,
            aten.contiguous.default,
            aten.alias.default,
            aten.detach.default,
            aten.to.dtype,
        ):
            lead = len(out_shape) - len(in_shape)
            maps.append(lambda d, lead=lead: d - lead if d - lead >= 0 else None)
        elif cur.target == aten.unsqueeze.default:
            ud = int(cur.args[1]) % len(out_shape)
            maps.append(lambda d, ud=ud: None if d == ud else (d if d < ud else d - 1))
        else:
            return None
        cur = src
    return None


class _Analyzer:
    def __init__(self, gm: fx.GraphModule, cuts: dict[str, set[int]] | None = None) -> None:
        self.gm = gm
        self.cuts = cuts or {}  # layer name -> rows before which its output is split
        self.groups = Groups()
        self.space: dict[str, ChanSpace | None] = {}
        self.layers: list[LayerInfo] = []
        self.slices: list[SliceAction] = []
        self.fixes: list[ArgFix] = []
        self.layer_nodes: dict[str, str] = {}  # node name -> layer name
        self.bn_scales: list[SliceAction] = []

    # -- helpers -----------------------------------------------------------------
    def sp(self, arg: Any) -> ChanSpace | None:
        return self.space.get(arg.name) if isinstance(arg, fx.Node) else None

    def block_inputs(self, node: fx.Node, reason: str) -> None:
        for arg in node.all_input_nodes:
            self.groups.block(self.sp(arg), f"{reason} at {node.name}")

    def slice_param(self, arg: Any, space: ChanSpace, out_rank: int) -> bool:
        """Register a parameter operand to be sliced along the channel dim, if it is one."""
        root = _param_root(arg)
        shape = _shape(arg)
        if root is None or shape is None:
            return False
        target, to_param = root
        dim_in_arg = space.dim - (out_rank - len(shape))
        if dim_in_arg < 0:
            return True  # broadcasts over the channel dim: nothing to slice
        if shape[dim_in_arg] == 1:
            return True
        pdim = to_param(dim_in_arg)
        if pdim is None:
            return False
        self.slices.append(SliceAction(target, space.with_dim(pdim)))
        return True

    # -- op handlers --------------------------------------------------------------
    def run(self) -> None:
        order = list(self.gm.graph.nodes)
        n_layers = sum(1 for n in order if self._layer_weight(n) is not None)
        for node in order:
            if node.op in ("placeholder", "get_attr"):
                self.space[node.name] = None
            elif node.op == "output":
                for arg in node.all_input_nodes:
                    self.groups.block(self.sp(arg), "model output")
            elif node.op == "call_function":
                self.space[node.name] = self.visit(node, n_layers)
            else:  # call_module (guards) and anything else
                self.space[node.name] = None

    def _layer_weight(self, node: fx.Node) -> str | None:
        if node.op != "call_function" or node.target not in CONV | LINEAR:
            return None
        return attr_target(node.args[1])

    def visit(self, node: fx.Node, n_layers: int) -> ChanSpace | None:
        t = node.target
        if t in SHAPE_ONLY:
            return None
        if t in CONV | LINEAR:
            return self.visit_layer(node, n_layers)
        if t in BATCH_NORM:
            return self.visit_batch_norm(node)
        if t == operator.getitem:
            src = node.args[0]
            if isinstance(src, fx.Node) and src.target in BATCH_NORM | {aten.max_pool2d_with_indices.default}:
                return self.sp(src) if node.args[1] == 0 else None
            self.block_inputs(node, "tuple output")
            return None
        if t == aten.max_pool2d_with_indices.default:
            return self.sp(node.args[0])
        if t in UNARY_PASS or t in SPATIAL_PASS:
            src = self.sp(node.args[0])
            if src is not None and t in SPATIAL_PASS and src.dim != 1:
                self.groups.block(src, f"spatial op on non-channel dim at {node.name}")
                return None
            return src
        if t in BINARY:
            return self.visit_binary(node)
        if t in RESHAPE or t in (aten.flatten.using_ints, aten.unflatten.int):
            return self.visit_reshape(node)
        if t in (aten.permute.default, aten.transpose.int, aten.t.default):
            return self.visit_permute(node)
        if t in (aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            return self.visit_squeeze(node)
        if t in REDUCE:
            return self.visit_reduce(node)
        if t in (aten.select.int, aten.slice.Tensor):
            return self.visit_index(node)
        if t in (aten.softmax.int, aten._softmax.default, aten.log_softmax.int):
            src = self.sp(node.args[0])
            shape = _shape(node)
            if src is not None and shape is not None and int(node.args[1]) % len(shape) == src.dim:
                self.groups.block(src, f"softmax over channels at {node.name}")
                return None
            return src
        if t == aten.layer_norm.default:
            return self.visit_layer_norm(node)
        if t == aten.cat.default:
            return self.visit_cat(node)
        self.block_inputs(node, f"op {t} not understood")
        return None

    def visit_layer(self, node: fx.Node, n_layers: int) -> ChanSpace | None:
        weight = attr_target(node.args[1])
        bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias = attr_target(bias_arg)
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        wshape = _shape(node.args[1])
        if weight is None or in_shape is None or out_shape is None or wshape is None:
            self.block_inputs(node, "layer whose weight is computed")
            return None
        name = weight[: -len(".weight")] if weight.endswith(".weight") else weight
        is_conv = node.target in CONV
        groups = int(node.args[6]) if is_conv and len(node.args) > 6 else 1
        out_c, in_per_group = wshape[0], wshape[1]
        in_c = in_per_group * groups
        in_space = self.sp(node.args[0])
        cdim = 1 if is_conv else len(in_shape) - 1
        op: OpType
        if not is_conv:
            op = "linear"
        elif groups == 1:
            op = "conv"
        elif groups == in_c == out_c:
            op = "dwconv"
        else:
            op = "gconv"
        if in_space is not None and in_space.dim != cdim:
            self.groups.block(in_space, f"{name} reads channels from another dim")
            in_space = None
        tokens = 1
        for s in in_shape[1:-1] if not is_conv else []:
            tokens *= s if s != _SYMBOLIC else 1
        kh = wshape[2] if is_conv else 1
        kw = wshape[3] if is_conv else 1
        stride = node.args[3] if is_conv and len(node.args) > 3 else [1, 1]
        stride_h = int(stride[0]) if isinstance(stride, (list, tuple)) else int(stride)
        if is_conv:
            in_h, in_w, out_h, out_w = in_shape[2], in_shape[3], out_shape[2], out_shape[3]
            macs = out_c * out_h * out_w * in_per_group * kh * kw
        else:
            in_h, in_w, out_h, out_w = tokens, 1, tokens, 1
            macs = out_c * in_c * tokens
        params = out_c * in_per_group * kh * kw + (out_c if bias else 0)
        features = LayerFeatures(
            op=op,
            in_channels=in_c,
            out_channels=out_c,
            kernel=kh,
            stride=stride_h,
            groups=groups,
            in_h=in_h,
            in_w=in_w,
            out_h=out_h,
            out_w=out_w,
            params=params,
            macs=macs,
            position=len(self.layers) / max(1, n_layers - 1),
            index=len(self.layers),
        )
        out_space: ChanSpace | None
        if op == "dwconv":
            out_group: int | None = None
            out_space = in_space
            if in_space is not None:
                self.slices.append(SliceAction(weight, in_space.with_dim(0)))
                if bias:
                    self.slices.append(SliceAction(bias, in_space.with_dim(0)))
                self.fixes.append(ArgFix(node.name, "groups", 6))
        else:
            out_dim = cdim if is_conv else len(out_shape) - 1
            cuts = sorted(c for c in self.cuts.get(name, ()) if 0 < c < out_c)
            if cuts and op != "gconv":
                # The output meets a concat's runs: one group per run, each to be united
                # with its run's group (the layer's rows are pruned run by run).
                out_group = None
                bounds = [0, *cuts, out_c]
                out_space = ChanSpace(
                    out_dim,
                    tuple(
                        Segment(self.groups.new(hi - lo, name, lo), 0, hi - lo)
                        for lo, hi in itertools.pairwise(bounds)
                    ),
                )
            else:
                out_group = self.groups.new(out_c, name)
                out_space = ChanSpace(out_dim, (Segment(out_group, 0, out_c),))
                if cuts:  # every conv group must keep the same offsets: not cut into runs
                    self.groups.block(out_space, f"grouped conv {name}'s output meets a concat's runs")
            self.slices.append(SliceAction(weight, out_space.with_dim(0)))
            if bias:
                self.slices.append(SliceAction(bias, out_space.with_dim(0)))
            if op == "gconv" and out_group is not None:
                self.groups.tie(out_group, groups)
            if in_space is not None:
                if in_space.expand != 1 and is_conv:
                    self.groups.block(in_space, f"{name} reads flattened channels")
                elif op == "gconv" and len(in_space.segments) == 1:
                    for seg in in_space.segments:
                        if seg.group is not None:
                            self.groups.tie(seg.group, groups)
                    self.slices.append(SliceAction(weight, _per_group(in_space, groups)))
                elif op == "gconv":
                    self.grouped_after_concat(name, weight, in_space, groups)
                else:
                    self.slices.append(SliceAction(weight, in_space.with_dim(1)))
        self.layers.append(
            LayerInfo(
                name=name,
                node=node.name,
                weight=weight,
                bias=bias,
                op=op,
                features=features,
                out_group=out_group,
                in_space=in_space,
                out_space=out_space,
            )
        )
        self.layer_nodes[node.name] = name
        return out_space

    def grouped_after_concat(self, name: str, weight: str, in_space: ChanSpace, groups: int) -> None:
        """A grouped conv reading a concat: every conv group must keep the same input offsets.

        The input is cut into one chunk per conv group; a run crossing a chunk boundary is
        split there, and the chunks are united run by run like the operands of an add (so
        chunk k's i-th run is pruned exactly like chunk 0's). The weight's input dim then
        holds chunk 0's layout.
        """
        reason = f"grouped conv {name} after concat"
        per = in_space.channels // groups
        if request_cuts(self.groups, in_space, [k * per for k in range(1, groups)], reason):
            return
        chunks: list[list[Segment]] = [[]]
        filled = 0
        for seg in in_space.segments:
            if filled == per:
                chunks.append([])
                filled = 0
            chunks[-1].append(seg)
            filled += seg.length
        merged: ChanSpace | None = ChanSpace(1, tuple(chunks[0]))
        for chunk in chunks[1:]:
            if merged is None:
                self.groups.block(in_space, reason)
                return
            merged = merge_spaces(self.groups, merged, ChanSpace(1, tuple(chunk)), reason)
        if merged is None:
            self.groups.block(in_space, reason)
            return
        self.slices.append(SliceAction(weight, merged))

    def visit_batch_norm(self, node: fx.Node) -> ChanSpace | None:
        src = self.sp(node.args[0])
        if src is None:
            return None
        if src.dim != 1 or src.expand != 1:
            self.groups.block(src, f"batch norm on non-channel dim at {node.name}")
            return None
        for i, arg in enumerate(node.args[1:5]):
            target = attr_target(arg)
            if target is not None:
                self.slices.append(SliceAction(target, src.with_dim(0)))
                if i == 0:
                    self.bn_scales.append(SliceAction(target, src.with_dim(0)))
            elif arg is not None:
                self.groups.block(src, f"batch norm with computed statistics at {node.name}")
                return None
        return src

    def visit_layer_norm(self, node: fx.Node) -> ChanSpace | None:
        src = self.sp(node.args[0])
        shape = _shape(node)
        if src is None or shape is None:
            return None
        normalized = list(node.args[1])
        if len(normalized) != 1 or src.dim != len(shape) - 1 or src.expand != 1:
            self.groups.block(src, f"layer norm over several dims at {node.name}")
            return None
        for arg in node.args[2:4]:
            target = attr_target(arg)
            if target is not None:
                self.slices.append(SliceAction(target, src.with_dim(0)))
        self.fixes.append(ArgFix(node.name, "layer_norm", 1, space=src))
        return src

    def visit_binary(self, node: fx.Node) -> ChanSpace | None:
        out_shape = _shape(node)
        if out_shape is None:
            self.block_inputs(node, "binary op without shape")
            return None
        rank = len(out_shape)
        operands = [a for a in node.args if isinstance(a, fx.Node)]
        spaces: list[ChanSpace] = []
        for arg in operands:
            s = self.sp(arg)
            ashape = _shape(arg)
            if s is not None and ashape is not None:
                spaces.append(s.with_dim(s.dim + rank - len(ashape)))
        if not spaces:
            return None
        result: ChanSpace | None = spaces[0]
        for other in spaces[1:]:
            if result is None:
                self.groups.block(other, f"elementwise op at {node.name}")
                continue
            if other.dim != result.dim:
                self.groups.block(result, f"channels meet another dim at {node.name}")
                self.groups.block(other, f"channels meet another dim at {node.name}")
                result = None
                continue
            result = merge_spaces(self.groups, result, other, f"elementwise op at {node.name}")
        if result is None:
            return None
        for arg in operands:
            if self.sp(arg) is not None:
                continue
            ashape = _shape(arg)
            if ashape is None:
                continue
            d = result.dim - (rank - len(ashape))
            if d < 0 or ashape[d] == 1:
                continue  # broadcasts over channels
            if not self.slice_param(arg, result, rank):
                self.groups.block(result, f"fixed tensor meets channels at {node.name}")
                return None
        return result

    def visit_cat(self, node: fx.Node) -> ChanSpace | None:
        tensors = list(node.args[0])
        out_shape = _shape(node)
        if out_shape is None:
            self.block_inputs(node, "concat without shape")
            return None
        dim = int(node.args[1]) % len(out_shape) if len(node.args) > 1 else 0
        spaces = [self.sp(t) for t in tensors]
        if all(s is None for s in spaces):
            return None
        if any(s is not None and s.dim == dim for s in spaces):
            segments: list[Segment] = []
            for t, s in zip(tensors, spaces, strict=True):
                if s is not None and s.dim == dim and s.expand == 1:
                    segments.extend(s.segments)
                else:
                    if s is not None:
                        self.groups.block(s, f"concat mixes layouts at {node.name}")
                    shape = _shape(t)
                    if shape is None:
                        self.block_inputs(node, "concat input without shape")
                        return None
                    segments.append(Segment(None, 0, shape[dim]))
            return ChanSpace(dim, tuple(segments))
        # Concat along another dim (e.g. a class token): channels must line up.
        result: ChanSpace | None = None
        for s in spaces:
            if s is None:
                continue
            result = s if result is None else merge_spaces(self.groups, result, s, f"concat at {node.name}")
            if result is None:
                return None
        assert result is not None
        for t, s in zip(tensors, spaces, strict=True):
            if s is None and not self.slice_param(t, result, len(out_shape)):
                self.groups.block(result, f"fixed tensor concatenated at {node.name}")
                return None
        return result

    def visit_reshape(self, node: fx.Node) -> ChanSpace | None:
        src = self.sp(node.args[0])
        ins, outs = _shape(node.args[0]), _shape(node)
        if src is None or ins is None or outs is None:
            return None
        pairs = reshape_dim_groups(ins, outs)
        if pairs is None:
            self.groups.block(src, f"reshape at {node.name}")
            return None
        for gi, gj in pairs:
            if src.dim not in gi:
                continue
            non1_in = [d for d in gi if ins[d] != 1]
            non1_out = [d for d in gj if outs[d] != 1]
            if len(non1_out) != 1 or not non1_in or non1_in[0] != src.dim:
                break
            out_dim = non1_out[0]
            expand = src.expand
            for d in non1_in[1:]:
                if ins[d] == _SYMBOLIC:
                    self.groups.block(src, f"reshape merges channels with batch at {node.name}")
                    return None
                expand *= ins[d]
            new = ChanSpace(out_dim, src.segments, expand)
            if node.target in RESHAPE:
                self.fixes.append(ArgFix(node.name, "reshape", 1, out_dim=out_dim, space=new))
            return new
        self.groups.block(src, f"reshape splits channels at {node.name}")
        return None

    def visit_permute(self, node: fx.Node) -> ChanSpace | None:
        src = self.sp(node.args[0])
        shape = _shape(node)
        if src is None or shape is None:
            return None
        rank = len(shape)
        if node.target == aten.permute.default:
            perm = [int(d) % rank for d in node.args[1]]
        else:
            perm = list(range(rank))
            if node.target == aten.transpose.int:
                a, b = int(node.args[1]) % rank, int(node.args[2]) % rank
            else:
                a, b = 0, rank - 1
            perm[a], perm[b] = perm[b], perm[a]
        return src.with_dim(perm.index(src.dim))

    def visit_squeeze(self, node: fx.Node) -> ChanSpace | None:
        src = self.sp(node.args[0])
        ins, outs = _shape(node.args[0]), _shape(node)
        if src is None or ins is None or outs is None:
            return None
        if node.target == aten.unsqueeze.default:
            ud = int(node.args[1]) % len(outs)
            return src.with_dim(src.dim + (1 if ud <= src.dim else 0))
        if node.target == aten.squeeze.default:
            dims_n = set(range(len(ins)))
        else:
            dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
            dims_n = {int(d) % len(ins) for d in dims}
        kept_before = src.dim - sum(1 for d in dims_n if d < src.dim and ins[d] == 1)
        return src.with_dim(kept_before)

    def visit_index(self, node: fx.Node) -> ChanSpace | None:
        """``x[:, 0]`` (select) or ``x[:, a:b]`` (slice) along a non-channel dim."""
        src = self.sp(node.args[0])
        ins = _shape(node.args[0])
        if src is None or ins is None:
            return None
        dim = int(node.args[1]) % len(ins)
        if dim == src.dim:
            self.groups.block(src, f"indexing along channels at {node.name}")
            return None
        if node.target == aten.select.int and dim < src.dim:
            return src.with_dim(src.dim - 1)
        return src

    def visit_reduce(self, node: fx.Node) -> ChanSpace | None:
        src = self.sp(node.args[0])
        ins = _shape(node.args[0])
        if src is None or ins is None:
            return None
        dims_arg = node.args[1] if len(node.args) > 1 else None
        if dims_arg is None or dims_arg == []:
            self.groups.block(src, f"full reduction at {node.name}")
            return None
        dims = {int(d) % len(ins) for d in dims_arg}
        keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        if src.dim in dims:
            self.groups.block(src, f"reduction over channels at {node.name}")
            return None
        return src if keepdim else src.with_dim(src.dim - sum(1 for d in dims if d < src.dim))


def _per_group(space: ChanSpace, groups: int) -> ChanSpace:
    """Input channels of a grouped conv: the weight's dim 1 holds one group's share."""
    seg = space.segments[0]
    per = seg.length // groups
    # The group is tied (same offsets kept in every conv group), so the first
    # group's share of the kept channels is exactly the kept weight columns.
    return ChanSpace(1, (Segment(seg.group, seg.start, per),), space.expand)


def _find_blocks(gm: fx.GraphModule, layer_nodes: dict[str, str]) -> list[BlockInfo]:
    nodes = list(gm.graph.nodes)
    ancestors: dict[str, set[str]] = {}
    for n in nodes:
        acc: set[str] = set()
        for a in n.all_input_nodes:
            acc.add(a.name)
            acc |= ancestors[a.name]
        ancestors[n.name] = acc
    blocks: list[BlockInfo] = []
    used_names: set[str] = set()
    for n in nodes:
        if n.op != "call_function" or n.target not in (aten.add.Tensor,):
            continue
        args = [a for a in n.args if isinstance(a, fx.Node)]
        if len(args) != 2:
            continue
        out_shape = _shape(n)
        for u, v in (args, args[::-1]):
            if _shape(u) != out_shape or _shape(v) != out_shape or u.name not in ancestors[v.name]:
                continue
            inside = {a for a in ancestors[v.name] | {v.name} if a not in ancestors[u.name] and a != u.name}
            layers = [layer_nodes[a.name] for a in nodes if a.name in inside and a.name in layer_nodes]
            if not layers:
                continue
            name = _common_prefix(layers) or n.name
            while name in used_names:
                name = f"{name}@{n.name}"
            used_names.add(name)
            blocks.append(BlockInfo(name=name, add_node=n.name, input_node=u.name, layers=layers))
            break
    return blocks


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for tokens in zip(*parts, strict=False):
        if all(t == tokens[0] for t in tokens):
            common.append(tokens[0])
        else:
            break
    if len(names) == 1 and common:
        common = common[:-1]
    return ".".join(common)


def _layer_edges(
    gm: fx.GraphModule, layer_nodes: dict[str, str], layers: list[LayerInfo]
) -> list[tuple[int, int]]:
    idx = {info.node: i for i, info in enumerate(layers)}
    nearest: dict[str, set[int]] = {}
    edges: set[tuple[int, int]] = set()
    for n in gm.graph.nodes:
        srcs: set[int] = set()
        for a in n.all_input_nodes:
            if a.name in idx:
                srcs.add(idx[a.name])
            else:
                srcs |= nearest.get(a.name, set())
        if n.name in idx:
            for s in srcs:
                edges.add((s, idx[n.name]))
            nearest[n.name] = {idx[n.name]}
        else:
            nearest[n.name] = srcs
    return sorted(edges)


def analyze(gm: fx.GraphModule, *, split_runs: bool = True) -> ModelGraph:
    """Find prunable layers, channel groups and skippable blocks of an exported graph.

    ``split_runs`` False skips the re-analysis that splits layers where a concat's runs
    meet their channels: those channels then stay whole (the coverage before that rule,
    kept for benchmarks that compare the two).
    """
    cuts: dict[str, set[int]] = {}
    for _ in range(MAX_SPLIT_PASSES if split_runs else 1):
        analyzer = _Analyzer(gm, cuts)
        analyzer.run()
        wanted = {name: set(c) for name, c in cuts.items()}
        for name, more in analyzer.groups.producer_cuts().items():
            wanted.setdefault(name, set()).update(more)
        if wanted == cuts:
            break
        cuts = wanted
    split = {info.name for info in analyzer.layers if info.split}
    for root in analyzer.groups.roots():
        if all(p in split for p in analyzer.groups.data(root).producers):
            # No layer owns these channels alone, so none could lead the group's width.
            analyzer.groups.data(root).blocked_by.append("channels only of split layers")
    if not analyzer.layers:
        raise GraphError("the model has no Conv2d or Linear layer with a parameter weight to compress")
    blocks = _find_blocks(gm, analyzer.layer_nodes)
    edges = _layer_edges(gm, analyzer.layer_nodes, analyzer.layers)
    return ModelGraph(
        layers=analyzer.layers,
        blocks=blocks,
        groups=analyzer.groups,
        slices=analyzer.slices,
        fixes=analyzer.fixes,
        edges=edges,
        bn_scales=analyzer.bn_scales,
    )


def strip_guards(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove export's shape-guard call (it would reject pruned shapes)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def has_symbolic_batch(gm: fx.GraphModule) -> bool:
    """True if the graph's first input has a symbolic (dynamic) batch dimension."""
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = _shape(node)
            return shape is not None and _has_symbolic(shape[:1])
    return False
