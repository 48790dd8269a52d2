"""One interface for every latency predictor, the calibration record, and held-out metrics.

A predictor learns, per device, ``latency_ms`` of a compressed model from (SearchSpace,
Policy). Its ``target`` is either the absolute median (``"ms"``) or the ratio to the harness's
reference model (``"ratio"``): this machine's speed drifts 7-20 % between processes while
ratios taken in one run are steady, so training on ratios removes most of the drift; such a
predictor answers in ms by multiplying with the reference latency seen during calibration.

Accuracy is reported on architectures the predictor never saw (a group split by
``arch_id``), never on other policies of a training architecture: that is the question a new
user's model asks.

Every predictor also says how sure it is (``predict_uncertainty``: a standard deviation per
prediction, in ms). Kinds with an ensemble (``KernelGBDT``, ``GraphGNN``) take it from the
spread of their members; the others from their held-out relative error (see
``Predictor.predict_uncertainty`` for the rule and ``uncertainty_source`` for which applies).
"""

from __future__ import annotations

import dataclasses
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from compression.policy import Policy
from compression.space import SearchSpace
from latency_models.features import FEATURE_VERSION, KernelBatch, kernel_features

__all__ = [
    "MIN_RELATIVE_STD",
    "REGISTRY",
    "STATISTICS",
    "LatencyRecord",
    "Predictor",
    "StalePredictorError",
    "Target",
    "error_metrics",
    "evaluate",
    "group_split",
    "holdout_metrics",
    "load_predictor",
    "supports_statistic",
    "with_statistic",
]

Target = Literal["ms", "ratio"]

#: Smallest relative standard deviation a prediction is given: two timings of one model on an
#: idle machine rarely agree better than this, so no predictor can be surer.
MIN_RELATIVE_STD = 0.01
#: Relative standard deviation of a predictor that has no ensemble, no held-out figures and no
#: training error to go by (a fit from before those were kept): about the held-out error of the
#: learned predictors on unseen architectures (MAPE 15-25 %, bench/RESULTS.md).
UNKNOWN_RELATIVE_STD = 0.25
#: Mean absolute error / standard deviation of a normal error: turns a MAPE into a std.
_MAE_TO_STD = math.sqrt(math.pi / 2)


class StalePredictorError(ValueError):
    """A saved predictor was fitted on another latency feature encoding
    (``latency_models.features.FEATURE_VERSION``): its answers would be wrong, so it must be
    refitted on measurements taken under the current export rule."""


@dataclass(frozen=True, eq=False)
class LatencyRecord:
    """One measured compressed model (what calibration produces and predictors learn from).

    Attributes:
        arch_id: architecture family (zoo name or random generator seed); held-out splits
            group by it, so no resolution or policy of a test architecture is seen in training.
        space_id: the exact model measured (architecture at one input resolution).
        space: its search space (the predictors' view of the model).
        policy: the policy applied.
        latency_ms: measured median batch-1 latency.
        ratio: ``latency_ms`` / the reference model's, timed interleaved (None if not timed).
        reference_ms: the reference model's median in that run.
        dense_latency_ms / dense_ratio: the uncompressed model, timed in the same run.
        speedup: dense / compressed median, timed interleaved in one run.
        int8: whether the model ran as int8 QDQ.
        measurement: the harness's full record (reproducibility).
    """

    arch_id: str
    space_id: str
    space: SearchSpace
    policy: Policy
    latency_ms: float
    ratio: float | None = None
    reference_ms: float | None = None
    dense_latency_ms: float | None = None
    dense_ratio: float | None = None
    speedup: float | None = None
    int8: bool = False
    measurement: dict[str, Any] = field(default_factory=dict)


STATISTICS: tuple[str, ...] = ("median", "p10", "min")


