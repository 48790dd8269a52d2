"""``modeltailor device-agent``: run the measurement agent on the target device.

Kept free of torch (like ``latency_models.agent``) so the command works on an edge board with
only onnxruntime, numpy, httpx and typer installed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from latency_models.agent import AgentError, TransportError, serve
from modeltailor.cli import app


@app.command("device-agent")
def device_agent(
    device: Annotated[
        str,
        typer.Option(
            "--device",
            help="With --server: the device's id or name on the server (its threads and settings "
            "apply). With --dir: a built-in device name or a new ONNX Runtime device name.",
        ),
    ],
    server: Annotated[
        str | None, typer.Option("--server", help="Service URL, e.g. http://127.0.0.1:8000.")
    ] = None,
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Exchange tasks/results through this folder instead of HTTP.")
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", envvar="MODELTAILOR_TOKEN", help="API key (bearer token).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="ONNX Runtime intra-op threads.")
    ] = None,
    stop_after: Annotated[int | None, typer.Option("--stop-after", min=1, help="Exit after N tasks.")] = None,
    poll_s: Annotated[
        float, typer.Option("--poll-s", min=0.0, help="Seconds between polls when idle.")
    ] = 5.0,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Where received models are kept.")
    ] = None,
) -> None:
    """Pull measurement tasks, time them with ONNX Runtime, post the results; runs until stopped.

    Network errors, 429 and 5xx answers are retried with backoff (the agent never exits
    because the server is down); a rejected token or an unknown device stops it (exit 2).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        done = serve(
            device=device,
            server=server,
            directory=directory,
            token=token,
            threads=threads,
            stop_after=stop_after,
            poll_s=poll_s,
            cache_dir=cache_dir,
        )
    except (AgentError, TransportError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(f"device agent stopped after {done} task(s)", err=True)
