"""Loading models: from an ``nn.Module`` (traced here) or a ``torch.export`` archive.

Either way the result is a :class:`CompressibleModel`: an aten-level
``torch.fx.GraphModule`` plus the input shape it expects. Uploaded files are data:
:func:`load_pt2` validates a ``.pt2`` and rebuilds it from its checked parts
(:func:`compression.archive_check.rebuild_pt2`) before ``torch.export.load`` sees it, so
nothing in the file is unpickled or evaluated; ``torch.load`` is never used.
"""

from __future__ import annotations

import re
import tempfile
import traceback
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from compression.archive_check import ArchiveError, ArchiveLimitError, ArchiveLimits, rebuild_pt2
from compression.graph import ModelGraph, analyze, has_symbolic_batch, strip_guards
from compression.tracing import TRACE_LOCK


class ModelLoadError(ValueError):
    """The file is not a loadable ``torch.export`` archive (says why)."""


class ModelTooLargeError(ModelLoadError):
    """The archive is over a size limit (unpacked bytes or parameters; names the setting)."""


class ModelTraceError(ValueError):
    """``torch.export`` cannot trace the model (names the op or line at fault)."""


@dataclass
class CompressibleModel:
    """An exported model ready for analysis and compression.

    Attributes:
        gm: plain aten-level GraphModule in eval semantics (never mutated by compression).
        input_shape: one sample's shape, without the batch dimension.
        name: a human name (arch or file stem).

    ``gm`` runs any batch size: :func:`from_exported` frees the batch of a graph exported
    with a fixed one (see :func:`free_batch`) or refuses the model.
    """

    gm: fx.GraphModule
    input_shape: tuple[int, ...]
    name: str = "model"
    _graph: ModelGraph | None = None

    @property
    def graph(self) -> ModelGraph:
        """Structure analysis, computed once."""
        if self._graph is None:
            self._graph = analyze(self.gm)
        return self._graph

    @property
    def dynamic_batch(self) -> bool:
        """Always true (see the class docstring); re-exports declare a dynamic batch."""
        return True

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, *self.input_shape, generator=torch.Generator().manual_seed(0))

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


#: What a user whose graph fixes its batch size should do instead.
DYNAMIC_BATCH_FIX = (
    'export it with a dynamic batch: torch.export.export(model, (x,), dynamic_shapes={"x": {0: '
    'torch.export.Dim("batch")}}) (the key is the name of forward\'s input)'
)

