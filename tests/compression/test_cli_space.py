"""``modeltailor space``: a user's .pt2 in, its search space out as JSON (or a clear error)."""

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
runner = CliRunner()


@pytest.fixture(scope="module")
def fancy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("space") / "fancy.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_pt2(FancyNet(), torch.randn(2, 1, 16, 16), path)
    return path


def test_space_prints_layers_features_choices_and_blocks(fancy: Path) -> None:
    result = runner.invoke(app, ["space", str(fancy)])
    assert result.exit_code == 0, result.output
    space = json.loads(result.stdout.strip().splitlines()[-1])
    assert space["input_shape"] == [1, 16, 16]
    convs = [layer for layer in space["layers"] if layer["features"]["op"] in ("conv", "dwconv", "gconv")]
    assert convs, space["layers"]
    first = space["layers"][0]
    assert {"in_channels", "out_channels", "kernel", "stride", "groups", "macs"} <= set(first["features"])
    assert "dense" in first["schemes"] and first["bits_choices"]
    # a restricted space, as a job would ask for it
    narrow = runner.invoke(app, ["space", str(fancy), "--options", '{"schemes": ["nm"], "depth": false}'])
    assert narrow.exit_code == 0, narrow.output
    restricted = json.loads(narrow.stdout.strip().splitlines()[-1])
    assert restricted["blocks"] == []
    assert all(set(layer["schemes"]) <= {"dense", "nm"} for layer in restricted["layers"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--options", "{not json"], "not valid JSON"),
        (["--options", '{"colour": 1}'], "unknown option"),
    ],
)
def test_space_bad_options_are_named(fancy: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["space", str(fancy), *args])
    assert result.exit_code == 2
    assert message in result.output


def test_space_of_a_file_that_is_not_an_archive(tmp_path: Path) -> None:
    bogus = tmp_path / "model.pt2"
    bogus.write_bytes(b"not a zip archive")
    result = runner.invoke(app, ["space", str(bogus)])
    assert result.exit_code == 2 and "error" in result.output
