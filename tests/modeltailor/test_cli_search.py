"""``modeltailor search`` end to end: a .pt2 and a digits .npz in, a front JSON out."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

import modeltailor.cli.search  # noqa: F401  (registers the command on the app)
from compression import Policy
from compression.model_io import CompressibleModel
from compression.space_builder import space_for
from latency_models.predictors.base import LatencyRecord
from latency_models.predictors.baselines import MacsLinear
from latency_models.sampling import SPACE_OPTIONS, random_policy
from latency_models.store import DeviceStore
from modeltailor.cli import _register, app

_register()  # the other commands too, so typer dispatches on the command name as installed


def test_search_writes_dense_candidates_and_front_with_measured_latency(
    tiny_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELTAILOR_DATA_DIR", str(tmp_path / "home"))  # no stored predictor: auto measures
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


def test_search_uses_the_devices_stored_predictor(
    tiny_files: tuple[Path, Path],
    tiny_model: CompressibleModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODELTAILOR_DATA_DIR", str(tmp_path / "home"))
    pt2, npz = tiny_files
    out = tmp_path / "front.json"
    base = [
        "search",
        str(pt2),
        "--data",
        str(npz),
        "--algorithm",
        "random",
        "--budget",
        "3",
        "--out",
        str(out),
    ]
    refused = CliRunner().invoke(app, [*base, "--latency", "predicted"])
    assert refused.exit_code == 2 and "modeltailor calibrate" in refused.output

    # a predictor as `modeltailor calibrate` stores it: latency proportional to MACs, fitted on 8 policies
    space = space_for(tiny_model, SPACE_OPTIONS)
    rng = random.Random(0)
    records = [
        LatencyRecord("tiny", "tiny", space, random_policy(space, rng), latency_ms=0.5 + i / 20)
        for i in range(8)
    ]
    predictor = MacsLinear().fit(records)
    DeviceStore("cpu-ort-1t").save_version({"macs": predictor}, {"predictors": {}}, "macs")
    # --latency auto; the stored predictor as it is (measuring on the device: the next test)
    result = CliRunner().invoke(app, [*base, "--no-active-measurement"])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["latency_source"].startswith("predicted: macs v1 for cpu-ort-1t")
    for entry in doc["candidates"]:
        expected = predictor.predict(space, [Policy.from_dict(entry["policy"])])[0]
        assert entry["latency_ms"] == pytest.approx(expected, rel=1e-5)
    assert DeviceStore("cpu-ort-1t").versions() == [1] and "topup" not in doc


def test_search_tops_up_and_measures_on_the_device_then_refits(
    tiny_files: tuple[Path, Path],
    tiny_model: CompressibleModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stored predictor that never saw the model: timed before the search (top-up) and during it."""
    monkeypatch.setenv("MODELTAILOR_DATA_DIR", str(tmp_path / "home"))
    pt2, npz = tiny_files
    space = space_for(tiny_model, SPACE_OPTIONS)
    rng = random.Random(0)
    records = [
        LatencyRecord("other", "other", space, random_policy(space, rng), latency_ms=0.05 + i / 100)
        for i in range(8)
    ]
    store = DeviceStore("cpu-ort-1t")
    store.append(records)
    store.save_version({"macs": MacsLinear().fit(records)}, {"predictors": {}}, "macs")
    out = tmp_path / "front.json"
    args = [
        "search",
        str(pt2),
        "--data",
        str(npz),
        "--algorithm",
        "random",
        "--budget",
        "12",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, [*args, "--topup", "4", "--active-max", "2", "--finetune-top-k", "0"])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    # On a loaded machine the load guard may refuse a timing: it is counted as skipped, never stored.
    topped = doc["topup"]["measured"]
    assert topped + doc["topup"]["skipped"] == 4 and topped >= 2
    assert f"topped up: {topped} policies" in result.output and "round 1/1" in result.output

    # top-up: v2; one round of 2 (15 % of 12), then a refit: v3, the version the search ended on
    assert doc["topup"]["version"] == 2
    active = doc["active_measurement"]
    assert 1 <= active["measured"] <= 2 and active["refits"] == 1 and doc["predictor_version"] == 3
    assert store.versions() == [1, 2, 3] and "refitted to v3" in doc["latency_source"]
    # each round also times the dense model
    assert len(store.records()) == 8 + topped + 1 + active["measured"] + 1
    refit, _version, _kind = store.load()
    for entry in doc["candidates"]:
        expected = refit.predict(space, [Policy.from_dict(entry["policy"])])[0]
        assert entry["latency_ms"] == pytest.approx(expected, rel=1e-5)
    measured = [e for e in doc["candidates"] if "active" in e]
    assert len(measured) == active["measured"] and all(
        e["measured_latency_ms"] > 0 and e["active"]["speedup"] > 0 for e in measured
    )
    assert doc["dense"]["latency_ms"] == pytest.approx(refit.predict(space, [Policy.dense()])[0], rel=1e-5)


def test_search_options_restrict_the_space_and_bad_options_exit_2(
    tiny_files: tuple[Path, Path], tmp_path: Path
) -> None:
    pt2, npz = tiny_files
    out = tmp_path / "front.json"
    base = ["search", str(pt2), "--data", str(npz), "--out", str(out), "--latency", "macs-proxy"]
    only_nm = json.dumps({"schemes": ["nm"], "bits": [None], "width": False, "depth": False})
    ok = CliRunner().invoke(app, [*base, "--algorithm", "random", "--budget", "6", "--options", only_nm])
    assert ok.exit_code == 0, ok.output
    for entry in json.loads(out.read_text())["candidates"]:
        policy = Policy.from_dict(entry["policy"])
        assert not policy.skip
        for lp in policy.layers.values():
            assert lp.scheme in ("dense", "nm") and lp.bits is None and lp.width == 1.0, lp
    for bad, says in (
        ("{nope", "not valid JSON"),
        ('{"round_to": 0}', "round_to"),
        ('{"colour": 1}', "colour"),
    ):
        res = CliRunner().invoke(app, [*base, "--budget", "2", "--options", bad])
        assert res.exit_code == 2 and says in res.output, res.output
