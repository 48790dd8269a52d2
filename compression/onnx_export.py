"""Export a (compressed) model to ONNX and check that ONNX Runtime agrees with torch.

The search works on the aten-level ``torch.fx.GraphModule`` that ``torch.export`` returns
(``ExportedProgram.module()``). Such a module cannot ``.eval()``, which the TorchScript ONNX
exporter needs, but a plain ``torch.fx.GraphModule`` copy of it can: that fast path takes
~0.1 s against ~2-3 s for the dynamo exporter, which matters when every benchmarked or
measured candidate is exported. The dynamo exporter stays as the fallback.

A model is only worth measuring if it computes what torch computes, so by default every
export is run in ONNX Runtime and compared with torch on the logits.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
import torch

from compression.tracing import TRACE_LOCK

__all__ = [
    "ExportError",
    "OnnxModel",
    "export_onnx",
    "max_relative_error",
    "onnx_accuracy",
    "run_onnx",
]

log = logging.getLogger(__name__)

#: Largest batch the exported graph declares; matches the ``Dim("batch")`` used for export.
MAX_BATCH = 4096
#: Agreement required between ONNX Runtime and torch on the logits.
MAX_REL_ERROR = 1e-4

ExportMethod = Literal["auto", "torchscript", "dynamo"]


class ExportError(RuntimeError):
    """The model could not be exported, or the ONNX file disagrees with torch."""


def max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max|a - b| / max|b|``: one number per output, robust to logits near zero.

    Element-wise relative error explodes on logits that happen to be ~0; scaling by the
    largest magnitude of the reference is what "agrees to 1e-4" means for a classifier.
    """
    if actual.shape != expected.shape:
        raise ExportError(f"output shape {actual.shape} differs from torch's {expected.shape}")
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    if a.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(b))), np.finfo(np.float32).tiny)
    return float(np.max(np.abs(a - b)) / scale)


_TRACED_SHAPE_METHODS = {
    torch.ops.aten.sym_size.int: "size",
    torch.ops.aten.view.default: "reshape",
    torch.ops.aten.reshape.default: "reshape",
    torch.ops.aten._unsafe_view.default: "reshape",
    torch.ops.aten.expand.default: "expand",
}


