"""Environment variables reach the service through pydantic-settings, checked in a fresh process.

The timeouts are module constants read at import, so each case imports the modules in a
subprocess with its own environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV_NAMES = (
    "MODELTAILOR_CALIBRATION_STALE_S",
    "MODELTAILOR_TASK_LEASE_S",
    "MODELTAILOR_AGENT_WAIT_S",
    "MODELTAILOR_REMEASURE_WAIT_S",
    "MODELTAILOR_DATABASE_URL",
    "DATABASE_URL",
    "MODELTAILOR_WORKERS",
    "MODELTAILOR_EXECUTOR",
)


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), base.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**base, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_timeouts_reach_the_module_constants() -> None:
    code = (
        "import json\n"
        "from service import job_latency, latency\n"
        "print(json.dumps([latency.TASK_LEASE_S, job_latency.REMEASURE_WAIT_S,"
        " latency.AGENT_WAIT_S, latency.STALE_S]))\n"
    )
    proc = _run(code, MODELTAILOR_TASK_LEASE_S="12.5", MODELTAILOR_REMEASURE_WAIT_S="7")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [12.5, 7.0, 900.0, 300.0]


def test_bad_timeout_fails_the_import_naming_the_field() -> None:
    proc = _run("import service.latency", MODELTAILOR_AGENT_WAIT_S="abc")
    assert proc.returncode != 0
    assert "ValidationError" in proc.stderr
    assert "agent_wait_s" in proc.stderr


def test_nonpositive_timeout_is_rejected() -> None:
    proc = _run("import service.job_latency", MODELTAILOR_REMEASURE_WAIT_S="0")
    assert proc.returncode != 0
    assert "remeasure_wait_s" in proc.stderr


def test_settings_reads_its_variables() -> None:
    code = (
        "import json\n"
        "from service.settings import Settings\n"
        "s = Settings()\n"
        "print(json.dumps([s.database_url, s.db_url, s.workers, s.executor]))\n"
    )
    url = "postgresql+psycopg://mt:mt@db:5432/mt"
    proc = _run(code, DATABASE_URL=url, MODELTAILOR_WORKERS="3", MODELTAILOR_EXECUTOR="ray")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [url, url, 3, "ray"]


def test_settings_rejects_bad_values() -> None:
    code = "from service.settings import Settings\nSettings()\n"
    workers = _run(code, MODELTAILOR_WORKERS="0")
    assert workers.returncode != 0
    assert "ValidationError" in workers.stderr and "workers" in workers.stderr
    executor = _run(code, MODELTAILOR_EXECUTOR="spark")
    assert executor.returncode != 0
    assert "ValidationError" in executor.stderr and "executor" in executor.stderr
