"""Claiming a job is atomic: of concurrent claimers exactly one wins; expired leases move on."""

from __future__ import annotations

import threading
import time

from sqlalchemy import select

from db.engine import make_engine, make_session_factory
from db.leases import claim_job, release_job, renew_lease
from db.migrate import upgrade
from db.models import Dataset, Device, Job, Model, Tenant


def _seed_jobs(url: str, n: int) -> list[int]:
    engine = make_engine(url)
    with make_session_factory(engine)() as s:
        tenant = Tenant(name="t")
        s.add(tenant)
        s.flush()
        data = Dataset(tenant_id=tenant.id, name="d", builtin="digits")
        device = Device(name="cpu", runtime="onnxruntime")
        s.add_all([data, device])
        s.flush()
        model = Model(tenant_id=tenant.id, name="m", source="zoo", zoo="resnet20")
        s.add(model)
        s.flush()
        jobs = [
            Job(
                tenant_id=tenant.id,
                model_id=model.id,
                dataset_id=data.id,
                device_id=device.id,
                algorithm="random",
                spec={},
            )
            for _ in range(n)
        ]
        s.add_all(jobs)
        s.commit()
        ids = [j.id for j in jobs]
    engine.dispose()
    return ids


def test_two_concurrent_claimers_exactly_one_wins(db_url: str) -> None:
    upgrade(db_url)
    rounds = 8
    _seed_jobs(db_url, rounds)
    engines = [make_engine(db_url) for _ in range(2)]
    factories = [make_session_factory(e) for e in engines]
    won: list[list[int | None]] = [[], []]
    for r in range(rounds):
        barrier = threading.Barrier(2)

        def claimer(i: int, barrier: threading.Barrier = barrier, r: int = r) -> None:
            with factories[i]() as s:
                barrier.wait()
                # Each round races for job r+1 only, so the race is on one row.
                won[i].append(claim_job(s, owner=f"runner-{i}", lease_s=60, job_id=r + 1))

        threads = [threading.Thread(target=claimer, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = [won[0][r], won[1][r]]
        assert sorted(results, key=lambda x: x is None) == [r + 1, None], results
    with factories[0]() as s:
        jobs = list(s.scalars(select(Job).order_by(Job.id)))
        assert all(j.status == "running" and j.attempts == 1 for j in jobs)
        assert {j.lease_owner for j in jobs} <= {"runner-0", "runner-1"}
    for e in engines:
        e.dispose()


def test_many_claimers_drain_the_queue_without_double_claims(db_url: str) -> None:
    upgrade(db_url)
    ids = _seed_jobs(db_url, 12)
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        with factory() as s:
            while (job_id := claim_job(s, owner=f"w{i}", lease_s=60)) is not None:
                with lock:
                    claimed.append(job_id)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.dispose()
    assert sorted(claimed) == ids


def test_expired_lease_is_claimed_by_another_runner_and_old_owner_cannot_release(db_url: str) -> None:
    upgrade(db_url)
    (job_id,) = _seed_jobs(db_url, 1)
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    with factory() as s:
        assert claim_job(s, owner="a", lease_s=0.3) == job_id
        assert claim_job(s, owner="b", lease_s=30) is None  # lease still held
        assert renew_lease(s, job_id=job_id, owner="a", lease_s=0.3)
        time.sleep(0.5)
        assert claim_job(s, owner="b", lease_s=30) == job_id
        assert not renew_lease(s, job_id=job_id, owner="a", lease_s=30)
        assert not release_job(s, job_id=job_id, owner="a", status="failed", error="stale")
        assert release_job(s, job_id=job_id, owner="b", status="succeeded")
        job = s.get(Job, job_id)
        assert job is not None
        s.refresh(job)
        assert (job.status, job.attempts, job.lease_owner, job.error) == ("succeeded", 2, None, None)
        assert job.finished_at is not None
        assert claim_job(s, owner="c", lease_s=30) is None
    engine.dispose()
