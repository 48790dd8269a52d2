"""Read-side queries the dashboard needs: a decimated scatter of a job, a device's measurements.

A job may hold 50,000 candidates; a browser draws that many points but cannot hover,
ship or re-render them quickly. ``job_scatter`` therefore sends every Pareto point and
thins the dominated ones on a grid: one point per occupied cell of the accuracy ×
latency plane and one per cell of the accuracy × size plane, so both views keep the
cloud's shape and its outliers. Only the few columns plotted are loaded for all rows;
policies (for the hover summary) only for the points sent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from db.models import Candidate, Job, Measurement
from engine.spec import JobSpec
from service import queries
from service.front import front_objectives, front_order, signed_points
from service.front_fold import Resolution, fold

DEFAULT_MAX_POINTS = 4000
COLUMNS = ("accuracy", "latency_ms", "size_bytes", "macs")


@dataclass
class _Table:
    """All candidates of a job as arrays (NaN where a score is missing), in evaluation order."""

    id: np.ndarray
    feasible: np.ndarray
    cols: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.id)


@dataclass
class Points:
    """Columnar points: what plotly wants and the cheapest JSON to ship."""

    id: list[int] = field(default_factory=list)
    accuracy: list[float | None] = field(default_factory=list)
    latency_ms: list[float | None] = field(default_factory=list)
    size_bytes: list[int | None] = field(default_factory=list)
    feasible: list[bool] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[Any]]:
        return {
            "id": self.id,
            "accuracy": self.accuracy,
            "latency_ms": self.latency_ms,
            "size_bytes": self.size_bytes,
            "feasible": self.feasible,
            "summary": self.summary,
        }


def _fmt_layer(spec: dict[str, Any]) -> str:
    parts: list[str] = []
    width = spec.get("width")
    if width is not None and float(width) < 1.0:
        parts.append(f"width {float(width):.2f}")
    scheme = spec.get("scheme")
    if scheme == "nm" and spec.get("nm"):
        n, m = spec["nm"]
        parts.append(f"{n}:{m} sparse")
    elif scheme == "block" and spec.get("block"):
        parts.append(f"1×{spec['block']} blocks {float(spec.get('sparsity') or 0):.0%}")
    elif scheme == "unstructured":
        parts.append(f"unstructured {float(spec.get('sparsity') or 0):.0%}")
    if spec.get("bits") is not None:
        parts.append(f"int{spec['bits']}")
    return ", ".join(parts)


def policy_summary(policy: dict[str, Any]) -> str:
    """One line a person reads on hover: default settings, overridden layers, skipped blocks."""
    default = _fmt_layer(policy.get("default") or {}) or "dense"
    parts = [f"all layers: {default}"]
    layers = policy.get("layers") or {}
    if layers:
        shown = [f"{name} {_fmt_layer(spec) or 'dense'}" for name, spec in list(layers.items())[:3]]
        more = f" (+{len(layers) - 3} more)" if len(layers) > 3 else ""
        parts.append("; ".join(shown) + more)
    skip = policy.get("skip") or []
    if skip:
        parts.append(f"skip {len(skip)} block{'s' if len(skip) != 1 else ''}: {', '.join(skip[:4])}")
    if policy.get("act_bits"):
        parts.append(f"activations int{policy['act_bits']}")
    return " | ".join(parts)


def _load(session: Session, job_id: int) -> _Table:
    rows = queries.raw_rows(
        session,
        select(Candidate.id, Candidate.feasible, *[getattr(Candidate, c) for c in COLUMNS])
        .where(Candidate.job_id == job_id)
        .order_by(Candidate.index),
    )
    cols = list(zip(*rows, strict=True)) if rows else [()] * (2 + len(COLUMNS))
    return _Table(
        id=np.asarray(cols[0], dtype=np.int64),
        feasible=np.asarray(cols[1], dtype=bool),
        cols={name: np.asarray(cols[2 + i], dtype=float) for i, name in enumerate(COLUMNS)},
    )


def front_rows(table: _Table, objectives: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of the feasible non-dominated rows, in the order ``GET /pareto`` returns them.

    The same front and order as ``GET /pareto`` (both are :mod:`service.front`'s), computed
    on the rows already loaded for the scatter.
    """
    objectives = front_objectives(objectives)
    if not objectives:
        return []
    points = signed_points([table.cols[o["metric"]] for o in objectives], objectives)
    points[~table.feasible] = np.nan
    return [int(i) for i in front_order(points, table.id)]


