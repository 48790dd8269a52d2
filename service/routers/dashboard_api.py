"""Read endpoints the dashboard needs beyond the core contract: a decimated job scatter and measurements.

Mounted under ``/v1`` like every resource router, behind the same API key.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, ConfigDict, Field

from service import queries
from service.dashboard.breakdown import BreakdownUnavailable, candidate_breakdown
from service.dashboard.compare import BOUNDS, MAX_JOBS, Bound, compare
from service.dashboard.data import DEFAULT_MAX_POINTS, device_measurements, job_choices, job_scatter
from service.dashboard.sensitivity import job_sensitivity
from service.deps import CurrentTenant, ReadSessionDep, SettingsDep
from service.routers.jobs import job_or_404
from service.routers.models import ERRORS
from service.schemas import EXAMPLE_JOB, examples

router = APIRouter(tags=["dashboard"])


class _Out(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


_POINTS = {
    "id": [37, 12, 5],
    "accuracy": [0.9112, 0.9034, 0.8751],
    "latency_ms": [1.42, 1.18, 0.91],
    "size_bytes": [612_480, 498_112, 301_960],
    "feasible": [True, True, True],
    "summary": [
        "all layers: width 0.75, 2:4 sparse, int8 | conv1 dense | skip 1 block: layer3.2 | activations int8",
        "all layers: width 0.60, 2:4 sparse, int8",
        "all layers: width 0.40, int8",
    ],
}
_OTHERS = {
    "id": [2, 9],
    "accuracy": [0.8402, 0.7311],
    "latency_ms": [1.95, 1.02],
    "size_bytes": [702_144, 340_016],
    "feasible": [True, False],
    "summary": ["all layers: width 0.90, unstructured 50%", "all layers: width 0.30"],
}
_JOB = {k: EXAMPLE_JOB[k] for k in ("id", "status", "algorithm", "model_id", "dataset_id", "device_id")}
_SCATTER = {
    "job_id": 1,
    "status": "running",
    "job": {**_JOB, "progress": EXAMPLE_JOB["progress"], "error": None},
    "objectives": EXAMPLE_JOB["spec"]["objectives"],
    "constraints": {"accuracy_drop": {"max": 0.01}},
    "baseline": EXAMPLE_JOB["baseline"],
    "total": 37,
    "feasible_total": 36,
    "shown": 5,
    "decimated": False,
    "front": _POINTS,
    "front_duplicates": [[41], [], []],
    "folded": {
        "id": [41],
        "accuracy": [0.9112],
        "latency_ms": [1.43],
        "size_bytes": [609_312],
        "feasible": [True],
        "summary": ["all layers: width 0.75, 2:4 sparse, int8 | conv1 dense | skip 1 block: layer3.2"],
        "duplicate_of": [37],
    },
    "resolution": {
        "accuracy": 0.001,
        "accuracy_images": 1,
        "n_val": 1000,
        "latency_ms_relative": 0.01,
        "size_bytes_relative": 0.01,
        "macs_relative": 0.01,
    },
    "size_front_ids": [5, 12, 37],
    "others": _OTHERS,
}
_MEASUREMENT = {
    "id": 12,
    "device_id": 1,
    "status": "done",
    "purpose": "calibration",
    "latency_ms": 1.47,
    "latency_stats": {"dense_latency_ms": 2.35, "speedup": 1.6, "ratio_to_reference": 0.82},
    "features": {
        "total_macs": 23_101_440.0,
        "n_kernels": 21.0,
        "input_numel": 3072.0,
        "int8": 1.0,
        "total_out_numel": 180_224.0,
        "total_params": 151_914.0,
        "macs": 23_101_440.0,
        "space_id": "resnet20@32",
    },
    "error": None,
    "created_at": "2026-03-02T10:15:30.512000",
    "measured_at": "2026-03-02T10:16:02.104000",
}


class ScatterPoints(_Out):
    """Columnar points (one list per field, same length)."""

    model_config = examples(_POINTS)

    id: list[int]
    accuracy: list[float | None]
    latency_ms: list[float | None]
    size_bytes: list[int | None]
    feasible: list[bool]
    summary: list[str]


class FoldedPoints(ScatterPoints):
    """Front points folded under a representative, with the representative of each."""

    model_config = examples({**_POINTS, "duplicate_of": [41, 41, 12]})

    duplicate_of: list[int]


class JobScatter(_Out):
    model_config = examples(_SCATTER)

    job_id: int
    status: str
    job: dict[str, Any] = Field(
        description="status, algorithm, ids, progress and error: enough to draw the page"
    )
    objectives: list[dict[str, Any]]
    constraints: dict[str, Any]
    baseline: dict[str, Any]
    total: int
    feasible_total: int
    shown: int
    decimated: bool
    front: ScatterPoints = Field(description="the front's representatives, best first")
    front_duplicates: list[list[int]] = Field(
        description="per front point, the ids folded under it (equal within `resolution`)"
    )
    folded: FoldedPoints
    resolution: dict[str, Any] = Field(description="how close scores must be to count as equal")
    size_front_ids: list[int]
    others: ScatterPoints


class MeasurementPublic(_Out):
    model_config = examples(_MEASUREMENT)

    id: int
    device_id: int
    status: str
    purpose: str
    latency_ms: float | None
    latency_stats: dict[str, Any]
    features: dict[str, Any]
    error: str | None
    created_at: dt.datetime
    measured_at: dt.datetime | None


class MeasurementsPublic(_Out):
    model_config = examples({"data": [_MEASUREMENT], "count": 1})

    data: list[MeasurementPublic]
    count: int


@router.get("/jobs/{job_id}/scatter", response_model=JobScatter, responses=ERRORS)
def get_scatter(
    job_id: int,
    session: ReadSessionDep,
    tenant: CurrentTenant,
    max_points: Annotated[int, Query(ge=100, le=100_000)] = DEFAULT_MAX_POINTS,
) -> JobScatter:
    """Every Pareto point plus the dominated candidates thinned on a grid to about ``max_points``."""
    job = job_or_404(session, tenant.id, job_id)
    resolution = queries.job_resolution(session, job=job)
    return JobScatter.model_validate(
        job_scatter(session, job=job, max_points=max_points, resolution=resolution)
    )


@router.get("/devices/{device_id}/measurements", response_model=MeasurementsPublic, responses=ERRORS)
def list_measurements(
    device_id: int,
    session: ReadSessionDep,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 2000,
) -> MeasurementsPublic:
    """Latency measurements on a device (calibration and candidates), newest first."""
    if queries.get_device(session, tenant_id=tenant.id, device_id=device_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"device {device_id} not found")
    rows, total = device_measurements(session, tenant_id=tenant.id, device_id=device_id, limit=limit)
    return MeasurementsPublic(
        data=[MeasurementPublic.model_validate(m, from_attributes=True) for m in rows], count=total
    )


_COMPARE_JOB = {
    "id": 1,
    "status": "succeeded",
    "algorithm": "rule",
    "seed": 0,
    "model_id": 1,
    "device_id": 1,
    "device": "cpu-ort-1t",
    "baseline": {"accuracy": 0.99, "latency_ms": 4.0},
    "total": 200,
    "feasible_total": 141,
    "front": {
        "id": [37, 12],
        "accuracy": [0.9812, 0.9534],
        "latency_ms": [1.42, 1.18],
        "duplicates": [2, 0],
        "summary": ["all layers: width 0.75, int8", "all layers: width 0.60, int8"],
    },
    "hypervolume": {
        "reference": {"accuracy": 0.89, "latency_ms": 4.0},
        "candidates": [1, 100, 200],
        "elapsed_s": [3.1, 160.4, 322.0],
        "hypervolume": [0.05, 0.25, 0.262],
        "normalized": [0.125, 0.625, 0.655],
        "final": 0.262,
        "final_normalized": 0.655,
    },
    "best": {"id": 37, "accuracy": 0.9812, "latency_ms": 1.42},
}


class CompareJob(_Out):
    """One job in a comparison."""

    model_config = examples(_COMPARE_JOB)

    id: int
    status: str
    algorithm: str
    seed: int
    model_id: int
    device_id: int
    device: str
    baseline: dict[str, Any]
    total: int
    feasible_total: int
    front: dict[str, list[Any]] = Field(
        description="accuracy / latency front (feasible candidates, folded within resolution), most "
        "accurate first; `duplicates`: how many equal points each stands for"
    )
    hypervolume: dict[str, Any] = Field(
        description="area dominated up to `reference` (dense accuracy - 10 points, dense latency) after "
        "the first `candidates[i]` candidates; `normalized`: divided by the reference box (0.10 x dense "
        "latency), comparable across devices"
    )
    best: dict[str, Any] | None = Field(description="the best candidate under `bound` (null: none meets it)")


class Comparison(_Out):
    model_config = examples(
        {
            "bound": {"kind": "max_latency_ms", "value": 1.5},
            "reference": "each job's dense accuracy - 0.10 and dense latency",
            "jobs": [_COMPARE_JOB],
        }
    )

    bound: dict[str, Any] | None
    reference: str
    jobs: list[CompareJob]


def _job_ids(raw: str) -> list[int]:
    try:
        ids = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"jobs must be job ids separated by commas, e.g. 3,7; got {raw!r}",
        ) from None
    ids = list(dict.fromkeys(ids))  # a repeated id is one job
    if not 1 <= len(ids) <= MAX_JOBS:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"compare 1 to {MAX_JOBS} jobs at once, got {len(ids)}"
        )
    return ids


@router.get("/compare", response_model=Comparison, responses=ERRORS)
def get_compare(
    session: ReadSessionDep,
    tenant: CurrentTenant,
    jobs: Annotated[str, Query(description=f"job ids separated by commas (1 to {MAX_JOBS})", max_length=200)],
    max_latency_ms: Annotated[
        float | None, Query(gt=0, allow_inf_nan=False, description="best = most accurate at most this slow")
    ] = None,
    min_accuracy: Annotated[
        float | None,
        Query(ge=0, le=1, allow_inf_nan=False, description="best = fastest at least this accurate"),
    ] = None,
    max_accuracy_drop: Annotated[
        float | None,
        Query(
            ge=0, le=1, allow_inf_nan=False, description="best = fastest within this drop of its dense model"
        ),
    ] = None,
) -> Comparison:
    """Several of your jobs side by side: their accuracy / latency fronts, hypervolume as
    candidates arrived, and each one's best point under at most one bound."""
    ids = _job_ids(jobs)
    given = {
        k: v
        for k, v in zip(BOUNDS, (max_latency_ms, min_accuracy, max_accuracy_drop), strict=True)
        if v is not None
    }
    if len(given) > 1:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"give at most one bound, got {sorted(given)}"
        )
    bound = Bound(*next(iter(given.items()))) if given else None
    found = []
    for job_id in ids:
        found.append(job_or_404(session, tenant.id, job_id))
    return Comparison.model_validate(compare(session, jobs=found, bound=bound))


