"""``modeltailor demo``: the guided tour against a running server, through the SDK.

ResNet-20 trained on the bundled MNIST split (cached after the first run), a latency
predictor calibrated for this CPU (focused on the demo model, so it takes about a minute),
two short searches with different agents, the Pareto front as a table (predicted latency,
and measured latency for the re-measured front points), and the fastest front point within
one point of the dense accuracy exported and measured against dense.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from modeltailor.cli import app

if TYPE_CHECKING:
    from modeltailor.client import Candidate

console = Console()

#: Accuracy the exported point may lose against dense (README: "≤ 1 point of accuracy lost").
MAX_ACCURACY_DROP = 0.01


def _print_predictor(predictor: dict[str, Any], model: str) -> None:
    focus = (predictor.get("metrics") or {}).get("focus") or {}
    held_out = focus.get("speedup_within_10pct", focus.get("within_10pct"))
    console.print(
        f"   predictor v{predictor.get('version')}"
        + (f": {held_out:.0f} % of held-out {model} policies within ±10 %" if held_out is not None else "")
    )


def pick_export(front: Sequence[Candidate], dense_accuracy: float | None) -> tuple[Candidate, str]:
    """The fastest (predicted) front point within :data:`MAX_ACCURACY_DROP` of dense, and why.

    Without a dense accuracy or such a point, the most accurate one: a demo must export something.
    """
    if not front:
        raise ValueError("the searches found no front point to export")
    if dense_accuracy is not None:
        near = [c for c in front if c["accuracy"] >= dense_accuracy - MAX_ACCURACY_DROP]
        if near:
            best = min(near, key=lambda c: (c["latency_ms"], -c["accuracy"]))
            return best, f"the fastest within 1 point of dense accuracy {dense_accuracy:.4f}"
    best = max(front, key=lambda c: c["accuracy"])
    return best, "the most accurate (no front point within 1 point of dense accuracy)"


@app.command()
def demo(
    server: Annotated[str, typer.Option(help="API base URL.")] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str | None, typer.Option(envvar="MODELTAILOR_API_KEY", help="Defaults to the local key.")
    ] = None,
    model: Annotated[str, typer.Option(help="Zoo architecture to compress.")] = "resnet20",
    data: Annotated[str, typer.Option(help="Built-in data set.")] = "mnist",
    algorithms: Annotated[str, typer.Option(help="Comma-separated agents to run.")] = "rule,optuna-tpe",
    budget: Annotated[int, typer.Option(help="Candidates per search.")] = 16,
    device: Annotated[
        str, typer.Option(help="Device whose latency is predicted and measured.")
    ] = "cpu-ort-1t",
    calibration_samples: Annotated[
        int, typer.Option(help="Models measured to calibrate the device's predictor when it has none.")
    ] = 48,
    out: Annotated[Path, typer.Option(help="Where to write the exported ONNX model.")] = Path(
        "demo-best.onnx"
    ),
) -> None:
    """Run the demo searches on a server started with `modeltailor serve`."""
    from modeltailor.client import Client

    client = Client(server, api_key)
    ds = client.builtin_dataset(data)
    console.print(f"[bold]1.[/bold] data set {data}: id {ds['id']}")
    console.print(f"[bold]2.[/bold] {model} (trained on {data} by the server on first use, then cached)")
    mdl = client.zoo_model(model, ds["id"])
    if client.predictor(device) is None:
        # A built-in device is shared: the first job calibrates a predictor for this tenant only.
        console.print(
            f"[bold]3.[/bold] the first search calibrates a latency predictor for {device}: "
            f"{calibration_samples} models (mostly policies of {model}) exported and timed with ONNX Runtime"
        )
    front_rows = []
    dense_latency = dense_accuracy = None
    for i, algo in enumerate(algorithms.split(",")):
        console.print(
            f"[bold]4.[/bold] searching with [cyan]{algo}[/cyan], {budget} candidates, latency on {device}"
        )
        job = client.submit_job(
            mdl["id"], ds["id"], device, algorithm=algo, budget={"candidates": budget, "seconds": 600},
            space={"schemes": ["unstructured", "nm", "block"], "bits": [None, 8]},
            calibration_samples=calibration_samples,
            finetune={"top_k": 0},  # the demo's minutes go to searching; fine-tuning adds ~1 min a point
        )  # fmt: skip
        info = job.wait(progress=True)
        if i == 0:
            _print_predictor(client.predictor(device) or {}, model)
        baseline = info.get("baseline") or {}
        dense_latency = baseline.get("latency_ms") or dense_latency
        dense_accuracy = baseline.get("accuracy") or dense_accuracy
        for c in job.pareto():
            front_rows.append((algo, c))
    title = "Pareto front (accuracy vs predicted latency; measured where re-measured)"
    if dense_latency:
        title += f" — dense {dense_latency:.3f} ms"
    table = Table(title=title)
    for col in ("agent", "candidate", "accuracy", "predicted ms", "measured ms", "size KB", "MMACs"):
        table.add_column(col, justify="right")
    for algo, c in sorted(front_rows, key=lambda r: r[1]["latency_ms"]):
        measured = c.get("measured_latency_ms")
        table.add_row(algo, str(c.id), f"{c['accuracy']:.4f}", f"{c['latency_ms']:.3f}",
                      "" if measured is None else f"{measured:.3f}",
                      f"{c['size_bytes'] / 1024:.1f}", f"{c['macs'] / 1e6:.2f}")  # fmt: skip
    console.print(table)
    pick, why = pick_export([c for _, c in front_rows], dense_accuracy)
    console.print(f"[bold]5.[/bold] exporting candidate {pick.id}, {why}")
    meta = pick.export(out)
    console.print(
        f"   measured {meta.get('measured_latency_ms', 0):.3f} ms "
        f"vs dense {meta.get('dense_latency_ms', 0):.3f} ms "
        f"→ [green]{meta.get('speedup', 0):.2f}× faster[/green], "
        f"ONNX accuracy {meta.get('accuracy', 0):.4f}, "
        f"predicted {meta.get('predicted_latency_ms') or 0:.3f} ms; written to {out}"
    )
    console.print(
        f"[bold]6.[/bold] dashboard: {server}/  (the API key is in $MODELTAILOR_DATA_DIR/local_api_key)"
    )