def with_statistic(records: Sequence[LatencyRecord], stat: str = "median") -> list[LatencyRecord]:
    """The records re-expressed by another statistic of the same timed runs.

    ``median`` is what calibration stores; ``p10`` / ``min`` take the fast tail of each model
    (and of the interleaved dense and reference models) from the stored harness records:
    steadier than medians when other processes load the machine. Records without the
    needed fields (older measurements) keep their values for what they lack.
    """
    if stat == "median":
        return list(records)
    from latency_models.harness import Measurement

    out = []
    for r in records:
        meas = r.measurement or {}
        raw_b = meas.get("compressed") or meas.get("dense")
        if not raw_b or not _has_statistic(raw_b, stat, r.ratio is not None):
            out.append(r)
            continue
        b = Measurement.from_dict(raw_b)
        ms, ratio = b.statistic(stat)
        ref = b.reference_p10_ms if stat == "p10" else b.reference_min_ms
        dense_ms, dense_ratio = (ms, ratio)
        if meas.get("dense") and meas.get("compressed"):
            dense_ms, dense_ratio = Measurement.from_dict(meas["dense"]).statistic(stat)
        out.append(
            dataclasses.replace(
                r,
                latency_ms=ms,
                ratio=ratio,
                reference_ms=ref,
                dense_latency_ms=dense_ms,
                dense_ratio=dense_ratio,
                speedup=dense_ms / ms if r.speedup is not None else None,
            )
        )
    return out


def _has_statistic(raw: dict[str, Any], stat: str, needs_reference: bool) -> bool:
    key = {"p10": "reference_p10_ms", "min": "reference_min_ms"}.get(stat)
    return key is None or not needs_reference or raw.get(key) is not None


def supports_statistic(records: Sequence[LatencyRecord], stat: str) -> bool:
    """Whether every record carries what ``with_statistic(records, stat)`` needs (measurements
    from older harness versions or agents lack the reference's p10 / min)."""
    for r in records:
        meas = r.measurement or {}
        raw = meas.get("compressed") or meas.get("dense")
        if not raw or not _has_statistic(raw, stat, r.ratio is not None):
            return False
        if meas.get("compressed") and meas.get("dense") and not _has_statistic(meas["dense"], stat, True):
            return False
    return True


def by_space(records: Sequence[LatencyRecord]) -> list[tuple[SearchSpace, np.ndarray]]:
    """Records grouped by space (identity), as (space, indices into ``records``)."""
    groups: dict[int, tuple[SearchSpace, list[int]]] = {}
    for i, r in enumerate(records):
        groups.setdefault(id(r.space), (r.space, []))[1].append(i)
    return [(s, np.asarray(ix, dtype=np.int64)) for s, ix in groups.values()]


def record_features(records: Sequence[LatencyRecord]) -> list[tuple[np.ndarray, KernelBatch]]:
    """Kernel features of the records, one batch per space (indices into ``records``)."""
    return [(ix, kernel_features(s, [records[i].policy for i in ix])) for s, ix in by_space(records)]


