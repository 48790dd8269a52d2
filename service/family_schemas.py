"""Bodies of the family routes (``GET /v1/jobs/{id}/family``, ``POST /v1/jobs/{id}/family-export``).

A family job's spec is ``engine.spec.FamilySpec`` inside ``JobSpec``; see ``engine.family_job``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from engine.spec import FamilySpec
from service.schema_base import RequestModel
from service.schemas import _Out, examples

_POINT_0: dict[str, Any] = {
    "k": 0,
    "budget": 1.0,
    "target_ms": 2.35,
    "candidate_id": 36,
    "policy_hash": "5ad6c4f0a1b2c3d4e5f60718293a4b5c6d7e8f901a2b3c4d5e6f708192a3b4c5",
    "accuracy": 0.9874,
    "latency_ms": 2.35,
    "measured_latency_ms": 2.31,
    "siblings": [36, 37],
    "bundle_latency_ms": 2.29,
    "bundle_accuracy": 0.9852,
    "speedup": 1.0,
}
_POINT_1: dict[str, Any] = {
    **_POINT_0,
    "k": 1,
    "budget": 0.6,
    "target_ms": 1.41,
    "candidate_id": 37,
    "policy_hash": "c0ffee00a1b2c3d4e5f60718293a4b5c6d7e8f901a2b3c4d5e6f708192a3b4c5",
    "accuracy": 0.9711,
    "latency_ms": 1.38,
    "measured_latency_ms": 1.44,
    "bundle_latency_ms": 1.42,
    "bundle_accuracy": 0.9689,
    "speedup": 1.61,
}
_EXPORT: dict[str, Any] = {
    "artifact_id": 7,
    "status": "ready",
    "error": None,
    "download": "/v1/artifacts/7/download",
    "size_bytes": 402_118,
    "sizes": {"bundle_bytes": 398_002, "separate_bytes": 612_440, "bundle_over_largest": 1.03},
    "dense": {"accuracy": 0.9874, "latency_ms": 2.3},
}


class FamilyPointPublic(_Out):
    """One operating point: its budget, its candidate, and its figures once exported."""

    model_config = examples(_POINT_0)

    k: int = Field(description="the point's place, 0 = the first (loosest) budget")
    budget: float = Field(description="its latency budget as a fraction of the dense latency")
    target_ms: float | None = Field(default=None, description="that budget in ms (predicted)")
    candidate_id: int | None = Field(description="its candidate (null: not stored yet)")
    policy_hash: str
    accuracy: float | None = Field(default=None, description="as the search scored it (its own refit)")
    latency_ms: float | None = Field(default=None, description="predicted latency on the job's device")
    measured_latency_ms: float | None = Field(
        default=None, description="timed on the device at the end of the job (null: not re-measured)"
    )
    siblings: list[int] = Field(default_factory=list, description="the family's candidates, in point order")
    bundle_latency_ms: float | None = Field(
        default=None, description="measured from the exported bundle (null until a family export is ready)"
    )
    bundle_accuracy: float | None = Field(
        default=None, description="accuracy of the bundle's graph on the validation split (shared weights)"
    )
    speedup: float | None = Field(default=None, description="bundle point vs dense, one interleaved run")


class FamilyExportPublic(_Out):
    """The newest family export of the job."""

    model_config = examples(_EXPORT)

    artifact_id: int
    status: Literal["pending", "ready", "failed"]
    error: str | None = None
    download: str | None = Field(default=None, description="the zipped bundle, once ready")
    size_bytes: int | None = None
    sizes: dict[str, Any] = Field(default_factory=dict, description="bundle sizes (family.json `sizes`)")
    dense: dict[str, Any] = Field(
        default_factory=dict, description="the dense model measured with the points"
    )


class FamilyPublic(_Out):
    """A job's family: its points in budget order (empty for a job without ``family`` or not done)."""

    model_config = examples(
        {
            "job_id": 12,
            "status": "succeeded",
            "family": {"budgets": [1.0, 0.6], "finetune_epochs": 0},
            "dense_latency_ms": 2.35,
            "note": "",
            "points": [_POINT_0, _POINT_1],
            "export": _EXPORT,
        },
        {
            "job_id": 3,
            "status": "succeeded",
            "family": None,
            "dense_latency_ms": None,
            "note": "job 3 is not a family job (its spec has no family)",
            "points": [],
            "export": None,
        },
    )

    job_id: int
    status: str
    family: FamilySpec | None = Field(description="the job's family spec (null: not a family job)")
    dense_latency_ms: float | None = None
    note: str = Field(default="", description="why points are missing, when they are")
    points: list[FamilyPointPublic]
    export: FamilyExportPublic | None = None


class FamilyExportCreate(RequestModel):
    """How the bundle's points are timed (each against the dense model, interleaved)."""

    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),
        json_schema_extra={"examples": [{}, {"runs": 100}]},
    )

    runs: int = Field(default=200, ge=20, le=2000, description="timed runs per point")
