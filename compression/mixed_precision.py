"""Per-layer precision in the exported ONNX file: int8 QDQ exactly where a policy asks, 4-bit
``MatMulNBits`` for linear layers with ``bits <= 4``, float elsewhere.

The runtime rule (``layer_precision``) is the one place that says how a layer's ``bits`` run
on ONNX Runtime: the export follows it and the latency features (``latency_models.features``)
describe it, so a predictor is trained on the files the search later exports.

* ``bits`` None: float32.
* a linear layer with ``bits <= 4`` when ORT has the ``MatMulNBits`` CPU kernel
  (``supports_int4_matmul``): 4-bit weights in blocks along the input dimension, float
  activations. The weights are packed from the policy's own per-output-channel grid
  (``compression.masks.fake_quantize``), so the file computes what the torch model does.
* any other layer with bits (2-8): static int8 QDQ (per-channel symmetric int8 weights,
  uint8 activations calibrated on real data); bit-widths under 8 live in int8 containers.
* a layer with ``pow2`` bits (power-of-two levels, ``compression.pow2``): float32 holding
  the de-quantized values. ORT's int8 QDQ would choose its own scale (``amax / 127``) and
  re-round the levels, so int8 is not exact for them; the file computes what the torch model
  does, and the latency features see a float layer.

ONNX node names (``/Conv_3``) say nothing about the model's layer names, and ORT's
pre-processing renames and reorders nodes, so layers are found by their weights: each
policy layer's weight matches exactly one ONNX initializer up to a per-output-channel scale
(a folded BatchNorm multiplies each output row by a constant).
"""

from __future__ import annotations

import copy
import functools
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

__all__ = [
    "INT4_BLOCK",
    "LayerNode",
    "Precision",
    "export_policy_onnx",
    "find_layer_nodes",
    "float_graph",
    "layer_precision",
    "quantize_layers",
    "supports_int4_matmul",
    "to_matmul_nbits",
]

Precision = Literal["fp32", "int8", "int4"]

