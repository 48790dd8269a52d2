"""Static int8 (QDQ) quantization of an exported fp32 ONNX model with ONNX Runtime's tools.

The ``bits`` choice of a policy is fake-quantized in torch for accuracy, but whether int8 is
*faster* is the runtime's answer (on this CPU it is for wide layers and is not for narrow
ones), so the deployable int8 artifact is an ONNX Runtime QDQ model: int8 weights per output
channel (symmetric), activations calibrated on real data.

On an x86 CPU with AVX2 but without VNNI (this project's machine), ONNX Runtime's u8 x s8
kernels add pairs of products in 16 bits, which saturate for large activations and weights:
the file then loses accuracy the torch model does not (a ResNet stem: 1.1 points; ResNet at
width 0.6: 2-3 points). There the weights are quantized with ``reduce_range`` (7 bits), which
cannot saturate and runs at the same speed (measured: ResNet-20 1.36x vs 1.34x,
MobileNetV2 1.53x vs 1.56x over dense); u8 x u8 does not saturate either but ran 0.84x.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import logging
import platform
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from compression.mixed_precision import supports_int4_matmul

__all__ = [
    "QuantizeError",
    "full_range_weights",
    "prepare",
    "quantize_int8",
    "quantize_qdq",
    "saturating_u8s8",
    "supports_int4_matmul",
]

log = logging.getLogger(__name__)


@functools.cache
def saturating_u8s8() -> bool:
    """Whether this CPU's int8 kernels may saturate (x86 with no VNNI; module docstring).

    Reads the CPU flags where the OS shows them (Linux); elsewhere assumes a CPU that does not
    saturate (ARM, or x86 with VNNI, the common cases), as ONNX Runtime's defaults do.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return not flags & {"avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8"}


_FULL_RANGE = contextvars.ContextVar("full_range_weights", default=False)


@contextlib.contextmanager
def full_range_weights() -> Iterator[None]:
    """Quantize int8 weights on the full 8-bit grid inside this block, saturating CPU or not.

    For the family bundle (``compression.family_export``), whose shared master weights are on
    the 8-bit grid and must match each point's standalone file.
    TODO(issue 15): put the bundle's master on the 7-bit grid where ``saturating_u8s8()``.
    """
    token = _FULL_RANGE.set(True)
    try:
        yield
    finally:
        _FULL_RANGE.reset(token)


class QuantizeError(RuntimeError):
    """The model could not be quantized (bad calibration data or an unsupported graph)."""


class _Batches(CalibrationDataReader):
    """Feeds calibration batches to ORT's calibrator under the model's input name."""

    def __init__(self, input_name: str, batches: Iterator[np.ndarray], rank: int) -> None:
        self.input_name = input_name
        self.batches = batches
        self.rank = rank
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != self.rank:
            raise QuantizeError(
                f"calibration batch {self.count} has shape {x.shape}; the model takes rank-{self.rank} input"
            )
        self.count += 1
        return {self.input_name: x}


