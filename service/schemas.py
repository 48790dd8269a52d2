"""Request and response bodies of the REST API (never ORM objects).

``XCreate`` is what a client sends, ``XPublic`` what it gets back, ``XsPublic`` a list.
A job's body is ``engine.spec.JobSpec`` itself (the one definition of a job, also what the
runner and the engine read), so a bad spec is a 422 that names the field at fault before
anything is stored.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.spec import JobSpec
from service.schema_base import RequestModel

Runtime = Literal["onnxruntime", "torch", "executorch", "openvino"]
BuiltinDataset = Literal["mnist", "digits"]

# --- OpenAPI examples (realistic answers of a small job; each validates against its schema) ---

_T0 = "2026-03-02T10:15:30.512000"
_T1 = "2026-03-02T10:16:02.104000"
_T2 = "2026-03-02T10:31:47.880000"
_SHA_MODEL = "3f0a9c5e1b7d2a4c6e8f0a1b3c5d7e9f2a4b6c8d0e1f3a5b7c9d1e3f5a7b9c0d"
_SHA_EXPORT = "1aea5303c868c33e0c82dba70ed30647f2a1e90be852c3ed8935d355dfec5db6"
_SHA_DENSE = "9b1c7e2d4f6a8b0c2d4e6f8a0b2c4d6e8f0a2b4c6d8e0f2a4b6c8d0e2f4a6b8c"
EXAMPLE_MODEL: dict[str, Any] = {
    "id": 1,
    "name": "resnet20",
    "source": "zoo",
    "status": "ready",
    "zoo": "resnet20",
    "dataset_id": 1,
    "sha256": _SHA_MODEL,
    "size_bytes": 1_124_311,
    "params": 272_474,
    "macs": 40_552_192,
    "layers": [
        {
            "name": "conv1",
            "op": "conv",
            "in_channels": 3,
            "out_channels": 16,
            "kernel": 3,
            "stride": 1,
            "groups": 1,
            "in_h": 32,
            "in_w": 32,
            "out_h": 32,
            "out_w": 32,
            "params": 432,
            "macs": 442_368,
            "position": 0.0,
            "index": 0,
        }
    ],
    "created_at": _T0,
}
EXAMPLE_DATASET: dict[str, Any] = {
    "id": 1,
    "name": "digits",
    "builtin": "digits",
    "sha256": None,
    "size_bytes": None,
    "shapes": {
        "x_train": [1257, 1, 8, 8],
        "y_train": [1257],
        "x_val": [270, 1, 8, 8],
        "y_val": [270],
        "x_test": [270, 1, 8, 8],
        "y_test": [270],
        "num_classes": 10,
    },
    "created_at": _T0,
}
EXAMPLE_DEVICE: dict[str, Any] = {
    "id": 4,
    "name": "rpi4-ort",
    "kind": "remote",
    "runtime": "onnxruntime",
    "threads": 4,
    "settings": {},
    "shared": False,
    "created_at": _T0,
}
EXAMPLE_PREDICTOR: dict[str, Any] = {
    "id": 2,
    "device_id": 1,
    "version": 2,
    "kind": "kernel_gbdt",
    "scope": "device",
    "metrics": {
        "within_10pct": 91.7,
        "within_5pct": 66.7,
        "mape": 5.3,
        "rmse_ms": 0.041,
        "speedup_within_10pct": 95.8,
        "speedup_mape": 3.9,
        "n_train": 192,
        "n_test": 48,
        "records": 240,
        "architectures": 61,
        "detail": {
            "kind": "kernel_gbdt",
            "target": "ratio",
            "split": "held-out architectures (group split by arch_id)",
            "test_fraction": 0.2,
        },
    },
    "created_at": _T2,
}
EXAMPLE_CALIBRATION: dict[str, Any] = {
    "id": 3,
    "device_id": 4,
    "status": "running",
    "params": {"samples": 64, "seed": 0, "runs": 100, "plan": "focused", "scope": "device"},
    "progress": {"done": 17, "total": 64, "skipped": 0, "message": "calibrating 17/64"},
    "job_id": None,
    "model_id": 1,
    "predictor_version": None,
    "metrics": {},
    "error": None,
    "created_at": _T0,
    "started_at": _T1,
    "finished_at": None,
}
EXAMPLE_TASK: dict[str, Any] = {
    "id": "m-12",
    "model": {"sha256": _SHA_EXPORT, "url": f"/v1/devices/4/blobs/{_SHA_EXPORT}"},
    "runs": 100,
    "warmup": 10,
    "input_shape": [1, 3, 32, 32],
    "baseline": {"sha256": _SHA_DENSE, "url": f"/v1/devices/4/blobs/{_SHA_DENSE}"},
}
EXAMPLE_CANDIDATE: dict[str, Any] = {
    "id": 37,
    "job_id": 1,
    "index": 36,
    "policy": {
        "default": {"width": 0.75, "scheme": "nm", "sparsity": 0.0, "nm": [2, 4], "block": None, "bits": 8},
        "layers": {
            "conv1": {
                "width": 1.0,
                "scheme": "dense",
                "sparsity": 0.0,
                "nm": None,
                "block": None,
                "bits": None,
            }
        },
        "skip": ["layer3.2"],
        "act_bits": 8,
    },
    "policy_hash": "1191b77e0872af70",
    "accuracy": 0.9112,
    "latency_ms": 1.42,
    "predictor_version": 2,
    "measured_latency_ms": 1.47,
    "size_bytes": 612_480,
    "macs": 23_101_440,
    "eval_seconds": 3.8,
    "feasible": True,
    "one_shot_accuracy": 0.9034,
    "finetuned_accuracy": 0.9112,
    "created_at": _T1,
}
EXAMPLE_JOB_SPEC: dict[str, Any] = {
    "model_id": 1,
    "dataset_id": 1,
    "device_id": 1,
    "algorithm": "optuna-tpe",
    "space": {
        "schemes": ["dense", "unstructured", "nm", "block"],
        "bits": [None, 8],
        "width": True,
        "depth": True,
        "min_width": 0.2,
        "max_sparsity": 0.9,
        "nm_choices": [[1, 4], [2, 4], [4, 8]],
        "block_choices": [4, 8, 16],
        "round_to": None,  # the device's measured channel multiple
    },
    "objectives": [{"metric": "accuracy", "direction": "max"}, {"metric": "latency_ms", "direction": "min"}],
    "constraints": {"accuracy_drop": {"max": 0.01}},
    "budget": {"candidates": 200, "seconds": 900.0},
    "seed": 0,
    "remeasure_top_k": 3,
    "reconstruct": True,
    "recovery": "obc",
    "calibrate": "auto",
    "calibration_samples": None,
    "finetune": {"top_k": 5, "epochs": 2.0, "steps": None},
}
EXAMPLE_JOB: dict[str, Any] = {
    "id": 1,
    "status": "running",
    "algorithm": "optuna-tpe",
    "model_id": 1,
    "dataset_id": 1,
    "device_id": 1,
    "spec": EXAMPLE_JOB_SPEC,
    "progress": {
        "phase": "searching",
        "done": 37,
        "total": 200,
        "elapsed_s": 141.2,
        "eta_s": 622.0,
        "best_accuracy": 0.9188,
    },
    "baseline": {"accuracy": 0.9201, "latency_ms": 2.31, "predictor_version": 2},
    "best": [EXAMPLE_CANDIDATE],
    "cancel_requested": False,
    "attempts": 1,
    "error": None,
    "created_at": _T0,
    "started_at": _T1,
    "finished_at": None,
}
EXAMPLE_ARTIFACT: dict[str, Any] = {
    "id": 5,
    "candidate_id": 37,
    "status": "ready",
    "format": "onnx",
    "int8": False,
    "finetune_epochs": 0,
    "sha256": _SHA_EXPORT,
    "size_bytes": 618_903,
    "measured_latency_ms": 1.47,
    "dense_latency_ms": 2.35,
    "speedup": 1.6,
    "accuracy": 0.9112,
    "predicted_latency_ms": 1.42,
    "metrics": {
        "measured_latency_ms": 1.47,
        "dense_latency_ms": 2.35,
        "speedup": 1.6,
        "accuracy": 0.9112,
        "predicted_latency_ms": 1.42,
    },
    "error": None,
    "created_at": _T1,
    "finished_at": _T2,
}


def examples(*values: dict[str, Any]) -> ConfigDict:
    """``model_config`` that shows ``values`` as the schema's OpenAPI examples."""
    return ConfigDict(json_schema_extra={"examples": list(values)})


