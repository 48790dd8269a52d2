"""Environment variables reach the service through pydantic-settings, checked in a fresh process.

Settings are read when the app or the worker starts, never at import: each case starts (or
only imports) the service in a subprocess with its own environment.
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


START_APP = (
    "import json, tempfile\n"
    "from service.app import create_app\n"
    "from service.settings import Settings\n"
    "app = create_app(Settings(data_dir=tempfile.mkdtemp()))\n"
    "t = app.state.timeouts\n"
    "print(json.dumps([t.task_lease_s, t.remeasure_wait_s, t.agent_wait_s, t.calibration_stale_s]))\n"
)


def test_timeouts_reach_the_app_at_start() -> None:
    proc = _run(START_APP, MODELTAILOR_TASK_LEASE_S="12.5", MODELTAILOR_REMEASURE_WAIT_S="7")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [12.5, 7.0, 900.0, 300.0]


def test_importing_reads_no_setting() -> None:
    code = (
        "import service.app, service.calibrations, service.device_tasks, service.job_latency, "
        "service.runner, service.predictor_versions, latency_models.calibration_run\nprint('ok')\n"
    )
    proc = _run(code, MODELTAILOR_AGENT_WAIT_S="abc", MODELTAILOR_WORKERS="0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "ok"


def test_bad_timeout_stops_the_start_naming_the_field() -> None:
    proc = _run(START_APP, MODELTAILOR_AGENT_WAIT_S="abc")
    assert proc.returncode != 0
    assert "ValidationError" in proc.stderr
    assert "agent_wait_s" in proc.stderr


def test_nonpositive_timeout_is_rejected() -> None:
    proc = _run(START_APP, MODELTAILOR_REMEASURE_WAIT_S="0")
    assert proc.returncode != 0
    assert "remeasure_wait_s" in proc.stderr


def test_the_worker_command_stops_on_a_bad_timeout(tmp_path: Path) -> None:
    code = "from modeltailor.cli import app, service_cmds  # noqa: F401\napp(['worker'])\n"
    proc = _run(code, MODELTAILOR_TASK_LEASE_S="-1", MODELTAILOR_DATA_DIR=str(tmp_path))
    assert proc.returncode != 0
    assert "task_lease_s" in proc.stderr


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
