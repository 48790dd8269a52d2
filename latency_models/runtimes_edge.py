"""Two more device runtimes: ExecuTorch with the XNNPACK delegate, and OpenVINO's CPU plugin.

What they accept (``Runtime.accepts``):

* ``"executorch"`` (``ExecuTorchXnnpackCPU``): a ``.pte`` program
  (``compression.export_runtimes.to_executorch``), run through ``executorch.runtime``.
  ExecuTorch's XNNPACK thread pool is process-wide and starts with one thread per core; the
  runtime resets it to the device's ``threads`` before every block of timed runs
  (``_unsafe_reset_threadpool``, the pybindings' only way to set it). No settings.
* ``"openvino"`` (``OpenVinoCPU``): an OpenVINO IR zip (``model.xml`` + ``model.bin``, what
  ``compression.export_runtimes.to_openvino`` writes), an IR ``.xml`` with its ``.bin``
  beside it, or an ``.onnx`` file (OpenVINO reads ONNX itself: the harness's ONNX reference
  model serves both). Compiled with ``INFERENCE_NUM_THREADS = threads``, one stream, the
  latency hint and ``INFERENCE_PRECISION_HINT = f32``: on CPUs with AVX-512 BF16 / AMX,
  OpenVINO otherwise runs float models in bf16 (a different device from the fp32 one a
  user measured). ``settings`` may set ``INFERENCE_PRECISION_HINT`` (``f32`` | ``bf16`` |
  ``f16``) and other CPU properties (passed as strings).

Both also take a ``torch.nn.Module`` (with ``input_shape``): it is lowered to the runtime's
file first (float32), so code that times eager modules on non-ONNX devices works unchanged.
The files have a static batch-1 input.

Importing this module imports neither runtime nor torch: the device agent imports only the
runtime its device uses, when it prepares the first model.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from latency_models.runtimes import ModelKind, PreparedModel

__all__ = [
    "ExecuTorchXnnpackCPU",
    "OpenVinoCPU",
    "model_suffix",
    "predict",
    "reference_pte_path",
    "set_executorch_threads",
]

#: Largest OpenVINO IR zip member accepted (an uploaded or downloaded file is data).
MAX_IR_BYTES = 2 << 30
_PTE_MAGIC = b"ET"  # flatbuffer file identifier at bytes 4..8: "ET12", ...
_ZIP_MAGIC = b"PK\x03\x04"


# ``latency_models.runtimes`` imports this module to register the runtimes, so its helpers are
# looked up when a runtime runs, not at import (no import cycle).
def RuntimeSetupError(message: str) -> Exception:  # stands in for the class
    """``latency_models.runtimes.RuntimeSetupError(message)``."""
    from latency_models import runtimes

    return runtimes.RuntimeSetupError(message)


def _check_threads(threads: int) -> int:
    from latency_models import runtimes

    return runtimes._check_threads(threads)


def _input_array(shape: Sequence[int]) -> np.ndarray:
    from latency_models import runtimes

    return runtimes._input_array(shape)


def model_suffix(data: bytes) -> str:
    """The file suffix a model's bytes need: ``.pte``, ``.zip`` (OpenVINO IR) or ``.onnx``."""
    if data[4:6] == _PTE_MAGIC:
        return ".pte"
    if data[:4] == _ZIP_MAGIC:
        return ".zip"
    return ".onnx"


def _model_path(model: Any, runtime: str, suffixes: Sequence[str]) -> Path:
    if not isinstance(model, (str, Path)):
        raise RuntimeSetupError(
            f"{runtime} times {' / '.join(suffixes)} files or torch modules, not {type(model).__name__}"
        )
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.suffix not in suffixes:
        raise RuntimeSetupError(f"{runtime} times {' / '.join(suffixes)} files, not {path.name}")
    return path


def _is_torch_module(model: Any) -> bool:
    if isinstance(model, (str, Path)):
        return False
    import torch

    return isinstance(model, torch.nn.Module)


def _lower_module(model: Any, runtime: str, input_shape: Sequence[int] | None, folder: Path) -> Path:
    """A torch module as ``runtime``'s file (fp32) in ``folder``."""
    if input_shape is None:
        raise RuntimeSetupError("a torch module has no declared input: give input_shape, e.g. (1, 3, 32, 32)")
    import torch

    from compression.export_runtimes import RuntimeExportError, export_for_runtime

    example = torch.from_numpy(_input_array(tuple(int(d) for d in input_shape)))
    try:
        return export_for_runtime(runtime, model, example, folder / "model")
    except RuntimeExportError as exc:
        raise RuntimeSetupError(str(exc)) from exc


