"""Folding a Pareto front: points equal within measurement resolution are one point.

A search easily finds several policies that score the same: seven int8 points of equal
accuracy and latency whose sizes differ by a few KB are all non-dominated, and a front of
ten listing them says nothing. So the front shown (API, dashboard, compare view) folds them:
front points that agree in *every* objective within its resolution are one representative
with its duplicates listed under it.

Resolution (:class:`Resolution`), chosen per metric from how it is measured:

* ``accuracy``: one validation image, ``1 / n_val`` (absolute). Accuracy is a count of images
  out of ``n_val`` (the search scores at most :data:`VAL_IMAGES` of the validation split,
  ``engine.search``), and one image is far inside its sampling noise.
* ``latency_ms``, ``size_bytes``, ``macs``: 1 % of the value (relative). The latency
  predictors are not finer than that (held-out errors of several percent) and same-run
  timings of one model vary by about as much; a 1 % size difference is a few scales or
  mask bits, nothing a user chooses between.

Which points fold, and under which (choices the issue left open):

* only *front* points fold, and only under front points: a dominated point is off the front
  already, and folding needs nothing beyond the front rows (``GET /pareto`` stays a read of
  the flagged rows at 50,000 candidates);
* greedily in front order (first objective best first, then the next, then candidate id):
  a point joins the first representative it matches within resolution in every objective,
  else it becomes one. The representative is therefore the duplicate best in the first
  objective (the most accurate, for the usual accuracy-first objectives), and a member is
  within resolution of its representative (not necessarily of the other members: "equal
  within resolution" is not transitive, so there are no chains).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Validation images a search scores (``engine.search.search``'s ``val_images`` default).
VAL_IMAGES = 1000
#: Relative resolution of latency, size and MACs.
RELATIVE = 0.01
#: Fronts up to this size are compared pair by pair in one array (m² · k floats).
PAIRWISE_MAX = 1500


@dataclass(frozen=True)
class Resolution:
    """How far apart two scores may be and still count as equal.

    Attributes:
        n_val: validation images behind each accuracy.
        relative: relative tolerance of latency, size and MACs (0.01 = 1 %).
    """

    n_val: int = VAL_IMAGES
    relative: float = RELATIVE

    @property
    def accuracy(self) -> float:
        """Absolute accuracy tolerance: one validation image."""
        return 1.0 / max(1, self.n_val)

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "accuracy_images": 1,
            "n_val": self.n_val,
            "latency_ms_relative": self.relative,
            "size_bytes_relative": self.relative,
            "macs_relative": self.relative,
        }


def resolution_for(shapes: Mapping[str, Any] | None) -> Resolution:
    """The resolution of a job on a data set with these ``shapes`` (``Dataset.shapes``).

    ``n_val`` is the validation split's size capped at :data:`VAL_IMAGES`; a data set row that
    does not record it (an older row) is taken to have at least that many images.
    """
    x_val = (shapes or {}).get("x_val")
    if isinstance(x_val, (list, tuple)) and x_val and isinstance(x_val[0], int) and x_val[0] > 0:
        return Resolution(n_val=min(VAL_IMAGES, int(x_val[0])))
    return Resolution()


def fold(values: np.ndarray, metrics: Sequence[str], resolution: Resolution) -> list[list[int]]:
    """Group front points (rows of ``values``, raw scores in front order) equal within resolution.

    Returns one list per representative, in front order: its own row index first, then the
    indices of the points folded under it (in front order). Rows with a NaN never fold.
    """
    values = np.asarray(values, dtype=float).reshape(len(values), len(metrics))
    absolute = np.array([m == "accuracy" for m in metrics])
    tol_abs = np.where(absolute, resolution.accuracy + 1e-12, 0.0)
    rel = np.where(absolute, 0.0, resolution.relative * (1 + 1e-12))
    reps: list[int] = []
    groups: list[list[int]] = []

    def join(i: int, hit: int | None) -> None:
        if hit is None:
            reps.append(i)
            groups.append([i])
        else:
            groups[hit].append(i)

    if len(values) <= PAIRWISE_MAX:  # every pair at once, then the greedy pass over plain lists
        a, b = values[:, None, :], values[None, :, :]
        close = (np.abs(a - b) <= tol_abs + rel * np.maximum(np.abs(a), np.abs(b))).all(axis=2).tolist()
        for i, row in enumerate(close):
            join(i, next((k for k, r in enumerate(reps) if row[r]), None))
        return groups
    for i, row in enumerate(values):  # a large (3-4 objective) front: one row against the representatives
        rv = values[reps]
        near = (np.abs(rv - row) <= tol_abs + rel * np.maximum(np.abs(rv), np.abs(row))).all(axis=1)
        found = np.flatnonzero(near)
        join(i, int(found[0]) if len(found) else None)
    return groups
