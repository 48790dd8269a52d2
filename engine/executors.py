"""Where candidate evaluations run: in this process, a local process pool, or a Ray cluster.

Each loads the job's model and data once per worker, through an ``initializer`` that
runs once in each worker process (or Ray actor) before any task; the evaluation function
reads what it built (``engine.search`` keeps its evaluators by search token;
:func:`worker_state` returns the initializer's result for simpler uses). Candidates
then travel as small JSON-able policies, never as models.

Which one a job gets (:func:`make_executor`, from the service's settings
``MODELTAILOR_EXECUTOR``, ``_WORKERS``, ``RAY_ADDRESS``): kind ``ray`` → Ray (an address
joins a cluster; none, a local Ray is started once for the process); otherwise the local
pool of ``workers`` processes, or this process itself when that is 1 (no start-up cost, no
copy of the model).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Literal, Protocol, TypeVar

ExecutorKind = Literal["local", "ray"]
T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("modeltailor.executors")

_STATE: Any = None
_LOCAL = threading.local()  # the in-process executor's state, per calling thread


def worker_state() -> Any:
    """What the initializer returned in this worker (model, data, ...)."""
    state = getattr(_LOCAL, "state", None)
    if state is None:
        state = _STATE
    if state is None:
        raise RuntimeError("worker_state() called outside an executor worker")
    return state


def _init_worker(initializer: Callable[..., Any], initargs: tuple[Any, ...], threads: int = 0) -> None:
    global _STATE
    if threads > 0:  # workers sharing the machine must not each start one thread per core
        import torch

        torch.set_num_threads(threads)
    _STATE = initializer(*initargs)


def threads_per_worker(workers: int) -> int:
    """Torch threads for each of ``workers`` processes on this machine (at least 1)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


class Executor(Protocol):
    """Runs a module-level ``fn`` over items in workers that each ran an initializer once."""

    workers: int

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """Results in the order of ``items``; an exception in ``fn`` is raised here."""
        ...

    def close(self) -> None:
        """Stop the workers."""
        ...


# Builds an executor whose workers each run ``initializer(*initargs)`` once before any ``fn``.
ExecutorFactory = Callable[[Callable[..., Any], tuple[Any, ...]], Executor]


class InProcessExecutor:
    """Runs the initializer once and every task in the calling process (one worker)."""

    def __init__(self, initializer: Callable[..., Any], initargs: tuple[Any, ...] = ()) -> None:
        self.workers = 1
        self._state = initializer(*initargs)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        previous = getattr(_LOCAL, "state", None)
        _LOCAL.state = self._state
        try:
            return [fn(item) for item in items]
        finally:
            _LOCAL.state = previous

    def close(self) -> None:
        self._state = None


class LocalPoolExecutor:
    """A ``ProcessPoolExecutor`` of spawned processes, each initialised once.

    Spawn, not fork: the runner lives in a threaded server process, and forking a
    process that holds threads (and torch's thread pools) can deadlock the child.
    """

    def __init__(self, workers: int, initializer: Callable[..., Any], initargs: tuple[Any, ...] = ()) -> None:
        if workers < 1:
            raise ValueError(f"a local pool needs at least 1 worker, got {workers}")
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(initializer, initargs, threads_per_worker(workers)),
        )

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return list(self._pool.map(fn, items))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


_RAY_LOCK = threading.Lock()


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect this process to Ray once: join ``address``, or start a local Ray.

    ``address`` None also honours ``RAY_ADDRESS`` (Ray reads it itself); with neither,
    a local Ray is started and kept for the life of the process (later jobs reuse it),
    listening on the loopback interface only.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports leave the machine
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # Unless told it will never have other nodes, Ray binds even a local instance to the
        # machine's routable address. Read when ray is first imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    with _RAY_LOCK:
        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
        if address is None and not os.environ.get("RAY_ADDRESS") and num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        ray.init(address=address, **kwargs)
        log.info("ray: connected (%s)", address or os.environ.get("RAY_ADDRESS") or "local")


RAY_CPU_WAIT_S = 60.0  # a worker node may join moments after the head (docker-compose start-up)


def _cluster_cpus(wait_s: float) -> int:
    """CPUs of the connected Ray cluster, waiting up to ``wait_s`` for a node that has some."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus >= 1:
            return cpus
        if time.monotonic() >= deadline:
            raise RuntimeError(f"the Ray cluster has no CPUs to run evaluations on (waited {wait_s:.0f} s)")
        time.sleep(1.0)


class _RayWorker:
    """One Ray actor: runs the initializer when created, then tasks (Ray makes it remote)."""

    def __init__(self, packed: tuple[Callable[..., Any], tuple[Any, ...]]) -> None:
        initializer, initargs = packed
        _init_worker(initializer, initargs, threads=1)  # one CPU reserved per actor

    def run(self, fn: Callable[[Any], Any], item: Any) -> Any:
        return fn(item)

    def where(self) -> tuple[str, int]:
        """The Ray node id and process id this actor runs in."""
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()


class RayExecutor:
    """A pool of Ray actors (one CPU each), each initialised once; joins ``address`` or starts a local Ray.

    The initializer's arguments are put in the object store once, so N actors on one
    node share one copy. Asks for at most as many actors as the cluster has CPUs
    (more would wait for CPUs forever).
    """

    def __init__(
        self,
        workers: int,
        initializer: Callable[..., Any],
        initargs: tuple[Any, ...] = (),
        *,
        address: str | None = None,
    ) -> None:
        import ray
        from ray.util import ActorPool

        ensure_ray(address)
        cpus = _cluster_cpus(RAY_CPU_WAIT_S)
        self.workers = max(1, min(workers, cpus))
        args_ref = ray.put((initializer, initargs))
        actor_cls = ray.remote(num_cpus=1)(_RayWorker)
        # A top-level ObjectRef argument reaches each actor from the object store, not as a copy.
        self._actors: list[Any] = [actor_cls.remote(args_ref) for _ in range(self.workers)]
        self._pool = ActorPool(self._actors)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return list(self._pool.map(lambda actor, item: actor.run.remote(fn, item), list(items)))

    def placement(self) -> list[tuple[str, int]]:
        """Each actor's (node id, process id)."""
        import ray

        return [(str(n), int(p)) for n, p in ray.get([a.where.remote() for a in self._actors])]

    def close(self) -> None:
        import ray

        for actor in self._actors:
            ray.kill(actor)
        self._actors = []


def describe_executor(executor: Executor) -> dict[str, Any]:
    """What a job's progress stream says about where its evaluations run."""
    if isinstance(executor, RayExecutor):
        placement = executor.placement()
        return {
            "executor": "ray",
            "workers": executor.workers,
            "nodes": sorted({node for node, _ in placement}),
            "pids": [pid for _, pid in placement],
        }
    kind = "local-pool" if isinstance(executor, LocalPoolExecutor) else "in-process"
    return {"executor": kind, "workers": executor.workers}


def make_executor(
    initializer: Callable[..., Any],
    initargs: tuple[Any, ...] = (),
    *,
    kind: ExecutorKind = "local",
    workers: int = 1,
    ray_address: str | None = None,
) -> Executor:
    """A ``kind`` executor of ``workers`` (Ray joins ``ray_address``; 1 local worker is this process)."""
    if kind == "ray":
        return RayExecutor(workers, initializer, initargs, address=ray_address)
    if workers <= 1:
        return InProcessExecutor(initializer, initargs)
    return LocalPoolExecutor(workers, initializer, initargs)
