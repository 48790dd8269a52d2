"""Fine-grained sparsity masks and weight fake-quantization.

Each scheme computes its own mask (``compression.schemes``); this module applies the one a
layer policy names and re-exports the built-in mask functions. Masks are boolean tensors of
the weight's shape (True = kept). They are made by magnitude, which is what the accuracy
after BN recalibration rewards without fine-tuning, and satisfy their scheme exactly:

* unstructured: exactly ``round(sparsity · numel)`` weights zeroed;
* N:M: in every run of M consecutive *input* weights (same output channel and
  kernel position) at most N are kept (a trailing shorter run keeps at most N);
* 1×N block: N consecutive *output* channels at the same input index and kernel
  position are kept or zeroed together (a trailing shorter block likewise).
"""

from __future__ import annotations

import torch

from compression import schemes
from compression.policy import LayerPolicy
from compression.schemes.block import block_mask
from compression.schemes.nm import nm_mask
from compression.schemes.unstructured import unstructured_mask

__all__ = ["block_mask", "fake_quantize", "layer_mask", "nm_mask", "unstructured_mask"]


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