class _DropAxisWarnings(logging.Filter):
    """ORT warns on the root logger for every 1-D weight (LayerNorm) that per-channel
    quantization cannot split along axis 1; it quantizes those per tensor, which is what we
    want, so the warning is noise (dozens of lines per ViT calibration sample)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is out-of-range for weight" not in record.getMessage()


@contextlib.contextmanager
def _quiet_axis_warnings() -> Iterator[None]:
    root = logging.getLogger()
    flt = _DropAxisWarnings()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def quantize_int8(
    fp32_path: Path,
    calibration: Iterable[np.ndarray],
    out_path: Path,
    *,
    activation_type: QuantType = QuantType.QUInt8,
    preprocess: bool = True,
) -> Path:
    """Write a static int8 QDQ version of ``fp32_path`` to ``out_path`` and return it.

    Args:
        fp32_path: ONNX model with one float input (as written by ``export_onnx``).
        calibration: batches of real inputs (each ``[batch, ...]`` float32); a few hundred
            samples in total are enough for MinMax calibration.
        out_path: destination ``.onnx`` file.
        activation_type: uint8 activations with int8 weights (U8S8) is the fast combination
            on x86 with VNNI; ``QuantType.QInt8`` gives S8S8.
        preprocess: run ``quant_pre_process`` first (shape inference + graph optimization, so
            Conv+BN+ReLU are fused before quantization and fewer QDQ pairs are inserted).

    Raises:
        FileNotFoundError: ``fp32_path`` does not exist.
        QuantizeError: no calibration data, bad batch shapes, or ORT fails to quantize.
    """
    fp32_path = Path(fp32_path)
    out_path = Path(out_path)
    if not fp32_path.is_file():
        raise FileNotFoundError(f"fp32 ONNX model not found: {fp32_path}")
    try:
        model = onnx.load(str(fp32_path), load_external_data=False)
    except Exception as exc:
        raise QuantizeError(f"{fp32_path} is not a readable ONNX model: {exc}") from exc
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise QuantizeError(f"{fp32_path.name}: expected one input, found {len(inputs)}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mt-quant-") as tmp:
        source = prepare(fp32_path, Path(tmp) / "preprocessed.onnx") if preprocess else fp32_path
        quantize_qdq(source, calibration, out_path, activation_type=activation_type)
    return out_path


def prepare(fp32_path: Path, out_path: Path) -> Path:
    """``quant_pre_process`` (shape inference + graph optimization: Conv+BN+ReLU fused before
    quantization, so fewer QDQ pairs are inserted) into ``out_path``; ``fp32_path`` itself when
    it fails (pre-processing is an optimization)."""
    try:
        # ORT's symbolic shape inference writes sym_shape_infer_temp.onnx (+ external data)
        # into the working directory when it cannot finish; ONNX's own shape inference
        # is enough for our fixed-shape CNN/ViT exports.
        quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)
        return Path(out_path)
    except Exception as exc:
        log.warning("quant_pre_process failed on %s (%s); quantizing the raw model", fp32_path, exc)
        return Path(fp32_path)


def quantize_qdq(
    source: Path,
    calibration: Iterable[np.ndarray],
    out_path: Path,
    *,
    activation_type: QuantType = QuantType.QUInt8,
    nodes: Sequence[str] | None = None,
    float_outputs: Sequence[str] = (),
) -> Path:
    """Static QDQ quantization of ``source`` (every supported op, or only ``nodes``, by ONNX
    node name) with per-channel symmetric int8 weights and MinMax-calibrated activations.
    Ops of the types in ``float_outputs`` keep float outputs (ORT runs a DQ-MatMul / DQ-Gemm
    as an int8 kernel with a float result: only its input and weight are rounded).

    Raises:
        QuantizeError: no calibration data, bad batch shapes, or ORT fails to quantize.
    """
    model = onnx.load(str(source), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise QuantizeError(f"{Path(source).name}: expected one input, found {len(inputs)}")
    rank = len(inputs[0].type.tensor_type.shape.dim)
    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise QuantizeError("calibration data is empty: give at least one input batch")
    reader = _Batches(inputs[0].name, itertools.chain([first], batches), rank)
    try:
        with _quiet_axis_warnings():
            quantize_static(
                str(source),
                str(out_path),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=saturating_u8s8() and not _FULL_RANGE.get(),  # 7-bit where u8 x s8 saturates
                weight_type=QuantType.QInt8,
                activation_type=activation_type,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_quantize=list(nodes) if nodes is not None else None,
                extra_options={
                    "WeightSymmetric": True,
                    "ActivationSymmetric": False,
                    **({"OpTypesToExcludeOutputQuantization": list(float_outputs)} if float_outputs else {}),
                },
            )
    except QuantizeError:
        raise
    except Exception as exc:
        raise QuantizeError(f"ONNX Runtime failed to quantize {Path(source).name}: {exc}") from exc
    return out_path
