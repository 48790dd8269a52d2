"""Families (issue 15): nested points on one shared weight set, their search, joint fine-tuning,
bundle and CLI, on real trained models (LeNet-5 and a BatchNorm CNN on digits) and real ONNX
Runtime."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

import modeltailor.cli.family  # noqa: F401  (registers the command on the app)
from compression.apply import get_tensor
from compression.data import Dataset, calibration_batches, load_builtin
from compression.distill import DistillConfig, KDBatches
from compression.evaluate import accuracy
from compression.family import FAMILY_RECOVERIES, Family, NestingError, build_family
from compression.family_distill import distill_family
from compression.family_export import WEIGHTS_FILE, write_bundle
from compression.model_io import CompressibleModel
from compression.onnx_export import OnnxModel, max_relative_error
from compression.policy import Policy
from compression.resolve import resolve_model
from engine.device_latency import macs_proxy
from engine.family import check_budgets, search_family
from modeltailor.cli import _register, app
from modeltailor.switch import FamilySwitch

_register()

NESTED: list[dict[str, Any]] = [
    {},
    {"default": {"width": 0.75}},
    {"default": {"width": 0.5, "bits": 8}},
    {"default": {"width": 0.5, "bits": 8}, "layers": {"fc2": {"scheme": "unstructured", "sparsity": 0.5}}},
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Two intra-op threads on a shared 2-core machine run 10x slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lenet(tmp_path_factory: pytest.TempPathFactory) -> tuple[CompressibleModel, Dataset]:
    data = load_builtin("digits")
    return resolve_model("lenet5", data, seed=0, cache_dir=tmp_path_factory.mktemp("zoo")), data


def _policies(raw: list[dict[str, Any]]) -> list[Policy]:
    return [Policy.from_dict(p) for p in raw]


def _family(setup: tuple[CompressibleModel, Dataset], recovery: str = "joint") -> Family:
    model, data = setup
    with torch.no_grad():
        return build_family(
            model,
            _policies(NESTED),
            calibration_batches(data, 4, 64),
            recovery=recovery,  # type: ignore[arg-type]
        )


@pytest.mark.parametrize("recovery", FAMILY_RECOVERIES)
def test_one_weight_set_reproduces_every_nested_point(
    lenet: tuple[CompressibleModel, Dataset], recovery: str
) -> None:
    fam = _family(lenet, recovery)
    assert fam.verify() == 0.0
    graph = lenet[0].graph
    for prev, cur in itertools.pairwise(fam.points):
        for root in graph.groups.roots():  # kept channels: a subset of the previous point's
            a, b = prev.cm.keep.get(root), cur.cm.keep.get(root)
            if b is not None and a is not None:
                assert bool(torch.isin(b, a).all())
            elif a is not None:
                pytest.fail("a later point keeps channels an earlier one removed")
        for target, mask in cur.full_masks.items():  # kept weights: a subset too
            before = prev.full_masks.get(target, torch.ones_like(mask))
            assert not bool((mask & ~before).any())
    # The mask asked for holds exactly in the point that asks, and bits are the policy's.
    last = fam.points[-1]
    fc2 = graph.layer("fc2").weight
    w = get_tensor(last.cm.gm, fc2)
    assert bool((w[~last.cm.masks[fc2]] == 0).all())
    assert float((w == 0).float().mean()) >= 0.5
    assert last.cm.bits[fc2] == 8 and fc2 not in fam.points[1].cm.bits
    # Sharing is real: moving a master weight moves every point that reads it.
    conv2 = graph.layer("conv2").weight
    fam.master[conv2] = fam.master[conv2] * 1.5
    fam.sync([conv2])
    assert fam.verify() == 0.0
    assert torch.allclose(get_tensor(fam.points[0].cm.gm, conv2), fam.master[conv2])


def test_policies_that_do_not_nest_are_refused_with_the_fix(lenet: tuple[CompressibleModel, Dataset]) -> None:
    model, data = lenet
    cal = calibration_batches(data, 2, 32)
    wider = _policies([{"default": {"width": 0.5}}, {"default": {"width": 0.75}}])
    with pytest.raises(NestingError, match="not a subset"):
        build_family(model, wider, cal)
    finer = _policies([{"default": {"bits": 8}}, {"default": {"bits": 8}, "layers": {"fc1": {"bits": None}}}])
    with pytest.raises(NestingError, match=r"more precise.*use 8 or fewer"):
        build_family(model, finer, cal)
    with pytest.raises(NestingError, match="act_bits"):
        build_family(model, [Policy(act_bits=8)], cal)
    with pytest.raises(ValueError, match="recovery"):
        build_family(model, _policies([{}]), cal, recovery="obc")  # type: ignore[arg-type]


def test_joint_refit_recovers_the_narrow_points_that_shared_masks_alone_lose(
    lenet: tuple[CompressibleModel, Dataset],
) -> None:
    _model, data = lenet
    joint, none = _family(lenet, "joint"), _family(lenet, "none")
    acc_joint = [accuracy(p.cm.gm, data.x_val, data.y_val) for p in joint.points]
    acc_none = [accuracy(p.cm.gm, data.x_val, data.y_val) for p in none.points]
    assert acc_joint[2] > acc_none[2] + 0.02, (acc_joint, acc_none)
    assert np.mean(acc_joint[1:]) > np.mean(acc_none[1:]), (acc_joint, acc_none)


def test_joint_fine_tuning_trains_the_shared_weights_and_keeps_what_each_point_fixed(
    lenet: tuple[CompressibleModel, Dataset],
) -> None:
    model, data = lenet
    fam = _family(lenet, "none")
    before = [accuracy(p.cm.gm, data.x_val, data.y_val) for p in fam.points]
    config = DistillConfig().for_size(len(data.x_train))
    batches = KDBatches(model.gm, data, batch_size=config.batch_size, seed=0)
    result = distill_family(fam, batches, 40, config=config)
    assert not result.diverged and result.steps == 40
    assert result.last_loss < result.first_loss
    assert fam.verify() == 0.0  # still one weight set
    last = fam.points[-1]
    fc2 = model.graph.layer("fc2").weight
    assert bool((get_tensor(last.cm.gm, fc2)[~last.cm.masks[fc2]] == 0).all())
    after = [accuracy(p.cm.gm, data.x_val, data.y_val) for p in fam.points]
    assert np.mean(after) > np.mean(before), (before, after)
    with pytest.raises(ValueError, match="point_weights"):
        distill_family(fam, batches, 1, config=config, point_weights=[1.0])


def _optimized_ops(path: Path, tmp: Path) -> list[str]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp / f"opt-{path.parent.name}-{path.name}")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sorted(
        n.op_type for n in onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node
    )


def test_bundle_stores_the_weights_once_and_each_graph_computes_its_point(
    lenet: tuple[CompressibleModel, Dataset], tmp_path: Path
) -> None:
    _model, data = lenet
    fam = _family(lenet, "joint")
    calib = [b.numpy() for b in calibration_batches(data, 2, 64)]
    files = write_bundle(fam, tmp_path / "bundle", calib, x_check=data.x_val[:16], keep_standalone=True)
    assert files.bundle_bytes < files.separate_bytes
    assert (tmp_path / "bundle" / WEIGHTS_FILE).stat().st_size == files.weights_bytes
    x = data.x_val[:64]
    for k, (point, pf) in enumerate(zip(fam.points, files.points, strict=True)):
        assert not pf.private_layers and len(pf.shared_layers) == len(point.index) // 2
        graph = tmp_path / "bundle" / pf.file
        proto = onnx.load(str(graph), load_external_data=False)
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
        got = OnnxModel(graph).run(x)
        assert max_relative_error(got, OnnxModel(files.standalone[k]).run(x)) <= 1e-4
        if not point.cm.bits:  # a float point computes what its torch model computes
            with torch.no_grad():
                want = point.cm.gm(torch.from_numpy(x)).numpy()
            assert max_relative_error(got, want) <= 1e-4
        # ONNX Runtime folds the shared-weight ops away: the session runs the standalone's kernels.
        assert _optimized_ops(graph, tmp_path) == _optimized_ops(files.standalone[k], tmp_path)


def test_search_finds_nested_points_within_each_budget(lenet: tuple[CompressibleModel, Dataset]) -> None:
    model, data = lenet
    result = search_family(model, data, device_latency=macs_proxy, budgets=[1.0, 0.6, 0.35], val_images=200)
    assert [p.budget for p in result.points] == [1.0, 0.6, 0.35] and not result.note
    assert result.points[0].policy == Policy.dense()
    for p in result.points:
        assert p.score.latency_ms <= p.target_ms + 1e-9
    with torch.no_grad():  # the chain's points nest: one weight set serves them
        fam = build_family(model, [p.policy for p in result.points], calibration_batches(data, 2, 64))
    assert fam.verify() == 0.0
    short = search_family(
        model, data, device_latency=macs_proxy, budgets=[1.0, 0.6, 0.35], val_images=200, budget_candidates=3
    )
    assert len(short.points) < 3 and "budget" in short.note
    for bad in ([], [0.5, 0.7], [1.2], [1.0, 0.0]):
        with pytest.raises(ValueError, match="budget"):
            check_budgets(bad)


def test_cli_writes_a_bundle_the_switch_runs(tiny_files: tuple[Path, Path], tmp_path: Path) -> None:
    pt2, npz = tiny_files
    out = tmp_path / "fam"
    args = ["family", str(pt2), "--data", str(npz), "--out", str(out), "--budgets", "1,0.5"]
    result = CliRunner().invoke(
        app, [*args, "--latency", "macs-proxy", "--runs", "20", "--finetune-steps", "3"]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "family.json").read_text())
    assert [p["budget"] for p in manifest["points"]] == [1.0, 0.5]
    for p in manifest["points"]:
        assert (out / p["file"]).is_file() and p["latency_ms"] > 0 and 0.0 <= p["accuracy"] <= 1.0
    assert manifest["sizes"]["bundle_bytes"] < manifest["sizes"]["separate_bytes"]
    assert manifest["finetune"]["steps"] == 3
    assert not (out / "standalone").exists()
    switch = FamilySwitch(out, target_ms=1e3)
    assert switch.run(np.zeros((1, 1, 8, 8), dtype=np.float32)).shape == (1, 10)
    bad = CliRunner().invoke(app, [*args, "--budgets", "0.5,0.7"])
    assert bad.exit_code == 2 and "decrease" in bad.output and "Traceback" not in bad.output
