"""Graph analysis finds decision points by itself, on zoo models and on a user's .pt2."""

from __future__ import annotations

import random
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from compression import (
    ModelLoadError,
    ModelTraceError,
    Policy,
    PolicyError,
    apply_policy,
    from_module,
    load_pt2,
    measure,
    save_pt2,
    space_for,
)
from compression.evaluate import recalibrate_bn
from compression.masks import block_mask, nm_mask, unstructured_mask
from tests.compression.conftest_models import zoo_model
from tests.compression.fancy_model import FancyNet


@pytest.fixture(scope="module")
def fancy_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pt2") / "fancy.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_pt2(FancyNet(), torch.randn(2, 1, 16, 16), path)
    return path


def test_user_model_from_pt2_couples_concat_se_and_groups(fancy_pt2: Path) -> None:
    model = load_pt2(fancy_pt2)
    assert model.input_shape == (1, 16, 16) and model.dynamic_batch
    space = space_for(model)
    by_name = {ls.name: ls for ls in space.layers}
    # The SE excitation, the depthwise and the pointwise conv follow the grouped conv's channels.
    for follower in ("dw", "pw", "se.fc2"):
        assert by_name[follower].width_leader == "grouped"
    assert by_name["grouped"].features.op == "gconv" and by_name["dw"].features.op == "dwconv"
    # The concat feeds 'fuse' with two independently prunable runs.
    assert [s[0] for s in by_name["fuse"].in_segments] == ["branch_a", "branch_b"]
    assert not by_name["fc"].width_prunable  # logits stay
    assert "nm" not in by_name["dw"].schemes
    assert [b.layers for b in space.blocks] == [("dw", "pw", "se.fc1", "se.fc2")]


@pytest.mark.parametrize(
    "default",
    [
        {"width": 0.5},
        {"width": 0.3, "scheme": "unstructured", "sparsity": 0.6},
        {"scheme": "nm", "nm": [2, 4]},
        {"width": 0.75, "scheme": "block", "block": 4, "sparsity": 0.5, "bits": 4},
        {"bits": 2},
    ],
)
def test_every_scheme_runs_on_user_model(fancy_pt2: Path, default: dict) -> None:
    model = load_pt2(fancy_pt2)
    skip = ["add"] if default.get("bits") == 2 else []
    cm = apply_policy(model, Policy.from_dict({"default": default, "skip": skip}))
    x = model.example_input(5)
    assert cm.gm(x).shape == (5, 10)
    if default.get("width", 1) < 1:
        grouped = dict(cm.gm.named_parameters())["grouped.weight"]
        assert grouped.shape[0] % 4 == 0 and grouped.shape[0] < 16  # equal share per conv group
        assert dict(cm.gm.named_parameters())["se.fc2.weight"].shape[0] == grouped.shape[0]
    assert measure(cm).size_bytes < measure(apply_policy(model, Policy.dense())).size_bytes


def test_width_pruning_keeps_the_most_important_channels() -> None:
    model = zoo_model("vgg")
    first = model.graph.layers[0]
    w = dict(model.gm.named_parameters())[first.weight].detach()
    norms = w.abs().reshape(w.shape[0], -1).sum(1)
    cm = apply_policy(model, Policy.from_dict({"layers": {first.name: {"width": 0.5}}}))
    kept = cm.keep[model.graph.groups.find(first.out_group)]  # type: ignore[arg-type]
    top = torch.topk(norms, len(kept)).indices.sort().values
    assert torch.equal(kept, top)


