"""Every registered compression scheme, and every registered latency predictor, passes one contract.

As with the agents (``agents/testing.py``), the suites run over the registries, not a list
written here: a new scheme (a module in ``compression/schemes/``) or a new predictor kind
(``@register`` in ``latency_models/predictors/``) is tested on real small models the moment
it is registered. What each built-in scheme means exactly (which weights a mask keeps) is
pinned in ``test_apply_properties.py`` and ``test_scheme_pins.py``.
"""

from __future__ import annotations

import functools
import json
import math
import random
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from agents.actions import LayerAction, layer_policy
from agents.optuna_space import distributions, from_policy, to_policy
from compression import Policy, PolicyError, apply_policy, measure, schemes, space_for
from compression.apply import get_tensor
from compression.model_io import CompressibleModel
from compression.policy import LayerPolicy
from compression.schemes import PARAM_FIELDS, Scheme
from compression.space import LayerSpace, SearchSpace, SpaceOptions
from latency_models.features import KERNEL_FEATURES, POLICY_FIELDS, SCHEME_CODES, kernel_features
from latency_models.predictors import KINDS, REGISTRY
from latency_models.rows import POLICY_FEATURES, row_index
from latency_models.testing import check_predictor, synthetic_records
from tests.compression.conftest_models import zoo_model

NAMES = schemes.names()
#: Codes stored predictors were trained with: never change one.
BUILTIN_CODES = {"dense": 0, "unstructured": 1, "nm": 2, "block": 3}
#: Small models with every layer kind: plain conv and linear, residual, depthwise and 1×1.
ARCHS = ("lenet5", "resnet20", "mobilenetv2")
K = {n: i for i, n in enumerate(KERNEL_FEATURES)}
#: (model, scheme) pairs where no layer can take the scheme (LeNet-5's convs are 5×5: no 3×3
#: pattern); the contract runs on every other pair, and
#: ``test_a_scheme_no_layer_can_take_is_offered_nowhere_and_says_why`` on these.
NO_LAYER_CAN_TAKE = frozenset({("lenet5", "pattern")})


def _pairs(archs: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(a, n) for a in archs for n in NAMES if (a, n) not in NO_LAYER_CAN_TAKE]


@functools.cache
def _space(arch: str, name: str, bits: tuple[int | None, ...] = (None,)) -> SearchSpace:
    """The space of ``arch`` with only ``name`` searched (no width, depth or bits choices)."""
    return space_for(zoo_model(arch), SpaceOptions(schemes=(name,), bits=bits, width=False, depth=False))


def _offering(space: SearchSpace, name: str) -> list[LayerSpace]:
    layers = [ls for ls in space.layers if name in ls.schemes]
    assert layers, f"no layer of the space offers {name!r}"
    return layers


@pytest.mark.parametrize(("arch", "name"), sorted(NO_LAYER_CAN_TAKE))
def test_a_scheme_no_layer_can_take_is_offered_nowhere_and_says_why(arch: str, name: str) -> None:
    space = _space(arch, name)
    assert not [ls.name for ls in space.layers if name in ls.schemes]
    assert all(schemes.get(name).layer_problem(ls.features) for ls in space.layers)


def _sampled(scheme: Scheme, ls: LayerSpace, options: SpaceOptions, rng: random.Random) -> LayerPolicy:
    return LayerPolicy(scheme=scheme.name, **scheme.sample(rng, ls, options)).validate(ls.name)


def _weights(cm: CompressibleModel) -> dict[str, torch.Tensor]:
    return {layer.name: get_tensor(cm.gm, layer.weight).detach() for layer in cm.graph.layers}


# --------------------------------------------------------------------------- the registry


def test_registry_lists_every_scheme_once_with_stable_codes() -> None:
    assert NAMES[0] == schemes.DENSE
    assert {n: schemes.get(n).code for n in BUILTIN_CODES} == BUILTIN_CODES
    codes = [s.code for s in schemes.schemes()]
    assert len(set(codes)) == len(codes) and codes == sorted(codes)
    assert {s.name: s.code for s in schemes.schemes()} == SCHEME_CODES
    assert schemes.CHANNEL not in NAMES  # an alias of width, not a scheme
    assert SpaceOptions().schemes == NAMES  # a search offers every registered scheme by default
    for s in schemes.schemes():
        assert s.description and "\n" not in s.description, s.name
        assert set(s.fields) <= set(PARAM_FIELDS), s.name
    with pytest.raises(KeyError, match="registered"):
        schemes.get("magic")


