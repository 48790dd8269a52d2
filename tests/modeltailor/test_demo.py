"""Which front point ``modeltailor demo`` exports: the fastest within 1 point of dense accuracy."""

from __future__ import annotations

from typing import Any, cast

import pytest

from modeltailor.cli.demo import pick_export
from modeltailor.client import Candidate, Client


def _front(*points: tuple[float, float]) -> list[Candidate]:
    """Candidates with (accuracy, predicted latency ms); no server behind them."""
    client = cast(Client, None)
    return [
        Candidate(client, cast(dict[str, Any], {"id": i, "accuracy": acc, "latency_ms": ms}))
        for i, (acc, ms) in enumerate(points)
    ]


def test_the_fastest_point_within_one_point_of_dense_is_exported() -> None:
    # 0.975 is 1.5 points down: faster, but not what a user asking for <= 1 point wants.
    front = _front((0.990, 1.0), (0.985, 0.6), (0.981, 0.5), (0.975, 0.2))
    pick, why = pick_export(front, dense_accuracy=0.991)
    assert pick.id == 2 and "within 1 point" in why


def test_equal_latency_prefers_accuracy_and_no_near_point_falls_back_to_the_most_accurate() -> None:
    pick, _ = pick_export(_front((0.980, 0.5), (0.990, 0.5)), dense_accuracy=0.99)
    assert pick.id == 1
    pick, why = pick_export(_front((0.90, 0.3), (0.95, 0.6)), dense_accuracy=0.99)
    assert pick.id == 1 and "most accurate" in why
    pick, _ = pick_export(_front((0.90, 0.3), (0.95, 0.6)), dense_accuracy=None)
    assert pick.id == 1
    with pytest.raises(ValueError, match="no front point"):
        pick_export([], dense_accuracy=0.99)
