"""Channels that meet after a concat (SE gate, residual add, grouped conv) are width-prunable.

A concat's output channels are runs of its branches' groups. Where they meet another layer's
channels in a multiply or add, that layer's output is split into the same runs, each run
coupled to its branch (Torch-Pruning's dependency-graph rule). The checks that matter to a
user: such blocks are offered to the search, every width runs, the pruned model computes
exactly what the dense model computes with the same channels zeroed, it exports to ONNX
Runtime unchanged, reconstruction still re-fits it, and ``round_to`` holds run by run.
"""

from __future__ import annotations

import copy
import functools
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from compression import Policy, PolicyError, apply_policy, from_module, space_for
from compression.apply import CompressedModel, _positions, get_tensor
from compression.evaluate import recalibrate_bn
from compression.model_io import CompressibleModel
from compression.onnx_export import export_onnx, run_onnx
from compression.reconstruct import reconstruct
from compression.space import SpaceOptions
from tests.compression.branchy_model import BranchyNet, SqueezeExcite, with_random_bn_stats
from tests.compression.fancy_model import FancyNet

INCEPTION = ["inception.b1.0", "inception.b2.0", "inception.b3.0"]


class ImageConcatSE(nn.Module):
    """cat(input image, conv(x)) then SE: the gate's run over the image stays whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 7, 3, padding=1)
        self.se = SqueezeExcite(8, 4)
        self.out = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(torch.cat([x, F.relu(self.conv(x))], dim=1))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.out(y)), 1).flatten(1))


class GroupedMeetsConcat(nn.Module):
    """A grouped conv's output added to a concat: cutting it into runs would break its groups."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.a = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = self.grouped(x) + torch.cat([self.a(x), self.b(x)], dim=1)
        return self.fc(F.adaptive_avg_pool2d(F.relu(y), 1).flatten(1))


@functools.cache
def _model(kind: str) -> CompressibleModel:
    torch.manual_seed(0)
    net: nn.Module = {
        "branchy": BranchyNet,
        "fancy": FancyNet,
        "image_se": ImageConcatSE,
        "grouped_meets": GroupedMeetsConcat,
    }[kind]()
    size = 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return from_module(with_random_bn_stats(net), torch.randn(2, 1, size, size), name=kind)


def zeroed_dense(cm: CompressedModel) -> torch.nn.Module:
    """The dense model with every pruned channel zeroed where a layer reads it.

    A pruned channel reaches the output only through a conv / linear's input columns
    (groups that reach the output or a non-channel op are never pruned), so zeroing those
    columns is the dense model with the pruned channels switched off.
    """
    graph = cm.source.graph
    gm = copy.deepcopy(cm.source.gm)
    weights = {info.weight for info in graph.layers}
    with torch.no_grad():
        for act in graph.slices:
            if act.target not in weights or act.space.dim != 1:
                continue  # output rows, biases and BatchNorm vectors: the channel just goes
            pos = _positions(act.space, cm.keep, graph)
            if pos is None:
                continue
            w = get_tensor(gm, act.target)
            gone = torch.ones(w.shape[1], dtype=torch.bool)
            gone[pos] = False
            w[:, gone] = 0.0
    return gm


def assert_equivalent(cm: CompressedModel, x: torch.Tensor) -> None:
    with torch.no_grad():
        got, want = cm.gm(x), zeroed_dense(cm)(x)
    assert got.shape == want.shape
    scale = float(want.abs().max().clamp(min=1e-6))
    assert float((got - want).abs().max()) <= 1e-5 * scale, float((got - want).abs().max())


