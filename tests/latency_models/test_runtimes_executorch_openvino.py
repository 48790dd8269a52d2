"""ExecuTorch (XNNPACK) and OpenVINO as device runtimes, on the real runtimes.

A small ResNet-20-style CNN (one basic block per stage: ExecuTorch's lowering takes seconds
per model, so the 3-block original would make these tests slow) is written as a ``.pte`` and
as an OpenVINO IR zip, fp32 and int8 (all layers / two layers), run against torch, timed
through the harness and through a device agent; each new device lists in the API and a
short calibration on it fits a predictor.
"""

from __future__ import annotations

import random
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("executorch")
pytest.importorskip("openvino")
pytest.importorskip("nncf")

from compression.export_runtimes import (
    RuntimeExportError,
    export_for_runtime,
    int8_layer_names,
    keepdim_global_means,
)
from compression.model_io import CompressibleModel, from_module
from compression.policy import Policy
from compression.space_builder import space_for
from compression.zoo.resnet import CifarResNet
from latency_models.agent import DirectoryTransport, agent_device, run_agent
from latency_models.devices import BUILTIN_DEVICES, get_device
from latency_models.harness import measure_pair
from latency_models.runtimes import RuntimeSetupError, make_runtime
from latency_models.runtimes_edge import predict
from latency_models.tasks import MeasurementTask, ModelRef

RUNTIMES = ("executorch", "openvino")
DEVICES = {"executorch": "cpu-executorch-1t", "openvino": "cpu-openvino-1t"}
MIXED = ["layer1.0.conv1", "layer3.0.conv2"]


@pytest.fixture(scope="module")
def small_resnet() -> CompressibleModel:
    torch.manual_seed(0)
    module = CifarResNet(1, in_channels=1, image_size=16, num_classes=10).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics: folding must keep the outputs
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return from_module(module, torch.randn(2, 1, 16, 16), "resnet8-style")


