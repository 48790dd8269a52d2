"""Data loaders: the real MNIST split, digits, and every way a user's .npz can be wrong."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import compression.data
from compression.data import (
    DataError,
    Dataset,
    batches,
    calibration_batches,
    load_builtin,
    load_dataset,
    load_npz,
    make_dataset,
    save_npz,
)


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_builtin("mnist")


def _arrays(n: int = 12, size: int = 6, layout: str = "nchw") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    shape = {"nchw": (n, 1, size, size), "nhwc": (n, size, size, 3), "nhw": (n, size, size)}[layout]
    x = rng.integers(0, 256, size=shape, dtype=np.uint8)
    y = np.arange(n, dtype=np.int64) % 3
    return {"x_train": x, "y_train": y, "x_val": x[:5].copy(), "y_val": y[:5].copy()}


def _write(tmp_path: Path, arrays: dict[str, np.ndarray], name: str = "d.npz") -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


# --------------------------------------------------------------------------- built-ins


def test_mnist_is_the_real_test_set_split_7000_1500_1500(mnist: Dataset) -> None:
    assert mnist.x_test is not None
    assert (len(mnist.x_train), len(mnist.x_val), len(mnist.x_test)) == (7000, 1500, 1500)
    assert mnist.x_train.dtype == np.float32 and mnist.y_train.dtype == np.int64
    assert (mnist.in_channels, mnist.image_size, mnist.num_classes) == (1, 28, 10)
    assert abs(float(mnist.x_train.mean())) < 1e-3 and abs(float(mnist.x_train.std()) - 1) < 1e-3
    # every class present in every split, roughly balanced
    for y in (mnist.y_train, mnist.y_val, mnist.y_test):
        assert y is not None
        assert np.bincount(y, minlength=10).min() > 0.06 * len(y)
    # disjoint splits: no image appears in two of them
    seen = {row.tobytes() for row in mnist.x_train}
    assert not any(row.tobytes() in seen for row in mnist.x_val)


def test_builtin_splits_are_deterministic(mnist: Dataset) -> None:
    again = load_builtin("mnist")
    assert again.fingerprint == mnist.fingerprint
    np.testing.assert_array_equal(again.y_val, mnist.y_val)
    digits = load_builtin("digits")
    assert (digits.in_channels, digits.image_size, digits.num_classes) == (1, 8, 10)
    assert digits.x_test is not None
    assert len(digits.x_train) + len(digits.x_val) + len(digits.x_test) == 1797
    assert digits.fingerprint == load_builtin("digits").fingerprint != mnist.fingerprint


# The split the idx files in ../shared gave before MNIST was bundled: cached zoo weights are keyed
# by this fingerprint, so a changed bundle or permutation would silently retrain them.
MNIST_FINGERPRINT = "97d0b67d2d78c116"


def test_mnist_is_bundled_with_its_licence_and_keeps_the_old_split(
    mnist: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert mnist.fingerprint == MNIST_FINGERPRINT
    bundle = Path(compression.data.__file__).parent / "builtin_data"
    assert (bundle / compression.data.MNIST_FILE).stat().st_size < 3_000_000
    notice = (bundle / "NOTICE.txt").read_text()
    assert "LeCun" in notice and "CC BY-SA 3.0" in notice
    # Nothing outside the package is read: an empty cwd and a bogus shared dir change nothing.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MODELTAILOR_SHARED_DIR", str(tmp_path / "absent"))
    assert load_builtin("mnist").fingerprint == MNIST_FINGERPRINT


def test_load_dataset_dispatches_and_refuses_unknown(tmp_path: Path) -> None:
    assert load_dataset("digits").name == "digits"
    path = _write(tmp_path, _arrays())
    assert load_dataset(str(path)).name == "d"
    with pytest.raises(DataError, match="neither a built-in"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="unknown built-in"):
        load_builtin("cifar10")


# --------------------------------------------------------------------------- npz round trip


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nhw"])
def test_npz_layouts_become_float_nchw(tmp_path: Path, layout: str) -> None:
    raw = _arrays(layout=layout)
    data = load_npz(_write(tmp_path, raw))
    channels = 3 if layout == "nhwc" else 1
    assert data.x_train.shape == (12, channels, 6, 6) and data.x_train.dtype == np.float32
    assert data.num_classes == 3 and data.x_test is None
    first = raw["x_train"][0]
    pixel = first[0, 0, 0] if layout == "nhwc" else first.reshape(-1, 6, 6)[0, 0, 0]
    assert data.x_train[0, 0, 0, 0] == pytest.approx(pixel / 255)  # uint8 scaled to [0, 1]


def test_save_and_load_round_trip_keeps_arrays_and_fingerprint(tmp_path: Path) -> None:
    raw = _arrays()
    raw["x_test"], raw["y_test"] = raw["x_val"], raw["y_val"]
    data = make_dataset("mine", **raw)
    back = load_npz(save_npz(data, tmp_path / "mine.npz"))
    assert back.fingerprint == data.fingerprint
    assert back.x_test is not None
    np.testing.assert_array_equal(back.x_train, data.x_train)


def test_float_images_and_integral_float_labels_are_kept(tmp_path: Path) -> None:
    raw = _arrays()
    raw["x_train"] = raw["x_train"].astype(np.float64) - 100.0
    raw["y_train"] = raw["y_train"].astype(np.float32)
    data = load_npz(_write(tmp_path, raw))
    assert data.x_train.min() < 0  # float data is the user's preprocessing, untouched
    assert data.y_train.dtype == np.int64


# --------------------------------------------------------------------------- npz errors


def _bad(**changes: np.ndarray | None) -> dict[str, np.ndarray]:
    raw = _arrays()
    for key, value in changes.items():
        if value is None:
            del raw[key]
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (_bad(y_val=None), "missing key.*y_val"),
        (_bad(y_train=np.arange(11) % 3), "12 images but y_train has 11"),
        (_bad(y_train=np.linspace(0, 2, 12)), "non-integer"),
        (_bad(y_train=np.array([-1] + [1] * 11)), "non-negative"),
        (_bad(y_train=np.ones((12, 1), dtype=np.int64)), "1-D"),
        (_bad(x_train=np.zeros((12, 36), dtype=np.uint8)), "rank 2"),
        (_bad(x_train=np.zeros((12, 1, 6, 6, 1), dtype=np.uint8)), "rank 5"),
        (_bad(x_train=np.full((12, 1, 6, 6), np.nan, dtype=np.float32)), "NaN"),
        (_bad(x_train=np.zeros((0, 1, 6, 6), dtype=np.uint8), y_train=np.zeros(0, np.int64)), "empty"),
        (_bad(x_train=np.zeros((12, 1, 6, 5), dtype=np.uint8)), "square|layout"),
        (_bad(x_train=np.zeros((12, 1, 6, 6), dtype=np.int32)), "uint8 or floating"),
        (_bad(x_val=np.zeros((5, 1, 8, 8), dtype=np.uint8)), "x_val images"),
        (_bad(y_train=np.zeros(12, dtype=np.int64)), "single class"),
        (_bad(x_test=np.zeros((3, 1, 6, 6), dtype=np.uint8)), "together"),
    ],
)
def test_malformed_npz_is_refused_with_a_named_problem(
    tmp_path: Path, raw: dict[str, np.ndarray], needle: str
) -> None:
    path = _write(tmp_path, raw)
    with pytest.raises(DataError, match=needle):
        load_npz(path)


def test_pickled_object_array_is_refused_without_unpickling(tmp_path: Path) -> None:
    raw: dict[str, np.ndarray] = dict(_arrays())
    labels = np.empty(12, dtype=object)
    labels[:] = [{"label": i % 3} for i in range(12)]
    raw["y_train"] = labels
    path = tmp_path / "evil.npz"
    np.savez(path, **raw)  # type: ignore[arg-type]  # numpy pickles object arrays into the zip
    with pytest.raises(DataError, match="object array"):
        load_npz(path)


def test_files_that_are_not_npz_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "data.npz"
    text.write_text("x_train,y_train\n1,2\n")
    with pytest.raises(DataError, match=r"not an \.npz"):
        load_npz(text)
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(DataError, match=r"not an \.npz"):
        load_npz(npy)
    with pytest.raises(DataError, match="not found"):
        load_npz(tmp_path / "absent.npz")
    other_zip = tmp_path / "other.npz"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(DataError, match="missing key"):
        load_npz(other_zip)


def test_dataset_constructor_refuses_raw_arrays() -> None:
    raw = _arrays()
    with pytest.raises(DataError, match="float32"):
        Dataset("raw", raw["x_train"], raw["y_train"], raw["x_val"], raw["y_val"])


# --------------------------------------------------------------------------- batching


def test_batches_cover_every_sample_once_and_shuffle_by_seed(mnist: Dataset) -> None:
    x, y = mnist.x_val[:103], mnist.y_val[:103]
    plain = list(batches(x, y, 25, shuffle=False))
    assert [len(b[0]) for b in plain] == [25, 25, 25, 25, 3]
    assert isinstance(plain[0][0], torch.Tensor) and plain[0][1].dtype == torch.int64
    torch.testing.assert_close(torch.cat([b[0] for b in plain]), torch.from_numpy(x))
    a = torch.cat([b[1] for b in batches(x, y, 25, shuffle=True, seed=3)])
    b = torch.cat([b[1] for b in batches(x, y, 25, shuffle=True, seed=3)])
    c = torch.cat([b[1] for b in batches(x, y, 25, shuffle=True, seed=4)])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sorted(a.tolist()) == sorted(y.tolist())


def test_calibration_batches_come_from_train_and_are_deterministic(mnist: Dataset) -> None:
    cal = calibration_batches(mnist, n_batches=3, batch_size=64, seed=0)
    assert [tuple(t.shape) for t in cal] == [(64, 1, 28, 28)] * 3
    again = calibration_batches(mnist, n_batches=3, batch_size=64, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(cal, again, strict=True))
    train = {row.tobytes() for row in mnist.x_train}
    assert all(row.numpy().tobytes() in train for row in cal[0])
    with pytest.raises(ValueError, match="n_batches"):
        calibration_batches(mnist, n_batches=0, batch_size=64)