_FLAG = {
    "kind": "channel_multiple",
    "reason": "keeps 24 of 64 output channels, not a multiple of 16 (the channel block cpu-ort-1t's kernels "
    "compute in): round 24 channels to 16 or 32",
}
_LAYER = {
    "name": "layer3.0.conv1",
    "op": "conv",
    "present": True,
    "predicted_ms": 0.212,
    "dense_ms": 0.301,
    "share": 0.14,
    "dense_in": 32,
    "dense_out": 64,
    "kept_in": 32,
    "kept_out": 24,
    "removed": 0.625,
    "saved": 0.296,
    "scheme": "dense",
    "bits": None,
    "flags": [_FLAG],
}
_ADVICE = {
    "layer": "layer3.0.conv1",
    "removed": 0.625,
    "saved": 0.296,
    "suggestion": "round 24 channels to 16 or 32",
}


class LayerFlag(_Out):
    kind: str = Field(description="size_only | channel_multiple | int8_slower")
    reason: str


class LayerTimeOut(_Out):
    model_config = examples(_LAYER)

    name: str
    op: str
    present: bool = Field(description="false: the layer's block is skipped")
    predicted_ms: float
    dense_ms: float
    share: float = Field(description="of the candidate's predicted time")
    dense_in: int
    dense_out: int
    kept_in: int
    kept_out: int
    removed: float = Field(
        description="share of the layer's dense MACs the policy removed (channels, sparsity)"
    )
    saved: float = Field(description="1 - predicted / dense time of the layer")
    scheme: str
    bits: int | None
    flags: list[LayerFlag]