def test_concat_se_and_concat_residual_are_prunable() -> None:
    model = _model("branchy")
    space = space_for(model)
    by_name = {ls.name: ls for ls in space.layers}
    leaders = [ls.name for ls in space.width_leaders]
    # Before: the three inception branches, both residual branches and both tail branches
    # were left whole (their channels meet the SE gate / the shortcut).
    for name in [*INCEPTION, "tail_a", "tail_b"]:
        assert name in leaders, name
    # The SE excitation and the shortcut projection follow the concat run by run.
    fc2 = by_name["inception.se.fc2"]
    assert not fc2.decides_width and [s[0] for s in fc2.out_segments] == INCEPTION
    assert [s[1] for s in fc2.out_segments] == [8, 8, 16]
    proj = by_name["res.proj"]
    assert [s[0] for s in proj.out_segments] == [
        "inception.b1.0",  # branch_a's first half meets b1 through the grouped conv 'mix'
        "inception.b2.0",
        "inception.b3.0",  # branch_b
        *INCEPTION,  # the max-pooled inception output
    ]
    assert by_name["tail_se.fc2"].out_segments == (("tail_a", 24), ("tail_b", 24))
    assert by_name["mix.0"].decides_width and by_name["mix.0"].features.op == "gconv"
    assert not by_name["head"].width_prunable  # logits stay
    with pytest.raises(PolicyError, match=r"inception\.se\.fc2.*inception\.b1\.0"):
        apply_policy(model, Policy.from_dict({"layers": {"inception.se.fc2": {"width": 0.5}}}))


def test_every_group_at_half_width_runs_and_matches_zeroed_dense() -> None:
    model = _model("branchy")
    x = torch.randn(3, 1, 16, 16)
    leaders = [ls.name for ls in space_for(model).width_leaders]
    for leader in leaders:
        cm = apply_policy(model, Policy.from_dict({"layers": {leader: {"width": 0.5}}}))
        assert cm.keep, f"{leader}: nothing pruned"
        assert_equivalent(cm, x)
    cm = apply_policy(model, Policy.from_dict({"default": {"width": 0.5}}))
    assert_equivalent(cm, x)
    params = dict(cm.gm.named_parameters())
    # The gate's rows are exactly the concat's kept channels, run by run.
    assert params["inception.se.fc2.weight"].shape[0] == 4 + 4 + 8
    assert params["inception.se.fc1.weight"].shape[1] == 16
    assert params["res.proj.weight"].shape[0] == params["res.bn.weight"].shape[0] == 32
    assert params["mix.0.weight"].shape == (32, 16, 1, 1)  # equal input share per conv group
    assert params["inception.b2.0.weight"].shape == (4, 2, 3, 3)
    assert params["head.weight"].shape == (10, 24)


PROPERTY = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
WIDTH_ONLY = SpaceOptions(schemes=("dense",), bits=(None,), depth=False, min_width=0.1)


@pytest.mark.parametrize("kind", ["branchy", "fancy", "image_se"])
@PROPERTY
@given(seed=st.integers(0, 10_000))
def test_random_widths_equal_zeroed_dense(kind: str, seed: int) -> None:
    model = _model(kind)
    policy = space_for(model, WIDTH_ONLY).sample(random.Random(seed))
    cm = apply_policy(model, policy)
    assert_equivalent(cm, torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(seed)))


def test_runs_that_cannot_be_pruned_stay_whole() -> None:
    image = space_for(_model("image_se"))
    fc2 = image.layer("se.fc2")
    assert fc2.out_segments == ((None, 1), ("conv", 7))  # the image channel is never pruned
    assert image.layer("conv").decides_width
    grouped = _model("grouped_meets")
    for name in ("grouped", "a", "b"):
        assert not grouped.graph.width_prunable(grouped.graph.layer(name)), name
    gid = grouped.graph.group_of(grouped.graph.layer("grouped"))
    assert gid is not None
    assert any("grouped conv" in why for why in grouped.graph.groups.data(gid).blocked_by)
    x = torch.randn(2, 1, 16, 16)
    cm = apply_policy(grouped, Policy.from_dict({"default": {"width": 0.5}}))
    assert_equivalent(cm, x)


