"""Training recipe for zoo models, and a safetensors cache of trained weights.

The recipe: SGD with Nesterov momentum (AdamW for the ViT) under a OneCycle
schedule, label smoothing 0.05, no weight decay on biases and norm scales, and
random shifts of up to ±2 px at 28x28 (scaled with the image size) done in torch:
cheap, and the one augmentation that helps digits without changing their meaning
(no flips, no rotations).

Trained weights are cached under ``cache_dir`` by (arch, data fingerprint, seed,
recipe version) as ``.safetensors`` plus a JSON sidecar; nothing is pickled.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from compression.data import Dataset, batches
from compression.zoo import ZOO, build_model

__all__ = [
    "RECIPES",
    "RECIPE_VERSION",
    "ProgressFn",
    "Recipe",
    "TrainRecord",
    "cache_key",
    "evaluate_accuracy",
    "load_record",
    "random_shift",
    "shift_px_for",
    "train_model",
    "trained_model",
]

# Bump when the recipe or the zoo's architectures change: old cache entries stop matching.
RECIPE_VERSION = 1
LABEL_SMOOTHING = 0.05

Optimizer = Literal["sgd", "adamw"]
ProgressFn = Callable[[int, int, float], None]
"""Called after each epoch with (epoch starting at 1, epochs, validation accuracy)."""


@dataclass(frozen=True)
class Recipe:
    """One architecture's default training settings, written for the MNIST split (7,000 images).

    Attributes:
        epochs: passes over the train split.
        lr: peak learning rate of the OneCycle schedule.
        batch_size: images per step.
        optimizer: "sgd" (Nesterov momentum 0.9) or "adamw".
        weight_decay: applied to conv / linear weights only.
        min_steps: optimizer steps the model needs whatever the data set's size; small data
            sets (digits: 1,257 images) get smaller batches and more epochs to reach it.
    """

    epochs: int
    lr: float
    batch_size: int
    optimizer: Optimizer = "sgd"
    weight_decay: float = 5e-4
    min_steps: int = 300

    def for_size(self, n_train: int) -> Recipe:
        """The recipe adapted to a train split of ``n_train`` images (unchanged for MNIST)."""
        batch_size = max(16, min(self.batch_size, n_train // 40))
        steps_per_epoch = math.ceil(n_train / batch_size)
        epochs = max(self.epochs, math.ceil(self.min_steps / steps_per_epoch))
        return replace(self, batch_size=batch_size, epochs=epochs)

    def train_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`train_model` this recipe sets."""
        out = asdict(self)
        del out["min_steps"]
        return out


# Slow architectures get fewer epochs: they only need to be clearly better than chance
# and reasonable, since they are compression subjects, not accuracy records.
RECIPES: dict[str, Recipe] = {
    "resnet20": Recipe(epochs=8, lr=0.1, batch_size=128),
    "resnet56": Recipe(epochs=3, lr=0.1, batch_size=128, min_steps=150),
    "vgg": Recipe(epochs=4, lr=0.05, batch_size=128, min_steps=200),
    "mobilenetv2": Recipe(epochs=2, lr=0.1, batch_size=128, min_steps=100),
    "lenet5": Recipe(epochs=10, lr=0.1, batch_size=32),
    "vit": Recipe(epochs=12, lr=3e-3, batch_size=128, optimizer="adamw", weight_decay=0.05),
}


@dataclass(frozen=True)
class TrainRecord:
    """The JSON sidecar of one cached training run."""

    arch: str
    dataset: str
    fingerprint: str
    seed: int
    recipe_version: int
    recipe: dict[str, Any]
    val_accuracy: float
    train_seconds: float
    torch_version: str


def _set_eval(model: nn.Module) -> bool:
    """Put ``model`` in eval mode if it allows it; return whether to switch it back to train.

    Modules from ``torch.export`` refuse ``.eval()`` (their graph already fixes the
    mode); they are evaluated as they are and left untouched.
    """
    was_training = model.training
    try:
        model.eval()
    except NotImplementedError:
        return False
    return was_training


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, batch_size: int = 32
) -> float:
    """Top-1 accuracy (0..1) of ``model`` on ``x, y``, in eval mode, batch by batch."""
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"evaluate_accuracy needs equal, non-empty x and y; got {len(x)} and {len(y)}")
    xs = torch.as_tensor(x)
    ys = torch.as_tensor(y)
    was_training = _set_eval(model)
    correct = 0
    try:
        for start in range(0, len(xs), batch_size):
            logits = model(xs[start : start + batch_size])
            correct += int((logits.argmax(dim=1) == ys[start : start + batch_size]).sum())
    finally:
        if was_training:
            model.train()
    return correct / len(xs)


def shift_px_for(image_size: int) -> int:
    """Largest random shift: 2 px at 28x28 and 32x32, none for 8x8 digits (2 px is a quarter of them)."""
    return image_size // 14