def _grid_keep(table: _Table, idx: np.ndarray, value: str, cells: int) -> np.ndarray:
    """Of rows ``idx``, the first in each occupied (accuracy, ``value``) cell, split by feasibility."""
    x, y = table.cols[value][idx], table.cols["accuracy"][idx]
    ok = ~np.isnan(x) & ~np.isnan(y)
    if not ok.any():
        return np.empty(0, dtype=np.int64)
    idx, x, y = idx[ok], x[ok], y[ok]

    def bucket(v: np.ndarray) -> np.ndarray:
        span = float(v.max() - v.min())
        scaled = (v - v.min()) * (cells / span) if span > 0 else np.zeros_like(v)
        return np.minimum(scaled.astype(np.int64), cells - 1)

    key = (bucket(x) * cells + bucket(y)) * 2 + table.feasible[idx]
    _, first = np.unique(key, return_index=True)
    return np.asarray(idx[first], dtype=np.int64)


def decimate(table: _Table, idx: np.ndarray, max_points: int) -> np.ndarray:
    """At most ``max_points`` of rows ``idx``, covering both planes; coarser grids until they fit."""
    if len(idx) <= max_points:
        return idx
    cells = max(2, int(math.sqrt(max_points)))
    while True:
        kept = np.union1d(
            _grid_keep(table, idx, "latency_ms", cells), _grid_keep(table, idx, "size_bytes", cells)
        )
        if len(kept) <= max_points or cells <= 2:
            return kept
        cells = max(2, int(cells * 0.8))


def _folded(
    table: _Table, rows: list[int], objectives: Sequence[dict[str, Any]], resolution: Resolution
) -> list[list[int]]:
    """``rows`` (a front, in front order) folded within resolution: lists of table rows, the
    representative first (``service.front_fold``)."""
    metrics = [o["metric"] for o in front_objectives(objectives)]
    if not rows or not metrics:
        return [[r] for r in rows]
    values = np.column_stack([table.cols[m][rows] for m in metrics])
    return [[rows[i] for i in g] for g in fold(values, metrics, resolution)]


def job_scatter(
    session: Session, *, job: Job, max_points: int = DEFAULT_MAX_POINTS, resolution: Resolution | None = None
) -> dict[str, Any]:
    """The job's candidates for plotting: the whole front (points equal within ``resolution``
    folded under one), dominated points decimated to ~max_points."""
    table = _load(session, job.id)
    spec = JobSpec.model_validate(job.spec)
    resolution = resolution or Resolution()
    objectives = [g.model_dump() for g in spec.objectives if g.metric in COLUMNS]
    groups = _folded(table, front_rows(table, objectives), objectives, resolution)
    front = [g[0] for g in groups]
    folded = [r for g in groups for r in g[1:]]
    size_objectives = [
        {"metric": "accuracy", "direction": "max"},
        {"metric": "size_bytes", "direction": "min"},
    ]
    size_all = front_rows(table, size_objectives)
    size = sorted(
        (g[0] for g in _folded(table, size_all, size_objectives, resolution)),
        key=lambda i: float(table.cols["size_bytes"][i]),
    )
    always = np.union1d(np.asarray(front + folded, dtype=np.int64), np.asarray(size_all, dtype=np.int64))
    rest = np.setdiff1d(np.arange(len(table)), always, assume_unique=True)
    kept = decimate(table, rest, max_points)
    on_front = set(front) | set(folded)
    others = [int(i) for i in kept] + [i for i in size_all if i not in on_front]
    policies = _policies(session, [int(table.id[i]) for i in [*front, *folded, *others]])
    ids = table.id
    return {
        "job_id": job.id,
        "status": job.status,
        "job": {
            "id": job.id,
            "status": job.status,
            "algorithm": job.algorithm,
            "model_id": job.model_id,
            "dataset_id": job.dataset_id,
            "device_id": job.device_id,
            "progress": job.progress,
            "error": job.error,
        },
        "objectives": [g.model_dump() for g in spec.objectives],
        "constraints": {name: bound.model_dump() for name, bound in spec.constraints.items()},
        "baseline": job.baseline,
        "total": len(table),
        "feasible_total": int(table.feasible.sum()),
        "shown": len(front) + len(folded) + len(others),
        "decimated": len(kept) < len(rest),
        "front": _points(table, front, policies).to_dict(),
        "front_duplicates": [[int(ids[r]) for r in g[1:]] for g in groups],
        "folded": {
            **_points(table, folded, policies).to_dict(),
            "duplicate_of": [int(ids[g[0]]) for g in groups for _ in g[1:]],
        },
        "resolution": resolution.to_dict(),
        "size_front_ids": [int(ids[i]) for i in size],
        "others": _points(table, others, policies).to_dict(),
    }


