"""Static int8 (QDQ) quantization of an exported fp32 ONNX model with ONNX Runtime's tools.

The ``bits`` choice of a policy is fake-quantized in torch for accuracy, but whether int8 is
*faster* is the runtime's answer (on this CPU it is for wide layers and is not for narrow
ones), so the deployable int8 artifact is an ONNX Runtime QDQ model: int8 weights per output
channel (symmetric), activations calibrated on real data.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import tempfile
from collections.abc import Iterable, Iterator
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

__all__ = ["QuantizeError", "quantize_int8"]

log = logging.getLogger(__name__)


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
    rank = len(inputs[0].type.tensor_type.shape.dim)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mt-quant-") as tmp:
        source = fp32_path
        if preprocess:
            prepared = Path(tmp) / "preprocessed.onnx"
            try:
                # ORT's symbolic shape inference writes sym_shape_infer_temp.onnx (+ external data)
                # into the working directory when it cannot finish; ONNX's own shape inference
                # is enough for our fixed-shape CNN/ViT exports.
                quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
                source = prepared
            except Exception as exc:  # pre-processing is an optimization; quantize without it
                log.warning("quant_pre_process failed on %s (%s); quantizing the raw model", fp32_path, exc)
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
                    weight_type=QuantType.QInt8,
                    activation_type=activation_type,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
                )
        except QuantizeError:
            raise
        except Exception as exc:
            raise QuantizeError(f"ONNX Runtime failed to quantize {fp32_path.name}: {exc}") from exc
    return out_path