def test_register_refuses_a_taken_code_the_channel_alias_and_unknown_fields() -> None:
    def scheme(name: str, code: int, fields: tuple[str, ...] = (), description: str = "x") -> type[Scheme]:
        base = type(schemes.get(schemes.DENSE))
        attrs: dict[str, Any] = {"name": name, "code": code, "fields": fields, "description": description}
        return type(f"Toy{code}", (base,), attrs)

    with pytest.raises(ValueError, match="taken"):
        schemes.register(scheme("toy", BUILTIN_CODES["nm"]))
    with pytest.raises(ValueError, match="channel"):
        schemes.register(scheme(schemes.CHANNEL, 99))
    with pytest.raises(ValueError, match="not among"):
        schemes.register(scheme("toy", 99, fields=("pattern",)))
    with pytest.raises(ValueError, match="description"):
        schemes.register(scheme("toy", 99, description=""))
    assert "toy" not in schemes.names()


# --------------------------------------------------------------------------- validate and sample


@pytest.mark.parametrize(("arch", "name"), _pairs(ARCHS))
def test_sampled_policies_are_valid_round_trip_and_stay_in_the_space(name: str, arch: str) -> None:
    scheme = schemes.get(name)
    space = _space(arch, name)
    rng = random.Random(0)
    for ls in space.layers:
        problem = scheme.layer_problem(ls.features)
        assert not (problem and name in ls.schemes), f"{ls.name}: offered although {problem}"
        assert (name in ls.schemes) == (name == schemes.DENSE or scheme.offered(ls)), ls.name
    for ls in _offering(space, name):
        for _ in range(4):
            lp = _sampled(scheme, ls, space.options, rng)
            assert scheme.validate(lp, ls) is None, (ls.name, lp)
            assert 0.0 <= lp.target_sparsity <= space.options.max_sparsity + 1e-9, lp
            again = Policy.from_dict({"layers": {ls.name: lp.to_dict()}}).for_layer(ls.name)
            assert again == lp, "parsing the JSON form must give the same layer policy"


@pytest.mark.parametrize("name", NAMES)
def test_a_scheme_without_its_fields_is_refused_by_naming_them(name: str) -> None:
    scheme = schemes.get(name)
    problem = scheme.validate(LayerPolicy(scheme=name))
    if problem is None:
        return  # its defaults are a valid policy (dense, unstructured at 0)
    assert any(f in problem for f in scheme.fields), problem
    with pytest.raises(PolicyError, match=r"^default: "):
        Policy.from_dict({"default": {"scheme": name}})


def test_parsing_resets_the_fields_a_scheme_does_not_use() -> None:
    raw = {"sparsity": 0.4, "nm": [2, 4], "block": 8, "patterns": 4}  # a value for every PARAM_FIELDS
    for s in schemes.schemes():
        lp = Policy.from_dict({"default": {"scheme": s.name, **raw}}).default
        for name in PARAM_FIELDS:
            default = getattr(LayerPolicy(), name)
            assert (getattr(lp, name) != default) == (name in s.fields), (s.name, name)


