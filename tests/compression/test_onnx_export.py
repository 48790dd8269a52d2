"""ONNX export and int8 quantization of real (exported, masked, sliced) torch models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from compression.onnx_export import (
    ExportError,
    OnnxModel,
    check_onnx_matches,
    export_onnx,
    max_relative_error,
    onnx_accuracy,
    run_onnx,
)
from compression.quantize_onnx import QuantizeError, quantize_int8


class TinyResNet(nn.Module):
    """Conv-BN-ReLU stem, one residual block, global pool, linear head."""

    def __init__(self, width: int = 16, in_ch: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(in_ch, width, 3, padding=1)
        self.b1 = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.b2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        y = y + torch.relu(self.b2(self.c2(y)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics, so folding BN into conv is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_buffer("running_mean", torch.randn(m.num_features, generator=g) * 0.5)
            m.register_buffer("running_var", torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _exported(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    return program.module()  # type: ignore[return-value]


@pytest.fixture()
def example() -> torch.Tensor:
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_exported_graph_module_round_trips_fast_with_bn_folded(tmp_path: Path, example: torch.Tensor) -> None:
    model = TinyResNet()
    _randomize_bn(model)
    gm = _exported(model, example)
    path = export_onnx(gm, example, tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 2
    # Dynamic batch: any batch size runs and agrees with torch.
    x = torch.randn(7, 1, 8, 8)
    got = run_onnx(path, x.numpy())
    assert got.shape == (7, 10)
    assert max_relative_error(got, gm(x).detach().numpy()) <= 1e-4


def test_masked_and_sliced_weights_export(tmp_path: Path, example: torch.Tensor) -> None:
    model = TinyResNet(width=16)
    _randomize_bn(model)
    gm = _exported(model, example)
    # 50 % of the conv weights masked to zero, as unstructured pruning leaves them.
    w = gm.get_parameter("c2.weight")
    with torch.no_grad():
        w.mul_((torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) > 0.5).float())
    export_onnx(gm, example, tmp_path / "masked.onnx")
    # Width 16 -> 5 on the channels coupled by the residual add: slice every coupled tensor.
    keep = torch.tensor([0, 3, 4, 9, 15])
    with torch.no_grad():
        for name in ("c1.weight", "c1.bias", "b1.weight", "b1.bias", "b2.weight", "b2.bias", "c2.bias"):
            mod, attr = name.split(".")
            setattr(getattr(gm, mod), attr, nn.Parameter(gm.get_parameter(name)[keep]))
        for name in ("b1.running_mean", "b1.running_var", "b2.running_mean", "b2.running_var"):
            mod, attr = name.split(".")
            getattr(gm, mod).register_buffer(attr, gm.get_buffer(name)[keep])
        gm.get_submodule("c2").weight = nn.Parameter(gm.get_parameter("c2.weight")[keep][:, keep])
        gm.get_submodule("fc").weight = nn.Parameter(gm.get_parameter("fc.weight")[:, keep])
    path = export_onnx(gm, example, tmp_path / "sliced.onnx")
    weights = {i.name: i.dims for i in onnx.load(str(path)).graph.initializer}
    assert any(list(d) == [5, 5, 3, 3] for d in weights.values()), weights


def test_plain_module_and_dynamo_fallback_path(tmp_path: Path, example: torch.Tensor) -> None:
    model = TinyResNet(width=8).eval()
    export_onnx(model, example, tmp_path / "plain.onnx")
    gm = _exported(TinyResNet(width=8), example)
    path = export_onnx(gm, example, tmp_path / "dynamo.onnx", method="dynamo")
    assert run_onnx(path, np.zeros((4, 1, 8, 8), np.float32)).shape == (4, 10)


def test_disagreement_and_bad_input_raise(tmp_path: Path, example: torch.Tensor) -> None:
    a, b = TinyResNet(), TinyResNet()
    path = export_onnx(a.eval(), example, tmp_path / "a.onnx")
    with pytest.raises(ExportError, match="disagrees"):
        check_onnx_matches(b.eval(), path, example)
    with pytest.raises(ExportError, match=r"nn\.Module"):
        export_onnx("not a model", example, tmp_path / "x.onnx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank"):
        run_onnx(path, np.zeros((8, 8), np.float32))
    with pytest.raises(FileNotFoundError):
        OnnxModel(tmp_path / "missing.onnx")
    with pytest.raises(QuantizeError, match="empty"):
        quantize_int8(path, [], tmp_path / "q.onnx")


def _digits_cnn() -> tuple[nn.Module, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    x_tr, y_tr, x_val, y_val = x[:1400], y[:1400], x[1400:], y[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 16, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    for _ in range(8):
        for i in range(0, len(xt), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[i : i + 64]), yt[i : i + 64]).backward()
            opt.step()
    return model.eval(), x_tr, y_tr, x_val, y_val


def test_int8_qdq_keeps_accuracy_on_digits(tmp_path: Path) -> None:
    model, x_tr, _, x_val, y_val = _digits_cnn()
    example = torch.from_numpy(x_val[:2])
    fp32 = export_onnx(_exported(model, example), example, tmp_path / "fp32.onnx")
    int8 = quantize_int8(fp32, (x_tr[i : i + 50] for i in range(0, 400, 50)), tmp_path / "int8.onnx")
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    acc32 = onnx_accuracy(fp32, x_val, y_val)
    acc8 = onnx_accuracy(int8, x_val, y_val)
    assert acc32 > 0.9, acc32
    assert abs(acc8 - acc32) <= 0.01, (acc32, acc8)
    assert int8.stat().st_size < fp32.stat().st_size
