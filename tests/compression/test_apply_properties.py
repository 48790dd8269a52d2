"""Random policies on every zoo model: nothing crashes and every scheme holds exactly."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compression import Policy, apply_policy, measure, space_for
from compression.apply import CompressedModel
from compression.onnx_export import export_onnx, run_onnx
from tests.compression.conftest_models import ARCHS, zoo_model

PROPERTY = settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))


def _input_last(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1) if t.dim() == 4 else t


def check_masks(cm: CompressedModel) -> None:
    """Each layer's mask obeys its scheme and the weight is zero where masked."""
    for layer, target in cm.layer_weights.items():
        lp = cm.policy.for_layer(layer)
        mask = cm.masks.get(target)
        w = dict(cm.gm.named_parameters())[target].detach()
        if mask is None:
            continue
        assert torch.all(w[~mask] == 0), layer
        if lp.scheme == "unstructured":
            assert int((~mask).sum()) == round(lp.sparsity * mask.numel()), layer
        elif lp.scheme == "nm":
            n, m = lp.nm  # type: ignore[misc]
            ml = _input_last(mask)
            i = ml.shape[-1]
            full = (i // m) * m
            if full:
                runs = ml[..., :full].reshape(*ml.shape[:-1], -1, m)
                assert int(runs.sum(-1).max()) <= n, layer
                assert int(runs.sum(-1).min()) == min(n, m), layer
            if i > full:
                assert int(ml[..., full:].sum(-1).max()) <= n, layer
        elif lp.scheme == "block":
            b = lp.block
            o = mask.shape[0]
            flat = mask.reshape(o, -1)
            for start in range(0, o, b):  # type: ignore[arg-type]
                chunk = flat[start : start + b]
                assert torch.all(chunk.all(0) | (~chunk).all(0)), f"{layer}: a 1x{b} block is split"
            n_blocks = -(-o // b) * flat.shape[1]  # type: ignore[operator]
            zero_blocks = sum(
                int((~flat[s : s + b]).all(0).sum())
                for s in range(0, o, b)  # type: ignore[arg-type]
            )
            assert zero_blocks == round(lp.sparsity * n_blocks), layer


@pytest.mark.parametrize("arch", ARCHS)
@PROPERTY
@given(seed=st.integers(0, 10_000))
def test_random_policy_keeps_shape_and_schemes(arch: str, seed: int) -> None:
    model = zoo_model(arch)
    space = space_for(model)
    policy = space.sample(random.Random(seed))
    cm = apply_policy(model, policy)
    x = model.example_input(3)
    with torch.no_grad():
        out = cm.gm(x)
        dense_out = model.gm(x)
    assert out.shape == dense_out.shape
    assert torch.isfinite(out).all()
    check_masks(cm)
    m = measure(cm)
    assert 0 < m.effective_macs <= m.macs
    assert m.size_bytes > 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("width", [0.75, 0.5, 0.25])
def test_width_macs_equal_analytic_count(arch: str, width: float) -> None:
    """Each layer's MACs after uniform width pruning match out'·H·W·(in'/g)·k² by hand."""
    model = zoo_model(arch)
    graph = model.graph
    cm = apply_policy(model, Policy.from_dict({"default": {"width": width}}))

    def kept(layer_out: int, prunable: bool) -> int:
        return max(1, round(width * layer_out)) if prunable else layer_out

    expected = 0
    for layer in graph.layers:
        f = layer.features
        out_c = kept(f.out_channels, graph.width_prunable(layer))
        if layer.in_space is None:
            in_c = f.in_channels
        else:
            in_c = 0
            for seg in layer.in_space.segments:
                root = graph.groups.find(seg.group) if seg.group is not None else None
                pruned = root is not None and not graph.groups.data(root).blocked_by
                in_c += kept(seg.length, pruned) * layer.in_space.expand
        groups = out_c if layer.op == "dwconv" else f.groups
        per_out = (in_c // groups if layer.op != "linear" else in_c) * f.kernel * f.kernel
        expected += out_c * f.out_h * f.out_w * per_out
    other = measure(cm).macs - sum(
        v
        for k, v in __import__("compression.metrics", fromlist=["x"])
        .layer_macs(cm.gm, cm.example_input())[0]
        .items()
    )
    assert measure(cm).macs - other == expected


@pytest.mark.parametrize("arch", ARCHS)
@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 10_000))
def test_onnx_export_agrees_with_torch(
    arch: str, seed: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = zoo_model(arch)
    policy = space_for(model).sample(random.Random(seed))
    cm = apply_policy(model, policy)
    path = tmp_path_factory.mktemp("onnx") / f"{arch}.onnx"
    export_onnx(cm.gm, model.example_input(2), path)  # raises unless rel. error <= 1e-4
    x = np.random.default_rng(seed).standard_normal((4, *model.input_shape)).astype(np.float32)
    with torch.no_grad():
        ref = cm.gm(torch.from_numpy(x)).numpy()
    got = run_onnx(Path(path), x)
    assert np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6) <= 1e-4


def test_skipping_every_block_still_runs() -> None:
    model = zoo_model("resnet20")
    space = space_for(model)
    assert len(space.blocks) == 7  # 9 basic blocks, 2 change shape at stage boundaries
    cm = apply_policy(model, Policy(skip=frozenset(b.name for b in space.blocks)))
    assert measure(cm).macs < measure(apply_policy(model, Policy.dense())).macs
    assert cm.gm(model.example_input(2)).shape == (2, 10)