class _Out(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class Message(_Out):
    """Every error answer: what went wrong, in words."""

    model_config = examples({"detail": "job 42 not found"})

    detail: str


# --- models -----------------------------------------------------------------------


class ZooModelCreate(RequestModel):
    """Ask for a built-in architecture trained on one of your data sets (trained on first use)."""

    model_config = examples(
        {"zoo": "resnet20", "dataset_id": 1}, {"zoo": "lenet5", "dataset_id": 2, "name": "lenet"}
    )

    zoo: str = Field(examples=["resnet20"])
    dataset_id: int
    name: str | None = Field(default=None, max_length=200)


class ModelPublic(_Out):
    """A model: ``status`` is ``pending`` while a zoo model trains, then ``ready`` (or ``failed``)."""

    model_config = examples(EXAMPLE_MODEL)

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
    model_config = examples({"data": [EXAMPLE_MODEL], "count": 1})

    data: list[ModelPublic]
    count: int


# --- data sets ----------------------------------------------------------------------


class BuiltinDatasetCreate(RequestModel):
    """Use a data set that ships with modeltailor."""

    model_config = examples({"builtin": "mnist"}, {"builtin": "digits", "name": "digits-8x8"})

    builtin: BuiltinDataset = Field(examples=["mnist"])
    name: str | None = Field(default=None, max_length=200)


class DatasetPublic(_Out):
    model_config = examples(EXAMPLE_DATASET)

    id: int
    name: str
    builtin: str | None
    sha256: str | None
    size_bytes: int | None
    shapes: dict[str, Any]
    created_at: dt.datetime


class DatasetsPublic(_Out):
    model_config = examples({"data": [EXAMPLE_DATASET], "count": 1})

    data: list[DatasetPublic]
    count: int


# --- devices ------------------------------------------------------------------------


class DeviceCreate(RequestModel):
    """A latency target: ``kind="remote"`` devices are measured by a device agent."""

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    runtime: Runtime = "onnxruntime"
    threads: int = Field(
        default=1, ge=1, le=256, description="at most this server's CPU cores for a local device"
    )
    kind: Literal["local", "remote"] = "remote"
    settings: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        max_length=32,
        description="runtime options: ONNX Runtime session config entries and graph_optimization_level "
        "(all | extended | basic | disable); OpenVINO CPU properties (INFERENCE_PRECISION_HINT f32 | bf16 | "
        "f16, default f32); the torch and executorch runtimes take none",
    )

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"name": "rpi4-ort", "runtime": "onnxruntime", "threads": 4}]},
    )

    @model_validator(mode="after")
    def _runnable(self) -> DeviceCreate:
        """Settings the runtime would refuse at the first measurement are refused now."""
        from latency_models.devices import Device, DeviceError

        cores = os.cpu_count() or 1
        if self.kind == "local" and self.threads > cores:
            raise ValueError(
                f"threads {self.threads}: a local device runs on this server, which has {cores} CPU cores"
            )
        settings = {k: str(v) for k, v in self.settings.items()}  # as the harness passes them on
        try:
            Device(self.name[:64], self.runtime, self.threads, settings, is_local=self.kind == "local")
        except DeviceError as exc:
            raise ValueError(str(exc)) from None
        return self