class Predictor(ABC):
    """Latency predictor of one device: ``fit``, ``predict`` (ms), ``save`` / ``load``.

    Subclasses implement ``_fit`` (targets already chosen), ``_predict`` (in target units),
    ``_state`` / ``_restore`` (JSON-able state plus files they write themselves; never pickle).
    """

    kind: ClassVar[str] = ""

    def __init__(self, target: Target = "ms", seed: int = 0) -> None:
        if target not in ("ms", "ratio"):
            raise ValueError(f"target must be 'ms' or 'ratio', got {target!r}")
        self.target: Target = target
        self.seed = seed
        self.reference_ms = 1.0
        self.fitted = False
        self.metrics: dict[str, Any] = {}
        #: which statistic of the timed runs the training records carried (``with_statistic``)
        self.statistic = "median"
        #: RMS of the log error on its own training records (None: fitted before it was kept);
        #: the noise an ensemble's spread does not show (``predict_uncertainty``)
        self.fit_log_rmse: float | None = None

    # -- public API
    def fit(self, records: Sequence[LatencyRecord]) -> Predictor:
        """Learn from measured records; returns self."""
        if not records:
            raise ValueError("cannot fit a latency predictor on no records")
        if self.target == "ratio":
            missing = [r.space_id for r in records if r.ratio is None or r.reference_ms is None]
            if missing:
                raise ValueError(f"target 'ratio' needs reference timings; missing for {missing[:3]}")
            y = np.array([r.ratio for r in records], dtype=np.float64)
            self.reference_ms = float(np.median([r.reference_ms for r in records]))
        else:
            y = np.array([r.latency_ms for r in records], dtype=np.float64)
            self.reference_ms = 1.0
        if not np.all(np.isfinite(y)) or np.any(y <= 0):
            raise ValueError("latencies must be finite and positive")
        self._fit(records, y)
        self.fitted = True
        self.fit_log_rmse = self._training_error(records, y)
        return self

    def _training_error(self, records: Sequence[LatencyRecord], y: np.ndarray) -> float:
        """RMS log error of the fitted predictor on its training targets (target units)."""
        pred = np.zeros(len(records))
        for space, ix in by_space(records):
            pred[ix] = self._predict(space, [records[i].policy for i in ix])
        ok = np.isfinite(pred) & (pred > 0)
        if not ok.any():
            return UNKNOWN_RELATIVE_STD
        return float(np.sqrt(np.mean((np.log(pred[ok]) - np.log(y[ok])) ** 2)))

    def predict(self, space: SearchSpace, policies: Sequence[Policy]) -> np.ndarray:
        """Predicted latency in ms of each policy (float64 array, one per policy)."""
        if not self.fitted:
            raise RuntimeError(f"{self.kind} predictor: call fit() or load() before predict()")
        if len(policies) == 0:
            return np.zeros(0, dtype=np.float64)
        out = np.asarray(self._predict(space, policies), dtype=np.float64) * self.reference_ms
        return np.maximum(out, 1e-6)

    def predict_uncertainty(
        self, space: SearchSpace, policies: Sequence[Policy]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(latency ms, standard deviation ms) of each policy: ``predict``'s value, and how sure
        the predictor is of it (float64 arrays, finite, the std > 0).

        The std is relative to the latency (``latency · s``), in the units the predictor
        learns (a ratio-target predictor's own error, not the 7-20 % a machine's absolute speed
        drifts between processes on top of it). ``s`` is, by ``uncertainty_source``:

        * ``ensemble`` (kinds that keep members, ``_predict_members``): the standard deviation of
          the log predictions of the members and the main model, combined in quadrature with
          the noise no member can learn (``fit_log_rmse``, the log error on the training
          records): large where the members disagree (architectures unlike the training ones),
          small on policies of an architecture the predictor was trained on;
        * ``held-out``: the predictor's held-out MAPE of what it learns (``ratio_mape`` for a
          ratio target, else ``mape``; ``metrics`` of a calibration's fit) as the std of a normal
          error (MAPE · sqrt(pi/2)): the same relative std everywhere;
        * ``training``: no held-out figures (a predictor fitted outside a calibration): its
          training error, which understates the error on unseen models;
        * ``unknown``: none of those (a fit saved before they were kept): ``UNKNOWN_RELATIVE_STD``.

        Never below ``MIN_RELATIVE_STD``.
        """
        ms = self.predict(space, policies)
        if len(policies) == 0:
            return ms, np.zeros(0, dtype=np.float64)
        members = self._predict_members(space, policies)
        if members is not None and len(members):
            logs = np.log(np.maximum(np.vstack([members, ms / self.reference_ms]), 1e-12))
            floor = self.fit_log_rmse if self.fit_log_rmse is not None else 0.0
            rel = np.sqrt(logs.var(axis=0) + floor**2)
        else:
            rel = np.full(len(policies), self._fallback_relative_std())
        rel = np.where(np.isfinite(rel), np.maximum(rel, MIN_RELATIVE_STD), UNKNOWN_RELATIVE_STD)
        return ms, ms * rel

    @property
    def uncertainty_source(self) -> str:
        """Where ``predict_uncertainty``'s std comes from: ``ensemble``, ``held-out``,
        ``training`` or ``unknown`` (see there)."""
        if self._has_members():
            return "ensemble"
        return self._fallback()[0]

    def _fallback(self) -> tuple[str, float]:
        key = "ratio_mape" if self.target == "ratio" and "ratio_mape" in self.metrics else "mape"
        mape = self.metrics.get(key)
        if isinstance(mape, (int, float)) and math.isfinite(mape) and mape >= 0:
            return "held-out", float(mape) / 100.0 * _MAE_TO_STD
        if self.fit_log_rmse is not None and math.isfinite(self.fit_log_rmse):
            return "training", self.fit_log_rmse
        return "unknown", UNKNOWN_RELATIVE_STD

    def _fallback_relative_std(self) -> float:
        return self._fallback()[1]

    def save(self, directory: Path) -> Path:
        """Write the predictor under ``directory`` (JSON + the subclass's safe-format files)."""
        if not self.fitted:
            raise RuntimeError("save() needs a fitted predictor")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "kind": self.kind,
            "target": self.target,
            "seed": self.seed,
            "reference_ms": self.reference_ms,
            "metrics": self.metrics,
            "statistic": self.statistic,
            "fit_log_rmse": self.fit_log_rmse,
            "feature_version": FEATURE_VERSION,
            "state": self._state(directory),
        }
        (directory / "predictor.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: Path) -> Predictor:
        """Read a predictor written by ``save`` (any kind when called on ``Predictor``).

        Raises:
            StalePredictorError: it was saved under another feature encoding; refit it.
        """
        directory = Path(directory)
        meta = json.loads((directory / "predictor.json").read_text())
        saved = int(meta.get("feature_version", 1))  # version 1 predates the field
        if saved != FEATURE_VERSION:
            raise StalePredictorError(
                f"{directory}: this {meta.get('kind', '?')} predictor was fitted on latency features "
                f"v{saved}, this version computes v{FEATURE_VERSION} (v3: a column for the pattern scheme; "
                "v2: precision per layer, int8 / 4-bit MatMulNBits, instead of one whole-model int8 "
                "flag); refit the device: "
                "`modeltailor calibrate --device NAME` (measurements of quantized models taken under "
                "the old export rule are not reused)"
            )
        impl = REGISTRY.get(meta["kind"]) if cls is Predictor else cls
        if impl is None:
            raise ValueError(
                f"{directory}: unknown predictor kind {meta['kind']!r}; known {sorted(REGISTRY)}"
            )
        obj = impl(target=meta["target"], seed=int(meta.get("seed", 0)))
        obj.reference_ms = float(meta["reference_ms"])
        obj.metrics = dict(meta.get("metrics") or {})
        obj.statistic = str(meta.get("statistic", "median"))
        rmse = meta.get("fit_log_rmse")  # absent in predictors saved before it was kept
        obj.fit_log_rmse = float(rmse) if isinstance(rmse, (int, float)) else None
        obj._restore(meta["state"], directory)
        obj.fitted = True
        return obj

    # -- subclass hooks
    @abstractmethod
    def _fit(self, records: Sequence[LatencyRecord], y: np.ndarray) -> None: ...

    @abstractmethod
    def _predict(self, space: SearchSpace, policies: Sequence[Policy]) -> np.ndarray: ...

    @abstractmethod
    def _state(self, directory: Path) -> dict[str, Any]: ...

    @abstractmethod
    def _restore(self, state: dict[str, Any], directory: Path) -> None: ...

    def _predict_members(self, space: SearchSpace, policies: Sequence[Policy]) -> np.ndarray | None:
        """Predictions of the ensemble members (members × policies, target units), or None for
        a kind without members (``predict_uncertainty`` then uses the held-out error)."""
        return None

    def _has_members(self) -> bool:
        """Whether ``_predict_members`` answers (a loaded predictor saved without members does not)."""
        return False


REGISTRY: dict[str, type[Predictor]] = {}


def register(cls: type[Predictor]) -> type[Predictor]:
    """Class decorator: make ``Predictor.load`` find this kind."""
    REGISTRY[cls.kind] = cls
    return cls


def load_predictor(directory: Path) -> Predictor:
    """Load any saved predictor (imports every built-in kind first)."""
    import latency_models.predictors  # noqa: F401  (registers the kinds)

    return Predictor.load(directory)


# --------------------------------------------------------------------------- metrics


def error_metrics(pred: np.ndarray, true: np.ndarray, prefix: str = "") -> dict[str, float]:
    """RMSE, MAPE (%), and % of predictions within ±5 % / ±10 % of the truth."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if len(true) == 0:
        return {}
    rel = np.abs(pred - true) / true
    return {
        f"{prefix}rmse": float(np.sqrt(np.mean((pred - true) ** 2))),
        f"{prefix}mape": float(100 * rel.mean()),
        f"{prefix}within_5pct": float(100 * np.mean(rel <= 0.05)),
        f"{prefix}within_10pct": float(100 * np.mean(rel <= 0.10)),
    }


def evaluate(predictor: Predictor, records: Sequence[LatencyRecord]) -> dict[str, float]:
    """Errors of ``predictor`` on ``records``: absolute ms, ratio to reference, speedup.

    The speedup error compares predicted dense/compressed with the speedup measured
    interleaved in one run (records without a dense timing, and the dense models themselves,
    are left out of it).
    """
    pred = np.zeros(len(records))
    pred_dense = np.full(len(records), np.nan)
    for space, ix in by_space(records):
        pols = [records[i].policy for i in ix]
        p = predictor.predict(space, [*pols, Policy.dense()])
        pred[ix] = p[:-1]
        pred_dense[ix] = p[-1]
    true = np.array([r.latency_ms for r in records])
    out: dict[str, float] = {"n": float(len(records)), "n_arch": float(len({r.arch_id for r in records}))}
    out.update({k.replace("rmse", "rmse_ms"): v for k, v in error_metrics(pred, true).items()})
    with_ratio = [i for i, r in enumerate(records) if r.ratio is not None and r.reference_ms]
    if with_ratio:
        ratio_pred = pred[with_ratio] / predictor.reference_ms if predictor.target == "ratio" else None
        if ratio_pred is None:  # an ms predictor: express in this run's reference units
            ratio_pred = pred[with_ratio] / np.array([records[i].reference_ms or 1.0 for i in with_ratio])
        ratio_true = np.array([records[i].ratio or 0.0 for i in with_ratio])
        out.update(error_metrics(ratio_pred, ratio_true, "ratio_"))
    # dense records have speedup 1 by construction (and predicted 1 too): leave them out
    dense = Policy.dense()
    sp = [i for i, r in enumerate(records) if r.speedup is not None and r.policy != dense]
    if sp:
        sp_pred = pred_dense[sp] / pred[sp]
        sp_true = np.array([records[i].speedup or 0.0 for i in sp])
        out.update(error_metrics(sp_pred, sp_true, "speedup_"))
    return out


def group_split(
    records: Sequence[LatencyRecord], test_fraction: float = 0.25, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Train / test indices with whole architectures (``arch_id``) on one side only."""
    arches = sorted({r.arch_id for r in records})
    if len(arches) < 2:
        raise ValueError("a held-out split needs records of at least two architectures")
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(arches))
    n_test = min(len(arches) - 1, max(1, round(test_fraction * len(arches))))
    test_arches = set(order[:n_test])
    train = [i for i, r in enumerate(records) if r.arch_id not in test_arches]
    test = [i for i, r in enumerate(records) if r.arch_id in test_arches]
    return train, test


def holdout_metrics(
    factory: Callable[[], Predictor],
    records: Sequence[LatencyRecord],
    *,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> dict[str, float]:
    """Fit ``factory()`` on some architectures, report its errors on the others."""
    train, test = group_split(records, test_fraction, seed)
    model = factory().fit([records[i] for i in train])
    out = evaluate(model, [records[i] for i in test])
    out["n_train"] = float(len(train))
    out["n_train_arch"] = float(len({records[i].arch_id for i in train}))
    return out
