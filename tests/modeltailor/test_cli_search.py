"""``modeltailor search`` end to end: a .pt2 and a digits .npz in, a front JSON out."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

import modeltailor.cli.search  # noqa: F401  (registers the command on the app)
from compression import Policy
from modeltailor.cli import _register, app

_register()  # the other commands too, so typer dispatches on the command name as installed


def test_search_writes_dense_candidates_and_front_with_measured_latency(
    tiny_files: tuple[Path, Path], tmp_path: Path
) -> None:
    pt2, npz = tiny_files
    out = tmp_path / "front.json"
    args = ["search", str(pt2), "--data", str(npz), "--device", "cpu-ort-1t", "--algorithm", "rule"]
    result = CliRunner().invoke(
        app, [*args, "--budget", "4", "--max-accuracy-drop", "0.5", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["latency_source"].startswith("measured")
    assert len(doc["candidates"]) == 4
    for entry in [doc["dense"], *doc["candidates"], *doc["pareto"]]:
        Policy.from_dict(entry["policy"])  # the policy-JSON format round-trips
        assert 0.0 <= entry["accuracy"] <= 1.0 and entry["latency_ms"] > 0 and entry["macs"] > 0
    assert {e["policy_hash"] for e in doc["pareto"]} <= {e["policy_hash"] for e in doc["candidates"]}


def test_proxy_latency_is_labelled_and_bad_input_exits_2(
    tiny_files: tuple[Path, Path], tmp_path: Path
) -> None:
    pt2, npz = tiny_files
    out = tmp_path / "front.json"
    base = ["search", str(pt2), "--data", str(npz), "--out", str(out)]
    ok = CliRunner().invoke(app, [*base, "--algorithm", "random", "--budget", "2", "--latency", "macs-proxy"])
    assert ok.exit_code == 0, ok.output
    assert "NOT measured" in json.loads(out.read_text())["latency_source"]
    assert "proxy" in ok.output
    bad = CliRunner().invoke(app, [*base, "--algorithm", "amc", "--budget", "2"])
    assert bad.exit_code == 2 and "optuna-tpe" in bad.output
    missing = CliRunner().invoke(
        app, ["search", str(tmp_path / "no.pt2"), "--data", str(npz), "--out", str(out)]
    )
    assert missing.exit_code == 2
