"""``modeltailor demo``: the guided tour against a running server, through the SDK.

ResNet-20 trained on the bundled MNIST split (cached after the first run), two short
searches with different agents on this CPU, the Pareto front as a table, and the most
accurate point under half the dense latency exported and measured against dense.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from modeltailor.cli import app

console = Console()


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
    front_rows = []
    dense_latency = None
    for algo in algorithms.split(","):
        console.print(
            f"[bold]3.[/bold] searching with [cyan]{algo}[/cyan], {budget} candidates, latency on cpu-ort-1t"
        )
        job = client.submit_job(
            mdl["id"], ds["id"], "cpu-ort-1t", algorithm=algo, budget={"candidates": budget, "seconds": 600},
            space={"schemes": ["unstructured", "nm", "block"], "bits": [None, 8]},
        )  # fmt: skip
        info = job.wait(progress=True)
        baseline = info.get("baseline") or {}
        dense_latency = baseline.get("latency_ms") or dense_latency
        for c in job.pareto():
            front_rows.append((algo, c))
    table = Table(title="Pareto front (accuracy vs predicted latency)")
    for col in ("agent", "candidate", "accuracy", "latency ms", "size KB", "MMACs"):
        table.add_column(col, justify="right")
    for algo, c in sorted(front_rows, key=lambda r: r[1]["latency_ms"]):
        table.add_row(algo, str(c.id), f"{c['accuracy']:.4f}", f"{c['latency_ms']:.3f}",
                      f"{c['size_bytes'] / 1024:.1f}", f"{c['macs'] / 1e6:.2f}")  # fmt: skip
    console.print(table)
    if dense_latency:
        fast = [c for _, c in front_rows if c["latency_ms"] <= 0.5 * dense_latency]
    else:
        fast = []
    pick = max(fast or [c for _, c in front_rows], key=lambda c: c["accuracy"])
    why = "under half the dense latency" if fast else "(no point under half the dense latency; most accurate)"
    console.print(f"[bold]4.[/bold] exporting candidate {pick.id} {why}")
    meta = pick.export(out)
    console.print(
        f"   measured {meta.get('measured_latency_ms', 0):.3f} ms "
        f"vs dense {meta.get('dense_latency_ms', 0):.3f} ms "
        f"→ [green]{meta.get('speedup', 0):.2f}× faster[/green], "
        f"ONNX accuracy {meta.get('accuracy', 0):.4f}, "
        f"predicted {meta.get('predicted_latency_ms') or 0:.3f} ms; written to {out}"
    )
    console.print(f"[bold]5.[/bold] dashboard: {server}/")
