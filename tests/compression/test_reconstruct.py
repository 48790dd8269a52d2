"""Feature-map reconstruction on a small CNN trained on digits in the session (a couple of seconds)."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from compression.apply import CompressedModel, apply_policy, get_tensor
from compression.data import Dataset, calibration_batches, load_dataset
from compression.evaluate import accuracy, recalibrate_bn
from compression.graph import CONV, LINEAR
from compression.masks import fake_quantize
from compression.model_io import CompressibleModel, from_module
from compression.policy import Policy
from compression.reconstruct import conv_patches, reconstruct
from compression.scoring import compress
from compression.train import train_model
from engine.search import Evaluator


class Net(nn.Module):
    """Plain, strided-with-bias, depthwise and pointwise convs, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.pw = nn.Conv2d(32, 32, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.dw(x)))
        x = torch.relu(self.bn4(self.pw(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@functools.cache
def _digits() -> Dataset:
    return load_dataset("digits")


@functools.cache
def _model() -> CompressibleModel:
    data = _digits()
    torch.manual_seed(0)
    net = Net()
    train_model(net, data, epochs=6, seed=0, lr=0.01, batch_size=64, optimizer="adamw", weight_decay=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return from_module(net.eval(), torch.from_numpy(data.x_train[:2]), name="net")


@pytest.fixture(scope="module")
def model() -> CompressibleModel:
    return _model()


@pytest.fixture(scope="module")
def calib() -> list[torch.Tensor]:
    return calibration_batches(_digits(), 4, 64, seed=0)


class _Outputs(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "call_function" and n.target in CONV | LINEAR:
            self.seen[n.name] = out
        return out

    def collect(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            self.run(x)
        return self.seen


def _kept_out(cm: CompressedModel, node: str) -> torch.Tensor:
    graph = cm.source.graph
    info = next(i for i in graph.layers if i.node == node)
    n_out = get_tensor(cm.source.gm, info.weight).shape[0]
    if info.out_group is None:
        return torch.arange(n_out)
    return cm.keep.get(graph.groups.find(info.out_group), torch.arange(n_out))


def _pruned(
    model: CompressibleModel, policy: Policy, calib: list[torch.Tensor], refit: bool
) -> tuple[CompressedModel, int]:
    cm = apply_policy(model, policy)
    n = reconstruct(cm, calib) if refit else 0
    recalibrate_bn(cm.gm, calib)
    return cm, n


def test_conv_patches_match_unfold() -> None:
    x = torch.randn(3, 4, 9, 10)
    cases: list[tuple[Any, Any, Any]] = [(1, 0, 1), (2, 1, 1), ([2, 1], [1, 2], [1, 2]), (1, "same", 2)]
    for stride, padding, dilation in cases:
        w = torch.randn(5, 4, 3, 2)
        out = F.conv2d(x, w, None, stride, padding, dilation)
        h, wd = out.shape[2:]
        rows = torch.arange(3 * h * wd)
        got = conv_patches(x, rows, (h, wd), (3, 2), stride, padding, dilation)
        if padding == "same":  # unfold has no "same"; compare through the convolution instead
            ref = out.permute(0, 2, 3, 1).reshape(-1, 5)
            assert torch.allclose(got @ w.reshape(5, -1).T, ref, atol=1e-5)
            continue
        cols = F.unfold(x, (3, 2), dilation=dilation, padding=padding, stride=stride)
        assert torch.equal(got, cols.transpose(1, 2).reshape(-1, cols.shape[1]))
        sub = torch.tensor([0, 7, len(rows) - 1])
        assert torch.equal(conv_patches(x, sub, (h, wd), (3, 2), stride, padding, dilation), got[sub])


def test_width_half_recovers_accuracy_and_outputs(
    model: CompressibleModel, calib: list[torch.Tensor]
) -> None:
    data = _digits()
    policy = Policy.from_dict({"default": {"width": 0.5}})
    plain, _ = _pruned(model, policy, calib, refit=False)
    refit, n = _pruned(model, policy, calib, refit=True)
    assert n == 3  # conv2, pw and fc; conv1 (inputs intact) and dw (depthwise) are not re-fitted
    acc_plain = accuracy(plain.gm, data.x_val, data.y_val)
    acc_refit = accuracy(refit.gm, data.x_val, data.y_val)
    assert acc_refit >= acc_plain
    x = torch.from_numpy(data.x_val[:200])
    dense = _Outputs(model.gm).collect(x)
    out_plain, out_refit = _Outputs(plain.gm).collect(x), _Outputs(refit.gm).collect(x)
    for node in ("conv2", "pw", "fc"):
        name = next(i.node for i in model.graph.layers if i.name == node)
        target = dense[name].index_select(1, _kept_out(refit, name))
        err_plain = F.mse_loss(out_plain[name], target)
        err_refit = F.mse_loss(out_refit[name], target)
        assert err_refit < err_plain, (node, float(err_refit), float(err_plain))


def test_dense_policy_changes_nothing(model: CompressibleModel, calib: list[torch.Tensor]) -> None:
    x = calib[0][:16]
    for raw in ({}, {"default": {"bits": 8}}):
        policy = Policy.from_dict(raw)
        cm = apply_policy(model, policy)
        before = {k: v.clone() for k, v in cm.gm.state_dict().items()}
        with torch.no_grad():
            out = cm.gm(x)
        assert reconstruct(cm, calib) == 0
        after = cm.gm.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        with torch.no_grad():
            assert torch.equal(cm.gm(x), out)


def test_masked_and_grouped_layers_left_alone(model: CompressibleModel, calib: list[torch.Tensor]) -> None:
    policy = Policy.from_dict(
        {"default": {"width": 0.5}, "layers": {"pw": {"scheme": "unstructured", "sparsity": 0.5}}}
    )
    cm = apply_policy(model, policy)
    pw, dw = get_tensor(cm.gm, "pw.weight").clone(), get_tensor(cm.gm, "dw.weight").clone()
    conv2 = get_tensor(cm.gm, "conv2.weight").clone()
    assert reconstruct(cm, calib) == 2  # conv2 and fc
    assert torch.equal(get_tensor(cm.gm, "pw.weight"), pw)
    assert torch.equal(get_tensor(cm.gm, "dw.weight"), dw)
    assert not torch.equal(get_tensor(cm.gm, "conv2.weight"), conv2)
    assert get_tensor(cm.gm, "conv2.weight").shape == conv2.shape


def test_quantized_layers_stay_quantized(model: CompressibleModel, calib: list[torch.Tensor]) -> None:
    cm = apply_policy(model, Policy.from_dict({"default": {"width": 0.5, "bits": 4}}))
    assert reconstruct(cm, calib) == 3
    for target in ("conv2.weight", "pw.weight", "fc.weight"):
        w = get_tensor(cm.gm, target)
        assert torch.allclose(fake_quantize(w, 4), w, atol=1e-6)
        levels = max(len(torch.unique(row)) for row in w.reshape(w.shape[0], -1))
        assert levels <= 15


def test_reconstructed_model_runs_and_exports(model: CompressibleModel, calib: list[torch.Tensor]) -> None:
    cm, n = _pruned(model, Policy.from_dict({"default": {"width": 0.5}}), calib, refit=True)
    assert n > 0
    cm.gm.graph.lint()
    x = calib[1][:5]
    with torch.no_grad():
        assert cm.gm(x).shape == (5, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(cm.gm, (x,))
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), cm.gm(x), atol=1e-5)


def test_compress_opts_in_and_searches_reconstruct_by_default(
    model: CompressibleModel, calib: list[torch.Tensor]
) -> None:
    """The library's ``compress`` re-fits only when asked; a search's Evaluator does by default."""
    policy = Policy.from_dict({"default": {"width": 0.5}})
    x = calib[2][:8]
    with torch.no_grad():
        default = compress(model, policy, calib).gm(x)
        plain = _pruned(model, policy, calib, refit=False)[0].gm(x)
        refit = compress(model, policy, calib, reconstruct=True).gm(x)
    assert torch.equal(default, plain)
    assert not torch.allclose(refit, plain)

    data = _digits()
    ev = Evaluator(model, data, lambda cm: 1.0, val_images=300, reconstruct=False)
    ev_refit = Evaluator(model, data, lambda cm: 1.0, val_images=300)
    assert ev_refit.reconstruct is True
    assert ev_refit.evaluate(policy).accuracy >= ev.evaluate(policy).accuracy
    assert Evaluator.from_payload(ev_refit.to_payload()).reconstruct is True
    assert Evaluator.from_payload(ev.to_payload()).reconstruct is False


def test_reconstruction_installs_the_statistics_recalibration_would(
    model: CompressibleModel, calib: list[torch.Tensor]
) -> None:
    """``recalibrate=True`` saves a pass: its BatchNorm statistics equal a separate recalibration."""
    from compression.evaluate import recalibrate_bn

    policy = Policy.from_dict({"default": {"width": 0.5}})
    fused = apply_policy(model, policy)
    assert reconstruct(fused, calib, recalibrate=True) > 0
    separate = apply_policy(model, policy)
    reconstruct(separate, calib)
    recalibrate_bn(separate.gm, calib)
    buffers = dict(separate.gm.named_buffers())
    checked = 0
    for name, value in fused.gm.named_buffers():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, buffers[name], rtol=1e-4, atol=1e-5)
            checked += 1
    assert checked > 0
    dense = apply_policy(model, Policy.dense())
    assert reconstruct(dense, calib, recalibrate=True) == 0  # nothing to re-fit: still recalibrated
    expected = apply_policy(model, Policy.dense())
    recalibrate_bn(expected.gm, calib)
    for (_, a), (_, b) in zip(dense.gm.named_buffers(), expected.gm.named_buffers(), strict=True):
        torch.testing.assert_close(a, b)
