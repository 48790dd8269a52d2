"""Deployable files for the device runtimes other than ONNX Runtime: ExecuTorch and OpenVINO.

* ``executorch``: a ``.pte`` program lowered with the XNNPACK delegate
  (``to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])``). int8 layers
  are quantized with PT2E and the XNNPACK quantizer (int8 per-channel symmetric weights,
  int8 activations calibrated on real data). Ops XNNPACK does not take (LayerNorm, 4-D
  matmuls of attention) run on ExecuTorch's portable kernels.
* ``openvino``: OpenVINO IR (``model.xml`` + ``model.bin``) converted with
  ``ov.convert_model(exported_program)``, stored as ONE zip file holding exactly those two
  members (uncompressed), so a task or a download carries a single file; unzip it for
  OpenVINO's own tools. int8 layers are quantized with NNCF (``nncf.quantize``), fp32 layers
  excluded by name.

Both files have a static batch-1 input: they are what the device times and runs. Per-layer
precision: the layers named in ``int8_layers`` (a policy's layers with ``bits``) run int8,
every other layer float32; ``int8_layers="all"`` quantizes every supported op.

Layer names are the policy's (the module path of a layer's weight). The exported graph keeps
them as the targets of the weights' ``get_attr`` nodes (ExecuTorch), while OpenVINO folds
BatchNorm into the convolution weights while converting and renames the nodes, so there a
layer is found by its weight: the OpenVINO constant equal to it up to a per-output-channel
scale.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.fx as fx

from compression.policy import Policy
from compression.space import SearchSpace
from compression.tracing import TRACE_LOCK

__all__ = [
    "EXPORT_RUNTIMES",
    "OPENVINO_MEMBERS",
    "Int8Layers",
    "RuntimeExportError",
    "compressed_int8_layers",
    "export_for_runtime",
    "int8_layer_names",
    "keepdim_global_means",
    "runtime_suffix",
    "to_executorch",
    "to_openvino",
]

log = logging.getLogger(__name__)

#: Runtimes this module writes files for, and the file suffix of each.
EXPORT_RUNTIMES: dict[str, str] = {"executorch": ".pte", "openvino": ".zip"}
#: The members of an OpenVINO IR zip, in this order.
OPENVINO_MEMBERS: tuple[str, str] = ("model.xml", "model.bin")
#: Calibration samples (batch 1 each) used for int8 activation ranges.
MAX_CALIBRATION_SAMPLES = 32

Int8Layers = Iterable[str] | Literal["all"] | None

_CONV_LINEAR = {
    torch.ops.aten.conv2d.default,
    torch.ops.aten.conv1d.default,
    torch.ops.aten.linear.default,
    torch.ops.aten.convolution.default,
}


class RuntimeExportError(RuntimeError):
    """A model that could not be written for a runtime (names the runtime and the cause)."""


def runtime_suffix(runtime: str) -> str:
    """The file suffix of ``runtime``'s deployable file."""
    try:
        return EXPORT_RUNTIMES[runtime]
    except KeyError:
        raise RuntimeExportError(
            f"no file export for runtime {runtime!r}; this module writes {sorted(EXPORT_RUNTIMES)}"
        ) from None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print deprecation warnings and progress by the page: keep them out of logs."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        nncf_log = logging.getLogger("nncf")
        level = nncf_log.level
        nncf_log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            nncf_log.setLevel(level)


def _batches(calibration: Iterable[Any] | None, example: torch.Tensor) -> list[torch.Tensor]:
    """Calibration inputs split into batch-1 tensors shaped like ``example`` (the file's input)."""
    out: list[torch.Tensor] = []
    for batch in calibration or ():
        t = torch.as_tensor(np.asarray(batch, dtype=np.float32))
        if t.dim() == example.dim() - 1:
            t = t.unsqueeze(0)
        if tuple(t.shape[1:]) != tuple(example.shape[1:]):
            raise RuntimeExportError(
                f"calibration batch of shape {tuple(t.shape)} does not fit the model input "
                f"{tuple(example.shape)}: pass batches of [batch, {', '.join(map(str, example.shape[1:]))}]"
            )
        out.extend(t[i : i + 1].contiguous() for i in range(t.shape[0]))
        if len(out) >= MAX_CALIBRATION_SAMPLES:
            break
    return out[:MAX_CALIBRATION_SAMPLES]


