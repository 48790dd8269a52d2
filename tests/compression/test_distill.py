"""Distillation fine-tuning on real trained zoo models: it recovers accuracy, holds masks and
quantizers exactly, and stays finite where plain SGD diverged (88 % block sparsity).

The ResNet-20 tests train it on MNIST through the zoo path (``resolve_model``) on the first
2,000 training images (about a minute on 2 cores), once for the module.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import pytest
import torch

from compression.apply import CompressedModel, get_tensor
from compression.data import Dataset, load_builtin, make_dataset
from compression.distill import DistillConfig, KDBatches, distill, kd_loss, steps_for_epochs
from compression.evaluate import accuracy
from compression.masks import fake_quantize
from compression.model_io import CompressibleModel
from compression.policy import Policy
from compression.resolve import resolve_model
from compression.scoring import compress
from engine.search import Evaluator


@functools.cache
def _mnist_2k() -> Dataset:
    full = load_builtin("mnist")
    n = 2000
    return make_dataset("mnist-2k", full.x_train[:n], full.y_train[:n], full.x_val, full.y_val)


@pytest.fixture(scope="module")
def resnet20(tmp_path_factory: pytest.TempPathFactory) -> tuple[CompressibleModel, Dataset, Evaluator]:
    torch.set_num_threads(1)
    data = _mnist_2k()
    model = resolve_model("resnet20", data, seed=0, cache_dir=tmp_path_factory.mktemp("zoo"))
    return model, data, Evaluator(model, data, lambda _cm: 0.0, seed=0)


@pytest.fixture(scope="module")
def lenet5(tmp_path_factory: pytest.TempPathFactory) -> tuple[CompressibleModel, Dataset, Evaluator]:
    data = load_builtin("digits")
    model = resolve_model("lenet5", data, seed=0, cache_dir=tmp_path_factory.mktemp("zoo"))
    return model, data, Evaluator(model, data, lambda _cm: 0.0, seed=0)


def _built(setup: tuple[CompressibleModel, Dataset, Evaluator], policy: Mapping[str, Any]) -> CompressedModel:
    model, _data, ev = setup
    return compress(model, Policy.from_dict(dict(policy)), ev.calibration, reconstruct=True)


def _all_finite(cm: CompressedModel) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in cm.gm.parameters())


@pytest.mark.slow
def test_fine_tuned_half_width_resnet20_beats_its_one_shot_accuracy(
    resnet20: tuple[CompressibleModel, Dataset, Evaluator],
) -> None:
    model, data, ev = resnet20
    cm = _built(resnet20, {"default": {"width": 0.5}})
    one_shot = accuracy(cm.gm, ev.x_val, ev.y_val)
    config = DistillConfig().for_size(len(data.x_train))
    result = distill(
        cm, model.gm, data, steps_for_epochs(1.5, len(data.x_train), config.batch_size), config=config
    )
    tuned = accuracy(cm.gm, ev.x_val, ev.y_val)
    assert not result.diverged and result.skipped == 0 and result.last_loss < result.first_loss
    # Seeded and single-threaded, so deterministic; on this 2,000-image model the one-shot
    # half width already keeps 97.7 % (the full MNIST model: 96.6 -> 98.1 %, bench/RESULTS.md).
    assert tuned > one_shot, (one_shot, tuned)
    assert all(not p.requires_grad for p in cm.gm.parameters())  # back to an inference graph


@pytest.mark.slow
def test_88_percent_block_sparsity_stays_finite_with_masks_exact(
    resnet20: tuple[CompressibleModel, Dataset, Evaluator],
) -> None:
    """The case the old export fine-tune (SGD at 0.01, no clipping) turned to NaN."""
    model, data, ev = resnet20
    cm = _built(resnet20, {"default": {"scheme": "block", "sparsity": 0.88, "block": 8}})
    assert cm.masks
    kept = {t: get_tensor(cm.gm, t).clone() for t in cm.masks}
    one_shot = accuracy(cm.gm, ev.x_val, ev.y_val)
    for config in (DistillConfig(batch_size=50), DistillConfig(batch_size=50, optimizer="sgd", lr=0.05)):
        result = distill(cm, model.gm, data, 25, config=config)
        assert not result.diverged and _all_finite(cm), config
        for target, mask in cm.masks.items():
            w = get_tensor(cm.gm, target)
            assert not bool(w[~mask].any()), f"{target}: a pruned block came back"
            assert not torch.equal(w, kept[target]), f"{target}: the kept blocks did not train"
    assert accuracy(cm.gm, ev.x_val, ev.y_val) > one_shot


def test_masks_hold_exactly_and_quantized_layers_stay_on_their_grid(
    lenet5: tuple[CompressibleModel, Dataset, Evaluator],
) -> None:
    model, data, _ev = lenet5
    policy = {"default": {"scheme": "nm", "nm": [2, 4], "bits": 4}, "layers": {}}
    cm = _built(lenet5, policy)
    assert cm.masks and cm.bits
    before = {t: get_tensor(cm.gm, t).clone() for t in cm.bits}
    distill(cm, model.gm, data, 30, config=DistillConfig(batch_size=32))
    moved = 0
    for target, bits in cm.bits.items():
        w = get_tensor(cm.gm, target)
        assert torch.equal(w, fake_quantize(w, bits)), f"{target} left the {bits}-bit grid"
        levels = w.reshape(w.shape[0], -1)
        assert max(len(torch.unique(row)) for row in levels) <= 2**bits - 1
        mask = cm.masks.get(target)
        assert mask is None or not bool(w[~mask].any()), f"{target}: a masked weight came back"
        moved += int(not torch.equal(w, before[target]))
    assert moved, "QAT moved no quantized weight (the straight-through gradient is lost)"


def test_masked_float_layers_keep_their_zeros_and_others_train(
    lenet5: tuple[CompressibleModel, Dataset, Evaluator],
) -> None:
    model, data, ev = lenet5
    cm = _built(lenet5, {"default": {"scheme": "unstructured", "sparsity": 0.8}})
    params = {n: p.clone() for n, p in cm.gm.named_parameters()}
    result = distill(cm, model.gm, data, 20, config=DistillConfig(batch_size=32))
    assert result.steps == 20 and not result.diverged
    for target, mask in cm.masks.items():
        w = get_tensor(cm.gm, target)
        assert int((w != 0).sum()) <= int(mask.sum()) and not bool(w[~mask].any())
    changed = [n for n, p in cm.gm.named_parameters() if not torch.equal(p, params[n])]
    assert changed  # biases and the kept weights learned
    assert 0.0 <= accuracy(cm.gm, ev.x_val, ev.y_val) <= 1.0


def test_teacher_logits_are_computed_once_for_every_student(
    lenet5: tuple[CompressibleModel, Dataset, Evaluator],
) -> None:
    model, data, _ev = lenet5
    calls = [0]

    def teacher(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return model.gm(x)

    batches = KDBatches(teacher, data, batch_size=32, seed=3)  # type: ignore[arg-type]
    for policy in ({"default": {"width": 0.5}}, {"default": {"scheme": "nm", "nm": [2, 4]}}):
        distill(_built(lenet5, policy), None, batches, 12, config=DistillConfig(batch_size=32, seed=3))
    assert calls[0] == 12
    x0, y0, t0 = batches[5]
    x1, y1, t1 = KDBatches(model.gm, data, batch_size=32, seed=3)[5]
    assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.allclose(t0, t1)  # replayable by step


def test_a_non_finite_start_is_skipped_and_restored_not_propagated(
    lenet5: tuple[CompressibleModel, Dataset, Evaluator],
) -> None:
    model, data, _ev = lenet5
    cm = _built(lenet5, {"default": {"width": 0.5}})
    first = next(p for p in cm.gm.parameters() if p.ndim > 1)
    with torch.no_grad():
        first.view(-1)[0] = float("nan")  # a broken weight: every loss is NaN
    saved = [p.clone() for p in cm.gm.parameters()]
    result = distill(cm, model.gm, data, 5, config=DistillConfig(batch_size=32))
    assert result.diverged and result.skipped >= 1
    for p, s in zip(cm.gm.parameters(), saved, strict=True):
        assert torch.equal(torch.nan_to_num(p, nan=7.0), torch.nan_to_num(s, nan=7.0))


def test_kd_loss_is_zero_kl_when_student_matches_teacher_and_bad_input_is_named() -> None:
    logits = torch.randn(8, 10)
    labels = logits.argmax(dim=1)
    assert float(kd_loss(logits, logits, labels, 4.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    mixed = float(kd_loss(logits, logits, labels, 4.0, 0.5))
    ce = float(torch.nn.functional.cross_entropy(logits, labels))
    assert mixed == pytest.approx(0.5 * ce, rel=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        DistillConfig(alpha=1.5)
    with pytest.raises(ValueError, match="optimizer"):
        DistillConfig(optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epochs"):
        steps_for_epochs(0.0, 100, 10)
    assert steps_for_epochs(2.0, 7000, 128) == 110


def test_distill_without_a_teacher_for_a_data_set_says_what_is_missing(
    lenet5: tuple[CompressibleModel, Dataset, Evaluator],
) -> None:
    model, data, _ev = lenet5
    cm = _built(lenet5, {"default": {"width": 0.5}})
    with pytest.raises(ValueError, match="teacher"):
        distill(cm, None, data, 3)
    with pytest.raises(ValueError, match="steps"):
        distill(cm, model.gm, data, 0)
