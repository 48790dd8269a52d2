"""Runtimes that time one model at batch 1: ONNX Runtime CPU and PyTorch eager CPU.

A runtime turns a model into a ``PreparedModel`` whose ``time_runs(n)`` returns ``n``
per-inference latencies in milliseconds. Two prepared models can live side by side, which is
what the harness needs to interleave a measured model with a reference model.

What a runtime accepts (``Runtime.accepts``):

* ``"onnx"`` (``OnnxRuntimeCPU``): a path to an ``.onnx`` file. This path imports only
  onnxruntime and numpy, never torch, so the device agent installs on a small board.
* ``"torch"`` (``TorchEagerCPU``): a ``torch.nn.Module`` / ``torch.fx.GraphModule`` or a path
  to a ``.pt2`` archive written by ``torch.export.save``; torch is imported when first used.
* ``"executorch"`` / ``"openvino"``: ExecuTorch-XNNPACK ``.pte`` programs and OpenVINO IR
  files, see ``latency_models.runtimes_edge`` (each runtime imported only when first used).

Add a runtime (TFLite, a GPU provider) by implementing ``Runtime`` and adding it to
``RUNTIMES``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "RUNTIMES",
    "OnnxRuntimeCPU",
    "PreparedModel",
    "Runtime",
    "RuntimeSetupError",
    "TorchEagerCPU",
    "make_runtime",
]

ModelKind = Literal["onnx", "torch", "executorch", "openvino"]


class RuntimeSetupError(ValueError):
    """A model or setting the runtime cannot use."""


@runtime_checkable
class PreparedModel(Protocol):
    """A model loaded by a runtime with a fixed batch-1 input, ready to be timed."""

    input_shape: tuple[int, ...]

    def time_runs(self, n: int) -> np.ndarray:
        """Run ``n`` inferences back to back; return their latencies in ms (float64, length n)."""
        ...


@runtime_checkable
class Runtime(Protocol):
    """Loads models for one execution engine with fixed settings."""

    name: str
    accepts: ModelKind
    threads: int

    def prepare(self, model: Any, input_shape: Sequence[int] | None = None) -> PreparedModel:
        """Load ``model`` (see the module docstring for what each runtime accepts)."""
        ...

    def version(self) -> str:
        """Version of the engine, stored with every measurement."""
        ...


def _check_threads(threads: int) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise RuntimeSetupError(f"threads must be an integer >= 1, got {threads!r}")
    return threads


def _input_array(shape: Sequence[int]) -> np.ndarray:
    """Fixed-seed random input: timing must not depend on which data happens to be fed."""
    return np.random.default_rng(0).standard_normal(tuple(shape)).astype(np.float32)


# --------------------------------------------------------------------------- ONNX Runtime


class _OrtPrepared:
    def __init__(self, session: Any, input_name: str, input_shape: tuple[int, ...]) -> None:
        self.session = session
        self.input_shape = input_shape
        self._feed = {input_name: _input_array(input_shape)}

    def time_runs(self, n: int) -> np.ndarray:
        run, feed = self.session.run, self._feed
        out = np.empty(n, dtype=np.float64)
        clock = time.perf_counter_ns
        for i in range(n):
            start = clock()
            run(None, feed)
            out[i] = clock() - start
        return out / 1e6


class OnnxRuntimeCPU:
    """ONNX Runtime, CPUExecutionProvider, sequential execution, all graph optimizations.

    ``settings`` are ONNX Runtime session config entries (for example
    ``{"session.intra_op.allow_spinning": "0"}``), plus ``graph_optimization_level``
    (``all`` | ``extended`` | ``basic`` | ``disable``) for devices that need another level.
    """

    name = "onnxruntime"
    accepts: ModelKind = "onnx"
    _LEVELS: ClassVar[tuple[str, ...]] = ("all", "extended", "basic", "disable")

    def __init__(self, threads: int = 1, settings: Mapping[str, str] | None = None) -> None:
        self.threads = _check_threads(threads)
        self.settings = {str(k): str(v) for k, v in (settings or {}).items()}
        level = self.settings.get("graph_optimization_level", "all")
        if level not in self._LEVELS:
            raise RuntimeSetupError(f"graph_optimization_level must be one of {self._LEVELS}, got {level!r}")

    def version(self) -> str:
        import onnxruntime as ort

        return str(ort.__version__)

    def _options(self) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        options.graph_optimization_level = levels[self.settings.get("graph_optimization_level", "all")]
        for key, value in self.settings.items():
            if key != "graph_optimization_level":
                options.add_session_config_entry(key, value)
        return options

    def prepare(self, model: Any, input_shape: Sequence[int] | None = None) -> PreparedModel:
        """Load an ONNX file; dynamic input dimensions (the batch axis) become 1."""
        import onnxruntime as ort

        if not isinstance(model, (str, Path)):
            raise RuntimeSetupError(
                f"{self.name} times ONNX files: pass a path to an .onnx file, not {type(model).__name__}"
            )
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {path}")
        try:
            session = ort.InferenceSession(
                str(path), sess_options=self._options(), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise RuntimeSetupError(f"ONNX Runtime cannot load {path}: {exc}") from exc
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise RuntimeSetupError(
                f"{path.name}: the harness times single-input models, found {len(inputs)}"
            )
        declared = tuple(inputs[0].shape)
        if input_shape is None:
            shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in declared)
        else:
            shape = tuple(int(d) for d in input_shape)
            if len(shape) != len(declared) or any(
                isinstance(d, int) and d > 0 and d != s for d, s in zip(declared, shape, strict=True)
            ):
                raise RuntimeSetupError(
                    f"{path.name}: input shape {shape} does not fit the model's {declared}"
                )
        return _OrtPrepared(session, inputs[0].name, shape)


# --------------------------------------------------------------------------- PyTorch eager


class _TorchPrepared:
    def __init__(self, module: torch.nn.Module, input_shape: tuple[int, ...], threads: int) -> None:
        import torch

        self.module = module
        self.input_shape = input_shape
        self.threads = threads
        self._x = torch.from_numpy(_input_array(input_shape))

    def time_runs(self, n: int) -> np.ndarray:
        import torch

        torch.set_num_threads(self.threads)  # process-global: re-assert before every block
        module, x = self.module, self._x
        out = np.empty(n, dtype=np.float64)
        clock = time.perf_counter_ns
        with torch.inference_mode():
            for i in range(n):
                start = clock()
                module(x)
                out[i] = clock() - start
        return out / 1e6


class TorchEagerCPU:
    """PyTorch eager on the CPU: a baseline device, overhead-bound at batch 1.

    Accepts an ``nn.Module`` / ``GraphModule`` (``input_shape`` required) or a ``.pt2``
    archive (input shape taken from its example inputs, batch set to 1).
    """

    name = "torch"
    accepts: ModelKind = "torch"

    def __init__(self, threads: int = 1, settings: Mapping[str, str] | None = None) -> None:
        self.threads = _check_threads(threads)
        if settings:
            raise RuntimeSetupError(f"the torch runtime takes no settings, got {sorted(settings)}")
        self.settings: dict[str, str] = {}

    def version(self) -> str:
        import torch

        return str(torch.__version__)

    def prepare(self, model: Any, input_shape: Sequence[int] | None = None) -> PreparedModel:
        """Load a module or ``.pt2`` archive for eager timing."""
        import torch

        if isinstance(model, (str, Path)):
            path = Path(model)
            if path.suffix != ".pt2":
                raise RuntimeSetupError(f"{self.name} times torch modules or .pt2 archives, not {path.name}")
            from compression.model_io import ModelLoadError, load_pt2

            try:  # the checked loader: an archive timed here may be a user's upload
                loaded = load_pt2(path)
            except ModelLoadError as exc:
                raise RuntimeSetupError(f"{path} is not a usable torch.export archive: {exc}") from exc
            if input_shape is None:
                input_shape = (1, *loaded.input_shape)
            module: torch.nn.Module = loaded.gm
        elif isinstance(model, torch.nn.Module):
            module = model
            if not isinstance(module, torch.fx.GraphModule):
                module.eval()
        else:
            raise RuntimeSetupError(
                f"{self.name} times torch modules or .pt2 archives, not {type(model).__name__}"
            )
        if input_shape is None:
            raise RuntimeSetupError(
                "a torch module has no declared input: give input_shape, e.g. (1, 3, 32, 32)"
            )
        return _TorchPrepared(module, tuple(int(d) for d in input_shape), self.threads)


# ExecuTorch (XNNPACK) and OpenVINO live in their own module (it looks the helpers above up
# when it runs, so importing it here makes no import cycle).
from latency_models.runtimes_edge import ExecuTorchXnnpackCPU, OpenVinoCPU  # noqa: E402

RUNTIMES: dict[
    str, type[OnnxRuntimeCPU] | type[TorchEagerCPU] | type[ExecuTorchXnnpackCPU] | type[OpenVinoCPU]
] = {
    OnnxRuntimeCPU.name: OnnxRuntimeCPU,
    TorchEagerCPU.name: TorchEagerCPU,
    ExecuTorchXnnpackCPU.name: ExecuTorchXnnpackCPU,
    OpenVinoCPU.name: OpenVinoCPU,
}


def make_runtime(kind: str, threads: int = 1, settings: Mapping[str, str] | None = None) -> Runtime:
    """The runtime named ``kind`` with these settings; unknown kinds list the known ones."""
    try:
        cls = RUNTIMES[kind]
    except KeyError:
        raise RuntimeSetupError(f"unknown runtime {kind!r}; known runtimes: {sorted(RUNTIMES)}") from None
    return cls(threads, settings)