def keepdim_global_means(gm: fx.GraphModule) -> int:
    """Rewrite ``mean(x, [H, W])`` of a 4-D ``x`` as ``mean(x, [H, W], keepdim=True)`` + reshape.

    XNNPACK takes a global average pool only in its keepdim form; without it the mean stays
    on ExecuTorch's portable kernel and splits the delegated graph in two. Returns how many
    nodes were rewritten (the graph is changed in place).
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.mean.dim:
            continue
        x = node.args[0]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if keepdim or not isinstance(val, torch.Tensor) or val.dim() != 4 or dims is None:
            continue
        if sorted(int(d) % 4 for d in dims) != [2, 3]:
            continue
        with gm.graph.inserting_after(node):
            kept = gm.graph.call_function(torch.ops.aten.mean.dim, (x, [-1, -2], True))
        with gm.graph.inserting_after(kept):
            flat = gm.graph.call_function(torch.ops.aten.flatten.using_ints, (kept, 1))
        node.replace_all_uses_with(flat)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _export(module: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """A static-shape export of ``module`` at ``example`` (batch 1: what the device times)."""
    if not isinstance(module, fx.GraphModule):
        module = module.eval()
    try:
        with TRACE_LOCK, _quiet():
            ep = torch.export.export(module, (example,))
            gm = ep.module()
            if keepdim_global_means(gm):  # type: ignore[arg-type]
                ep = torch.export.export(gm, (example,))
    except Exception as exc:
        raise RuntimeExportError(f"torch.export could not trace the model: {exc}") from exc
    return ep


def _int8_filter(gm: fx.GraphModule, layers: set[str]) -> dict[fx.Node, bool]:
    """Which nodes may be quantized: the weight layers named in ``layers``, and the ops fed
    (directly or through other such ops) by them; ops fed only by float layers stay float."""
    inside: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            inside[node] = False
            continue
        weight = node.args[1] if len(node.args) > 1 else None
        if node.target in _CONV_LINEAR and isinstance(weight, fx.Node) and weight.op == "get_attr":
            inside[node] = str(weight.target).removesuffix(".weight") in layers
        else:
            inside[node] = any(inside.get(a, False) for a in node.all_input_nodes)
    return inside


def _layer_names(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Layer name -> weight of every conv / linear node of ``gm``."""
    out: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        weight = node.args[1] if node.op == "call_function" and len(node.args) > 1 else None
        if node.target in _CONV_LINEAR and isinstance(weight, fx.Node) and weight.op == "get_attr":
            out[str(weight.target).removesuffix(".weight")] = _attr(gm, str(weight.target)).detach()
    return out


