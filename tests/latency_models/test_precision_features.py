"""The latency features see precision per layer, as the export writes it; predictors and
measurements from the old whole-model int8 encoding are refused or left out, not misread."""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from compression import from_module, space_for
from compression.apply import apply_policy
from compression.mixed_precision import export_policy_onnx, supports_int4_matmul
from compression.onnx_export import export_onnx
from compression.policy import LayerPolicy, Policy
from compression.space import SpaceOptions
from compression.zoo import build_model
from latency_models.features import FEATURE_VERSION, KERNEL_FEATURES, kernel_features, layer_runtime
from latency_models.predictors import MacsLinear
from latency_models.predictors.base import StalePredictorError, load_predictor
from latency_models.rows import ROW_FEATURES, ROW_TYPES, row_index
from latency_models.store import DeviceStore
from latency_models.testing import synthetic_records

K = {n: i for i, n in enumerate(KERNEL_FEATURES)}
OPTIONS = SpaceOptions(bits=(None, 8, 4))


def _model(arch: str, size: int):
    torch.manual_seed(0)
    cm = from_module(
        build_model(arch, in_channels=1, image_size=size, num_classes=10), torch.randn(2, 1, size, size)
    )
    return cm, space_for(cm, OPTIONS)


def test_only_the_quantized_layer_is_int8_and_its_neighbours_pay_qdq() -> None:
    _, space = _model("resnet20", 16)
    names = space.layer_names
    target = names[3]
    policy = Policy(layers={target: LayerPolicy(bits=8)})
    kb = kernel_features(space, [policy])
    int8 = kb.x[0, :, K["int8"]] > 0.5
    assert [names[i] for i in np.flatnonzero(int8)] == [target]
    assert kb.x[0, names.index(target), K["bits"]] == 8
    i = names.index(target)
    neighbours = {b for a, b in space.edges if a == i} | {a for a, b in space.edges if b == i}
    assert kb.x[0, i, K["qdq_edges"]] == len(neighbours) > 0
    for j in neighbours:
        assert kb.x[0, j, K["qdq_edges"]] >= 1
    # all-int8: no boundaries left between layers
    all8 = Policy(default=LayerPolicy(bits=8))
    assert kernel_features(space, [all8]).x[0, :, K["qdq_edges"]].sum() == 0
    # the batched rows carry the same per-layer flags
    pa = row_index(space).arrays([policy, all8])
    assert np.array_equal(pa.int8[0], int8) and pa.int8[1].all()
    assert np.array_equal(pa.qdq[0], kb.x[0, :, K["qdq_edges"]])
    keys, owner, _ = row_index(space).keys(pa)
    x, _ = row_index(space).features(keys)
    kern = x[:, ROW_FEATURES.index("type")] != ROW_TYPES.index("model")
    col = ROW_FEATURES.index("int8")
    assert x[kern & (owner == 0), col].sum() == 1
    assert x[kern & (owner == 1), col].sum() == len(names)


@pytest.mark.skipif(not supports_int4_matmul(), reason="this ONNX Runtime has no MatMulNBits CPU kernel")
def test_4bit_linear_layers_are_int4_kernels_and_4bit_convs_int8() -> None:
    _, space = _model("vit", 16)
    policy = Policy(default=LayerPolicy(bits=4))
    kb = kernel_features(space, [policy])
    linear = np.array([ls.features.op == "linear" for ls in space.layers])
    assert (kb.x[0, linear, K["int4"]] > 0.5).all() and not (kb.x[0, linear, K["int8"]] > 0.5).any()
    assert (kb.x[0, ~linear, K["int8"]] > 0.5).all()


@pytest.mark.parametrize("arch", ["resnet20", "vit"])
def test_features_describe_the_exported_file(tmp_path: Path, arch: str) -> None:
    """The rule the predictor is trained on is the rule the export follows, layer by layer."""
    cm, space = _model(arch, 16)
    names = space.layer_names
    policy = Policy(
        layers={n: LayerPolicy(bits=(4, 8)[i % 2]) for i, n in enumerate(names) if i % 3},
        skip=frozenset(b.name for b in space.blocks[:1]),
    )
    compressed = apply_policy(cm, policy)
    fp32 = export_onnx(compressed.gm, cm.example_input(2), tmp_path / "f.onnx", check=False)
    batches = [np.random.default_rng(0).standard_normal((4, 1, 16, 16)).astype(np.float32)]
    _, precision = export_policy_onnx(compressed, fp32, batches, tmp_path / "q.onnx")
    assert dict(precision) == layer_runtime(space, policy)


def test_a_predictor_of_the_old_encoding_is_refused_with_the_fix(tmp_path: Path) -> None:
    records = synthetic_records(n_arch=4, per_arch=4, seed=1)
    folder = MacsLinear().fit(records).save(tmp_path / "macs")
    assert load_predictor(folder).fitted
    meta = json.loads((folder / "predictor.json").read_text())
    assert meta["feature_version"] == FEATURE_VERSION
    del meta["feature_version"]  # what every predictor saved before per-layer precision looks like
    (folder / "predictor.json").write_text(json.dumps(meta))
    with pytest.raises(StalePredictorError, match=r"refit.*modeltailor calibrate"):
        load_predictor(folder)


def test_old_measurements_of_quantized_models_are_left_out_of_a_refit() -> None:
    records = synthetic_records(n_arch=2, per_arch=6, seed=2)
    quantized = [
        r for r in records if any(lp.bits for lp in r.policy.layers.values()) or r.policy.default.bits
    ]
    if not quantized:
        quantized = [replace(records[1], policy=Policy(default=LayerPolicy(bits=8)))]
        records = [*records, *quantized]
    with tempfile.TemporaryDirectory() as tmp:
        store = DeviceStore("dev", Path(tmp))
        store.append(records)
        assert len(store.records()) == len(records)  # written now: current
        # lines written before the field existed (feature version 1)
        lines = [json.loads(line) for line in store.measurements.read_text().splitlines()]
        for d in lines:
            d.pop("feature_version")
        store.measurements.write_text("".join(json.dumps(d) + "\n" for d in lines))
        kept = store.records()
        assert len(kept) == len(records) - len(quantized)
        assert all(
            r.policy.default.bits is None and not any(lp.bits for lp in r.policy.layers.values())
            for r in kept
        )
        assert len(store.records(current=False)) == len(records)
