"""One-shot second-order recovery (``compression.obc``) on real trained zoo models.

The ViT is the zoo's, trained on the 8x8 digits in the session; every claim is about what a
user gets from ``compress(..., recovery="obc")``: closer to the dense model than magnitude
masks and round-to-nearest, masks that satisfy their scheme exactly, zeros that quantization
keeps, the same model every time (and from the cache), and a search and export that use it.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from compression import schemes
from compression.apply import CompressedModel, get_tensor
from compression.data import Dataset, calibration_batches, load_dataset
from compression.evaluate import accuracy, predict
from compression.masks import fake_quantize
from compression.model_io import CompressibleModel, from_module
from compression.obc import ObcCache, obs_compress, recover
from compression.policy import Policy
from compression.reconstruct import after_skipped
from compression.scoring import compress
from compression.space_builder import space_for
from compression.train import trained_model
from tests.compression.conftest_models import zoo_model


@functools.cache
def _digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> CompressibleModel:
    data = _digits()
    module = trained_model("vit", data, seed=0, cache_dir=tmp_path_factory.mktemp("zoo"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return from_module(module, torch.from_numpy(data.x_val[:2]), "vit")


@pytest.fixture(scope="module")
def calib() -> list[torch.Tensor]:
    return calibration_batches(_digits(), 4, 64, seed=0)


def _linear_policy(model: CompressibleModel, spec: dict[str, object]) -> Policy:
    names = [ls.name for ls in space_for(model).layers if ls.features.op == "linear"]
    return Policy.from_dict({"layers": {name: spec for name in names}})


def _kl_to_dense(model: CompressibleModel, cm: CompressedModel) -> float:
    """Mean KL divergence of the compressed model's predictions from the dense model's (val set)."""
    x = _digits().x_val
    dense = torch.log_softmax(predict(model.gm, x), dim=-1)
    ours = torch.log_softmax(predict(cm.gm, x), dim=-1)
    return float(torch.nn.functional.kl_div(ours, dense, log_target=True, reduction="batchmean"))


def _both(
    model: CompressibleModel, policy: Policy, calib: list[torch.Tensor]
) -> tuple[CompressedModel, CompressedModel]:
    with torch.no_grad():
        mag = compress(model, policy, calib, reconstruct=True, recovery="magnitude")
        obc = compress(model, policy, calib, reconstruct=True, recovery="obc")
    return mag, obc


@pytest.mark.slow  # the module's ViT trains on digits first (about a minute on 2 idle cores)
@pytest.mark.parametrize(
    "spec", [{"scheme": "nm", "nm": [2, 4]}, {"bits": 4}], ids=["2:4 sparsity", "4-bit weights"]
)
def test_obc_stays_closer_to_the_dense_vit_than_magnitude(
    vit: CompressibleModel, calib: list[torch.Tensor], spec: dict[str, object]
) -> None:
    data = _digits()
    policy = _linear_policy(vit, spec)
    mag, obc = _both(vit, policy, calib)
    dense_acc = accuracy(vit.gm, data.x_val, data.y_val)
    acc_mag = accuracy(mag.gm, data.x_val, data.y_val)
    acc_obc = accuracy(obc.gm, data.x_val, data.y_val)
    assert dense_acc > 0.85  # the ViT really learned digits
    assert _kl_to_dense(vit, obc) < 0.7 * _kl_to_dense(vit, mag)
    assert acc_obc >= acc_mag, (acc_obc, acc_mag)
    # Same size: the mask keeps as many weights and the bits are the same.
    assert {k: int(m.sum()) for k, m in obc.masks.items()} == {k: int(m.sum()) for k, m in mag.masks.items()}
    assert obc.bits == mag.bits


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    [
        {"scheme": "nm", "nm": [2, 4], "bits": 4},
        {"scheme": "nm", "nm": [1, 4]},
        {"scheme": "unstructured", "sparsity": 0.63, "bits": 3},
        {"scheme": "block", "block": 8, "sparsity": 0.5, "bits": 8},
    ],
    ids=["2:4 + 4 bits", "1:4", "unstructured 63 % + 3 bits", "1x8 blocks + 8 bits"],
)
def test_masks_satisfy_their_scheme_exactly_and_quantization_keeps_the_zeros(
    vit: CompressibleModel, calib: list[torch.Tensor], spec: dict[str, object]
) -> None:
    policy = _linear_policy(vit, spec)
    with torch.no_grad():
        cm = compress(vit, policy, calib, recovery="obc")
    assert cm.masks and len(cm.masks) == len(policy.layers)
    for name, target in cm.layer_weights.items():
        if name not in policy.layers:
            continue
        lp = policy.for_layer(name)
        scheme = schemes.get(lp.scheme)
        mask, w = cm.masks[target], get_tensor(cm.gm, target)
        # A mask the scheme itself would produce: its own mask of the mask is the mask (N per
        # M-run, whole blocks, exactly round(s * numel) zeros or round(s * blocks) blocks).
        again = scheme.mask(mask.float(), lp)
        assert again is not None and torch.equal(again, mask), name
        assert torch.all(w[~mask] == 0), f"{name}: a pruned weight is not zero"
        if lp.bits is not None:
            # On fake_quantize's grid: quantizing again changes nothing (up to float rounding).
            assert torch.allclose(fake_quantize(w, lp.bits), w, rtol=0, atol=1e-6 * float(w.abs().max()))
            scale = w.abs().amax(dim=1, keepdim=True) / (2 ** (lp.bits - 1) - 1)
            levels = w / scale.clamp(min=1e-12)
            assert torch.allclose(levels, levels.round(), atol=1e-3)


@pytest.mark.slow
def test_the_same_policy_gives_the_same_model_with_and_without_the_cache(
    vit: CompressibleModel, calib: list[torch.Tensor]
) -> None:
    names = [ls.name for ls in space_for(vit).layers if ls.features.op == "linear"]
    first = Policy.from_dict({"layers": {n: {"scheme": "nm", "nm": [2, 4], "bits": 4} for n in names}})
    # The same choices on the first half of the layers, others on the rest.
    second = Policy.from_dict(
        {
            "layers": {
                n: {"scheme": "nm", "nm": [2, 4], "bits": 4 if i < 12 else 8} for i, n in enumerate(names)
            }
        }
    )
    cache = ObcCache()
    with torch.no_grad():
        plain = compress(vit, first, calib, recovery="obc")
        again = compress(vit, first, calib, recovery="obc")
        cached = compress(vit, first, calib, recovery="obc", cache=cache)
        hit = compress(vit, first, calib, recovery="obc", cache=cache)
        assert cache.hits == len(names)  # every layer of the repeated policy came from the cache
        mixed = compress(vit, second, calib, recovery="obc", cache=cache)
        mixed_plain = compress(vit, second, calib, recovery="obc")
    assert cache.hits == 2 * len(names) - (len(names) - 12)  # the shared prefix of 12 layers only
    x = torch.from_numpy(_digits().x_val[:64])
    for other in (again, cached, hit):
        for target in plain.layer_weights.values():
            assert torch.equal(get_tensor(plain.gm, target), get_tensor(other.gm, target))
        assert torch.equal(plain.gm(x), other.gm(x))
    assert torch.equal(mixed.gm(x), mixed_plain.gm(x))


def test_obs_on_a_layer_compensates_with_the_remaining_weights_and_the_bias() -> None:
    gen = torch.Generator().manual_seed(0)
    # Correlated inputs, as a layer's are: 8 underlying directions and a little noise.
    x = torch.randn(2048, 8, generator=gen) @ torch.randn(8, 32, generator=gen)
    x = x + 0.1 * torch.randn(2048, 32, generator=gen)
    w, b = torch.randn(16, 32, generator=gen), torch.randn(16, generator=gen)
    xb = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    hessian = 2 * xb.T.double() @ xb.double()
    lp = Policy.from_dict({"default": {"scheme": "unstructured", "sparsity": 0.5}}).default

    def select(sal: torch.Tensor) -> torch.Tensor:
        mask = schemes.get("unstructured").mask(sal, lp)
        assert mask is not None
        return mask

    solved = obs_compress(w, hessian, select=select, bits=None, bias=b)
    assert solved is not None
    new_w, new_b, mask = solved
    assert mask is not None and new_b is not None and int(mask.sum()) == w.numel() // 2
    ref = x @ w.T + b
    magnitude = schemes.get("unstructured").mask(w, lp)
    assert magnitude is not None
    err_obs = float(((x @ new_w.T + new_b) - ref).pow(2).mean())
    err_mag = float(((x @ (w * magnitude).T + b) - ref).pow(2).mean())
    assert err_obs < 0.2 * err_mag
    # Nothing to do: the weights come back unchanged.
    same = obs_compress(w, hessian, bias=b)
    assert same is not None and same[1] is not None
    assert torch.allclose(same[0], w, atol=1e-5) and torch.allclose(same[1], b, atol=1e-4)


def test_a_skipped_block_refits_the_layers_after_it() -> None:
    model = zoo_model("resnet20")
    policy = Policy.from_dict({"skip": ["layer1.1"]})
    names = {layer.node: layer.name for layer in model.graph.layers}
    cm = compress(model, Policy.dense(), [])  # nothing skipped: nothing after a skip
    assert after_skipped(cm) == set()
    with torch.no_grad():
        cm = compress(model, policy, [model.example_input(8)], reconstruct=True, recovery="obc")
    after = {names[n] for n in after_skipped(cm)}
    assert after == {"layer1.2.conv1"}
    stats = recover(cm, [model.example_input(8)])
    assert stats.refitted == 1 and stats.compressed == 0


def test_unknown_recovery_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="recovery must be one of"):
        compress(zoo_model("lenet5"), Policy.dense(), [], recovery="optimal")  # type: ignore[arg-type]


def test_a_job_with_obc_recovery_runs_and_exports_the_model_it_scored(tmp_path: Path) -> None:
    from engine.executors import InProcessExecutor
    from engine.job import (
        DatasetRef,
        DeviceRef,
        ExportContext,
        JobContext,
        ModelRef,
        Scores,
        export_candidate,
        run_job,
    )
    from engine.spec import JobSpec

    spec = JobSpec.model_validate(
        {
            "model_id": 1,
            "dataset_id": 1,
            "device_id": 1,
            "algorithm": "random",
            "space": {"schemes": ["nm", "unstructured"], "bits": [None], "width": False, "depth": False},
            "budget": {"candidates": 3},
            "remeasure_top_k": 0,
        }
    )
    assert spec.recovery == "obc"  # the default
    model = ModelRef(id=1, name="lenet5", path=None, zoo="lenet5", sha256=None)
    dataset = DatasetRef(id=1, name="digits", path=None, builtin="digits")
    device = DeviceRef(id=1, name="cpu-ort-1t", kind="local", runtime="onnxruntime", threads=1, settings={})
    stored: list[tuple[dict[str, object], Scores]] = []

    def persist(policy: dict[str, object], policy_hash: str, scores: Scores, agent_state: object) -> bool:
        stored.append((policy, scores))
        return True

    ctx = JobContext(
        job_id=1,
        spec=spec,
        model=model,
        dataset=dataset,
        device=device,
        data_dir=tmp_path,
        agent_state=None,
        done=[],
        persist_candidate=persist,
        progress=lambda _kind, _data: None,
        set_baseline=lambda _scores: None,
        should_stop=lambda: False,
        make_executor=lambda init, args: InProcessExecutor(init, args),
    )
    run_job(ctx)
    assert len(stored) == 3 and all(s.accuracy is not None and not s.extra.get("error") for _, s in stored)
    policy, scores = max(stored, key=lambda item: item[1].accuracy or 0.0)
    result = export_candidate(
        ExportContext(
            artifact_id=1,
            policy=policy,
            scores=scores,
            job_spec=spec,
            model=model,
            dataset=dataset,
            device=device,
            int8=False,
            finetune_epochs=0,
            out_path=tmp_path / "best.onnx",
            data_dir=tmp_path,
            progress=lambda _data: None,
        )
    )
    # The export builds the model the search scored: same accuracy on the same images (the
    # search's validation subset is every digits validation image).
    assert len(_digits().x_val) <= 1000
    assert abs(float(result.metrics["accuracy"]) - float(np.float64(scores.accuracy))) <= 1.0 / len(
        _digits().x_val
    )