class AdviceOut(_Out):
    layer: str
    removed: float
    saved: float
    suggestion: str


class CandidateBreakdown(_Out):
    model_config = examples(
        {
            "candidate_id": 37,
            "device": "cpu-ort-1t",
            "round_to": 16,
            "size_only": {"nm": "size-only: nm (2:4) ran 0.97x the dense speed (below 1.10x): ..."},
            "source": "predictor",
            "source_words": "predictor v2 (kernel_gbdt) of cpu-ort-1t",
            "total_ms": 1.42,
            "dense_total_ms": 2.31,
            "overhead_ms": 0.08,
            "dense_overhead_ms": 0.08,
            "layers": [_LAYER],
            "advice": [_ADVICE],
        }
    )

    candidate_id: int
    device: str
    round_to: int = Field(
        description="the channel multiple the job's space used (the device's when measured)"
    )
    size_only: dict[str, str] = Field(
        description="schemes (and int8) the device's calibration measured as size-only"
    )
    source: str = Field(description="predictor: the kernel predictor's per-layer costs; macs: an estimate")
    source_words: str
    total_ms: float
    dense_total_ms: float
    overhead_ms: float = Field(description="the model's own cost (session, input copy, per-op costs)")
    dense_overhead_ms: float
    layers: list[LayerTimeOut]
    advice: list[AdviceOut] = Field(
        description="at most three layers where predicted time fell least against the work removed, "
        "worst first"
    )


