"""Data sets: the built-in MNIST split and digits, and users' .npz files, validated.

A :class:`Dataset` holds float32 NCHW images and int64 labels for train / val and
an optional test split. Everything that reaches the rest of modeltailor went
through :func:`make_dataset`'s checks, so later stages never meet a bad array.

Built-in splits (fixed seed permutations, so every machine gets the same split):

* ``mnist``: the 10,000 real MNIST test images, bundled as package data
  (``compression/builtin_data/mnist_t10k.npz``, licence in ``NOTICE.txt`` beside
  it), permuted with seed 0 into train 7,000 / val 1,500 / test 1,500 images;
  pixels scaled to [0, 1], then standardised with the train split's mean and std.
* ``digits``: scikit-learn's 1,797 8x8 digits, permuted with seed 0 into train
  1,257 / val 270 / test 270; pixels scaled to [0, 1] (divided by 16), then
  standardised with the train split's mean and std.

User .npz files: ``x_*`` as N x C x H x W, N x H x W x C (C <= 4) or N x H x W
(grayscale); uint8 images are scaled to [0, 1], float images are kept as given
(the user's own preprocessing, which their uploaded model expects). Images must
be square. Labels are non-negative integers (integral floats are accepted).
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from compression.archive_check import ArchiveError, ArchiveLimitError, ArchiveLimits, read_npz

__all__ = [
    "BUILTINS",
    "DataError",
    "DataTooLargeError",
    "Dataset",
    "batches",
    "calibration_batches",
    "load_builtin",
    "load_dataset",
    "load_npz",
    "make_dataset",
    "save_npz",
]

BUILTINS: tuple[str, ...] = ("mnist", "digits")
SPLIT_SEED = 0
MNIST_SPLIT = (7_000, 1_500, 1_500)
MNIST_FILE = "mnist_t10k.npz"  # in compression/builtin_data/: uint8 images, labels
_REQUIRED_KEYS = ("x_train", "y_train", "x_val", "y_val")
_OPTIONAL_KEYS = ("x_test", "y_test")
_MAX_CHANNELS = 4


class DataError(ValueError):
    """A data set is missing, malformed or inconsistent; the message names the problem."""


class DataTooLargeError(DataError):
    """An .npz is over a size limit (unpacked bytes or elements; the message names the setting)."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images (float32, N x C x H x W) and labels (int64) of one data set's splits.

    Build it with :func:`make_dataset`, which validates and converts raw arrays; the
    constructor only checks that the arrays already have the final dtypes and shapes.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.x_test is None) != (self.y_test is None):
            raise DataError("x_test and y_test must be given together")
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x is None:
                continue
            if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4:
                raise DataError(
                    f"x_{split} must be a float32 N x C x H x W array (use make_dataset to convert)"
                )
            if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.ndim != 1:
                raise DataError(f"y_{split} must be a 1-D int64 array (use make_dataset to convert)")
            if len(x) != len(y) or len(x) == 0:
                raise DataError(
                    f"x_{split} / y_{split}: {len(x)} images and {len(y)} labels (non-empty, equal)"
                )
            if x.shape[1:] != self.x_train.shape[1:]:
                raise DataError(
                    f"x_{split} images are {x.shape[1:]} but x_train images are {self.x_train.shape[1:]}"
                )

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[2])

    @property
    def num_classes(self) -> int:
        """Largest label over all splits + 1 (labels are class indices)."""
        labels = [self.y_train, self.y_val] + ([self.y_test] if self.y_test is not None else [])
        return max(int(y.max()) for y in labels) + 1

    @cached_property
    def fingerprint(self) -> str:
        """Short sha256 of every array (shape, dtype, bytes): the cache key of trained weights."""
        h = hashlib.sha256()
        for key in _REQUIRED_KEYS + _OPTIONAL_KEYS:
            arr = getattr(self, key)
            h.update(key.encode())
            if arr is None:
                h.update(b"none")
                continue
            h.update(f"{arr.dtype.str}{arr.shape}".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]

    def arrays(self) -> dict[str, np.ndarray]:
        """The splits as a name -> array dict (the .npz layout), test only when present."""
        out = {k: getattr(self, k) for k in _REQUIRED_KEYS}
        if self.x_test is not None and self.y_test is not None:
            out["x_test"], out["y_test"] = self.x_test, self.y_test
        return out


# --------------------------------------------------------------------------- validation


