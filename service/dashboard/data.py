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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from db.models import Candidate, Job, Measurement
from service import queries

DEFAULT_MAX_POINTS = 4000


@dataclass
class _Row:
    id: int
    accuracy: float | None
    latency_ms: float | None
    size_bytes: int | None
    feasible: bool


@dataclass
class Points:
    """Columnar points: what plotly wants and the cheapest JSON to ship."""

    id: list[int] = field(default_factory=list)
    accuracy: list[float | None] = field(default_factory=list)
    latency_ms: list[float | None] = field(default_factory=list)
    size_bytes: list[int | None] = field(default_factory=list)
    feasible: list[bool] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)

    def add(self, row: _Row, summary: str) -> None:
        self.id.append(row.id)
        self.accuracy.append(row.accuracy)
        self.latency_ms.append(row.latency_ms)
        self.size_bytes.append(row.size_bytes)
        self.feasible.append(row.feasible)
        self.summary.append(summary)

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


def _grid_keep(rows: Sequence[_Row], value: str, cells: int) -> set[int]:
    """Ids of the first row in each occupied (accuracy, ``value``) cell, split by feasibility."""
    xs = [getattr(r, value) for r in rows]
    ys = [r.accuracy for r in rows]
    xv = [x for x in xs if x is not None]
    yv = [y for y in ys if y is not None]
    if not xv or not yv:
        return set()
    x0, x1, y0, y1 = min(xv), max(xv), min(yv), max(yv)
    sx = cells / (x1 - x0) if x1 > x0 else 0.0
    sy = cells / (y1 - y0) if y1 > y0 else 0.0
    seen: set[tuple[int, int, bool]] = set()
    keep: set[int] = set()
    for row, x, y in zip(rows, xs, ys, strict=True):
        if x is None or y is None:
            continue
        cell = (min(int((x - x0) * sx), cells - 1), min(int((y - y0) * sy), cells - 1), row.feasible)
        if cell not in seen:
            seen.add(cell)
            keep.add(row.id)
    return keep


def size_front(rows: Iterable[_Row]) -> list[int]:
    """Ids of the feasible points non-dominated in (accuracy max, size min), by size."""
    points = sorted(
        (r.size_bytes, -r.accuracy, r.id)
        for r in rows
        if r.feasible and r.size_bytes is not None and r.accuracy is not None
    )
    front: list[int] = []
    best = math.inf
    for _size, neg_acc, cid in points:
        if neg_acc < best:
            front.append(cid)
            best = neg_acc
    return front


def job_scatter(session: Session, *, job: Job, max_points: int = DEFAULT_MAX_POINTS) -> dict[str, Any]:
    """The job's candidates for plotting: the whole front, dominated points decimated to ~max_points."""
    rows = [
        _Row(int(r[0]), r[1], r[2], r[3], bool(r[4]))
        for r in session.execute(
            select(
                Candidate.id, Candidate.accuracy, Candidate.latency_ms, Candidate.size_bytes, Candidate.feasible
            )
            .where(Candidate.job_id == job.id)
            .order_by(Candidate.index)
        )
    ]
    front_rows = queries.pareto(session, job=job)
    front_ids = [c.id for c in front_rows]
    size_ids = size_front(rows)
    always = set(front_ids) | set(size_ids)
    others = [r for r in rows if r.id not in always]
    kept = others
    cells = max(2, int(math.sqrt(max_points)))
    while len(kept) > max_points and cells >= 2:  # coarsen the grid until the cloud fits
        keep = _grid_keep(others, "latency_ms", cells) | _grid_keep(others, "size_bytes", cells)
        kept = [r for r in others if r.id in keep]
        cells = int(cells * 0.8)
    by_id = {r.id: r for r in rows}
    wanted = [r.id for r in kept] + [i for i in size_ids if i not in front_ids]
    policies = _policies(session, wanted)
    policies.update({c.id: c.policy for c in front_rows})

    def points(ids: Iterable[int]) -> Points:
        out = Points()
        for cid in ids:
            out.add(by_id[cid], policy_summary(policies.get(cid) or {}))
        return out

    return {
        "job_id": job.id,
        "status": job.status,
        "objectives": job.spec.get("objectives", []),
        "constraints": job.spec.get("constraints", {}),
        "baseline": job.baseline,
        "total": len(rows),
        "feasible_total": sum(1 for r in rows if r.feasible),
        "shown": len(always) + len(kept),
        "decimated": len(kept) < len(others),
        "front": points(front_ids).to_dict(),
        "size_front_ids": size_ids,
        "others": points([r.id for r in kept] + [i for i in size_ids if i not in front_ids]).to_dict(),
    }


def _policies(session: Session, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for start in range(0, len(ids), 900):  # stay under SQLite's bound-parameter limit
        chunk = ids[start : start + 900]
        for cid, policy in session.execute(select(Candidate.id, Candidate.policy).where(Candidate.id.in_(chunk))):
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
    rows = session.scalars(select(Measurement).where(*where).order_by(Measurement.id.desc()).limit(limit)).all()
    total = len(rows) if len(rows) < limit else _count(session, where)
    return rows, total


def _count(session: Session, where: list[Any]) -> int:
    return int(session.scalar(select(func.count(Measurement.id)).where(*where)) or 0)
