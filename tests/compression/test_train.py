"""Training recipe and the safetensors cache of trained zoo models, on real (small) training runs."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compression.data import Dataset, load_builtin
from compression.train import (
    RECIPE_VERSION,
    RECIPES,
    evaluate_accuracy,
    load_record,
    random_shift,
    train_model,
    trained_model,
)
from compression.zoo import ZOO, build_model, export_model


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_builtin("digits")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _lenet(data: Dataset) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("lenet5", in_channels=1, image_size=data.image_size, num_classes=data.num_classes)


def test_every_zoo_arch_has_a_recipe() -> None:
    assert set(RECIPES) == set(ZOO)


def test_recipes_keep_mnist_settings_and_give_small_data_enough_steps() -> None:
    for arch, recipe in RECIPES.items():
        assert recipe.for_size(7000) == recipe, arch  # written for the MNIST split
        small = recipe.for_size(1257)  # digits
        assert 16 <= small.batch_size <= recipe.batch_size
        assert small.epochs * math.ceil(1257 / small.batch_size) >= recipe.min_steps, arch
    assert "min_steps" not in RECIPES["vit"].train_kwargs()


def test_two_epochs_of_lenet_learn_digits(digits: Dataset) -> None:
    model = _lenet(digits)
    seen: list[tuple[int, int, float]] = []
    acc = train_model(
        model, digits, epochs=2, seed=0, lr=0.05, batch_size=16, progress=lambda *a: seen.append(a)
    )
    assert acc > 0.8
    assert [s[:2] for s in seen] == [(1, 2), (2, 2)] and seen[-1][2] == acc
    assert not model.training
    assert evaluate_accuracy(model, digits.x_val, digits.y_val) == acc


def test_training_is_reproducible_for_a_seed(digits: Dataset) -> None:
    a, b = _lenet(digits), _lenet(digits)
    train_model(a, digits, epochs=1, seed=3, lr=0.05, batch_size=64)
    train_model(b, digits, epochs=1, seed=3, lr=0.05, batch_size=64)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, msg=name)


def test_trained_model_is_cached_as_safetensors_and_reloaded_without_training(
    tmp_path: Path, digits: Dataset
) -> None:
    calls: list[int] = []
    start = time.perf_counter()
    first = trained_model(
        "lenet5", digits, seed=0, cache_dir=tmp_path, progress=lambda e, n, a: calls.append(e)
    )
    train_s = time.perf_counter() - start
    assert calls == list(range(1, RECIPES["lenet5"].for_size(len(digits.x_train)).epochs + 1))
    files = sorted(p.name for p in tmp_path.iterdir())
    stem = f"lenet5-{digits.fingerprint}-s0-r{RECIPE_VERSION}"
    assert files == [f"{stem}.json", f"{stem}.safetensors"]
    record = load_record("lenet5", digits, seed=0, cache_dir=tmp_path)
    assert (
        record is not None
        and record.val_accuracy > 0.9
        and record.recipe == json.loads((tmp_path / f"{stem}.json").read_text())["recipe"]
    )
    assert set(load_file(tmp_path / f"{stem}.safetensors")) == set(first.state_dict())

    calls.clear()
    start = time.perf_counter()
    second = trained_model(
        "lenet5", digits, seed=0, cache_dir=tmp_path, progress=lambda e, n, a: calls.append(e)
    )
    load_s = time.perf_counter() - start
    assert calls == []  # no training on a hit
    assert load_s < train_s / 5
    assert not second.training
    for (name, pa), pb in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert evaluate_accuracy(second, digits.x_val, digits.y_val) == pytest.approx(record.val_accuracy)


def test_another_seed_is_another_cache_entry(tmp_path: Path, digits: Dataset) -> None:
    a = trained_model("lenet5", digits, seed=0, cache_dir=tmp_path)
    b = trained_model("lenet5", digits, seed=1, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert not torch.equal(a.state_dict()["conv1.weight"], b.state_dict()["conv1.weight"])


def test_corrupt_cache_entry_is_retrained(tmp_path: Path, digits: Dataset) -> None:
    good = trained_model("lenet5", digits, seed=0, cache_dir=tmp_path)
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    again = trained_model("lenet5", digits, seed=0, cache_dir=tmp_path)
    assert evaluate_accuracy(again, digits.x_val, digits.y_val) > 0.9
    assert set(load_file(weights)) == set(good.state_dict())  # rewritten, loadable


def test_evaluate_accuracy_works_on_exported_modules(digits: Dataset) -> None:
    model = _lenet(digits)
    train_model(model, digits, epochs=1, seed=0, lr=0.05, batch_size=64)
    exported = export_model(model, torch.from_numpy(digits.x_val[:2])).module()
    eager = evaluate_accuracy(model, digits.x_val, digits.y_val, batch_size=37)
    assert evaluate_accuracy(exported, digits.x_val, digits.y_val) == eager
    with pytest.raises(ValueError, match="non-empty"):
        evaluate_accuracy(model, digits.x_val[:0], digits.y_val[:0])


def test_random_shift_moves_pixels_within_the_limit() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 2, 9, 9)
    x[:, :, 4, 4] = 1.0  # one bright pixel in the middle
    shifted = random_shift(x, 2, gen)
    assert shifted.shape == x.shape
    where = [torch.nonzero(img[0]).tolist() for img in shifted]
    assert all(len(w) == 1 and 2 <= w[0][0] <= 6 and 2 <= w[0][1] <= 6 for w in where)
    assert len({tuple(w[0]) for w in where}) > 10  # offsets differ between images
    torch.testing.assert_close(shifted[:, 0], shifted[:, 1])  # channels move together
    assert torch.equal(random_shift(x, 0, gen), x)


def test_bad_arguments_are_refused(tmp_path: Path, digits: Dataset) -> None:
    with pytest.raises(ValueError, match=r"unknown architecture .resnet18.*resnet20"):
        trained_model("resnet18", digits, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="positive"):
        train_model(_lenet(digits), digits, epochs=0, seed=0, lr=0.1, batch_size=8)
    with pytest.raises(ValueError, match="optimizer"):
        train_model(_lenet(digits), digits, epochs=1, seed=0, lr=0.1, batch_size=8, optimizer="lbfgs")  # type: ignore[arg-type]