@pytest.mark.parametrize("name", NAMES)
def test_agent_actions_and_probes_decode_to_valid_policies(name: str) -> None:
    scheme = schemes.get(name)
    space = _space("resnet20", name)
    for ls in _offering(space, name):
        last = math.inf
        for keep in (0.0, 0.25, 0.5, 0.75, 1.0):
            own = scheme.from_keep(keep, ls, space.options)
            lp = LayerPolicy(scheme=name, **own).validate() if own is not None else LayerPolicy()
            assert scheme.validate(lp, ls) is None or own is None, (keep, lp)
            assert lp.target_sparsity <= last + 1e-9, "keeping more must never zero more"
            last = lp.target_sparsity
            assert lp == layer_policy(ls, space.options, LayerAction(keep_weights=keep), name)
        assert scheme.from_keep(1.0, ls, space.options) is None, "keeping everything is dense"
        probe = scheme.probe(ls, 0.5)
        if probe is not None:
            patch = json.loads(json.dumps(probe))  # sensitivity moves are stored as JSON
            fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in patch.items()}
            lp = LayerPolicy(scheme=name, **fields).validate()
            assert scheme.validate(lp, ls) is None and lp.target_sparsity > 0.0, lp


# --------------------------------------------------------------------------- mask and size


def _policy(space: SearchSpace, name: str, seed: int, bits: int | None) -> Policy:
    """The scheme on every layer offering it: a 50 % probe on even layers, a draw on odd ones."""
    scheme, rng = schemes.get(name), random.Random(seed)
    layers = {}
    for i, ls in enumerate(_offering(space, name)):
        probe = scheme.probe(ls, 0.5) if i % 2 == 0 else None
        own: dict[str, Any] | None = (
            {k: tuple(v) if isinstance(v, list) else v for k, v in probe.items()} if probe else None
        )
        lp = LayerPolicy(scheme=name, **own) if own is not None else _sampled(scheme, ls, space.options, rng)
        layers[ls.name] = replace(lp, bits=bits).validate(ls.name)
    return Policy(default=LayerPolicy(bits=bits), layers=layers)


