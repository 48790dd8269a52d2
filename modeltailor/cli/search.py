"""``modeltailor search``: run a whole search in the foreground, no server, and write the front."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from modeltailor.cli import app

err = Console(stderr=True)


@app.command()
def search(
    model: Annotated[
        str, typer.Argument(help="A .pt2 archive (torch.export.save) or a zoo name (resnet20, ...).")
    ],
    data: Annotated[
        str, typer.Option("--data", help="An .npz (x_train, y_train, x_val, y_val) or mnist / digits.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Where to write the front JSON.")],
    device: Annotated[str, typer.Option("--device", help="Target device name.")] = "cpu-ort-1t",
    algorithm: Annotated[
        str, typer.Option("--algorithm", help="random, optuna-tpe, optuna-nsga2, ddpg, agmc, rule.")
    ] = "rule",
    budget: Annotated[int, typer.Option("--budget", min=1, help="Candidates to score.")] = 100,
    budget_seconds: Annotated[
        float | None, typer.Option("--budget-seconds", help="Stop after this long.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the agent, calibration and zoo training.")] = 0,
    max_latency_ms: Annotated[
        float | None, typer.Option("--max-latency-ms", help="Hard latency bound.")
    ] = None,
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option("--max-accuracy-drop", help="Largest drop below dense accuracy (0.01 = 1 point)."),
    ] = None,
    latency: Annotated[
        str,
        typer.Option(
            "--latency",
            help="auto (the device's predictor from `modeltailor calibrate` if it has one, else measured), "
            "predicted, measured (export + time each candidate) or macs-proxy (no measuring).",
        ),
    ] = "auto",
    reconstruct: Annotated[
        bool,
        typer.Option(
            "--reconstruct/--no-reconstruct",
            help="Re-fit layers whose inputs were pruned to the dense outputs before scoring "
            "(least squares; about twice the scoring time, far better accuracy when pruning channels).",
        ),
    ] = True,
    options: Annotated[
        str | None,
        typer.Option(
            "--options",
            help="Restrict the space: JSON with the keys of a job's `space` (see the example above).",
        ),
    ] = None,
) -> None:
    """Search per-layer compression policies of MODEL for DEVICE; write dense, candidates and Pareto front.

    Example, N:M sparsity and int8 only, no block skipping, channels in multiples of 16:

    \b
      modeltailor search model.pt2 --data data.npz --out front.json \\
        --options '{"schemes": ["nm"], "bits": [null, 8], "depth": false, "round_to": 16}'
    """
    from agents import AGENTS, Objective
    from compression.data import DataError, load_dataset
    from compression.model_io import ModelLoadError, ModelTraceError
    from compression.policy import PolicyError
    from compression.resolve import resolve_model
    from engine.device_latency import LATENCY_SOURCES, latency_callback
    from engine.search import Candidate, Progress, run_search
    from engine.spec import parse_space
    from latency_models.devices import DeviceError

    if algorithm not in AGENTS:
        err.print(f"[red]error:[/red] unknown algorithm {algorithm!r}; choose one of: {', '.join(AGENTS)}")
        raise typer.Exit(2)
    if latency not in LATENCY_SOURCES:
        err.print(f"[red]error:[/red] --latency must be one of {', '.join(LATENCY_SOURCES)}")
        raise typer.Exit(2)
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    try:
        space_options = parse_space(options).space_options() if options else None
    except ValueError as exc:
        err.print(f"[red]error:[/red] --options: {exc}")
        raise typer.Exit(2) from exc
    try:
        dataset = load_dataset(data)
        with err.status(f"loading {model} (a zoo model trains on first use)"):
            cmodel = resolve_model(model, dataset, seed=seed)
        callback, label = latency_callback(latency, device, cmodel)  # type: ignore[arg-type]
        err.print(f"latency: {label}")
        if latency == "macs-proxy":
            err.print(f"[yellow]warning:[/yellow] latency is a proxy, not measured: {label}")
        objective = Objective(max_latency_ms=max_latency_ms, max_accuracy_drop=max_accuracy_drop)
        with Bar(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[best]}"),
            TimeElapsedColumn(),
            console=err,
        ) as bar:
            task = bar.add_task(f"{algorithm} on {cmodel.name}", total=budget, best="")

            def progress(p: Progress) -> None:
                best = (
                    ""
                    if p.best_feasible_accuracy is None
                    else f"best feasible acc {p.best_feasible_accuracy:.4f}"
                )
                bar.update(task, completed=p.done, best=best)

            def candidate(c: Candidate) -> None:
                bar.update(task, completed=c.index + 1)

            result = run_search(
                cmodel,
                dataset,
                device_latency=callback,
                algorithm=algorithm,
                budget_candidates=budget,
                budget_seconds=budget_seconds,
                seed=seed,
                objective=objective,
                space_options=space_options,
                reconstruct=reconstruct,
                on_candidate=candidate,
                on_progress=progress,
            )
    # RuntimeError: torch's answer to a graph that fails on real data; a message, not a traceback.
    except (
        DataError,
        ModelLoadError,
        ModelTraceError,
        PolicyError,
        DeviceError,
        ValueError,
        RuntimeError,
    ) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    doc = {
        "model": cmodel.name,
        "device": device,
        "algorithm": algorithm,
        "seed": seed,
        "latency_source": label,
        "objective": result.objective.to_dict(),
        **result.to_dict(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    feasible = sum(c.feasible for c in result.candidates)
    err.print(
        f"{len(result.candidates)} candidates ({feasible} feasible), "
        f"{len(result.pareto)} on the Pareto front -> {out}  "
        f"(dense: accuracy {result.dense.score.accuracy:.4f}, "
        f"latency {result.dense.score.latency_ms:.4f} ms; {label})"
    )
