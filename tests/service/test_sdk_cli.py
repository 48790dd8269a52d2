"""The SDK and the CLI against a real server."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import LiveServer

from modeltailor.client import AuthError, Client, NotFoundError, ValidationError


def test_sdk_end_to_end(live: LiveServer, tiny_pt2: Path, tmp_path: Path) -> None:
    with pytest.raises(AuthError, match="invalid or revoked"):
        Client(live.url, "mt_nope").devices()
    client = Client(live.url, live.key)
    model = client.upload_model(tiny_pt2, name="tiny")
    assert model["params"] > 0
    buf = io.BytesIO()
    x = np.zeros((4, 1, 8, 8), np.float32)
    np.savez(buf, x_train=x, y_train=np.arange(4), x_val=x[:2], y_val=np.arange(2))
    (tmp_path / "d.npz").write_bytes(buf.getvalue())
    data = client.upload_dataset(tmp_path / "d.npz")
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(ValidationError) as err:
        client.upload_dataset(tmp_path / "bad.npz")
    assert err.value.status == 400 and "npz" in err.value.message
    assert {"cpu-ort-1t", "cpu-ort-2t"} <= {d["name"] for d in client.devices()}
    assert client.create_device("board", threads=2)["threads"] == 2
    with pytest.raises(ValidationError, match="budget"):
        client.submit_job(model["id"], data["id"], "cpu-ort-1t", budget={"candidates": 0})
    with pytest.raises(NotFoundError):
        client.job(424242).status()
    job = client.submit_job(model["id"], data["id"], "cpu-ort-1t", budget={"candidates": 6})
    info = job.wait(timeout=60, poll_s=0.2, progress=False)
    assert info["status"] == "succeeded"
    assert len(job.candidates()) == 6
    kinds = [kind for kind, _ in job.events()]
    assert "progress" in kinds and kinds[-1] == "end"
    best = job.pareto()[0]
    meta = best.export(tmp_path / "best.onnx")
    assert meta["status"] == "ready" and (tmp_path / "best.onnx").read_bytes().startswith(b"onnx-bytes-of-")


def test_admin_create_tenant_prints_key_last(tmp_path: Path, db_url: str) -> None:
    env = {**os.environ, "MODELTAILOR_DATA_DIR": str(tmp_path / "d"), "DATABASE_URL": db_url}
    code = "from modeltailor.cli import app, service_cmds; app()"
    run = subprocess.run(
        [sys.executable, "-c", code, "admin", "create-tenant", "acme"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    key = run.stdout.strip().splitlines()[-1]
    assert key.startswith("mt_") and len(key) > 30
    again = subprocess.run(
        [sys.executable, "-c", code, "admin", "create-tenant", "acme"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 1 and "already exists" in again.stdout
