"""Power-of-two weights (``"bits": N, "pow2": true``; ``compression.pow2``) on real zoo models.

What a user relies on: every weight of a pow2 layer is 0 or ± its channel's scale times a
power of two, with at most 2^(N-1) - 1 magnitudes; the size counts N-bit codes; masks survive;
OBC rounds onto the same grid; fine-tuning keeps the grid; the ONNX file is float and computes
what was scored; the latency side sees a float layer; and bad policies say what to fix.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from compression import Policy, PolicyError, apply_policy, measure, space_for
from compression.apply import CompressedModel, get_tensor
from compression.data import Dataset, calibration_batches, load_dataset
from compression.distill import DistillConfig, distill
from compression.export_runtimes import int8_layer_names
from compression.mixed_precision import export_policy_onnx
from compression.onnx_export import export_onnx, run_onnx
from compression.pow2 import magnitudes, pow2_quantize, pow2_round, pow2_scale
from compression.scoring import compress
from latency_models.features import encode_layer_policies
from tests.compression.conftest_models import zoo_model


def check_on_grid(w: torch.Tensor, bits: int, where: str) -> None:
    """Each row: 0 or ± (its largest |w|) · 2^-j, j < magnitudes(bits)."""
    rows = w.detach().double().reshape(w.shape[0], -1).abs()
    top = rows.amax(dim=1, keepdim=True)
    live = top[:, 0] > 0
    ratio = rows[live] / top[live]
    nonzero = ratio[ratio > 0]
    exponent = -torch.log2(nonzero)
    assert torch.equal(exponent, exponent.round()), f"{where}: a weight off the power-of-two grid"
    assert int(exponent.max()) < magnitudes(bits), f"{where}: more than 2^(N-1)-1 magnitudes"


def _conv_layers(model_name: str) -> list[str]:
    model = zoo_model(model_name)
    return [ls.name for ls in space_for(model).layers if ls.features.op != "linear"]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_rounding_is_to_the_nearest_level_and_idempotent(bits: int) -> None:
    model = zoo_model("resnet20")
    w = get_tensor(model.gm, model.graph.layers[3].weight).detach()
    scale = pow2_scale(w, bits)
    q = pow2_round(w, scale, bits)
    # brute force: every level of the channel, nearest in value
    m = magnitudes(bits)
    exps = torch.arange(m, dtype=torch.float64)
    flat = w.double().reshape(w.shape[0], -1)
    levels = torch.cat([torch.zeros(w.shape[0], 1), scale[:, None] * 2.0 ** -exps[None, :]], dim=1)
    levels = torch.cat([levels, -levels[:, 1:]], dim=1)  # (O, 2m + 1)
    nearest = (flat[:, :, None] - levels[:, None, :]).abs().min(dim=2).values
    assert torch.allclose((q.reshape(flat.shape) - flat).abs(), nearest, atol=1e-12)
    once = pow2_quantize(w, bits)
    check_on_grid(once, bits, f"{bits} bits")
    assert torch.equal(pow2_quantize(once, bits), once), "rounding a rounded weight changes nothing"


def test_the_chosen_scale_beats_the_largest_weight_as_scale_for_few_bits() -> None:
    # Ternary (2 bits) with scale = max|w| zeroes almost everything; the error search does not.
    model = zoo_model("resnet20")
    w = get_tensor(model.gm, model.graph.layers[5].weight).detach()
    naive = pow2_round(w, w.abs().reshape(w.shape[0], -1).amax(dim=1), 2)
    chosen = pow2_quantize(w, 2)
    assert float(((chosen - w) ** 2).sum()) < 0.9 * float(((naive - w) ** 2).sum())


@pytest.mark.parametrize("bits", [4, 5])
def test_a_pow2_policy_rounds_every_layer_and_counts_its_codes(bits: int) -> None:
    model = zoo_model("resnet20")
    spec = {"scheme": "unstructured", "sparsity": 0.5, "bits": bits}
    uniform = apply_policy(model, Policy.from_dict({"default": spec}))
    pow2 = apply_policy(model, Policy.from_dict({"default": {**spec, "pow2": True}}))
    assert not pow2.bits and set(pow2.pow2) == set(uniform.bits), "pow2 layers are kept apart from int8 ones"
    for target, b in pow2.pow2.items():
        assert b == bits
        w = get_tensor(pow2.gm, target)
        check_on_grid(w, bits, target)
        mask = pow2.masks[target]
        assert torch.all(w[~mask] == 0), f"{target}: the mask survives rounding"
    # N-bit codes and a float32 scale per channel: the size of the uniform N-bit model.
    assert measure(pow2).size_bytes == measure(uniform).size_bytes
    assert measure(pow2).size_bytes < measure(apply_policy(model, Policy.dense())).size_bytes * bits / 16


def test_policy_json_validation_and_identity() -> None:
    with pytest.raises(PolicyError, match=r"pow2 needs bits.*\"bits\": 4, \"pow2\": true"):
        Policy.from_dict({"default": {"pow2": True}})
    with pytest.raises(PolicyError, match="pow2 must be true or false"):
        Policy.from_dict({"default": {"bits": 4, "pow2": "yes"}})
    with pytest.raises(PolicyError, match="layer 'fc': pow2 needs bits"):
        Policy.from_dict(
            {"default": {"bits": 4, "pow2": True}, "layers": {"fc": {"bits": None, "pow2": True}}}
        )
    # A layer made float drops the default's pow2 (nothing left to round).
    p = Policy.from_dict({"default": {"bits": 4, "pow2": True}, "layers": {"fc": {"bits": None}}})
    assert p.for_layer("fc").bits is None and not p.for_layer("fc").pow2
    assert p.for_layer("conv").pow2 and p.for_layer("conv").bits == 4
    assert Policy.from_json(p.to_json()) == p
    # pow2 changes identity; a policy without it keeps its JSON (and hash) from before the field.
    plain = Policy.from_dict({"default": {"bits": 4}})
    assert plain != Policy.from_dict({"default": {"bits": 4, "pow2": True}})
    assert "pow2" not in plain.to_json() and "patterns" not in plain.to_json()


def test_the_onnx_file_is_float_and_computes_what_was_scored(tmp_path: Path) -> None:
    model = zoo_model("resnet20")
    cm = apply_policy(model, Policy.from_dict({"default": {"bits": 4, "pow2": True}}))
    x = model.example_input(4)
    fp32 = export_onnx(cm.gm, x, tmp_path / "fp32.onnx")
    path, precision = export_policy_onnx(cm, fp32, [x.numpy()], tmp_path / "pow2.onnx")
    assert precision == {}, "no pow2 layer goes into an int8 container"
    with torch.no_grad():
        expected = cm.gm(x).numpy()
    np.testing.assert_allclose(run_onnx(path, x.numpy()), expected, rtol=1e-4, atol=1e-4)


def test_the_latency_side_sees_pow2_layers_as_float() -> None:
    model = zoo_model("resnet20")
    space = space_for(model)
    policy = Policy.from_dict(
        {"default": {"bits": 4, "pow2": True}, "layers": {space.layers[1].name: {"bits": 8, "pow2": False}}}
    )
    assert int8_layer_names(space, policy) == [space.layers[1].name]
    enc = encode_layer_policies([policy.for_layer(ls.name) for ls in space.layers])
    assert enc[1, 5] == 8 and all(enc[i, 5] == 0 for i in range(len(space.layers)) if i != 1)


def _grid_of(cm: CompressedModel) -> None:
    for target, bits in cm.pow2.items():
        check_on_grid(get_tensor(cm.gm, target), bits, target)


def _digits16() -> Dataset:
    """The 8×8 digits at the zoo test models' 16×16 (each pixel repeated 2×2)."""
    d = load_dataset("digits")

    def up(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.repeat(2, axis=2).repeat(2, axis=3))

    return Dataset("digits16", up(d.x_train), d.y_train, up(d.x_val), d.y_val)


def test_obc_rounds_onto_the_pow2_grid_and_fine_tuning_keeps_it() -> None:
    model = zoo_model("resnet20")
    data = _digits16()
    calib = calibration_batches(data, 2, 32, seed=0)
    policy = Policy.from_dict({"default": {"bits": 4, "pow2": True, "scheme": "nm", "nm": [2, 4]}})
    with torch.no_grad():
        obc = compress(model, policy, calib, reconstruct=True, recovery="obc")
        rtn = compress(model, policy, calib, reconstruct=True, recovery="magnitude")
    assert obc.pow2 and not obc.bits
    _grid_of(obc)
    differ = sum(not torch.equal(get_tensor(obc.gm, t), get_tensor(rtn.gm, t)) for t in obc.pow2)
    assert differ > len(obc.pow2) // 2, "OBC's rounding is not round-to-nearest"
    distill(obc, model.gm, data, steps=2, config=DistillConfig(batch_size=32))
    _grid_of(obc)
    for target, mask in obc.masks.items():
        assert torch.all(get_tensor(obc.gm, target)[~mask] == 0)
    assert math.isfinite(measure(obc).size_bytes)