@router.get("/candidates/{candidate_id}/breakdown", response_model=CandidateBreakdown, responses=ERRORS)
def get_breakdown(
    candidate_id: int, session: ReadSessionDep, tenant: CurrentTenant, settings: SettingsDep
) -> CandidateBreakdown:
    """Where the candidate's predicted time goes, layer by layer against the dense model; choices
    that buy no speed on the device (with the measured reason); and the three layers where time
    fell least against what was removed, each with one suggested change."""
    found = queries.get_candidate(session, tenant_id=tenant.id, candidate_id=candidate_id)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"candidate {candidate_id} not found")
    candidate, job = found
    try:
        body = candidate_breakdown(session, data_dir=settings.data_dir, candidate=candidate, job=job)
    except BreakdownUnavailable as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return CandidateBreakdown.model_validate(body)


class JobChoices(_Out):
    model_config = examples(
        {
            "job_id": 1,
            "total": 200,
            "layers": ["conv1", "layer1.0.conv1", "layer2.0.conv1"],
            "id": [37, 12, 5],
            "accuracy": [0.9812, 0.9534, 0.9011],
            "latency_ms": [1.42, 1.18, 0.91],
            "on_front": [True, True, False],
            "width": [[1.0, 0.75, 0.5], [0.875, 0.5, 0.5], [0.5, 0.0, 0.25]],
            "bits": [[32, 8, 8], [8, 8, 8], [32, 0, 32]],
        }
    )

    job_id: int
    total: int
    layers: list[str] = Field(
        description="one axis per layer whose kept width varies among the candidates sent"
    )
    id: list[int]
    accuracy: list[float | None]
    latency_ms: list[float | None]
    on_front: list[bool]
    width: list[list[float]] = Field(
        description="per candidate, per axis: kept width (0: its block is skipped)"
    )
    bits: list[list[int]] = Field(description="per candidate, per axis: weight bits (32: float, 0: skipped)")


