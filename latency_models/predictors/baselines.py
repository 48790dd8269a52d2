"""Two baselines the learned predictors must beat.

* ``MacsLinear``: latency = a · MACs + b (non-negative least squares). What a search that
  counts MACs implicitly assumes.
* ``ShapeLookup``: a table of per-kernel latency keyed by the exact layer shape (op, in/out
  channels, kernel, stride, groups, input size, int8), filled by splitting each measured
  model's latency (minus the fitted intercept) over its kernels in proportion to MACs; shapes
  never seen fall back to the kernel type's median ms-per-MAC. A lookup table is exact on
  what it has seen and blind elsewhere, which is the point of comparing with it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import nnls

from compression.policy import Policy
from compression.space import OP_TYPES, SearchSpace
from latency_models.features import KERNEL_FEATURES, MODEL_FEATURES, kernel_features
from latency_models.predictors.base import LatencyRecord, Predictor, record_features, register

__all__ = ["MacsLinear", "ShapeLookup"]

_MACS_M = MODEL_FEATURES.index("total_macs")
_KEY_COLS = [
    KERNEL_FEATURES.index(n)
    for n in ("in_channels", "out_channels", "kernel", "stride", "groups", "in_h", "in_w", "int8")
]
_MACS_K = KERNEL_FEATURES.index("macs")


def _model_macs(records: Sequence[LatencyRecord]) -> np.ndarray:
    macs = np.zeros(len(records))
    for ix, kb in record_features(records):
        macs[ix] = kb.model[:, _MACS_M]
    return macs


@register
class MacsLinear(Predictor):
    """latency = a · MACs + b."""

    kind = "macs"

    def __init__(self, target: Any = "ms", seed: int = 0) -> None:
        super().__init__(target, seed)
        self.coef = np.zeros(2)

    def _fit(self, records: Sequence[LatencyRecord], y: np.ndarray) -> None:
        macs = _model_macs(records) * 1e-6
        self.coef, _ = nnls(np.stack([macs, np.ones_like(macs)], axis=1), y)

    def _predict(self, space: SearchSpace, policies: Sequence[Policy]) -> np.ndarray:
        macs = kernel_features(space, policies).model[:, _MACS_M] * 1e-6
        return self.coef[0] * macs + self.coef[1]

    def _state(self, directory: Path) -> dict[str, Any]:
        return {"coef_per_mmac": float(self.coef[0]), "intercept": float(self.coef[1])}

    def _restore(self, state: dict[str, Any], directory: Path) -> None:
        self.coef = np.array([state["coef_per_mmac"], state["intercept"]], dtype=np.float64)


def _key(op: int, row: np.ndarray) -> str:
    return ",".join([OP_TYPES[op], *(str(round(float(v))) for v in row[_KEY_COLS])])


@register
class ShapeLookup(Predictor):
    """Sum of per-shape table entries plus an intercept; unseen shapes: ms-per-MAC of the type."""

    kind = "lookup"

    def __init__(self, target: Any = "ms", seed: int = 0) -> None:
        super().__init__(target, seed)
        self.table: dict[str, float] = {}
        self.per_mac: dict[str, float] = {}
        self.intercept = 0.0

    def _fit(self, records: Sequence[LatencyRecord], y: np.ndarray) -> None:
        macs = _model_macs(records)
        coef, _ = nnls(np.stack([macs, np.ones_like(macs)], axis=1), y)
        self.intercept = float(coef[1])
        sums: dict[str, list[float]] = {}
        rates: dict[str, list[float]] = {}
        for ix, kb in record_features(records):
            for j, rec in enumerate(ix):
                budget = max(y[rec] - self.intercept, 0.1 * y[rec])
                total = max(macs[rec], 1.0)
                for k in np.flatnonzero(kb.present[j]):
                    kernel_macs = kb.x[j, k, _MACS_K]
                    share = budget * kernel_macs / total
                    sums.setdefault(_key(int(kb.op[k]), kb.x[j, k]), []).append(share)
                    if kernel_macs > 0:
                        rates.setdefault(OP_TYPES[int(kb.op[k])], []).append(share / kernel_macs)
        self.table = {k: float(np.mean(v)) for k, v in sums.items()}
        self.per_mac = {k: float(np.median(v)) for k, v in rates.items()}

    def _predict(self, space: SearchSpace, policies: Sequence[Policy]) -> np.ndarray:
        kb = kernel_features(space, policies)
        fallback = float(np.median(list(self.per_mac.values()))) if self.per_mac else 0.0
        out = np.full(len(policies), self.intercept)
        for j in range(len(policies)):
            for k in np.flatnonzero(kb.present[j]):
                row = kb.x[j, k]
                value = self.table.get(_key(int(kb.op[k]), row))
                if value is None:
                    value = self.per_mac.get(OP_TYPES[int(kb.op[k])], fallback) * row[_MACS_K]
                out[j] += value
        return out

    def _state(self, directory: Path) -> dict[str, Any]:
        (directory / "lookup_table.json").write_text(json.dumps(self.table, sort_keys=True))
        return {"per_mac": self.per_mac, "intercept": self.intercept, "entries": len(self.table)}

    def _restore(self, state: dict[str, Any], directory: Path) -> None:
        self.table = {
            k: float(v) for k, v in json.loads((directory / "lookup_table.json").read_text()).items()
        }
        self.per_mac = {k: float(v) for k, v in state["per_mac"].items()}
        self.intercept = float(state["intercept"])
