"""The runner resumes a job whose runner died, from its stored state, losing and repeating nothing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from conftest import fake_search
from sqlalchemy import select

from db.engine import make_engine, make_session_factory
from db.leases import claim_job
from db.migrate import upgrade
from db.models import Candidate, Dataset, Device, Job, Model, Tenant
from engine.executors import LocalPoolExecutor, worker_state
from engine.job import Scores
from engine.spec import Budget, JobSpec
from service import queries
from service.runner import Runner
from service.settings import Settings


def _job(factory, budget: int) -> int:  # type: ignore[no-untyped-def]
    with factory() as s:
        tenant = Tenant(name="t")
        s.add(tenant)
        s.flush()
        data = Dataset(tenant_id=tenant.id, name="d", builtin="digits")
        s.add(data)
        s.flush()
        model = Model(tenant_id=tenant.id, name="m", source="zoo", zoo="resnet20", dataset_id=data.id)
        s.add(model)
        queries.ensure_builtin_devices(s)
        device = s.scalars(select(Device)).first()
        assert device is not None
        spec = JobSpec(
            model_id=model.id, dataset_id=data.id, device_id=device.id, algorithm="random",
            budget=Budget(candidates=budget),
        ).model_dump(mode="json")  # fmt: skip
        job = Job(tenant_id=tenant.id, model_id=model.id, dataset_id=data.id, device_id=device.id,
                  algorithm="random", spec=spec)  # fmt: skip
        s.add(job)
        s.commit()
        return job.id


def test_expired_lease_job_resumes_without_loss_or_duplicates(db_url: str, tmp_path: Path) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    job_id = _job(factory, budget=10)
    # A runner claims the job, stores 4 candidates and its agent state, then "dies" (stops renewing).
    with factory() as s:
        assert claim_job(s, owner="dead", lease_s=0.5) == job_id
        job = s.get(Job, job_id)
        assert job is not None
        for asked in range(4):
            width = round(__import__("random").Random(asked).uniform(0.2, 1.0), 3)
            state = json.dumps({"asked": asked + 1}).encode()
            queries.add_candidate(s, job=job, policy={"default": {"width": width}}, policy_hash=f"w{width}",
                                  scores=Scores(accuracy=width), agent_state=state)  # fmt: skip
    settings = Settings(data_dir=tmp_path, database_url=db_url, lease_s=2.0, poll_s=0.05)
    runner = Runner(factory, settings, search=fake_search, owner="heir")
    assert not runner.run_once()  # lease still held by the dead runner
    time.sleep(0.6)
    assert runner.run_once()
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "succeeded" and job.attempts == 2
        cands = list(s.scalars(select(Candidate).where(Candidate.job_id == job_id).order_by(Candidate.index)))
    assert len(cands) == 10 and len({c.policy_hash for c in cands}) == 10
    assert [c.index for c in cands] == list(range(10))
    assert json.loads(job.agent_state or b"{}")["asked"] >= 10
    engine.dispose()


def test_a_failing_search_fails_the_job_with_its_message(db_url: str, tmp_path: Path) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    job_id = _job(factory, budget=3)

    def broken_search(ctx: object) -> None:
        raise RuntimeError("the model file is gone")

    runner = Runner(factory, Settings(data_dir=tmp_path, database_url=db_url), search=broken_search)
    assert runner.run_once()
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "failed"
        assert job.error == "RuntimeError: the model file is gone"
    engine.dispose()


def _load(tag: str) -> dict[str, object]:
    return {"tag": tag, "pid": os.getpid()}


def _evaluate(x: int) -> tuple[int, int, str]:
    state = worker_state()
    return x * x, int(state["pid"]), str(state["tag"])


def test_local_pool_initializes_each_worker_once() -> None:
    pool = LocalPoolExecutor(2, _load, ("model-and-data",))
    try:
        results = pool.map(_evaluate, list(range(20)))
    finally:
        pool.close()
    assert [r[0] for r in results] == [x * x for x in range(20)]
    assert {r[2] for r in results} == {"model-and-data"}
    assert 1 <= len({r[1] for r in results}) <= 2 and os.getpid() not in {r[1] for r in results}