def _attr(gm: torch.nn.Module, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return torch.as_tensor(obj)


def _wanted(int8_layers: Int8Layers, known: Iterable[str]) -> set[str]:
    if int8_layers is None:
        return set()
    if int8_layers == "all":
        return set(known)
    wanted = {str(n) for n in int8_layers}
    unknown = wanted - set(known)
    if unknown:
        raise RuntimeExportError(
            f"int8 layer(s) {sorted(unknown)[:5]} are not conv / linear layers of the model; "
            f"its layers: {sorted(known)[:12]}"
        )
    return wanted


# --------------------------------------------------------------------------- ExecuTorch


def to_executorch(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    int8_layers: Int8Layers = None,
    calibration: Iterable[Any] | None = None,
) -> Path:
    """Write ``module`` as an ExecuTorch ``.pte`` lowered to XNNPACK; return ``path``.

    Args:
        module: the (compressed) model; ``example`` (batch 1) fixes the file's input shape.
        path: destination ``.pte`` file.
        int8_layers: layer names to run int8 (PT2E, XNNPACK quantizer), ``"all"``, or None.
        calibration: input batches for the int8 activation ranges (needed with int8 layers).

    Raises:
        RuntimeExportError: tracing, quantization or lowering failed (says which).
    """
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as exc:
        raise RuntimeExportError(
            f"ExecuTorch is not installed ({exc}): pip install 'modeltailor[runtimes]'"
        ) from exc
    example = example[:1].contiguous()
    ep = _export(module, example)
    gm = ep.module()
    wanted = _wanted(int8_layers, _layer_names(gm))  # type: ignore[arg-type]
    if wanted:
        ep = _pt2e_int8(gm, example, wanted, _batches(calibration, example))  # type: ignore[arg-type]
    try:
        with TRACE_LOCK, _quiet():
            program = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    except Exception as exc:
        raise RuntimeExportError(f"ExecuTorch could not lower the model to XNNPACK: {exc}") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(program.buffer)
    return path


def _pt2e_int8(
    gm: fx.GraphModule, example: torch.Tensor, layers: set[str], batches: list[torch.Tensor]
) -> torch.export.ExportedProgram:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not batches:
        raise RuntimeExportError("int8 layers need calibration batches (real inputs) for activation ranges")
    # By node name: prepare_pt2e folds BatchNorm into new weight nodes before it annotates.
    allowed = {n.name: ok for n, ok in _int8_filter(gm, layers).items() if n.op == "call_function"}
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    quantizer.set_filter_function(lambda n: allowed.get(n.name, n.op != "call_function"))
    try:
        with TRACE_LOCK, _quiet():
            prepared = prepare_pt2e(gm, quantizer)
            with torch.no_grad():
                for x in batches:
                    prepared(x)
            converted = convert_pt2e(prepared)
            return torch.export.export(converted, (example,))
    except Exception as exc:
        raise RuntimeExportError(f"PT2E int8 quantization for XNNPACK failed: {exc}") from exc


# --------------------------------------------------------------------------- OpenVINO


def _rows_match(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``b`` equals ``a`` up to a positive or negative scale per output row."""
    if a.shape != b.shape:
        return False
    a2, b2 = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    na, nb = np.linalg.norm(a2, axis=1), np.linalg.norm(b2, axis=1)
    zero = (na < 1e-12) | (nb < 1e-12)
    if np.any((na < 1e-12) != (nb < 1e-12)):
        return False
    cos = np.abs((a2 * b2).sum(axis=1)) / np.maximum(na * nb, 1e-30)
    return bool(np.all(cos[~zero] > 0.9999))


def _openvino_layer_nodes(ov_model: Any, weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """Layer name -> friendly name of its OpenVINO Convolution / MatMul node (matched by weight)."""
    candidates: list[tuple[str, np.ndarray]] = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        for port in op.inputs()[1:]:
            src = port.get_source_output().get_node()
            while src.get_type_name() in ("Convert", "Reshape") and src.inputs():
                src = src.inputs()[0].get_source_output().get_node()
            if src.get_type_name() == "Constant":
                candidates.append((op.get_friendly_name(), np.asarray(src.get_data())))
    out: dict[str, str] = {}
    for layer, w in weights.items():
        wn = w.numpy()
        for name, data in candidates:
            d = data.reshape(wn.shape) if data.size == wn.size and data.shape != wn.shape else data
            if (_rows_match(wn, d) or (d.ndim == 2 and _rows_match(wn, d.T))) and name not in out.values():
                out[layer] = name
                break
    return out


def to_openvino(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    int8_layers: Int8Layers = None,
    calibration: Iterable[Any] | None = None,
) -> Path:
    """Write ``module`` as an OpenVINO IR zip (``model.xml`` + ``model.bin``); return ``path``.

    Arguments as :func:`to_executorch`. Weights are stored in float32 (no fp16 compression:
    the device decides its inference precision, see ``latency_models.runtimes_edge``).

    Raises:
        RuntimeExportError: conversion or quantization failed, or an int8 layer has no node.
    """
    try:
        import openvino as ov
    except ImportError as exc:
        raise RuntimeExportError(
            f"OpenVINO is not installed ({exc}): pip install 'modeltailor[runtimes]'"
        ) from exc
    example = example[:1].contiguous()
    ep = _export(module, example)
    weights = _layer_names(ep.module())  # type: ignore[arg-type]
    wanted = _wanted(int8_layers, weights)
    try:
        with _quiet():
            ov_model = ov.convert_model(ep)
            ov_model.reshape({0: ov.PartialShape(list(example.shape))})  # static, as timed
    except Exception as exc:
        raise RuntimeExportError(f"OpenVINO could not convert the model: {exc}") from exc
    if wanted:
        ov_model = _nncf_int8(ov_model, weights, wanted, _batches(calibration, example))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mt-ov-") as tmp:
        xml = Path(tmp) / OPENVINO_MEMBERS[0]
        ov.save_model(ov_model, str(xml), compress_to_fp16=False)
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
            for member in OPENVINO_MEMBERS:
                zf.write(Path(tmp) / member, member)
    return path


def _nncf_int8(
    ov_model: Any, weights: dict[str, torch.Tensor], layers: set[str], batches: Sequence[Any]
) -> Any:
    import nncf

    if not batches:
        raise RuntimeExportError("int8 layers need calibration batches (real inputs) for activation ranges")
    nodes = _openvino_layer_nodes(ov_model, weights)
    missing = sorted(layers - set(nodes))
    if missing:
        raise RuntimeExportError(f"no OpenVINO node holds the weights of int8 layer(s) {missing[:5]}")
    skip = sorted(nodes[name] for name in nodes if name not in layers)
    ignored = nncf.IgnoredScope(names=skip) if skip else None
    try:
        with _quiet():
            return nncf.quantize(
                ov_model,
                nncf.Dataset([b.numpy() for b in batches]),
                subset_size=len(batches),
                ignored_scope=ignored,
            )
    except Exception as exc:
        raise RuntimeExportError(f"NNCF int8 quantization for OpenVINO failed: {exc}") from exc


# --------------------------------------------------------------------------- dispatch


def compressed_int8_layers(gm: torch.nn.Module, bits: dict[str, int]) -> list[str]:
    """The int8 layers of a compressed model from its ``bits`` (weight target -> bit-width):
    the quantized layers still in its graph (a skipped block's layers are gone)."""
    present = _layer_names(gm) if isinstance(gm, fx.GraphModule) else {}
    return [t.removesuffix(".weight") for t in bits if t.removesuffix(".weight") in present]


def int8_layer_names(space: SearchSpace, policy: Policy) -> list[str]:
    """The layers ``policy`` runs as int8 on these runtimes: present layers with ``bits`` (2-8;
    narrower widths live in int8 containers, neither runtime has a faster kernel for them),
    except power-of-two ones (``pow2``), which run in float as the ONNX export does."""
    skipped = {name for block in space.blocks if block.name in policy.skip for name in block.layers}
    quantized = [ls.name for ls in space.layers if ls.name not in skipped]
    return [
        name
        for name in quantized
        if policy.for_layer(name).bits is not None and not policy.for_layer(name).pow2
    ]


def export_for_runtime(
    runtime: str,
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    int8_layers: Int8Layers = None,
    calibration: Iterable[Any] | None = None,
) -> Path:
    """The deployable file of ``module`` for ``runtime`` (``executorch`` or ``openvino``).

    ``path``'s suffix is replaced by the runtime's (``.pte`` / ``.zip``); returns the path
    written.
    """
    suffix = runtime_suffix(runtime)
    target = Path(path).with_suffix(suffix)
    writer = to_executorch if runtime == "executorch" else to_openvino
    return writer(module, example, target, int8_layers=int8_layers, calibration=calibration)
