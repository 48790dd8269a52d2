"""Event streams on one job: another tenant's request latency with and without them (issue 18).

For each backend (a fresh SQLite file, a fresh PostgreSQL database) this starts the API and its
runner as a child process on 127.0.0.1 (``python bench/streams.py serve PORT``: the embedded
default with a stand-in search that stores one candidate every 0.2 s, so the streams carry
events and the database has a writer). Tenant A submits one long job; tenant B times its own
requests, ``GET /healthz``, ``GET /v1/jobs`` and ``POST /v1/jobs`` (each job cancelled at once,
untimed, so B stays under its quota), first with no stream open, then while A holds
``--streams`` event streams open on its job. Prints p50 / p95 / max per phase, and the status
codes seen; ``--write`` adds them to bench/RESULTS.md as its newest section.

:class:`Streams` and :func:`probe` are also what ``tests/security/test_streams_fairness.py``
runs against its in-process server.

    .venv/bin/python bench/streams.py [--backends sqlite,postgresql] [--streams 50] [--rounds 30] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.api import machine, pct, uptime  # noqa: E402
from engine.job import JobContext, Scores  # noqa: E402

PACE_S = 0.2
JOB_CANDIDATES = 1000


def paced_search(ctx: JobContext) -> None:
    """A stand-in search storing one candidate every ``PACE_S`` (resumable, like the tests' fake)."""
    state = json.loads(ctx.agent_state) if ctx.agent_state else {"asked": 0}
    ctx.progress("phase", {"phase": "searching"})
    while not ctx.should_stop():
        asked = state["asked"]
        state["asked"] += 1
        width = round(1.0 - asked / (2 * JOB_CANDIDATES), 4)
        scores = Scores(accuracy=0.5 + 0.49 * width, latency_ms=10.0 * width)
        ctx.persist_candidate(
            {"default": {"width": width}}, f"p{asked}", scores, agent_state=json.dumps(state).encode()
        )
        time.sleep(PACE_S)


class Streams:
    """``n`` event streams of one job held open from a thread of their own (one asyncio loop).

    Entering returns once every stream has its answer's status (``codes``); leaving closes them.
    """

    def __init__(self, url: str, key: str, job_id: int, n: int) -> None:
        self.url, self.key, self.job_id, self.n = url, key, job_id, n
        self.codes: list[int] = []
        self.events = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._hold()), daemon=True)

    def __enter__(self) -> Streams:
        self._thread.start()
        deadline = time.monotonic() + 60
        while len(self.codes) < self.n:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"{len(self.codes)} of {self.n} streams answered within 60 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _hold(self) -> None:
        limits = httpx.Limits(max_connections=self.n + 5, max_keepalive_connections=0)
        timeout = httpx.Timeout(60, read=None)
        headers = {"Authorization": f"Bearer {self.key}"}
        async with httpx.AsyncClient(base_url=self.url, headers=headers, limits=limits, timeout=timeout) as c:
            tasks = [asyncio.create_task(self._one(c)) for _ in range(self.n)]
            while not self._stop.is_set():
                await asyncio.sleep(0.05)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, c: httpx.AsyncClient) -> None:
        async with c.stream("GET", f"/v1/jobs/{self.job_id}/events") as r:
            self.codes.append(r.status_code)
            if r.status_code != 200:
                return
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    self.events += 1


@dataclass
class Probe:
    """Latency (s) of each kind of request, and every status code answered."""

    took: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    codes: list[int] = field(default_factory=list)

    def all(self) -> list[float]:
        return [t for ts in self.took.values() for t in ts]

    def table(self) -> dict[str, tuple[float, float, float]]:
        """p50, p95 and max in ms per kind and over all requests."""
        rows = {**self.took, "all": self.all()}
        return {k: (pct(v, 50) * 1e3, pct(v, 95) * 1e3, max(v) * 1e3) for k, v in rows.items()}


def probe(url: str, key: str, job: dict[str, Any], rounds: int) -> Probe:
    """``rounds`` of ``GET /healthz``, ``GET /v1/jobs``, ``POST /v1/jobs`` (then cancelled, untimed)."""
    out = Probe()
    with client(url, key) as c:
        for _ in range(rounds):
            for kind, method, path in (
                ("GET /healthz", "GET", "/healthz"),
                ("GET /v1/jobs", "GET", "/v1/jobs"),
                ("POST /v1/jobs", "POST", "/v1/jobs"),
            ):
                t = time.perf_counter()
                r = c.request(method, path, json=job if method == "POST" else None)
                out.took[kind].append(time.perf_counter() - t)
                out.codes.append(r.status_code)
                if method == "POST" and r.status_code == 201:
                    c.post(f"/v1/jobs/{r.json()['id']}/cancel")
    return out


