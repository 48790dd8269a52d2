"""Devices, runtimes and the measurement harness on real ONNX Runtime and torch models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compression.onnx_export import export_onnx
from latency_models.devices import BUILTIN_DEVICES, Device, DeviceError, get_device
from latency_models.harness import (
    REFERENCE_INPUT_SHAPE,
    Measurement,
    NoiseRule,
    PairMeasurement,
    measure,
    measure_pair,
    reference_onnx_path,
    reference_torch_module,
    sha256_file,
)
from latency_models.runtimes import RuntimeSetupError


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.ba = nn.BatchNorm2d(c)
        self.b = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bb = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bb(self.b(torch.relu(self.ba(self.a(x))))))


class ResNetLike(nn.Module):
    """Two stages of two residual blocks; ``width`` scales every channel count."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        c1, c2 = int(16 * width), int(32 * width)
        self.stem = nn.Sequential(nn.Conv2d(3, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU())
        self.stage1 = nn.Sequential(_Block(c1), _Block(c1))
        self.down = nn.Sequential(
            nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU()
        )
        self.stage2 = nn.Sequential(_Block(c2), _Block(c2))
        self.fc = nn.Linear(c2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Dense width 1.0, width 0.5, and width 1.0 with 50 % of conv weights zeroed."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    sparse = ResNetLike(1.0).eval()
    with torch.no_grad():
        for m in sparse.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_((torch.rand_like(m.weight) > 0.5).float())
    return {
        "dense": export_onnx(ResNetLike(1.0).eval(), x, folder / "dense.onnx"),
        "half": export_onnx(ResNetLike(0.5).eval(), x, folder / "half.onnx"),
        "sparse": export_onnx(sparse, x, folder / "sparse.onnx"),
    }


def test_builtin_and_custom_devices() -> None:
    assert set(BUILTIN_DEVICES) == {
        "cpu-ort-1t", "cpu-ort-2t", "cpu-torch-1t", "cpu-executorch-1t", "cpu-openvino-1t",
    }  # fmt: skip
    assert get_device("cpu-ort-2t").threads == 2 and get_device("cpu-torch-1t").runtime == "torch"
    with pytest.raises(DeviceError, match="cpu-ort-1t, cpu-ort-2t, cpu-torch-1t"):
        get_device("gpu-42")
    board = Device.from_dict({"name": "pi5-ort-4t", "runtime": "onnxruntime", "threads": 4})
    assert not board.is_local and Device.from_dict(board.to_dict()) == board
    with pytest.raises(DeviceError, match="threads"):
        Device.from_dict({"name": "x", "runtime": "onnxruntime", "threads": 0})
    with pytest.raises(DeviceError, match="unknown runtime"):
        Device.from_dict({"name": "x", "runtime": "tflite"})
    with pytest.raises(DeviceError, match="unknown field"):
        Device.from_dict({"name": "x", "thread": 2})
    with pytest.raises(DeviceError, match="graph_optimization_level"):
        Device("x", "onnxruntime", settings={"graph_optimization_level": "max"})


def test_reference_model_is_fixed_cached_and_same_in_both_runtimes(tmp_path: Path) -> None:
    first = reference_onnx_path(tmp_path)
    second = reference_onnx_path(tmp_path)
    assert first == second and sha256_file(first)[:16] in first.name
    x = np.random.default_rng(3).standard_normal((2, *REFERENCE_INPUT_SHAPE[1:])).astype(np.float32)
    session = ort.InferenceSession(str(first), providers=["CPUExecutionProvider"])
    via_ort = session.run(None, {"x": x})[0]
    with torch.no_grad():
        via_torch = reference_torch_module()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(via_ort, via_torch, rtol=1e-4, atol=1e-4)


def test_measure_records_everything_and_round_trips(models: dict[str, Path]) -> None:
    m = measure(models["dense"], "cpu-ort-1t")
    assert m.runs == 200 and m.warmup == 20 and m.input_shape == (1, 3, 32, 32)
    assert m.model_sha256 == sha256_file(models["dense"]) and m.device == "cpu-ort-1t" and m.threads == 1
    assert m.runtime == "onnxruntime" and m.runtime_version == ort.__version__
    assert 0 < m.min_ms <= m.p10_ms <= m.median_ms <= m.p90_ms
    assert m.reference_median_ms is not None and m.ratio_to_reference is not None
    assert m.ratio_to_reference == pytest.approx(m.median_ms / m.reference_median_ms)
    assert 1 <= m.attempts <= 3 and m.host["cpu_count"] >= 1 and m.timestamp
    assert Measurement.from_json(m.to_json()) == m
    with pytest.raises(ValueError, match="missing"):
        Measurement.from_dict({"median_ms": 1.0})


def test_width_half_is_faster_and_sparsity_is_not(models: dict[str, Path]) -> None:
    width = measure_pair(models["dense"], models["half"], "cpu-ort-1t")
    assert width.speedup == pytest.approx(width.a_median_ms / width.b_median_ms)
    assert width.speedup > 1.4, width.speedup
    sparse = measure_pair(models["dense"], models["sparse"], "cpu-ort-1t", with_reference=True)
    assert 0.85 < sparse.speedup < 1.15, sparse.speedup
    assert sparse.a.ratio_to_reference is not None
    assert PairMeasurement.from_dict(sparse.to_dict()) == sparse


def test_noisy_measurements_are_repeated_and_flagged(models: dict[str, Path]) -> None:
    never_quiet = NoiseRule(max_iqr_rel=0.0, max_p90_rel=1.0, max_attempts=3)
    m = measure(models["half"], "cpu-ort-2t", runs=30, warmup=2, noise=never_quiet)
    assert m.attempts == 3 and m.noisy and m.threads == 2
    lenient = NoiseRule(max_iqr_rel=10.0, max_p90_rel=100.0)
    assert measure(models["half"], "cpu-ort-1t", runs=30, noise=lenient).attempts == 1


def test_torch_eager_device_and_runtime_mismatches(models: dict[str, Path]) -> None:
    module = ResNetLike(0.5).eval()
    m = measure(module, "cpu-torch-1t", runs=30, warmup=3, input_shape=(1, 3, 32, 32))
    assert m.runtime == "torch" and m.runtime_version == torch.__version__ and m.median_ms > 0
    assert m.ratio_to_reference is not None and len(m.model_sha256) == 64
    with pytest.raises(RuntimeSetupError, match="input_shape"):
        measure(module, "cpu-torch-1t", runs=5)
    with pytest.raises(RuntimeSetupError, match=r"\.onnx file"):
        measure(module, "cpu-ort-1t", runs=5)
    with pytest.raises(RuntimeSetupError, match="torch modules"):
        measure(models["dense"], "cpu-torch-1t", runs=5)
    with pytest.raises(RuntimeSetupError, match="does not fit"):
        measure(models["dense"], "cpu-ort-1t", runs=5, input_shape=(1, 3, 16))
    with pytest.raises(FileNotFoundError):
        measure(Path("missing.onnx"), "cpu-ort-1t")
    with pytest.raises(ValueError, match="runs"):
        measure(models["dense"], "cpu-ort-1t", runs=0)