def test_bn_recalibration_restores_accuracy_lost_to_stale_statistics() -> None:
    """On a real trained CNN, pruned + recalibrated beats pruned with stale BN statistics."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    net = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(8):
        for i in range(0, 1400, 100):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[i : i + 100]), y[i : i + 100]).backward()
            opt.step()
    model = from_module(net, x[:2])
    cm = apply_policy(model, Policy.from_dict({"default": {"width": 0.4}}))
    xv, yv = x[1400:], y[1400:]
    with torch.no_grad():
        stale = (cm.gm(xv).argmax(1) == yv).float().mean().item()
        assert recalibrate_bn(cm.gm, [x[i : i + 100] for i in range(0, 400, 100)]) == 4
        fresh = (cm.gm(xv).argmax(1) == yv).float().mean().item()
    assert fresh > stale + 0.02, (stale, fresh)


def test_untraceable_model_names_the_problem() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return self.fc(-x)

    with pytest.raises(ModelTraceError, match="cannot trace") as info:
        from_module(DataDependent(), torch.randn(2, 4), "dd")
    assert "test_graph.py" in str(info.value) or "sum" in str(info.value)


def test_corrupt_and_foreign_files_are_refused(tmp_path: Path, fancy_pt2: Path) -> None:
    missing = tmp_path / "nope.pt2"
    with pytest.raises(ModelLoadError, match="no such file"):
        load_pt2(missing)
    text = tmp_path / "text.pt2"
    text.write_text("not a model")
    with pytest.raises(ModelLoadError, match=r"not a torch\.export archive"):
        load_pt2(text)
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(fancy_pt2.read_bytes()[: fancy_pt2.stat().st_size // 2])
    with pytest.raises(ModelLoadError):
        load_pt2(truncated)
    other_zip = tmp_path / "other.pt2"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("hello.txt", "hi")
    with pytest.raises(ModelLoadError, match="not a loadable"):
        load_pt2(other_zip)
    pickled = tmp_path / "pickled.pt2"
    torch.save(FancyNet(), pickled)  # a full pickle: must never be unpickled
    with pytest.raises(ModelLoadError):
        load_pt2(pickled)


def test_policy_errors_name_layers_and_blocks() -> None:
    model = zoo_model("resnet20")
    with pytest.raises(PolicyError, match=r"unknown layer.*layer1\.0\.conv9"):
        apply_policy(model, Policy.from_dict({"layers": {"layer1.0.conv9": {"width": 0.5}}}))
    with pytest.raises(PolicyError, match="unknown block"):
        apply_policy(model, Policy.from_dict({"skip": ["layer9"]}))
    with pytest.raises(PolicyError, match="width cannot change"):
        apply_policy(model, Policy.from_dict({"layers": {"fc": {"width": 0.5}}}))


def test_space_is_derived_not_listed() -> None:
    """Layer counts follow from the architecture: ResNet-56 has 3x the blocks of ResNet-20."""
    r20, r56 = space_for(zoo_model("resnet20")), space_for(zoo_model("resnet56"))
    assert len(r56.blocks) - len(r20.blocks) == 18
    assert len(r56.layers) - len(r20.layers) == 36
    vit = space_for(zoo_model("vit"))
    ops = {ls.features.op for ls in vit.layers}
    assert ops == {"conv", "linear"} and any(ls.decides_width for ls in vit.layers)
    mbv2 = space_for(zoo_model("mobilenetv2"))
    assert any(ls.features.op == "dwconv" for ls in mbv2.layers)
    policy = r20.sample(random.Random(0))
    assert r20.validate(policy) is policy


def test_masks_hit_exact_targets() -> None:
    w = torch.randn(16, 12, 3, 3)
    m = unstructured_mask(w, 0.37)
    assert int((~m).sum()) == round(0.37 * w.numel())
    nm = nm_mask(w, 2, 4)
    assert int(nm.permute(0, 2, 3, 1).reshape(16, 3, 3, 3, 4).sum(-1).max()) == 2
    bm = block_mask(w, 8, 0.5)
    blocks = bm.reshape(2, 8, -1)
    assert torch.all(blocks.all(1) | (~blocks).all(1))
    assert int((~blocks).all(1).sum()) == round(0.5 * 2 * 12 * 9)
