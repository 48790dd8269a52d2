"""A family of nested compressed models that share one weight set (All-in-One, EVE).

K policies, each at least as compressed as the one before, are applied to one model so that
every point's kept channels and kept weights are a subset of the previous point's, and one
set of *master* weights reproduces every point: point k's weight of a layer is the master
weight sliced to the point's kept channels, times the point's mask, rounded on the point's
own grid (:meth:`Family.point_weight`). Choices this module makes:

* **What is shared**: every conv / linear layer's weight and bias. Everything else is private
  to a point: BatchNorm scales, shifts and statistics (recalibrated per point, as
  slimmable networks' switchable BatchNorm; an exported graph folds them into one scale and
  shift per output channel, so private tensors are vectors) and any other constant.
* **Channels**: ``apply_policy`` ranks a group's channels on the source weights, the same
  ranking for every point, so a narrower width keeps the top of the same ranking. Checked
  (:class:`NestingError` if ties broke it).
* **Masks**: point k's mask is its scheme's mask computed on the master weight times the
  previous point's mask, intersected with that mask: nested by construction. A subset of an
  unstructured or N:M mask keeps the pattern (with more zeros where the previous mask had
  already dropped weights). A 1×N block mask under a narrower width than the previous
  point's is intersected all the same; its blocks may then not align with the first one's.
* **Bits**: never more precise than the previous point's (float, then 8, then fewer). A
  layer the first point quantizes has its master on that point's grid (its integers and
  per-channel scales, so the bundle stores it at that precision); a later point rounds the
  sliced master again on its own grid.
* **Recovery** (``recovery``), since the per-point least-squares refit and OBC weight updates
  would give each point different weights:

  - ``"joint"`` (default): one least-squares refit of the *shared* weights against the
    dense model's outputs, summed over every point that uses the layer (each output
    channel's row is fitted on the points that keep that channel, each point on its own
    compressed inputs, in graph order on all points in lock-step): the weights that are
    best for the family as a whole, not for one point;
  - ``"largest"``: the first point is re-fitted alone and its weights shared; the other
    points only recalibrate their BatchNorm;
  - ``"none"``: source weights, BatchNorm recalibrated per point.

  OBC (``compression.obc``) is not offered: its masks and rounding update the remaining
  weights per point. Masks here are by magnitude, rounding to nearest.

What the choices cost, measured on ResNet-20 / MNIST with four points at 1.0 / 0.69 / 0.49 /
0.25 of the dense latency (``bench/family_bench.py``, 1,000 validation images): the joint refit
scores 98.1 / 97.9 / 96.5 / 90.2 % where each point's own refit (not shareable) scores
99.3 / 98.6 / 98.2 / 96.4 %, and masks alone (``"largest"`` or ``"none"``) 99.3 / 39.5 / 31.2 /
9.4 %. Weighing the larger points' terms more (4:2:1:1, 8:4:2:1) gained at most 0.3 points on
the first points and lost 5 to 13 on the last, and a per-point least-squares fit of the
BatchNorm scales and shifts to the dense outputs lost 4.6 points on the last: the default is
equal weights and no such fit (``point_weights`` stays as an option). Joint fine-tuning
(``compression.family_distill``, 110 steps) then brings the family to 98.8 / 98.1 / 98.0 /
97.0 %, within 0.5 points of fine-tuning each point alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx

from compression.apply import CompressedModel, _positions, apply_policy, get_tensor, set_tensor
from compression.evaluate import install_bn_stats, recalibrate_bn
from compression.graph import CONV, attr_target
from compression.masks import fake_quantize, layer_mask
from compression.model_io import CompressibleModel
from compression.policy import Policy, PolicyError
from compression.reconstruct import (
    SEED,
    _call_args,
    _DenseRecorder,
    _Layer,
    _layer_inputs,
    _layers_to_refit,
    _solve,
    compressed_passes,
    reconstruct,
)

__all__ = [
    "FAMILY_RECOVERIES",
    "Family",
    "FamilyPoint",
    "FamilyRecovery",
    "NestingError",
    "build_family",
    "check_nested_policies",
]

FamilyRecovery = Literal["joint", "largest", "none"]
FAMILY_RECOVERIES: tuple[FamilyRecovery, ...] = ("joint", "largest", "none")


class NestingError(PolicyError):
    """Policies that do not nest: names the point, the layer and what widens."""


def _precision(bits: int | None) -> int:
    return 32 if bits is None else bits


def check_nested_policies(policies: Sequence[Policy], layers: Sequence[str]) -> None:
    """Raise :class:`NestingError` unless each policy compresses at least as much as the previous.

    Checked here, per layer: skipped blocks only grow, bits never become more precise, a
    fine-grained scheme once chosen stays (with at least its sparsity). Kept channels and
    masks are checked on the built models (:func:`build_family`). ``act_bits`` is refused:
    its activation rounding is calibrated per point and no weight set can share it; so is
    ``pow2``: the shared master is rounded on uniform grids only.
    """
    if not policies:
        raise NestingError("a family needs at least one policy")
    for k, policy in enumerate(policies):
        if policy.act_bits is not None:
            raise NestingError(
                f"point {k}: act_bits is not supported in a family (activation ranges are per "
                "point); leave act_bits null"
            )
    for k, policy in enumerate(policies):
        for name in layers:
            if policy.for_layer(name).pow2:
                # The master holds one grid per layer (the first point's): a power-of-two grid is
                # not a uniform one, and no shared integers serve both.
                raise NestingError(
                    f"point {k}, layer {name!r}: pow2 (power-of-two weights) is not supported in a "
                    "family (its points share one uniform grid per layer); drop pow2 or use plain bits"
                )
    for k in range(1, len(policies)):
        prev, cur = policies[k - 1], policies[k]
        lost = sorted(prev.skip - cur.skip)
        if lost:
            raise NestingError(f"point {k} runs block(s) {lost} that point {k - 1} skips; skip them too")
        for name in layers:
            a, b = prev.for_layer(name), cur.for_layer(name)
            if _precision(b.bits) > _precision(a.bits):
                raise NestingError(
                    f"point {k}, layer {name!r}: bits {b.bits} are more precise than point {k - 1}'s "
                    f"{a.bits}; use {a.bits} or fewer"
                )
            if a.scheme != "dense" and (b.scheme != a.scheme or b.target_sparsity < a.target_sparsity):
                raise NestingError(
                    f"point {k}, layer {name!r}: scheme {b.scheme} at sparsity {b.target_sparsity:.2f} "
                    f"does not nest in point {k - 1}'s {a.scheme} at {a.target_sparsity:.2f}; keep the "
                    "scheme and raise its sparsity"
                )


Index = tuple[tuple[int, torch.Tensor], ...]
"""Kept positions of a shared tensor in one point: (dim, source positions) per sliced dim."""


def _slice(t: torch.Tensor, index: Index) -> torch.Tensor:
    for dim, pos in index:
        t = t.index_select(dim, pos)
    return t


def _embed(full: torch.Tensor, part: torch.Tensor, index: Index) -> torch.Tensor:
    """``full`` with the region ``index`` selects replaced by ``part``."""
    if not index:
        return part.clone()
    (dim, pos), rest = index[0], index[1:]
    sub = _embed(full.index_select(dim, pos), part, rest)
    return full.index_copy(dim, pos, sub)


@dataclass
class FamilyPoint:
    """One operating point: its policy, its model, and where it sits in the master weights.

    Attributes:
        policy: the point's policy.
        cm: its compressed model; its shared tensors are always :meth:`Family.point_weight`.
        index: shared tensor -> kept source positions per sliced dim (absent: not in this point).
        full_masks: masked weight -> the mask in source coordinates (True outside the point's
            slice), what the next point's mask is intersected with.
    """

    policy: Policy
    cm: CompressedModel
    index: dict[str, Index] = field(default_factory=dict)
    full_masks: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Family:
    """Nested points of one model and the master weights they share.

    Attributes:
        source: the uncompressed model.
        points: from the least to the most compressed.
        master: shared tensor (a conv / linear weight or bias) -> values in the source's shape.
        recovery: how the master weights were fitted (see the module docstring).
        refitted: layers the joint or largest-point refit changed.
    """

    source: CompressibleModel
    points: list[FamilyPoint]
    master: dict[str, torch.Tensor]
    recovery: FamilyRecovery
    refitted: int = 0

    @property
    def policies(self) -> list[Policy]:
        return [p.policy for p in self.points]

    def bits(self, k: int, target: str) -> int | None:
        return self.points[k].cm.bits.get(target)

    def point_weight(self, k: int, target: str) -> torch.Tensor:
        """Point ``k``'s tensor ``target`` computed from the master: slice, mask, round."""
        p = self.points[k]
        w = _slice(self.master[target], p.index[target])
        mask = p.cm.masks.get(target)
        if mask is not None:
            w = w * mask
        bits = p.cm.bits.get(target)
        if bits is not None:
            w = fake_quantize(w, bits)
        return w

    def first_point(self, target: str) -> int | None:
        """The first (least compressed) point that uses ``target``: its grid is the master's."""
        return next((k for k, p in enumerate(self.points) if target in p.index), None)

    def canonicalize(self, target: str) -> None:
        """Put the master of ``target`` on its first point's grid (masked, rounded) where that point
        reads it; a no-op for float layers. Idempotent, so the first point's weights do not move."""
        k = self.first_point(target)
        if k is None:
            return
        p = self.points[k]
        if target in p.cm.bits or target in p.cm.masks:
            self.master[target] = _embed(self.master[target], self.point_weight(k, target), p.index[target])

    def sync(self, targets: Sequence[str] | None = None) -> None:
        """Write every point's shared tensors (``targets``, default all) from the master."""
        for target in self.master if targets is None else targets:
            self.canonicalize(target)
            for k, p in enumerate(self.points):
                if target in p.index:
                    set_tensor(p.cm.gm, target, self.point_weight(k, target))

    def verify(self) -> float:
        """Largest absolute difference between a point's shared tensor and its master recomputation
        (0.0: one weight set reproduces every point)."""
        worst = 0.0
        for k, p in enumerate(self.points):
            for target in p.index:
                diff = (get_tensor(p.cm.gm, target).detach() - self.point_weight(k, target).detach()).abs()
                worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        return worst

    def mask_levels(self, target: str) -> torch.Tensor | None:
        """For a weight some point masks: how many leading points keep each source weight (uint8),
        so point k's mask is ``levels[slice] > k``; None when no point masks it."""
        if not any(target in p.full_masks for p in self.points):
            return None
        levels = torch.zeros(self.master[target].shape, dtype=torch.uint8)
        alive = torch.ones(self.master[target].shape, dtype=torch.bool)
        for p in self.points:
            alive = alive & p.full_masks.get(target, alive)
            levels += alive.to(torch.uint8)
        return levels


