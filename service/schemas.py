"""Request and response bodies of the REST API (never ORM objects).

``XCreate`` is what a client sends, ``XPublic`` what it gets back, ``XsPublic`` a list.
``JobCreate`` carries the full validation of a job spec, so a bad spec is a 422 that
names the field at fault before anything is stored.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Algorithm = Literal["ddpg", "agmc", "optuna-tpe", "optuna-nsga2", "random", "rule"]
Metric = Literal["accuracy", "latency_ms", "size_bytes", "macs"]
ConstraintName = Literal["accuracy", "accuracy_drop", "latency_ms", "size_bytes", "macs"]
Runtime = Literal["onnxruntime", "torch"]
BuiltinDataset = Literal["mnist", "digits"]
MAX_BUDGET_CANDIDATES = 1_000_000
MAX_BUDGET_SECONDS = 7 * 24 * 3600


class _In(BaseModel):
    """Request bodies: unknown fields are errors, so a typo is never silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class _Out(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class Message(_Out):
    """Every error answer: what went wrong, in words."""

    detail: str


# --- models -----------------------------------------------------------------------


class ZooModelCreate(_In):
    """Ask for a built-in architecture trained on one of your data sets (trained on first use)."""

    zoo: str = Field(examples=["resnet20"])
    dataset_id: int
    name: str | None = Field(default=None, max_length=200)


class ModelPublic(_Out):
    id: int
    name: str
    source: Literal["upload", "zoo"]
    status: str
    zoo: str | None
    dataset_id: int | None
    sha256: str | None
    size_bytes: int | None
    params: int | None
    macs: int | None
    layers: list[dict[str, Any]]
    created_at: dt.datetime


class ModelsPublic(_Out):
    data: list[ModelPublic]
    count: int


# --- data sets ----------------------------------------------------------------------


class BuiltinDatasetCreate(_In):
    """Use a data set that ships with modeltailor."""

    builtin: BuiltinDataset = Field(examples=["mnist"])
    name: str | None = Field(default=None, max_length=200)


class DatasetPublic(_Out):
    id: int
    name: str
    builtin: str | None
    sha256: str | None
    size_bytes: int | None
    shapes: dict[str, Any]
    created_at: dt.datetime


class DatasetsPublic(_Out):
    data: list[DatasetPublic]
    count: int


# --- devices ------------------------------------------------------------------------


class DeviceCreate(_In):
    """A latency target: ``kind="remote"`` devices are measured by a device agent."""

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    runtime: Runtime = "onnxruntime"
    threads: int = Field(default=1, ge=1, le=256)
    kind: Literal["local", "remote"] = "remote"
    settings: dict[str, Any] = Field(default_factory=dict)

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "rpi4-ort", "runtime": "onnxruntime", "threads": 4}]},
    )


class DevicePublic(_Out):
    id: int
    name: str
    kind: str
    runtime: str
    threads: int
    settings: dict[str, Any]
    shared: bool = Field(description="built-in device every tenant can use")
    created_at: dt.datetime


class DevicesPublic(_Out):
    data: list[DevicePublic]
    count: int


class PredictorPublic(_Out):
    id: int
    device_id: int
    version: int
    kind: str
    metrics: dict[str, Any]
    created_at: dt.datetime


class PredictorsPublic(_Out):
    data: list[PredictorPublic]
    count: int


# --- calibration and device agents -----------------------------------------------------


class CalibrationCreate(_In):
    """Measure ``samples`` compressed models on the device, then fit a new predictor version.

    Without ``model_id`` the samples are the general plan (zoo models at several resolutions
    and random architectures); with it, a plan focused on that model (three quarters its own
    random policies, one quarter random architectures), which is quicker to make accurate.
    """

    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),
        json_schema_extra={"examples": [{"samples": 200}, {"samples": 64, "model_id": 1}]},
    )

    samples: int = Field(default=200, ge=4, le=5000, description="compressed models to measure")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    runs: int = Field(default=100, ge=5, le=10_000, description="timed runs per model")
    model_id: int | None = Field(default=None, description="focus the samples on this model")


class CalibrationPublic(_Out):
    """A calibration: its progress while it runs, the predictor version it made once done."""

    id: int
    device_id: int
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    params: dict[str, Any]
    progress: dict[str, Any] = Field(description="done, total, skipped, message")
    job_id: int | None = Field(description="the job that asked for it, if any")
    model_id: int | None
    predictor_version: int | None
    metrics: dict[str, Any] = Field(description="held-out metrics of the new predictor version")
    error: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


class CalibrationsPublic(_Out):
    data: list[CalibrationPublic]
    count: int


class TasksPublic(_Out):
    """Measurement tasks handed to a device agent (the ``latency_models.tasks`` JSON)."""

    tasks: list[dict[str, Any]]
    count: int


class AgentResult(_In):
    """A device agent's result for one task (``latency_models.tasks.MeasurementResult``)."""

    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {"task_id": "m-12", "device": "rpi4-ort", "status": "error", "error": "model failed to load"}
            ]
        },
    )

    task_id: str = Field(max_length=128)
    device: str = Field(max_length=200)
    status: Literal["ok", "error"]
    measurement: dict[str, Any] | None = None
    baseline: dict[str, Any] | None = None
    speedup: float | None = None
    error: str | None = Field(default=None, max_length=20_000)
    agent: dict[str, Any] = Field(default_factory=dict)


class ResultAccepted(_Out):
    """What happened to a posted result: stored, or a repeat of one already stored."""

    task_id: str
    measurement_id: int
    status: str
    stored: bool