def _check_shape(name: str, declared: tuple[int, ...], input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is None:
        return declared
    shape = tuple(int(d) for d in input_shape)
    if shape != declared:
        raise RuntimeSetupError(
            f"{name}: input shape {shape} does not fit the file's static input {declared} "
            "(export the model again at that shape)"
        )
    return shape


# --------------------------------------------------------------------------- ExecuTorch


def set_executorch_threads(threads: int) -> None:
    """Size ExecuTorch's process-wide XNNPACK thread pool (it starts with one per core)."""
    from executorch.extension.pybindings.portable_lib import (
        _threadpool_get_thread_count,
        _unsafe_reset_threadpool,
    )

    if _threadpool_get_thread_count() != threads:
        _unsafe_reset_threadpool(threads)


class _EtPrepared:
    def __init__(self, method: Any, input_shape: tuple[int, ...], threads: int, keep: Any = None) -> None:
        import torch

        self.method = method
        self.input_shape = input_shape
        self.threads = threads
        self._inputs = [torch.from_numpy(_input_array(input_shape))]
        self._keep = keep  # the program (and a temporary folder) must outlive the method

    def time_runs(self, n: int) -> np.ndarray:
        set_executorch_threads(self.threads)  # process-global: re-assert before every block
        execute, inputs = self.method.execute, self._inputs
        out = np.empty(n, dtype=np.float64)
        clock = time.perf_counter_ns
        for i in range(n):
            start = clock()
            execute(inputs)
            out[i] = clock() - start
        return out / 1e6

    def run(self, x: np.ndarray) -> np.ndarray:
        """Outputs of one input (the file's static shape)."""
        import torch

        set_executorch_threads(self.threads)
        result = self.method.execute([torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))])
        return np.asarray(result[0].detach().numpy() if hasattr(result[0], "numpy") else result[0])


class ExecuTorchXnnpackCPU:
    """ExecuTorch's Python runtime with the XNNPACK delegate on the CPU."""

    name = "executorch"
    accepts: ModelKind = "executorch"

    def __init__(self, threads: int = 1, settings: Mapping[str, str] | None = None) -> None:
        self.threads = _check_threads(threads)
        if settings:
            raise RuntimeSetupError(f"the executorch runtime takes no settings, got {sorted(settings)}")
        self.settings: dict[str, str] = {}

    def version(self) -> str:
        from importlib.metadata import version

        return f"executorch {version('executorch')} (xnnpack)"

    def prepare(self, model: Any, input_shape: Sequence[int] | None = None) -> PreparedModel:
        """Load a ``.pte`` program (or lower a torch module first)."""
        tmp: Any = None
        if _is_torch_module(model):
            tmp = tempfile.TemporaryDirectory(prefix="mt-et-")
            model = _lower_module(model, self.name, input_shape, Path(tmp.name))
        path = _model_path(model, self.name, (".pte",))
        try:
            from executorch.runtime import Runtime
        except ImportError as exc:
            raise RuntimeSetupError(
                f"ExecuTorch is not installed ({exc}): pip install 'modeltailor[runtimes]'"
            ) from exc
        set_executorch_threads(self.threads)
        try:
            program = Runtime.get().load_program(path)
            method = program.load_method("forward")
        except Exception as exc:
            raise RuntimeSetupError(f"ExecuTorch cannot load {path.name}: {exc}") from exc
        if method is None:
            raise RuntimeSetupError(f"{path.name} has no 'forward' method")
        meta = method.metadata
        if meta.num_inputs() != 1:
            raise RuntimeSetupError(
                f"{path.name}: the harness times single-input models, found {meta.num_inputs()}"
            )
        declared = tuple(int(d) for d in meta.input_tensor_meta(0).sizes())
        shape = _check_shape(path.name, declared, input_shape)
        return _EtPrepared(method, shape, self.threads, keep=(program, tmp))


# --------------------------------------------------------------------------- OpenVINO


