"""Joint fine-tuning of a family: every point in every step, on the one shared weight set.

As slimmable networks and once-for-all train their sub-networks, each optimizer step runs
all K points of a :class:`compression.family.Family` on the same batch and sums their
distillation losses (``compression.distill.kd_loss``, the dense model as teacher), so the
shared weights move for the family as a whole and no point is trained at the others' expense
without it showing in the loss. What each point fixed stays fixed, as in
``compression.distill``: removed channels and skipped blocks are gone from its graph; its
masks are applied in the forward pass (masked weights get no gradient from that point);
its quantized layers run fake-quantized on their own grid with the straight-through
estimator. Trained: the master weights (shared) and each point's private tensors (its
BatchNorm scale and shift, in eval form as exported). After the last step every point's
weights are written from the master again (``Family.sync``), so one weight set still
reproduces every point.

``point_weights`` weighs the points' losses (default equal).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
from torch.func import functional_call

from compression.distill import DistillConfig, DistillResult, KDBatches, StepProgress, guarded_step, kd_loss
from compression.family import Family
from compression.masks import fake_quantize

__all__ = ["distill_family"]


def _lr_factor(steps: int, warmup: float) -> Callable[[int], float]:
    """Linear warm-up then cosine decay (the schedule ``compression.distill`` uses)."""
    warm = int(warmup * steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _point_tensor(family: Family, master: dict[str, torch.Tensor], k: int, target: str) -> torch.Tensor:
    p = family.points[k]
    w = master[target]
    for dim, pos in p.index[target]:
        w = w.index_select(dim, pos)
    mask = p.cm.masks.get(target)
    if mask is not None:
        w = w * mask
    bits = p.cm.bits.get(target)
    if bits is not None:
        w = w + (fake_quantize(w, bits) - w).detach()  # straight-through estimator
    return w


def distill_family(
    family: Family,
    batches: KDBatches,
    steps: int,
    *,
    config: DistillConfig | None = None,
    point_weights: Sequence[float] | None = None,
    progress: StepProgress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DistillResult:
    """Fine-tune every point of ``family`` together for ``steps`` steps (see the module docstring).

    ``batches`` carries the teacher (the dense model) and the images; ``config`` its learning
    rate, temperature and clipping (``config.batch_size`` / ``seed`` describe ``batches`` only
    if they match).

    Raises:
        ValueError: ``steps`` below 1, or ``point_weights`` not one non-negative number per point.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    k_points = len(family.points)
    weights = [1.0] * k_points if point_weights is None else [float(w) for w in point_weights]
    if (
        len(weights) != k_points
        or any(not (w >= 0 and math.isfinite(w)) for w in weights)
        or sum(weights) <= 0
    ):
        raise ValueError(
            f"point_weights must be {k_points} non-negative numbers, not all 0; got {point_weights}"
        )
    cfg = config or DistillConfig()
    start = time.perf_counter()
    shared = [t for t in family.master if any(t in p.index for p in family.points)]
    master = {t: family.master[t].detach().clone().requires_grad_(True) for t in shared}
    private: list[torch.Tensor] = []
    for p in family.points:
        private += [
            param
            for name, param in p.cm.gm.named_parameters()
            if name not in family.master and param.is_floating_point()
        ]
    trained = list(master.values()) + private
    saved = [t.detach().clone() for t in trained]
    opt = torch.optim.Adam(trained, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(steps, cfg.warmup))
    for param in private:
        param.requires_grad_(True)
    losses: list[float] = []
    skipped = taken = 0
    stopped = diverged = False
    try:
        for step in range(steps):
            if should_stop is not None and should_stop():
                stopped = True
                break
            x, y, t_logits = batches[step]
            loss = torch.zeros(())
            for k, p in enumerate(family.points):
                if weights[k] == 0:
                    continue
                overrides = {t: _point_tensor(family, master, k, t) for t in p.index}
                logits = functional_call(p.cm.gm, overrides, (x,))
                loss = loss + weights[k] * kd_loss(logits, t_logits, y, cfg.temperature, cfg.alpha)
            opt.zero_grad(set_to_none=True)
            value = float(loss.detach())
            if not guarded_step(loss, opt, sched, trained, cfg.clip_norm):
                skipped += 1
            taken += 1
            losses.append(value / sum(weights))
            if not all(bool(torch.isfinite(tensor).all()) for tensor in trained):
                diverged = True
                with torch.no_grad():
                    for tensor, s in zip(trained, saved, strict=True):
                        tensor.copy_(s)
                break
            if progress is not None:
                progress(step + 1, steps, value)
    finally:
        for param in private:
            param.requires_grad_(False)
            param.grad = None
    with torch.no_grad():
        for t, trained_master in master.items():
            family.master[t] = trained_master.detach().clone()
        family.sync()
    return DistillResult.of_run(
        losses, steps=taken, skipped=skipped, start=start, diverged=diverged, stopped=stopped
    )