#: Block size of MatMulNBits along K (input features): ORT's kernels take powers of 2 >= 16.
INT4_BLOCK = 32
#: Weighted ONNX ops a policy layer becomes (conv layers: Conv; linear: Gemm or MatMul).
_LAYER_OPS = ("Conv", "Gemm", "MatMul")
#: Layer ops whose int8 kernels take a float output (MatMulIntegerToFloat, QGemm).
_LINEAR_OPS = ("Gemm", "MatMul")
#: Ops between layers that run in int8 when every input comes from int8 (no Q/DQ in between).
_GLUE_OPS = frozenset({"Relu", "Clip", "Add", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten"})
#: Least |cosine| between a layer's weight row and its ONNX row to call them the same.
_MATCH = 0.9999


@functools.cache
def supports_int4_matmul() -> bool:
    """Whether the installed ONNX Runtime runs a 4-bit ``MatMulNBits`` on this CPU.

    Checked once per process by running a one-node model (ORT builds without contrib ops,
    or too old for the op, answer False); whether it is also *faster* is the latency
    predictor's business (its ``int4`` feature), and ``bench/mixed_precision_bench.py``
    records the figure for this CPU.
    """
    import onnxruntime as ort

    k, n = 32, 16
    w = np.arange(k * n, dtype=np.float32).reshape(k, n) % 7 - 3.0
    x = np.ones((1, k), dtype=np.float32)
    graph = helper.make_graph(
        [],
        "probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.graph.node.extend(
        _nbits_nodes("x", "y", w, np.ones(n, dtype=np.float32), None, "probe", model.graph)
    )
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        got = np.asarray(sess.run(None, {"x": x})[0])
    except Exception:
        return False
    return bool(np.allclose(got, x @ w, rtol=1e-3, atol=1e-3))


def layer_precision(op: str, bits: int | None, *, int4: bool | None = None) -> Precision:
    """How ONNX Runtime runs one layer of op type ``op`` ("conv", "dwconv", "gconv", "linear")
    whose policy has ``bits``: the rule the export follows and the latency features encode.

    ``int4``: whether 4-bit MatMulNBits is available (default: ``supports_int4_matmul()``).
    """
    if bits is None:
        return "fp32"
    if op == "linear" and bits <= 4 and (supports_int4_matmul() if int4 is None else int4):
        return "int4"
    return "int8"


@dataclass(frozen=True)
class LayerNode:
    """Where one policy layer sits in an ONNX graph: its node and weight initializer."""

    node: str
    op: str
    weight: str


def _rows(w: np.ndarray) -> np.ndarray:
    return np.asarray(w, dtype=np.float64).reshape(w.shape[0], -1)


def _onnx_rows(node: onnx.NodeProto, init: np.ndarray) -> np.ndarray | None:
    """The initializer as torch's (out, in·k·k) rows, or None if the node is no layer."""
    if node.op_type == "Conv":
        return _rows(init)
    if init.ndim != 2:
        return None
    if node.op_type == "MatMul":
        return _rows(init.T)
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    return _rows(init if trans_b else init.T)


def _same_up_to_row_scale(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    zero_a, zero_b = na < 1e-30, nb < 1e-30
    if np.any(zero_a != zero_b):
        return False
    live = ~zero_a
    if not live.any():
        return True
    cos = np.abs(np.sum(a[live] * b[live], axis=1)) / (na[live] * nb[live])
    return bool(np.min(cos) >= _MATCH)


def find_layer_nodes(model: onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> dict[str, LayerNode]:
    """The ONNX node of each layer in ``weights`` (layer name -> its torch weight), by values.

    Raises:
        ValueError: a layer has no node whose weight matches it (the file is not an export of
            the model these weights come from), naming the layer.
    """
    inits = {i.name: i for i in model.graph.initializer}
    candidates: list[tuple[onnx.NodeProto, str, np.ndarray]] = []
    for node in model.graph.node:
        if node.op_type in _LAYER_OPS and len(node.input) > 1 and node.input[1] in inits:
            rows = _onnx_rows(node, numpy_helper.to_array(inits[node.input[1]]))
            if rows is not None:
                candidates.append((node, node.input[1], rows))
    used: set[int] = set()
    out: dict[str, LayerNode] = {}
    for layer, w in weights.items():
        want = _rows(np.asarray(w))
        hit = next(
            (
                i
                for i, (_, _, rows) in enumerate(candidates)
                if i not in used and _same_up_to_row_scale(rows, want)
            ),
            None,
        )
        if hit is None:
            raise ValueError(
                f"layer {layer!r} (weight {tuple(np.shape(w))}) has no matching Conv/Gemm/MatMul in the ONNX "
                "graph: export the same compressed model whose weights you pass"
            )
        used.add(hit)
        node, weight, _ = candidates[hit]
        out[layer] = LayerNode(node.name, node.op_type, weight)
    return out


def _glue_nodes(model: onnx.ModelProto, quantized: set[str]) -> list[str]:
    """Weight-free ops (ReLU, residual add, pooling) whose every input comes from int8 nodes
    with int8 outputs (convolutions, or glue): running them in int8 avoids a dequantize /
    quantize pair between two int8 layers."""
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n.name for n in model.graph.node for o in n.output}
    inside = set(quantized)
    glue: list[str] = []
    for node in model.graph.node:  # topological order: producers come first
        if node.op_type not in _GLUE_OPS:
            continue
        sources = [producer.get(i) for i in node.input if i and i not in inits]
        if sources and all(s is not None and s in inside for s in sources):
            inside.add(node.name)
            glue.append(node.name)
    return glue


def _nbits_nodes(
    a: str,
    y: str,
    w_kn: np.ndarray,
    scale: np.ndarray,
    bias: str | None,
    name: str,
    graph: onnx.GraphProto,
    accuracy_level: int = 0,
) -> list[onnx.NodeProto]:
    """A MatMulNBits node computing ``a @ w_kn (+ bias)`` with symmetric 4-bit weights on the grid
    ``scale[n] * q`` (q in [-8, 7], one scale per output column, repeated in every K block).

    The weight initializers are added to ``graph``; the node(s) are returned.
    """
    k, n = w_kn.shape
    blocks = -(-k // INT4_BLOCK)
    q = np.rint(w_kn / scale[None, :]).astype(np.int64)
    q = np.clip(q, -8, 7) + 8  # unsigned storage, default zero point 8
    padded = np.full((blocks * INT4_BLOCK, n), 8, dtype=np.uint8)
    padded[:k] = q.astype(np.uint8)
    cols = padded.T.reshape(n, blocks, INT4_BLOCK)  # column n, block, element
    packed = (cols[:, :, 0::2] | (cols[:, :, 1::2] << 4)).astype(np.uint8)
    scales = np.repeat(scale.astype(np.float32)[:, None], blocks, axis=1).reshape(-1)
    b_name, s_name = f"{name}_q4", f"{name}_q4_scales"
    graph.initializer.extend(
        [numpy_helper.from_array(packed, b_name), numpy_helper.from_array(scales, s_name)]
    )
    inputs = [a, b_name, s_name]
    out = y if bias is None else f"{name}_q4_out"
    attrs: dict[str, int] = {"K": k, "N": n, "bits": 4, "block_size": INT4_BLOCK}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    node = helper.make_node("MatMulNBits", inputs, [out], name=f"{name}_q4", domain="com.microsoft")
    node.attribute.extend(helper.make_attribute(key, value) for key, value in attrs.items())
    nodes = [node]
    if bias is not None:
        nodes.append(helper.make_node("Add", [out, bias], [y], name=f"{name}_q4_bias"))
    return nodes


def to_matmul_nbits(
    model: onnx.ModelProto, layers: Mapping[str, tuple[LayerNode, int]], *, accuracy_level: int = 0
) -> onnx.ModelProto:
    """Replace the Gemm / MatMul of each linear layer in ``layers`` (layer -> (node, bits <= 4))
    by a 4-bit ``MatMulNBits`` (in place; returns ``model``).

    The integer grid is the policy's: scale = max|w| / (2^(bits-1) - 1) per output channel,
    the one ``fake_quantize`` uses, so the rounding reproduces the torch weights exactly.
    ``accuracy_level`` 0 computes in float (the torch model's numbers); 4 lets ORT round the
    activations to int8 per block for its VNNI kernels (``bench/mixed_precision_bench.py``).
    """
    if not layers:
        return model
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    by_node = {ln.node: (layer, ln, bits) for layer, (ln, bits) in layers.items()}
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        hit = by_node.get(node.name)
        if hit is None:
            new_nodes.append(node)
            continue
        layer, ln, bits = hit
        if ln.op not in ("Gemm", "MatMul"):
            raise ValueError(f"layer {layer!r} is a {ln.op}: only linear layers (Gemm / MatMul) run 4-bit")
        w = numpy_helper.to_array(inits[ln.weight]).astype(np.float64)
        bias: str | None = None
        if ln.op == "Gemm":
            attrs = {a.name: a for a in node.attribute}
            if attrs.get("transA") is not None and attrs["transA"].i:
                raise ValueError(f"layer {layer!r}: Gemm with transA is not a linear layer")
            alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
            beta = attrs["beta"].f if "beta" in attrs else 1.0
            w = (w.T if "transB" in attrs and attrs["transB"].i else w) * alpha
            if len(node.input) > 2 and node.input[2]:
                bias = node.input[2]
                if beta != 1.0:
                    c = numpy_helper.to_array(inits[bias]) * beta
                    bias = f"{node.name}_q4_bias_c"
                    graph.initializer.append(numpy_helper.from_array(c.astype(np.float32), bias))
        qmax = 2 ** (bits - 1) - 1
        scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / qmax
        new_nodes.extend(
            _nbits_nodes(
                node.input[0], node.output[0], w, scale, bias, node.name or layer, graph, accuracy_level
            )
        )
    del graph.node[:]
    graph.node.extend(new_nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _drop_unused_initializers(model)
    return model


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def quantize_layers(
    fp32_path: Path,
    calibration: Iterable[np.ndarray],
    out_path: Path,
    *,
    weights: Mapping[str, np.ndarray],
    precision: Mapping[str, Precision],
    bits: Mapping[str, int] | None = None,
    glue: bool = True,
    int4_accuracy_level: int = 0,
) -> Path:
    """Write ``fp32_path`` with each layer at its ``precision`` to ``out_path`` and return it.

    Args:
        fp32_path: float ONNX export of the compressed model (``export_onnx``).
        calibration: real input batches for the int8 activation ranges (MinMax).
        out_path: destination; a copy of the float file when every layer is fp32.
        weights: layer name -> the weight tensor of the exported model (``CompressedModel``'s,
            used to find each layer's node; a layer absent from the graph is left out).
        precision: layer name -> "fp32" / "int8" / "int4" (``layer_precision``); layers not
            named stay fp32.
        bits: layer name -> policy bits, for the 4-bit grid of "int4" layers (default 4).
        glue: run ReLU / add / pooling ops between int8 layers in int8 as well.
        int4_accuracy_level: MatMulNBits' ``accuracy_level`` (``to_matmul_nbits``).

    Raises:
        QuantizeError: a layer cannot be found in the graph, or ORT fails to quantize.
    """
    from compression.quantize_onnx import QuantizeError, prepare, quantize_qdq

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    wanted = {name: p for name, p in precision.items() if p != "fp32" and name in weights}
    unknown = sorted(set(precision) - set(weights))
    if unknown:
        raise QuantizeError(
            f"no weights given for layer(s) {unknown[:5]}: pass every quantized layer's weight"
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if not wanted:
        out_path.write_bytes(fp32_path.read_bytes())
        return out_path
    with tempfile.TemporaryDirectory(prefix="mt-mixed-") as tmp:
        source = prepare(fp32_path, Path(tmp) / "prepared.onnx")
        model = onnx.load(str(source))
        try:
            nodes = find_layer_nodes(model, {k: weights[k] for k in wanted})
        except ValueError as exc:
            raise QuantizeError(f"{fp32_path.name}: {exc}") from exc
        int8_nodes = [nodes[k].node for k, p in wanted.items() if p == "int8"]
        if int8_nodes:
            convs = {nodes[k].node for k, p in wanted.items() if p == "int8" and nodes[k].op == "Conv"}
            selected = int8_nodes + (_glue_nodes(model, convs) if glue else [])
            staged = Path(tmp) / "int8.onnx"
            # Linear layers keep float outputs: the search's torch model rounds a quantized
            # layer's input and weights only, and a transformer's q / k / v / MLP outputs
            # rounded to uint8 cost the ViT 0.7 points against it (convolutions need int8
            # outputs for ORT's QLinearConv, and lose < 0.2 points on ResNet-20).
            quantize_qdq(source, calibration, staged, nodes=selected, float_outputs=_LINEAR_OPS)
            model = onnx.load(str(staged))
        int4 = {k: (nodes[k], (bits or {}).get(k, 4)) for k, p in wanted.items() if p == "int4"}
        try:
            to_matmul_nbits(model, int4, accuracy_level=int4_accuracy_level)
        except ValueError as exc:
            raise QuantizeError(f"{fp32_path.name}: {exc}") from exc
        onnx.save(model, str(out_path))
    return out_path


def float_graph(gm: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``gm`` without the 8-bit activation fake-quantization ``act_bits`` inserts
    (``compression.evaluate.quantize_activations``): the float file to export. Activations are
    the quantizer's job in the file (calibrated QDQ); exported as ONNX Q/DQ pairs they would
    round differently from torch and fail the export check."""
    if not isinstance(gm, torch.fx.GraphModule):
        return gm
    fq = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target is torch.fake_quantize_per_tensor_affine
    ]
    if not fq:
        return gm
    out = copy.deepcopy(gm)
    for node in list(out.graph.nodes):
        if node.op == "call_function" and node.target is torch.fake_quantize_per_tensor_affine:
            node.replace_all_uses_with(node.args[0])
            out.graph.erase_node(node)
    out.graph.lint()
    out.recompile()
    return out


def layer_weights_of(cm: object) -> dict[str, np.ndarray]:
    """Layer name -> weight of a ``CompressedModel`` (layers still in its graph)."""
    from compression.apply import CompressedModel, get_tensor

    assert isinstance(cm, CompressedModel)
    return {name: get_tensor(cm.gm, t).detach().numpy() for name, t in cm.layer_weights.items()}


def policy_precision(cm: object, *, int4: bool | None = None) -> tuple[dict[str, Precision], dict[str, int]]:
    """(layer -> precision, layer -> bits) of a ``CompressedModel``'s quantized layers."""
    from compression.apply import CompressedModel

    assert isinstance(cm, CompressedModel)
    ops = {layer.name: layer.features.op for layer in cm.source.graph.layers}
    precision: dict[str, Precision] = {}
    bits: dict[str, int] = {}
    for name in cm.layer_weights:
        lp = cm.policy.for_layer(name)
        b = None if lp.pow2 else lp.bits  # power-of-two layers stay float (module docstring)
        if b is not None:
            precision[name] = layer_precision(ops[name], b, int4=int4)
            bits[name] = b
    return precision, bits


def export_policy_onnx(
    cm: object,
    fp32_path: Path,
    calibration: Sequence[np.ndarray] | Iterable[np.ndarray],
    out_path: Path,
    *,
    int4: bool | None = None,
    int4_accuracy_level: int = 0,
) -> tuple[Path, dict[str, Precision]]:
    """The deployable file of a compressed model: its float export ``fp32_path`` with every
    layer at the precision its policy's bits run at (``layer_precision``); returns the path and
    the precision of each quantized layer."""
    precision, bits = policy_precision(cm, int4=int4)
    path = quantize_layers(
        fp32_path,
        calibration,
        out_path,
        weights=layer_weights_of(cm),
        precision=precision,
        bits=bits,
        int4_accuracy_level=int4_accuracy_level,
    )
    return path, precision
