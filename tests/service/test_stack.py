"""The docker-compose stack without Docker: PostgreSQL, a Ray node, the API joining it; one real job.

The services run the commands docker-compose.yml gives them, read from the file, with the
addresses moved to this machine: the API's start command (migrations, then ``modeltailor
serve``) and the Ray head's ``ray start``, on fresh ports, a fresh PostgreSQL database and
a fresh data directory. Deviation, forced by this machine: one Ray node instead of a
CPU-less head plus a worker node — a second node would have to talk over a non-loopback
address — so the head node gets the CPU and runs the evaluations (``--num-cpus=1``).

The job runs in the API process (the embedded runner) and its evaluations in a Ray actor
of that node; the job's ``executor`` event says where (Ray, which node, which process).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from db.testing import fresh_postgres
from modeltailor.client import Client
from tests.live import free_port

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120


def compose() -> dict[str, Any]:
    """docker-compose.yml with each ``${VAR:-default}`` at its default, as a fresh shell gets it."""
    text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", (REPO / "docker-compose.yml").read_text())
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A service in its own process group (so nothing it spawns outlives the test), niced."""
    out = log.open("wb")
    return subprocess.Popen(
        ["nice", "-n", "10", *argv], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM (ray start --block and uvicorn shut down their children), then SIGKILL the group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def wait_until(check: Any, what: str, procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is not None:
                tail = log.read_text()[-3000:]
                raise AssertionError(f"{what}: a service exited ({proc.returncode}):\n{tail}")
        if check():
            return
        time.sleep(0.5)
    tails = "\n".join(log.read_text()[-2000:] for log in logs)
    raise AssertionError(f"{what}: not ready in {START_TIMEOUT_S} s\n{tails}")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """Yield (API URL, API key, PostgreSQL URL) of the running stack; stop every process after."""
    services = compose()["services"]
    common_env = dict(services["api"]["environment"])
    ray_port, api_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    with fresh_postgres() as db_url:
        env = {
            **os.environ,
            **{k: str(v) for k, v in common_env.items()},
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
            "DATABASE_URL": db_url,
            "MODELTAILOR_DATA_DIR": str(tmp_path / "data"),
            "RAY_ADDRESS": f"127.0.0.1:{ray_port}",
            "MODELTAILOR_WORKERS": "1",  # the one CPU of this Ray node
            # Loopback only: every Ray process binds and advertises 127.0.0.1.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        assert env["MODELTAILOR_EXECUTOR"] == "ray"
        head = shlex.split(services["ray-head"]["command"])
        head = [a for a in head if not a.startswith(("--port=", "--num-cpus=", "--dashboard-host="))]
        head += [f"--port={ray_port}", "--num-cpus=1", "--include-dashboard=false"]
        ray_tmp = tempfile.mkdtemp(prefix="mt-ray-", dir="/tmp")  # Ray's socket paths must stay short
        head += [f"--temp-dir={ray_tmp}"]
        api = [a.replace("0.0.0.0", "127.0.0.1").replace("--port 8000", f"--port {api_port}")
               for a in services["api"]["command"]]  # fmt: skip
        logs = [tmp_path / "ray-head.log", tmp_path / "api.log"]
        try:
            procs.append(start(head, env, logs[0]))
            wait_until(lambda: b"Ray runtime started" in logs[0].read_bytes(), "ray head", procs, logs[:1])
            procs.append(start(api, env, logs[1]))
            url = f"http://127.0.0.1:{api_port}"

            def healthy() -> bool:
                try:
                    return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(healthy, "api", procs, logs)
            key = (tmp_path / "data" / "local_api_key").read_text().strip()
            yield url, key, db_url
        finally:
            for proc in reversed(procs):
                stop(proc)
            shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_a_job_runs_end_to_end_on_postgres_and_ray(stack: tuple[str, str, str]) -> None:
    url, key, db_url = stack
    # The API applied the migrations to the fresh database before serving.
    import sqlalchemy

    engine = sqlalchemy.create_engine(db_url)
    with engine.connect() as conn:
        tables = set(sqlalchemy.inspect(conn).get_table_names())
        version = conn.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar()
    engine.dispose()
    assert {"jobs", "candidates", "alembic_version"} <= tables and version

    client = Client(url, key)
    data = client.builtin_dataset("digits")
    model = client.zoo_model("lenet5", data["id"])
    job = client.submit_job(
        model["id"], data["id"], "cpu-ort-1t", algorithm="random",
        space={"schemes": ["unstructured"], "bits": [None], "width": True, "depth": False},
        budget={"candidates": 4}, seed=0, remeasure_top_k=0, calibration_samples=16,
        calibrate="auto", active_measurement={"share": 0.0}, finetune={"top_k": 0},  # not what it tests
    )  # fmt: skip
    info = job.wait(timeout=600, poll_s=0.5, progress=False)
    assert info["status"] == "succeeded", info.get("error")
    cands = job.candidates()
    assert len(cands) == 4 and len({c["policy_hash"] for c in cands}) == 4
    assert all(0.0 <= c["accuracy"] <= 1.0 and c["latency_ms"] > 0 for c in cands)
    assert job.pareto()
    where = [data for kind, data in job.events() if kind == "executor"]
    assert where, "the job never said where its evaluations ran"
    assert where[-1]["executor"] == "ray" and where[-1]["workers"] == 1, json.dumps(where)
    assert len(where[-1]["nodes"]) == 1 and where[-1]["pids"]
