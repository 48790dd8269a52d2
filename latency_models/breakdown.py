"""Where a candidate's predicted time goes, and why it is not faster (read-only over a predictor).

The kernel predictor (``predictors.kernel_gbdt``) prices a model as a sum: one cost per kernel
(a layer, with the ops that serve it) plus one row for the model itself (session overhead,
input copy, per-op costs). :func:`layer_costs` reads those terms for a policy and for the dense
model, and :func:`explain` turns them into what a user asks of a candidate:

* each layer's predicted ms against the dense model's, and its share of the candidate's time;
* **flags** on choices that buy no speed on this device, with the reason in words: a scheme the
  device's calibration measured as size-only, a kept channel count that is not a multiple of
  the device's channel block (``round_to``), int8 where the device measured int8 slower or the
  predictor prices this layer slower in int8 than in float;
* **why not faster**: the (at most) three layers where predicted time fell least against the
  work removed, each with one suggested change.

Choices the issue left open, recorded here:

* *Work removed* is the share of the layer's dense multiply-accumulates gone: channel pruning
  (kept input × output channels; output channels alone for a depthwise layer) times the
  scheme's density (``1 - target_sparsity``), or all of it for a layer of a skipped block.
  Quantization removes no work: int8 is judged by the flags, not by this gap.
* *Time saved* is ``1 - predicted / dense`` for the layer's kernel; the gap is work removed
  minus time saved, and a layer needs at least :data:`MIN_REMOVED` removed and
  :data:`MIN_GAP` of gap to be listed.
* The int8 counterfactual prices the whole policy with every layer in float (one call), so a
  layer's float price includes float neighbours; flags need it to be :data:`INT8_MARGIN` dearer.
* Without a per-layer predictor (``kernel_costs``), a layer's time is its share of the dense
  model's MACs (``source: "macs"``): an estimate, said so in the output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from compression.policy import Policy
from compression.space import SearchSpace
from latency_models.capabilities import INT8, Capabilities
from latency_models.rows import row_index

__all__ = ["Breakdown", "DeviceFacts", "explain", "layer_costs", "macs_costs"]

#: A layer must have lost at least this share of its work to be a "why not faster" candidate.
MIN_REMOVED = 0.05
#: ...and its time saved must trail the work removed by at least this much.
MIN_GAP = 0.05
#: int8 is flagged slower where the predictor prices the layer this much dearer than in float.
INT8_MARGIN = 1.02
OVERHEAD = "model"


class KernelCosts(Protocol):
    """A predictor that prices each kernel (``KernelGBDT``)."""

    def kernel_costs(self, space: SearchSpace, policy: Policy) -> dict[str, float]: ...


@dataclass(frozen=True)
class DeviceFacts:
    """What the device's calibration measured that explains a choice (``latency_models.capabilities``).

    Attributes:
        name: the device, for the words.
        round_to: the channel multiple its kernels reward (1: none measured / any count).
        size_only: scheme (or ``int8``) -> the measured reason it buys no speed.
    """

    name: str = "this device"
    round_to: int = 1
    size_only: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_capabilities(
        cls, name: str, caps: Capabilities | None, round_to: int | None = None
    ) -> DeviceFacts:
        """Facts from stored capabilities; ``round_to`` (the job's resolved one) wins over the device's."""
        if caps is None:
            return cls(name=name, round_to=round_to or 1)
        return cls(name=name, round_to=round_to or caps.round_to, size_only=dict(caps.size_only))


@dataclass(frozen=True)
class Flag:
    """A choice on a layer that buys no speed on this device, and why in words."""

    kind: str  # size_only | channel_multiple | int8_slower
    reason: str


@dataclass
class LayerTime:
    """One layer of the candidate against the dense model."""

    name: str
    op: str
    present: bool
    predicted_ms: float
    dense_ms: float
    share: float
    dense_in: int
    dense_out: int
    kept_in: int
    kept_out: int
    removed: float
    saved: float
    scheme: str
    bits: int | None
    flags: list[Flag] = field(default_factory=list)


@dataclass(frozen=True)
class Advice:
    """One of the layers where time fell least against what was removed, and what to change."""

    layer: str
    removed: float
    saved: float
    suggestion: str


@dataclass
class Breakdown:
    """Where the time goes (per layer and overhead) and why it is not faster."""

    source: str  # "predictor" or "macs"
    total_ms: float
    dense_total_ms: float
    overhead_ms: float
    dense_overhead_ms: float
    layers: list[LayerTime]
    advice: list[Advice]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_costs(predictor: KernelCosts, space: SearchSpace, policy: Policy) -> dict[str, float]:
    """Predicted ms of each present layer of ``policy`` and of the model row (key ``"model"``)."""
    return dict(predictor.kernel_costs(space, policy))


def macs_costs(space: SearchSpace, policy: Policy, total_ms: float) -> dict[str, float]:
    """Without a per-layer predictor: ``total_ms`` split over the present layers by their kept
    MACs (channels and sparsity), nothing for overhead."""
    kept = _kept_macs(space, policy)
    names = [ls.name for ls in space.layers]
    work = float(kept.sum())
    if work <= 0:
        return {OVERHEAD: total_ms}
    return {n: total_ms * float(k) / work for n, k in zip(names, kept, strict=True) if k > 0} | {
        OVERHEAD: 0.0
    }


def _ratios(
    space: SearchSpace, policy: Policy
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Kept / dense input and output channels and presence of each layer (the predictor's view)."""
    idx = row_index(space)
    pa = idx.arrays([policy, Policy.dense()])
    return pa.cin[0], pa.cout[0], pa.cin[1], pa.cout[1], pa.present[0]


def _kept_macs(space: SearchSpace, policy: Policy) -> np.ndarray:
    cin, cout, cin0, cout0, present = _ratios(space, policy)
    return np.asarray([ls.features.macs for ls in space.layers], dtype=float) * _work_kept(
        space, policy, cin, cout, cin0, cout0, present
    )


def _work_kept(
    space: SearchSpace,
    policy: Policy,
    cin: np.ndarray,
    cout: np.ndarray,
    cin0: np.ndarray,
    cout0: np.ndarray,
    present: np.ndarray,
) -> np.ndarray:
    """Share of each layer's dense MACs the policy keeps."""
    out = np.zeros(len(space.layers))
    for i, ls in enumerate(space.layers):
        if not present[i]:
            continue
        ch = cout[i] / cout0[i] if ls.features.op == "dwconv" else (cin[i] / cin0[i]) * (cout[i] / cout0[i])
        out[i] = ch * (1.0 - policy.for_layer(ls.name).target_sparsity)
    return out


def _round_words(kept: int, dense: int, m: int) -> str:
    lo, hi = kept // m * m, (kept // m + 1) * m
    options = [str(v) for v in (lo, hi) if 0 < v < dense]
    if hi >= dense:
        options.append(f"all {dense}")
    return " or ".join(options) if options else str(m)


def _scheme_words(lp: Any) -> str:
    if lp.scheme == "nm" and lp.nm:
        return f"{lp.nm[0]}:{lp.nm[1]} sparsity"
    if lp.scheme == "block" and lp.block:
        return f"1×{lp.block} block sparsity"
    return f"{lp.scheme} sparsity"


def explain(
    space: SearchSpace,
    policy: Policy,
    costs: Mapping[str, float],
    dense_costs: Mapping[str, float],
    facts: DeviceFacts,
    *,
    float_costs: Mapping[str, float] | None = None,
    source: str = "predictor",
) -> Breakdown:
    """The breakdown of ``policy`` from per-layer costs of it, of the dense model and (for the
    int8 check) of the same policy in float; see the module docstring for the rules."""
    cin, cout, cin0, cout0, present = _ratios(space, policy)
    kept = _work_kept(space, policy, cin, cout, cin0, cout0, present)
    total = float(sum(costs.values()))
    m = max(1, facts.round_to)
    layers: list[LayerTime] = []
    for i, ls in enumerate(space.layers):
        lp = policy.for_layer(ls.name)
        here = bool(present[i])
        ms = float(costs.get(ls.name, 0.0)) if here else 0.0
        dense_ms = float(dense_costs.get(ls.name, 0.0))
        row = LayerTime(
            name=ls.name,
            op=ls.features.op,
            present=here,
            predicted_ms=ms,
            dense_ms=dense_ms,
            share=ms / total if total > 0 else 0.0,
            dense_in=int(cin0[i]),
            dense_out=int(cout0[i]),
            kept_in=int(cin[i]) if here else 0,
            kept_out=int(cout[i]) if here else 0,
            removed=float(1.0 - kept[i]),
            saved=float(1.0 - ms / dense_ms) if dense_ms > 0 else 0.0,
            scheme=lp.scheme,
            bits=lp.bits,
        )
        if here:
            row.flags = _flags(row, lp, facts, m, float_costs)
        layers.append(row)
    advice = _advice(layers, m)
    return Breakdown(
        source=source,
        total_ms=total,
        dense_total_ms=float(sum(dense_costs.values())),
        overhead_ms=float(costs.get(OVERHEAD, 0.0)),
        dense_overhead_ms=float(dense_costs.get(OVERHEAD, 0.0)),
        layers=layers,
        advice=advice,
    )


def _flags(
    row: LayerTime, lp: Any, facts: DeviceFacts, m: int, float_costs: Mapping[str, float] | None
) -> list[Flag]:
    flags: list[Flag] = []
    if lp.scheme != "dense" and lp.scheme in facts.size_only:
        flags.append(
            Flag(
                "size_only",
                f"{_scheme_words(lp)} buys no speed on {facts.name}: {facts.size_only[lp.scheme]}",
            )
        )
    if m > 1 and row.kept_out < row.dense_out and row.kept_out % m:
        flags.append(
            Flag(
                "channel_multiple",
                f"keeps {row.kept_out} of {row.dense_out} output channels, not a multiple of {m} "
                f"(the channel block {facts.name}'s kernels compute in): round {row.kept_out} channels to "
                f"{_round_words(row.kept_out, row.dense_out, m)}",
            )
        )
    if lp.bits is not None:
        in_float = float_costs.get(row.name) if float_costs is not None else None
        if INT8 in facts.size_only:
            flags.append(
                Flag("int8_slower", f"{lp.bits}-bit weights on {facts.name}: {facts.size_only[INT8]}")
            )
        elif in_float is not None and row.predicted_ms > INT8_MARGIN * in_float:
            flags.append(
                Flag(
                    "int8_slower",
                    f"{lp.bits}-bit weights make this layer slower on {facts.name}: predicted "
                    f"{row.predicted_ms:.3f} ms against {in_float:.3f} ms in float",
                )
            )
    return flags


def _advice(layers: list[LayerTime], m: int) -> list[Advice]:
    gaps = [(r.removed - r.saved, r) for r in layers if r.present and r.removed >= MIN_REMOVED]
    worst = sorted((g for g in gaps if g[0] >= MIN_GAP), key=lambda g: -g[0])[:3]
    dense_total = sum(r.dense_ms for r in layers) or 1.0
    return [Advice(r.name, r.removed, r.saved, _suggest(r, m, dense_total)) for _gap, r in worst]


def _suggest(r: LayerTime, m: int, dense_total: float) -> str:
    kinds = {f.kind: f for f in r.flags}
    if "channel_multiple" in kinds:
        return f"round {r.kept_out} channels to {_round_words(r.kept_out, r.dense_out, m)}"
    if "size_only" in kinds:
        return (
            f"{r.scheme} sparsity only shrinks the file here: prune channels (width) instead for speed, "
            "or keep it dense"
        )
    if "int8_slower" in kinds:
        return "keep this layer in float: int8 is slower here"
    if r.dense_ms < 0.02 * dense_total:
        return (
            f"this layer is {100 * r.dense_ms / dense_total:.1f} % of the dense time: too small to gain "
            "from; spend the accuracy on a larger layer"
        )
    return (
        f"time fell {100 * max(r.saved, 0):.0f} % for {100 * r.removed:.0f} % of its work removed: the "
        "kernel is bound by memory or fixed costs at this size; prune a compute-heavy layer instead"
    )


def without_bits(policy: Policy) -> Policy:
    """``policy`` with every layer in float (the int8 counterfactual)."""
    return Policy(
        default=replace(policy.default, bits=None),
        layers={n: replace(lp, bits=None) for n, lp in policy.layers.items()},
        skip=policy.skip,
        act_bits=None,
    )