def test_pruned_branchy_model_runs_the_same_in_onnx_runtime(tmp_path: Path) -> None:
    model = _model("branchy")
    x = np.random.default_rng(0).standard_normal((4, 1, 16, 16)).astype(np.float32)
    for label, policy in (("dense", Policy.dense()), ("half", Policy.from_dict({"default": {"width": 0.5}}))):
        cm = apply_policy(model, policy)
        path = export_onnx(cm.gm, model.example_input(2), tmp_path / f"{label}.onnx")
        with torch.no_grad():
            ref = cm.gm(torch.from_numpy(x)).numpy()
        got = run_onnx(path, x)
        assert got.shape == (4, 10)
        assert np.abs(got - ref).max() <= 1e-4 * max(float(np.abs(ref).max()), 1e-6), label


def test_reconstruction_refits_split_layers() -> None:
    """Least squares still re-fits after pruning, including the SE gate and the shortcut."""
    model = _model("branchy")
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(24, 1, 16, 16, generator=gen) for _ in range(2)]
    held_out = torch.randn(64, 1, 16, 16, generator=gen)
    policy = Policy.from_dict({"default": {"width": 0.5}})
    plain, refit = apply_policy(model, policy), apply_policy(model, policy)
    n = reconstruct(refit, calib)
    assert n >= 6
    for cm in (plain, refit):
        recalibrate_bn(cm.gm, calib)
    graph = model.graph
    for name in ("inception.se.fc2", "res.proj"):
        info = graph.layer(name)
        assert info.split and info.out_space is not None
        rows = _positions(info.out_space.with_dim(0), refit.keep, graph)
        assert rows is not None
        want = _layer_output(model.gm, info.node, held_out).index_select(1, rows)
        err_plain = F.mse_loss(_layer_output(plain.gm, info.node, held_out), want)
        err_refit = F.mse_loss(_layer_output(refit.gm, info.node, held_out), want)
        assert err_refit < err_plain, (name, float(err_refit), float(err_plain))
    with torch.no_grad():
        assert torch.isfinite(refit.gm(held_out)).all()


def _layer_output(gm: torch.fx.GraphModule, node: str, x: torch.Tensor) -> torch.Tensor:
    seen: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> object:
            out = super().run_node(n)
            if n.name == node:
                seen[node] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(x)
    return seen[node]


def test_round_to_holds_in_every_run() -> None:
    model = _model("branchy")
    m = 4
    space = space_for(model, SpaceOptions(round_to=m, min_width=0.2, depth=False))
    graph = model.graph
    rng = random.Random(0)
    pruned_runs = 0
    for _ in range(15):
        cm = apply_policy(model, space.sample(rng))
        for kept in cm.keep.values():
            assert len(kept) % m == 0
        # Every run of a split layer's output, and so the concat's slices, keeps a multiple.
        for name in ("inception.se.fc2", "res.proj", "tail_se.fc2"):
            out = graph.layer(name).out_space
            assert out is not None
            for seg in out.segments:
                run = _positions(type(out)(0, (seg,)), cm.keep, graph)
                if run is not None:
                    assert len(run) % m == 0, (name, seg, len(run))
                    pruned_runs += 1
            assert get_tensor(cm.gm, graph.layer(name).weight).shape[0] % m == 0
        assert cm.gm(model.example_input(2)).shape == (2, 10)
    assert pruned_runs > 0


def test_compute_estimate_follows_the_runs() -> None:
    """The agents' MACs estimate narrows a split layer by the widths of its runs' leaders."""
    from agents.cost import MacsEstimator

    space = space_for(_model("branchy"))
    widths = MacsEstimator(space).out_width(Policy.from_dict({"layers": {"inception.b3.0": {"width": 0.5}}}))
    fc2 = space.layer_names.index("inception.se.fc2")
    assert widths[fc2] == pytest.approx((8 + 8 + 8) / 32)
