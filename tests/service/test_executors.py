"""Which executor a job gets from the settings, and the in-process executor's per-search state."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from engine.executors import (
    Executor,
    InProcessExecutor,
    LocalPoolExecutor,
    describe_executor,
    make_executor,
    worker_state,
)
from service.settings import Settings


def tagged(tag: str) -> dict[str, str]:
    return {"tag": tag}


def read_tag(item: int) -> tuple[int, str]:
    return item, worker_state()["tag"]


def _from_settings(settings: Settings) -> Executor:
    return make_executor(
        tagged, ("a",), kind=settings.executor, workers=settings.workers, ray_address=settings.ray_address
    )


def test_the_settings_choose_the_executor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = _from_settings(Settings(data_dir=tmp_path))
    assert isinstance(one, InProcessExecutor)
    assert describe_executor(one) == {"executor": "in-process", "workers": 1}
    one.close()
    two = _from_settings(Settings(data_dir=tmp_path, workers=2))
    try:
        assert isinstance(two, LocalPoolExecutor)
        assert describe_executor(two) == {"executor": "local-pool", "workers": 2}
    finally:
        two.close()
    monkeypatch.setenv("MODELTAILOR_EXECUTOR", "ray")
    monkeypatch.setenv("MODELTAILOR_WORKERS", "3")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6380")
    from_env = Settings(data_dir=tmp_path)
    assert (from_env.executor, from_env.workers, from_env.ray_address) == ("ray", 3, "127.0.0.1:6380")
    monkeypatch.setenv("MODELTAILOR_EXECUTOR", "spark")
    with pytest.raises(ValueError, match="executor"):
        Settings(data_dir=tmp_path)


def test_in_process_executors_in_two_threads_keep_their_own_state() -> None:
    results: dict[str, Any] = {}

    def run(tag: str) -> None:
        executor = InProcessExecutor(tagged, (tag,))
        results[tag] = executor.map(read_tag, list(range(200)))
        executor.close()

    threads = [threading.Thread(target=run, args=(tag,)) for tag in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["x"] == [(i, "x") for i in range(200)]
    assert results["y"] == [(i, "y") for i in range(200)]
    with pytest.raises(RuntimeError, match="outside an executor worker"):
        worker_state()  # nothing leaks into the calling thread afterwards


def test_a_local_pool_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least 1 worker"):
        LocalPoolExecutor(0, tagged, ("a",))