@router.get("/jobs/{job_id}/choices", response_model=JobChoices, responses=ERRORS)
def get_choices(
    job_id: int,
    session: ReadSessionDep,
    tenant: CurrentTenant,
    max_points: Annotated[int, Query(ge=10, le=5000)] = 400,
) -> JobChoices:
    """Per-layer choices of the job's candidates (every front point and up to ``max_points`` others,
    spread over the search), for parallel coordinates coloured by accuracy."""
    job = job_or_404(session, tenant.id, job_id)
    model = queries.get_model(session, tenant_id=tenant.id, model_id=job.model_id)
    names = [
        str(layer.get("name")) for layer in (model.layers if model is not None else []) if layer.get("name")
    ]
    resolution = queries.job_resolution(session, job=job)
    return JobChoices.model_validate(
        job_choices(session, job=job, layer_names=names, max_points=max_points, resolution=resolution)
    )


class SensitivityMove(_Out):
    target: str = Field(description="the layer (or block, for a skip) the move changes")
    kind: str = Field(description="skip, width, bits or sparse")
    move: str = Field(description="the move in words, e.g. 'width ×0.5', '8-bit weights'")
    accuracy_delta: float = Field(description="accuracy after the move minus the anchor's (negative: lost)")
    resource_delta: float = Field(description="resource after the move minus the anchor's (negative: saved)")
    saves: bool = Field(description="the move saved at least 0.5 % of the anchor's resource on this device")
    cost: float | None = Field(
        description="accuracy points lost per unit of resource saved (ms or bytes); null: saves nothing"
    )


class JobSensitivity(_Out):
    model_config = examples(
        {
            "job_id": 4,
            "algorithm": "rule",
            "resource": "latency_ms",
            "anchor": {"accuracy": 0.9911, "resource": 0.412},
            "moves": [
                {
                    "target": "layer3.2",
                    "kind": "skip",
                    "move": "skip the block",
                    "accuracy_delta": -0.0012,
                    "resource_delta": -0.041,
                    "saves": True,
                    "cost": 2.93,
                },
                {
                    "target": "layer1.0.conv1",
                    "kind": "sparse",
                    "move": "unstructured sparsity (sparsity 0.5)",
                    "accuracy_delta": -0.0003,
                    "resource_delta": 0.0004,
                    "saves": False,
                    "cost": None,
                },
            ],
            "note": "",
        },
        {
            "job_id": 5,
            "algorithm": "optuna-tpe",
            "resource": "latency_ms",
            "anchor": None,
            "moves": [],
            "note": (
                "no sensitivity measured: only the rule agent measures single moves, after its first sweep"
            ),
        },
    )

    job_id: int
    algorithm: str
    resource: str | None = Field(description="what the moves saved: the job's first minimised metric")
    anchor: dict[str, Any] | None = Field(
        description="the policy every move started from: its accuracy and resource (null: none yet)"
    )
    moves: list[SensitivityMove] = Field(
        description="moves that saved something, cheapest first, then those that saved nothing"
    )
    note: str


@router.get("/jobs/{job_id}/sensitivity", response_model=JobSensitivity, responses=ERRORS)
def get_sensitivity(job_id: int, session: ReadSessionDep, tenant: CurrentTenant) -> JobSensitivity:
    """Per-layer sensitivity where the rule agent measured it: each single move from its anchor
    policy (skip a block, narrow a layer, change its bits, sparsify it) with the accuracy it cost
    and the latency (or size) it saved on the job's device. Other agents answer with no moves and
    a note."""
    job = job_or_404(session, tenant.id, job_id)
    return JobSensitivity.model_validate(job_sensitivity(job))
