"""The vectorised Pareto front equals the definition, checked against a brute-force reference."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.front import dominance, front_order, signed_points


def brute_force(points: list[tuple[float, ...]], ids: list[int]) -> list[int]:
    """Row indices not dominated by any row (≤ everywhere, different somewhere), sorted by (point, id)."""

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and a != b

    keep = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(keep, key=lambda i: (points[i], ids[i]))


# Few distinct values so ties and exact duplicates are common.
values = st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0])


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4).flatmap(lambda k: st.lists(st.tuples(*[values] * k), min_size=0, max_size=40)))
def test_front_matches_the_definition_with_ties_and_duplicates(points: list[tuple[float, ...]]) -> None:
    k = len(points[0]) if points else 2
    ids = list(range(100, 100 + len(points)))[::-1]  # ids disagree with row order on purpose
    array = np.array(points, dtype=float).reshape(len(points), k)
    got = front_order(array, np.array(ids, dtype=np.int64)).tolist()
    assert got == brute_force(points, ids)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4).flatmap(lambda k: st.lists(st.tuples(*[values] * k), min_size=1, max_size=40)))
def test_one_point_at_a_time_keeps_the_same_front(points: list[tuple[float, ...]]) -> None:
    front: list[int] = []
    for i, point in enumerate(points):
        current = np.array([points[j] for j in front], dtype=float).reshape(len(front), len(point))
        dominated, beaten = dominance(current, np.array(point))
        if not dominated:
            front = [j for j, gone in zip(front, beaten, strict=True) if not gone] + [i]
    assert sorted(front) == sorted(brute_force(points, list(range(len(points)))))


def test_rows_with_a_missing_score_take_no_part() -> None:
    points = np.array([[1.0, 5.0], [np.nan, 0.0], [2.0, 4.0], [0.5, np.nan]])
    assert front_order(points, np.arange(4)).tolist() == [0, 2]


def test_maximised_objectives_are_negated() -> None:
    objectives = [{"metric": "accuracy", "direction": "max"}, {"metric": "latency_ms", "direction": "min"}]
    acc, lat = np.array([0.9, 0.8, 0.95, 0.7]), np.array([2.0, 1.0, 3.0, 1.5])
    order = front_order(signed_points([acc, lat], objectives), np.arange(4))
    assert order.tolist() == [2, 0, 1]  # most accurate first; 0.7 @ 1.5 ms is dominated by 0.8 @ 1 ms


def test_fifty_thousand_points_give_the_nondominated_set() -> None:
    rng = np.random.default_rng(0)
    points = rng.random((50_000, 2))
    front = front_order(points, np.arange(50_000))
    assert 1 <= len(front) < 100
    # exactly the points no other point dominates (both minimised here)
    best_y = np.minimum.accumulate(points[np.argsort(points[:, 0]), 1])
    expected = np.argsort(points[:, 0])[np.r_[True, best_y[1:] < best_y[:-1]]]
    assert set(front.tolist()) == set(expected.tolist())
    three = front_order(rng.random((50_000, 3)), np.arange(50_000))
    assert len(three) > len(front)


# --- the stored front: flags kept exact as candidates arrive, recomputed when stale ---------


def _setup_job(db_url: str, objectives: list[dict[str, str]], constraints: dict[str, Any]):  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from db.engine import make_engine, make_session_factory
    from db.migrate import upgrade
    from db.models import Dataset, Device, Job, Model, Tenant
    from engine.spec import JobSpec
    from service import queries

    upgrade(db_url)
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    with factory() as s:
        queries.ensure_builtin_devices(s)
        tenant = Tenant(name="t")
        s.add(tenant)
        s.flush()
        data = Dataset(tenant_id=tenant.id, name="d", builtin="digits")
        s.add(data)
        s.flush()
        model = Model(tenant_id=tenant.id, name="m", source="zoo", zoo="lenet5", dataset_id=data.id)
        s.add(model)
        s.flush()
        device_id = s.scalars(select(Device.id)).first()
        ids = {"model_id": model.id, "dataset_id": data.id, "device_id": device_id}
        spec = JobSpec.model_validate(
            {**ids, "algorithm": "random", "objectives": objectives, "constraints": constraints,
             "budget": {"candidates": 100}}
        )  # fmt: skip
        job = Job(tenant_id=tenant.id, algorithm="random", spec=spec.model_dump(mode="json"), **ids)
        s.add(job)
        s.commit()
        return engine, factory, job.id


def _expected(rows: list[tuple[int, bool, tuple[float | None, ...]]], signs: list[float]) -> list[int]:
    ok = [
        (cid, tuple(s * float(v) for s, v in zip(signs, vals, strict=True) if v is not None))
        for cid, feas, vals in rows
        if feas and all(v is not None for v in vals)
    ]
    points, ids = [p for _, p in ok], [cid for cid, _ in ok]
    return [ids[i] for i in brute_force(points, ids)]


@pytest.mark.parametrize("metrics", [("accuracy", "latency_ms"), ("accuracy", "latency_ms", "size_bytes")])
def test_front_flags_stay_exact_as_candidates_arrive_and_after_a_bulk_load(
    db_url: str, metrics: tuple[str, ...]
) -> None:
    import random

    from sqlalchemy import insert, select

    from db.models import Candidate, Job
    from engine.job import Scores
    from service import queries

    objectives = [{"metric": m, "direction": "max" if m == "accuracy" else "min"} for m in metrics]
    signs = [-1.0 if o["direction"] == "max" else 1.0 for o in objectives]
    engine, factory, job_id = _setup_job(db_url, objectives, {"latency_ms": {"max": 4.0}})
    rng = random.Random(0)

    def scores() -> Scores:
        accuracy = None if rng.random() < 0.05 else rng.choice([0.5, 0.6, 0.7, 0.8, 0.9])
        return Scores(accuracy=accuracy, latency_ms=float(rng.randint(1, 5)), size_bytes=rng.randint(1, 4))

    def add(first: int, last: int) -> None:
        with factory() as s:
            for i in range(first, last):
                job = s.get(Job, job_id)
                assert job is not None
                stored = queries.add_candidate(s, job=job, policy={}, policy_hash=f"h{i}", scores=scores())
                assert stored is not None

    def bulk_load(first: int, last: int) -> None:
        rows = []
        for i in range(first, last):
            sc = scores()
            row: dict[str, Any] = {"accuracy": sc.accuracy, "latency_ms": sc.latency_ms}
            row["size_bytes"] = sc.size_bytes
            row.update(job_id=job_id, index=i, policy={}, policy_hash=f"h{i}", extra={})
            rows.append({**row, "feasible": (sc.latency_ms or 0) <= 4.0})
        with factory() as s:
            s.execute(insert(Candidate), rows)
            s.commit()

    def flagged_and_expected() -> tuple[set[int], list[int], int | None, int]:
        with factory() as s:
            rows = s.execute(select(Candidate).where(Candidate.job_id == job_id)).scalars().all()
            table = [(c.id, c.feasible, tuple(getattr(c, m) for m in metrics)) for c in rows]
            accounted = s.scalar(select(Job.front_candidates).where(Job.id == job_id))
            return {c.id for c in rows if c.on_front}, _expected(table, signs), accounted, len(rows)

    def pareto_ids() -> list[int]:
        with factory() as s:
            job = s.get(Job, job_id)
            assert job is not None
            return [c.id for c in queries.pareto(s, job=job)]

    try:
        add(0, 80)
        flagged, want, accounted, total = flagged_and_expected()
        assert (flagged, accounted) == (set(want), total)  # kept exact one insert at a time
        assert pareto_ids() == want
        bulk_load(80, 120)  # bypasses add_candidate: the flags go stale...
        flagged, want, accounted, total = flagged_and_expected()
        assert accounted != total
        assert pareto_ids() == want  # ...a read computes the front from every candidate...
        assert flagged_and_expected()[2] == accounted  # ...writing nothing...
        with factory() as s:
            assert queries.stale_fronts(s) == [job_id]
            job = s.get(Job, job_id)
            assert job is not None
            queries.refresh_front(s, job=job)  # ...and the housekeeping loop recomputes the flags
        flagged, want, accounted, total = flagged_and_expected()
        assert (flagged, accounted) == (set(want), total)
        with factory() as s:
            assert queries.stale_fronts(s) == []
        add(120, 160)
        flagged, want, accounted, total = flagged_and_expected()
        assert (flagged, accounted) == (set(want), total)
        assert pareto_ids() == want
    finally:
        engine.dispose()