def _shared_targets(model: CompressibleModel) -> list[str]:
    out: list[str] = []
    for layer in model.graph.layers:
        out.append(layer.weight)
        if layer.bias is not None:
            out.append(layer.bias)
    return out


def _index_of(cm: CompressedModel, target: str) -> Index:
    graph = cm.source.graph
    found: dict[int, torch.Tensor] = {}
    for act in graph.slices:
        if act.target != target or act.space.dim in found:
            continue
        pos = _positions(act.space, cm.keep, graph)
        if pos is not None:
            found[act.space.dim] = pos
    return tuple(sorted(found.items()))


def _check_keep(prev: CompressedModel, cur: CompressedModel, k: int) -> None:
    graph = cur.source.graph
    for root in graph.groups.roots():
        a, b = prev.keep.get(root), cur.keep.get(root)
        if b is None:
            if a is not None:
                leader = graph.group_leader(root)
                raise NestingError(f"point {k} keeps channels of group {leader!r} that point {k - 1} removed")
            continue
        if a is not None and not bool(torch.isin(b, a).all()):
            raise NestingError(
                f"point {k}: the channels kept in group {graph.group_leader(root)!r} are not a subset of "
                f"point {k - 1}'s (tied channel importances); change either width slightly"
            )


def _present(cm: CompressedModel, target: str) -> bool:
    owner, _, attr = target.rpartition(".")
    try:
        mod = cm.gm.get_submodule(owner) if owner else cm.gm
    except AttributeError:
        return False
    return hasattr(mod, attr)


