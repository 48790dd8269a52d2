"""Per-node timings from ONNX Runtime's profiler, and how they split a model over predictor rows.

Timing whole models gives one number per measurement; the kernel predictor has to split it
over a dozen kernels it never sees alone, which a few hundred measurements cannot pin down
on new architectures. ONNX Runtime's profiler times every node of the optimized graph in
the same kind of run, so one measurement also says how the model's time divides: nn-Meter's
per-kernel supervision without timing kernels one by one.

``profile_onnx`` runs a model under the profiler and keeps, per node in execution order, its
op type, output size and median time. ``row_shares`` assigns those nodes to the rows of
``latency_models.rows`` (one per prunable layer, plus the model row): a node whose op computes
a layer (Conv, QLinearConv, Gemm, QGemm, MatMul with weights ...) is matched to the earliest
unmatched layer whose output size it has; weight-free nodes go with the kernel they serve
(layout reorders and quantize nodes before a kernel with the next one, everything else -
activations, adds, pooling, attention products, dequantize - with the previous one). The
shares of the summed node times are what the predictor is taught, never the profiled
times themselves: the profiler adds its own overhead and a loaded machine inflates whole
profiled runs, so the measured total stays the interleaved timing of the harness.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compression.policy import Policy
from compression.space import SearchSpace

__all__ = ["KERNEL_OPS", "profile_onnx", "row_shares"]

#: Ops that compute a prunable layer (a weight) in ONNX Runtime's optimized CPU graph.
KERNEL_OPS = frozenset(
    {
        "Conv",
        "FusedConv",
        "NhwcFusedConv",
        "QLinearConv",
        "ConvInteger",
        "Gemm",
        "FusedGemm",
        "QGemm",
        "MatMul",
        "FusedMatMul",
        "QLinearMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "MatMulNBits",  # 4-bit Linear weights
    }
)
#: Weight-free ops that prepare the input of the next kernel.
_LEADING = frozenset({"ReorderInput", "QuantizeLinear", "DynamicQuantizeLinear"})


def profile_onnx(
    model: Path | str,
    device: Any,
    *,
    runs: int = 30,
    warmup: int = 5,
    input_shape: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Profile an ONNX model on an ONNX Runtime device; returns ``{"model_us", "nodes"}``.

    ``nodes`` lists the optimized graph's nodes in execution order as ``{"name", "op", "us",
    "out_numel"}`` (median over ``runs`` runs after ``warmup``). The profiler adds its own
    overhead, so use the shares, not the absolute numbers.
    """
    import onnxruntime as ort

    runtime = device.make_runtime()
    if not hasattr(runtime, "_options"):
        raise ValueError(f"device {device.name}: profiling needs an ONNX Runtime device")
    with tempfile.TemporaryDirectory(prefix="mt-profile-") as tmp:
        options = runtime._options()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0]
        shape = (
            tuple(int(d) for d in input_shape)
            if input_shape is not None
            else tuple(d if isinstance(d, int) and d > 0 else 1 for d in inp.shape)
        )
        feed = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        for _ in range(warmup + runs):
            session.run(None, feed)
        path = session.end_profiling()
        events = json.loads(Path(path).read_text())
        os.remove(path)
    return summarize_profile(events, warmup)


def summarize_profile(events: Sequence[Mapping[str, Any]], warmup: int = 0) -> dict[str, Any]:
    """Median time per node (execution order) and per run from ONNX Runtime profile events."""
    runs = [float(e["dur"]) for e in events if e.get("name") == "model_run"]
    times: dict[str, list[float]] = {}
    info: dict[str, dict[str, Any]] = {}
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = name[: -len("_kernel_time")]
        times.setdefault(node, []).append(float(e["dur"]))
        if node not in info:
            args = e.get("args") or {}
            outs = args.get("output_type_shape") or []
            dims: list[int] = next(iter(outs[0].values()), []) if outs and isinstance(outs[0], dict) else []
            info[node] = {"op": str(args.get("op_name", "")), "out_numel": int(np.prod(dims)) if dims else 0}
    nodes = [
        {
            "name": n,
            "op": info[n]["op"],
            "us": float(np.median(t[warmup:] or t)),
            "out_numel": info[n]["out_numel"],
        }
        for n, t in times.items()
    ]
    return {"model_us": float(np.median(runs[warmup:] or runs)) if runs else 0.0, "nodes": nodes}


def _layer_numels(space: SearchSpace, cout: np.ndarray) -> list[set[int]]:
    """Output sizes a node computing each layer may report (channels padded to 8 / 16 or not)."""
    out = []
    for ls, c in zip(space.layers, cout, strict=True):
        f = ls.features
        hw = f.out_h * f.out_w
        c = int(c)
        out.append({c * hw, -(-c // 16) * 16 * hw, -(-c // 8) * 8 * hw})
    return out


def row_shares(space: SearchSpace, policy: Policy, profile: Mapping[str, Any]) -> np.ndarray | None:
    """Share of the model's time of each row (``RowIndex.keys`` order for this one policy).

    Rows are the present layers in order, then the model row. A layer no node could be
    matched to gets NaN; None when fewer than half of the layers were matched (the profile
    does not describe this graph well enough to teach anything).
    """
    from latency_models.rows import row_index

    idx = row_index(space)
    pa = idx.arrays([policy])
    present = np.flatnonzero(pa.present[0])
    numels = _layer_numels(space, pa.cout[0])
    nodes = list(profile.get("nodes") or [])
    if not nodes or not len(present):
        return None
    owner = np.full(len(nodes), -1)  # row index (position in ``present``) of each node
    matched = np.zeros(len(present), dtype=bool)
    for j, node in enumerate(nodes):
        if node["op"] not in KERNEL_OPS or not node["out_numel"]:
            continue
        for r, layer in enumerate(present):
            if not matched[r] and node["out_numel"] in numels[layer]:
                owner[j] = r
                matched[r] = True
                break
    if matched.sum() < 0.5 * len(present):
        return None
    kernel_nodes = np.flatnonzero(owner >= 0)
    n_rows = len(present) + 1
    model_row = n_rows - 1
    assign = np.full(len(nodes), model_row)
    for j in range(len(nodes)):
        if owner[j] >= 0:
            assign[j] = owner[j]
            continue
        before = kernel_nodes[kernel_nodes < j]
        after = kernel_nodes[kernel_nodes > j]
        if nodes[j]["op"] in _LEADING and len(after):
            assign[j] = owner[after[0]]
        elif len(before):
            assign[j] = owner[before[-1]]
        elif len(after):
            assign[j] = owner[after[0]]
    us = np.array([float(n["us"]) for n in nodes])
    row_us = np.bincount(assign, weights=us, minlength=n_rows)
    total = row_us.sum()
    if total <= 0:
        return None
    shares = row_us / total
    shares[:-1][~matched] = np.nan
    return shares