aten = torch.ops.aten
# Ops whose list argument spells their output shape: (op, index of that argument).
_SIZE_ARGS: dict[Any, int] = {
    aten.view.default: 1,
    aten.reshape.default: 1,
    aten._unsafe_view.default: 1,
    aten.expand.default: 1,
    aten.new_zeros.default: 1,
    aten.new_ones.default: 1,
    aten.new_empty.default: 1,
    aten.new_full.default: 1,
    aten.zeros.default: 0,
    aten.ones.default: 0,
    aten.empty.memory_format: 0,
    aten.full.default: 0,
}
# Of those, the ones that only re-read their input's elements: a leading size equal to the
# batch is the batch only when the input comes from the model's input (not a parameter).
_REINTERPRET = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def free_batch(gm: fx.GraphModule, batch: int) -> int:
    """Let a graph exported with a fixed ``batch`` run any batch size; returns sites rewritten.

    ``torch.export`` without ``dynamic_shapes`` bakes the batch into shape arguments
    (``reshape(x, [1, 49, 16])``). Every such leading size becomes ``sym_size(input, 0)``,
    as a dynamic export writes it. The caller must check the result (:func:`_free_checked`):
    a baked batch can hide where this does not look.
    """
    inp = next(n for n in gm.graph.nodes if n.op == "placeholder")
    from_input = {inp}
    size_node: fx.Node | None = None
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if any(a in from_input for a in node.all_input_nodes):
            from_input.add(node)
        at = _SIZE_ARGS.get(node.target)
        if at is None or len(node.args) <= at:
            continue
        size = node.args[at]
        if not isinstance(size, (list, tuple)) or not size or size[0] != batch:
            continue
        if node.target in _REINTERPRET and node.args[0] not in from_input:
            continue
        if size_node is None:
            with gm.graph.inserting_after(inp):
                size_node = gm.graph.call_function(aten.sym_size.int, (inp, 0))
            size_node.meta["val"] = batch
        args = list(node.args)
        args[at] = [size_node, *size[1:]]
        node.args = tuple(args)
        rewritten += 1
    gm.graph.lint()
    gm.recompile()
    return rewritten


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@torch.no_grad()
def _free_checked(gm: fx.GraphModule, dims: list[int], name: str) -> None:
    """:func:`free_batch`, then check that three batches at once give what each gave alone."""
    chunks = [torch.randn(dims, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    try:
        want = torch.cat([gm(c) for c in chunks])
    except Exception as exc:  # a broken graph fails in any op; name it
        raise ModelLoadError(f"{name}: fails on an input of its shape {dims}: {_first_line(exc)}") from exc
    free_batch(gm, dims[0])
    why = _batch_mismatch(gm, torch.cat(chunks), want)
    if why is not None:
        raise ModelLoadError(
            f"{name}: the graph was exported for a batch of exactly {dims[0]} and cannot run other "
            f"batch sizes ({why}); {DYNAMIC_BATCH_FIX}"
        )


def _batch_mismatch(gm: fx.GraphModule, x: torch.Tensor, want: torch.Tensor) -> str | None:
    try:
        got = gm(x)
    except Exception as exc:  # any op may object to the other batch size; say which
        return _first_line(exc)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return f"output shape {tuple(getattr(got, 'shape', ()))} instead of {tuple(want.shape)}"
    scale = max(float(want.abs().max()), 1e-6)
    if float((got - want).abs().max()) > 1e-4 * scale:
        return "samples of a batch change each other's outputs"
    return None


def from_exported(ep: torch.export.ExportedProgram, name: str) -> CompressibleModel:
    """Wrap an ExportedProgram (one image-like tensor input, one logits output).

    A graph exported with a fixed batch is freed to run any batch (:func:`free_batch`), since
    evaluation, recalibration and reconstruction run many images at once.

    Raises:
        ModelLoadError: not one input, a dynamic non-batch dimension, or a fixed batch that
            cannot be freed (the message names the ``dynamic_shapes`` fix).
    """
    gm = _plain(ep.module())  # type: ignore[arg-type]
    if _count_inputs(gm) != 1:
        raise ModelLoadError(f"{name}: expected exactly one input tensor, found {_count_inputs(gm)}")
    dims, dynamic = _input_shape(gm)
    if any(d < 0 for d in dims[1:]):
        raise ModelLoadError(f"{name}: only the batch dimension may be dynamic, input is {dims}")
    if not dynamic:
        _free_checked(gm, dims, name)
    return CompressibleModel(gm=gm, input_shape=tuple(dims[1:]), name=name)


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


def load_pt2(
    path: str | Path, name: str | None = None, *, limits: ArchiveLimits | None = None
) -> CompressibleModel:
    """Load a ``torch.export.save`` archive without unpickling or evaluating anything in it.

    Every load (upload checks, jobs, the CLI) goes through the same static check: the archive
    is validated against an allow-list and rebuilt from its raw tensors and checked JSON into
    a temporary archive with no sample inputs, which is what ``torch.export.load`` reads (see
    :mod:`compression.archive_check` for what is accepted). ``limits`` bounds unpacked bytes
    and declared parameters before anything is inflated (None: the format ceilings only).

    Raises:
        ModelTooLargeError: over one of ``limits``.
        ModelLoadError: missing file, not a zip archive, not a plain export archive, or a
            member that is not allowed (the message names it).
    """
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"{p}: no such file")
    if not zipfile.is_zipfile(p):
        raise ModelLoadError(f"{p}: not a torch.export archive (.pt2 files are zip archives)")
    with tempfile.TemporaryDirectory(prefix="modeltailor-pt2-") as tmp:
        clean = Path(tmp) / "model.pt2"
        try:
            rebuild_pt2(p, clean, limits or ArchiveLimits())
        except ArchiveLimitError as exc:
            raise ModelTooLargeError(f"{p}: {exc}") from None
        except ArchiveError as exc:
            raise ModelLoadError(f"{p}: not a loadable torch.export archive: {exc}") from None
        with TRACE_LOCK:
            try:
                ep = torch.export.load(str(clean))
            except Exception as exc:  # corrupt archives raise a variety of errors
                raise ModelLoadError(f"{p}: not a loadable torch.export archive: {_first_line(exc)}") from exc
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
