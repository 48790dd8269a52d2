"""Pattern-based sparsity (``compression.schemes.pattern``): what the mask keeps, its size,
its recovery by OBC and its export, on real zoo models.

What a user relies on: every kept 3×3 kernel keeps exactly 4 of its 9 weights in one of at
most K patterns of the layer, exactly the asked share of kernels is removed whole, the stored
size counts the pattern index, OBC picks the mask with the Hessian and updates the kept
weights, and the ONNX file computes what the search scored.
"""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from compression import Policy, PolicyError, apply_policy, measure, schemes, space_for
from compression.apply import CompressedModel, get_tensor
from compression.data import Dataset, calibration_batches, load_dataset
from compression.evaluate import predict
from compression.model_io import CompressibleModel, from_module
from compression.onnx_export import export_onnx, run_onnx
from compression.policy import LayerPolicy
from compression.schemes.pattern import KEPT, TAPS
from compression.scoring import compress
from compression.train import trained_model
from latency_models.capabilities import HIGH_SPARSITY, plan_trials
from tests.compression.conftest_models import zoo_model


def _pattern_layers(model: CompressibleModel) -> list[str]:
    return [ls.name for ls in space_for(model).layers if "pattern" in ls.schemes]


def _policy(model: CompressibleModel, patterns: int, sparsity: float) -> Policy:
    spec = {"scheme": "pattern", "patterns": patterns, "sparsity": sparsity}
    return Policy.from_dict({"layers": {name: spec for name in _pattern_layers(model)}})


def _kernels(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1, TAPS)


def check_pattern_mask(mask: torch.Tensor, lp: LayerPolicy, where: str) -> None:
    """4 of 9 in every kept kernel, at most K distinct patterns, the connectivity share removed."""
    kernels = _kernels(mask)
    per = kernels.sum(dim=1)
    assert set(per.unique().tolist()) <= {0, KEPT}, f"{where}: a kept kernel without exactly 4 weights"
    assert int((per == 0).sum()) == round(lp.sparsity * len(kernels)), f"{where}: connectivity share"
    used = {tuple(row) for row in kernels[per == KEPT].tolist()}
    assert lp.patterns is not None and len(used) <= lp.patterns, f"{where}: {len(used)} patterns"


@pytest.mark.parametrize(("patterns", "sparsity"), [(1, 0.0), (4, 0.0), (4, 0.4), (8, 0.25)])
@pytest.mark.parametrize("arch", ["resnet20", "mobilenetv2"])
def test_magnitude_mask_keeps_four_of_nine_in_k_patterns(arch: str, patterns: int, sparsity: float) -> None:
    model = zoo_model(arch)
    policy = _policy(model, patterns, sparsity)
    cm = apply_policy(model, policy)
    dense = {layer.name: get_tensor(model.gm, layer.weight).detach() for layer in model.graph.layers}
    assert policy.layers, "the model has 3×3 convolutions"
    for name in policy.layers:
        target = cm.layer_weights[name]
        mask = cm.masks[target]
        check_pattern_mask(mask, policy.for_layer(name), name)
        w = get_tensor(cm.gm, target)
        assert torch.all(w[~mask] == 0) and torch.equal(w[mask], dense[name][mask]), name
        # The removed kernels are the weakest, and each kept kernel wears the best of the
        # layer's patterns for it (by the magnitude the mask was made from).
        sq = _kernels(dense[name]) ** 2
        per = _kernels(mask).sum(dim=1)
        norms = sq.sum(dim=1)
        if bool((per == 0).any()):
            assert float(norms[per == 0].max()) <= float(norms[per > 0].min()) + 1e-12, name
        library = torch.tensor(sorted({tuple(r) for r in _kernels(mask)[per > 0].tolist()}))
        kept_sq = (sq * _kernels(mask)).sum(dim=1)[per > 0]
        best = (sq[per > 0] @ library.T.to(sq.dtype)).max(dim=1).values
        assert torch.allclose(kept_sq, best, rtol=1e-5, atol=1e-12), name


def test_the_zeroed_fraction_and_the_stored_size_count_the_pattern_index() -> None:
    model = zoo_model("resnet20")
    for patterns, sparsity in ((4, 0.0), (8, 0.5)):
        policy = _policy(model, patterns, sparsity)
        cm = apply_policy(model, policy)
        dense_size = measure(apply_policy(model, Policy.dense())).size_bytes
        saved = 0
        for name in policy.layers:
            lp = policy.for_layer(name)
            mask = cm.masks[cm.layer_weights[name]]
            zeroed = 1.0 - float(mask.float().mean())
            assert zeroed == pytest.approx(lp.target_sparsity, abs=1.0 / _kernels(mask).shape[0]), name
            kernels = _kernels(mask).shape[0]
            kept = int((_kernels(mask).sum(dim=1) > 0).sum())
            index_bits = kept * math.ceil(math.log2(patterns)) + kernels + 9 * patterns
            stored = math.ceil(int(mask.sum()) * 4) + math.ceil(index_bits / 8)
            saved += mask.numel() * 4 - min(mask.numel() * 4, stored)
        assert measure(cm).size_bytes == dense_size - saved