def client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def inputs(c: httpx.Client) -> dict[str, Any]:
    """A job body of the client's tenant: its own data set and zoo model, the built-in CPU device."""
    data = c.post("/v1/datasets", json={"builtin": "digits"}).json()
    model = c.post("/v1/models", json={"zoo": "lenet5", "dataset_id": data["id"]}).json()
    device = next(d for d in c.get("/v1/devices").json()["data"] if d["name"] == "cpu-ort-1t")
    ids = {"model_id": model["id"], "dataset_id": data["id"], "device_id": device["id"]}
    return {**ids, "algorithm": "random"}


def run_backend(backend: str, streams: int, rounds: int) -> dict[str, Any]:
    from db.engine import make_engine, make_session_factory
    from db.testing import fresh_database
    from service.auth import create_tenant
    from tests.live import server_process

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        db_url = stack.enter_context(fresh_database(backend, Path(tmp)))
        api = stack.enter_context(
            server_process(
                Path(tmp) / "data",
                db_url,
                log_path=Path(tmp) / "api.log",
                command=lambda port: [sys.executable, str(Path(__file__).resolve()), "serve", str(port)],
                streams_per_tenant=streams,
                max_job_candidates=JOB_CANDIDATES,
            )
        )
        engine = make_engine(db_url)
        with make_session_factory(engine)() as session:
            _tenant, key_b = create_tenant(session, name="tenant-b")
        engine.dispose()
        with client(api.url, api.key) as a:
            job_a = a.post("/v1/jobs", json={**inputs(a), "budget": {"candidates": JOB_CANDIDATES}}).json()
            with client(api.url, key_b) as b:
                job_b = {**inputs(b), "budget": {"candidates": 3}}
            probe(api.url, key_b, job_b, 3)  # warm-up
            quiet = probe(api.url, key_b, job_b, rounds)
            with Streams(api.url, api.key, job_a["id"], streams) as held:
                loaded = probe(api.url, key_b, job_b, rounds)
            a.post(f"/v1/jobs/{job_a['id']}/cancel")
        log = api.log_tail(1_000_000)
    return {
        "backend": backend,
        "quiet": quiet.table(),
        "loaded": loaded.table(),
        "stream_codes": sorted(set(held.codes)),
        "events": held.events,
        "codes": sorted(set(quiet.codes + loaded.codes)),
        "server_errors": log.count(" 500 ") + log.count("Traceback"),
    }


def report(results: list[dict[str, Any]], streams: int, rounds: int, loads: tuple[str, str]) -> str:
    lines = [
        f"## Event streams do not hold the database ({dt.date.today().isoformat()}, issue 18 part 3)",
        "",
        f"Machine: {machine()}. Load before: `{loads[0]}`; after: `{loads[1]}`.",
        f"Command: `.venv/bin/python bench/streams.py --streams {streams} --rounds {rounds}`. The API and "
        f"its runner in one child process; tenant A's job stores a candidate every {PACE_S} s; tenant B "
        f"times {rounds} rounds of `GET /healthz`, `GET /v1/jobs`, `POST /v1/jobs` without streams, "
        f"then while A holds {streams} event streams open on its job. Latency in ms (p50 / p95 / max).",
        "",
        "| backend | request | no streams | with streams |",
        "|---|---|---|---|",
    ]
    for r in results:
        for kind in r["quiet"]:
            q, w = r["quiet"][kind], r["loaded"][kind]
            lines.append(
                f"| {r['backend']} | {kind} | {q[0]:.1f} / {q[1]:.1f} / {q[2]:.1f} "
                f"| {w[0]:.1f} / {w[1]:.1f} / {w[2]:.1f} |"
            )
    lines.append("")
    for r in results:
        lines.append(
            f"- {r['backend']}: stream answers {r['stream_codes']}, {r['events']} events delivered; "
            f"B's status codes {r['codes']}; 500s or tracebacks in the server log: {r['server_errors']}."
        )
    return "\n".join(lines) + "\n"


def serve(port: int) -> None:
    """The child process: the embedded default (settings from the environment), paced stand-in search."""
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    uvicorn.run(create_app(Settings(), search=paced_search), host="127.0.0.1", port=port, log_level="warning")


def main() -> int:
    if sys.argv[1:2] == ["serve"]:
        serve(int(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--write", action="store_true", help="add the figures to bench/RESULTS.md")
    args = parser.parse_args()
    before = uptime()
    results = [run_backend(b, args.streams, args.rounds) for b in args.backends.split(",")]
    text = report(results, args.streams, args.rounds, (before, uptime()))
    print(text)
    if args.write:  # newest section first, under the title
        path = REPO / "bench" / "RESULTS.md"
        title, rest = path.read_text().split("\n## ", 1)
        path.write_text(f"{title}\n{text}\n## {rest}")
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
