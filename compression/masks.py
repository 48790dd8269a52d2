"""Fine-grained sparsity masks and weight fake-quantization.

Each scheme computes its own mask (``compression.schemes``); this module applies the one a
layer policy names and re-exports the built-in mask functions. Masks are boolean tensors of
the weight's shape (True = kept). They are made by magnitude, which is what the accuracy
after BN recalibration rewards without fine-tuning, and satisfy their scheme exactly:

* unstructured: exactly ``round(sparsity · numel)`` weights zeroed;
* N:M: in every run of M consecutive *input* weights (same output channel and
  kernel position) at most N are kept (a trailing shorter run keeps at most N);
* 1×N block: N consecutive *output* channels at the same input index and kernel
  position are kept or zeroed together (a trailing shorter block likewise);
* pattern: every kept 3×3 kernel keeps exactly 4 of its 9 weights, in one of at most K
  patterns per layer, and ``round(sparsity · kernels)`` kernels are zeroed whole.

Quantization (:func:`quantize_weight`) is symmetric per output channel, on a uniform grid
(:func:`fake_quantize`) or a power-of-two one (``compression.pow2``).
"""

from __future__ import annotations

import torch

from compression import schemes
from compression.policy import LayerPolicy
from compression.pow2 import pow2_quantize
from compression.schemes.block import block_mask
from compression.schemes.nm import nm_mask
from compression.schemes.pattern import pattern_mask
from compression.schemes.unstructured import unstructured_mask

__all__ = [
    "block_mask",
    "fake_quantize",
    "layer_mask",
    "nm_mask",
    "pattern_mask",
    "quantize_weight",
    "unstructured_mask",
]


def layer_mask(w: torch.Tensor, lp: LayerPolicy) -> torch.Tensor | None:
    """The mask the layer policy asks for (its scheme's ``mask``), or None when nothing is zeroed."""
    return schemes.get(lp.scheme).mask(w, lp)


def fake_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel quantization to ``bits``, returned in float.

    Zeros stay zero, so masks survive quantization.
    """
    qmax = 2 ** (bits - 1) - 1
    flat = w.detach().reshape(w.shape[0], -1)
    scale = flat.abs().amax(dim=1).clamp(min=1e-12) / qmax
    q = torch.clamp(torch.round(flat / scale[:, None]), -qmax, qmax)
    return (q * scale[:, None]).reshape(w.shape).to(w.dtype)


def quantize_weight(w: torch.Tensor, bits: int, *, pow2: bool = False) -> torch.Tensor:
    """``w`` rounded on its layer's grid: power-of-two levels with ``pow2``, else uniform."""
    return pow2_quantize(w, bits) if pow2 else fake_quantize(w, bits)