@pytest.fixture(scope="module")
def files(small_resnet: CompressibleModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """runtime/variant -> file: dense fp32, all-int8 and two-layer int8, for both runtimes."""
    folder = tmp_path_factory.mktemp("rt-files")
    calib = [torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    example = small_resnet.example_input(1)
    out: dict[str, Path] = {}
    for runtime in RUNTIMES:
        for variant, layers in (("fp32", None), ("int8", "all"), ("mixed", MIXED)):
            out[f"{runtime}/{variant}"] = export_for_runtime(
                runtime,
                small_resnet.gm,
                example,
                folder / f"{runtime}-{variant}",
                int8_layers=layers,
                calibration=calib if layers else None,
            )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_files_run_and_match_torch(
    runtime: str, small_resnet: CompressibleModel, files: dict[str, Path]
) -> None:
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = small_resnet.gm(x).numpy()
    scale = float(np.abs(want).max())
    fp32, int8, mixed = (files[f"{runtime}/{v}"] for v in ("fp32", "int8", "mixed"))
    assert fp32.suffix == (".pte" if runtime == "executorch" else ".zip")
    got = predict(fp32, runtime, x.numpy())
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)
    for path in (int8, mixed):  # int8 approximates the float model, closely
        err = float(np.abs(predict(path, runtime, x.numpy()) - want).max())
        assert 0 < err < 0.15 * scale, (path.name, err, scale)
    # per-layer precision: int8 weights take a quarter of the bytes, two layers a little less
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size
    assert int8.stat().st_size < mixed.stat().st_size < fp32.stat().st_size
    if runtime == "openvino":
        with zipfile.ZipFile(fp32) as zf:
            assert sorted(zf.namelist()) == ["model.bin", "model.xml"]


@pytest.mark.slow
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_harness_times_the_files_interleaved(runtime: str, files: dict[str, Path]) -> None:
    pair = measure_pair(
        files[f"{runtime}/fp32"],
        files[f"{runtime}/int8"],
        DEVICES[runtime],
        runs=30,
        warmup=5,
        with_reference=True,
    )
    assert pair.a.runtime == runtime and pair.a.threads == 1 and pair.a.input_shape == (1, 1, 16, 16)
    assert pair.a.median_ms > 0 and pair.b.median_ms > 0 and pair.speedup > 0
    assert pair.a.ratio_to_reference is not None and pair.a.runtime_version.startswith(runtime)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_agent_times_the_runtime_files(runtime: str, files: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "exchange"
    transport = DirectoryTransport(root)
    (root / "models").mkdir()
    model = root / "models" / files[f"{runtime}/int8"].name
    model.write_bytes(files[f"{runtime}/int8"].read_bytes())
    dense = root / "models" / ("dense" + model.suffix)
    dense.write_bytes(files[f"{runtime}/fp32"].read_bytes())
    transport.submit(
        MeasurementTask(
            "t-1",
            ModelRef.at_path(model, relative_to=root),
            runs=20,
            warmup=3,
            baseline=ModelRef.at_path(dense, relative_to=root),
        )
    )
    device = agent_device(DEVICES[runtime])
    assert device.runtime == runtime
    assert run_agent(transport, device, stop_after=1, poll_s=0.05, cache_dir=tmp_path / "cache") == 1
    result = transport.result("t-1")
    assert result is not None and result.status == "ok", result and result.error
    assert result.measurement is not None and result.measurement.runtime == runtime
    assert result.speedup is not None and result.speedup > 0
    assert runtime in result.agent


def test_devices_and_settings() -> None:
    for runtime, name in DEVICES.items():
        assert BUILTIN_DEVICES[name].runtime == runtime and get_device(name).threads == 1
    ov: Any = make_runtime("openvino", 2, {"INFERENCE_PRECISION_HINT": "bf16"})
    assert ov.config()["INFERENCE_PRECISION_HINT"] == "bf16" and ov.config()["INFERENCE_NUM_THREADS"] == "2"
    default: Any = make_runtime("openvino")
    assert default.config()["INFERENCE_PRECISION_HINT"] == "f32"  # not the CPU's bf16
    with pytest.raises(RuntimeSetupError, match="INFERENCE_PRECISION_HINT"):
        make_runtime("openvino", 1, {"INFERENCE_PRECISION_HINT": "int4"})
    with pytest.raises(RuntimeSetupError, match="no settings"):
        make_runtime("executorch", 1, {"x": "1"})
    with pytest.raises(RuntimeSetupError, match=r"\.pte"):
        make_runtime("executorch").prepare(Path(__file__))


def test_global_mean_is_rewritten_for_xnnpack() -> None:
    class Pool(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    gm = torch.export.export(Pool(), (torch.randn(1, 4, 5, 5),)).module()
    x = torch.randn(1, 4, 5, 5)
    want = gm(x)
    assert keepdim_global_means(gm) == 1  # type: ignore[arg-type]
    torch.testing.assert_close(gm(x), want)


def test_int8_layers_follow_the_policy(small_resnet: CompressibleModel, tmp_path: Path) -> None:
    space = space_for(small_resnet)
    policy = Policy.from_dict({"layers": {"layer1.0.conv1": {"bits": 8}, "fc": {"bits": 4}}})
    assert int8_layer_names(space, policy) == ["layer1.0.conv1", "fc"]
    assert int8_layer_names(space, Policy.dense()) == []
    with pytest.raises(RuntimeExportError, match="not conv / linear layers"):
        export_for_runtime(
            "openvino",
            small_resnet.gm,
            small_resnet.example_input(1),
            tmp_path / "x",
            int8_layers=["nope"],
            calibration=[torch.randn(1, 1, 16, 16)],
        )


def test_new_devices_are_listed_by_the_api(tmp_path: Path) -> None:
    from db.testing import fresh_database
    from service.app import create_app
    from service.settings import Settings
    from tests.live import run_app

    with fresh_database("sqlite", tmp_path) as url:
        settings = Settings(data_dir=tmp_path / "data", database_url=url)
        with run_app(create_app(settings, announce=lambda _msg: None)) as base:
            key = settings.local_key_path.read_text().strip()
            r = httpx.get(f"{base}/v1/devices", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    listed = {d["name"]: d for d in r.json()["data"]}
    for runtime, name in DEVICES.items():
        assert listed[name]["runtime"] == runtime and listed[name]["kind"] == "local"


@pytest.mark.slow
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_short_calibration_fits_a_predictor(runtime: str, tmp_path: Path) -> None:
    from latency_models.calibrate import calibrate, fit_predictors
    from latency_models.sampling import CalibrationSample, random_policy

    samples: list[CalibrationSample] = []
    for arch, blocks in (("res-a", 1), ("res-b", 1)):
        torch.manual_seed(len(samples))
        module = CifarResNet(blocks, in_channels=1, image_size=12 if arch == "res-a" else 16, num_classes=10)
        size = 12 if arch == "res-a" else 16
        cm = from_module(module.eval(), torch.randn(2, 1, size, size), arch)
        space = space_for(cm)
        rng = random.Random(arch)
        for _ in range(2 if arch == "res-a" else 1):  # 3 samples, 5 files: lowering takes seconds each
            samples.append(CalibrationSample(arch, f"{arch}@{size}", cm, space, random_policy(space, rng)))
    records = calibrate(DEVICES[runtime], samples=len(samples), plan=samples, runs=20, warmup=3)
    assert len({r.arch_id for r in records}) == 2 and len(records) >= 4
    assert all(r.latency_ms > 0 and r.ratio is not None for r in records)
    fitted, doc, _ = fit_predictors(records, kinds=("macs",), test_fraction=0.5)
    space = samples[0].space
    assert float(fitted["macs"].predict(space, [Policy.dense()])[0]) > 0
    assert "within_10pct" in doc["predictors"]["macs"]


def test_measured_latency_times_the_device_file(small_resnet: CompressibleModel) -> None:
    from compression.apply import apply_policy
    from engine.device_latency import measured_latency

    policy = Policy.from_dict({"layers": {"layer2.0.conv1": {"bits": 8}}, "skip": ["layer1.0"]})
    cm = apply_policy(small_resnet, policy)
    latency = measured_latency(DEVICES["openvino"], runs=10, warmup=2)(cm)
    assert 0 < latency < 1000