def _read_ir_zip(path: Path) -> tuple[str, bytes]:
    """(model.xml text, model.bin bytes) of an IR zip, checked before anything is inflated."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            if sorted(infos) != sorted(("model.xml", "model.bin")):
                raise RuntimeSetupError(
                    f"{path.name}: an OpenVINO IR zip holds exactly model.xml and model.bin, "
                    f"found {sorted(infos)[:6]}"
                )
            if sum(i.file_size for i in infos.values()) > MAX_IR_BYTES:
                raise RuntimeSetupError(f"{path.name}: unpacked IR over {MAX_IR_BYTES >> 20} MiB")
            return zf.read("model.xml").decode("utf-8"), zf.read("model.bin")
    except zipfile.BadZipFile as exc:
        raise RuntimeSetupError(f"{path.name} is not a readable zip: {exc}") from exc


class _OvPrepared:
    def __init__(self, request: Any, input_shape: tuple[int, ...], keep: Any = None) -> None:
        self.request = request
        self.input_shape = input_shape
        self._x = _input_array(input_shape)
        self._keep = keep

    def time_runs(self, n: int) -> np.ndarray:
        infer, x = self.request.infer, {0: self._x}
        out = np.empty(n, dtype=np.float64)
        clock = time.perf_counter_ns
        for i in range(n):
            start = clock()
            infer(x)
            out[i] = clock() - start
        return out / 1e6

    def run(self, x: np.ndarray) -> np.ndarray:
        """Outputs of one input (the file's static shape)."""
        result = self.request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return np.asarray(result[0] if 0 in result else next(iter(result.values()))).copy()


class OpenVinoCPU:
    """OpenVINO's CPU plugin, one stream, float32 unless ``settings`` say otherwise."""

    name = "openvino"
    accepts: ModelKind = "openvino"
    _PRECISIONS: ClassVar[tuple[str, ...]] = ("f32", "bf16", "f16")
    _FIXED: ClassVar[tuple[str, ...]] = ("INFERENCE_NUM_THREADS", "NUM_STREAMS")

    def __init__(self, threads: int = 1, settings: Mapping[str, str] | None = None) -> None:
        self.threads = _check_threads(threads)
        self.settings = {str(k): str(v) for k, v in (settings or {}).items()}
        precision = self.settings.get("INFERENCE_PRECISION_HINT", "f32")
        if precision not in self._PRECISIONS:
            raise RuntimeSetupError(
                f"INFERENCE_PRECISION_HINT must be one of {self._PRECISIONS}, got {precision!r}"
            )
        fixed = sorted(set(self.settings) & set(self._FIXED))
        if fixed:
            raise RuntimeSetupError(
                f"{fixed}: set by the device's threads (one stream); remove them from settings"
            )

    def version(self) -> str:
        import openvino as ov

        return f"openvino {ov.get_version()} (CPU)"

    def config(self) -> dict[str, str]:
        """The properties every model is compiled with."""
        return {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
            **self.settings,
            "INFERENCE_NUM_THREADS": str(self.threads),
            "NUM_STREAMS": "1",
        }

    def prepare(self, model: Any, input_shape: Sequence[int] | None = None) -> PreparedModel:
        """Compile an IR zip, IR ``.xml`` or ``.onnx`` file (or a torch module, converted first)."""
        tmp: Any = None
        if _is_torch_module(model):
            tmp = tempfile.TemporaryDirectory(prefix="mt-ov-")
            model = _lower_module(model, self.name, input_shape, Path(tmp.name))
        path = _model_path(model, self.name, (".zip", ".xml", ".onnx"))
        try:
            import openvino as ov
        except ImportError as exc:
            raise RuntimeSetupError(
                f"OpenVINO is not installed ({exc}): pip install 'modeltailor[runtimes]'"
            ) from exc
        core = ov.Core()
        try:
            if path.suffix == ".zip":
                xml, weights = _read_ir_zip(path)
                ov_model = core.read_model(xml, ov.Tensor(np.frombuffer(weights, dtype=np.uint8).copy()))
            else:
                ov_model = core.read_model(str(path))
            if len(ov_model.inputs) != 1:
                raise RuntimeSetupError(
                    f"{path.name}: the harness times single-input models, found {len(ov_model.inputs)}"
                )
            pshape = ov_model.inputs[0].get_partial_shape()
            if pshape.is_dynamic:  # e.g. an ONNX file's dynamic batch: fix it to the shape timed
                dims = [d.get_length() if d.is_static else 1 for d in pshape]
                shape = tuple(int(d) for d in (input_shape or dims))
                ov_model.reshape({0: ov.PartialShape(list(shape))})
            else:
                shape = _check_shape(path.name, tuple(int(d) for d in pshape.to_shape()), input_shape)
            compiled = core.compile_model(ov_model, "CPU", self.config())
        except Exception as exc:
            if type(exc).__name__ == "RuntimeSetupError":
                raise
            raise RuntimeSetupError(f"OpenVINO cannot compile {path.name}: {exc}") from exc
        return _OvPrepared(compiled.create_infer_request(), shape, keep=(compiled, tmp))


# --------------------------------------------------------------------------- helpers


def predict(path: Path, runtime: str, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """Outputs of a runtime file for a batch ``x``, one sample at a time (the files are batch 1)."""
    from latency_models.runtimes import make_runtime

    prepared: Any = make_runtime(runtime, threads).prepare(Path(path))
    x = np.asarray(x, dtype=np.float32)
    return np.concatenate([prepared.run(x[i : i + 1]) for i in range(len(x))])


def _cache_dir() -> Path:
    root = os.environ.get("MODELTAILOR_CACHE") or str(Path.home() / ".cache" / "modeltailor")
    return Path(root) / "reference"


def reference_pte_path(cache_dir: Path | None = None) -> Path:
    """The harness's reference CNN lowered for ExecuTorch (needs torch and executorch), cached.

    Named by the reference's definition (its ONNX bytes) and the ExecuTorch version: a ``.pte``
    is not byte-reproducible across versions, but the same install always reuses one file.
    """
    from importlib.metadata import version

    import torch

    from compression.export_runtimes import to_executorch
    from latency_models.harness import REFERENCE_INPUT_SHAPE, REFERENCE_VERSION, _reference_onnx_bytes
    from latency_models.harness import reference_torch_module as ref_module

    key = hashlib.sha256(_reference_onnx_bytes() + version("executorch").encode()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else _cache_dir()
    path = folder / f"reference-v{REFERENCE_VERSION}-{key}.pte"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
            built = to_executorch(ref_module(), torch.zeros(REFERENCE_INPUT_SHAPE), Path(tmp) / "ref.pte")
            os.replace(built, path)  # atomic: concurrent processes never read half a file
    return path
