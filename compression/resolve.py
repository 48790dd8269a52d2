"""Turn what a user names (a zoo architecture or a ``.pt2`` path) into a model."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from compression.data import Dataset
from compression.model_io import CompressibleModel, from_module, load_pt2
from compression.train import ProgressFn, trained_model
from compression.zoo import ZOO


def data_dir() -> Path:
    """``$MODELTAILOR_DATA_DIR`` or ``~/.modeltailor``: caches, databases, artifacts."""
    return Path(os.environ.get("MODELTAILOR_DATA_DIR") or Path.home() / ".modeltailor")


def resolve_model(
    spec: str | Path,
    dataset: Dataset,
    *,
    seed: int = 0,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
) -> CompressibleModel:
    """A zoo name is trained on ``dataset`` on first use (cached); anything else is a .pt2 path.

    Raises:
        ModelLoadError: the path is not a loadable export archive.
        ValueError: the model's input does not fit the data set's images.
    """
    text = str(spec)
    if text in ZOO:
        module = trained_model(
            text, dataset, seed=seed, cache_dir=cache_dir or data_dir() / "zoo", progress=progress
        )
        example = torch.from_numpy(dataset.x_val[:2])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = from_module(module, example, text)
    else:
        model = load_pt2(text)
    expected = tuple(dataset.x_val.shape[1:])
    if model.input_shape != expected:
        raise ValueError(
            f"model {model.name} expects inputs of shape {model.input_shape} but the data set's images "
            f"are {expected}"
        )
    return model
