"""``modeltailor search``: run a whole search in the foreground, no server, and write the front."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from modeltailor.cli import app

if TYPE_CHECKING:
    from compression.data import Dataset
    from compression.model_io import CompressibleModel
    from compression.obc import Recovery
    from engine.finetune_front import FinetunedPoint
    from engine.search import SearchResult

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
    recovery: Annotated[
        str,
        typer.Option(
            "--recovery",
            help="obc (masks by OBS saliency and GPTQ rounding with weight updates, from each "
            "layer's Hessian on the calibration images) or magnitude (magnitude masks, round to "
            "nearest; cheaper per candidate).",
        ),
    ] = "obc",
    options: Annotated[
        str | None,
        typer.Option(
            "--options",
            help="Restrict the space: JSON with the keys of a job's `space` (see the example above).",
        ),
    ] = None,
    finetune_top_k: Annotated[
        int,
        typer.Option(
            "--finetune-top-k",
            min=0,
            max=50,
            help="After the search, fine-tune this many front points by distillation from the dense model "
            "(masks and quantizers held) and re-score them; 0 = off.",
        ),
    ] = 5,
    finetune_epochs: Annotated[
        float,
        typer.Option(
            "--finetune-epochs", min=0.001, max=50.0, help="Passes over the train split per fine-tuned point."
        ),
    ] = 2.0,
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
    from compression.obc import RECOVERIES
    from compression.policy import PolicyError
    from compression.resolve import resolve_model
    from engine.device_latency import LATENCY_SOURCES, latency_callback
    from engine.device_space import resolve_space, stored_capabilities
    from engine.finetune_front import rescored
    from engine.search import Candidate, Progress, run_search
    from engine.spec import SpaceSpec, parse_space
    from latency_models.devices import DeviceError

    if algorithm not in AGENTS:
        err.print(f"[red]error:[/red] unknown algorithm {algorithm!r}; choose one of: {', '.join(AGENTS)}")
        raise typer.Exit(2)
    if recovery not in RECOVERIES:
        err.print(f"[red]error:[/red] --recovery must be one of {', '.join(RECOVERIES)}")
        raise typer.Exit(2)
    how: Recovery = "obc" if recovery == "obc" else "magnitude"
    if latency not in LATENCY_SOURCES:
        err.print(f"[red]error:[/red] --latency must be one of {', '.join(LATENCY_SOURCES)}")
        raise typer.Exit(2)
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    try:
        space = parse_space(options) if options else SpaceSpec()
    except ValueError as exc:
        err.print(f"[red]error:[/red] --options: {exc}")
        raise typer.Exit(2) from exc
    # Unset round_to / schemes / bits follow what `modeltailor calibrate` measured on the device;
    # the search always minimises latency, so size-only choices are left out unless listed.
    resolved = resolve_space(space, stored_capabilities(device), latency_objective=True)
    space_options = resolved.options
    err.print(f"space: {resolved.note()}")
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
                recovery=how,
                on_candidate=candidate,
                on_progress=progress,
            )
            finetuned = _finetune(
                bar, cmodel, dataset, result, finetune_top_k, finetune_epochs, seed, reconstruct, how
            )
            if finetuned:
                result = rescored(result, {p.policy_hash: p.accuracy for p in finetuned})
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
        "space": resolved.to_dict(),
        "objective": result.objective.to_dict(),
        **result.to_dict(),
    }
    if finetuned:
        doc["finetune"] = {"top_k": finetune_top_k, "epochs": finetune_epochs}
        by_hash = {p.policy_hash: p.extra() for p in finetuned}
        for entry in (*doc["candidates"], *doc["pareto"]):  # both accuracies beside the better one
            entry.update(by_hash.get(entry["policy_hash"], {}))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    feasible = sum(c.feasible for c in result.candidates)
    for p in finetuned:
        tuned = "failed" if p.finetuned_accuracy is None else f"{p.finetuned_accuracy:.4f}"
        err.print(f"fine-tuned {p.policy_hash}: one-shot {p.one_shot_accuracy:.4f} -> {tuned}")
    err.print(
        f"{len(result.candidates)} candidates ({feasible} feasible), "
        f"{len(result.pareto)} on the Pareto front -> {out}  "
        f"(dense: accuracy {result.dense.score.accuracy:.4f}, "
        f"latency {result.dense.score.latency_ms:.4f} ms; {label})"
    )


def _finetune(
    bar: Any,
    model: CompressibleModel,
    dataset: Dataset,
    result: SearchResult,
    top_k: int,
    epochs: float,
    seed: int,
    reconstruct: bool,
    recovery: Recovery,
) -> list[FinetunedPoint]:
    """The search's top-k front points fine-tuned by distillation, with a progress bar per point."""
    from engine.finetune_front import FrontFinetuner, select
    from engine.spec import FinetuneSpec

    chosen = select(result.pareto, top_k)
    if not chosen:
        return []
    tuner = FrontFinetuner(
        model, dataset, FinetuneSpec(top_k=top_k, epochs=epochs),
        seed=seed,
        reconstruct=reconstruct,
        recovery=recovery,  # built as the search scored it (OBC masks), then fine-tuned
    )
    points = []
    for i, cand in enumerate(chosen, start=1):
        task = bar.add_task(f"fine-tuning {i}/{len(chosen)}", total=tuner.steps, best="")

        def progress(step: int, steps: int, loss: float, task: Any = task) -> None:
            bar.update(task, completed=step, best=f"loss {loss:.3f}")

        point = tuner.run(cand.policy, progress=progress)
        if point is not None:
            points.append(point)
    return points