def _images(key: str, arr: np.ndarray) -> np.ndarray:
    """Validate one image array and return it as float32 NCHW."""
    if arr.dtype == object:
        raise DataError(f"{key}: object arrays are not accepted (pickled data)")
    if arr.ndim == 3:
        arr = arr[:, None, :, :]
    elif arr.ndim == 4:
        if arr.shape[2] == arr.shape[3] and arr.shape[1] <= _MAX_CHANNELS:
            pass  # NCHW
        elif arr.shape[1] == arr.shape[2] and arr.shape[3] <= _MAX_CHANNELS:
            arr = arr.transpose(0, 3, 1, 2)  # NHWC
        else:
            raise DataError(
                f"{key}: cannot tell the layout of shape {arr.shape}; expected square images as "
                f"N x C x H x W or N x H x W x C with C <= {_MAX_CHANNELS}"
            )
    else:
        raise DataError(
            f"{key}: images must have rank 3 (N x H x W) or 4 (NCHW / NHWC), got rank {arr.ndim} "
            f"with shape {arr.shape}"
        )
    if arr.shape[0] == 0:
        raise DataError(f"{key}: empty (0 images)")
    if arr.shape[2] != arr.shape[3]:
        raise DataError(f"{key}: images must be square, got {arr.shape[2]} x {arr.shape[3]}")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise DataError(f"{key}: images have a zero-sized dimension, shape {arr.shape}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr, dtype=np.float32) / np.float32(255.0)
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{key}: images must be uint8 or floating point, got dtype {arr.dtype}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise DataError(f"{key}: contains NaN or infinite values")
    return out


def _labels(key: str, arr: np.ndarray) -> np.ndarray:
    """Validate one label array and return it as int64."""
    if arr.dtype == object:
        raise DataError(f"{key}: object arrays are not accepted (pickled data)")
    if arr.ndim != 1:
        raise DataError(f"{key}: labels must be a 1-D array, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise DataError(f"{key}: empty (0 labels)")
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise DataError(f"{key}: labels must be integers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise DataError(f"{key}: labels contain NaN or infinite values")
        if not np.array_equal(arr, np.round(arr)):
            raise DataError(f"{key}: labels must be integers, found non-integer values")
    out = arr.astype(np.int64)
    if (out < 0).any():
        raise DataError(f"{key}: labels must be non-negative class indices, found {int(out.min())}")
    return out


def make_dataset(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
) -> Dataset:
    """Validate and normalise raw arrays into a :class:`Dataset`.

    Raises:
        DataError: naming the array and the problem (rank, dtype, NaN, lengths, ...).
    """
    if (x_test is None) != (y_test is None):
        raise DataError("x_test and y_test must be given together (one of them is missing)")
    raw = {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val}
    if x_test is not None and y_test is not None:
        raw["x_test"], raw["y_test"] = x_test, y_test
    for key, value in raw.items():
        if not isinstance(value, np.ndarray):
            raise DataError(f"{key}: expected a numpy array, got {type(value).__name__}")
    clean: dict[str, np.ndarray] = {}
    for split in ("train", "val", "test"):
        if f"x_{split}" not in raw:
            continue
        xs = _images(f"x_{split}", raw[f"x_{split}"])
        ys = _labels(f"y_{split}", raw[f"y_{split}"])
        if len(xs) != len(ys):
            raise DataError(f"x_{split} has {len(xs)} images but y_{split} has {len(ys)} labels")
        clean[f"x_{split}"], clean[f"y_{split}"] = xs, ys
    ref = clean["x_train"].shape[1:]
    for split in ("val", "test"):
        if f"x_{split}" in clean and clean[f"x_{split}"].shape[1:] != ref:
            raise DataError(
                f"x_{split} images have shape {clean[f'x_{split}'].shape[1:]} (C, H, W) but x_train has {ref}"
            )
    if len(np.unique(clean["y_train"])) < 2:
        raise DataError("y_train holds a single class; classification needs at least two")
    return Dataset(name=name, **clean)


# --------------------------------------------------------------------------- built-ins


def _standardised_split(name: str, x: np.ndarray, y: np.ndarray, sizes: tuple[int, int, int]) -> Dataset:
    """Permute with :data:`SPLIT_SEED`, split, and standardise with the train split's stats."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_train, n_val, n_test = sizes
    parts = np.split(order, [n_train, n_train + n_val, n_train + n_val + n_test])[:3]
    x_train = x[parts[0]]
    mean = np.float32(x_train.mean())
    std = np.float32(x_train.std())

    def norm(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((a - mean) / std, dtype=np.float32)

    return Dataset(
        name=name,
        x_train=norm(x_train),
        y_train=y[parts[0]].astype(np.int64),
        x_val=norm(x[parts[1]]),
        y_val=y[parts[1]].astype(np.int64),
        x_test=norm(x[parts[2]]),
        y_test=y[parts[2]].astype(np.int64),
    )


def _load_mnist() -> Dataset:
    # Package data, not a path next to the checkout: a wheel install has no repo around it.
    source = resources.files("compression").joinpath("builtin_data", MNIST_FILE)
    if not source.is_file():
        raise DataError(f"bundled MNIST file missing from the installation: {source} (reinstall modeltailor)")
    with source.open("rb") as f, np.load(f, allow_pickle=False) as npz:
        images, labels = npz["images"], npz["labels"]
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or len(images) < sum(MNIST_SPLIT):
        raise DataError(f"{source}: unexpected MNIST shapes {images.shape} / {labels.shape}")
    x = images[:, None, :, :].astype(np.float32) / np.float32(255.0)
    return _standardised_split("mnist", x, labels, MNIST_SPLIT)


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0))[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    n_val = n_test = round(0.15 * len(x))
    return _standardised_split("digits", x, y, (len(x) - n_val - n_test, n_val, n_test))


def load_builtin(name: str) -> Dataset:
    """Load a built-in data set by name (see the module docstring for the splits).

    Raises:
        DataError: unknown name (the message lists the built-ins) or missing files.
    """
    if name == "mnist":
        return _load_mnist()
    if name == "digits":
        return _load_digits()
    raise DataError(f"unknown built-in data set {name!r}; built-ins are: {', '.join(BUILTINS)}")


# --------------------------------------------------------------------------- .npz files


def load_npz(path: str | Path, *, name: str | None = None, limits: ArchiveLimits | None = None) -> Dataset:
    """Load and validate a user's .npz (``x_train, y_train, x_val, y_val``, optional test).

    Never unpickles (object arrays are refused) and never inflates more than the archive
    declares: every ``.npy`` header is checked against its member's size and ``limits``
    (None: no size limit) before any array is read
    (:func:`compression.archive_check.read_npz`).

    Raises:
        DataTooLargeError: over one of ``limits``.
        DataError: not a file, not an npz/zip, a missing key, or any array problem.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz (zip) file")
    try:
        arrays, names = read_npz(path, _REQUIRED_KEYS + _OPTIONAL_KEYS, limits or ArchiveLimits())
    except ArchiveLimitError as exc:
        raise DataTooLargeError(f"{path}: {exc}") from None
    except ArchiveError as exc:
        raise DataError(f"{path}: {exc}") from None
    missing = [k for k in _REQUIRED_KEYS if k not in arrays]
    if missing:
        raise DataError(
            f"{path}: missing key(s) {', '.join(missing)}; an .npz needs "
            f"{', '.join(_REQUIRED_KEYS)} (x_test, y_test optional); found: {', '.join(names)}"
        )
    return make_dataset(name or path.stem, **arrays)


def save_npz(dataset: Dataset, path: str | Path) -> Path:
    """Write ``dataset`` as an uncompressed .npz in the layout :func:`load_npz` reads."""
    path = Path(path)
    np.savez(path, **dataset.arrays())  # type: ignore[arg-type]
    return path


def load_dataset(spec: str | Path) -> Dataset:
    """``"mnist"`` / ``"digits"`` or a path to an .npz file.

    Raises:
        DataError: neither a built-in name nor an existing file, or a bad file.
    """
    text = str(spec)
    if text in BUILTINS:
        return load_builtin(text)
    path = Path(text).expanduser()
    if path.is_file() or text.endswith(".npz"):
        return load_npz(path)
    raise DataError(f"{text!r} is neither a built-in data set ({', '.join(BUILTINS)}) nor an .npz file")


# --------------------------------------------------------------------------- batching


def batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)`` tensors; the last batch may be smaller.

    ``seed`` fixes the shuffle order so an epoch is reproducible.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    order = np.random.default_rng(seed).permutation(len(x)) if shuffle else np.arange(len(x))
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        yield torch.from_numpy(np.ascontiguousarray(x[idx])), torch.from_numpy(np.ascontiguousarray(y[idx]))


def calibration_batches(
    dataset: Dataset, n_batches: int, batch_size: int, seed: int = 0
) -> list[torch.Tensor]:
    """``n_batches`` input batches drawn from the train split, for BatchNorm recalibration.

    Images are drawn without replacement while the split lasts, then the draw wraps.
    """
    if n_batches < 1 or batch_size < 1:
        raise ValueError(f"n_batches and batch_size must be >= 1, got {n_batches} and {batch_size}")
    n = len(dataset.x_train)
    need = n_batches * batch_size
    order = np.random.default_rng(seed).permutation(n)
    idx = np.resize(order, need)
    return [
        torch.from_numpy(dataset.x_train[idx[i * batch_size : (i + 1) * batch_size]])
        for i in range(n_batches)
    ]
