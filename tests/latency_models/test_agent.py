"""Device agent: task format, directory transport between two processes, HTTP with retries."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from compression.onnx_export import export_onnx
from latency_models.agent import (
    AgentError,
    DirectoryTransport,
    HttpTransport,
    agent_device,
    run_agent,
)
from latency_models.harness import sha256_file
from latency_models.tasks import MeasurementResult, MeasurementTask, ModelRef, TaskError

REPO = Path(__file__).resolve().parents[2]


def _cnn(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("agent-models")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    return export_onnx(_cnn(32), x, folder / "wide.onnx"), export_onnx(_cnn(8), x, folder / "narrow.onnx")


def test_task_and_result_json(onnx_models: tuple[Path, Path]) -> None:
    wide, narrow = onnx_models
    task = MeasurementTask(
        "t-1", ModelRef.embed(wide), input_shape=(1, 3, 16, 16), runs=50, threads=2,
        settings={"session.intra_op.allow_spinning": "0"}, baseline=ModelRef.embed(narrow),
    )  # fmt: skip
    assert MeasurementTask.from_json(task.to_json()) == task
    assert task.model.sha256 == sha256_file(wide)
    with pytest.raises(TaskError, match="exactly one"):
        ModelRef.from_dict({"sha256": "0" * 64})
    with pytest.raises(TaskError, match="sha256"):
        MeasurementTask.from_dict({"id": "t", "model": {"sha256": "abc", "url": "/x"}})
    with pytest.raises(TaskError, match="runs"):
        MeasurementTask.from_dict({"id": "t", "model": {"sha256": "0" * 64, "url": "/x"}, "runs": 0})
    with pytest.raises(TaskError, match="not valid JSON"):
        MeasurementTask.from_json("{")
    with pytest.raises(TaskError, match="mismatch"):
        ModelRef("0" * 64, onnx_base64=base64.b64encode(b"abc").decode()).load_bytes(lambda ref: b"")
    with pytest.raises(TaskError, match="needs a measurement"):
        MeasurementResult("t", "d", "ok")


_AGENT_SCRIPT = """
import sys
from latency_models.agent import main
rc = main(sys.argv[1:])
loaded = sorted(m for m in ("torch", "torchvision", "sklearn") if m in sys.modules)
print("HEAVY_MODULES", loaded)
sys.exit(rc or (3 if loaded else 0))
"""


def test_two_processes_exchange_a_task_through_a_folder(
    tmp_path: Path, onnx_models: tuple[Path, Path]
) -> None:
    wide, _ = onnx_models
    root = tmp_path / "exchange"
    server = DirectoryTransport(root)
    env = {**os.environ, "MODELTAILOR_CACHE": str(tmp_path / "cache")}
    args = ["--dir", str(root), "--device", "cpu-ort-1t", "--stop-after", "1", "--poll-s", "0.1"]
    agent = subprocess.Popen(
        [sys.executable, "-c", _AGENT_SCRIPT, *args, "--cache-dir", str(tmp_path / "agent-cache")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        (root / "models").mkdir()
        model_file = root / "models" / "wide.onnx"
        model_file.write_bytes(wide.read_bytes())
        server.submit(MeasurementTask("dir-1", ModelRef.at_path(model_file, relative_to=root)))
        out, _ = agent.communicate(timeout=180)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, out
    assert "HEAVY_MODULES []" in out  # the agent never imported torch
    result = server.wait_result("dir-1", timeout_s=1)
    assert result.status == "ok" and result.measurement is not None, result.error
    m = result.measurement
    assert m.model_sha256 == sha256_file(wide) and m.runs == 200 and m.input_shape == (1, 3, 16, 16)
    assert m.ratio_to_reference is not None and m.median_ms > 0
    assert not list((root / "tasks").iterdir()) and not list((root / "claimed").iterdir())


def test_bad_tasks_become_error_results(tmp_path: Path, onnx_models: tuple[Path, Path]) -> None:
    wide, _ = onnx_models
    transport = DirectoryTransport(tmp_path / "x")
    wrong = ModelRef("0" * 64, onnx_base64=base64.b64encode(wide.read_bytes()).decode())
    transport.submit(MeasurementTask("bad-sha", wrong))
    (transport.tasks_dir / "bad-json.json").write_text(json.dumps({"id": "bad-json", "model": {}}))
    done = run_agent(
        transport, agent_device("cpu-ort-1t"), stop_after=2, poll_s=0.05, cache_dir=tmp_path / "c"
    )
    assert done == 2
    sha = transport.result("bad-sha")
    malformed = transport.result("bad-json")
    assert sha is not None and sha.status == "error" and "mismatch" in (sha.error or "")
    assert malformed is not None and malformed.status == "error" and "malformed" in (malformed.error or "")


class _FakeService:
    """A real HTTP server on 127.0.0.1 that fails the first task claim and first result POST with 503."""

    def __init__(self, tasks: list[dict[str, Any]], files: dict[str, bytes], token: str) -> None:
        self.tasks, self.files, self.token = tasks, files, token
        self.task_claims = 0
        self.posts = 0
        self.results: list[dict[str, Any]] = []
        self.auth_seen: set[str] = set()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, code: int, body: bytes = b"", kind: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authorized(self) -> bool:
                header = self.headers.get("Authorization", "")
                service.auth_seen.add(header)
                if header != f"Bearer {service.token}":
                    self._reply(401, b'{"detail": "bad token"}')
                    return False
                return True

            def do_GET(self) -> None:
                if not self._authorized():
                    return
                if self.path in service.files:
                    return self._reply(200, service.files[self.path], "application/octet-stream")
                self._reply(404, b"{}")

            def do_POST(self) -> None:
                if not self._authorized():
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path == "/v1/devices/board-1/tasks/claim":
                    service.task_claims += 1
                    if service.task_claims == 1:
                        return self._reply(503, b'{"detail": "warming up"}')
                    pending, service.tasks = service.tasks, []
                    return self._reply(200, json.dumps(pending).encode())
                if self.path != "/v1/devices/board-1/measurements":
                    return self._reply(404, b"{}")
                service.posts += 1
                if service.posts == 1:
                    return self._reply(503)
                service.results.append(json.loads(body))
                self._reply(201, b"{}")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def service(onnx_models: tuple[Path, Path]) -> Iterator[_FakeService]:
    wide, narrow = onnx_models
    tasks = [
        MeasurementTask("h-1", ModelRef.embed(narrow), runs=40, warmup=5).to_dict(),
        MeasurementTask(
            "h-2",
            ModelRef(sha256_file(wide), url="/files/wide.onnx"),
            runs=40,
            warmup=5,
            baseline=ModelRef.embed(narrow),
        ).to_dict(),
    ]
    svc = _FakeService(tasks, {"/files/wide.onnx": wide.read_bytes()}, token="s3cret")
    yield svc
    svc.close()


def test_http_agent_retries_after_503_and_posts_results(service: _FakeService, tmp_path: Path) -> None:
    transport = HttpTransport(service.url, "board-1", "s3cret", backoff_s=0.01)
    try:
        done = run_agent(transport, agent_device("board-1"), stop_after=2, poll_s=0.01, cache_dir=tmp_path)
    finally:
        transport.close()
    assert done == 2
    assert service.task_claims >= 2 and service.posts == 3  # one claim and one result POST were retried
    assert service.auth_seen == {"Bearer s3cret"}
    results = {r["task_id"]: MeasurementResult.from_dict(r) for r in service.results}
    assert set(results) == {"h-1", "h-2"} and all(r.status == "ok" for r in results.values())
    paired = results["h-2"]
    assert paired.measurement is not None and paired.baseline is not None and paired.speedup is not None
    assert paired.speedup == pytest.approx(paired.baseline.median_ms / paired.measurement.median_ms)
    assert paired.speedup < 1.0  # the wide model is the measured one, the narrow the baseline


def test_http_agent_stops_on_bad_token_and_survives_outages(service: _FakeService, tmp_path: Path) -> None:
    transport = HttpTransport(service.url, "board-1", "wrong", backoff_s=0.01)
    with pytest.raises(AgentError, match="token"):
        run_agent(transport, agent_device("board-1"), stop_after=1, poll_s=0.01, cache_dir=tmp_path)
    transport.close()
    # Nothing listens on the closed server's port any more: the agent keeps polling, never crashes.
    url = service.url
    service.close()
    down = HttpTransport(url, "board-1", "s3cret", max_retries=1, backoff_s=0.01)
    polls = iter(range(3))
    start = time.monotonic()
    done = run_agent(
        down, agent_device("board-1"), poll_s=0.01, should_stop=lambda: next(polls, None) is None
    )
    down.close()
    assert done == 0 and time.monotonic() - start < 30


def test_cli_command_runs_the_agent(tmp_path: Path, onnx_models: tuple[Path, Path]) -> None:
    from modeltailor.cli import app
    from modeltailor.cli.device_agent import device_agent

    assert "device-agent" in {c.name for c in app.registered_commands}
    transport = DirectoryTransport(tmp_path / "cli")
    transport.submit(MeasurementTask("cli-1", ModelRef.embed(onnx_models[1]), runs=20, warmup=2))
    device_agent(device="cpu-ort-2t", directory=tmp_path / "cli", stop_after=1, poll_s=0.05)
    result = transport.result("cli-1")
    assert result is not None and result.measurement is not None and result.measurement.threads == 2
