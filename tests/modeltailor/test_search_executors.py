"""Candidates scored by executor workers score exactly as in process; the model reaches each worker once."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from agents import Objective
from compression import CompressibleModel
from compression.data import Dataset
from engine.device_latency import macs_proxy
from engine.executors import InProcessExecutor, LocalPoolExecutor
from engine.search import EvaluatorPayload, SearchResult, load_worker_evaluator, run_search

COMMON: dict[str, Any] = {
    "device_latency": macs_proxy,
    "algorithm": "random",
    "seed": 0,
    "objective": Objective(max_accuracy_drop=0.5),
    "val_images": 300,
}


def scored(result: SearchResult) -> list[Any]:
    """Everything about each candidate except the wall time it took."""
    out: list[Any] = []
    for c in result.candidates:
        s = c.score
        out.append((c.index, c.policy.hash, s.accuracy, s.latency_ms, s.size_bytes, s.macs, s.error))
        out.append(c.feasible)
    return out


def counting_initializer(log: str, token: str, payload: EvaluatorPayload) -> str:
    """Runs in each worker: note this process, then load the search's evaluator."""
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    return load_worker_evaluator(token, payload)


class Recorder:
    """An executor factory that wraps another and records what crosses to the workers."""

    def __init__(self, make: Callable[[Callable[..., Any], tuple[Any, ...]], Any]) -> None:
        self.make = make
        self.initargs_bytes = 0
        self.item_bytes: list[int] = []
        self.executor: Any = None

    def __call__(self, initializer: Callable[..., Any], initargs: tuple[Any, ...]) -> Any:
        self.initargs_bytes = len(pickle.dumps(initargs))
        self.executor = self.make(initializer, initargs)
        inner_map = self.executor.map

        def map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
            self.item_bytes += [len(pickle.dumps(item)) for item in items]
            return list(inner_map(fn, items))

        self.executor.map = map
        return self.executor


@pytest.fixture(scope="module")
def in_process(tiny_model: CompressibleModel, digits: Dataset) -> SearchResult:
    return run_search(tiny_model, digits, budget_candidates=8, **COMMON)


@pytest.mark.slow
def test_a_pool_of_two_scores_every_candidate_as_in_process_loading_the_model_once_per_worker(
    tiny_model: CompressibleModel, digits: Dataset, in_process: SearchResult, tmp_path: Path
) -> None:
    log = tmp_path / "inits.log"
    log.touch()

    def pool(initializer: Callable[..., Any], initargs: tuple[Any, ...]) -> LocalPoolExecutor:
        return LocalPoolExecutor(2, counting_initializer, (str(log), *initargs))

    recorder = Recorder(pool)
    pooled = run_search(tiny_model, digits, budget_candidates=8, executor=recorder, **COMMON)
    assert scored(pooled) == scored(in_process)
    assert [c.index for c in pooled.pareto] == [c.index for c in in_process.pareto]
    assert pooled.dense.score.accuracy == in_process.dense.score.accuracy > 0.8
    # Every candidate was scored by the workers, the model was loaded once per worker process...
    assert len(recorder.item_bytes) == 8
    inits = log.read_text().split()
    assert 1 <= len(inits) <= 2 and len(set(inits)) == len(inits) and str(os.getpid()) not in inits
    # ...and only policies travelled per candidate: the model and data went with the initializer.
    assert recorder.initargs_bytes > 20 * max(recorder.item_bytes)
    assert max(recorder.item_bytes) < 4096


def test_the_in_process_executor_scores_the_same_and_forgets_the_search_afterwards(
    tiny_model: CompressibleModel, digits: Dataset, in_process: SearchResult
) -> None:
    from engine import search

    recorder = Recorder(InProcessExecutor)
    inline = run_search(tiny_model, digits, budget_candidates=8, executor=recorder, **COMMON)
    assert scored(inline) == scored(in_process)
    assert len(recorder.item_bytes) == 8
    assert search._WORKER_EVALUATORS == {}  # closed with the search, not kept for the process


def test_an_error_outside_scoring_in_a_worker_fails_the_search(
    tiny_model: CompressibleModel, digits: Dataset
) -> None:
    calls = {"n": 0}

    def latency(cm: Any) -> float:  # the dense model is timed by the caller; the workers' copy breaks
        calls["n"] += 1
        if calls["n"] > 1:
            raise TypeError("latency callback broke")
        return macs_proxy(cm)

    common = {**COMMON, "device_latency": latency}
    with pytest.raises(TypeError, match="latency callback broke"):
        run_search(tiny_model, digits, budget_candidates=4, executor=InProcessExecutor, **common)