def test_a_default_reaches_only_the_layers_that_can_take_patterns() -> None:
    model = zoo_model("mobilenetv2")  # 1×1 and 3×3 (depthwise) convolutions, a linear head
    cm = apply_policy(model, Policy.from_dict({"default": {"scheme": "pattern", "patterns": 2}}))
    three = set(_pattern_layers(model))
    assert three and len(three) < len(model.graph.layers)
    for layer in model.graph.layers:
        mask = cm.masks.get(cm.layer_weights[layer.name])
        assert (mask is not None) == (layer.name in three), layer.name
        if mask is not None:
            check_pattern_mask(mask, LayerPolicy(scheme="pattern", patterns=2), layer.name)


def test_bad_pattern_policies_name_the_field_and_the_fix() -> None:
    with pytest.raises(PolicyError, match=r"patterns K in \[1, 8\].*\"patterns\": 4"):
        Policy.from_dict({"default": {"scheme": "pattern"}})
    with pytest.raises(PolicyError, match="patterns"):
        Policy.from_dict({"default": {"scheme": "pattern", "patterns": 9}})
    with pytest.raises(PolicyError, match="patterns must be an integer"):
        Policy.from_dict({"default": {"scheme": "pattern", "patterns": 2.5}})
    model = zoo_model("resnet20")
    linear = next(ls.name for ls in space_for(model).layers if ls.features.op == "linear")
    with pytest.raises(PolicyError, match=f"{linear}.*3×3 convolution"):
        apply_policy(model, Policy.from_dict({"layers": {linear: {"scheme": "pattern", "patterns": 4}}}))
    # Another scheme drops the field, so equal policies stay equal.
    lp = Policy.from_dict({"default": {"scheme": "unstructured", "sparsity": 0.5, "patterns": 4}}).default
    assert lp.patterns is None and "patterns" not in lp.to_dict()


def test_onnx_runs_the_pattern_model_as_scored(tmp_path: Path) -> None:
    model = zoo_model("resnet20")
    cm = apply_policy(model, _policy(model, 4, 0.3))
    x = model.example_input(4)
    path = export_onnx(cm.gm, x, tmp_path / "pattern.onnx")
    with torch.no_grad():
        expected = cm.gm(x).numpy()
    np.testing.assert_allclose(run_onnx(path, x.numpy()), expected, rtol=1e-4, atol=1e-4)


def test_the_capability_probe_times_pattern_on_the_conv_probe() -> None:
    trials = [t for t in plan_trials(multiples=(16,)) if t.kind == "scheme" and t.choice == "pattern"]
    assert [t.probe for t in trials] == ["conv"], "only the conv probe has 3×3 layers"
    policy = trials[0].policy
    for name, lp in policy.layers.items():
        assert lp.scheme == "pattern" and lp.target_sparsity == pytest.approx(HIGH_SPARSITY, abs=0.01), name


# --------------------------------------------------------------------------- OBC on a trained model


@functools.cache
def _digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def vgg(tmp_path_factory: pytest.TempPathFactory) -> CompressibleModel:
    data = _digits()
    module = trained_model("vgg", data, seed=0, cache_dir=tmp_path_factory.mktemp("zoo"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return from_module(module, torch.from_numpy(data.x_val[:2]), "vgg")


def _kl_to_dense(model: CompressibleModel, cm: CompressedModel) -> float:
    x = _digits().x_val
    dense = torch.log_softmax(predict(model.gm, x), dim=-1)
    ours = torch.log_softmax(predict(cm.gm, x), dim=-1)
    return float(torch.nn.functional.kl_div(ours, dense, log_target=True, reduction="batchmean"))


@pytest.mark.slow  # trains the zoo VGG on the digits first (about a minute on 2 idle cores)
def test_obc_chooses_the_pattern_mask_with_the_hessian_and_updates_the_weights(
    vgg: CompressibleModel,
) -> None:
    policy = _policy(vgg, 4, 0.3)
    calib = calibration_batches(_digits(), 4, 64, seed=0)
    with torch.no_grad():
        mag = compress(vgg, policy, calib, reconstruct=True, recovery="magnitude")
        obc = compress(vgg, policy, calib, reconstruct=True, recovery="obc")
    dense = {layer.name: get_tensor(vgg.gm, layer.weight).detach() for layer in vgg.graph.layers}
    moved = 0
    for name in policy.layers:
        target = obc.layer_weights[name]
        mask = obc.masks[target]
        check_pattern_mask(mask, policy.for_layer(name), f"obc {name}")
        w = get_tensor(obc.gm, target)
        assert torch.all(w[~mask] == 0), name
        moved += int(not torch.allclose(w[mask], dense[name][mask]))
    assert moved > len(policy.layers) // 2, "OBC updates the kept weights to absorb the pruned ones"
    assert _kl_to_dense(vgg, obc) < _kl_to_dense(vgg, mag)
    assert measure(obc).size_bytes == measure(mag).size_bytes  # same counts, other weights


def test_pattern_is_a_registered_scheme_with_its_own_code() -> None:
    scheme = schemes.get("pattern")
    assert scheme.code not in {0, 1, 2, 3} and scheme.fields == ("sparsity", "patterns")
    assert LayerPolicy(scheme="pattern", patterns=4, sparsity=0.5).target_sparsity == pytest.approx(
        1 - 0.5 * 4 / 9
    )
