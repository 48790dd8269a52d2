"""Knowledge-distillation fine-tuning of a compressed model, with its masks and quantizers held.

The dense model is the teacher: the student (the compressed graph) learns the teacher's
softened logits (KL divergence at temperature ``T``, scaled by ``T²`` as Hinton et al. do)
mixed with the labels' cross-entropy. What the policy fixed stays fixed:

* removed channels and skipped blocks are gone from the graph already;
* sparsity masks hold exactly: gradients of masked weights are zeroed and the masks are
  re-applied after every step;
* quantized layers train as QAT: a float master copy of the weight takes the optimizer's
  steps, and the graph runs its fake-quantized value on the same symmetric
  per-output-channel grid as :func:`compression.masks.fake_quantize` (the power-of-two grid
  of ``compression.pow2`` for ``pow2`` layers, its scale re-chosen at every step) (the
  straight-through estimator: the gradient of the quantized weight is the master's gradient);
* BatchNorm stays in eval form (running statistics as recalibrated), which is how the
  exported graph runs it (folded); its affine scale and shift do train.

Small learning rate, warm-up then cosine decay, gradient-norm clipping, and a step whose
loss or gradient is not finite is skipped, so a sparse model (88 % 1×N blocks) does not
diverge the way plain SGD at 0.01 did; if the weights still turn non-finite they are put
back as they were and the result says so.

Batches are drawn by step from a seed (:class:`KDBatches`), so the teacher's logits are
computed once and shared by every student fine-tuned on the same batches (the front's
top-k points), and an export replays a job's fine-tuning exactly.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compression.apply import CompressedModel, get_tensor
from compression.data import Dataset
from compression.masks import quantize_weight
from compression.train import random_shift, shift_px_for

__all__ = ["DistillConfig", "DistillResult", "KDBatches", "distill", "kd_loss", "steps_for_epochs"]

OptimizerName = Literal["adam", "sgd"]
StepProgress = Callable[[int, int, float], None]
"""Called after each optimizer step with (step starting at 1, steps, loss of that step)."""

#: Teacher logits kept in memory at most (beyond this they are recomputed per student).
TEACHER_CACHE_BYTES = 64 << 20


@dataclass(frozen=True)
class DistillConfig:
    """How one fine-tuning runs (stored with a fine-tuned candidate, so an export replays it).

    Attributes:
        batch_size: images per step (capped for small train splits, see :meth:`for_size`).
        lr: peak learning rate (Adam's default for fine-tuning; SGD wants about 10x more).
        optimizer: "adam" or "sgd" (Nesterov momentum 0.9).
        temperature: softening of both logits in the KL term.
        alpha: weight of the KL term; ``1 - alpha`` weighs the labels' cross-entropy.
        clip_norm: largest global gradient norm.
        warmup: fraction of the steps over which the learning rate rises linearly.
        augment: random shifts as in zoo training (``compression.train.random_shift``).
        seed: draws the batches and the shifts.
    """

    batch_size: int = 128
    lr: float = 1e-3
    optimizer: OptimizerName = "adam"
    temperature: float = 4.0
    alpha: float = 0.9
    clip_norm: float = 2.0
    warmup: float = 0.1
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be positive, got {self.clip_norm}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")

    def for_size(self, n_train: int) -> DistillConfig:
        """Batches no larger than a 40th of the train split (digits: 31), as zoo training does."""
        from dataclasses import replace

        return replace(self, batch_size=max(16, min(self.batch_size, n_train // 40)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DistillConfig:
        fields = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in fields})


def steps_for_epochs(epochs: float, n_train: int, batch_size: int) -> int:
    """Optimizer steps in ``epochs`` passes over ``n_train`` images (at least one)."""
    if not (epochs > 0 and math.isfinite(epochs)):
        raise ValueError(f"epochs must be a positive number, got {epochs}")
    return max(1, math.ceil(epochs * math.ceil(n_train / batch_size)))


@dataclass(frozen=True)
class DistillResult:
    """What one fine-tuning did.

    Attributes:
        steps: optimizer steps taken (skipped ones included; fewer than asked when stopped).
        skipped: steps whose loss or gradient was not finite (no update made).
        seconds: wall time.
        first_loss / last_loss: mean loss over the first and the last tenth of the steps.
        diverged: the weights turned non-finite and were restored to the starting ones.
        stopped: ``should_stop`` ended it early.
    """

    steps: int
    skipped: int
    seconds: float
    first_loss: float
    last_loss: float
    diverged: bool = False
    stopped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of_run(
        cls, losses: Sequence[float], *, steps: int, skipped: int, start: float, diverged: bool, stopped: bool
    ) -> DistillResult:
        """The result of a run whose per-step losses were ``losses`` (started at ``start``)."""
        finite = [v for v in losses if math.isfinite(v)]
        tenth = max(1, len(finite) // 10)
        return cls(
            steps=steps,
            skipped=skipped,
            seconds=time.perf_counter() - start,
            first_loss=float(np.mean(finite[:tenth])) if finite else float("nan"),
            last_loss=float(np.mean(finite[-tenth:])) if finite else float("nan"),
            diverged=diverged,
            stopped=stopped,
        )


class KDBatches:
    """Training batches drawn by step index, with the teacher's logits computed once.

    Step ``s`` takes its images from a permutation of the train split seeded by ``(seed,
    epoch)`` and shifts them with a generator seeded by ``(seed, s)``, so any student asking
    for step ``s`` gets the same images; the teacher's logits for them are cached (up to
    :data:`TEACHER_CACHE_BYTES`) and reused by the next student.
    """

    def __init__(
        self,
        teacher: nn.Module,
        dataset: Dataset,
        *,
        batch_size: int = 128,
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        if batch_size < 2:
            raise ValueError(f"batch_size must be at least 2, got {batch_size}")
        self.teacher = teacher
        self.x = torch.from_numpy(dataset.x_train)
        self.y = torch.from_numpy(dataset.y_train)
        self.batch_size = min(batch_size, len(self.x))
        self.seed = seed
        self.shift_px = shift_px_for(dataset.image_size) if augment else 0
        self.per_epoch = max(1, len(self.x) // self.batch_size)  # full batches only
        self._orders: dict[int, torch.Tensor] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._cached_bytes = 0

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            self._orders = {
                epoch: torch.from_numpy(np.random.default_rng((self.seed, epoch)).permutation(len(self.x)))
            }
        return self._orders[epoch]

    def images(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of step ``step`` (from 0)."""
        epoch, i = divmod(step, self.per_epoch)
        idx = self._order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        x = self.x[idx]
        if self.shift_px:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            x = random_shift(x, self.shift_px, gen)
        return x, self.y[idx]

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, labels, teacher logits) of step ``step``."""
        x, y = self.images(step)
        logits = self._logits.get(step)
        if logits is None:
            with torch.no_grad():
                logits = self.teacher(x).detach()
            size = logits.numel() * logits.element_size()
            if self._cached_bytes + size <= TEACHER_CACHE_BYTES:
                self._logits[step] = logits
                self._cached_bytes += size
        return x, y, logits


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """``alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · CE(student, labels)``."""
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student / t, dim=-1),
        F.log_softmax(teacher / t, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    loss = alpha * t * t * kl
    if alpha < 1.0:
        loss = loss + (1.0 - alpha) * F.cross_entropy(student, labels)
    return loss


class _Held:
    """The trainable tensors of a compressed model and what holds each: mask, quantizer, or nothing."""

    def __init__(self, cm: CompressedModel) -> None:
        self.gm = cm.gm
        self.params = [p for p in cm.gm.parameters() if p.is_floating_point()]
        ids = {id(p) for p in self.params}
        self.masked: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, mask), float layers
        # (param, master, mask, (bits, pow2)) per quantized layer
        self.quantized: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, bool]]] = []
        for target in sorted(set(cm.masks) | set(cm.bits) | set(cm.pow2)):
            w = get_tensor(cm.gm, target)
            if id(w) not in ids:
                continue  # a constant the graph holds, not a parameter: it cannot train
            mask = cm.masks.get(target)
            pow2 = target in cm.pow2
            bits = cm.pow2[target] if pow2 else cm.bits.get(target)
            if bits is None:
                assert mask is not None
                self.masked.append((w, mask.to(w.dtype)))
            else:
                master = w.detach().clone().requires_grad_(True)
                grid = (bits, pow2)
                self.quantized.append((w, master, None if mask is None else mask.to(w.dtype), grid))
        quantized = {id(q[0]) for q in self.quantized}
        # The optimizer steps the masters in place of the quantized weights they stand for.
        self.trained = [p for p in self.params if id(p) not in quantized] + [q[1] for q in self.quantized]

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, saved, strict=True):
                p.copy_(s)
            for w, master, _mask, _bits in self.quantized:
                master.copy_(w)

    def route_grads(self) -> None:
        """STE: each master takes its quantized weight's gradient; masked entries get none."""
        for w, mask in self.masked:
            if w.grad is not None:
                w.grad.mul_(mask)
        for w, master, qmask, _bits in self.quantized:
            g = w.grad if w.grad is not None else torch.zeros_like(w)
            master.grad = g * qmask if qmask is not None else g.clone()
            w.grad = None

    def hold(self) -> None:
        """Masks re-applied exactly; quantized weights set to the fake-quantized masters."""
        with torch.no_grad():
            for w, mask in self.masked:
                w.mul_(mask)
            for w, master, qmask, (bits, pow2) in self.quantized:
                if qmask is not None:
                    master.mul_(qmask)
                w.copy_(quantize_weight(master, bits, pow2=pow2))

    def finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.trained)


