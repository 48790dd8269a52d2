"""The Ray executor on a real local Ray instance (one per module: Ray takes seconds to start)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agents import Objective
from compression import CompressibleModel
from compression.data import Dataset
from engine.device_latency import macs_proxy
from engine.executors import RayExecutor, describe_executor, make_executor, worker_state
from engine.search import run_search
from tests.modeltailor.conftest import digits, tiny_model, tiny_net  # noqa: F401  (fixtures)

RAY_CPUS = 2


@pytest.fixture(scope="module", autouse=True)
def ray_instance() -> Iterator[None]:
    """A local Ray with two CPUs for this module; stopped at its end."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a single node on loopback
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # This test module is not importable in Ray's workers: send its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def load(log: str, tag: str) -> dict[str, Any]:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    return {"tag": tag, "pid": os.getpid()}


def square(x: int) -> tuple[int, int, str]:
    state = worker_state()
    return x * x, int(state["pid"]), str(state["tag"])


def fail_on_seven(x: int) -> int:
    if x == 7:
        raise ValueError("seven is not allowed")
    return x


def test_each_actor_loads_once_and_results_come_back_in_order(tmp_path: Path) -> None:
    log = tmp_path / "inits.log"
    log.touch()
    executor = RayExecutor(2, load, (str(log), "model-and-data"))
    try:
        results = executor.map(square, list(range(20)))
        placement = executor.placement()
    finally:
        executor.close()
    assert [r[0] for r in results] == [x * x for x in range(20)]
    assert {r[2] for r in results} == {"model-and-data"}
    actor_pids = {pid for _, pid in placement}
    assert len(actor_pids) == 2 and os.getpid() not in actor_pids
    assert {r[1] for r in results} <= actor_pids  # every task ran in an actor...
    assert sorted(log.read_text().split()) == sorted(str(p) for p in actor_pids)  # ...loaded once each


def test_asks_no_more_actors_than_the_cluster_has_cpus(tmp_path: Path) -> None:
    log = tmp_path / "inits.log"
    log.touch()
    executor = RayExecutor(8, load, (str(log), "x"))
    try:
        assert executor.workers == RAY_CPUS
        assert executor.map(square, [3])[0][0] == 9  # and they start: none waits for a CPU forever
    finally:
        executor.close()


def test_an_error_in_a_task_is_raised_to_the_caller(tmp_path: Path) -> None:
    log = tmp_path / "inits.log"
    log.touch()
    executor = RayExecutor(1, load, (str(log), "x"))
    try:
        with pytest.raises(ValueError, match="seven is not allowed"):
            executor.map(fail_on_seven, list(range(10)))
    finally:
        executor.close()


@pytest.mark.slow
def test_a_search_on_ray_scores_every_candidate_as_in_process(
    tiny_model: CompressibleModel,  # noqa: F811
    digits: Dataset,  # noqa: F811
    tmp_path: Path,
) -> None:
    common: dict[str, Any] = {
        "device_latency": macs_proxy,
        "algorithm": "random",
        "budget_candidates": 6,
        "seed": 0,
        "objective": Objective(max_accuracy_drop=0.5),
        "val_images": 300,
    }
    used: list[dict[str, Any]] = []

    def on_ray(initializer: Any, initargs: tuple[Any, ...]) -> Any:
        executor = make_executor(initializer, initargs, kind="ray", workers=2)
        used.append(describe_executor(executor))
        return executor

    local = run_search(tiny_model, digits, **common)
    remote = run_search(tiny_model, digits, executor=on_ray, **common)
    assert used and used[0]["executor"] == "ray" and used[0]["workers"] == 2
    assert os.getpid() not in used[0]["pids"]
    assert len(remote.candidates) == 6
    for a, b in zip(local.candidates, remote.candidates, strict=True):
        assert a.policy.hash == b.policy.hash
        assert (a.score.accuracy, a.score.latency_ms, a.score.size_bytes, a.score.macs, a.score.error) == (
            b.score.accuracy, b.score.latency_ms, b.score.size_bytes, b.score.macs, b.score.error
        )  # fmt: skip
    assert [c.index for c in remote.pareto] == [c.index for c in local.pareto]
