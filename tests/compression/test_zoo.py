"""Every zoo model builds for each data-set shape, exports with a dynamic batch and matches eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compression.zoo import ZOO, build_model, export_model

SHAPES = [(1, 8), (1, 28), (3, 32)]  # digits, MNIST, CIFAR-like


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_zoo_lists_the_issue_architectures() -> None:
    assert set(ZOO) == {"resnet20", "resnet56", "vgg", "mobilenetv2", "lenet5", "vit"}


@pytest.mark.parametrize("arch", ZOO)
@pytest.mark.parametrize(("channels", "size"), SHAPES)
def test_export_runs_at_any_batch_like_eager(arch: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(arch, in_channels=channels, image_size=size, num_classes=7)
    # Non-trivial BN statistics so eval-mode BN is not an identity that hides mistakes.
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, channels, size, size) * 2 + 0.5)
    exported = export_model(model, torch.randn(2, channels, size, size)).module()
    assert not model.training
    for batch in (1, 7):
        x = torch.randn(batch, channels, size, size)
        with torch.no_grad():
            eager = model(x)
            graph = exported(x)
        assert eager.shape == (batch, 7)
        torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ZOO)
def test_graph_is_plain_aten_without_inplace_ops(arch: str) -> None:
    model = build_model(arch, in_channels=1, image_size=28, num_classes=10)
    graph = export_model(model, torch.randn(2, 1, 28, 28)).graph
    targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    assert any("conv2d" in t for t in targets)
    assert any("linear" in t for t in targets)
    inplace = [t for t in targets if t.startswith("aten.") and t.split(".")[1].endswith("_")]
    assert inplace == []


def test_resnets_have_the_paper_depths_and_option_b_shortcuts() -> None:
    for arch, depth in (("resnet20", 20), ("resnet56", 56)):
        model = build_model(arch, in_channels=3, image_size=32, num_classes=10)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        shortcuts = [m for m in convs if m.kernel_size == (1, 1)]
        assert len(convs) - len(shortcuts) + len(linears) == depth
        assert len(shortcuts) == 2  # the two stage transitions, as 1x1 conv + BN


def test_vit_has_separate_qkv_and_output_projections() -> None:
    model = build_model("vit", in_channels=1, image_size=28, num_classes=10)
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for proj in ("q", "k", "v", "proj"):
        assert f"blocks.0.attn.{proj}" in names


def test_mobilenetv2_uses_depthwise_convolutions() -> None:
    model = build_model("mobilenetv2", in_channels=3, image_size=32, num_classes=10)
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    assert len(depthwise) == 17


def test_unknown_arch_lists_the_zoo() -> None:
    with pytest.raises(ValueError, match=r"resnet20.*vit"):
        build_model("resnet18", in_channels=1, image_size=28, num_classes=10)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"in_channels": 0, "image_size": 28, "num_classes": 10}, "in_channels"),
        ({"in_channels": 1, "image_size": 28, "num_classes": 1}, "num_classes"),
        ({"in_channels": 1, "image_size": 2, "num_classes": 10}, "image_size"),
    ],
)
def test_impossible_dimensions_are_refused(kwargs: dict[str, int], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        build_model("lenet5", **kwargs)
