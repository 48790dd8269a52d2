"""More measurements of one model on a device, and the predictor refitted on them.

What a job's calibration in the loop needs from the latency side (``engine.active_measurement``
decides when and what): time chosen policies of the job's own model through the calibration's
own transports (``latency_models.calibration_run``: the harness in this process, or tasks a
device agent pulls), each interleaved with the dense model and the reference in one run as a
calibration sample is, and refit the predictor the job scores with on the device's measurements
including the new ones, kept as a new version of the device's store.

A refit fits one kind (the job's) on every current measurement, with the base predictor's
target and statistic; no held-out split is fitted again (a job cannot wait for every kind's
cross-validation between two rounds): the version's metrics keep the base version's held-out
figures, labelled with the version they come from, beside what the refit saw (``refit``).

Heavy imports (torch, the predictors) happen inside functions: the API imports this module.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latency_models.calibration_run import CalibrationStopped

if TYPE_CHECKING:
    from compression.model_io import CompressibleModel
    from compression.policy import Policy
    from latency_models.calibration_run import Transport
    from latency_models.predictors import LatencyRecord, Predictor
    from latency_models.sampling import CalibrationSample
    from latency_models.store import DeviceStore

log = logging.getLogger("modeltailor.latency")

#: Timed runs per measured policy (a calibration sample's).
RUNS = 100
#: Attempts at writing a version when another writer took the same number meanwhile.
SAVE_ATTEMPTS = 5

_SAVE_LOCKS: dict[str, threading.Lock] = {}
_SAVE_LOCKS_GUARD = threading.Lock()


@dataclass(frozen=True)
class Measured:
    """One policy timed on the device: its records (the compressed model's first, then the dense
    model's when this was the model's first timing), or why it could not be timed."""

    policy: Policy
    records: tuple[LatencyRecord, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.records)

    @property
    def latency_ms(self) -> float | None:
        return float(self.records[0].latency_ms) if self.records else None

    def speedup(self, statistic: str = "median") -> float | None:
        """Dense over this policy, both timed in the same run, by ``statistic`` of the runs
        (``latency_models.predictors.base.with_statistic``; the median when the record lacks it)."""
        if not self.records:
            return None
        from latency_models.predictors.base import supports_statistic, with_statistic

        first = [self.records[0]]
        record = with_statistic(first, statistic)[0] if supports_statistic(first, statistic) else first[0]
        value = record.speedup
        return float(value) if value is not None and math.isfinite(value) and value > 0 else None


@dataclass
class _Collector:
    """The calibration loop's sink for a handful of samples: keeps each one's outcome."""

    index: dict[int, int]
    should_stop: Callable[[], bool]
    progress: Callable[[int, int], None] | None
    total: int
    records: dict[int, list[LatencyRecord]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)

    def check_stop(self) -> None:
        if self.should_stop():
            raise CalibrationStopped("stopped while measuring on the device")

    def _done(self, done: int) -> None:
        if self.progress is not None:
            self.progress(min(done, self.total), self.total)

    def measured(self, done: int, sample: CalibrationSample, records: Sequence[LatencyRecord]) -> None:
        self.records[self.index[id(sample)]] = list(records)
        self._done(done)

    def skipped(self, done: int, sample: CalibrationSample, why: object) -> None:
        self.errors[self.index[id(sample)]] = str(why)[:300] or "not timed"
        self._done(done)

    def waiting(self, done: int, for_agent: bool) -> None:
        return None


def model_samples(
    model: CompressibleModel, ids: tuple[str, str], policies: Sequence[Policy]
) -> list[CalibrationSample]:
    """The policies of ``model`` as calibration samples (the model's calibration space, so its
    records join the ones a calibration of the same model takes)."""
    from compression.space_builder import space_for
    from latency_models.sampling import SPACE_OPTIONS, CalibrationSample

    space = space_for(model, SPACE_OPTIONS)
    arch_id, space_id = ids
    return [CalibrationSample(arch_id, space_id, model, space, p) for p in policies]


def measure_policies(
    transport: Transport,
    model: CompressibleModel,
    ids: tuple[str, str],
    policies: Sequence[Policy],
    *,
    runs: int = RUNS,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Callable[[int, int], None] | None = None,
    workdir: Path | None = None,
) -> list[Measured]:
    """Time each policy of ``model`` through ``transport``; one :class:`Measured` per policy, in order.

    A policy whose export or timing fails is reported with its error, never fatal.

    Raises:
        CalibrationStopped: ``should_stop()`` turned true.
        CalibrationError: an agent-measured device had no agent answer in time.
    """
    import torch

    samples = model_samples(model, ids, policies)
    sink = _Collector({id(s): i for i, s in enumerate(samples)}, should_stop, progress, len(samples))
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="mt-incr-", dir=workdir) as tmp:
        transport.measure(iter(samples), runs=runs, workdir=Path(tmp), sink=sink)
    return [
        Measured(
            p, tuple(sink.records.get(i, ())), None if i in sink.records else sink.errors.get(i, "not timed")
        )
        for i, p in enumerate(policies)
    ]


def refit(records: Sequence[LatencyRecord], base: Predictor, *, seed: int = 0) -> Predictor:
    """A new predictor of ``base``'s kind, target and statistic fitted on ``records``.

    Records that lack the statistic's fields (older harnesses, some agents) make the fit use the
    median for all of them, as a calibration's fit does.

    Raises:
        ValueError: no records, or latencies that are not finite and positive.
    """
    from latency_models.predictors.base import supports_statistic, with_statistic

    statistic = base.statistic if supports_statistic(records, base.statistic) else "median"
    fitted = type(base)(target=base.target, seed=seed).fit(with_statistic(records, statistic))
    fitted.statistic = statistic
    fitted.metrics = dict(base.metrics)
    return fitted


def refit_document(
    records: Sequence[LatencyRecord],
    predictor: Predictor,
    *,
    base_version: int,
    capabilities: Mapping[str, Any] | None,
    note: Mapping[str, Any],
) -> dict[str, Any]:
    """The metrics.json of a refitted version: the base version's held-out figures (named as
    such), the device's capabilities carried over, and what the refit saw (``note``)."""
    held_out = {**dict(predictor.metrics), "from_version": base_version} if predictor.metrics else {}
    doc: dict[str, Any] = {
        "target": predictor.target,
        "statistic": predictor.statistic,
        "records": len(records),
        "architectures": len({r.arch_id for r in records}),
        "split": f"held-out figures of version {base_version} (a refit fits no held-out split)",
        "predictors": {predictor.kind: held_out},
        "refit": {"of_version": base_version, **dict(note)},
    }
    if capabilities:
        doc["capabilities"] = dict(capabilities)
    return doc


def save_version(store: DeviceStore, predictor: Predictor, doc: Mapping[str, Any]) -> int:
    """Write ``predictor`` as the store's next version; its number in the store.

    Versions are numbered by the store's folders: writers in this process take turns, and a
    writer in another process that took the same number meanwhile makes this one retry.
    """
    with _SAVE_LOCKS_GUARD:
        lock = _SAVE_LOCKS.setdefault(str(store.root), threading.Lock())
    with lock:
        for attempt in range(SAVE_ATTEMPTS):
            try:
                return store.save_version({predictor.kind: predictor}, doc, predictor.kind)
            except OSError as exc:  # another process wrote that number first
                if attempt == SAVE_ATTEMPTS - 1:
                    raise
                log.info("store %s: version taken meanwhile (%s); retrying", store.root, exc)
                time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")
