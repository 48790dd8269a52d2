"""Samples timed under load: found by the reference model's time, re-timed, refused, counted.

Every calibration sample times the reference model interleaved with the sample's models in one
run (``latency_models.harness``), and the predictors learn ratios taken in that run. A load
that stays the same over the run cancels out of those ratios; one that comes and goes during
the run does not, and it shows as a reference slower than usual. So, the rule (one-sided):

* the reference's median in the sample's run is compared with the median of the reference's
  medians over the last ``window`` runs of the same calibration (20);
* slower by more than ``max_drift`` (15 %: twice the 7 % a quiet machine's medians wander
  between runs) and the sample is **re-timed** (the same exported files, a new interleaved
  run), up to ``retries`` more times (2);
* still slower after those, it is **refused**: not stored, not learned from, and reported
  (a :class:`SampleRefused`, which the calibration loops count as a skipped sample);
* a faster reference is never refused (the machine was busier before, not now); the first
  ``min_history`` runs (3) are accepted as they come: there is nothing to compare them with;
* the window holds every run seen, refused ones included, so that a lasting change of the
  machine's speed (another steady job started) becomes the new normal within about
  ``window / 2`` runs instead of refusing the rest of the calibration.

Each guard counts what it did (:meth:`LoadGuard.summary`, stored as ``noise`` in the
calibration's metrics) and logs every re-timing and refusal on ``modeltailor.latency``.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

__all__ = ["LoadGuard", "SampleRefused", "Verdict"]

log = logging.getLogger("modeltailor.latency")

T = TypeVar("T")
Verdict = Literal["accept", "retry", "refuse"]


class SampleRefused(RuntimeError):
    """A sample stayed timed under load after its re-timings; the calibration skips it."""


@dataclass
class LoadGuard:
    """Judges each sample's run by its reference time (see the module doc for the rule).

    Attributes:
        max_drift: largest accepted slowdown of the reference against the recent median.
        retries: re-timings of a sample before it is refused.
        window: runs the recent median is taken over.
        min_history: runs seen before any is judged.
    """

    max_drift: float = 0.15
    retries: int = 2
    window: int = 20
    min_history: int = 3
    samples: int = field(default=0, init=False)
    retried: int = field(default=0, init=False)
    refused: int = field(default=0, init=False)
    retimings: int = field(default=0, init=False)
    last_refusal: str = field(default="", init=False)
    _seen: deque[float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.max_drift > 0 or self.retries < 0 or self.window < 1 or self.min_history < 1:
            raise ValueError(
                "LoadGuard needs max_drift > 0, retries >= 0, window >= 1 and min_history >= 1; got "
                f"{self.max_drift}, {self.retries}, {self.window}, {self.min_history}"
            )
        self._seen = deque(maxlen=self.window)

    def drift(self, reference_ms: float | None) -> float | None:
        """Record one run's reference median; how much slower than the recent median it was,
        when that is more than ``max_drift`` (else None: the run is accepted)."""
        if reference_ms is None or not math.isfinite(reference_ms) or reference_ms <= 0:
            return None  # a run without a reference cannot be judged
        history = list(self._seen)
        self._seen.append(float(reference_ms))
        if len(history) < self.min_history:
            return None
        slower = reference_ms / statistics.median(history) - 1.0
        return slower if slower > self.max_drift else None

    def verdict(self, reference_ms: float | None, attempt: int, what: str) -> Verdict:
        """``accept``, ``retry`` or ``refuse`` the timing ``attempt`` (0: the first) of a sample,
        by its run's reference median; counts and logs what it decides."""
        if attempt == 0:
            self.samples += 1
        else:
            self.retimings += 1
        off = self.drift(reference_ms)
        if off is None:
            return "accept"
        if attempt == 0:
            self.retried += 1
        log.info(
            "%s: reference %.0f %% slower than this calibration's recent median (timing %d of %d)",
            what,
            100 * off,
            attempt + 1,
            self.retries + 1,
        )
        if attempt < self.retries:
            return "retry"
        self.refused += 1
        self.last_refusal = (
            f"refused: timed under load (the reference ran {100 * off:.0f} % slower than this "
            f"calibration's recent median in its last of {self.retries + 1} timings; limit "
            f"{100 * self.max_drift:.0f} %)"
        )
        log.warning("%s: %s", what, self.last_refusal)
        return "refuse"

    def timed(self, measure: Callable[[], T], reference_ms: Callable[[T], float | None], what: str) -> T:
        """``measure()`` until its run's reference passes the rule; raises :class:`SampleRefused`
        once ``retries`` re-timings were all too slow."""
        attempt = 0
        while True:
            result = measure()
            decision = self.verdict(reference_ms(result), attempt, what)
            if decision == "accept":
                return result
            if decision == "refuse":
                raise SampleRefused(self.last_refusal)
            attempt += 1

    def summary(self) -> dict[str, Any]:
        """What the guard did, for the calibration's metrics (``noise``)."""
        return {
            "rule": "reference median slower than the median of the last runs' by more than max_drift",
            "max_drift": self.max_drift,
            "retries": self.retries,
            "window": self.window,
            "samples": self.samples,
            "retried": self.retried,
            "refused": self.refused,
            "retimings": self.retimings,
        }