def _num(value: float) -> float | None:
    return None if math.isnan(value) else value


def _points(table: _Table, rows: Sequence[int], policies: dict[int, dict[str, Any]]) -> Points:
    out = Points()
    for i in rows:
        cid = int(table.id[i])
        size = table.cols["size_bytes"][i]
        out.id.append(cid)
        out.accuracy.append(_num(float(table.cols["accuracy"][i])))
        out.latency_ms.append(_num(float(table.cols["latency_ms"][i])))
        out.size_bytes.append(None if math.isnan(size) else int(size))
        out.feasible.append(bool(table.feasible[i]))
        out.summary.append(policy_summary(policies.get(cid) or {}))
    return out


def _policies(session: Session, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for start in range(0, len(ids), 900):  # stay under SQLite's bound-parameter limit
        chunk = ids[start : start + 900]
        for cid, policy in session.execute(
            select(Candidate.id, Candidate.policy).where(Candidate.id.in_(chunk))
        ):
            out[int(cid)] = policy
    return out


def device_measurements(
    session: Session, *, tenant_id: int, device_id: int, limit: int = 2000
) -> tuple[Sequence[Measurement], int]:
    """Measurements on a device the tenant may see (its own and unowned ones), newest first."""
    where = [
        Measurement.device_id == device_id,
        or_(Measurement.tenant_id == tenant_id, Measurement.tenant_id.is_(None)),
    ]
    rows = session.scalars(
        select(Measurement).where(*where).order_by(Measurement.id.desc()).limit(limit)
    ).all()
    total = len(rows) if len(rows) < limit else _count(session, where)
    return rows, total


def _count(session: Session, where: list[Any]) -> int:
    return int(session.scalar(select(func.count(Measurement.id)).where(*where)) or 0)


def _layer_values(policy: dict[str, Any], names: Sequence[str]) -> tuple[list[float], list[int]]:
    """Per layer: the kept width the policy sets (0 in a skipped block) and its weight bits (32: float)."""
    default = policy.get("default") or {}
    layers = policy.get("layers") or {}
    skip = policy.get("skip") or []
    widths: list[float] = []
    bits: list[int] = []
    for name in names:
        spec = {**default, **(layers.get(name) or {})}
        gone = any(name == b or name.startswith(f"{b}.") for b in skip)
        width = spec.get("width")
        widths.append(0.0 if gone else float(width) if width is not None else 1.0)
        bits.append(0 if gone else int(spec.get("bits") or 32))
    return widths, bits


def job_choices(
    session: Session,
    *,
    job: Job,
    layer_names: Sequence[str],
    max_points: int = 400,
    resolution: Resolution | None = None,
) -> dict[str, Any]:
    """Per-layer choices of the job's candidates, for parallel coordinates coloured by accuracy.

    Every front point (the job's objectives, folded) and, of the rest, up to ``max_points``
    spread evenly over the search order. One axis per layer whose kept width (0 where its block
    is skipped) varies among the candidates shown; layers that never change carry nothing.
    """
    table = _load(session, job.id)
    spec = JobSpec.model_validate(job.spec)
    objectives = [g.model_dump() for g in spec.objectives if g.metric in COLUMNS]
    groups = _folded(table, front_rows(table, objectives), objectives, resolution or Resolution())
    front = [g[0] for g in groups]
    rest = np.setdiff1d(np.flatnonzero(~np.isnan(table.cols["accuracy"])), np.asarray(front, dtype=np.int64))
    if len(rest) > max_points:
        rest = rest[np.linspace(0, len(rest) - 1, max_points).round().astype(np.int64)]
    rows = [*front, *(int(i) for i in rest)]
    policies = _policies(session, [int(table.id[i]) for i in rows])
    values = [_layer_values(policies.get(int(table.id[i])) or {}, layer_names) for i in rows]
    widths = np.asarray([v[0] for v in values], dtype=float).reshape(len(rows), len(layer_names))
    varies = [j for j in range(len(layer_names)) if len(rows) and np.ptp(widths[:, j]) > 0]
    return {
        "job_id": job.id,
        "total": len(table),
        "layers": [layer_names[j] for j in varies],
        "id": [int(table.id[i]) for i in rows],
        "accuracy": [_num(float(table.cols["accuracy"][i])) for i in rows],
        "latency_ms": [_num(float(table.cols["latency_ms"][i])) for i in rows],
        "on_front": [True] * len(front) + [False] * (len(rows) - len(front)),
        "width": [[float(widths[r, j]) for j in varies] for r in range(len(rows))],
        "bits": [[values[r][1][j] for j in varies] for r in range(len(rows))],
    }
