"""``modeltailor family``: K nested operating points sharing one weight set, as one bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from modeltailor.cli import app

err = Console(stderr=True)


@app.command()
def family(
    model: Annotated[
        str, typer.Argument(help="A .pt2 archive (torch.export.save) or a zoo name (resnet20, ...).")
    ],
    data: Annotated[
        str, typer.Option("--data", help="An .npz (x_train, y_train, x_val, y_val) or mnist / digits.")
    ],
    out: Annotated[Path, typer.Option("--out", help="The bundle folder to write.")],
    budgets: Annotated[
        str,
        typer.Option(
            "--budgets", help="Latency budgets as fractions of the dense latency, strictly decreasing."
        ),
    ] = "1.0,0.7,0.5,0.35",
    device: Annotated[str, typer.Option("--device", help="Target device name.")] = "cpu-ort-1t",
    latency: Annotated[
        str,
        typer.Option(
            "--latency",
            help="Latency during the search: auto (the device's predictor if it has one, else measured), "
            "predicted, measured or macs-proxy. The bundle's points are always measured.",
        ),
    ] = "auto",
    budget: Annotated[
        int | None, typer.Option("--budget", min=1, help="Most candidates to score (default: no limit).")
    ] = None,
    recovery: Annotated[
        str,
        typer.Option(
            "--recovery",
            help="How the shared weights are fitted: joint (one least-squares refit for every point), "
            "largest (the first point's refit, shared) or none.",
        ),
    ] = "joint",
    finetune_steps: Annotated[
        int,
        typer.Option(
            "--finetune-steps", min=0, help="Joint distillation steps (all points in each step); 0 = off."
        ),
    ] = 0,
    runs: Annotated[
        int, typer.Option("--runs", min=10, help="Timed runs per point, interleaved with dense.")
    ] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Seed of calibration and zoo training.")] = 0,
    options: Annotated[
        str | None,
        typer.Option("--options", help="Restrict the space: JSON with the keys of a job's `space`."),
    ] = None,
) -> None:
    """Search nested policies of MODEL for each latency budget on DEVICE, share their weights and
    write one bundle: weights.bin once, point_<k>.onnx per point, family.json with each point's
    measured latency and accuracy (run it with modeltailor.switch.FamilySwitch).

    \b
      modeltailor family resnet20 --data mnist --budgets 1,0.7,0.5,0.35 --out r20-family
    """
    from compression.data import DataError, load_dataset
    from compression.family import FAMILY_RECOVERIES
    from compression.model_io import ModelLoadError, ModelTraceError
    from compression.onnx_export import ExportError
    from compression.policy import PolicyError
    from compression.resolve import resolve_model
    from engine.device_latency import LATENCY_SOURCES, latency_callback
    from engine.device_space import resolve_space, stored_capabilities
    from engine.family import check_budgets, make_family
    from engine.spec import SpaceSpec, parse_space
    from latency_models.devices import DeviceError

    try:
        fractions = check_budgets([float(b) for b in budgets.split(",") if b.strip()])
    except ValueError as exc:
        err.print(f"[red]error:[/red] --budgets: {exc}")
        raise typer.Exit(2) from exc
    if recovery not in FAMILY_RECOVERIES:
        err.print(f"[red]error:[/red] --recovery must be one of {', '.join(FAMILY_RECOVERIES)}")
        raise typer.Exit(2)
    if latency not in LATENCY_SOURCES:
        err.print(f"[red]error:[/red] --latency must be one of {', '.join(LATENCY_SOURCES)}")
        raise typer.Exit(2)
    try:
        space = parse_space(options) if options else SpaceSpec()
    except ValueError as exc:
        err.print(f"[red]error:[/red] --options: {exc}")
        raise typer.Exit(2) from exc
    resolved = resolve_space(space, stored_capabilities(device), latency_objective=True)
    err.print(f"space: {resolved.note()}")

    def progress(phase: str, info: dict[str, Any]) -> None:
        if phase == "search":
            if info["candidates"] % 10 == 0:
                err.print(f"search: {info['candidates']} candidates scored")
        elif phase == "finetune":
            err.print(f"finetune: step {info['step']}/{info['steps']} loss {info['loss']:.4f}")
        else:
            err.print(f"{phase}: {json.dumps(info)}")

    try:
        dataset = load_dataset(data)
        with err.status(f"loading {model} (a zoo model trains on first use)"):
            cmodel = resolve_model(model, dataset, seed=seed)
        callback, label = latency_callback(latency, device, cmodel)  # type: ignore[arg-type]
        err.print(f"latency: {label}")
        report = make_family(
            cmodel,
            dataset,
            device=device,
            device_latency=callback,
            budgets=fractions,
            out=out,
            latency_label=label,
            space_options=resolved.options,
            budget_candidates=budget,
            seed=seed,
            recovery=recovery,  # type: ignore[arg-type]
            finetune_steps=finetune_steps,
            runs=runs,
            progress=progress,
        )
    except (
        DataError,
        ModelLoadError,
        ModelTraceError,
        PolicyError,
        DeviceError,
        ExportError,
        ValueError,
        RuntimeError,
    ) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    m = report.manifest
    if m["note"]:
        err.print(f"[yellow]note:[/yellow] {m['note']}")
    err.print(f"dense: accuracy {m['dense']['accuracy']:.4f}, {m['dense']['latency_ms']:.4f} ms")
    for p in m["points"]:
        err.print(
            f"point {p['index']} (budget {p['budget']:.2f}): accuracy {p['accuracy']:.4f}, "
            f"{p['latency_ms']:.4f} ms measured ({p['speedup']:.2f}x dense), {p['file']}"
        )
    sizes = m["sizes"]
    err.print(
        f"bundle {sizes['bundle_bytes']} bytes = {sizes['bundle_over_largest']:.2f}x the largest point, "
        f"{sizes['bundle_over_separate']:.2f}x the {len(m['points'])} separate files -> {out}"
    )
    typer.echo(json.dumps({"bundle": str(out), "points": len(m["points"]), "sizes": sizes}))