def build_family(
    model: CompressibleModel,
    policies: Sequence[Policy],
    calibration: Sequence[torch.Tensor],
    *,
    recovery: FamilyRecovery = "joint",
    max_rows: int = 8192,
    ridge: float = 1e-3,
    point_weights: Sequence[float] | None = None,
) -> Family:
    """Apply nested ``policies`` to ``model`` with one shared weight set (see the module docstring).

    BatchNorm statistics are recalibrated per point on ``calibration`` (the refit passes
    compute them). The result satisfies ``family.verify() == 0``.

    Raises:
        NestingError: the policies (or the channels they keep) do not nest.
        PolicyError: a policy does not fit the model.
        ValueError: unknown ``recovery``.
    """
    if recovery not in FAMILY_RECOVERIES:
        raise ValueError(f"recovery must be one of {FAMILY_RECOVERIES}, got {recovery!r}")
    graph = model.graph
    check_nested_policies(policies, [layer.name for layer in graph.layers])
    shared = _shared_targets(model)
    points: list[FamilyPoint] = []
    for k, policy in enumerate(policies):
        cm = apply_policy(model, policy, fine_grained=False)
        if points:
            _check_keep(points[-1].cm, cm, k)
        index = {t: _index_of(cm, t) for t in shared if _present(cm, t)}
        points.append(FamilyPoint(policy, cm, index))
    master = {t: get_tensor(model.gm, t).detach().clone() for t in shared}
    family = Family(model, points, master, recovery)
    _set_masks_and_bits(family)
    family.sync()
    if recovery == "joint":
        weights = [1.0] * len(points) if point_weights is None else [float(w) for w in point_weights]
        if len(weights) != len(points) or any(not w > 0 for w in weights):
            raise ValueError(f"point_weights must be {len(points)} positive numbers, got {point_weights}")
        family.refitted = _joint_refit(family, calibration, max_rows=max_rows, ridge=ridge, weights=weights)
    elif recovery == "largest":
        first = family.points[0]
        family.refitted = reconstruct(first.cm, calibration, max_rows=max_rows, ridge=ridge, recalibrate=True)
        for t, where in first.index.items():
            master[t] = _embed(master[t], get_tensor(first.cm.gm, t).detach(), where)
        family.sync()
        for p in family.points[1:]:
            recalibrate_bn(p.cm.gm, calibration)
    else:
        for p in family.points:
            recalibrate_bn(p.cm.gm, calibration)
    return family


