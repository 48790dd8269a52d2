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
    from compression.space import SpaceOptions
    from engine.active_measurement import ActiveMeasurer, JobPredictor
    from engine.finetune_front import FinetunedPoint
    from engine.job import LoadedPredictor
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
    active_measurement: Annotated[
        bool,
        typer.Option(
            "--active-measurement/--no-active-measurement",
            help="With the device's stored predictor: time --topup policies of MODEL first when the "
            "device never measured it, and during the search time the front points and the candidates "
            "the predictor is least sure about (at most --active-max, 15 %% of --budget), refitting the "
            "predictor after each round (each refit is a new version in the device's store). "
            "--no-active-measurement searches on the stored predictor as it is.",
        ),
    ] = True,
    active_max: Annotated[
        int, typer.Option("--active-max", min=0, max=500, help="Most candidates timed during the search.")
    ] = 30,
    topup: Annotated[
        int,
        typer.Option(
            "--topup",
            min=0,
            max=2000,
            help="Policies of MODEL timed before the search when the device never measured it (0 = none).",
        ),
    ] = 16,
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
        loop = None
        if active_measurement and label.startswith("predicted"):
            loop = _calibration_in_loop(
                cmodel, model, device, space_options, seed, budget, budget_seconds, topup, active_max
            )
            callback = loop.jp.live
            label = loop.label(label)
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
                rescore=loop.jp.rescore if loop is not None else None,
                between_rounds=loop.active.between_rounds if loop is not None and loop.active else None,
            )
            if loop is not None:
                result = loop.finish(result)
                label = loop.label(label)
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
    if loop is not None:
        loop.annotate(doc)
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
        model,
        dataset,
        FinetuneSpec(top_k=top_k, epochs=epochs),
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


class _Loop:
    """Calibration in the loop on a local device (``engine.active_measurement``): the predictor
    the search scores with, its measuring rounds, and what they add to the front JSON."""

    def __init__(
        self, jp: JobPredictor, active: ActiveMeasurer | None, topup: dict[str, Any] | None, stored: int
    ) -> None:
        self.jp = jp
        self.active = active
        self.topup = topup
        self.stored_version = stored

    def finish(self, result: SearchResult) -> SearchResult:
        """The dense reference on the search's last predictor."""
        import dataclasses

        from compression.policy import Policy

        ms, _std = self.jp.predict([Policy.dense()])
        dense = dataclasses.replace(result.dense.score, latency_ms=float(ms[0]))
        return dataclasses.replace(result, dense=dataclasses.replace(result.dense, score=dense))

    def label(self, label: str) -> str:
        """The stored predictor's label, and the version the search ended on when it refitted."""
        if self.jp.version == self.stored_version:
            return label
        return f"{label.split('; refitted')[0]}; refitted to v{self.jp.version} on this model's measurements"

    def annotate(self, doc: dict[str, Any]) -> None:
        """Each entry's predicted std and measurement; the top-up and the rounds' report."""
        doc["predictor_version"] = self.jp.version
        if self.topup is not None:
            doc["topup"] = self.topup
        if self.active is not None:
            doc["active_measurement"] = self.active.report()
        for entry in (*doc["candidates"], *doc["pareto"]):
            h = entry["policy_hash"]
            std = self.jp.std_of(h)
            if std is not None:
                entry["latency_std_ms"] = std
            got = self.active.measured.get(h) if self.active is not None else None
            if got is not None:
                entry["active"] = got
                entry["measured_latency_ms"] = got.get("measured_ms")


def _calibration_in_loop(
    cmodel: CompressibleModel,
    spec: str,
    device: str,
    options: SpaceOptions,
    seed: int,
    budget: int,
    budget_seconds: float | None,
    topup_n: int,
    active_max: int,
) -> _Loop:
    """The local device's stored predictor, topped up with MODEL when the device never measured
    it, and the measurer of the search's rounds (None when --active-max is 0)."""
    from compression.space_builder import space_for
    from engine.active_measurement import ActiveMeasurer, JobPredictor, topup
    from engine.local_measuring import LocalMeasuringDevice, cli_model_ids, load_stored, model_seen
    from engine.spec import ActiveMeasurementSpec
    from latency_models.devices import get_device
    from latency_models.store import DeviceStore

    store = DeviceStore(device)
    stored = load_stored(store)
    assert stored is not None  # the label said "predicted"
    loaded: LoadedPredictor = stored
    measuring = LocalMeasuringDevice(get_device(device), store, seed=seed)
    ids = cli_model_ids(cmodel, spec)
    space = space_for(cmodel, options)
    report = None
    if topup_n > 0 and not model_seen(store, ids[1]):
        with err.status(f"topping up: timing {topup_n} policies of {cmodel.name} on {device}") as status:

            def progress(done: int, total: int) -> None:
                status.update(f"topping up: {done}/{total} policies of {cmodel.name} timed on {device}")

            done = topup(measuring, cmodel, ids, space, loaded, topup_n, seed=seed, progress=progress)
        report = done.report
        errors = report.get("error_before_refit") or {}
        err.print(
            f"topped up: {report.get('measured', 0)} policies of {cmodel.name} timed on {device}"
            + (
                f", speedup MAPE {errors['speedup_mape']:.1f} % before the refit"
                if "speedup_mape" in errors
                else ""
            )
            + (
                f"; predictor v{done.loaded.version}"
                if "version" in report
                else f"; {report.get('note', '')}"
            )
        )
        loaded = done.loaded
    jp = JobPredictor(loaded, space)
    active = None
    spec_active = ActiveMeasurementSpec(max=active_max)  # the job's default share of the budget
    if spec_active.on:

        def rounds(data: dict[str, Any]) -> None:
            last = data.get("last_round") or {}
            errors = last.get("error_before_refit") or {}
            err.print(
                f"measured {last.get('measured', 0)} candidates on {device} (round {data['rounds']}/"
                f"{data['rounds_planned']})"
                + (
                    f", speedup MAPE {errors['speedup_mape']:.1f} % before the refit"
                    if "speedup_mape" in errors
                    else ""
                )
                + f"; predictor v{data['predictor_version']}"
                + (f"; {data['note']}" if data.get("note") else "")
            )

        active = ActiveMeasurer(
            spec_active,
            device=measuring,
            model=cmodel,
            ids=ids,
            predictor=jp,
            budget_candidates=budget,
            budget_seconds=budget_seconds,
            progress=rounds,
        )
    return _Loop(jp, active, report, stored.version)
