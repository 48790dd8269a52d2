"""An export runs the policy the way its latency was predicted: 8-bit weights become an int8 QDQ file."""

from __future__ import annotations

from pathlib import Path

import onnx

from compression.policy import Policy
from engine.job import DatasetRef, DeviceRef, ExportContext, ModelRef, Scores, export_candidate
from engine.spec import JobSpec

DEVICE = DeviceRef(id=1, name="cpu-ort-1t", kind="local", runtime="onnxruntime", threads=1, settings={})


def _export(
    tmp_path: Path, policy: dict[str, object], *, int8: bool = False
) -> tuple[dict[str, object], set[str]]:
    out = tmp_path / f"{Policy.from_dict(policy).hash}-{int8}.onnx"
    ctx = ExportContext(
        artifact_id=1,
        policy=policy,
        scores=Scores(latency_ms=0.1),
        job_spec=JobSpec(model_id=1, dataset_id=1, device_id=1, algorithm="random"),
        model=ModelRef(id=1, name="lenet5", path=None, zoo="lenet5", sha256=None),
        dataset=DatasetRef(id=1, name="digits", path=None, builtin="digits"),
        device=DEVICE,
        int8=int8,
        finetune_epochs=0,
        out_path=out,
        data_dir=tmp_path / "data",
        progress=lambda _data: None,
    )
    result = export_candidate(ctx)
    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    return dict(result.metrics), ops


def test_bits_in_the_policy_decide_the_exported_precision(tmp_path: Path) -> None:
    quant, quant_ops = _export(tmp_path, {"default": {"bits": 8}})
    assert quant["int8"] is True and "QuantizeLinear" in quant_ops and "DequantizeLinear" in quant_ops
    assert 0.5 < float(quant["accuracy"]) <= 1.0  # type: ignore[arg-type]

    fp32, fp32_ops = _export(tmp_path, {"default": {"width": 0.75}})
    assert fp32["int8"] is False and "QuantizeLinear" not in fp32_ops

    forced, forced_ops = _export(tmp_path, {"default": {"width": 0.75}}, int8=True)
    assert forced["int8"] is True and "QuantizeLinear" in forced_ops


def test_mixed_bits_export_int8_only_on_the_quantized_layers(tmp_path: Path) -> None:
    metrics, ops = _export(tmp_path, {"layers": {"conv2": {"bits": 8}, "fc1": {"bits": 8}}, "act_bits": 8})
    assert metrics["int8"] is True and "QuantizeLinear" in ops
    assert metrics["layer_precision"] == {"conv2": "int8", "fc1": "int8"}
