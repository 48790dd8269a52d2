"""The device agent: runs on the edge device, pulls measurement tasks, times them, posts results.

An ONNX Runtime agent needs only onnxruntime, numpy and httpx (no torch, no onnx), so it
installs on a small board; an ExecuTorch (``.pte``) or OpenVINO (IR zip) device's agent needs
that runtime instead, imported only when it prepares its first model:
``python -m latency_models.agent --server URL --device NAME --token KEY`` (or the
``modeltailor device-agent`` command where the full package is installed).

Two transports carry the JSON of ``latency_models.tasks``:

* ``DirectoryTransport``: ``<dir>/tasks/<id>.json`` in, ``<dir>/results/<id>.json`` out. Files
  are written under a temporary name and renamed, and an agent claims a task by renaming it
  into ``<dir>/claimed/``, so processes on one machine (or sharing a folder) never see half a
  file and never run one task twice.
* ``HttpTransport``: ``POST {server}/v1/devices/{id}/tasks/claim`` claims tasks for this
  agent and answers them as a JSON array (``{"tasks": [...]}`` is accepted too; an empty
  array means nothing to do; ``GET .../tasks`` only lists waiting tasks, claiming none);
  ``POST {server}/v1/devices/{id}/measurements`` takes one result object per call and answers
  2xx. Models given by ``url`` are downloaded with a GET (relative URLs against the server).
  Every call sends ``Authorization: Bearer <token>`` and is retried with exponential backoff
  on network errors, 429 and 5xx; other 4xx (a wrong token, an unknown device) stop the agent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import httpx

from latency_models.devices import BUILTIN_DEVICES, Device
from latency_models.harness import NoiseRule, host_info, measure, measure_pair, reference_onnx_path
from latency_models.runtimes import make_runtime
from latency_models.runtimes_edge import model_suffix
from latency_models.tasks import MeasurementResult, MeasurementTask, ModelRef, TaskError

#: Runtimes an agent can serve: each times the files the server sends (ONNX, ExecuTorch ``.pte``,
#: OpenVINO IR zip); only the served runtime is imported, when the first model is prepared.
AGENT_RUNTIMES = ("onnxruntime", "executorch", "openvino")

__all__ = [
    "AgentError",
    "DirectoryTransport",
    "HttpTransport",
    "TaskRejection",
    "Transport",
    "TransportError",
    "agent_device",
    "device_from_record",
    "execute_task",
    "main",
    "run_agent",
    "serve",
]

log = logging.getLogger("modeltailor.agent")


class AgentError(RuntimeError):
    """A problem retrying cannot fix (rejected token, unknown device): the agent stops."""


class TransportError(RuntimeError):
    """The server or folder stayed unreachable after all retries; the agent tries again later."""


class Transport(Protocol):
    """Where tasks come from and results go."""

    def fetch_tasks(self) -> list[MeasurementTask | TaskRejection]:
        """Tasks to run now (claimed for this agent); malformed ones come back as rejections."""
        ...

    def read_model(self, ref: ModelRef) -> bytes:
        """Bytes of a model given by ``url`` or ``path`` (hash checked by the caller)."""
        ...

    def post_result(self, result: MeasurementResult) -> None:
        """Deliver one result; raises ``TransportError`` if it could not."""
        ...


@dataclass(frozen=True)
class TaskRejection:
    """A task that could not be parsed; the agent answers it with an ``error`` result."""

    task_id: str
    error: str


def _reject(raw: Any, exc: Exception) -> TaskRejection | None:
    """A rejection if the malformed task at least has an id to answer to."""
    task_id = raw.get("id") if isinstance(raw, dict) else None
    if not isinstance(task_id, str) or not task_id:
        return None
    return TaskRejection(task_id, f"malformed task: {exc}")


def _atomic_write(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".", suffix=".tmp", delete=False) as fh:
        fh.write(data)
    os.replace(fh.name, path)


# --------------------------------------------------------------------------- directory


class DirectoryTransport:
    """Tasks and results as files in one folder (two processes on one machine)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tasks_dir = self.root / "tasks"
        self.claimed_dir = self.root / "claimed"
        self.results_dir = self.root / "results"
        for d in (self.tasks_dir, self.claimed_dir, self.results_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._claimed: dict[str, Path] = {}

    # server side -----------------------------------------------------------
    def submit(self, task: MeasurementTask) -> Path:
        """Queue ``task`` (atomically: an agent never reads a partial file)."""
        path = self.tasks_dir / f"{task.id}.json"
        _atomic_write(path, task.to_json().encode())
        return path

    def result(self, task_id: str) -> MeasurementResult | None:
        """The result of ``task_id`` if one was written."""
        path = self.results_dir / f"{task_id}.json"
        return MeasurementResult.from_json(path.read_bytes()) if path.is_file() else None

    def wait_result(self, task_id: str, timeout_s: float, poll_s: float = 0.1) -> MeasurementResult:
        """Block until ``task_id`` has a result; ``TimeoutError`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (found := self.result(task_id)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result for task {task_id} after {timeout_s:.0f} s")
            time.sleep(poll_s)
        return found

    # agent side ------------------------------------------------------------
    def fetch_tasks(self) -> list[MeasurementTask | TaskRejection]:
        """Claim every queued task by renaming it into ``claimed/``."""
        tasks: list[MeasurementTask | TaskRejection] = []
        for path in sorted(self.tasks_dir.glob("*.json")):
            claimed = self.claimed_dir / path.name
            try:
                os.rename(path, claimed)  # atomic; whoever renames first owns the task
            except FileNotFoundError:
                continue
            raw: Any = None
            try:
                raw = json.loads(claimed.read_bytes())
                task = MeasurementTask.from_dict(raw)
            except (TaskError, json.JSONDecodeError) as exc:
                log.error("rejected task file %s: %s", path.name, exc)
                rejection = _reject(raw, exc)
                if rejection is None:
                    claimed.rename(claimed.with_suffix(".unreadable"))  # keep it for a person to read
                else:
                    self._claimed[rejection.task_id] = claimed
                    tasks.append(rejection)
                continue
            self._claimed[task.id] = claimed
            tasks.append(task)
        return tasks

    def read_model(self, ref: ModelRef) -> bytes:
        """Read a ``path`` model (relative paths are inside the transport folder)."""
        if ref.path is None:
            raise TaskError("the directory transport reads models by path or embedded base64, not url")
        path = Path(ref.path)
        return (path if path.is_absolute() else self.root / path).read_bytes()

    def post_result(self, result: MeasurementResult) -> None:
        """Write ``results/<task id>.json`` atomically and drop the claimed task file."""
        try:
            _atomic_write(self.results_dir / f"{result.task_id}.json", result.to_json().encode())
        except OSError as exc:
            raise TransportError(f"cannot write result {result.task_id}: {exc}") from exc
        claimed = self._claimed.pop(result.task_id, None)
        if claimed is not None:
            claimed.unlink(missing_ok=True)


# --------------------------------------------------------------------------- HTTP


class HttpTransport:
    """The service's REST endpoints for one device, with bearer token and retries."""

    def __init__(
        self,
        server: str,
        device_id: str,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
    ) -> None:
        if not server.startswith(("http://", "https://")):
            raise AgentError(f"server must be an http(s) URL, got {server!r}")
        if max_retries < 0 or backoff_s < 0:
            raise ValueError("max_retries and backoff_s must be >= 0")
        self.server = server.rstrip("/")
        self.device_id = device_id
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        headers = {"User-Agent": "modeltailor-device-agent/1"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.client = httpx.Client(base_url=self.server, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One call with retries on network errors, 429 and 5xx; fatal 4xx raise AgentError."""
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                time.sleep(delay * random.uniform(1.0, 1.25))  # jitter: agents do not retry in step
            try:
                response = self.client.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                log.warning("%s %s failed (%s), attempt %d", method, url, last, attempt + 1)
                continue
            if response.status_code >= 500 or response.status_code == 429:
                last = f"HTTP {response.status_code}"
                log.warning("%s %s answered %s, attempt %d", method, url, last, attempt + 1)
                continue
            if response.status_code in (401, 403):
                raise AgentError(
                    f"{method} {url}: the server rejected the token (HTTP {response.status_code})"
                )
            if response.status_code >= 400:
                raise AgentError(f"{method} {url}: HTTP {response.status_code}: {response.text[:300]}")
            return response
        raise TransportError(f"{method} {url}: gave up after {self.max_retries + 1} attempts ({last})")

    def describe_device(self) -> dict[str, Any]:
        """The server's record of this device; a device given by name is resolved to its id.

        Raises:
            AgentError: the server knows no such device (or refuses the token).
            TransportError: the server stayed unreachable.
        """
        if self.device_id.isdigit():
            record = self._request("GET", f"/v1/devices/{self.device_id}").json()
        else:
            body = self._request("GET", "/v1/devices").json()
            items = body.get("data") if isinstance(body, dict) else body
            matches = [d for d in items or [] if isinstance(d, dict) and d.get("name") == self.device_id]
            if not matches:
                raise AgentError(
                    f"the server has no device named {self.device_id!r}: register it "
                    "(POST /v1/devices with kind 'remote') or pass its numeric id"
                )
            record = matches[0]
            self.device_id = str(record["id"])
        if not isinstance(record, dict) or "id" not in record:
            raise AgentError(f"unexpected device record from the server: {record!r}"[:300])
        return record

    def fetch_tasks(self) -> list[MeasurementTask | TaskRejection]:
        """Claim the device's next task (it is handed to no other agent while this one holds it)."""
        response = self._request("POST", f"/v1/devices/{self.device_id}/tasks/claim")
        try:
            body = response.json()
        except ValueError as exc:
            raise TransportError(f"task list is not JSON: {exc}") from exc
        items = body.get("tasks") if isinstance(body, dict) else body
        if not isinstance(items, list):
            raise AgentError(f"task list must be a JSON array, got {type(body).__name__}")
        tasks: list[MeasurementTask | TaskRejection] = []
        for raw in items:
            try:
                tasks.append(MeasurementTask.from_dict(raw))
            except TaskError as exc:
                log.error("rejected task: %s", exc)
                rejection = _reject(raw, exc)
                if rejection is not None:
                    tasks.append(rejection)
        return tasks

    def read_model(self, ref: ModelRef) -> bytes:
        """Download a ``url`` model (same token, same retries)."""
        if ref.url is None:
            raise TaskError("the HTTP transport reads models by url or embedded base64, not path")
        return self._request("GET", ref.url).content

    def post_result(self, result: MeasurementResult) -> None:
        """POST one result."""
        self._request("POST", f"/v1/devices/{self.device_id}/measurements", json=result.to_dict())


# --------------------------------------------------------------------------- the loop


def _agent_info(runtime: str = "onnxruntime") -> dict[str, Any]:
    info: dict[str, Any] = {"host": host_info(), "agent_version": 1}
    if runtime == "onnxruntime":
        import onnxruntime as ort

        info["onnxruntime"] = str(ort.__version__)
    else:
        try:
            info[runtime] = make_runtime(runtime).version()
        except Exception as exc:  # not installed: the task's error says so
            info[runtime] = f"unavailable: {type(exc).__name__}"
    return info


def _materialize(ref: ModelRef, transport: Transport, cache_dir: Path) -> Path:
    """The model as a local file named by its hash (verified, cached across tasks); its suffix
    (``.onnx``, ``.pte``, ``.zip``) follows its content, which is how the runtime reads it."""
    for suffix in (".onnx", ".pte", ".zip"):
        path = cache_dir / f"{ref.sha256}{suffix}"
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == ref.sha256:
            return path
    data = ref.load_bytes(transport.read_model)
    path = cache_dir / f"{ref.sha256}{model_suffix(data)}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, data)
    return path


def _default_reference(runtime: str = "onnxruntime") -> Path | None:
    """The built-in reference, if this install can build it (ONNX: needs the onnx package;
    ExecuTorch: torch and executorch). OpenVINO times the ONNX reference."""
    try:
        if runtime == "executorch":
            from latency_models.runtimes_edge import reference_pte_path

            return reference_pte_path()
        return reference_onnx_path()
    except ImportError:
        return None


def execute_task(
    task: MeasurementTask,
    transport: Transport,
    device: Device,
    cache_dir: Path,
    noise: NoiseRule = NoiseRule(),
) -> MeasurementResult:
    """Run one task; any failure of the task itself becomes an ``error`` result."""
    try:
        model = _materialize(task.model, transport, cache_dir)
        reference = (
            _materialize(task.reference, transport, cache_dir)
            if task.reference is not None
            else _default_reference(device.runtime)
        )
        dev = Device(
            name=device.name,
            runtime=device.runtime,
            threads=task.threads if task.threads is not None else device.threads,
            settings=task.settings if task.settings is not None else device.settings,
            is_local=True,
        )
        if task.baseline is not None:
            baseline = _materialize(task.baseline, transport, cache_dir)
            pair = measure_pair(
                baseline,
                model,
                dev,
                runs=task.runs,
                warmup=task.warmup,
                input_shape=task.input_shape,
                noise=noise,
                with_reference=reference is not None,
                reference=reference,
            )
            return MeasurementResult(
                task.id, device.name, "ok", pair.b, pair.a, pair.speedup, agent=_agent_info(device.runtime)
            )
        measurement = measure(
            model,
            dev,
            runs=task.runs,
            warmup=task.warmup,
            reference=reference,
            interleave_reference=reference is not None,
            input_shape=task.input_shape,
            noise=noise,
            model_sha256=task.model.sha256,
        )
        return MeasurementResult(task.id, device.name, "ok", measurement, agent=_agent_info(device.runtime))
    except AgentError:
        raise
    except Exception as exc:  # one bad task must not stop the agent: report it instead
        log.error("task %s failed: %s", task.id, exc)
        return MeasurementResult(
            task.id,
            device.name,
            "error",
            error=f"{type(exc).__name__}: {exc}",
            agent=_agent_info(device.runtime),
        )


def run_agent(
    transport: Transport,
    device: Device,
    *,
    stop_after: int | None = None,
    poll_s: float = 5.0,
    cache_dir: Path | None = None,
    noise: NoiseRule = NoiseRule(),
    should_stop: Callable[[], bool] | None = None,
) -> int:
    """Pull, time and report tasks until ``stop_after`` tasks are done or ``should_stop()``.

    Results that cannot be delivered are kept and re-sent on the next round. Returns the
    number of tasks completed (delivered).

    Raises:
        AgentError: the device's runtime is not one an agent serves, or the server refuses the agent.
    """
    if device.runtime not in AGENT_RUNTIMES:
        raise AgentError(
            f"the device agent times files with {', '.join(AGENT_RUNTIMES)}; "
            f"{device.name} uses {device.runtime}"
        )
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1 or None, got {stop_after}")
    cache = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "modeltailor-agent"
    pending: list[MeasurementResult] = []
    delivered = 0

    def flush() -> None:
        nonlocal delivered
        while pending:
            transport.post_result(pending[0])
            pending.pop(0)
            delivered += 1

    while stop_after is None or delivered < stop_after:
        if should_stop is not None and should_stop():
            break
        try:
            flush()
            tasks = transport.fetch_tasks()
        except TransportError as exc:
            log.warning("transport unavailable: %s; retrying in %.1f s", exc, poll_s)
            time.sleep(poll_s)
            continue
        if not tasks:
            time.sleep(poll_s)
            continue
        for task in tasks:
            if isinstance(task, TaskRejection):
                pending.append(
                    MeasurementResult(
                        task.task_id,
                        device.name,
                        "error",
                        error=task.error,
                        agent=_agent_info(device.runtime),
                    )
                )
            else:
                log.info("measuring task %s (model %s)", task.id, task.model.sha256[:12])
                pending.append(execute_task(task, transport, device, cache, noise))
            try:
                flush()
            except TransportError as exc:
                log.warning("could not deliver a result yet: %s", exc)
            if stop_after is not None and delivered + len(pending) >= stop_after:
                break
    for _ in range(3):  # leaving: try a little harder to deliver what was measured
        try:
            flush()
            break
        except TransportError:
            time.sleep(poll_s)
    if pending:
        raise TransportError(f"{len(pending)} result(s) could not be delivered")
    return delivered


# --------------------------------------------------------------------------- entry points


def agent_device(name: str, threads: int | None = None) -> Device:
    """The agent's device: a built-in device by name, or a custom ORT device ``name``."""
    builtin = BUILTIN_DEVICES.get(name)
    if builtin is not None:
        if builtin.runtime not in AGENT_RUNTIMES:
            raise AgentError(
                f"device {name} uses {builtin.runtime}; the agent runs {', '.join(AGENT_RUNTIMES)} devices"
            )
        return Device(
            builtin.name, builtin.runtime, threads or builtin.threads, builtin.settings, is_local=True
        )
    return Device(name, "onnxruntime", threads or 1, is_local=True)


def device_from_record(record: dict[str, Any], threads: int | None = None) -> Device:
    """The agent's device as the server describes it (``threads`` overrides the server's)."""
    runtime = str(record.get("runtime", "onnxruntime"))
    if runtime not in AGENT_RUNTIMES:
        raise AgentError(
            f"device {record.get('name')} uses {runtime}; the agent runs {', '.join(AGENT_RUNTIMES)} devices"
        )
    if record.get("kind") == "local":
        log.warning(
            "device %s is a local device: the server measures it itself, so no tasks will come",
            record.get("name"),
        )
    settings = {str(k): str(v) for k, v in (record.get("settings") or {}).items()}
    return Device(
        str(record["name"]),
        runtime,
        threads or int(record.get("threads") or 1),
        settings,
        is_local=True,
    )


def _describe(transport: HttpTransport, stopping: Callable[[], bool], poll_s: float) -> dict[str, Any] | None:
    """Ask the server about the device until it answers (None if stopped meanwhile)."""
    while not stopping():
        try:
            return transport.describe_device()
        except TransportError as exc:
            log.warning("server unavailable: %s; retrying in %.1f s", exc, poll_s)
            time.sleep(poll_s)
    return None


def serve(
    *,
    device: str,
    server: str | None = None,
    directory: Path | None = None,
    token: str | None = None,
    threads: int | None = None,
    stop_after: int | None = None,
    poll_s: float = 5.0,
    cache_dir: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> int:
    """Build the transport from options and run until stopped (SIGTERM / Ctrl-C stop cleanly).

    With ``--server`` the device's record is read from the server first (a name is resolved
    to its id; the server's threads and settings apply unless ``threads`` overrides them),
    retrying while the server is unreachable. ``should_stop`` (for callers that run the agent
    in a thread) is polled like SIGTERM.
    """
    if (server is None) == (directory is None):
        raise AgentError("give exactly one of --server URL or --dir DIR")
    stopping = False

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    def stopped() -> bool:
        return stopping or (should_stop is not None and should_stop())

    in_main = threading.current_thread() is threading.main_thread()  # signals only work there
    previous = signal.signal(signal.SIGTERM, on_term) if in_main else None
    transport: Transport | None = None
    try:
        if server is not None:
            http = HttpTransport(server, device, token)
            transport = http
            record = _describe(http, stopped, poll_s)
            if record is None:
                return 0
            dev = device_from_record(record, threads)
            log.info("serving device %s (id %s) of %s", dev.name, http.device_id, server)
        else:
            assert directory is not None
            transport = DirectoryTransport(directory)
            dev = agent_device(device, threads)
        return run_agent(transport, dev, stop_after=stop_after, poll_s=poll_s, cache_dir=cache_dir,
                         should_stop=stopped)  # fmt: skip
    except KeyboardInterrupt:
        return 0
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        if isinstance(transport, HttpTransport):
            transport.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m latency_models.agent``: the agent without the CLI's dependencies."""
    parser = argparse.ArgumentParser(
        prog="python -m latency_models.agent", description=__doc__.split("\n")[0]
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="service URL, e.g. https://tailor.example.com")
    where.add_argument("--dir", type=Path, help="folder shared with the submitting process")
    parser.add_argument("--device", required=True, help="device id on the server / built-in device name")
    parser.add_argument(
        "--token", default=os.environ.get("MODELTAILOR_TOKEN"), help="API key ($MODELTAILOR_TOKEN)"
    )
    parser.add_argument("--threads", type=int, default=None, help="the runtime's intra-op threads")
    parser.add_argument("--stop-after", type=int, default=None, help="exit after this many tasks")
    parser.add_argument("--poll-s", type=float, default=5.0, help="seconds between polls when idle")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where downloaded models are kept")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        done = serve(device=args.device, server=args.server, directory=args.dir, token=args.token,
                     threads=args.threads, stop_after=args.stop_after, poll_s=args.poll_s,
                     cache_dir=args.cache_dir)  # fmt: skip
    except (AgentError, TransportError) as exc:
        log.error("%s", exc)
        return 2
    log.info("stopped after %d task(s)", done)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
