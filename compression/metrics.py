"""Size and MAC accounting of a (compressed) model.

Size is what the weights take as stored:

* a dense layer: ``numel · bits / 8`` (bits = 32 for float);
* a masked layer: its scheme's sparse form (``Scheme.sparse_bytes``), or dense if smaller:
  unstructured: the non-zeros plus a 1-bit-per-weight mask; N:M: the non-zeros plus
  ``ceil(log2 M)`` bits of position per non-zero; 1×N block: the kept weights plus a
  1-bit-per-block mask; pattern: the kept weights, ``ceil(log2 K)`` bits of pattern per kept
  kernel, a connectivity bit per kernel and the K patterns (9 bits each);
* quantized layers (uniform or power-of-two codes of ``bits`` each) add one float32 scale
  per output channel;
* every other tensor (biases, norms, embeddings, BN statistics) at 4 bytes.

MACs count Conv2d, Linear and attention matrix products for one sample.
``macs`` is the dense count of the (narrowed) model; ``effective_macs`` scales
each layer by the fraction of its weights that are non-zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from compression import schemes
from compression.apply import CompressedModel
from compression.graph import CONV, LINEAR, attr_target
from compression.policy import LayerPolicy

aten = torch.ops.aten
_MATMUL = {aten.matmul.default, aten.bmm.default, aten.mm.default}


@dataclass(frozen=True)
class ModelMetrics:
    """Cost figures of one model.

    Attributes:
        size_bytes: bytes as stored (see module docstring).
        params: parameter elements kept (non-zeros of masked weights included as dense).
        macs: dense multiply-accumulates for one sample.
        effective_macs: MACs that touch a non-zero weight.
    """

    size_bytes: int
    params: int
    macs: int
    effective_macs: int


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.layer_macs: dict[str, int] = {}
        self.other_macs = 0
        self._node: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self._node = n  # call_function sees values only; the node names the weight
        return super().run_node(n)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        out = super().call_function(target, args, kwargs)
        if target in CONV | LINEAR:
            assert self._node is not None
            w = args[1]
            name = attr_target(self._node.args[1]) or self._node.name
            self.layer_macs[name] = int(out.numel() // out.shape[0] * (w.numel() // w.shape[0]))
        elif target in _MATMUL or target == aten.scaled_dot_product_attention.default:
            self.other_macs += _matmul_macs(target, args, out)
        return out


def _matmul_macs(target: Any, args: Any, out: torch.Tensor) -> int:
    if target == aten.scaled_dot_product_attention.default:
        q, k = args[0], args[1]
        # QK^T and the weighted sum of V: two products of L×S×E per head.
        return int(2 * q.numel() // q.shape[0] * k.shape[-2])
    a = args[0]
    return int(out.numel() // out.shape[0] * a.shape[-1])


@torch.no_grad()
def layer_macs(gm: fx.GraphModule, example: torch.Tensor) -> tuple[dict[str, int], int]:
    """MACs per weight target (one sample) and MACs of weight-free matrix products."""
    rec = _ShapeRecorder(gm)
    rec.run(example[:1])
    return rec.layer_macs, rec.other_macs


def _weight_bytes(w: torch.Tensor, mask: torch.Tensor | None, bits: int | None, lp: LayerPolicy) -> int:
    """Stored bytes of one layer weight: dense, or its scheme's sparse form when smaller."""
    b = bits or 32
    dense = math.ceil(w.numel() * b / 8)
    scales = 4 * w.shape[0] if bits else 0
    if mask is None:
        return dense + scales
    return min(dense, schemes.get(lp.scheme).sparse_bytes(w, mask, b, lp)) + scales


def measure(cm: CompressedModel) -> ModelMetrics:
    """Size, parameters and MACs of a compressed model."""
    gm = cm.gm
    per_layer, other = layer_macs(gm, cm.example_input())
    weight_of = {v: k for k, v in cm.layer_weights.items()}
    size = 0
    params = 0
    macs = other
    eff = other
    for name, tensor in list(gm.named_parameters()) + list(gm.named_buffers()):
        if not tensor.is_floating_point():
            continue
        params += tensor.numel() if isinstance(tensor, torch.nn.Parameter) else 0
        if name in weight_of:
            lp = cm.policy.for_layer(weight_of[name])
            mask = cm.masks.get(name)
            size += _weight_bytes(tensor, mask, cm.bits.get(name) or cm.pow2.get(name), lp)
            m = per_layer.get(name, 0)
            macs += m
            density = float(mask.float().mean()) if mask is not None else 1.0
            eff += round(m * density)
        else:
            size += 4 * tensor.numel()
    return ModelMetrics(size_bytes=size, params=params, macs=macs, effective_macs=eff)
