"""Loading models: from an ``nn.Module`` (traced here) or a ``torch.export`` archive.

Either way the result is a :class:`CompressibleModel`: an aten-level
``torch.fx.GraphModule`` plus the input shape it expects. Uploaded files are data:
a ``.pt2`` is read with ``torch.export.load`` (no pickle), never ``torch.load``.
"""

from __future__ import annotations

import re
import traceback
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx

from compression.graph import ModelGraph, analyze, has_symbolic_batch, strip_guards
from compression.tracing import TRACE_LOCK


class ModelLoadError(ValueError):
    """The file is not a loadable ``torch.export`` archive (says why)."""


class ModelTraceError(ValueError):
    """``torch.export`` cannot trace the model (names the op or line at fault)."""


@dataclass
class CompressibleModel:
    """An exported model ready for analysis and compression.

    Attributes:
        gm: plain aten-level GraphModule in eval semantics (never mutated by compression).
        input_shape: one sample's shape, without the batch dimension.
        dynamic_batch: whether the graph accepts any batch size (else only ``static_batch``).
        static_batch: the batch size baked into a static graph.
        name: a human name (arch or file stem).
    """

    gm: fx.GraphModule
    input_shape: tuple[int, ...]
    dynamic_batch: bool
    static_batch: int = 1
    name: str = "model"
    _graph: ModelGraph | None = None

    @property
    def graph(self) -> ModelGraph:
        """Structure analysis, computed once."""
        if self._graph is None:
            self._graph = analyze(self.gm)
        return self._graph

    def example_input(self, batch: int = 1) -> torch.Tensor:
        b = batch if self.dynamic_batch else self.static_batch
        return torch.randn(b, *self.input_shape, generator=torch.Generator().manual_seed(0))

    @property
    def num_outputs(self) -> int:
        with torch.inference_mode():
            out = self.gm(self.example_input())
        return int(out.shape[-1])


def _plain(gm: fx.GraphModule) -> fx.GraphModule:
    """Copy an unlifted export module into a plain GraphModule (``.eval()`` works)."""
    plain = fx.GraphModule(gm, gm.graph)
    return strip_guards(plain)


def _input_shape(gm: fx.GraphModule) -> tuple[list[int], bool]:
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                break
            dims: list[int] = []
            for s in val.shape:
                dims.append(-1 if isinstance(s, torch.SymInt) else int(s))
            return dims, has_symbolic_batch(gm)
    raise ModelLoadError("the exported program has no tensor input")


def _count_inputs(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "placeholder")


def from_exported(ep: torch.export.ExportedProgram, name: str) -> CompressibleModel:
    """Wrap an ExportedProgram (one image-like tensor input, one logits output)."""
    gm = _plain(ep.module())  # type: ignore[arg-type]
    if _count_inputs(gm) != 1:
        raise ModelLoadError(f"{name}: expected exactly one input tensor, found {_count_inputs(gm)}")
    dims, dynamic = _input_shape(gm)
    if any(d < 0 for d in dims[1:]):
        raise ModelLoadError(f"{name}: only the batch dimension may be dynamic, input is {dims}")
    return CompressibleModel(
        gm=gm,
        input_shape=tuple(dims[1:]),
        dynamic_batch=dynamic,
        static_batch=1 if dynamic else dims[0],
        name=name,
    )


def _trace_hint(exc: BaseException) -> str:
    """The first user-code line and op named in an export failure."""
    text = str(exc).strip().splitlines()
    head = text[0] if text else type(exc).__name__
    op = re.search(r"(aten\.[\w.]+|torch\.[\w.]+|call_function [^\s]+|builtin [^\s]+)", str(exc))
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "site-packages" not in f.filename]
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{head}{' — op ' + op.group(1) if op else ''}{where}"


def from_module(module: torch.nn.Module, example: torch.Tensor, name: str = "model") -> CompressibleModel:
    """Export an ``nn.Module`` with a dynamic batch dimension and wrap it.

    Raises:
        ModelTraceError: naming the op or construct ``torch.export`` could not trace.
    """
    module = module.eval()
    batch = {next(iter(_arg_names(module))): {0: torch.export.Dim("batch", min=1, max=4096)}}
    with TRACE_LOCK:
        try:
            ep = torch.export.export(module, (example,), dynamic_shapes=batch)
        except Exception as exc:  # torch raises many types here; name what failed
            raise ModelTraceError(f"torch.export cannot trace {name}: {_trace_hint(exc)}") from exc
        return from_exported(ep, name)


def _arg_names(module: torch.nn.Module) -> list[str]:
    import inspect

    params = list(inspect.signature(module.forward).parameters)
    return params or ["x"]


def load_pt2(path: str | Path, name: str | None = None) -> CompressibleModel:
    """Load a ``torch.export.save`` archive (never unpickles anything).

    Raises:
        ModelLoadError: missing file, not a zip archive, not an export archive.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"{p}: no such file")
    if not zipfile.is_zipfile(p):
        raise ModelLoadError(f"{p}: not a torch.export archive (.pt2 files are zip archives)")
    with TRACE_LOCK:
        try:
            ep = torch.export.load(str(p))
        except Exception as exc:  # corrupt archives raise a variety of errors
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"{p}: not a loadable torch.export archive: {msg}") from exc
        return from_exported(ep, name or p.stem)


def save_pt2(module: torch.nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Export a module with a dynamic batch and save it as a ``.pt2`` archive."""
    module = module.eval()
    with TRACE_LOCK:
        ep = torch.export.export(
            module,
            (example,),
            dynamic_shapes={_arg_names(module)[0]: {0: torch.export.Dim("batch", min=1, max=4096)}},
        )
        torch.export.save(ep, str(path))
    return Path(path)
