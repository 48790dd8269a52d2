"""Kernel-level predictor (nn-Meter style): one LightGBM regressor per kernel type.

A compressed model is the list of its kernels (``latency_models.features``: conv+bn+relu is
one kernel, as ONNX Runtime fuses it); the model's latency is the sum of its kernels'
predicted latencies plus a fitted per-model overhead (a non-negative linear function of the
number of kernels, the input size, the activation volume and the int8 flag: graph entry/exit,
adds, pooling, quantize/dequantize nodes).

Fitting: we only time whole models, never single kernels, so per-kernel targets are
unknown. We fit by backfitting: start by splitting each model's latency over its kernels in
proportion to MACs plus output volume, fit the per-type regressors on those shares (in log
space), fit the overhead on what the kernels leave unexplained, then re-split each model's
latency (minus its overhead) in proportion to the current kernel predictions and refit; a
few rounds make the kernel functions consistent across models. Chosen over regressing the
model latency on summed kernel features because summing loses the shapes (a wide narrow-
resolution kernel and a narrow wide-resolution one look alike), while the kernel split keeps
one function per kernel shape that transfers to unseen architectures. Nothing assumes that
sparsity or int8 helps: scheme, sparsity, N:M, block, bits and int8 are plain features, and
the regressors learn whatever the timings say (in ORT: masks do nothing, int8 helps wide
kernels and hurts narrow ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
from scipy.optimize import nnls

from compression.policy import Policy
from compression.space import OP_TYPES, SearchSpace
from latency_models.features import KERNEL_FEATURES, MODEL_FEATURES, KernelBatch, kernel_features
from latency_models.predictors.base import LatencyRecord, Predictor, record_features, register

__all__ = ["KernelGBDT", "overhead_design"]

_MACS = KERNEL_FEATURES.index("macs")
_OUT = KERNEL_FEATURES.index("out_numel")
_MIN_ROWS = 40  # a kernel type with fewer training rows uses the shared all-types model


def overhead_design(model: np.ndarray) -> np.ndarray:
    """Per-model overhead regressors: 1, kernels, kernels·int8, input numel, activations."""
    m = {n: model[:, i] for i, n in enumerate(MODEL_FEATURES)}
    return np.stack(
        [
            np.ones(len(model)),
            m["n_kernels"],
            m["n_kernels"] * m["int8"],
            m["input_numel"] * 1e-4,
            m["total_out_numel"] * 1e-5,
            m["total_out_numel"] * 1e-5 * m["int8"],
        ],
        axis=1,
    )


def _work(x: np.ndarray) -> np.ndarray:
    """A kernel's nominal work: MACs plus output volume (memory traffic) plus a launch cost.

    The regressors predict log(latency / work), i.e. the kernel's *inverse efficiency*: a
    bounded quantity trees can learn from a few hundred models, while latency itself grows
    beyond any range seen in training and trees cannot extrapolate it.
    """
    return x[..., _MACS] + 10.0 * x[..., _OUT] + 2000.0


@register
class KernelGBDT(Predictor):
    """Sum of per-kernel LightGBM predictions plus a fitted per-model overhead."""

    kind = "kernel_gbdt"

    def __init__(self, target: Any = "ms", seed: int = 0, rounds: int = 5, n_estimators: int = 300) -> None:
        super().__init__(target, seed)
        self.rounds = rounds
        self.n_estimators = n_estimators
        self.boosters: dict[str, lgb.Booster] = {}
        self.overhead = np.zeros(6)

    def _params(self) -> dict[str, Any]:
        return {
            "objective": "regression",
            "learning_rate": 0.05,
            "num_leaves": 15,
            "min_data_in_leaf": 5,
            "feature_fraction": 0.9,
            "bagging_fraction": 0.9,
            "bagging_freq": 1,
            "lambda_l2": 1.0,
            "num_threads": 1,
            "seed": self.seed,
            "deterministic": True,
            "verbose": -1,
        }

    def _fit(self, records: Sequence[LatencyRecord], y: np.ndarray) -> None:
        xs, ops, model_of, models = [], [], [], np.zeros((len(records), len(MODEL_FEATURES)))
        for ix, kb in record_features(records):
            models[ix] = kb.model
            for j, rec in enumerate(ix):
                keep = kb.present[j]
                xs.append(kb.x[j][keep])
                ops.append(kb.op[keep])
                model_of.append(np.full(int(keep.sum()), rec))
        x = np.concatenate(xs)
        op = np.concatenate(ops)
        mid = np.concatenate(model_of)
        design = overhead_design(models)
        # Initial kernel shares: MACs plus output volume (memory traffic), normalised per model.
        share = _work(x)
        overhead = np.full(len(records), 0.0)
        kernel_pred = share
        for _ in range(self.rounds):
            per_model = np.bincount(mid, weights=kernel_pred, minlength=len(records))
            budget = np.maximum(y - overhead, 0.3 * y)
            target = kernel_pred * (budget / np.maximum(per_model, 1e-12))[mid]
            kernel_pred = self._fit_kernels(x, op, np.log(np.maximum(target, 1e-12) / _work(x)))
            summed = np.bincount(mid, weights=kernel_pred, minlength=len(records))
            self.overhead, _ = nnls(design, y - summed)
            overhead = design @ self.overhead

    def _fit_kernels(self, x: np.ndarray, op: np.ndarray, log_t: np.ndarray) -> np.ndarray:
        self.boosters = {}
        names = list(KERNEL_FEATURES)
        data = lgb.Dataset(x, log_t, feature_name=names, free_raw_data=False)
        self.boosters["all"] = lgb.train(self._params(), data, num_boost_round=self.n_estimators)
        pred = self.boosters["all"].predict(x, num_threads=1)
        for t, name in enumerate(OP_TYPES):
            sel = op == t
            if sel.sum() >= _MIN_ROWS:
                d = lgb.Dataset(x[sel], log_t[sel], feature_name=names)
                self.boosters[name] = lgb.train(self._params(), d, num_boost_round=self.n_estimators)
                pred[sel] = self.boosters[name].predict(x[sel], num_threads=1)
        return np.exp(pred) * _work(x)

    def kernel_latencies(self, kb: KernelBatch) -> np.ndarray:
        """(P, L) predicted kernel latencies in target units (0 for absent kernels)."""
        n_pol, n_layers, n_feat = kb.x.shape
        out = np.zeros((n_pol, n_layers))
        for t in np.unique(kb.op):
            cols = np.flatnonzero(kb.op == t)
            booster = self.boosters.get(OP_TYPES[t], self.boosters["all"])
            rows = kb.x[:, cols, :].reshape(-1, n_feat)
            pred = np.exp(booster.predict(rows, num_threads=1)) * _work(rows)
            out[:, cols] = pred.reshape(n_pol, len(cols))
        return out * kb.present

    def _predict(self, space: SearchSpace, policies: Sequence[Policy]) -> np.ndarray:
        kb = kernel_features(space, policies)
        return self.kernel_latencies(kb).sum(axis=1) + overhead_design(kb.model) @ self.overhead

    def _state(self, directory: Path) -> dict[str, Any]:
        for name, booster in self.boosters.items():
            booster.save_model(str(directory / f"kernel_{name}.txt"))
        return {
            "boosters": sorted(self.boosters),
            "overhead": self.overhead.tolist(),
            "rounds": self.rounds,
            "n_estimators": self.n_estimators,
        }

    def _restore(self, state: dict[str, Any], directory: Path) -> None:
        self.boosters = {
            name: lgb.Booster(model_file=str(directory / f"kernel_{name}.txt")) for name in state["boosters"]
        }
        self.overhead = np.asarray(state["overhead"], dtype=np.float64)
        self.rounds = int(state["rounds"])
        self.n_estimators = int(state["n_estimators"])
