"""Models exported with a fixed batch (no ``dynamic_shapes``), as many edge users hand them over.

``torch.export`` then bakes the batch into shape arguments (``reshape(x, [1, 16, 16])``); every
stage that runs many images at once used to fail on them. Loading frees the batch, or refuses
the model naming the ``dynamic_shapes`` fix; no traceback reaches a CLI user.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from compression.data import Dataset, load_dataset
from compression.evaluate import accuracy
from compression.model_io import ModelLoadError, free_batch, load_pt2
from compression.onnx_export import export_onnx, run_onnx
from modeltailor.cli import _register, app
from modeltailor.client import Client, ValidationError
from tests.service.conftest import LiveServer, real_live  # noqa: F401  (fixture)

_register()

FIX = 'dynamic_shapes={"x": {0: torch.export.Dim("batch")}}'


class FlatCNN(nn.Module):
    """A CNN whose head reshapes by the traced batch size: a static export bakes it in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.reshape(x.shape[0], 16, 16).flatten(1))


class WholeBatch(nn.Module):
    """Flattens the batch into the features: no other batch size can ever run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(0)).unsqueeze(0)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def flat_net(digits: Dataset) -> nn.Module:
    torch.manual_seed(0)
    net = FlatCNN()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    x, y = torch.from_numpy(digits.x_train), torch.from_numpy(digits.y_train)
    for _ in range(5):
        for i in range(0, len(x), 64):
            loss = nn.functional.cross_entropy(net(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def _save_static(net: nn.Module, batch: int, path: Path) -> Path:
    """What an edge user does: export at the deployment batch, no ``dynamic_shapes``."""
    ep = torch.export.export(net.eval(), (torch.randn(batch, 1, 8, 8),))
    torch.export.save(ep, str(path))
    return path


@pytest.fixture(scope="module")
def static_pt2(flat_net: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_static(flat_net, 1, tmp_path_factory.mktemp("static") / "static.pt2")


@pytest.mark.parametrize("batch", [1, 4])
def test_a_fixed_batch_is_freed_and_every_batch_gives_the_same_logits(
    flat_net: nn.Module, digits: Dataset, tmp_path: Path, batch: int
) -> None:
    path = _save_static(flat_net, batch, tmp_path / "m.pt2")
    fixed = torch.export.load(str(path)).module()
    assert free_batch(torch.export.load(str(path)).module(), batch) == 1  # the head's reshape
    model = load_pt2(path)
    assert model.dynamic_batch and model.input_shape == (1, 8, 8)
    x = torch.from_numpy(digits.x_val[: 3 * batch])
    with torch.no_grad():
        want = torch.cat([fixed(x[i : i + batch]) for i in range(0, len(x), batch)])
        torch.testing.assert_close(model.gm(x), want)
        torch.testing.assert_close(model.gm(x[:5]), flat_net(x[:5]))
    assert accuracy(model.gm, digits.x_val, digits.y_val) > 0.9
    onnx = export_onnx(model.gm, model.example_input(2), tmp_path / "m.onnx")
    np.testing.assert_allclose(run_onnx(onnx, x[:7].numpy()), flat_net(x[:7]).detach().numpy(), atol=1e-4)


def test_a_batch_that_cannot_be_freed_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = _save_static(WholeBatch(), 1, tmp_path / "whole.pt2")
    with pytest.raises(ModelLoadError, match="batch of exactly 1") as info:
        load_pt2(path)
    assert FIX in str(info.value)


def test_cli_compress_and_search_run_on_a_static_model(static_pt2: Path, tmp_path: Path) -> None:
    policy = tmp_path / "half.json"
    policy.write_text(json.dumps({"default": {"width": 0.5}}))
    out = tmp_path / "half.onnx"
    done = CliRunner().invoke(
        app, ["compress", str(static_pt2), "--data", "digits", "--policy", str(policy), "--out", str(out)]
    )
    assert done.exit_code == 0, done.output
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["accuracy"] > 0.8 and line["onnx_accuracy"] == pytest.approx(line["accuracy"], abs=0.01)
    assert line["macs"] < line["dense_macs"]
    front = tmp_path / "front.json"
    found = CliRunner().invoke(
        app,
        ["search", str(static_pt2), "--data", "digits", "--budget", "4", "--latency", "macs-proxy",
         "--out", str(front)],
    )  # fmt: skip
    assert found.exit_code == 0, found.output
    doc = json.loads(front.read_text())
    assert len(doc["candidates"]) == 4 and all(c["accuracy"] > 0 for c in doc["candidates"])


def test_cli_answers_bad_models_with_one_message(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    whole = _save_static(WholeBatch(), 1, tmp_path / "whole.pt2")
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"default": {"width": 0.5}}))
    onnx, front = str(tmp_path / "o.onnx"), str(tmp_path / "f.json")
    for model, needle in ((garbage, "not a torch.export archive"), (whole, FIX)):
        for args in (
            ["compress", str(model), "--data", "digits", "--policy", str(policy), "--out", onnx],
            ["search", str(model), "--data", "digits", "--budget", "2", "--out", front],
        ):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 2, result.output
            assert needle in " ".join(result.output.split()) and "Traceback" not in result.output


def test_upload_of_a_static_model_is_ready_and_its_job_succeeds_and_a_hopeless_one_is_refused(
    real_live: LiveServer,  # noqa: F811  (the imported fixture)
    static_pt2: Path,
    tmp_path: Path,
) -> None:
    client = Client(real_live.url, real_live.key)
    data = client.builtin_dataset("digits")
    model = client.upload_model(static_pt2, name="static")
    assert model["status"] == "ready" and model["layers"], model
    # Choices named: a calibrated device's channel multiple (16) and size-only verdicts would
    # otherwise leave this small model a dense-only space.
    space = {"bits": [None], "depth": False, "schemes": ["unstructured"], "round_to": 1}
    job = client.submit_job(
        model["id"], data["id"], "cpu-ort-1t", algorithm="random", space=space,
        budget={"candidates": 3}, seed=0, calibration_samples=8, remeasure_top_k=1,
        calibrate="auto", active_measurement={"share": 0.0}, finetune={"top_k": 0},  # not what it tests
    )  # fmt: skip
    info = job.wait(timeout=300, poll_s=0.5, progress=False)
    assert info["status"] == "succeeded", info.get("error")
    assert len(job.candidates()) == 3 and all(c["accuracy"] > 0.5 for c in job.pareto())
    # The export checks ONNX Runtime against torch on batches of 2 and 3.
    meta = job.pareto()[0].export(tmp_path / "best.onnx", timeout=300)
    assert meta["status"] == "ready" and meta["speedup"] > 0, meta
    # One whose batch cannot be freed is refused at upload, with the fix.
    with pytest.raises(ValidationError, match="batch of exactly 1") as refused:
        client.upload_model(_save_static(WholeBatch(), 1, tmp_path / "whole.pt2"), name="whole")
    assert FIX in str(refused.value)