class DevicePublic(_Out):
    model_config = examples(EXAMPLE_DEVICE)

    id: int
    name: str
    kind: str
    runtime: str
    threads: int
    settings: dict[str, Any]
    shared: bool = Field(description="built-in device every tenant can use")
    created_at: dt.datetime


class DevicesPublic(_Out):
    model_config = examples(
        {
            "data": [
                {
                    "id": 1,
                    "name": "cpu-ort-1t",
                    "kind": "local",
                    "runtime": "onnxruntime",
                    "threads": 1,
                    "settings": {},
                    "shared": True,
                    "created_at": _T0,
                },
                EXAMPLE_DEVICE,
            ],
            "count": 2,
        }
    )

    data: list[DevicePublic]
    count: int


class PredictorPublic(_Out):
    """A predictor version with its held-out metrics (percentages, ms, and counts)."""

    model_config = examples(EXAMPLE_PREDICTOR)

    id: int
    device_id: int
    version: int
    kind: str
    scope: Literal["device", "tenant"] = Field(
        description="device: the device's own predictor, for everyone who may use the device; tenant: "
        "made by your jobs for a shared built-in device, used by your jobs only (in preference to "
        "the device's own)"
    )
    metrics: dict[str, Any]
    created_at: dt.datetime


class PredictorsPublic(_Out):
    model_config = examples({"data": [EXAMPLE_PREDICTOR], "count": 1})

    data: list[PredictorPublic]
    count: int


# --- calibration and device agents -----------------------------------------------------


