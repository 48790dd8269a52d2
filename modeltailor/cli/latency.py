"""``modeltailor calibrate`` and ``modeltailor predict``: a device's latency predictors from the shell.

``calibrate`` measures sampled compressed models on a local device, appends them to the
device's measurements, fits every predictor kind on all its measurements (a new version)
and prints their errors on held-out architectures. ``predict`` answers one policy in one
JSON line, optionally with a real measurement next to it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from modeltailor.cli import app

_TABLE_COLS = (
    ("mape", "MAPE %"),
    ("within_5pct", "±5 %"),
    ("within_10pct", "±10 %"),
    ("rmse_ms", "RMSE ms"),
    ("speedup_mape", "speedup MAPE %"),
    ("speedup_within_10pct", "speedup ±10 %"),
)


def metrics_table(doc: dict[str, object]) -> str:
    """Plain-text table of held-out metrics per predictor (one row each)."""
    preds = doc.get("predictors")
    assert isinstance(preds, dict)
    head = f"{'predictor':<12}" + "".join(f"{title:>16}" for _, title in _TABLE_COLS)
    lines = [head, "-" * len(head)]
    for kind, m in preds.items():
        lines.append(
            f"{kind:<12}" + "".join(f"{float(m.get(key, float('nan'))):>16.2f}" for key, _ in _TABLE_COLS)
        )
    return "\n".join(lines)


@app.command("calibrate")
def calibrate_cmd(
    device: Annotated[str, typer.Option("--device", help="Built-in device name, e.g. cpu-ort-1t.")],
    samples: Annotated[int, typer.Option("--samples", min=4, help="Compressed models to measure.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    runs: Annotated[int, typer.Option("--runs", min=5, help="Timed runs per model.")] = 100,
    target: Annotated[
        str, typer.Option("--target", help="Train on 'ratio' (to reference) or 'ms'.")
    ] = "ratio",
    statistic: Annotated[
        str,
        typer.Option(
            "--statistic",
            help="Statistic of the timed runs to learn: 'min' (steadiest on a shared machine), "
            "'p10' or 'median'.",
        ),
    ] = "min",
    fit_only: Annotated[
        bool, typer.Option("--fit-only", help="Measure nothing; refit on the stored measurements.")
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Focus on one model (a .pt2 or a zoo name): mostly its own random policies plus a "
            "quarter random architectures, as a service job calibrates (48 samples are typical); "
            "also prints the error on its held-out policies.",
        ),
    ] = None,
    data: Annotated[
        str,
        typer.Option("--data", help="With a zoo --model: the data set whose image shape it takes."),
    ] = "mnist",
) -> None:
    """Measure sampled models on DEVICE, fit its predictors, print held-out metrics."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from latency_models.calibrate import calibrate, fit_predictors
    from latency_models.devices import DeviceError, get_device
    from latency_models.store import DeviceStore

    if target not in ("ratio", "ms"):
        raise typer.BadParameter("--target must be 'ratio' or 'ms'")
    if statistic not in ("min", "p10", "median"):
        raise typer.BadParameter("--statistic must be 'min', 'p10' or 'median'")
    try:
        dev = get_device(device)
    except DeviceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    store = DeviceStore(dev.name)
    focus = _focus_plan(model, data, samples, seed) if model is not None and not fit_only else None
    from latency_models.load_guard import LoadGuard

    guard = LoadGuard()  # re-times or refuses samples timed under load; its counts go in the metrics
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    if not fit_only:
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(f"measuring on {dev.name}", total=samples)

            def progress(done: int, total: int, what: str) -> None:
                bar.update(task, completed=done, description=f"{dev.name}: {what[:48]}")

            plan = focus[1] if focus is not None else None
            calibrate(
                dev, samples, seed=seed, progress=progress, runs=runs, store=store, plan=plan, guard=guard
            )
        if guard.retried:
            typer.echo(
                f"timed under load: {guard.retried} of {guard.samples} samples re-timed, "
                f"{guard.refused} refused (reference > {100 * guard.max_drift:.0f} % slower than the "
                "calibration's recent median)",
                err=True,
            )
    capabilities = _capabilities(dev, store, measure=not fit_only)
    records = store.records()
    if len({r.arch_id for r in records}) < 2:
        typer.echo(
            f"error: {len(records)} measurements of fewer than two architectures: measure more", err=True
        )
        raise typer.Exit(code=2)
    typer.echo(f"fitting predictors on {len(records)} measurements ({store.measurements})", err=True)
    _, doc, version = fit_predictors(
        records,
        target=target,  # type: ignore[arg-type]
        seed=seed,
        store=store,
        statistic=statistic,
        extra={
            **({"capabilities": capabilities} if capabilities else {}),
            **({"noise": guard.summary()} if not fit_only else {}),
        },
    )
    typer.echo(f"device {dev.name}: predictor version {version}, default {doc['default']}")
    if capabilities:
        typer.echo(
            f"channel multiple its kernels reward: {capabilities['round_to']}; size-only schemes (no "
            f"faster than dense): {', '.join(capabilities['size_only']) or 'none'}"
        )
    held = doc["predictors"][doc["default"]]  # type: ignore[index]
    typer.echo(
        f"held-out: {held['n']:.0f} measurements of {held['n_arch']:.0f} architectures never seen in "
        f"training (trained on {held['n_train']:.0f} of {held['n_train_arch']:.0f}); statistic {statistic}"
    )
    typer.echo(metrics_table(doc))
    if focus is not None:
        from latency_models.focus import focus_metrics

        got = focus_metrics(records, focus[0], str(doc["default"]), seed=seed)
        if got is not None:
            typer.echo(
                f"{focus[0]}: {got['within_10pct']:.1f} % of held-out policies within ±10 % "
                f"(MAPE {got['mape']:.1f} %, {doc['default']})"
            )


