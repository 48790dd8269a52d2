"""Fine-grained sparsity masks and weight fake-quantization.

Masks are boolean tensors of the weight's shape (True = kept). They are made by
magnitude, which is what the accuracy after BN recalibration rewards without
fine-tuning, and satisfy their scheme exactly:

* unstructured: exactly ``round(sparsity · numel)`` weights zeroed;
* N:M: in every run of M consecutive *input* weights (same output channel and
  kernel position) at most N are kept (a trailing shorter run keeps at most N);
* 1×N block: N consecutive *output* channels at the same input index and kernel
  position are kept or zeroed together (a trailing shorter block likewise).
"""

from __future__ import annotations

import torch

from compression.policy import LayerPolicy


def _to_input_last(w: torch.Tensor) -> torch.Tensor:
    """[O, I, kh, kw] -> [O, kh, kw, I]; [O, I] unchanged."""
    return w.permute(0, 2, 3, 1) if w.dim() == 4 else w


def _from_input_last(w: torch.Tensor) -> torch.Tensor:
    return w.permute(0, 3, 1, 2) if w.dim() == 4 else w


def unstructured_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the ``round(sparsity · numel)`` smallest-magnitude weights."""
    k = round(sparsity * w.numel())
    mask = torch.ones(w.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.argsort(w.detach().abs().flatten(), stable=True)
        mask[order[:k]] = False
    return mask.view_as(w)


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N largest of every M consecutive weights along the input dimension."""
    wl = _to_input_last(w.detach().abs())
    lead, i = wl.shape[:-1], wl.shape[-1]
    pad = (-i) % m
    padded = torch.nn.functional.pad(wl, (0, pad), value=-1.0)  # padding is never kept
    runs = padded.reshape(*lead, (i + pad) // m, m)
    top = runs.topk(min(n, m), dim=-1).indices
    keep = torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, top, True)
    keep = keep & (runs >= 0)
    keep = keep.reshape(*lead, i + pad)[..., :i]
    return _from_input_last(keep).contiguous()


def block_mask(w: torch.Tensor, block: int, sparsity: float) -> torch.Tensor:
    """Zero whole 1×N blocks (N consecutive output channels at one input position)."""
    o = w.shape[0]
    flat = w.detach().abs().reshape(o, -1)
    pad = (-o) % block
    padded = torch.nn.functional.pad(flat, (0, 0, 0, pad))
    blocks = padded.reshape((o + pad) // block, block, -1)
    sizes = torch.full((blocks.shape[0], 1), float(block))
    if pad:
        sizes[-1] = block - pad
    score = blocks.sum(dim=1) / sizes  # mean magnitude, fair to a short tail block
    k = round(sparsity * score.numel())
    keep_blocks = torch.ones(score.numel(), dtype=torch.bool)
    if k > 0:
        keep_blocks[torch.argsort(score.flatten(), stable=True)[:k]] = False
    keep = keep_blocks.view_as(score).unsqueeze(1).expand_as(blocks).reshape(o + pad, -1)[:o]
    return keep.reshape(w.shape).contiguous()


def layer_mask(w: torch.Tensor, lp: LayerPolicy) -> torch.Tensor | None:
    """The mask the layer policy asks for, or None for dense."""
    if lp.scheme == "unstructured" and lp.sparsity > 0:
        return unstructured_mask(w, lp.sparsity)
    if lp.scheme == "nm" and lp.nm is not None:
        return nm_mask(w, *lp.nm)
    if lp.scheme == "block" and lp.block is not None and lp.sparsity > 0:
        return block_mask(w, lp.block, lp.sparsity)
    return None


def fake_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel quantization to ``bits``, returned in float.

    Zeros stay zero, so masks survive quantization.
    """
    qmax = 2 ** (bits - 1) - 1
    flat = w.detach().reshape(w.shape[0], -1)
    scale = flat.abs().amax(dim=1).clamp(min=1e-12) / qmax
    q = torch.clamp(torch.round(flat / scale[:, None]), -qmax, qmax)
    return (q * scale[:, None]).reshape(w.shape).to(w.dtype)
