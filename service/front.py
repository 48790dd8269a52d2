"""Pareto fronts of candidate scores, vectorised with numpy: the one definition in the service.

Used three ways, so the API and the dashboard never disagree: :func:`dominance` keeps a
job's stored front flags exact as each candidate arrives (O(front) per candidate, so
``GET /v1/jobs/{id}/pareto`` reads the front rows alone, even at 50,000 candidates);
:func:`front_order` recomputes a whole front when the flags are stale and orders the
front for the response; the dashboard's scatter calls it on the rows it loaded anyway.

The front is the usual non-dominated set: a point is dropped only if another point is
at least as good in every objective and differs in one, so exact duplicates of a front
point are all on the front. Points come back in lexicographic order of their signed
objective vectors (first objective best first), ties broken by candidate id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

METRICS = ("accuracy", "latency_ms", "size_bytes", "macs")


def front_objectives(objectives: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The objectives a front is computed over: those on a stored score column."""
    return [dict(o) for o in objectives if o.get("metric") in METRICS]


def signed_points(columns: Sequence[np.ndarray], objectives: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """An n×k array to minimise: column ``i`` negated where objective ``i`` is maximised."""
    if len(columns) != len(objectives):
        raise ValueError(f"{len(columns)} columns for {len(objectives)} objectives")
    signs = np.array([-1.0 if o["direction"] == "max" else 1.0 for o in objectives])
    return np.column_stack([np.asarray(c, dtype=float) for c in columns]) * signs


def front_order(points: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Row indices of the non-dominated rows of ``points`` (n×k, minimised), in front order.

    Rows holding a NaN (a score never measured) take no part. Cost: a sort plus
    O(n) for one or two objectives; O(n·front) for three or four.
    """
    points = np.asarray(points, dtype=float)
    if points.ndim != 2:
        raise ValueError("points must be an n×k array")
    ok = np.flatnonzero(~np.isnan(points).any(axis=1))
    if not len(ok) or points.shape[1] == 0:
        return np.empty(0, dtype=np.int64)
    k = points.shape[1]
    keys = [np.asarray(ids)[ok], *(points[ok, j] for j in reversed(range(k)))]
    order = ok[np.lexsort(keys)]
    sorted_points = points[order]
    if k == 1:
        keep = sorted_points[:, 0] == sorted_points[0, 0]
    elif k == 2:
        keep = _sweep_2d(sorted_points)
    else:
        keep = _cull(sorted_points)
    return np.asarray(order[keep], dtype=np.int64)


def _sweep_2d(p: np.ndarray) -> np.ndarray:
    """Keep-mask of lexicographically sorted 2-D points.

    Every earlier point is no worse in the first objective, so a point is dominated
    exactly when an earlier point with a different vector is no worse in the second:
    keep it when its second value beats the minimum over all earlier groups of equal
    vectors (equal vectors are adjacent after the sort and share their fate).
    """
    n = len(p)
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (p[1:] != p[:-1]).any(axis=1)
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    best_before = np.concatenate(([np.inf], np.minimum.accumulate(p[:, 1])))[group_start]
    return np.asarray(p[:, 1] < best_before)


def _cull(p: np.ndarray) -> np.ndarray:
    """Keep-mask of lexicographically sorted k-D points.

    The first remaining point is never dominated by a remaining one (a dominating
    point sorts before it), nor by a removed one (dominance is transitive), so take
    it and drop every remaining point it dominates; repeat.
    """
    keep = np.zeros(len(p), dtype=bool)
    alive = np.arange(len(p))
    while len(alive):
        head, rest = alive[0], alive[1:]
        keep[head] = True
        others = p[rest]
        dominated = (others >= p[head]).all(axis=1) & (others > p[head]).any(axis=1)
        alive = rest[~dominated]
    return keep


def dominance(front: np.ndarray, point: np.ndarray) -> tuple[bool, np.ndarray]:
    """How one new ``point`` (k values, minimised) meets the current ``front`` (m×k).

    Returns whether some front point dominates it, and the mask of front points it
    dominates (they leave the front if it joins). O(m·k): what keeps the front exact
    as candidates arrive, without reading the rest of the job.
    """
    front = np.asarray(front, dtype=float).reshape(-1, len(point))
    point = np.asarray(point, dtype=float)
    no_worse = (front <= point).all(axis=1) & (front < point).any(axis=1)
    beaten = (front >= point).all(axis=1) & (front > point).any(axis=1)
    return bool(no_worse.any()), np.asarray(beaten, dtype=bool)
