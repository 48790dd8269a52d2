"""Comparing searches: several jobs' fronts on one plot, their hypervolume as candidates
arrive, and each job's best point under one bound the user chooses.

Choices the issue left open, recorded here:

* **Axes.** Every job is compared on accuracy (max) against predicted latency (min), whatever
  its own objectives: the one plane every job scores. Only feasible candidates count (those
  meeting the job's own constraints, as its front does). Fronts are folded within measurement
  resolution (``service.front_fold``).
* **Hypervolume reference.** Each job's own point (dense accuracy − 10 points, dense
  latency), as ``bench/search.py`` uses: what a compressed model must beat to be worth
  anything. ``hypervolume`` is the dominated area in accuracy × ms; ``normalized`` divides
  it by the reference box (0.10 × dense latency), so jobs on different devices (dense
  latencies) compare on one scale: 1.0 would be dense accuracy at zero latency.
  A job without a dense accuracy and latency has no hypervolume (null).
* **Over time.** The hypervolume after the first ``n`` candidates (evaluation order), at up to
  :data:`CHECKPOINTS` evenly spaced ``n``, with the seconds since the job started.
* **Best under a bound.** ``max_latency_ms``: the most accurate feasible candidate at most that
  slow; ``min_accuracy``: the fastest at least that accurate; ``max_accuracy_drop``: the
  fastest within that drop of the job's own dense accuracy (fair across devices and models).
  Ties go to the earlier candidate.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Candidate, Device, Job
from service import queries
from service.dashboard.data import policy_summary
from service.front import front_order, signed_points
from service.front_fold import fold

MAX_JOBS = 8
CHECKPOINTS = 120
REF_ACCURACY_DROP = 0.10
BOUNDS = ("max_latency_ms", "min_accuracy", "max_accuracy_drop")
_PLANE = [{"metric": "accuracy", "direction": "max"}, {"metric": "latency_ms", "direction": "min"}]


@dataclass(frozen=True)
class Bound:
    """One user-chosen bound: ``kind`` one of :data:`BOUNDS`, and its value."""

    kind: str
    value: float

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}


def hypervolume_curve(
    acc: np.ndarray, lat: np.ndarray, marks: np.ndarray, ref_acc: float, ref_lat: float
) -> list[float]:
    """Hypervolume of the first ``n`` points for each ``n`` in ``marks`` (increasing), accuracy
    max and latency min, up to the reference (``agents.objective.hypervolume_2d``'s sweep).

    Carries the running front from one mark to the next, so the cost is one sort of each
    stretch of new points with that front: O(n log n) in all, not per mark.
    """
    front_a, front_l = np.zeros(0), np.zeros(0)
    out: list[float] = []
    prev = 0
    for n in marks:
        a, lt = acc[prev:n], lat[prev:n]
        inside = (a > ref_acc) & (lt < ref_lat)  # NaN (unusable) rows fail both
        a, lt = np.concatenate([front_a, a[inside]]), np.concatenate([front_l, lt[inside]])
        order = np.lexsort((-a, lt))  # by latency, the more accurate first
        a, lt = a[order], lt[order]
        best_before = np.concatenate([[-np.inf], np.maximum.accumulate(a)[:-1]]) if len(a) else a
        on_front = a > best_before
        front_a, front_l = a[on_front], lt[on_front]
        out.append(float(((front_a - ref_acc) * np.diff(np.append(front_l, ref_lat))).sum()))
        prev = int(n)
    return out


def _table(session: Session, job_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    columns: list[Any] = [Candidate.id, Candidate.feasible, Candidate.accuracy, Candidate.latency_ms]
    rows = queries.raw_rows(
        session, select(*columns).where(Candidate.job_id == job_id).order_by(Candidate.index)
    )
    if not rows:
        empty = np.zeros(0)
        return empty.astype(np.int64), empty.astype(bool), empty, empty
    ids, feasible, acc, lat = zip(*rows, strict=True)
    return (
        np.asarray(ids, dtype=np.int64),
        np.asarray(feasible, dtype=bool),
        np.asarray(acc, dtype=float),
        np.asarray(lat, dtype=float),
    )


def _checkpoints(n: int) -> np.ndarray:
    """Candidate counts at which the hypervolume is reported (1..n, at most CHECKPOINTS, n last)."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(1, n, min(n, CHECKPOINTS)).round().astype(np.int64))


def _elapsed(session: Session, job: Job, ids: Sequence[int]) -> list[float | None]:
    """Seconds from the job's start to when each of ``ids`` was stored."""
    start = job.started_at or job.created_at
    stamps: dict[int, dt.datetime] = {}
    for at in range(0, len(ids), 900):  # under SQLite's bound-parameter limit
        chunk = [int(i) for i in ids[at : at + 900]]
        stamps.update(
            session.execute(select(Candidate.id, Candidate.created_at).where(Candidate.id.in_(chunk))).all()
        )
    return [
        round(max(0.0, (stamps[i] - start).total_seconds()), 3) if i in stamps and start else None
        for i in ids
    ]


def _best(
    acc: np.ndarray, lat: np.ndarray, usable: np.ndarray, bound: Bound, dense_acc: float | None
) -> int | None:
    """Row of the best candidate under ``bound`` (None: none meets it)."""
    if bound.kind == "max_latency_ms":
        ok = usable & (lat <= bound.value)
        if not ok.any():
            return None
        rows = np.flatnonzero(ok)
        return int(rows[np.lexsort((lat[rows], -acc[rows]))[0]])
    if bound.kind == "min_accuracy":
        floor = bound.value
    else:
        if dense_acc is None:
            return None
        floor = dense_acc - bound.value
    ok = usable & (acc >= floor - 1e-12)
    if not ok.any():
        return None
    rows = np.flatnonzero(ok)
    return int(rows[np.lexsort((-acc[rows], lat[rows]))[0]])


def _num(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def job_comparison(session: Session, *, job: Job, bound: Bound | None, device_name: str) -> dict[str, Any]:
    """One job's part of the comparison: its folded accuracy / latency front, its hypervolume
    over candidates, and its best point under ``bound``."""
    ids, feasible, acc, lat = _table(session, job.id)
    usable = feasible & ~np.isnan(acc) & ~np.isnan(lat)
    points = signed_points([acc, lat], _PLANE)
    points[~usable] = np.nan
    front = [int(i) for i in front_order(points, ids)]
    resolution = queries.job_resolution(session, job=job)
    groups = (
        fold(np.column_stack([acc[front], lat[front]]), ["accuracy", "latency_ms"], resolution)
        if front
        else []
    )
    reps = [front[g[0]] for g in groups]
    base = job.baseline or {}
    dense_acc, dense_lat = base.get("accuracy"), base.get("latency_ms")
    hv: dict[str, Any] = {
        "reference": None,
        "candidates": [],
        "elapsed_s": [],
        "hypervolume": [],
        "normalized": [],
    }
    if dense_acc is not None and dense_lat:
        ref_acc, ref_lat = float(dense_acc) - REF_ACCURACY_DROP, float(dense_lat)
        box = REF_ACCURACY_DROP * ref_lat
        marks = _checkpoints(len(ids))
        values = hypervolume_curve(np.where(usable, acc, np.nan), lat, marks, ref_acc, ref_lat)
        hv = {
            "reference": {"accuracy": ref_acc, "latency_ms": ref_lat},
            "candidates": [int(n) for n in marks],
            "elapsed_s": _elapsed(session, job, [int(ids[n - 1]) for n in marks]),
            "hypervolume": values,
            "normalized": [v / box for v in values],
        }
    best = None
    if bound is not None:
        row = _best(acc, lat, usable, bound, dense_acc)
        if row is not None:
            best = {"id": int(ids[row]), "accuracy": _num(acc[row]), "latency_ms": _num(lat[row])}
    policies: dict[int, dict[str, Any]] = (
        dict(
            session.execute(
                select(Candidate.id, Candidate.policy).where(Candidate.id.in_([int(ids[r]) for r in reps]))
            ).all()
        )
        if reps
        else {}
    )
    spec = job.spec or {}
    return {
        "id": job.id,
        "status": job.status,
        "algorithm": job.algorithm,
        "seed": spec.get("seed", 0),
        "model_id": job.model_id,
        "device_id": job.device_id,
        "device": device_name,
        "baseline": {"accuracy": dense_acc, "latency_ms": dense_lat},
        "total": len(ids),
        "feasible_total": int(feasible.sum()),
        "front": {
            "id": [int(ids[r]) for r in reps],
            "accuracy": [_num(acc[r]) for r in reps],
            "latency_ms": [_num(lat[r]) for r in reps],
            "duplicates": [len(g) - 1 for g in groups],
            "summary": [policy_summary(policies.get(int(ids[r])) or {}) for r in reps],
        },
        "hypervolume": {
            **hv,
            "final": hv["hypervolume"][-1] if hv["hypervolume"] else None,
            "final_normalized": hv["normalized"][-1] if hv["normalized"] else None,
        },
        "best": best,
    }


def compare(session: Session, *, jobs: Sequence[Job], bound: Bound | None) -> dict[str, Any]:
    """The comparison of ``jobs`` (already checked to be the tenant's), in the order given."""
    names = dict(
        session.execute(
            select(Device.id, Device.name).where(Device.id.in_({j.device_id for j in jobs}))
        ).all()
    )
    return {
        "bound": bound.to_dict() if bound is not None else None,
        "reference": f"each job's dense accuracy - {REF_ACCURACY_DROP:.2f} and dense latency",
        "jobs": [
            job_comparison(session, job=job, bound=bound, device_name=names.get(job.device_id, ""))
            for job in jobs
        ],
    }
