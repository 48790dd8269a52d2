"""The search space as Optuna distributions, and Optuna parameters back to a policy.

Every choice is always suggested (a fixed, non-conditional space), which is what
multivariate TPE and NSGA-II handle best; parameters a layer's scheme does not use are
ignored when the policy is built. Each scheme names its own parameters and maps them to and
from its policy fields (``compression.schemes.Scheme.optuna_distributions``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from compression import schemes
from compression.policy import LayerPolicy, Policy
from compression.space import LayerSpace, SearchSpace, SpaceOptions

FLOAT = "fp32"
#: Parameters of one layer are suggested in LayerPolicy field order (width, scheme, its
#: parameters, bits), whichever schemes contribute them: the samplers draw in this order.
_FIELD_ORDER = {f.name: i for i, f in enumerate(fields(LayerPolicy))}


def _bits_key(bits: int | None) -> str:
    return FLOAT if bits is None else str(bits)


def _scheme_distributions(ls: LayerSpace, options: SpaceOptions) -> dict[str, BaseDistribution]:
    """Distributions of every parameter the layer's schemes use, by field name, in field order."""
    merged: dict[str, BaseDistribution] = {}
    for scheme in schemes.schemes():
        if scheme.name not in ls.schemes:
            continue
        for name, dist in scheme.optuna_distributions(ls, options).items():
            if merged.setdefault(name, dist) != dist:
                raise ValueError(
                    f"layer {ls.name!r}: schemes disagree on the distribution of {name!r} "
                    f"({merged[name]} vs {dist} from {scheme.name!r})"
                )
    return dict(sorted(merged.items(), key=lambda kv: _FIELD_ORDER.get(kv[0], len(_FIELD_ORDER))))


def distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """One Optuna distribution per free choice, named ``<layer>/<field>`` or ``skip/<block>``."""
    o = space.options
    dists: dict[str, BaseDistribution] = {}
    for ls in space.layers:
        if o.width and ls.decides_width:
            dists[f"{ls.name}/width"] = FloatDistribution(o.min_width, 1.0)
        if len(ls.schemes) > 1:
            dists[f"{ls.name}/scheme"] = CategoricalDistribution(ls.schemes)
        for name, dist in _scheme_distributions(ls, o).items():
            dists[f"{ls.name}/{name}"] = dist
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
        own = {name: params[p + name] for name in schemes.PARAM_FIELDS if p + name in params}
        layers[ls.name] = LayerPolicy(
            width=space.options.snap_width(ls, round(float(params.get(p + "width", 1.0)), 4)),
            scheme=scheme,
            bits=None if bits_key == FLOAT else int(bits_key),
            **schemes.get(scheme).from_optuna(own, ls),
        ).validate(ls.name)
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
        for name, value in schemes.get(lp.scheme).to_optuna(lp).items():
            put(p + name, value)
    for b in space.blocks:
        put(f"skip/{b.name}", b.name in policy.skip)
    return params