class CalibrationCreate(RequestModel):
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

    samples: int = Field(
        default=200,
        ge=4,
        le=5000,
        description="compressed models to measure (at most the server's MODELTAILOR_MAX_CALIBRATION_SAMPLES, "
        "default 1000)",
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    runs: int = Field(default=100, ge=5, le=10_000, description="timed runs per model")
    model_id: int | None = Field(default=None, description="focus the samples on this model")


class CalibrationPublic(_Out):
    """A calibration: its progress while it runs, the predictor version it made once done."""

    model_config = examples(EXAMPLE_CALIBRATION)

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
    model_config = examples({"data": [EXAMPLE_CALIBRATION], "count": 1})

    data: list[CalibrationPublic]
    count: int


class TasksPublic(_Out):
    """Measurement tasks handed to a device agent (the ``latency_models.tasks`` JSON)."""

    model_config = examples({"tasks": [EXAMPLE_TASK], "count": 1}, {"tasks": [], "count": 0})

    tasks: list[dict[str, Any]]
    count: int


class AgentResult(RequestModel):
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

    model_config = examples({"task_id": "m-12", "measurement_id": 12, "status": "done", "stored": True})

    task_id: str
    measurement_id: int
    status: str
    stored: bool


# --- jobs ---------------------------------------------------------------------------


class JobAccepted(_Out):
    model_config = examples({"id": 1, "status": "queued"})

    id: int
    status: str


class CandidatePublic(_Out):
    model_config = examples(EXAMPLE_CANDIDATE)

    id: int
    job_id: int
    index: int
    policy: dict[str, Any]
    policy_hash: str
    accuracy: float | None
    latency_ms: float | None = Field(description="predicted latency on the job's device")
    latency_std_ms: float | None = Field(
        default=None,
        description="the predictor's standard deviation of latency_ms (null: the predictor does not say)",
    )
    predictor_version: int | None
    measured_latency_ms: float | None
    size_bytes: int | None
    macs: int | None
    eval_seconds: float | None
    feasible: bool
    one_shot_accuracy: float | None = Field(
        default=None,
        description="a fine-tuned candidate's accuracy as the search scored it (null: not fine-tuned)",
    )
    finetuned_accuracy: float | None = Field(
        default=None,
        description="its accuracy after the job's distillation fine-tuning; `accuracy` is the better of "
        "the two (an export replays the fine-tuning when it won)",
    )
    created_at: dt.datetime


class CandidatesPublic(_Out):
    model_config = examples({"data": [EXAMPLE_CANDIDATE], "count": 1})

    data: list[CandidatePublic]
    count: int


_RESOLUTION = {
    "accuracy": 0.001,
    "accuracy_images": 1,
    "n_val": 1000,
    "latency_ms_relative": 0.01,
    "size_bytes_relative": 0.01,
    "macs_relative": 0.01,
}


class FrontPoint(CandidatePublic):
    """A front point with what the fold says about it (``service.front_fold``)."""

    model_config = examples({**EXAMPLE_CANDIDATE, "duplicates": [41, 52], "duplicate_of": None})

    duplicates: list[int] = Field(
        default_factory=list,
        description="ids of front points equal to this one within resolution, folded under it",
    )
    duplicate_of: int | None = Field(
        default=None, description="the representative this point is folded under (null: it is one)"
    )


class FrontPublic(_Out):
    model_config = examples(
        {
            "data": [{**EXAMPLE_CANDIDATE, "duplicates": [41, 52], "duplicate_of": None}],
            "count": 1,
            "folded": 2,
            "resolution": _RESOLUTION,
        }
    )

    data: list[FrontPoint]
    count: int = Field(description="points in `data`")
    folded: int = Field(description="front points folded under a representative (left out when `fold`)")
    resolution: dict[str, Any] = Field(
        description="how close scores must be to count as equal: accuracy within one validation "
        "image (absolute), latency, size and MACs within 1 % (relative)"
    )


class JobPublic(_Out):
    model_config = examples(EXAMPLE_JOB)

    id: int
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    algorithm: str
    model_id: int
    dataset_id: int
    device_id: int
    spec: JobSpec
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
    model_config = examples({"data": [{**EXAMPLE_JOB, "best": []}], "count": 1})

    data: list[JobPublic]
    count: int


# --- export and artifacts -------------------------------------------------------------


class ExportCreate(RequestModel):
    """``int8`` forces int8 QDQ; without it the file is int8 exactly when the policy's bits make
    the device's runtime run it as int8 (the rule its latency was predicted with)."""

    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),
        json_schema_extra={"examples": [{}, {"finetune_epochs": 2}, {"int8": True}]},
    )

    format: Literal["onnx"] = "onnx"
    int8: bool = False
    finetune_epochs: int = Field(
        default=0,
        ge=0,
        le=100,
        description="distillation fine-tuning epochs before export, at least (a candidate the job "
        "fine-tuned replays its own fine-tuning anyway; more epochs here go further)",
    )


class ExportAccepted(_Out):
    model_config = examples({"artifact_id": 5, "status": "pending"})

    artifact_id: int
    status: str


class ArtifactPublic(_Out):
    model_config = examples(EXAMPLE_ARTIFACT)

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
