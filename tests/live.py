"""Real HTTP servers for tests, on free loopback ports.

``run_app``: the app under uvicorn in a thread of the test process (fast, shares fakes).
``server_process``: ``modeltailor serve`` as a child process with its own process group,
so reliability tests and benchmarks can SIGKILL it (and its evaluation workers) mid-job.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def run_app(app: FastAPI, *, start_timeout_s: float = 60) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1; yield its base URL; stop it on exit."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=3
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


# --- the server as a separate process (what a user runs; what kill -9 can hit) ---------------


def modeltailor_cmd(*args: str) -> list[str]:
    """The ``modeltailor`` CLI of this interpreter (no reliance on the console script being on PATH)."""
    return [sys.executable, "-c", "from modeltailor.cli import main; main()", *args]


def service_env(data_dir: Path, db_url: str, **settings: object) -> dict[str, str]:
    """This process's environment with the service settings for a child (``MODELTAILOR_<NAME>``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELTAILOR_")}
    env.update(MODELTAILOR_DATA_DIR=str(data_dir), DATABASE_URL=db_url, PYTHONUNBUFFERED="1")
    env.update({f"MODELTAILOR_{name.upper()}": str(value) for name, value in settings.items()})
    return env


@dataclass
class ChildProcess:
    """A child in its own process group (its evaluation workers join the group)."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL the whole group at once, as a crash or an OOM kill of the machine would."""
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM (graceful shutdown), then SIGKILL the group if it lingers."""
        if self.alive():
            self.proc.terminate()
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        self.kill9()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@contextmanager
def child_process(args: list[str], *, env: dict[str, str], log_path: Path) -> Iterator[ChildProcess]:
    """Run ``args`` with output to ``log_path``; on exit stop it and everything it started."""
    log = log_path.open("ab")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    child = ChildProcess(proc, log_path)
    try:
        yield child
    finally:
        child.stop(timeout_s=10)
        log.close()


@dataclass
class ServerProcess(ChildProcess):
    """``modeltailor serve`` in a child process: its base URL and the local tenant's API key."""

    url: str = ""
    key: str = ""


@contextmanager
def server_process(
    data_dir: Path,
    db_url: str,
    *,
    log_path: Path,
    args: tuple[str, ...] = (),
    command: Callable[[int], list[str]] | None = None,
    start_timeout_s: float = 180,
    **settings: object,
) -> Iterator[ServerProcess]:
    """``modeltailor serve`` on a free loopback port; yields once ``/healthz`` answers.

    ``command(port)`` replaces the CLI (e.g. a script serving the app with a stand-in search).
    """
    port = free_port()
    cli = modeltailor_cmd("serve", "--host", "127.0.0.1", "--port", str(port), *args)
    cmd = command(port) if command else cli
    with child_process(cmd, env=service_env(data_dir, db_url, **settings), log_path=log_path) as child:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + start_timeout_s
        while True:
            if not child.alive():
                raise RuntimeError(f"server exited with {child.proc.returncode}:\n{child.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer within {start_timeout_s} s:\n{child.log_tail()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        key = (data_dir / "local_api_key").read_text().strip()
        yield ServerProcess(child.proc, child.log_path, url=url, key=key)
