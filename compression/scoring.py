"""Score one policy for real: apply, recalibrate BatchNorm, evaluate, count cost."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from compression.apply import CompressedModel, Importance, apply_policy
from compression.evaluate import accuracy, quantize_activations, recalibrate_bn
from compression.metrics import measure
from compression.model_io import CompressibleModel
from compression.obc import RECOVERIES, ObcCache, Recovery, recover
from compression.policy import Policy
from compression.reconstruct import reconstruct as reconstruct_layers


@dataclass(frozen=True)
class PolicyScore:
    """Accuracy and cost of one policy (latency comes from ``latency_models``).

    Attributes:
        accuracy: top-1 on the validation subset, in [0, 1].
        size_bytes / macs / effective_macs / params: see ``compression.metrics``.
        eval_seconds: wall time of apply + recalibrate + evaluate.
    """

    accuracy: float
    size_bytes: int
    macs: int
    effective_macs: int
    params: int
    eval_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compress(
    model: CompressibleModel,
    policy: Policy,
    calibration: Sequence[torch.Tensor],
    *,
    importance: Importance = "l1",
    reconstruct: bool = False,
    recovery: Recovery = "magnitude",
    cache: ObcCache | None = None,
) -> CompressedModel:
    """Apply ``policy``, recalibrate BatchNorm, and add 8-bit activations if asked.

    ``reconstruct`` re-fits the layers whose inputs were pruned to the dense model's outputs
    on ``calibration`` (see ``compression.reconstruct``) before BatchNorm is recalibrated.
    ``recovery="obc"`` chooses masks and rounds weights with each layer's Hessian on
    ``calibration``, updating the remaining weights (``compression.obc``; ``cache`` keeps
    results across the policies of one model and calibration set); ``"magnitude"``
    keeps magnitude masks and round-to-nearest.
    """
    if recovery not in RECOVERIES:
        raise ValueError(f"recovery must be one of {RECOVERIES}, got {recovery!r}")
    if recovery == "obc":
        cm = apply_policy(model, policy, importance=importance, fine_grained=False)
        recover(cm, calibration, refit=reconstruct, cache=cache)  # recalibrates BatchNorm too
        if policy.act_bits == 8:
            quantize_activations(cm, calibration)
        return cm
    cm = apply_policy(model, policy, importance=importance)
    if reconstruct:  # its pass installs the recalibrated BatchNorm statistics too
        reconstruct_layers(cm, calibration, recalibrate=True)
    else:
        recalibrate_bn(cm.gm, calibration)
    if policy.act_bits == 8:
        quantize_activations(cm, calibration)
    return cm


def score_policy(
    model: CompressibleModel,
    policy: Policy,
    calibration: Sequence[torch.Tensor],
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    importance: Importance = "l1",
) -> PolicyScore:
    """Measure a policy's accuracy and cost on real data."""
    start = time.perf_counter()
    with torch.no_grad():
        cm = compress(model, policy, calibration, importance=importance)
        acc = accuracy(cm.gm, x_val, y_val)
        m = measure(cm)
    return PolicyScore(
        accuracy=acc,
        size_bytes=m.size_bytes,
        macs=m.macs,
        effective_macs=m.effective_macs,
        params=m.params,
        eval_seconds=time.perf_counter() - start,
    )
