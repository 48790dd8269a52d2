"""Where candidate evaluations run: a local process pool (default) or a Ray cluster.

Both load the job's model and data once per worker, through an ``initializer`` that
runs once in each worker process (or Ray actor) and whose result the evaluation
function reads with :func:`worker_state`. Candidates then travel as small JSON-able
policies, never as models.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Protocol, TypeVar

from service.settings import Settings

T = TypeVar("T")
R = TypeVar("R")

_STATE: Any = None


def worker_state() -> Any:
    """What the initializer returned in this worker (model, data, ...)."""
    if _STATE is None:
        raise RuntimeError("worker_state() called outside an executor worker")
    return _STATE


def _init_worker(initializer: Callable[..., Any], initargs: tuple[Any, ...]) -> None:
    global _STATE
    _STATE = initializer(*initargs)


class Executor(Protocol):
    """Runs ``fn`` over items in workers; ``fn`` must be a module-level function."""

    workers: int

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """Results in the order of ``items``; an exception in ``fn`` is raised here."""
        ...

    def close(self) -> None:
        """Stop the workers."""
        ...


class LocalPoolExecutor:
    """A ``ProcessPoolExecutor`` of spawned processes, each initialised once.

    Spawn, not fork: the runner lives in a threaded server process, and forking a
    process that holds threads (and torch's thread pools) can deadlock the child.
    """

    def __init__(self, workers: int, initializer: Callable[..., Any], initargs: tuple[Any, ...] = ()) -> None:
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(initializer, initargs),
        )

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return list(self._pool.map(fn, items))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """A pool of Ray actors, each initialised once; joins ``address`` or starts a local Ray."""

    def __init__(
        self,
        workers: int,
        initializer: Callable[..., Any],
        initargs: tuple[Any, ...] = (),
        *,
        address: str | None = None,
    ) -> None:
        import ray  # imported only when MODELTAILOR_EXECUTOR=ray
        from ray.util import ActorPool

        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)

        @ray.remote
        class _Worker:
            def __init__(self) -> None:
                _init_worker(initializer, initargs)

            def run(self, fn: Callable[[Any], Any], item: Any) -> Any:
                return fn(item)

        self.workers = workers
        self._actors = [_Worker.remote() for _ in range(workers)]  # type: ignore[attr-defined]
        self._pool = ActorPool(self._actors)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return list(self._pool.map(lambda actor, item: actor.run.remote(fn, item), list(items)))

    def close(self) -> None:
        import ray

        for actor in self._actors:
            ray.kill(actor)
        self._actors = []


def make_executor(
    settings: Settings, initializer: Callable[..., Any], initargs: tuple[Any, ...] = ()
) -> Executor:
    """The executor the settings ask for (``MODELTAILOR_EXECUTOR``, ``MODELTAILOR_WORKERS``)."""
    if settings.executor == "ray":
        return RayExecutor(settings.workers, initializer, initargs, address=settings.ray_address)
    return LocalPoolExecutor(settings.workers, initializer, initargs)
