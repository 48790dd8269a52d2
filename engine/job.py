"""The one seam between the service and the engine: :func:`run_job` and :func:`export_candidate`,
and the protocols through which a job reads and persists what lives in the service.

The runner (``service/runner.py``) owns leases, cancellation, budgets, progress and
persistence; the engine owns the search itself. The runner calls ``run_job(ctx)`` once
per claim. Contract for ``run_job``:

* Resume, never restart: ``ctx.agent_state`` is the last state saved (None on a fresh
  job) and ``ctx.done`` every candidate already stored. Rebuild the agent from the
  state, ``tell`` it ``ctx.done`` if the state predates them, and never evaluate a policy
  whose hash is in ``ctx.done`` again.
* Persist as you go: call ``ctx.persist_candidate(policy, policy_hash, scores,
  agent_state=...)`` after each evaluation. It is idempotent by policy hash (returns
  False for a duplicate) and stores the candidate and the agent state in one
  transaction, so a runner killed at any instant loses and duplicates nothing. Agent
  state is bytes in a non-executable format (JSON or safetensors) — never pickle.
* Stop when asked: poll ``ctx.should_stop()`` between evaluations (it turns true on
  cancel, on an exhausted budget, on a lost lease and on shutdown) and return promptly;
  evaluate in batches of about ``executor.workers`` so a stop takes seconds.
* Report phases with ``ctx.progress(kind, data)`` (e.g. ``("phase", {"phase":
  "calibrating"})``; a ``phase`` event's data is merged into the job's progress); the
  runner itself reports done / total / best / ETA after each persisted candidate.
  ``ctx.set_baseline(scores)`` records the dense model's scores (the reference for the
  ``accuracy_drop`` constraint).
* Evaluate through ``ctx.make_executor(initializer, initargs)``: the initializer runs
  once per worker to load the model and data; close the executor before returning.
* After the search, fine-tune the top-k front points (``spec.finetune``) and store each one's
  new accuracy with ``ctx.rescore(policy_hash, accuracy, extra)``, polling ``ctx.cancelled()``.
* Return normally when the search is complete or stopped; raise to fail the job (the
  exception's message becomes the job's ``error``).

This module imports no torch: the bodies live in :mod:`engine.run`, loaded on first call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from engine.executors import ExecutorFactory
from engine.spec import JobSpec

if TYPE_CHECKING:
    from compression.model_io import CompressibleModel
    from compression.policy import Policy
    from latency_models.incremental import Measured
    from latency_models.predictors import Predictor


@dataclass(frozen=True)
class Scores:
    """Everything measured about one candidate (units in the names)."""

    accuracy: float | None = None
    latency_ms: float | None = None  # predicted by the device's predictor
    predictor_version: int | None = None
    measured_latency_ms: float | None = None
    size_bytes: int | None = None
    macs: int | None = None
    eval_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DoneCandidate:
    """A candidate stored before this claim (for resuming the agent)."""

    index: int
    policy: dict[str, Any]
    policy_hash: str
    scores: Scores


@dataclass(frozen=True)
class ModelRef:
    """The job's model: an uploaded .pt2 (``path``) or a zoo request (``zoo`` + ``dataset``)."""

    id: int
    name: str
    path: Path | None
    zoo: str | None
    sha256: str | None


@dataclass(frozen=True)
class DatasetRef:
    """The job's data: an uploaded .npz (``path``) or a built-in (``builtin``)."""

    id: int
    name: str
    path: Path | None
    builtin: str | None


@dataclass(frozen=True)
class DeviceRef:
    """The job's latency target."""

    id: int
    name: str
    kind: str
    runtime: str
    threads: int
    settings: dict[str, Any]


class LoadedPredictor(Protocol):
    """A device's latency predictor and which version of which kind it is."""

    @property
    def predictor(self) -> Predictor: ...

    @property
    def version(self) -> int: ...

    @property
    def kind(self) -> str: ...

    @property
    def capabilities(self) -> Mapping[str, Any] | None:
        """What the device accelerates, stored with this version (``latency_models.capabilities``)."""
        ...


class RemeasuredPoint(Protocol):
    """One front point timed on the device at the end of a job."""

    @property
    def policy_hash(self) -> str: ...

    @property
    def predicted_ms(self) -> float | None: ...

    @property
    def measured_ms(self) -> float | None: ...

    @property
    def speedup(self) -> float | None: ...

    @property
    def error(self) -> str | None: ...


