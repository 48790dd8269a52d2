"""API load: job submission latency under concurrent clients, ``GET /pareto`` at 50,000 candidates.

For each backend (a fresh SQLite file, a fresh PostgreSQL database) this starts
``modeltailor serve --no-runner`` as a child process on 127.0.0.1 (jobs stay queued, so
the figures are the API's and not a search's CPU use), then:

* submission: ``--clients`` concurrent clients (one connection each) each POST
  ``--per-client`` jobs to ``/v1/jobs`` back to back; latency p50 / p99 / max per request;
* pareto: a job with ``--candidates`` candidates is bulk-written through the db layer
  (the dashboard's synthetic ResNet-20 results) and ``GET /v1/jobs/{id}/pareto`` is
  timed: the first read (which finds the front flags stale after the bulk load and
  computes them over every candidate, once) and then ``--repeats`` reads (the flags
  are current, as they always are for a job the runner fills one candidate at a time).
  Once for the realistic job (constraints leave about a third feasible) and once with
  every candidate feasible.

Only loopback traffic; every loop is bounded. Prints the figures; ``--write`` appends
them to bench/RESULTS.md under an "API" heading, with the machine and its load.
Candidates evaluated per minute (local pool at 1 and 2 workers, Ray) are measured by
``bench/executors.py``; when that script exists, ``--executors`` runs it afterwards.

    .venv/bin/python bench/api.py [--backends sqlite,postgresql] [--clients 100] [--per-client 5]
                                  [--candidates 50000] [--repeats 20] [--write] [--executors]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from db.engine import make_engine, make_session_factory  # noqa: E402
from db.testing import fresh_database  # noqa: E402
from tests.live import server_process  # noqa: E402

PARETO_GOAL_MS = 300.0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return f"load average {os.getloadavg()}"


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass
class Submission:
    clients: int
    submissions: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    per_s: float
    stored: int


@dataclass
class Pareto:
    label: str
    feasible: int
    front: int
    first_ms: float  # the first read after the bulk load: computes the front flags
    median_ms: float
    p95_ms: float
    max_ms: float


async def _client(url: str, key: str, body: dict[str, Any], n: int, start: asyncio.Event) -> list[float]:
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    took: list[float] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=120) as c:
        await start.wait()
        for _ in range(n):
            t = time.perf_counter()
            r = await c.post("/v1/jobs", json=body)
            took.append(time.perf_counter() - t)
            if r.status_code != 201:
                raise RuntimeError(f"POST /v1/jobs answered {r.status_code}: {r.text}")
    return took


async def _submit_all(url: str, key: str, body: dict[str, Any], clients: int, per_client: int) -> tuple:
    start = asyncio.Event()
    tasks = [asyncio.create_task(_client(url, key, body, per_client, start)) for _ in range(clients)]
    await asyncio.sleep(0.5)  # every client connected and waiting
    t0 = time.perf_counter()
    start.set()
    results = await asyncio.gather(*tasks)
    return [x for r in results for x in r], time.perf_counter() - t0


def bench_submission(url: str, key: str, clients: int, per_client: int) -> Submission:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=f"{url}/v1", headers=headers, timeout=60) as c:
        data = c.post("/datasets", json={"builtin": "digits"}).json()
        model = c.post("/models", json={"zoo": "lenet5", "dataset_id": data["id"]}).json()
        device = next(d for d in c.get("/devices").json()["data"] if d["name"] == "cpu-ort-1t")
        body = {
            "model_id": model["id"],
            "dataset_id": data["id"],
            "device_id": device["id"],
            "algorithm": "random",
            "budget": {"candidates": 5},
        }
        for _ in range(20):  # warm-up: imports, connection pools, caches
            assert c.post("/jobs", json=body).status_code == 201
        before = c.get("/jobs", params={"limit": 1}).json()["count"]
        took, wall = asyncio.run(_submit_all(url, key, body, clients, per_client))
        stored = c.get("/jobs", params={"limit": 1}).json()["count"] - before
    ms = [1000 * t for t in took]
    return Submission(
        clients=clients,
        submissions=len(ms),
        p50_ms=pct(ms, 50),
        p99_ms=pct(ms, 99),
        max_ms=max(ms),
        per_s=len(ms) / wall,
        stored=stored,
    )


def bench_pareto(url: str, key: str, db_url: str, candidates: int, repeats: int) -> list[Pareto]:
    from sqlalchemy import select, update

    from db.models import Candidate, Job, Tenant
    from tests.dashboard.harness import seed_job, seed_refs

    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    try:
        with factory() as session:
            tenant_id = session.scalars(select(Tenant.id).where(Tenant.name == "local")).one()
        refs = seed_refs(factory, tenant_id)
        realistic = seed_job(factory, tenant_id, n=candidates, refs=refs)
        every = seed_job(factory, tenant_id, n=candidates, seed=1, refs=refs)
        with factory() as session:  # the worst case: every candidate feasible, no constraints
            session.execute(update(Candidate).where(Candidate.job_id == every.job_id).values(feasible=True))
            job = session.get(Job, every.job_id)
            assert job is not None
            job.spec = {**job.spec, "constraints": {}}
            session.commit()
        # Bulk-loaded rows leave the front flags stale: reads then compute the front from every
        # candidate until the housekeeping loop (every FRONT_EVERY ticks) refreshes them. Refresh
        # here, so the figures are the steady state and not a race with that loop (the
        # 2026-12-03 "all feasible" PostgreSQL figure of 82.5 ms was the stale path).
        from service import queries

        with factory() as session:
            for seeded in (realistic, every):
                job = session.get(Job, seeded.job_id)
                assert job is not None
                queries.refresh_front(session, job=job)
        if engine.dialect.name == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM ANALYZE candidates")  # what autovacuum does after a bulk load
    finally:
        engine.dispose()
    out = []
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=f"{url}/v1", headers=headers, timeout=60) as c:
        for label, seeded, feasible in (
            ("realistic", realistic, sum(1 for r in realistic.rows if r[3])),
            ("all feasible", every, candidates),
        ):
            t = time.perf_counter()
            c.get(f"/jobs/{seeded.job_id}/pareto").raise_for_status()
            first_ms = 1000 * (time.perf_counter() - t)
            took, front = [], 0
            for _ in range(repeats):
                t = time.perf_counter()
                r = c.get(f"/jobs/{seeded.job_id}/pareto")
                took.append(1000 * (time.perf_counter() - t))
                r.raise_for_status()
                front = r.json()["count"]
            out.append(
                Pareto(label, feasible, front, first_ms, statistics.median(took), pct(took, 95), max(took))
            )
    return out


def run_backend(backend: str, args: argparse.Namespace) -> tuple[Submission, list[Pareto]]:
    with tempfile.TemporaryDirectory() as tmp, fresh_database(backend, Path(tmp)) as db_url:
        data_dir = Path(tmp) / "data"
        log_path = Path(tmp) / "server.log"
        with server_process(
            data_dir, db_url, log_path=log_path, args=("--no-runner",), queued_jobs_per_tenant=1_000_000
        ) as srv:
            try:
                sub = bench_submission(srv.url, srv.key, args.clients, args.per_client)
                par = bench_pareto(srv.url, srv.key, db_url, args.candidates, args.repeats)
            except Exception:
                print(srv.log_tail(), file=sys.stderr)
                raise
    return sub, par


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--per-client", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--write", action="store_true", help="append the figures to bench/RESULTS.md")
    parser.add_argument("--executors", action="store_true", help="then run bench/executors.py if present")
    args = parser.parse_args()

    load_before = uptime()
    lines = [
        f"{'backend':<11} {'clients':>7} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'req/s':>7} {'stored':>6}"
    ]
    pareto_lines = [
        f"{'backend':<11} {'job':<13} {'feasible':>8} {'front':>5} {'first ms':>8} {'median ms':>9} "
        f"{'p95 ms':>8} {'max ms':>8}"
    ]
    worst = 0.0
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        t0 = time.perf_counter()
        sub, par = run_backend(backend, args)
        lines.append(
            f"{backend:<11} {sub.clients:>7} {sub.submissions:>8} {sub.p50_ms:>8.1f} {sub.p99_ms:>8.1f} "
            f"{sub.max_ms:>8.1f} {sub.per_s:>7.1f} {sub.stored:>6}"
        )
        for p in par:
            worst = max(worst, p.median_ms)
            pareto_lines.append(
                f"{backend:<11} {p.label:<13} {p.feasible:>8,} {p.front:>5} {p.first_ms:>8.1f} "
                f"{p.median_ms:>9.1f} {p.p95_ms:>8.1f} {p.max_ms:>8.1f}"
            )
        print(f"{backend}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    load_after = uptime()
    verdict = f"GET /pareto goal < {PARETO_GOAL_MS:.0f} ms: {'met' if worst < PARETO_GOAL_MS else 'NOT met'}"
    text = (
        f"submission latency, {args.clients} concurrent clients x {args.per_client} POST /v1/jobs each:\n"
        + "\n".join(lines)
        + f"\n\nGET /v1/jobs/{{id}}/pareto, {args.candidates:,} candidates, {args.repeats} requests each:\n"
        + "\n".join(pareto_lines)
        + f"\n{verdict} (worst median {worst:.1f} ms)"
    )
    print(text)
    print(f"load before: {load_before}\nload after:  {load_after}")
    if args.write:
        command = (
            f".venv/bin/python bench/api.py --backends {args.backends} --clients {args.clients} "
            f"--per-client {args.per_client} --candidates {args.candidates} --repeats {args.repeats}"
        )
        section = (
            f"\n## API: submission latency and GET /pareto ({dt.date.today().isoformat()})\n\n"
            f"- machine: {machine()}; server: `modeltailor serve --no-runner` in a child process, "
            "clients in another (httpx, asyncio), loopback only\n"
            f"- command: `{command}`\n"
            f"- load before: `{load_before}`\n- load after: `{load_after}`\n\n"
            f"```\n{text}\n```\n\n"
            "- candidates evaluated per minute (local pool at 1 and 2 workers, Ray): measured by "
            "`bench/executors.py`, recorded in its own section of this file "
            "(`bench/api.py --executors` runs it after these figures)\n"
        )
        results = REPO / "bench" / "RESULTS.md"
        with results.open("a", encoding="utf-8") as fh:
            fh.write(section)
        print(f"appended to {results}")
    executors = REPO / "bench" / "executors.py"
    if args.executors:
        if executors.exists():  # it prints its own figures (see its docstring for options)
            return subprocess.run([sys.executable, "-m", "bench.executors"], cwd=REPO, check=False).returncode
        print("bench/executors.py does not exist yet: no candidates-per-minute figures", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