@pytest.mark.parametrize("bits", [None, 8])
@pytest.mark.parametrize(("arch", "name"), _pairs(("lenet5", "resnet20")))
def test_masks_match_the_policy_and_size_follows_the_masks(name: str, arch: str, bits: int | None) -> None:
    scheme = schemes.get(name)
    cm = zoo_model(arch)
    space = _space(arch, name)
    policy = _policy(space, name, seed=1, bits=bits)
    compressed = apply_policy(cm, policy)
    weights = _weights(cm)
    dense = measure(apply_policy(cm, Policy(default=LayerPolicy(bits=bits)))).size_bytes
    b = bits or 32
    saved = 0
    for ls in space.layers:
        lp = policy.for_layer(ls.name)
        target = compressed.layer_weights[ls.name]
        mask = compressed.masks.get(target)
        expected = scheme.mask(weights[ls.name], lp) if lp.scheme == name else None
        zeros = 0.0 if mask is None else 1.0 - float(mask.float().mean())
        f = ls.features
        if f.out_channels % 16 == 0 and (f.in_channels // f.groups) % 8 == 0:
            # no short tail runs or blocks: what is zeroed is the policy's fraction, up to rounding
            assert abs(zeros - lp.target_sparsity) <= 0.05, (ls.name, lp, zeros)
        if mask is None:
            assert expected is None, f"{ls.name}: apply dropped the scheme's mask"
            continue
        assert expected is not None and torch.equal(mask, expected), f"{ls.name}: apply used another mask"
        assert mask.dtype == torch.bool and mask.shape == weights[ls.name].shape
        w = get_tensor(compressed.gm, target)
        assert torch.all(w[~mask] == 0), f"{ls.name}: weight not zero where masked"
        numel, nnz = mask.numel(), int(mask.sum())
        stored = scheme.sparse_bytes(weights[ls.name], mask, b, lp)
        assert stored >= math.ceil(nnz * b / 8), "the non-zeros must be stored"
        if zeros >= 0.5 and b == 32:
            assert stored < numel * 4, f"{ls.name}: half zeros must store smaller than dense"
        saved += math.ceil(numel * b / 8) - min(math.ceil(numel * b / 8), stored)
    assert measure(compressed).size_bytes == dense - saved


# --------------------------------------------------------------------------- Optuna


def _draw(dist: Any, rng: random.Random) -> Any:
    return rng.choice(dist.choices) if hasattr(dist, "choices") else rng.uniform(dist.low, dist.high)


@pytest.mark.parametrize("name", NAMES)
def test_optuna_parameters_decode_to_valid_policies_and_round_trip(name: str) -> None:
    scheme = schemes.get(name)
    space = _space("resnet20", name, bits=(None, 8))
    rng = random.Random(0)
    for ls in _offering(space, name):
        dists = scheme.optuna_distributions(ls, space.options)
        assert set(dists) <= set(scheme.fields), dists
        for _ in range(4):
            params = {k: _draw(d, rng) for k, d in dists.items()}
            own = scheme.from_optuna(params, ls)
            lp = LayerPolicy(scheme=name, **own).validate()
            assert scheme.validate(lp, ls) is None, lp
            back = {k: v for k, v in scheme.to_optuna(lp).items() if k in dists}
            assert scheme.from_optuna({**params, **back}, ls) == own
    for seed in range(4):
        policy = space.sample(random.Random(seed))
        assert to_policy(space, from_policy(space, policy)) == policy


def test_schemes_sharing_a_parameter_agree_on_its_distribution() -> None:
    space = space_for(zoo_model("resnet20"))  # every registered scheme at once
    names = list(distributions(space))
    assert any(n.endswith("/sparsity") for n in names)
    assert len(names) == len(set(names))


# --------------------------------------------------------------------------- predictor encoding


@pytest.mark.parametrize(("arch", "name"), _pairs(ARCHS))
def test_encoding_is_finite_and_the_same_for_kernel_features_and_rows(name: str, arch: str) -> None:
    scheme = schemes.get(name)
    space = _space(arch, name, bits=(None, 8))
    _offering(space, name)
    rng = random.Random(2)
    policies = [space.sample(rng) for _ in range(6)]
    kx = kernel_features(space, policies).x
    fields = row_index(space).arrays(policies, fields=True).fields
    assert fields is not None and POLICY_FEATURES == POLICY_FIELDS
    assert np.all(np.isfinite(kx)) and np.all(np.isfinite(fields))
    cols = [K[c] for c in POLICY_FIELDS[1:]]
    for p, policy in enumerate(policies):
        for i, ls in enumerate(space.layers):
            lp = policy.for_layer(ls.name)
            one = [*schemes.get(lp.scheme).encode(lp), lp.bits or 0]
            assert list(fields[p, i]) == one, (ls.name, lp)
            assert list(kx[p, i, cols]) == one[1:], (ls.name, lp)
            hot = [c for c in SCHEME_CODES if kx[p, i, K[f"scheme_{c}"]] == 1.0]
            assert hot == [lp.scheme], (ls.name, lp)
    assert any(policy.for_layer(ls.name).scheme == name for policy in policies for ls in space.layers)
    assert scheme.encode(LayerPolicy(scheme=name, **scheme.probe(_offering(space, name)[0], 0.5) or {}))


# --------------------------------------------------------------------------- predictors


class _Small:
    """Constructor arguments that keep fitting a predictor kind to a second or two here."""

    KWARGS: ClassVar[dict[str, dict[str, Any]]] = {
        "kernel_gbdt": {"n_estimators": 60},
        "gnn": {"epochs": 20, "hidden": 32},
    }


@functools.cache
def _records() -> list:
    return synthetic_records(n_arch=12, per_arch=8, seed=5)


def test_every_built_in_predictor_kind_is_registered() -> None:
    assert set(KINDS) <= set(REGISTRY)


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_every_registered_predictor_fits_predicts_saves_and_loads(kind: str) -> None:
    cls = REGISTRY[kind]
    metrics = check_predictor(lambda: cls(**_Small.KWARGS.get(kind, {})), _records())
    assert metrics["rmse_ms"] >= 0.0


def test_the_job_spec_accepts_exactly_the_registered_schemes() -> None:
    """``engine.spec`` lists the names for its OpenAPI enum (it imports no torch, so it cannot
    read the registry): a new scheme is added there too, or REST jobs refuse it."""
    import typing

    from engine.spec import SchemeName, SpaceSpec

    assert typing.get_args(SchemeName) == (*NAMES, schemes.CHANNEL), "add the scheme to engine.spec"
    assert SpaceSpec().space_options().schemes == NAMES  # unset: every registered scheme