def _schedule(steps: int, warmup: float) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to zero."""
    warm = int(warmup * steps)

    def factor(step: int) -> float:  # ``step`` counts the steps already taken
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def guarded_step(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    params: Sequence[torch.Tensor],
    clip_norm: float,
    *,
    before_clip: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
) -> bool:
    """One optimizer step on ``loss`` unless it or its gradient norm is not finite; the
    schedule advances either way. Returns whether the step was taken.

    ``before_clip`` runs after ``backward`` (e.g. routing gradients), ``after_step`` after the
    optimizer's step (e.g. re-applying masks and grids).
    """
    took = False
    if math.isfinite(float(loss.detach())):
        loss.backward()
        if before_clip is not None:
            before_clip()
        norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
        if torch.isfinite(norm):
            opt.step()
            if after_step is not None:
                after_step()
            took = True
    with warnings.catch_warnings():  # a skipped step still advances the schedule
        warnings.simplefilter("ignore", UserWarning)
        sched.step()
    return took


def distill(
    cm: CompressedModel,
    teacher: nn.Module | None,
    data: Dataset | KDBatches,
    steps: int,
    *,
    config: DistillConfig | None = None,
    progress: StepProgress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DistillResult:
    """Fine-tune ``cm`` in place for ``steps`` optimizer steps with ``teacher`` as teacher.

    ``data`` is a data set (its train split; ``teacher`` required) or the :class:`KDBatches`
    of several students (its teacher and batch size are used; ``config.batch_size`` and
    ``config.seed`` then describe it only if they match). ``progress`` sees every step;
    ``should_stop`` is polled before each step. On return every parameter has
    ``requires_grad`` False again and the graph computes what it will be exported as.

    Raises:
        ValueError: ``steps`` below 1, a data set without a teacher, or a bad config.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    cfg = config or DistillConfig()
    if isinstance(data, Dataset):
        if teacher is None:
            raise ValueError("distill needs the teacher (the dense model) when given a data set")
        batches = KDBatches(teacher, data, batch_size=cfg.batch_size, seed=cfg.seed, augment=cfg.augment)
    else:
        batches = data
    start = time.perf_counter()
    held = _Held(cm)
    saved = held.snapshot()
    opt: torch.optim.Optimizer
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(held.trained, lr=cfg.lr)
    else:
        opt = torch.optim.SGD(held.trained, lr=cfg.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps, cfg.warmup))
    for p in held.params:
        p.requires_grad_(True)
    losses: list[float] = []
    skipped = 0
    stopped = diverged = False
    taken = 0
    try:
        for step in range(steps):
            if should_stop is not None and should_stop():
                stopped = True
                break
            x, y, t_logits = batches[step]
            loss = kd_loss(cm.gm(x), t_logits, y, cfg.temperature, cfg.alpha)
            opt.zero_grad(set_to_none=True)
            for p in held.params:
                p.grad = None
            value = float(loss.detach())
            if not guarded_step(
                loss,
                opt,
                sched,
                held.trained,
                cfg.clip_norm,
                before_clip=held.route_grads,
                after_step=held.hold,
            ):
                skipped += 1
            taken += 1
            losses.append(value)
            if not held.finite():  # nothing good can follow: back to the start, and say so
                diverged = True
                held.restore(saved)
                break
            if progress is not None:
                progress(step + 1, steps, value)
    finally:
        for p in held.params:
            p.requires_grad_(False)
            p.grad = None
    return DistillResult.of_run(
        losses, steps=taken, skipped=skipped, start=start, diverged=diverged, stopped=stopped
    )
