"""``modeltailor calibrate``: measure on this CPU, fit, print held-out errors; ``--model`` focuses."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from compression.model_io import save_pt2
from modeltailor.cli import _register, app
from tests.compression.fancy_model import FancyNet

_register()


@pytest.fixture()
def fancy_pt2(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "fancy.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_pt2(FancyNet(), torch.randn(2, 1, 16, 16), path)
    return path


def test_calibrate_on_one_model_measures_its_policies_and_fits(
    fancy_pt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELTAILOR_DATA_DIR", str(tmp_path / "home"))
    args = ["calibrate", "--device", "cpu-ort-1t", "--samples", "8", "--runs", "5", "--model", str(fancy_pt2)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "predictor version 1" in result.output and "kernel_gbdt" in result.output
    rows = [
        json.loads(line)
        for line in (tmp_path / "home" / "devices" / "cpu-ort-1t" / "measurements.jsonl")
        .read_text()
        .splitlines()
    ]
    mine = [r for r in rows if str(r.get("space_id", "")).startswith("upload-")]
    others = [r for r in rows if not str(r.get("space_id", "")).startswith("upload-")]
    # Most samples are the model's own policies; a quarter are random architectures (the
    # held-out split groups by architecture, so it needs more than one).
    assert len(mine) >= 5 and others, (len(mine), len(others))
    assert all(r["latency_ms"] > 0 for r in rows)


def test_calibrate_rejects_a_model_it_cannot_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELTAILOR_DATA_DIR", str(tmp_path / "home"))
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip archive")
    result = CliRunner().invoke(
        app, ["calibrate", "--device", "cpu-ort-1t", "--samples", "4", "--model", str(bad)]
    )
    assert result.exit_code == 2
    assert "--model" in result.output
    assert not (tmp_path / "home" / "devices" / "cpu-ort-1t" / "measurements.jsonl").exists()
