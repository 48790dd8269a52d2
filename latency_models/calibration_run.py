"""The latency calibration loop: plan samples, have them measured, keep the measurements,
fit every predictor kind and store a new predictor version.

(*Latency* calibration: measuring a device to fit its latency predictor. Not to be confused
with BatchNorm statistics re-estimation, ``compression.bn``, or the int8 quantization
calibration batches of ``latency_models.calibrate.export_for_device``.)

One loop, two transports of the same measurements:

* :class:`HarnessTransport`: the built-in harness times each sample in this process (a
  device this machine can run);
* :class:`AgentTransport`: each sample becomes a task that a device agent on the board pulls,
  times and answers (``modeltailor device-agent``); a window of tasks is kept outstanding.

The loop persists nothing itself. Measurements go to a file store
(``latency_models.store.DeviceStore``, which also holds the fitted versions), and everything
else through two small protocols the caller implements: :class:`CalibrationStore` (progress
and liveness, measurement rows, publishing a fitted version, the outcome) and
:class:`TaskQueue` (the tasks of the agent transport). The service implements them over its
database (``service.calibrations``, ``service.device_tasks``); tests may use in-memory ones.

Heavy imports (torch, the predictors) happen inside functions: the API imports this module.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from latency_models.focus import FOCUSED_RANDOM_FRACTION, focus_metrics, focused_plan
from latency_models.load_guard import LoadGuard

if TYPE_CHECKING:
    from compression.model_io import CompressibleModel
    from compression.policy import Policy
    from compression.space import SearchSpace
    from latency_models.capabilities import Capabilities, Trial
    from latency_models.devices import Device
    from latency_models.harness import Measurement
    from latency_models.predictors import LatencyRecord
    from latency_models.sampling import CalibrationSample
    from latency_models.store import DeviceStore

log = logging.getLogger("modeltailor.latency")

#: Samples of a calibration whose parameters do not say.
DEFAULT_SAMPLES = 48
#: Tasks of one calibration outstanding at once on an agent-measured device (keeps agents busy).
TASK_WINDOW = 4
#: How often the agent transport looks at its tasks.
POLL_S = 0.25
#: Purpose of the device-agent tasks that time capability trials (``latency_models.capabilities``).
CAPABILITY_PURPOSE = "capability"

Progress = Callable[[int, int, str], None]


class CalibrationError(RuntimeError):
    """A calibration could not produce a predictor (the message says why and what to do)."""


class CalibrationStopped(CalibrationError):
    """The calibration was cancelled (by a user, its job, or the process stopping)."""


# --------------------------------------------------------------------------- protocols


class CalibrationStore(Protocol):
    """Where one calibration keeps what it does (the service: its ``calibrations`` row and tables)."""

    def beat(self, done: int, total: int, skipped: int, message: str) -> None:
        """Record progress and renew the calibration's liveness; raise :class:`CalibrationStopped`
        when the calibration was ended meanwhile (cancelled, deleted, or given up as abandoned)."""

    def record(self, sample: CalibrationSample, records: Sequence[LatencyRecord]) -> None:
        """Keep the measurements the loop took itself (the agent transport's are kept as tasks)."""

    def publish(self, stored_version: int, metrics: dict[str, Any]) -> int:
        """Make the file store's version ``stored_version`` known with ``metrics``; the version
        number users see (unique on the device)."""

    def end(
        self,
        status: str,
        error: str | None,
        version: int | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        """Record the outcome (``succeeded`` / ``failed`` / ``cancelled``) unless it ended already."""


@dataclass(frozen=True)
class TaskOutcome:
    """An agent's answer to one task: ``ok`` with the result's stats, or the error."""

    task: int
    ok: bool
    error: str | None
    stats: Mapping[str, Any]


class TaskQueue(Protocol):
    """Measurement tasks device agents pull (the service: ``measurements`` rows)."""

    def add(
        self,
        *,
        model: Path,
        baseline: Path,
        runs: int,
        warmup: int,
        info: dict[str, Any],
        features: dict[str, Any],
        purpose: str | None = None,
    ) -> int:
        """Queue one timing of ``model`` interleaved with ``baseline``; the task's id.
        ``purpose`` tells apart the capability trials (``capability``) from the samples."""

    def poll(self, tasks: Sequence[int]) -> tuple[bool, list[TaskOutcome]]:
        """(whether any of ``tasks`` was handed to an agent, the ones that ended)."""


class Sink(Protocol):
    """What a transport reports to the loop (implemented by :class:`CalibrationRun`)."""

    def check_stop(self) -> None: ...

    def measured(self, done: int, sample: CalibrationSample, records: Sequence[LatencyRecord]) -> None: ...

    def skipped(self, done: int, sample: CalibrationSample, why: object) -> None: ...

    def waiting(self, done: int, for_agent: bool) -> None: ...


class Transport(Protocol):
    """Has samples timed on the device and reports each to the loop's :class:`Sink`."""

    #: Whether the measurements it reports still need :meth:`CalibrationStore.record`.
    records_itself: bool

    def measure(
        self, samples: Iterator[CalibrationSample], *, runs: int, workdir: Path, sink: Sink
    ) -> None: ...

    def time_trials(
        self, trials: Sequence[Trial], *, runs: int, workdir: Path, sink: Sink
    ) -> dict[str, float]:
        """Time each capability trial against its dense probe in one run: {key: speedup}
        (``latency_models.capabilities``); a trial that could not be timed is left out."""
        ...


def _p10_speedup(baseline: Measurement, model: Measurement) -> float:
    """Dense over variant by the fast tail of one interleaved run: on a shared machine the
    steadier ratio of two small models (``PairMeasurement.speedup_p10``)."""
    return baseline.p10_ms / model.p10_ms


def _trial_file(workdir: Path, trial: Trial | None, probe: str) -> Path:
    name = trial.key.replace("/", "-") if trial is not None else f"{probe}-dense"
    return workdir / f"capability-{name}.onnx"


# --------------------------------------------------------------------------- transports


@dataclass
class HarnessTransport:
    """Time each sample in this process with the built-in harness; ``guard`` re-times or
    refuses samples taken under load (``latency_models.load_guard``) and counts them."""

    device: Device
    records_itself: bool = False
    guard: LoadGuard = field(default_factory=LoadGuard)

    def measure(self, samples: Iterator[CalibrationSample], *, runs: int, workdir: Path, sink: Sink) -> None:
        from latency_models.calibrate import measure_sample

        dense_cache: dict[str, Any] = {}
        for i, sample in enumerate(samples):
            sink.check_stop()
            try:
                new = measure_sample(
                    sample,
                    self.device,
                    workdir,
                    runs=runs,
                    warmup=10,
                    dense_cache=dense_cache,
                    guard=self.guard,
                )
            except Exception as exc:  # one bad model must not end a calibration
                sink.skipped(i + 1, sample, exc)
                continue
            sink.measured(i + 1, sample, new)

    def time_trials(
        self, trials: Sequence[Trial], *, runs: int, workdir: Path, sink: Sink
    ) -> dict[str, float]:
        from compression.policy import Policy
        from latency_models.calibrate import export_for_device
        from latency_models.harness import measure_pair

        dense: dict[str, Any] = {}
        out: dict[str, float] = {}
        for trial in trials:
            sink.check_stop()
            try:
                if trial.probe not in dense:
                    dense[trial.probe] = export_for_device(
                        trial.model,
                        trial.space,
                        Policy.dense(),
                        self.device,
                        _trial_file(workdir, None, trial.probe),
                    )[0]
                model, shape, _int8 = export_for_device(
                    trial.model,
                    trial.space,
                    trial.policy,
                    self.device,
                    _trial_file(workdir, trial, trial.probe),
                )
                pair = measure_pair(
                    dense[trial.probe], model, self.device, runs=runs, warmup=5, input_shape=shape
                )
            except Exception as exc:  # one trial must not end the calibration
                log.info("capability trial %s not timed: %s", trial.key, exc)
                continue
            out[trial.key] = _p10_speedup(pair.a, pair.b)
        return out


@dataclass
class _Task:
    """A sample queued for an agent: its exported files, and which timing of it this is."""

    sample: CalibrationSample
    int8: bool
    first: bool
    model: Path
    baseline: Path
    attempt: int = 0


@dataclass
class AgentTransport:
    """Queue each sample as a task for the device's agents; collect their answers.

    An answer timed under load (its reference slower than the calibration's recent median,
    ``latency_models.load_guard``) is queued again, and refused if it stays so; ``guard`` counts.

    Args:
        device: the device as the exports must target it.
        device_id: how agents name the device (for the "start one" hint).
        tasks: the task queue.
        agent_wait_s: fail when no agent picked up any task for this long.
        device_name: the device's name in messages (default ``device.name``).
    """

    device: Device
    device_id: int
    tasks: TaskQueue
    agent_wait_s: float
    window: int = TASK_WINDOW
    poll_s: float = POLL_S
    device_name: str = ""
    records_itself: bool = True
    guard: LoadGuard = field(default_factory=LoadGuard)

    def measure(self, samples: Iterator[CalibrationSample], *, runs: int, workdir: Path, sink: Sink) -> None:
        from latency_models.calibrate import export_sample

        dense_files: dict[str, Any] = {}
        outstanding: dict[int, _Task] = {}
        finished = 0
        last_claim = time.monotonic()
        exhausted = False
        while not exhausted or outstanding:
            sink.check_stop()
            while not exhausted and len(outstanding) < self.window:
                sample = next(samples, None)
                if sample is None:
                    exhausted = True
                    break
                try:
                    dense, path, _shape, int8, first = export_sample(
                        sample, self.device, workdir, dense_files
                    )
                except Exception as exc:
                    finished += 1
                    sink.skipped(finished, sample, exc)
                    continue
                task = _Task(sample, int8, first, Path(path), Path(dense))
                outstanding[self._queue(task, runs)] = task
            if not outstanding:
                continue
            claimed_any, ended = self.tasks.poll(list(outstanding))
            if claimed_any:
                last_claim = time.monotonic()
            for outcome in ended:
                task = outstanding.pop(outcome.task)
                sample = task.sample
                if not outcome.ok:
                    finished += 1
                    sink.skipped(finished, sample, outcome.error)
                    continue
                records = records_from_result(sample, task.int8, outcome.stats, with_dense=task.first)
                what = f"{sample.space_id} {sample.policy.hash}"
                decision = self.guard.verdict(records[0].reference_ms, task.attempt, what)
                if decision == "retry":  # timed under load: the same files, timed again
                    task.attempt += 1
                    outstanding[self._queue(task, runs)] = task
                    continue
                finished += 1
                if decision == "refuse":
                    if task.first:  # the model's dense record is still to take: with its next sample
                        dense_files.pop(sample.space_id, None)
                    sink.skipped(finished, sample, self.guard.last_refusal)
                    continue
                sink.measured(finished, sample, records)
            if not ended:
                waited = time.monotonic() - last_claim
                if waited > self.agent_wait_s:
                    name = self.device_name or self.device.name
                    raise CalibrationError(
                        f"no device agent picked up a task of device {name} (id {self.device_id}) for "
                        f"{waited:.0f} s; start one on the device: modeltailor device-agent --server URL "
                        f"--device {self.device_id} --token KEY"
                    )
                sink.waiting(finished, not claimed_any)
                time.sleep(self.poll_s)

    def _queue(self, task: _Task, runs: int) -> int:
        return self.tasks.add(
            model=task.model,
            baseline=task.baseline,
            runs=runs,
            warmup=10,
            info=sample_info(task.sample, task.sample.policy, task.int8),
            features=sample_features(task.sample.space, task.sample.policy, task.sample),
        )

    def time_trials(
        self, trials: Sequence[Trial], *, runs: int, workdir: Path, sink: Sink
    ) -> dict[str, float]:
        from compression.policy import Policy
        from latency_models.calibrate import export_for_device
        from latency_models.harness import Measurement as HM

        dense: dict[str, Path] = {}
        todo = list(trials)
        outstanding: dict[int, Trial] = {}
        out: dict[str, float] = {}
        last_claim = time.monotonic()
        while todo or outstanding:
            sink.check_stop()
            while todo and len(outstanding) < self.window:
                trial = todo.pop(0)
                try:
                    if trial.probe not in dense:
                        dense[trial.probe] = Path(
                            export_for_device(
                                trial.model,
                                trial.space,
                                Policy.dense(),
                                self.device,
                                _trial_file(workdir, None, trial.probe),
                            )[0]
                        )
                    model = export_for_device(
                        trial.model,
                        trial.space,
                        trial.policy,
                        self.device,
                        _trial_file(workdir, trial, trial.probe),
                    )[0]
                except Exception as exc:
                    log.info("capability trial %s not exported: %s", trial.key, exc)
                    continue
                task = self.tasks.add(
                    model=Path(model),
                    baseline=dense[trial.probe],
                    runs=runs,
                    warmup=5,
                    info={"capability": trial.key},
                    features={},
                    purpose=CAPABILITY_PURPOSE,
                )
                outstanding[task] = trial
            if not outstanding:
                continue
            claimed_any, ended = self.tasks.poll(list(outstanding))
            if claimed_any:
                last_claim = time.monotonic()
            for outcome in ended:
                trial = outstanding.pop(outcome.task)
                if not outcome.ok:
                    log.info("capability trial %s failed on the device: %s", trial.key, outcome.error)
                    continue
                try:
                    base = HM.from_dict(outcome.stats["baseline"])
                    mine = HM.from_dict(outcome.stats["measurement"])
                    out[trial.key] = _p10_speedup(base, mine)
                except (KeyError, TypeError, ValueError):
                    speedup = outcome.stats.get("speedup")
                    if isinstance(speedup, (int, float)):
                        out[trial.key] = float(speedup)
            if not ended:
                if time.monotonic() - last_claim > self.agent_wait_s:
                    raise CalibrationError(
                        f"no device agent answered the capability tasks of device "
                        f"{self.device_name or self.device.name} (id {self.device_id})"
                    )
                time.sleep(self.poll_s)
        return out


# --------------------------------------------------------------------------- the loop


@dataclass
class CalibrationRun:
    """Runs one calibration to its end: measure every sample, fit, store and publish a version.

    Args:
        store: progress, measurement rows, publishing and the outcome (the caller's).
        files: the file store measurements are appended to and fitted from.
        transport: how samples get timed.
        params: ``samples``, ``seed``, ``runs``, optional ``kinds`` and ``random_fraction``.
        device_name: for messages.
        model: the focus model for a focused plan (a job's model); None = general plan.
        model_ids: (arch_id, space_id) of ``model``.
        should_stop: polled between samples; True stops with ``CalibrationStopped``.
        progress: ``progress(done, total, message)`` after each sample.
        kinds: predictor kinds to fit (default: ``params["kinds"]``, else every kind).
    """

    store: CalibrationStore
    files: DeviceStore
    transport: Transport
    params: Mapping[str, Any]
    device_name: str
    model: CompressibleModel | None = None
    model_ids: tuple[str, str] | None = None
    should_stop: Callable[[], bool] = lambda: False
    progress: Progress | None = None
    kinds: Sequence[str] | None = None
    _skipped: int = field(default=0, init=False)
    _total: int = field(default=0, init=False)

    # -- the sink the transports report to
    def _beat(self, done: int, message: str) -> None:
        self.store.beat(done, self._total, self._skipped, message[:300])
        if self.progress is not None:
            self.progress(done, self._total, message)

    def check_stop(self) -> None:
        if self.should_stop():
            raise CalibrationStopped("calibration cancelled")

    def measured(self, done: int, sample: CalibrationSample, records: Sequence[LatencyRecord]) -> None:
        self.files.append(records)
        if not self.transport.records_itself:
            self.store.record(sample, records)
        self._beat(done, f"calibrating {done}/{self._total}")

    def skipped(self, done: int, sample: CalibrationSample, why: object) -> None:
        self._skipped += 1
        self._beat(done, f"calibrating {done}/{self._total}: skipped {sample.space_id}: {why}")

    def waiting(self, done: int, for_agent: bool) -> None:
        self._beat(
            done, f"calibrating {done}/{self._total}" + (": waiting for a device agent" if for_agent else "")
        )

    # -- running
    def run(self) -> int:
        """Measure, fit, store; returns the new predictor version. Records the outcome."""
        try:
            version, metrics = self._run()
        except CalibrationStopped as exc:
            self.store.end("cancelled", str(exc))
            raise
        except Exception as exc:
            self.store.end(
                "failed",
                f"{type(exc).__name__}: {exc}" if not isinstance(exc, CalibrationError) else str(exc),
            )
            raise
        self.store.end("succeeded", None, version, metrics)
        return version

    def _capabilities(self, workdir: Path) -> Capabilities | None:
        """The channel multiple and schemes the device rewards (``latency_models.capabilities``),
        timed through the calibration's own transport; None (logged) when they could not be."""
        from latency_models.capabilities import TRIAL_RUNS, measure_capabilities

        self._beat(self._total, "measuring what the device accelerates (channel multiples, schemes)")
        try:
            return measure_capabilities(
                lambda trials: self.transport.time_trials(trials, runs=TRIAL_RUNS, workdir=workdir, sink=self)
            )
        except CalibrationError:
            raise
        except Exception as exc:  # the predictor is still worth having
            log.warning("device %s: capabilities not measured: %s", self.device_name, exc)
            return None

    def samples(self) -> Iterator[CalibrationSample]:
        """The plan: focused on ``model`` when there is one, else the general plan."""
        n = int(self.params.get("samples", DEFAULT_SAMPLES))
        seed = int(self.params.get("seed", 0))
        if self.model is not None and self.model_ids is not None:
            arch_id, space_id = self.model_ids
            return focused_plan(
                self.model,
                arch_id,
                space_id,
                n,
                seed=seed,
                random_fraction=float(self.params.get("random_fraction", FOCUSED_RANDOM_FRACTION)),
            )
        return general_plan(n, seed=seed)

    def _run(self) -> tuple[int, dict[str, Any]]:
        import torch

        self._total = total = int(self.params.get("samples", DEFAULT_SAMPLES))
        runs = int(self.params.get("runs", 100))
        self._beat(0, f"calibrating 0/{total}")
        samples = self.samples()
        with torch.no_grad(), tempfile.TemporaryDirectory(prefix="mt-calib-") as tmp:
            self.transport.measure(samples, runs=runs, workdir=Path(tmp), sink=self)
            records = self.files.records()
            if len({r.arch_id for r in records}) < 2:
                raise CalibrationError(
                    f"device {self.device_name}: {len(records)} measurement(s) of fewer than two "
                    "architectures; a predictor's held-out error needs at least two "
                    "(were most samples skipped?)"
                )
            capabilities = self._capabilities(Path(tmp)) if self.params.get("capabilities", True) else None
        self._beat(total, f"fitting predictors on {len(records)} measurements")
        kinds = tuple(self.kinds) if self.kinds else tuple(self.params.get("kinds") or ()) or None
        seed = int(self.params.get("seed", 0))
        extra = {"capabilities": capabilities.to_dict()} if capabilities is not None else None
        focus_id = self.model_ids[1] if self.model_ids is not None else None
        doc, stored = fit_all(records, kinds, seed, self.files, extra, focus=focus_id)
        holdout = holdout_pairs(records, str(doc["default"]), seed=seed)
        metrics = predictor_metrics(doc, holdout)
        if self.model_ids is not None:
            focus = focus_metrics(records, self.model_ids[1], str(doc["default"]), seed=seed)
            if focus is not None:
                metrics["focus"] = focus
        guard = getattr(self.transport, "guard", None)  # samples re-timed / refused under load
        if isinstance(guard, LoadGuard):
            metrics["noise"] = guard.summary()
            log.info(
                "calibration of %s: %d of %d samples re-timed under load, %d refused",
                self.device_name,
                guard.retried,
                guard.samples,
                guard.refused,
            )
        return self.store.publish(stored, metrics), metrics


# --------------------------------------------------------------------------- pieces


class _NoStop:
    def check_stop(self) -> None:
        return None

    def measured(self, done: int, sample: CalibrationSample, records: Sequence[LatencyRecord]) -> None:
        return None

    def skipped(self, done: int, sample: CalibrationSample, why: object) -> None:
        return None

    def waiting(self, done: int, for_agent: bool) -> None:
        return None


def local_capabilities(device: Device, *, runs: int | None = None) -> Capabilities:
    """Measure what a device this process can time accelerates (``modeltailor calibrate``,
    the capabilities bench) through the calibration's own harness transport."""
    from latency_models.capabilities import TRIAL_RUNS, measure_capabilities

    transport = HarnessTransport(device)
    with tempfile.TemporaryDirectory(prefix="mt-capabilities-") as tmp:
        return measure_capabilities(
            lambda trials: transport.time_trials(
                trials, runs=runs or TRIAL_RUNS, workdir=Path(tmp), sink=_NoStop()
            )
        )


def general_plan(n: int, *, seed: int = 0) -> Iterator[CalibrationSample]:
    """The general calibration sampling: zoo models at several resolutions + random architectures."""
    from latency_models.sampling import sample_plan

    return sample_plan(n, seed=seed)


def fit_all(
    records: Sequence[LatencyRecord],
    kinds: Sequence[str] | None,
    seed: int,
    store: DeviceStore,
    extra: Mapping[str, Any] | None = None,
    focus: str | None = None,
) -> tuple[dict[str, Any], int]:
    """Fit every predictor kind and store a version; a kind that fails to fit is left out
    (named in the metrics under ``failed_kinds``) rather than failing the calibration.
    ``extra`` (the device's capabilities) is stored in the version's metrics.json; ``focus``
    (the space id of a focused calibration's model) chooses the default kind on that model's
    held-out policies (``fit_predictors``)."""
    from latency_models.calibrate import fit_predictors
    from latency_models.predictors import KINDS

    wanted = tuple(kinds or KINDS)
    try:
        _fitted, doc, version = fit_predictors(
            records, kinds=wanted, seed=seed, store=store, extra=extra, focus=focus
        )
    except Exception as exc:
        log.warning("fitting all predictor kinds failed (%s); fitting them one by one", exc)
        failed: dict[str, str] = {}
        for kind in wanted:
            try:
                fit_predictors(records, kinds=(kind,), seed=seed)
            except Exception as one:
                failed[kind] = f"{type(one).__name__}: {one}"[:300]
        working = tuple(k for k in wanted if k not in failed)
        if not working:
            raise CalibrationError(f"no predictor kind could be fitted: {failed}") from exc
        _fitted, doc, version = fit_predictors(
            records, kinds=working, seed=seed, store=store, extra=extra, focus=focus
        )
        doc = {**doc, "failed_kinds": failed}
    assert version is not None
    return doc, version


#: Held-out figures shown at the top level of a predictor's metrics (the rest under "detail").
HEADLINE_METRICS = (
    "within_10pct",
    "within_5pct",
    "mape",
    "rmse_ms",
    "ratio_within_10pct",
    "ratio_mape",
    "speedup_within_10pct",
    "speedup_mape",
    "n_train",
)


def predictor_metrics(doc: Mapping[str, Any], holdout: dict[str, Any] | None = None) -> dict[str, Any]:
    """The published form of a version's metrics.json.

    Top level: the default kind's headline held-out figures (numbers only, so a table can show
    them) plus ``n_test`` / ``records`` / ``architectures``; ``kind`` and every kind's full
    metrics under ``detail``; held-out (measured, predicted) pairs under ``holdout`` when known;
    the device's measured ``capabilities`` when the version has them.
    """
    default = str(doc.get("default", ""))
    per_kind: dict[str, Any] = dict(doc.get("predictors") or {})
    mine: dict[str, Any] = dict(per_kind.get(default) or {})
    out: dict[str, Any] = {k: mine[k] for k in HEADLINE_METRICS if isinstance(mine.get(k), (int, float))}
    if isinstance(mine.get("n"), (int, float)):
        out["n_test"] = mine["n"]
    for key in ("records", "architectures"):
        if isinstance(doc.get(key), (int, float)):
            out[key] = doc[key]
    out["detail"] = {
        "kind": default,
        "target": doc.get("target"),
        "split": doc.get("split"),
        "test_fraction": doc.get("test_fraction"),
        "predictors": per_kind,
        **({"failed_kinds": doc["failed_kinds"]} if doc.get("failed_kinds") else {}),
    }
    if holdout:
        out["holdout"] = holdout
    if isinstance(doc.get("capabilities"), Mapping):  # what the device accelerates (see capabilities)
        out["capabilities"] = dict(doc["capabilities"])
    return out


def sample_info(sample: CalibrationSample, policy: Policy, int8: bool) -> dict[str, Any]:
    """What a measurement keeps about the model it measured."""
    return {
        "arch_id": sample.arch_id,
        "space_id": sample.space_id,
        "policy": policy.to_dict(),
        "policy_hash": policy.hash,
        "int8": bool(int8),
    }


def sample_features(
    space: SearchSpace, policy: Policy, sample: CalibrationSample | None = None
) -> dict[str, Any]:
    """Model-level graph features of a measured model (MACs and friends) for listings."""
    from latency_models.features import MODEL_FEATURES, kernel_features

    try:
        row = kernel_features(space, [policy]).model[0]
    except Exception:  # features are informative only
        return {}
    out: dict[str, Any] = {name: float(row[i]) for i, name in enumerate(MODEL_FEATURES)}
    out["macs"] = out.get("total_macs")
    if sample is not None:
        out["space_id"] = sample.space_id
    return out


def records_from_result(
    sample: CalibrationSample, int8: bool, stats: Mapping[str, Any], *, with_dense: bool
) -> list[LatencyRecord]:
    """Calibration records from an agent's result (the same shape ``measure_sample`` returns)."""
    from latency_models.calibrate import sample_records
    from latency_models.harness import Measurement as HM

    b = HM.from_dict(stats["measurement"])
    a = HM.from_dict(stats["baseline"]) if stats.get("baseline") else None
    speedup = stats.get("speedup")
    return sample_records(
        sample,
        b,
        a,
        speedup=float(speedup) if speedup is not None else None,
        int8=int8,
        with_dense=with_dense,
    )


def holdout_pairs(records: Sequence[LatencyRecord], kind: str, *, seed: int = 0) -> dict[str, Any] | None:
    """(measured, predicted) ms of the default kind on held-out architectures, for plots."""
    from latency_models.predictors import REGISTRY, group_split
    from latency_models.predictors.base import by_space

    try:
        train, test = group_split(records, 0.25, seed)
        model = REGISTRY[kind](target="ratio", seed=seed).fit([records[i] for i in train])
        test_records = [records[i] for i in test]
        predicted = [0.0] * len(test_records)
        for space, ix in by_space(test_records):
            values = model.predict(space, [test_records[i].policy for i in ix])
            for j, i in enumerate(ix):
                predicted[int(i)] = float(values[j])
    except Exception as exc:  # a plot is not worth failing a calibration
        log.info("no held-out pairs: %s", exc)
        return None
    return {
        "measured_ms": [round(r.latency_ms, 5) for r in test_records],
        "predicted_ms": [round(p, 5) for p in predicted],
        "names": [r.space_id for r in test_records],
    }
