"""``modeltailor space --device``: the space as a latency search on that device would use it —
the device's stored channel multiple and its size-only schemes left out, with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from compression.model_io import save_pt2
from latency_models.calibrate import fit_predictors
from latency_models.capabilities import INT8, Capabilities
from latency_models.store import DeviceStore
from latency_models.testing import synthetic_records
from modeltailor.cli import _register, app

_register()
runner = CliRunner()


def test_space_for_a_device_uses_its_stored_capabilities(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELTAILOR_DATA_DIR", str(tmp_path / "data"))
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 8, 1)
    )
    model = save_pt2(net, torch.randn(2, 1, 8, 8), tmp_path / "net.pt2")

    unmeasured = runner.invoke(app, ["space", str(model), "--device", "cpu-ort-1t"])
    assert unmeasured.exit_code == 0, unmeasured.output
    doc = json.loads(unmeasured.stdout.strip().splitlines()[-1])
    assert doc["device"]["measured"] is False and doc["device"]["round_to"] == 1

    caps = Capabilities(
        round_to=16,
        accelerated_schemes=(INT8,),
        measured_schemes=("unstructured", "nm", "block", "pattern", INT8),
        reasons={"nm": "size-only: nm (nm 1:4) ran 0.99x the dense speed", "round_to": "multiples of 16"},
    )
    store = DeviceStore("cpu-ort-1t", root=tmp_path / "data")
    fit_predictors(synthetic_records(), kinds=("macs",), store=store, extra={"capabilities": caps.to_dict()})

    result = runner.invoke(app, ["space", str(model), "--device", "cpu-ort-1t"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    device = doc["device"]
    assert device["measured"] is True and device["round_to"] == 16 and device["round_to_source"] == "device"
    assert (
        set(device["left_out"]) == {"unstructured", "nm", "block", "pattern"}
        and "0.99x" in device["left_out"]["nm"]
    )
    assert all(set(layer["schemes"]) == {"dense"} for layer in doc["layers"])
    assert "size-only" in result.stderr

    listed = runner.invoke(
        app,
        ["space", str(model), "--device", "cpu-ort-1t", "--options", '{"schemes": ["nm"], "round_to": 8}'],
    )
    assert listed.exit_code == 0, listed.output
    device = json.loads(listed.stdout.strip().splitlines()[-1])["device"]
    assert (
        device["round_to"] == 8
        and device["round_to_source"] == "space"
        and set(device["size_only"]) == {"nm"}
    )
