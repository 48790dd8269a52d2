"""The one seam between the service and the search: :func:`run_job` and :func:`export_candidate`.

The runner (``service/runner.py``) owns leases, cancellation, budgets, progress and
persistence; the bridge owns the search itself. The runner calls ``run_job(ctx)`` once
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
  "calibrating"})``); the runner itself reports done / total / best / ETA after each
  persisted candidate. ``ctx.set_baseline(scores)`` records the dense model's scores
  (the reference for the ``accuracy_drop`` constraint).
* Evaluate through ``ctx.make_executor(initializer, initargs)``: the initializer runs
  once per worker to load the model and data; close the executor before returning.
* Return normally when the search is complete or stopped; raise to fail the job (the
  exception's message becomes the job's ``error``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.executors import Executor


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


@dataclass
class JobContext:
    """Everything a search needs; built by the runner for each claim."""

    job_id: int
    algorithm: str
    spec: dict[str, Any]  # the validated JobCreate body (space, objectives, constraints, budget, seed)
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
    make_executor: Callable[..., Executor]
    # The service database, for the latency side of a job (predictor versions, calibrations,
    # device-agent tasks, re-measured candidates); None outside the service.
    session_factory: Callable[[], Any] | None = None


def run_job(ctx: JobContext) -> None:
    """Run (or resume) the search of one job; see the module docstring for the contract."""
    from service.search_wiring import run_job as run

    run(ctx)


@dataclass(frozen=True)
class ExportContext:
    """Everything an export needs: the candidate's policy and its job's inputs."""

    artifact_id: int
    policy: dict[str, Any]
    scores: Scores
    job_spec: dict[str, Any]
    model: ModelRef
    dataset: DatasetRef
    device: DeviceRef
    int8: bool
    finetune_epochs: int
    out_path: Path  # write the file here
    data_dir: Path  # the service's data directory (zoo weights cache, as for the job)
    progress: Callable[[dict[str, Any]], None]
    # The service database: a remote device's export is timed by its device agent through a
    # task; None outside the service.
    session_factory: Callable[[], Any] | None = None


@dataclass(frozen=True)
class ExportResult:
    """What the export proved: metrics named as in ``ArtifactPublic`` (measured_latency_ms, ...)."""

    path: Path
    metrics: dict[str, Any]


def export_candidate(ctx: ExportContext) -> ExportResult:
    """Build, write and measure the compressed model of one candidate."""
    from service.search_wiring import export_candidate as export

    return export(ctx)