def _set_masks_and_bits(family: Family) -> None:
    """Each point's masks (intersected with the previous point's) and bit-widths."""
    graph = family.source.graph
    prev_full: dict[str, torch.Tensor] = {}
    for p in family.points:
        for layer in graph.layers:
            t = layer.weight
            if t not in p.index:
                continue
            lp = p.policy.for_layer(layer.name)
            if lp.bits is not None:
                p.cm.bits[t] = lp.bits
            before = prev_full.get(t)
            w = _slice(family.master[t], p.index[t])
            held = _slice(before, p.index[t]) if before is not None else None
            mask = layer_mask(w if held is None else w * held, lp)
            if mask is None and held is None:
                continue
            mask = held if mask is None else (mask if held is None else mask & held)
            assert mask is not None
            p.cm.masks[t] = mask
            full = before if before is not None else torch.ones(family.master[t].shape, dtype=torch.bool)
            p.full_masks[t] = _embed(full, mask, p.index[t])
        prev_full = {**prev_full, **p.full_masks}


# ----------------------------------------------------------------------------- joint refit


@dataclass
class _Walk:
    """One point's node-by-node passes over the calibration batches."""

    gm: fx.GraphModule
    nodes: list[fx.Node]
    last_use: dict[fx.Node, fx.Node]
    passes: list
    at: dict[str, int]
    cursor: int = 0

    def advance(self, upto: int) -> None:
        while self.cursor < upto:
            node = self.nodes[self.cursor]
            for p in self.passes:
                p.env[node] = p.run_node(node)
                for inp in node.all_input_nodes:
                    if self.last_use.get(inp) is node:
                        del p.env[inp]
            self.cursor += 1


def _columns(index: Index, weight_shape: torch.Size, has_bias: bool) -> torch.Tensor:
    """Columns of a layer's flattened weight (and its bias column, last) that a point reads."""
    per = 1
    for s in weight_shape[2:]:
        per *= int(s)
    n_in = int(weight_shape[1])
    pos = next((p for d, p in index if d == 1), torch.arange(n_in))
    cols = (pos[:, None] * per + torch.arange(per)[None, :]).flatten()
    if has_bias:
        cols = torch.cat([cols, torch.tensor([n_in * per])])
    return cols