@dataclass(frozen=True)
class Relabelled:
    """A stored candidate's latency re-predicted after a refit (``engine.active_measurement``):
    the new prediction, its measured latency when the job timed it, and keys merged into its extra."""

    policy_hash: str
    latency_ms: float
    measured_latency_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class JobLatency(Protocol):
    """The device side of one job, kept by the service: predictor versions, calibrations,
    device-agent tasks and the re-measured candidates live in its database.

    It is also the job's ``engine.active_measurement.MeasuringDevice`` (``measure_policies``,
    ``refit``): the top-up before the search and the active measurement during it.
    """

    @property
    def remote(self) -> bool:
        """The device is timed by a device agent, not in this process."""
        ...

    def ensure_predictor(
        self, model: CompressibleModel, ids: tuple[str, str], pinned: int | None = None
    ) -> LoadedPredictor:
        """The predictor to score with (``pinned`` version if a resumed job has one); calibrates if needed."""
        ...

    def measure_dense(self, model: CompressibleModel) -> float | None:
        """The dense model's measured latency now; None when a device agent times it later."""
        ...

    def dense_result(self, timeout_s: float) -> float | None:
        """A remote dense timing, waiting up to ``timeout_s``."""
        ...

    def cancelled(self) -> bool:
        """The job was cancelled or taken over (not: its budget is spent)."""
        ...

    def model_seen(self, ids: tuple[str, str]) -> bool:
        """Whether the measurements the job's predictor learns from include model ``ids[1]``."""
        ...

    def measure_policies(
        self,
        model: CompressibleModel,
        ids: tuple[str, str],
        policies: Sequence[Policy],
        *,
        purpose: str,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Measured]:
        """Time policies of the job's model on the device and keep them with its measurements."""
        ...

    def refit(self, base: LoadedPredictor, note: Mapping[str, Any]) -> LoadedPredictor:
        """``base``'s kind refitted on the device's measurements, stored as a new version."""
        ...

    def relabel(self, points: Sequence[Relabelled], version: int) -> None:
        """Store re-predicted latencies (and predictor ``version``) on the job's candidates; their
        feasibility and the job's front follow."""
        ...

    def remeasure(
        self, model: CompressibleModel, front: Sequence[tuple[Policy, float | None]], k: int
    ) -> Sequence[RemeasuredPoint]:
        """Time ``k`` of the front's (policy, predicted ms) on the device and store the results."""
        ...

    def close(self) -> None:
        """Remove the job's temporary files."""
        ...


@dataclass
class JobContext:
    """Everything a search needs; built by the runner for each claim."""

    job_id: int
    spec: JobSpec
    model: ModelRef
    dataset: DatasetRef
    device: DeviceRef
    data_dir: Path
    agent_state: bytes | None
    done: list[DoneCandidate]
    persist_candidate: Callable[..., bool]
    progress: Callable[[str, dict[str, Any]], None]
    set_baseline: Callable[[Scores], None]
    should_stop: Callable[[], bool]
    make_executor: ExecutorFactory
    # The service's device side of this job (None outside the service: every candidate is
    # then measured in this process instead of predicted).
    latency: Callable[[JobContext], JobLatency] | None = None
    # Re-scores a stored candidate after the search (fine-tuning the front): (policy hash, new
    # accuracy, keys merged into its extra) -> stored; feasibility and the front follow. None:
    # nothing is stored (the engine still re-scores its own result).
    rescore: Callable[[str, float, dict[str, Any]], bool] | None = None
    # True once the job is cancelled or its lease lost; unlike should_stop, not when the budget
    # is spent (the phases after the search run on a spent budget). None: never.
    cancelled: Callable[[], bool] | None = None


def run_job(ctx: JobContext) -> None:
    """Run (or resume) the search of one job; see the module docstring for the contract."""
    from engine.run import execute

    execute(ctx)


@dataclass(frozen=True)
class ExportContext:
    """Everything an export needs: the candidate's policy and its job's inputs."""

    artifact_id: int
    policy: dict[str, Any]
    scores: Scores
    job_spec: JobSpec
    model: ModelRef
    dataset: DatasetRef
    device: DeviceRef
    int8: bool
    finetune_epochs: int
    out_path: Path  # write the file here
    data_dir: Path  # the service's data directory (zoo weights cache, as for the job)
    progress: Callable[[dict[str, Any]], None]
    # Times (exported model, dense model) on a remote device through its agent and returns
    # (measured ms, dense ms, speedup); None outside the service, where no agent is reachable.
    time_on_agent: Callable[[Path, Path], tuple[float, float, float]] | None = None


@dataclass(frozen=True)
class ExportResult:
    """What the export proved: metrics named as in ``ArtifactPublic`` (measured_latency_ms, ...)."""

    path: Path
    metrics: dict[str, Any]


def export_candidate(ctx: ExportContext) -> ExportResult:
    """Build, write and measure the compressed model of one candidate."""
    from engine.run import export

    return export(ctx)
