"""Keep a latency target on a device whose speed changes: switch between a family's points.

A family bundle (``modeltailor family``; ``compression.family_export``) holds K operating points
that share one weight set, each with its accuracy and its latency measured when the bundle was
made (``family.json``). :class:`FamilySwitch` runs one point at a time and, after every
inference, estimates how fast the device is *now*: ``speed`` is an exponentially weighted
moving average of observed / expected latency of the point that ran (1.0 = as fast as when
expected latencies were measured; 2.0 = twice as slow), each observation being a ``quantile``
of the last ``window`` ratios. The median (0.5) ignores a single inference preempted by
another process (a spike of a whole scheduler time slice) and follows a lasting slowdown
within a few inferences; the default, the 0.9 quantile of 10, plans for the slow inferences
themselves, which is what keeps a per-inference target on a shared core
(``bench/family_bench.py``: over the busy phase, 6 % of inferences over the target instead of
39 % with the median at batch 8). It then runs the most accurate point whose expected latency × speed fits the
target:

* **down** at once: as soon as the current point's predicted latency exceeds the target, the
  most accurate point that fits takes over (the fastest when none fits);
* **up** with hysteresis: a more accurate point takes over only after its predicted latency
  has stayed under ``target × (1 − up_margin)`` for ``up_patience`` inferences in a row and
  at least ``up_hold_s`` seconds, so a device hovering at the boundary, or a busy spell of
  other processes, does not make it flap between two points.

The speed estimate assumes a slowdown scales every point alike (frequency scaling, a busy
core). Expected latencies are the manifest's (measured on the machine that built the bundle);
:meth:`FamilySwitch.profile` re-measures them here, which is what a device other than the
build machine should do once at start. They hold for the input shape they were measured with
(batch 1 unless ``profile`` is given another input). :meth:`FamilySwitch.probe` times the
current point on a stored input when the application has not run inferences for a while.

This module imports only numpy and onnxruntime (and the standard library), so it ships beside
ONNX Runtime on the device without torch or the rest of modeltailor. Not thread-safe: use one
switch per inference thread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BundleError", "FamilySwitch", "SwitchPoint", "load_manifest"]

MANIFEST = "family.json"
FORMAT = "modeltailor-family"


class BundleError(ValueError):
    """A bundle folder that cannot be used: the message names the file and what is wrong."""


@dataclass(frozen=True)
class SwitchPoint:
    """One operating point as the switch sees it."""

    index: int
    file: Path
    accuracy: float
    latency_ms: float


def load_manifest(bundle: str | Path) -> tuple[dict[str, Any], list[SwitchPoint]]:
    """The manifest of ``bundle`` (a folder holding ``family.json``) and its points.

    Raises:
        BundleError: no manifest, another format, or a point without its file, accuracy or latency.
    """
    folder = Path(bundle)
    path = folder / MANIFEST if folder.is_dir() else folder
    if not path.is_file():
        raise BundleError(f"{path}: no family manifest here; pass the folder `modeltailor family` wrote")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not a readable JSON manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a family manifest (format must be {FORMAT!r})")
    raw = manifest.get("points")
    if not isinstance(raw, list) or not raw:
        raise BundleError(f"{path}: the manifest lists no points")
    points: list[SwitchPoint] = []
    for i, entry in enumerate(raw):
        try:
            file = path.parent / str(entry["file"])
            accuracy = float(entry["accuracy"])
            latency = float(entry["latency_ms"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{path}: point {i} needs file, accuracy and latency_ms ({exc})") from exc
        if not file.is_file():
            raise BundleError(f"{path}: point {i}'s graph {file.name} is missing from the bundle")
        if not (latency > 0 and np.isfinite(latency)):
            raise BundleError(f"{path}: point {i} has latency_ms {latency}; it must be a positive number")
        points.append(SwitchPoint(i, file, accuracy, latency))
    return manifest, points


class FamilySwitch:
    """Runs a family bundle, switching points to keep ``target_ms`` per inference.

    Args:
        bundle: the bundle folder (or its ``family.json``).
        target_ms: the latency each inference should keep.
        threads: ONNX Runtime intra-op threads per session.
        alpha: weight of the newest observation in the speed estimate (0 < alpha <= 1).
        window: observed / expected ratios one observation is taken from (1 = each alone).
        quantile: the quantile of those ratios taken instead of the median (0.5): a higher one
            plans for the slow inferences, e.g. those a busy core preempts.
        up_margin: headroom a more accurate point needs before it takes over (fraction of the target).
        up_patience: inferences in a row that headroom must last.
        up_hold_s: seconds that headroom must last too (inferences of a millisecond pass
            ``up_patience`` in a few milliseconds, shorter than a scheduler's time slice).
        preload: create every point's session now (switching then costs nothing); otherwise
            a point's session is created the first time it runs.
        on_switch: called with (old point, new point, speed) at every switch.
    """

    def __init__(
        self,
        bundle: str | Path,
        target_ms: float,
        *,
        threads: int = 1,
        alpha: float = 0.3,
        window: int = 10,
        quantile: float = 0.9,
        up_margin: float = 0.15,
        up_patience: int = 20,
        up_hold_s: float = 0.25,
        preload: bool = True,
        on_switch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        if not (target_ms > 0 and np.isfinite(target_ms)):
            raise ValueError(f"target_ms must be a positive number, got {target_ms}")
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not 0.0 <= up_margin < 1.0:
            raise ValueError(f"up_margin must be in [0, 1), got {up_margin}")
        if up_patience < 1:
            raise ValueError(f"up_patience must be at least 1, got {up_patience}")
        if not up_hold_s >= 0:
            raise ValueError(f"up_hold_s must be at least 0, got {up_hold_s}")
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.manifest, self.points = load_manifest(bundle)
        self.target_ms = float(target_ms)
        self.threads = threads
        self.alpha = alpha
        self.window = window
        self.quantile = quantile
        self._ratios: list[float] = []
        self.up_margin = up_margin
        self.up_patience = up_patience
        self.up_hold_s = up_hold_s
        self._headroom_since = 0.0
        self.on_switch = on_switch
        self.expected = [p.latency_ms for p in self.points]
        # Most accurate first; among equals the faster.
        self.order = sorted(
            range(len(self.points)), key=lambda i: (-self.points[i].accuracy, self.expected[i])
        )
        self._sessions: dict[int, Any] = {}
        self._input_name: str | None = None
        self._probe_input: np.ndarray | None = None
        self.speed = 1.0
        self.current = self.choose(self.speed)
        self.switches = 0
        self.runs = 0
        self.last_ms: float | None = None  # the last inference run()
        self.last_point: int | None = None
        self._headroom = 0
        if preload:
            for i in range(len(self.points)):
                self._session(i)

    # ---------------------------------------------------------------- sessions

    def _session(self, i: int) -> Any:
        session = self._sessions.get(i)
        if session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            try:
                session = ort.InferenceSession(
                    str(self.points[i].file), sess_options=options, providers=["CPUExecutionProvider"]
                )
            except Exception as exc:
                raise BundleError(f"ONNX Runtime cannot load {self.points[i].file}: {exc}") from exc
            self._sessions[i] = session
            if self._input_name is None:
                inp = session.get_inputs()[0]
                self._input_name = inp.name
                shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in inp.shape)
                self._probe_input = np.zeros(shape, dtype=np.float32)
        return session

    # ---------------------------------------------------------------- decisions

    def predicted_ms(self, i: int, speed: float | None = None) -> float:
        """Point ``i``'s latency at ``speed`` (default: the current estimate)."""
        return self.expected[i] * (self.speed if speed is None else speed)

    def choose(self, speed: float, margin: float = 0.0) -> int:
        """The most accurate point whose latency at ``speed`` fits ``target × (1 − margin)``;
        the fastest point when none does."""
        limit = self.target_ms * (1.0 - margin)
        for i in self.order:
            if self.expected[i] * speed <= limit:
                return i
        return min(range(len(self.points)), key=lambda i: self.expected[i])

    def observe(self, latency_ms: float, point: int | None = None) -> int:
        """Take one observed latency of ``point`` (default: the current one); returns the point
        to run next."""
        i = self.current if point is None else point
        ratio = float(latency_ms) / self.expected[i]
        if np.isfinite(ratio) and ratio > 0:
            self._ratios = [*self._ratios[-(self.window - 1) :], ratio] if self.window > 1 else [ratio]
            observed = float(np.quantile(self._ratios, self.quantile))
            self.speed = (1.0 - self.alpha) * self.speed + self.alpha * observed
        self._decide()
        return self.current

    def _rank(self, i: int) -> int:
        return self.order.index(i)

    def _decide(self) -> None:
        fits = self.choose(self.speed)
        if self._rank(fits) > self._rank(self.current):  # current no longer fits: down now
            self._switch(fits)
            return
        if self._rank(fits) == self._rank(self.current):
            self._headroom = 0
            return
        roomy = self.choose(self.speed, self.up_margin)
        if self._rank(roomy) < self._rank(self.current):
            now = time.monotonic()
            if self._headroom == 0:
                self._headroom_since = now
            self._headroom += 1
            if self._headroom >= self.up_patience and now - self._headroom_since >= self.up_hold_s:
                self._switch(roomy)
        else:
            self._headroom = 0

    def _switch(self, new: int) -> None:
        old = self.current
        self.current = new
        self._headroom = 0
        self.switches += 1
        if self.on_switch is not None:
            self.on_switch(old, new, self.speed)

    # ---------------------------------------------------------------- running

    def run(self, x: np.ndarray) -> np.ndarray:
        """The current point's first output for ``x``; the inference is timed and observed."""
        i = self.current
        session = self._session(i)
        feed = {self._input_name: np.ascontiguousarray(x, dtype=np.float32)}
        start = time.perf_counter()
        out = session.run(None, feed)[0]
        elapsed = (time.perf_counter() - start) * 1000.0
        self.runs += 1
        self.last_ms = elapsed
        self.last_point = i
        self.observe(elapsed, i)
        return np.asarray(out)

    def probe(self, runs: int = 3) -> float:
        """Time the current point on a stored input ``runs`` times (a tiny reference run when the
        application has been idle) and fold each into the speed estimate; returns the speed."""
        i = self.current
        session = self._session(i)
        assert self._input_name is not None and self._probe_input is not None
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, {self._input_name: self._probe_input})
            self.observe((time.perf_counter() - start) * 1000.0, i)
        return self.speed

    def profile(self, x: np.ndarray | None = None, *, runs: int = 20, warmup: int = 3) -> list[float]:
        """Measure every point's latency here (median of ``runs``, interleaved across points) and
        use them as expected latencies; the speed estimate restarts at 1.0."""
        for i in range(len(self.points)):
            self._session(i)
        assert self._input_name is not None and self._probe_input is not None
        feed = {
            self._input_name: self._probe_input if x is None else np.ascontiguousarray(x, dtype=np.float32)
        }
        samples: list[list[float]] = [[] for _ in self.points]
        for rep in range(warmup + runs):
            for i in range(len(self.points)):
                start = time.perf_counter()
                self._sessions[i].run(None, feed)
                if rep >= warmup:
                    samples[i].append((time.perf_counter() - start) * 1000.0)
        self.expected = [float(np.median(s)) for s in samples]
        self.order = sorted(
            range(len(self.points)), key=lambda i: (-self.points[i].accuracy, self.expected[i])
        )
        self.speed = 1.0
        self._ratios = []
        self._headroom = 0
        self.current = self.choose(self.speed)
        return list(self.expected)