def _joint_refit(
    family: Family, batches: Sequence[torch.Tensor], *, max_rows: int, ridge: float, weights: Sequence[float]
) -> int:
    """Least-squares fit of the shared weights of every layer some point would re-fit, summed
    over the points using it; BatchNorm statistics of every point installed from the passes."""
    source = family.source
    by_node = {info.node: info for info in source.graph.layers}
    wanted: dict[str, _Layer] = {}
    for p in family.points:
        for name in _layers_to_refit(p.cm):
            info = by_node[name]
            if any(info.weight in q.cm.masks for q in family.points):
                continue  # a fit would fill the zeros of the point that masks it
            out = int(family.master[info.weight].shape[0])
            wanted[name] = _Layer(name, info.weight, info.bias, torch.arange(out))
    if not wanted or not batches:
        for p in family.points:
            recalibrate_bn(p.cm.gm, batches)
        return 0
    per_batch = max(1, max_rows // len(batches))
    gen = torch.Generator().manual_seed(SEED)
    samples = []
    for x in batches:
        rec = _DenseRecorder(source.gm, wanted, per_batch, gen)
        rec.run(x)
        samples.append(rec.seen)
    walks: list[_Walk] = []
    for p in family.points:
        nodes, last_use, passes = compressed_passes(p.cm.gm, batches)
        walks.append(_Walk(p.cm.gm, nodes, last_use, passes, {n.name: i for i, n in enumerate(nodes)}))
    refitted = 0
    for src_node in source.gm.graph.nodes:
        layer = wanted.get(src_node.name)
        if layer is None:
            continue
        users = [
            k for k, w in enumerate(walks) if layer.node in w.at and layer.weight in family.points[k].index
        ]
        for k in users:
            walks[k].advance(walks[k].at[layer.node])
        if _fit_shared(family, layer, users, walks, samples, ridge, weights):
            refitted += 1
    for w in walks:
        w.advance(len(w.nodes))
        install_bn_stats(w.gm, w.passes, len(batches))
    return refitted


def _fit_shared(
    family: Family,
    layer: _Layer,
    users: list[int],
    walks: list[_Walk],
    samples: list[dict],
    ridge: float,
    weights: Sequence[float],
) -> bool:
    t, bias = layer.weight, layer.bias
    has_bias = bias is not None
    master_w = family.master[t]
    n_out = int(master_w.shape[0])
    dim = int(master_w[0].numel()) + int(has_bias)
    grams: list[torch.Tensor] = []
    crosses: list[torch.Tensor] = []
    for k in users:
        walk = walks[k]
        node = walk.nodes[walk.at[layer.node]]
        cols = _columns(family.points[k].index[t], master_w.shape, has_bias)
        g = torch.zeros(dim, dim, dtype=torch.float64)
        c = torch.zeros(dim, n_out, dtype=torch.float64)
        for p, seen in zip(walk.passes, samples, strict=True):
            sample = seen.get(layer.node)
            if sample is None:
                return False
            args, kwargs = p.fetch_args_kwargs_from_env(node)
            params = _call_args(node, args, kwargs)
            if node.target in CONV and int(params["groups"]) != 1:
                return False
            xs = _layer_inputs(node, params["input"], params, sample)
            if has_bias:
                xs = torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype)], dim=1)
            g[cols[:, None], cols[None, :]] += (xs.T @ xs).double()
            c[cols] += (xs.T @ sample.target).double()
        grams.append(g * weights[k])
        crosses.append(c * weights[k])
    # Each output channel is fitted on the points that keep it: a prefix of ``users``.
    level = torch.full((n_out,), -1, dtype=torch.long)
    for i, k in enumerate(users):
        out = next((pos for d, pos in family.points[k].index[t] if d == 0), torch.arange(n_out))
        level[out] = i
    top = _columns(family.points[users[0]].index[t], master_w.shape, has_bias)
    flat = master_w.reshape(n_out, -1).double()
    w0_full = torch.cat([flat, family.master[bias].double()[:, None]], dim=1) if bias is not None else flat
    new_w = flat.clone()
    new_b = family.master[bias].double().clone() if bias is not None else None
    g_sum = torch.zeros(dim, dim, dtype=torch.float64)
    c_sum = torch.zeros(dim, n_out, dtype=torch.float64)
    changed = False
    for i in range(len(users)):
        g_sum += grams[i]
        c_sum += crosses[i]
        rows = torch.nonzero(level == i).flatten()
        if len(rows) == 0:
            continue
        sol = _solve(
            g_sum[top[:, None], top[None, :]], c_sum[top][:, rows], w0_full[rows][:, top], has_bias, ridge
        )
        if sol is None:
            continue
        wcols = top[:-1] if has_bias else top
        new_w[rows[:, None], wcols[None, :]] = sol[:, : len(wcols)]
        if new_b is not None:
            new_b[rows] = sol[:, -1]
        changed = True
    if not changed:
        return False
    family.master[t] = new_w.reshape(master_w.shape).to(master_w.dtype)
    targets = [t]
    if bias is not None and new_b is not None:
        family.master[bias] = new_b.to(master_w.dtype)
        targets.append(bias)
    family.sync(targets)
    # The weights' get_attr nodes already ran in every pass: hand them the new tensors.
    for k in users:
        walk = walks[k]
        node = walk.nodes[walk.at[layer.node]]
        for arg in node.all_input_nodes:
            target = attr_target(arg)
            if target in targets:
                value = get_tensor(walk.gm, target)
                for p in walk.passes:
                    p.env[arg] = value
    return True
