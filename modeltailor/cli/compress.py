"""``modeltailor compress``: apply one policy, measure it, export it — no server needed."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from modeltailor.cli import app

err = Console(stderr=True)


@app.command()
def compress(
    model: Annotated[
        str, typer.Argument(help="A .pt2 archive (torch.export.save) or a zoo name (resnet20, ...).")
    ],
    policy: Annotated[Path, typer.Option("--policy", help="Policy JSON file.", exists=True, dir_okay=False)],
    data: Annotated[
        str, typer.Option("--data", help="An .npz (x_train, y_train, x_val, y_val) or mnist / digits.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Where to write the ONNX model.")],
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Export every layer int8 QDQ (static, calibrated). Without it, layers whose policy "
            "sets bits run int8 (4-bit MatMulNBits for linear layers with bits <= 4) and the rest float.",
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for zoo training and calibration batches.")] = 0,
    calib_batches: Annotated[int, typer.Option(help="BatchNorm recalibration batches of 64.")] = 8,
    reconstruct: Annotated[
        bool,
        typer.Option(
            "--reconstruct/--no-reconstruct",
            help="Re-fit layers whose inputs were pruned to the dense outputs (least squares).",
        ),
    ] = True,
    recovery: Annotated[
        str,
        typer.Option(
            "--recovery",
            help="obc (masks by OBS saliency and GPTQ rounding with weight updates, from each "
            "layer's Hessian on the calibration images) or magnitude (magnitude masks, round to nearest).",
        ),
    ] = "obc",
) -> None:
    """Apply POLICY to MODEL, recalibrate BatchNorm, evaluate on x_val, export ONNX; print one JSON line."""
    from compression import Policy, PolicyError, measure
    from compression import compress as apply_and_calibrate
    from compression.apply import apply_policy
    from compression.data import DataError, calibration_batches, load_dataset
    from compression.evaluate import accuracy
    from compression.model_io import ModelLoadError, ModelTraceError
    from compression.obc import RECOVERIES, Recovery
    from compression.onnx_export import export_onnx, onnx_accuracy
    from compression.resolve import resolve_model

    if recovery not in RECOVERIES:
        err.print(f"[red]error:[/red] --recovery must be one of {', '.join(RECOVERIES)}")
        raise typer.Exit(2)
    how: Recovery = "obc" if recovery == "obc" else "magnitude"
    layer_precision: Mapping[str, str] = {}
    try:
        dataset = load_dataset(data)
        pol = Policy.from_json(policy.read_text())
        with err.status(f"loading {model} (a zoo model trains on first use)"):
            cmodel = resolve_model(model, dataset, seed=seed)
        calib = calibration_batches(dataset, calib_batches, 64, seed=seed)
        with err.status("applying the policy and recalibrating BatchNorm"):
            dense = apply_policy(cmodel, Policy.dense())
            dense_acc = accuracy(dense.gm, dataset.x_val, dataset.y_val)
            dense_m = measure(dense)
            estimate_policy = pol
            if int8:  # the fake-quant estimate of what int8 ONNX Runtime will run
                raw = pol.to_dict()
                raw["default"]["bits"] = raw["default"]["bits"] or 8
                for spec in raw["layers"].values():
                    spec["bits"] = spec["bits"] or 8
                raw["act_bits"] = 8
                estimate_policy = Policy.from_dict(raw)
            cm = apply_and_calibrate(cmodel, estimate_policy, calib, reconstruct=reconstruct, recovery=how)
            acc = accuracy(cm.gm, dataset.x_val, dataset.y_val)
            m = measure(cm)
        with err.status(f"exporting {'int8 QDQ' if int8 else 'fp32'} ONNX"):
            float_cm = (
                apply_and_calibrate(cmodel, pol, calib, reconstruct=reconstruct, recovery=how) if int8 else cm
            )
            example = cmodel.example_input(2)
            if int8:
                from compression.quantize_onnx import quantize_int8

                with tempfile.TemporaryDirectory() as tmp:
                    fp32 = export_onnx(float_cm.gm, example, Path(tmp) / "fp32.onnx")
                    quantize_int8(fp32, (b.numpy() for b in calib), out)
            elif cm.bits:  # each layer at its policy's precision, as the service's export
                from compression.mixed_precision import export_policy_onnx, float_graph

                with tempfile.TemporaryDirectory() as tmp:
                    fp32 = export_onnx(float_graph(cm.gm), example, Path(tmp) / "fp32.onnx")
                    _, layer_precision = export_policy_onnx(cm, fp32, [b.numpy() for b in calib], out)
            else:
                export_onnx(float_cm.gm, example, out)
            onnx_acc = onnx_accuracy(out, dataset.x_val, dataset.y_val)
    # RuntimeError (ExportError is one): torch's answer to a graph that fails on real data. A CLI
    # user gets its message, not a traceback.
    except (PolicyError, DataError, ModelLoadError, ModelTraceError, ValueError, RuntimeError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    result = {
        "model": cmodel.name,
        "policy_hash": pol.hash,
        "accuracy": round(acc, 5),
        "dense_accuracy": round(dense_acc, 5),
        "onnx_accuracy": round(onnx_acc, 5),
        "macs": m.macs,
        "effective_macs": m.effective_macs,
        "dense_macs": dense_m.macs,
        "size_bytes": m.size_bytes,
        "dense_size_bytes": dense_m.size_bytes,
        "params": m.params,
        "int8": int8,
        "layer_precision": dict(layer_precision),  # layers run quantized: "int8" / "int4"
        "onnx": str(out),
    }
    sys.stdout.write(json.dumps(result) + "\n")


@app.command()
def space(
    model: Annotated[
        str, typer.Argument(help="A .pt2 archive (torch.export.save) or a zoo name (resnet20, ...).")
    ],
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Data set a zoo model is trained on (mnist, digits or an .npz); for a .pt2 it only "
            "checks that the images fit the model.",
        ),
    ] = None,
    options: Annotated[
        str | None,
        typer.Option(
            "--options",
            help="Restrict the space: JSON with the keys of a job's `space` (see the example above).",
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="Resolve the space for this device as a latency search would: its measured channel "
            "multiple as round_to, schemes it runs no faster than dense marked size-only (and left out "
            "unless --options lists them). Needs `modeltailor calibrate --device NAME` first.",
        ),
    ] = None,
) -> None:
    """Print MODEL's search space as JSON: layers with features and allowed choices, skippable blocks.

    Example, N:M sparsity and int8 only, no block skipping:

    \b
      modeltailor space model.pt2 --options '{"schemes": ["nm"], "bits": [null, 8], "depth": false}'
    """
    from compression import PolicyError
    from compression.data import DataError, load_dataset
    from compression.model_io import ModelLoadError, ModelTraceError, load_pt2
    from compression.resolve import resolve_model
    from compression.space import SpaceOptions
    from compression.space_builder import space_for
    from compression.zoo import ZOO
    from engine.device_space import resolve_space, stored_capabilities
    from engine.spec import SpaceSpec, parse_space

    try:
        spec = parse_space(options) if options else SpaceSpec()
        opts = spec.space_options() if options else SpaceOptions()
        on_device: dict[str, object] = {}
        if device is not None:
            caps = stored_capabilities(device)
            resolved = resolve_space(spec, caps, latency_objective=True)
            opts = resolved.options
            on_device = {"device": {"name": device, "measured": caps is not None, **resolved.to_dict()}}
            err.print(f"{device}: {resolved.note()}")
        if model in ZOO or data is not None:
            dataset = load_dataset(data or "mnist")
            with err.status(f"loading {model} (a zoo model trains on first use)"):
                cmodel = resolve_model(model, dataset)
        else:
            cmodel = load_pt2(model)
        result = space_for(cmodel, opts).to_dict()
    except (PolicyError, DataError, ModelLoadError, ModelTraceError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    sys.stdout.write(
        json.dumps({"model": cmodel.name, "input_shape": list(cmodel.input_shape), **result, **on_device})
        + "\n"
    )
