"""docker-compose.yml and the Dockerfile: validated by `docker-compose config` (no Docker engine here)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The configuration as docker-compose resolves it (installing docker-compose if missing)."""
    if shutil.which("docker-compose") is None:
        done = subprocess.run(
            ["bash", str(REPO / "scripts" / "ensure_test_tools.sh")],
            capture_output=True,
            text=True,
            check=False,
        )
        if shutil.which("docker-compose") is None:
            # The suite's set-up installs it (scripts/test.sh); missing here is a failure, not a skip.
            pytest.fail(f"docker-compose is missing and could not be installed: {done.stderr.strip()[-500:]}")
    done = subprocess.run(
        ["docker-compose", "-f", str(REPO / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"docker-compose config rejected the file:\n{done.stderr}"
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def test_the_four_services_and_their_wiring(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "api", "ray-head", "ray-worker"}
    api = services["api"]
    assert api["environment"]["DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in api["environment"]["DATABASE_URL"]
    assert api["environment"]["MODELTAILOR_EXECUTOR"] == "ray"
    assert api["environment"]["RAY_ADDRESS"] == "ray-head:6379"
    assert api["depends_on"]["postgres"]["condition"] == "service_healthy"
    start = " ".join(api["command"])
    assert start.index("upgrade(") < start.index("modeltailor serve"), (
        "migrations must run before the API starts"
    )
    assert "--host 0.0.0.0" in start
    assert {"published": 8000, "target": 8000} in api["ports"]
    assert "--head" in services["ray-head"]["command"]
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]
    assert services["postgres"]["healthcheck"]["test"]
    for name in ("api", "ray-head", "ray-worker"):  # one image, one shared data volume
        assert services[name]["image"] == "modeltailor:latest"
        assert services[name]["build"]["context"] == str(REPO)


def test_dockerfile_installs_cpu_torch_before_the_project() -> None:
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    torch_at = next(i for i, line in enumerate(lines) if "pip install torch==2.13.0" in line)
    assert "download.pytorch.org/whl/cpu" in lines[torch_at]
    project_at = next(i for i, line in enumerate(lines) if line.startswith("RUN pip install ."))
    assert torch_at < project_at
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "data"} <= set(ignored)