# --- jobs ---------------------------------------------------------------------------


class Objective(_In):
    metric: Metric
    direction: Literal["max", "min"]

    @model_validator(mode="after")
    def _sensible(self) -> Objective:
        want = "max" if self.metric == "accuracy" else "min"
        if self.direction != want:
            raise ValueError(f"{self.metric} can only be {'maximized' if want == 'max' else 'minimized'}")
        return self


class Bound(_In):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _one(self) -> Bound:
        if self.min is None and self.max is None:
            raise ValueError("a constraint needs 'min' or 'max'")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is larger than max {self.max}")
        return self


class Budget(_In):
    """Stop at ``candidates`` evaluated or ``seconds`` elapsed, whichever comes first."""

    candidates: int | None = Field(default=200, ge=1, le=MAX_BUDGET_CANDIDATES)
    seconds: float | None = Field(default=900, gt=0, le=MAX_BUDGET_SECONDS)

    @model_validator(mode="after")
    def _bounded(self) -> Budget:
        if self.candidates is None and self.seconds is None:
            raise ValueError("a budget needs 'candidates' or 'seconds' (an unbounded search never ends)")
        return self


def _default_objectives() -> list[Objective]:
    return [Objective(metric="accuracy", direction="max"), Objective(metric="latency_ms", direction="min")]


class JobCreate(_In):
    """A search job: which model on which data for which device, how, and for how long."""

    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "model_id": 1,
                    "dataset_id": 1,
                    "device_id": 1,
                    "algorithm": "random",
                    "space": {"schemes": ["unstructured", "nm"], "bits": [8], "width": True, "depth": True},
                    "objectives": [
                        {"metric": "accuracy", "direction": "max"},
                        {"metric": "latency_ms", "direction": "min"},
                    ],
                    "constraints": {"latency_ms": {"max": 2.0}, "accuracy_drop": {"max": 0.01}},
                    "budget": {"candidates": 200, "seconds": 900},
                    "seed": 0,
                }
            ]
        },
    )

    model_id: int
    dataset_id: int
    device_id: int
    algorithm: Algorithm
    space: dict[str, Any] = Field(default_factory=dict)
    objectives: list[Objective] = Field(default_factory=_default_objectives, min_length=1, max_length=4)
    constraints: dict[ConstraintName, Bound] = Field(default_factory=dict)
    budget: Budget = Field(default_factory=Budget)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    remeasure_top_k: int = Field(
        default=3,
        ge=0,
        le=50,
        description="front points measured on the device at the end, beside their predicted latency",
    )
    calibrate: Literal["auto", "model", "never"] = Field(
        default="auto",
        description=(
            "auto: calibrate the device first if it has no predictor; model: also if its "
            "measurements never included this model; never: fail instead"
        ),
    )
    calibration_samples: int | None = Field(
        default=None, ge=8, le=2000, description="size of the job's own calibration (default 48)"
    )

    @field_validator("space")
    @classmethod
    def _space(cls, raw: dict[str, Any]) -> dict[str, Any]:
        from compression.policy import PolicyError
        from compression.space import SpaceOptions

        try:
            return SpaceOptions.from_dict(raw).to_dict()
        except (PolicyError, TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None

    @field_validator("objectives")
    @classmethod
    def _unique(cls, objectives: list[Objective]) -> list[Objective]:
        metrics = [o.metric for o in objectives]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"each metric may appear once, got {metrics}")
        return objectives


class JobAccepted(_Out):
    id: int
    status: str


class CandidatePublic(_Out):
    id: int
    job_id: int
    index: int
    policy: dict[str, Any]
    policy_hash: str
    accuracy: float | None
    latency_ms: float | None = Field(description="predicted latency on the job's device")
    predictor_version: int | None
    measured_latency_ms: float | None
    size_bytes: int | None
    macs: int | None
    eval_seconds: float | None
    feasible: bool
    created_at: dt.datetime


class CandidatesPublic(_Out):
    data: list[CandidatePublic]
    count: int


class JobPublic(_Out):
    id: int
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    algorithm: str
    model_id: int
    dataset_id: int
    device_id: int
    spec: dict[str, Any]
    progress: dict[str, Any]
    baseline: dict[str, Any]
    best: list[CandidatePublic]
    cancel_requested: bool
    attempts: int
    error: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


class JobsPublic(_Out):
    data: list[JobPublic]
    count: int


# --- export and artifacts -------------------------------------------------------------


class ExportCreate(_In):
    """``int8`` forces int8 QDQ; without it the file is int8 exactly when the policy's bits make
    the device's runtime run it as int8 (the rule its latency was predicted with)."""

    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),
        json_schema_extra={"examples": [{}, {"finetune_epochs": 2}, {"int8": True}]},
    )

    format: Literal["onnx"] = "onnx"
    int8: bool = False
    finetune_epochs: int = Field(default=0, ge=0, le=100)


class ExportAccepted(_Out):
    artifact_id: int
    status: str


class ArtifactPublic(_Out):
    id: int
    candidate_id: int
    status: Literal["pending", "ready", "failed"]
    format: str
    int8: bool
    finetune_epochs: int
    sha256: str | None
    size_bytes: int | None
    measured_latency_ms: float | None = None
    dense_latency_ms: float | None = None
    speedup: float | None = None
    accuracy: float | None = None
    predicted_latency_ms: float | None = None
    metrics: dict[str, Any]
    error: str | None
    created_at: dt.datetime
    finished_at: dt.datetime | None
