"""A real server (uvicorn on 127.0.0.1, free port) on a fresh database per test, on both backends."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from db.testing import BACKENDS, fresh_database
from engine.job import ExportContext, ExportResult, JobContext, Scores
from service.app import create_app
from service.settings import Settings
from tests.live import run_app


def fake_search(ctx: JobContext) -> None:
    """A deterministic stand-in search: random widths, scores from the policy, resumable."""
    state = json.loads(ctx.agent_state) if ctx.agent_state else {"asked": 0}
    seen = {d.policy_hash for d in ctx.done}
    ctx.progress("phase", {"phase": "searching"})
    ctx.set_baseline(Scores(accuracy=0.99, latency_ms=10.0))
    delay = ctx.spec.seed / 1000  # tests slow a job down through its seed
    while not ctx.should_stop():
        rng = random.Random(state["asked"])
        state["asked"] += 1
        width = round(rng.uniform(0.2, 1.0), 3)
        policy = {"default": {"width": width}}
        phash = f"w{width}"
        if phash in seen:
            continue
        scores = Scores(accuracy=0.5 + 0.49 * width, latency_ms=10.0 * width, size_bytes=int(1e6 * width))
        ctx.persist_candidate(policy, phash, scores, agent_state=json.dumps(state).encode())
        seen.add(phash)
        time.sleep(delay)


def fake_exporter(ctx: ExportContext) -> ExportResult:
    ctx.out_path.write_bytes(b"onnx-bytes-of-" + json.dumps(ctx.policy, sort_keys=True).encode())
    return ExportResult(ctx.out_path, {"measured_latency_ms": 1.0, "dense_latency_ms": 2.0, "speedup": 2.0})


@dataclass
class LiveServer:
    url: str
    key: str
    settings: Settings
    db_url: str


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database; each test runs on SQLite and on PostgreSQL."""
    with fresh_database(request.param, tmp_path) as url:
        yield url


def serve(settings: Settings, **app_kwargs: Any) -> Iterator[str]:
    """Run the app under uvicorn in a thread; yield its base URL; stop it afterwards."""
    with run_app(create_app(settings, announce=lambda _msg: None, **app_kwargs)) as url:
        yield url


@pytest.fixture
def live(db_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    """The embedded default (API + runner in one process) with a fake search and exporter."""
    settings = Settings(
        data_dir=tmp_path / "data", database_url=db_url, lease_s=2.0, poll_s=0.1, max_upload_bytes=2_000_000
    )
    for url in serve(settings, search=fake_search, exporter=fake_exporter):
        key = settings.local_key_path.read_text().strip()
        yield LiveServer(url=url, key=key, settings=settings, db_url=db_url)


@pytest.fixture
def real_live(tmp_path: Path) -> Iterator[LiveServer]:
    """The embedded default with the real search bridge (SQLite)."""
    with fresh_database("sqlite", tmp_path) as db_url:
        settings = Settings(data_dir=tmp_path / "data", database_url=db_url, lease_s=10.0, poll_s=0.1)
        for url in serve(settings):
            key = settings.local_key_path.read_text().strip()
            yield LiveServer(url=url, key=key, settings=settings, db_url=db_url)


@pytest.fixture(scope="session")
def tiny_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small conv net saved with ``torch.export.save``."""
    import torch

    from compression.model_io import save_pt2

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 10),
    )
    return save_pt2(net, torch.randn(2, 1, 8, 8), tmp_path_factory.mktemp("pt2") / "tiny.pt2")
