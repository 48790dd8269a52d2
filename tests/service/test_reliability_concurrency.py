"""100 concurrent job submissions on PostgreSQL: all stored, all run to completion.

The scale-out layout, each part a separate process on 127.0.0.1: one API server with no
runner and two workers of two slots each, on one PostgreSQL database. Submission,
storage, lease claims across processes, progress and completion are the real code, and
so is the search the workers run: LeNet-5 on digits, the device calibrated once by the first
job while the others wait for its predictor, then a tiny random search per job.

Run as a script, this module is one of those processes:
``python test_reliability_concurrency.py serve PORT`` (the API with a stand-in search and
export, for tests that only need the HTTP side) or ``... worker [real]`` (a runner process;
``real`` runs the real search, else the stand-in).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from engine.job import ExportContext, ExportResult, JobContext, Scores

JOBS = 100
BUDGET = 3


def stub_search(ctx: JobContext) -> None:
    """Deterministic candidates, resumable from the agent state; a short sleep stands for evaluation."""
    state = json.loads(ctx.agent_state) if ctx.agent_state else {"asked": 0}
    seen = {d.policy_hash for d in ctx.done}
    ctx.progress("phase", {"phase": "searching"})
    ctx.set_baseline(Scores(accuracy=0.99, latency_ms=10.0))
    while not ctx.should_stop():
        asked = state["asked"]
        state["asked"] += 1
        policy_hash = f"stub-{asked}"
        if policy_hash in seen:
            continue
        time.sleep(0.02)
        width = round(1.0 - 0.01 * asked, 3)
        scores = Scores(accuracy=0.5 + 0.49 * width, latency_ms=10.0 * width, size_bytes=int(1e6 * width))
        ctx.persist_candidate(
            {"default": {"width": width}}, policy_hash, scores, agent_state=json.dumps(state).encode()
        )
        seen.add(policy_hash)


def stub_export(ctx: ExportContext) -> ExportResult:
    """A stand-in export: a small file named by the policy, instant "measurements"."""
    ctx.out_path.write_bytes(b"stub-onnx-" + json.dumps(ctx.policy, sort_keys=True).encode())
    return ExportResult(ctx.out_path, {"measured_latency_ms": 1.0, "dense_latency_ms": 2.0, "speedup": 2.0})


def main(argv: list[str]) -> None:
    """``serve PORT``: the API (settings from the environment); ``worker``: a runner process."""
    from service.settings import Settings

    settings = Settings()
    if argv[0] == "serve":
        import uvicorn

        from service.app import create_app

        app = create_app(settings, search=stub_search, exporter=stub_export)
        uvicorn.run(app, host="127.0.0.1", port=int(argv[1]), log_level="warning")
        return
    from db.engine import make_engine, make_session_factory
    from db.migrate import upgrade
    from service.runner import Runner

    upgrade(settings.db_url)
    engine = make_engine(settings.db_url)
    real = argv[1:] == ["real"]
    runner = Runner(make_session_factory(engine), settings, search=None if real else stub_search)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    runner.start(settings.runner_slots)
    stop.wait()
    runner.stop()
    engine.dispose()


def _stub(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


@pytest.mark.slow
def test_100_concurrent_submissions_on_postgresql_are_stored_and_all_complete(tmp_path: Path) -> None:
    from db.engine import make_engine, make_session_factory
    from db.models import Candidate, Job
    from db.testing import fresh_database
    from tests.live import child_process, server_process, service_env

    data_dir = tmp_path / "data"
    # two slots per worker: still jobs in flight on both workers at once, without eight
    # searches thrashing two cores (and slowing every other test running beside this one)
    settings = {"lease_s": 10.0, "poll_s": 0.1, "runner_slots": 2}
    with ExitStack() as stack:
        db_url = stack.enter_context(fresh_database("postgresql", tmp_path))
        api = stack.enter_context(
            server_process(
                data_dir,
                db_url,
                log_path=tmp_path / "api.log",
                command=lambda port: _stub("serve", str(port)),
                run_jobs=False,
                queued_jobs_per_tenant=JOBS,  # one tenant submits them all at once
            )
        )
        workers = [
            stack.enter_context(
                child_process(
                    _stub("worker", "real"),
                    env=service_env(data_dir, db_url, create_local_tenant=False, **settings),
                    log_path=tmp_path / f"worker{i}.log",
                )
            )
            for i in range(2)
        ]
        headers = {"Authorization": f"Bearer {api.key}"}
        c = stack.enter_context(httpx.Client(base_url=f"{api.url}/v1", headers=headers, timeout=60))
        data = c.post("/datasets", json={"builtin": "digits"}).json()
        model = c.post("/models", json={"zoo": "lenet5", "dataset_id": data["id"]}).json()
        device = next(d for d in c.get("/devices").json()["data"] if d["name"] == "cpu-ort-1t")
        # This test is about submissions: no fine-tuning, recovery or measuring during the search.
        body = {
            "model_id": model["id"],
            "dataset_id": data["id"],
            "device_id": device["id"],
            "algorithm": "random",
            "budget": {"candidates": BUDGET},
            "space": {"schemes": ["unstructured", "nm"], "bits": [None], "depth": False},
            "calibration_samples": 16,
            "remeasure_top_k": 0,
            "finetune": {"top_k": 0},
            "recovery": "magnitude",
            "reconstruct": False,
            "calibrate": "auto",
            "active_measurement": {"share": 0.0},
        }
        barrier = threading.Barrier(JOBS)

        def submit(i: int) -> tuple[int, int]:
            with httpx.Client(base_url=f"{api.url}/v1", headers=headers, timeout=120) as own:
                own.get("/devices")  # connected and authenticated before the start line
                barrier.wait(timeout=60)
                r = own.post("/jobs", json={**body, "seed": i})
                return r.status_code, r.json().get("id", -1)

        with ThreadPoolExecutor(JOBS) as pool:
            answers = list(pool.map(submit, range(JOBS)))
        assert [code for code, _ in answers] == [201] * JOBS, answers
        ids = {job_id for _, job_id in answers}
        assert len(ids) == JOBS
        assert c.get("/jobs", params={"limit": 1}).json()["count"] == JOBS

        deadline = time.monotonic() + 600
        while (done := c.get("/jobs", params={"status": "succeeded", "limit": 1}).json()["count"]) < JOBS:
            failed = c.get("/jobs", params={"status": "failed"}).json()["data"]
            assert not failed, [j["error"] for j in failed]
            assert all(w.alive() for w in workers), [w.log_tail() for w in workers]
            assert time.monotonic() < deadline, f"{done}/{JOBS} succeeded:\n{workers[0].log_tail()}"
            time.sleep(0.5)

        engine = make_engine(db_url)
        try:
            with make_session_factory(engine)() as s:
                jobs = list(s.scalars(select(Job)))
                per_job = dict(
                    s.execute(
                        select(Candidate.job_id, func.count(func.distinct(Candidate.policy_hash))).group_by(
                            Candidate.job_id
                        )
                    ).all()
                )
                total = s.scalar(select(func.count(Candidate.id)))
        finally:
            engine.dispose()
        assert {j.id for j in jobs} == ids
        assert all(j.status == "succeeded" and j.lease_owner is None for j in jobs)
        assert [j.attempts for j in jobs] == [1] * JOBS  # claimed once: no two runners ran one job
        assert per_job == {job_id: BUDGET for job_id in ids} and total == JOBS * BUDGET
        for log in [api.log_tail(100_000), *(w.log_tail(100_000) for w in workers)]:
            assert "Traceback" not in log and " 500 " not in log, log[-3000:]


if __name__ == "__main__":
    main(sys.argv[1:])
