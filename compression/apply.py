"""Apply a :class:`Policy` to a model: skip blocks, remove channels, mask, quantize.

The result is a new GraphModule (the source model is never changed) whose
pruned channels are physically gone — a smaller dense model any runtime runs
faster — plus masks and bit-widths for size accounting and fine-tuning.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx

from compression import schemes
from compression.channels import ChanSpace
from compression.graph import ModelGraph
from compression.masks import layer_mask, quantize_weight
from compression.model_io import CompressibleModel
from compression.policy import Policy, PolicyError

Importance = Literal["l1", "bn"]


@dataclass
class CompressedModel:
    """A model with a policy applied.

    Attributes:
        gm: the compressed GraphModule (eval semantics; channels removed).
        source: the model it came from.
        policy: the policy applied.
        keep: kept channel indices per pruned group root.
        masks: weight target -> bool mask, for layers with fine-grained sparsity.
        bits: weight target -> bit-width, for layers on the uniform grid (the int8-container
            layers of an export).
        pow2: weight target -> code width, for layers on the power-of-two grid (``LayerPolicy.pow2``;
            exported as float, so kept apart from ``bits``).
        layer_weights: layer name -> weight target, for layers still in the graph.
    """

    gm: fx.GraphModule
    source: CompressibleModel
    policy: Policy
    keep: dict[int, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    bits: dict[str, int] = field(default_factory=dict)
    layer_weights: dict[str, str] = field(default_factory=dict)
    pow2: dict[str, int] = field(default_factory=dict)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return self.source.example_input(batch)

    def reapply_masks(self) -> None:
        """Zero masked weights again (after an optimizer step in fine-tuning)."""
        with torch.no_grad():
            for target, mask in self.masks.items():
                get_tensor(self.gm, target).mul_(mask)


def get_tensor(gm: torch.nn.Module, target: str) -> torch.Tensor:
    owner, _, attr = target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    value = getattr(mod, attr)
    assert isinstance(value, torch.Tensor), target
    return value


def set_tensor(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Replace a parameter/buffer/constant, keeping its kind."""
    owner, _, attr = target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    old = getattr(mod, attr)
    if isinstance(old, torch.nn.Parameter):
        setattr(mod, attr, torch.nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
    elif attr in mod._buffers:
        mod._buffers[attr] = value.detach().clone()
    else:
        setattr(mod, attr, value.detach().clone())


def _positions(space: ChanSpace, keep: dict[int, torch.Tensor], graph: ModelGraph) -> torch.Tensor | None:
    """Kept positions along ``space.dim``, or None if nothing there is pruned."""
    pruned = False
    parts: list[torch.Tensor] = []
    offset = 0
    for seg in space.segments:
        root = graph.groups.find(seg.group) if seg.group is not None else None
        if root is not None and root in keep:
            k = keep[root]
            sel = k[(k >= seg.start) & (k < seg.start + seg.length)] - seg.start
            pruned = True
        else:
            sel = torch.arange(seg.length)
        parts.append(sel + offset)
        offset += seg.length
    if not pruned:
        return None
    chans = torch.cat(parts)
    if space.expand == 1:
        return chans
    e = space.expand
    return (chans[:, None] * e + torch.arange(e)[None, :]).flatten()


def _kept_count(space: ChanSpace, keep: dict[int, torch.Tensor], graph: ModelGraph) -> int:
    pos = _positions(space.with_dim(0), keep, graph)
    return space.channels if pos is None else len(pos) // space.expand


def _importance(gm: fx.GraphModule, graph: ModelGraph, root: int, kind: Importance) -> torch.Tensor:
    data = graph.groups.data(root)
    size = data.size
    score = torch.zeros(size)
    if kind == "bn":
        for act in graph.bn_scales:
            gamma = get_tensor(gm, act.target).detach().abs().flatten()
            at = 0  # a BatchNorm over a concat holds each run's scales at its offset
            for seg in act.space.segments:
                g = seg.group
                full = g is not None and seg.start == 0 and seg.length == size
                if full and g is not None and graph.groups.find(g) == root and at + size <= gamma.numel():
                    part = gamma[at : at + size]
                    score += part / part.mean().clamp(min=1e-12)
                at += seg.length
        if score.sum() > 0:
            return score
    for name, offset in zip(data.producers, data.offsets, strict=True):
        w = get_tensor(gm, graph.layer(name).weight).detach()
        norms = w.abs().reshape(w.shape[0], -1).sum(dim=1)[offset : offset + size]  # a split layer's rows
        if norms.numel() == size:
            score += norms / norms.mean().clamp(min=1e-12)
    return score


def _select(score: torch.Tensor, width: float, tied: int) -> torch.Tensor:
    """Indices of the channels to keep: the most important, equal in every tied segment."""
    n = score.numel()
    per = n // tied
    k_per = max(1, round(width * per))
    if k_per >= per:
        return torch.arange(n)
    seg_score = score.reshape(tied, per).sum(dim=0)
    offsets = torch.sort(torch.topk(seg_score, k_per).indices).values
    return (torch.arange(tied)[:, None] * per + offsets[None, :]).flatten()


def _skip_blocks(gm: fx.GraphModule, graph: ModelGraph, names: Iterable[str]) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {name: i for i, name in enumerate(nodes)}
    by_name = {b.name: b for b in graph.blocks}
    # Skip in graph order: a later block's input may be an earlier block's add.
    for block in sorted((by_name[n] for n in names), key=lambda b: order[b.add_node]):
        add = nodes[block.add_node]
        replacement = nodes[block.input_node]
        add.replace_all_uses_with(replacement)
        gm.graph.erase_node(add)
        nodes[block.add_node] = replacement
    gm.graph.eliminate_dead_code()


def _drop_unused_attrs(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            delattr(mod, attr)


def _fix_args(gm: fx.GraphModule, graph: ModelGraph, keep: dict[int, torch.Tensor]) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    for fix in graph.fixes:
        node = nodes.get(fix.node)
        if node is None:
            continue
        args = list(node.args)
        if fix.kind == "groups":
            weight = get_tensor(gm, str(args[1].target))  # type: ignore[union-attr]
            args[6] = int(weight.shape[0])
        elif fix.kind == "layer_norm" and fix.space is not None:
            args[1] = [_kept_count(fix.space, keep, graph)]
        elif fix.kind == "reshape" and fix.space is not None:
            shape = list(args[1])  # type: ignore[arg-type]
            old = fix.space.channels * fix.space.expand
            new = _kept_count(fix.space, keep, graph) * fix.space.expand
            lit = shape[fix.out_dim]
            if isinstance(lit, int) and lit != -1:
                shape[fix.out_dim] = lit // old * new
            args[1] = shape
        node.args = tuple(args)


def apply_policy(
    model: CompressibleModel,
    policy: Policy,
    *,
    importance: Importance = "l1",
    fine_grained: bool = True,
) -> CompressedModel:
    """Build the compressed model for ``policy`` (validated against the model's layers).

    Order: skip blocks, remove channels (coupled groups together, width of each
    group taken from its leader layer), mask fine-grained sparsity, quantize weights.
    ``fine_grained=False`` stops after removing channels: the weights stay dense and
    ``masks`` / ``bits`` empty, for a caller that masks and quantizes them itself
    (``compression.obc``, whose masks and rounding depend on calibration data).

    Raises:
        PolicyError: unknown layer/block names or values the layer cannot take.
    """
    graph = model.graph
    _validate(graph, policy)
    gm = copy.deepcopy(model.gm)
    if policy.skip:
        _skip_blocks(gm, graph, sorted(policy.skip))
    keep: dict[int, torch.Tensor] = {}
    for root in graph.groups.roots():
        data = graph.groups.data(root)
        if data.blocked_by:
            continue
        width = policy.for_layer(graph.group_leader(root)).width
        if width >= 1.0:
            continue
        sel = _select(_importance(gm, graph, root, importance), width, data.tied_segments)
        if len(sel) < data.size:
            keep[root] = sel
    done: set[tuple[str, int]] = set()
    for act in graph.slices:
        key = (act.target, act.space.dim)
        if key in done:
            continue
        pos = _positions(act.space, keep, graph)
        if pos is None:
            continue
        done.add(key)
        tensor = get_tensor(gm, act.target)
        set_tensor(gm, act.target, tensor.index_select(act.space.dim, pos))
    _fix_args(gm, graph, keep)
    present = {n.name for n in gm.graph.nodes}
    result = CompressedModel(gm=gm, source=model, policy=policy, keep=keep)
    for layer in graph.layers:
        if layer.node not in present:
            continue
        result.layer_weights[layer.name] = layer.weight
        if not fine_grained:
            continue
        lp = policy.for_layer(layer.name)
        w = get_tensor(gm, layer.weight)
        mask = layer_mask(w, lp)
        if mask is not None:
            w = w * mask
            result.masks[layer.weight] = mask
        if lp.bits is not None:
            w = quantize_weight(w, lp.bits, pow2=lp.pow2)
            (result.pow2 if lp.pow2 else result.bits)[layer.weight] = lp.bits
        if mask is not None or lp.bits is not None:
            set_tensor(gm, layer.weight, w)
    _drop_unused_attrs(gm)
    gm.graph.lint()
    gm.recompile()
    return result


def _validate(graph: ModelGraph, policy: Policy) -> None:
    policy.check_names((layer.name for layer in graph.layers), (b.name for b in graph.blocks))
    for layer in graph.layers:
        lp = policy.for_layer(layer.name)
        if lp.scheme not in schemes.names():
            known = schemes.names()
            raise PolicyError(f"layer {layer.name!r}: unknown scheme {lp.scheme!r}; use one of {known}")
        if layer.name in policy.layers:  # the default applies only where the layer can take it
            problem = schemes.get(lp.scheme).layer_problem(layer.features)
            if problem is not None:
                raise PolicyError(f"layer {layer.name!r}: {problem}")
        if lp.width < 1.0 and layer.name in policy.layers and layer.split:
            leaders = graph.split_leaders(layer)
            raise PolicyError(
                f"layer {layer.name!r}: width cannot change on its own (its output channels meet a "
                f"concat's runs and follow them); set the width of {leaders} instead"
            )
        if lp.width < 1.0 and layer.name in policy.layers and not graph.width_prunable(layer):
            gid = graph.group_of(layer)
            why = graph.groups.data(gid).blocked_by[:1] if gid is not None else ["no own channels"]
            raise PolicyError(f"layer {layer.name!r}: width cannot change ({'; '.join(why)})")
