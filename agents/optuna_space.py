"""The search space as Optuna distributions, and Optuna parameters back to a policy.

Every choice is always suggested (a fixed, non-conditional space), which is what
multivariate TPE and NSGA-II handle best; parameters a layer's scheme does not use are
ignored when the policy is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from compression.policy import LayerPolicy, Policy
from compression.space import SearchSpace

FLOAT = "fp32"


def _nm_key(nm: tuple[int, int]) -> str:
    return f"{nm[0]}:{nm[1]}"


def _bits_key(bits: int | None) -> str:
    return FLOAT if bits is None else str(bits)


def distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """One Optuna distribution per free choice, named ``<layer>/<field>`` or ``skip/<block>``."""
    o = space.options
    dists: dict[str, BaseDistribution] = {}
    for ls in space.layers:
        if o.width and ls.decides_width:
            dists[f"{ls.name}/width"] = FloatDistribution(o.min_width, 1.0)
        if len(ls.schemes) > 1:
            dists[f"{ls.name}/scheme"] = CategoricalDistribution(ls.schemes)
        if "unstructured" in ls.schemes or "block" in ls.schemes:
            dists[f"{ls.name}/sparsity"] = FloatDistribution(0.0, o.max_sparsity)
        if "nm" in ls.schemes and len(ls.nm_choices) > 1:
            dists[f"{ls.name}/nm"] = CategoricalDistribution([_nm_key(p) for p in ls.nm_choices])
        if "block" in ls.schemes and len(ls.block_choices) > 1:
            dists[f"{ls.name}/block"] = CategoricalDistribution(ls.block_choices)
        if len(ls.bits_choices) > 1:
            dists[f"{ls.name}/bits"] = CategoricalDistribution([_bits_key(b) for b in ls.bits_choices])
    if o.depth:
        for b in space.blocks:
            dists[f"skip/{b.name}"] = CategoricalDistribution([False, True])
    return dists


def to_policy(space: SearchSpace, params: Mapping[str, Any]) -> Policy:
    """The policy of a (complete) set of Optuna parameters."""
    layers: dict[str, LayerPolicy] = {}
    for ls in space.layers:
        p = f"{ls.name}/"
        scheme = params.get(p + "scheme", ls.schemes[0])
        bits_key = params.get(p + "bits", _bits_key(ls.bits_choices[0]))
        kw: dict[str, Any] = {
            "width": space.options.snap_width(ls, round(float(params.get(p + "width", 1.0)), 4)),
            "scheme": scheme,
            "bits": None if bits_key == FLOAT else int(bits_key),
        }
        if scheme in ("unstructured", "block"):
            kw["sparsity"] = round(float(params[p + "sparsity"]), 4)
        if scheme == "block":
            kw["block"] = int(params.get(p + "block", ls.block_choices[0]))
        if scheme == "nm":
            n, m = str(params.get(p + "nm", _nm_key(ls.nm_choices[0]))).split(":")
            kw["nm"] = (int(n), int(m))
        layers[ls.name] = LayerPolicy(**kw).validate(ls.name)
    skip = frozenset(b.name for b in space.blocks if params.get(f"skip/{b.name}", False))
    return Policy(layers=layers, skip=skip)


def from_policy(space: SearchSpace, policy: Policy) -> dict[str, Any]:
    """Optuna parameters of ``policy`` (the inverse of :func:`to_policy`), for ``enqueue_trial``.

    Only parameters with a distribution are given; those the policy leaves unused (the
    sparsity of a dense layer, say) are left to the sampler, as ``to_policy`` ignores them.
    """
    dists = distributions(space)
    params: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        if key in dists:
            params[key] = value

    for ls in space.layers:
        lp = policy.for_layer(ls.name)
        p = f"{ls.name}/"
        put(p + "width", float(lp.width))
        put(p + "scheme", lp.scheme)
        put(p + "bits", _bits_key(lp.bits))
        if lp.scheme in ("unstructured", "block"):
            put(p + "sparsity", float(lp.sparsity))
        if lp.scheme == "block" and lp.block is not None:
            put(p + "block", int(lp.block))
        if lp.scheme == "nm" and lp.nm is not None:
            put(p + "nm", _nm_key(lp.nm))
    for b in space.blocks:
        put(f"skip/{b.name}", b.name in policy.skip)
    return params