def random_shift(x: torch.Tensor, max_px: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by its own random offset in [-max_px, max_px]², edges replicated."""
    if max_px <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_px, max_px, max_px, max_px), mode="replicate")
    dy = torch.randint(0, 2 * max_px + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_px + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # B x H x 1
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # B x 1 x W
    batch = torch.arange(b)[:, None, None]
    # Advanced indexing on dims 0, 2, 3 gives B x H x W x C; move channels back.
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weights of rank >= 2 only; biases, BN / LN scales and embeddings' 1-D params free."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_model(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    seed: int,
    lr: float,
    batch_size: int,
    optimizer: Optimizer = "sgd",
    weight_decay: float = 5e-4,
    progress: ProgressFn | None = None,
) -> float:
    """Train ``model`` in place on the train split; return its validation accuracy (0..1).

    Validation runs after every epoch only when ``progress`` wants it, else once at the end.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"epochs, batch_size and lr must be positive; got {epochs}, {batch_size}, {lr}")
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    groups = _param_groups(model, weight_decay)
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=lr)
    steps_per_epoch = math.ceil(len(dataset.x_train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.25, div_factor=10.0
    )
    gen = torch.Generator().manual_seed(seed)
    shift_px = shift_px_for(dataset.image_size)
    accuracy = float("nan")
    for epoch in range(1, epochs + 1):
        model.train()
        for xb, yb in batches(
            dataset.x_train, dataset.y_train, batch_size, shuffle=True, seed=seed * 100_003 + epoch
        ):
            if len(xb) < 2:
                continue  # BatchNorm cannot train on a single image
            logits = model(random_shift(xb, shift_px, gen))
            loss = F.cross_entropy(logits, yb, label_smoothing=LABEL_SMOOTHING)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training diverged at epoch {epoch} (loss {loss.item()}); lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress is not None or epoch == epochs:
            accuracy = evaluate_accuracy(model, dataset.x_val, dataset.y_val)
        if progress is not None:
            progress(epoch, epochs, accuracy)
    model.eval()
    return accuracy


def cache_key(arch: str, dataset: Dataset, seed: int) -> str:
    """File stem of a cache entry: arch, data fingerprint, seed and recipe version."""
    return f"{arch}-{dataset.fingerprint}-s{seed}-r{RECIPE_VERSION}"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file and rename, so concurrent readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2))


def load_record(arch: str, dataset: Dataset, *, seed: int = 0, cache_dir: Path) -> TrainRecord | None:
    """The sidecar of a cached run, or None when there is no (readable) entry."""
    path = Path(cache_dir) / f"{cache_key(arch, dataset, seed)}.json"
    try:
        return TrainRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _seeded_model(arch: str, dataset: Dataset, seed: int) -> nn.Module:
    """A fresh zoo model whose initial weights depend only on ``seed``."""
    torch.manual_seed(seed)
    return build_model(
        arch, in_channels=dataset.in_channels, image_size=dataset.image_size, num_classes=dataset.num_classes
    )


def trained_model(
    arch: str,
    dataset: Dataset,
    *,
    seed: int = 0,
    cache_dir: Path,
    progress: ProgressFn | None = None,
) -> nn.Module:
    """A zoo model trained on ``dataset`` with its default recipe, from the cache when possible.

    The model is returned in eval mode. A missing, partial or unreadable cache entry
    is treated as a miss and retrained.

    Raises:
        ValueError: unknown ``arch`` (the message lists the zoo).
    """
    if arch not in RECIPES:
        raise ValueError(f"unknown architecture {arch!r}; the zoo has: {', '.join(ZOO)}")
    cache_dir = Path(cache_dir)
    stem = cache_key(arch, dataset, seed)
    weights_path = cache_dir / f"{stem}.safetensors"
    model = _seeded_model(arch, dataset, seed)
    if weights_path.is_file() and load_record(arch, dataset, seed=seed, cache_dir=cache_dir) is not None:
        try:
            model.load_state_dict(load_file(weights_path), strict=True)
            return model.eval()
        except (SafetensorError, RuntimeError, OSError):
            model = _seeded_model(arch, dataset, seed)  # the failed load may have half-filled it
    recipe = RECIPES[arch].for_size(len(dataset.x_train))
    start = time.perf_counter()
    accuracy = train_model(model, dataset, seed=seed, progress=progress, **recipe.train_kwargs())
    seconds = time.perf_counter() - start
    cache_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(weights_path, lambda p: save_file(state, str(p), metadata={"arch": arch, "key": stem}))
    record = TrainRecord(
        arch=arch,
        dataset=dataset.name,
        fingerprint=dataset.fingerprint,
        seed=seed,
        recipe_version=RECIPE_VERSION,
        recipe=asdict(recipe),
        val_accuracy=accuracy,
        train_seconds=round(seconds, 2),
        torch_version=torch.__version__,
    )
    _atomic_write(cache_dir / f"{stem}.json", lambda p: _write_json(p, asdict(record)))
    return model.eval()