def _capabilities(dev: Any, store: Any, *, measure: bool) -> dict[str, Any] | None:
    """What the device accelerates: measured now, or (``--fit-only``) kept from the newest version."""
    if not measure:
        return store.metrics().get("capabilities") if store.versions() else None
    from latency_models.calibration_run import local_capabilities

    typer.echo(f"measuring what {dev.name} accelerates (channel multiples, schemes)", err=True)
    try:
        return local_capabilities(dev).to_dict()
    except Exception as exc:  # the predictor is still worth fitting
        typer.echo(f"warning: capabilities not measured: {exc}", err=True)
        return None


def _focus_plan(model: str, data: str, samples: int, seed: int) -> tuple[str, Any]:
    """(space id, focused sampling plan) of ``model``: a zoo name (built untrained at the data
    set's shape: latency needs no trained weights) or a .pt2 archive. Exits 2 on bad input."""
    import torch

    from compression.data import DataError, load_dataset
    from compression.model_io import ModelLoadError, ModelTraceError, from_module, load_pt2
    from compression.zoo import ZOO, build_model
    from latency_models.focus import focused_plan, model_ids

    try:
        if model in ZOO:
            ds = load_dataset(data)
            c, h = ds.x_val.shape[1], ds.x_val.shape[2]
            module = build_model(model, in_channels=c, image_size=h, num_classes=ds.num_classes)
            cm = from_module(module.eval(), torch.randn(2, c, h, ds.x_val.shape[3]), model)
            arch, space_id = model_ids(cm, None, model)
        else:
            cm = load_pt2(model)
            digest = hashlib.sha256(Path(model).read_bytes()).hexdigest()
            arch, space_id = model_ids(cm, digest, None)
    except (DataError, ModelLoadError, ModelTraceError, OSError, ValueError) as exc:
        typer.echo(f"error: --model {model}: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    return space_id, focused_plan(cm, arch, space_id, samples, seed=seed)


@app.command("predict")
def predict_cmd(
    model: Annotated[Path, typer.Argument(help="A torch.export archive (.pt2).")],
    policy: Annotated[Path, typer.Option("--policy", help="Policy JSON file.")],
    device: Annotated[str, typer.Option("--device", help="Device whose predictor to use.")],
    measure: Annotated[bool, typer.Option("--measure", help="Also measure on the device.")] = False,
    version: Annotated[
        int | None, typer.Option("--version", help="Predictor version (default latest).")
    ] = None,
    kind: Annotated[str | None, typer.Option("--predictor", help="Predictor kind (default: best).")] = None,
) -> None:
    """Print one JSON line: predicted latency_ms, predictor version, its held-out ±10 % figure."""
    from compression.model_io import ModelLoadError, load_pt2
    from compression.policy import Policy, PolicyError
    from compression.space_builder import space_for
    from latency_models.sampling import SPACE_OPTIONS
    from latency_models.store import DeviceStore

    try:
        cm = load_pt2(model)
        space = space_for(cm, SPACE_OPTIONS)
        pol = space.validate(Policy.from_json(policy.read_text()))
        predictor, ver, used = DeviceStore(device).load(version, kind)
    except (ModelLoadError, PolicyError, FileNotFoundError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    latency = float(predictor.predict(space, [pol])[0])
    out: dict[str, object] = {
        "device": device,
        "latency_ms": round(latency, 6),
        "predictor": used,
        "predictor_version": ver,
        "holdout_within_10pct": predictor.metrics.get("within_10pct"),
        "holdout_speedup_within_10pct": predictor.metrics.get("speedup_within_10pct"),
        "holdout_mape": predictor.metrics.get("mape"),
        "statistic": predictor.statistic,
    }
    if measure:
        from latency_models.calibrate import export_for_device
        from latency_models.devices import get_device
        from latency_models.harness import measure as harness_measure

        dev = get_device(device)
        with tempfile.TemporaryDirectory(prefix="mt-predict-") as tmp:
            runnable, shape, int8 = export_for_device(cm, space, pol, dev, Path(tmp) / "model.onnx")
            m = harness_measure(runnable, dev, input_shape=shape)
        out["measured_ms"] = round(m.statistic(predictor.statistic)[0], 6)
        out["measured_median_ms"] = round(m.median_ms, 6)
        out["int8"] = int8
    sys.stdout.write(json.dumps(out) + "\n")