def _plain_copy(gm: torch.nn.Module) -> torch.nn.Module:
    """A module the TorchScript exporter accepts: plain GraphModule copy, no guard node,
    shape ops as Tensor methods (so a dynamic batch stays dynamic in the file).

    ``_guards_fn`` only re-checks input shapes in Python; traced by the TorchScript exporter
    it turns into constant-folded asserts and tracer warnings, so the copy drops it.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        return gm.eval()
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.set_codegen(gm.graph._codegen)
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            continue
        method = _TRACED_SHAPE_METHODS.get(node.target) if node.op == "call_function" else None
        if method is not None:
            # The tracer records ``x.size(0)`` fed to ``x.reshape`` as shape ops; through the
            # aten overloads the size becomes a constant: the example's batch, baked in.
            env[node] = graph.call_method(method, torch.fx.map_arg(node.args, lambda n: env[n]))
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.lint()
    return torch.fx.GraphModule(gm, graph)


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    with TRACE_LOCK, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _plain_copy(model),
            (example,),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
        )


def _export_dynamo(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with TRACE_LOCK, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["x"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            # The dynamo exporter translates at opset 18 at least; it converts down if asked.
            opset_version=max(opset, 18),
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise ExportError("the dynamo exporter returned no program")
    program.save(str(path))


def export_onnx(
    gm: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    opset: int = 17,
    check: bool = True,
    method: ExportMethod = "auto",
) -> Path:
    """Write ``gm`` as an ONNX file with a dynamic batch axis and return ``path``.

    Args:
        gm: the (compressed) model, usually ``torch.export.export(...).module()``; any
            ``nn.Module`` works. Zeroed (masked) and sliced weights export as they are.
        example: one input batch; its trailing dimensions fix the ONNX input shape.
        path: where to write the ``.onnx`` file (parent folders are created).
        opset: ONNX opset of the TorchScript path (the dynamo fallback uses >= 18).
        check: run the file in ONNX Runtime on ``example`` and on 3 random inputs and raise
            ``ExportError`` unless the max relative error of the logits is <= 1e-4.
        method: ``"auto"`` tries the fast TorchScript path, then dynamo; the others force one.

    Raises:
        ExportError: neither exporter could export the model, or ORT disagrees with torch.
    """
    if not isinstance(gm, torch.nn.Module):
        raise ExportError(f"expected a torch.nn.Module / GraphModule, got {type(gm).__name__}")
    if not isinstance(example, torch.Tensor) or example.dim() < 1 or example.shape[0] < 1:
        raise ExportError("example must be a tensor with a batch dimension of at least 1")
    if method not in ("auto", "torchscript", "dynamo"):
        raise ExportError(f"unknown export method {method!r}; use auto, torchscript or dynamo")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = example.detach().to(torch.float32)

    errors: list[str] = []
    exported = False
    with torch.no_grad():
        if method in ("auto", "torchscript"):
            try:
                _export_torchscript(gm, example, path, opset)
                if check and method == "auto":
                    # Tracing can bake the example's batch size into shape ops (e.g. a
                    # class token's expand); a file that fails the check goes to dynamo.
                    check_onnx_matches(gm, path, example)
                exported = True
            except Exception as exc:  # any exporter failure: try the other one, keep the reason
                errors.append(f"torchscript exporter: {type(exc).__name__}: {exc}")
                log.info("TorchScript ONNX export failed (%s); falling back to dynamo", exc)
        if not exported and method in ("auto", "dynamo"):
            try:
                _export_dynamo(gm, example, path, opset)
                exported = True
            except Exception as exc:
                errors.append(f"dynamo exporter: {type(exc).__name__}: {exc}")
    if not exported:
        raise ExportError("ONNX export failed:\n" + "\n".join(e[:2000] for e in errors))
    if check:
        check_onnx_matches(gm, path, example)
    return path


def check_onnx_matches(
    gm: torch.nn.Module, path: Path, example: torch.Tensor, *, tolerance: float = MAX_REL_ERROR
) -> float:
    """Compare ORT with torch on ``example`` and 3 seeded random inputs; return the worst error."""
    generator = torch.Generator().manual_seed(0)
    randoms = torch.randn((3, *example.shape[1:]), generator=generator, dtype=torch.float32)
    model = OnnxModel(path)
    worst = 0.0
    for x in (example, randoms):
        with torch.no_grad():
            expected = gm(x)
        if isinstance(expected, (tuple, list)):
            expected = expected[0]
        got = model.run(x.numpy())
        err = max_relative_error(got, expected.detach().numpy())
        worst = max(worst, err)
        if not err <= tolerance:  # also catches NaN
            raise ExportError(
                f"ONNX Runtime disagrees with torch on {path.name}: max relative error {err:.3g} "
                f"> {tolerance:g} (batch of {x.shape[0]})"
            )
    return worst


class OnnxModel:
    """An ONNX Runtime CPU session for evaluation (not timing: see latency_models.runtimes)."""

    def __init__(self, path: Path, *, threads: int = 1) -> None:
        """Load ``path``; raises ``ExportError`` if ORT cannot load it."""
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {self.path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ExportError(f"ONNX Runtime cannot load {self.path}: {exc}") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ExportError(f"{self.path.name}: expected one input, found {len(inputs)}")
        self.input_name: str = inputs[0].name
        self.input_shape: tuple[int | str | None, ...] = tuple(inputs[0].shape)

    def run(self, x: np.ndarray) -> np.ndarray:
        """First output of the model for a float32 batch ``x``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        expected_rank = len(self.input_shape)
        if x.ndim != expected_rank:
            raise ValueError(
                f"{self.path.name}: input must have rank {expected_rank} {self.input_shape}, got {x.shape}"
            )
        outputs = self.session.run(None, {self.input_name: x})
        return np.asarray(outputs[0])

    def predict(self, x: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
        """Arg-max class per row, in batches so large validation sets fit in memory."""
        preds = [self.run(x[i : i + batch_size]).argmax(axis=1) for i in range(0, len(x), batch_size)]
        return np.concatenate(preds) if preds else np.zeros((0,), dtype=np.int64)


def run_onnx(path: Path, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """One-shot: load ``path`` in ORT and return the first output for ``x``."""
    return OnnxModel(path, threads=threads).run(x)


def onnx_accuracy(path: Path, x: np.ndarray, y: Sequence[int] | np.ndarray, *, threads: int = 1) -> float:
    """Top-1 accuracy in [0, 1] of the ONNX model on ``(x, y)``."""
    labels = np.asarray(y)
    if len(labels) != len(x):
        raise ValueError(f"x has {len(x)} rows but y has {len(labels)}")
    if len(labels) == 0:
        raise ValueError("accuracy of an empty data set is undefined")
    preds = OnnxModel(path, threads=threads).predict(x)
    return float(np.mean(preds == labels))
