"""Power-of-two weights (SmartDeal): each weight is 0 or ± scale · 2^-j, one scale per output channel.

A layer policy with ``"bits": N`` and ``"pow2": true`` stores every weight as an N-bit code, the
sign included: 0, or a sign and one of ``m = 2^(N-1) - 1`` magnitudes
``scale · 2^0, scale · 2^-1, …, scale · 2^-(m-1)`` (N = 2: ternary ±scale; N = 4: seven
magnitudes over a range of 64). Multiplying by such a weight is a shift, which is what
SmartDeal's hardware exploits; here it is the grid the weights are rounded onto.

Choices the issue leaves open:

* **Rounding**: to the nearest level in value (not in log2), so a weight below half the
  smallest magnitude becomes 0 and one above the top level is clipped to it.
* **Scale**: per output channel, the one of ``amax · 2^(-t/8)``, t = 0 … 32 (the channel's
  largest |w| down to a 16th of it, 8 steps per octave) whose rounding has the least squared
  error. Values below ``amax / 2`` matter for few codes (ternary's best scale is about a third
  of ``amax`` on Gaussian weights); with many codes they only clip the largest weights.
  Ties keep the larger scale, so a weight set already on a grid whose top level it uses
  finds that grid again: rounding is idempotent, as ``fake_quantize`` is on its own grid.
* **Stored size**: the N-bit codes plus a float32 scale per output channel, as uniform bits
  (``compression.metrics``).
* **Export**: the ONNX file holds the de-quantized float values (the layer runs as a float
  kernel). ONNX Runtime's int8 QDQ picks its own per-channel scale (``amax / 127``), on which
  these levels are not exact, so a pow2 layer is never put in an int8 container
  (``compression.mixed_precision``); the latency features treat it as a float layer.

Levels are computed in float64, and a power-of-two multiple of a float32 scale is exact in
float32 (above the subnormal range), so the float32 weights are exactly on the grid.
"""

from __future__ import annotations

import torch

__all__ = ["SCALE_STEPS", "magnitudes", "pow2_quantize", "pow2_round", "pow2_scale"]

#: Candidate scales per output channel: ``amax · 2^(-t / 8)`` for t = 0 … 32.
SCALE_STEPS = 8
_OCTAVES = 4


def magnitudes(bits: int) -> int:
    """Non-zero magnitudes of an N-bit sign + power-of-two code: ``2^(N-1) - 1``."""
    if bits < 2:
        raise ValueError(f"a power-of-two code needs at least 2 bits (sign and one magnitude), got {bits}")
    return 2 ** (bits - 1) - 1


def _per_row(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return scale.to(torch.float64).reshape(-1, *([1] * (like.dim() - 1)))


def pow2_round(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` (rows = output channels) rounded to the nearest of 0, ± ``scale[row]`` · 2^-j,
    j < ``magnitudes(bits)``; float64. ``scale`` must be positive."""
    s = _per_row(scale, x)
    a = x.to(torch.float64).abs() / s
    smallest = 2.0 ** -(magnitudes(bits) - 1)
    lo = torch.exp2(torch.floor(torch.log2(a.clamp(min=smallest / 4))))  # a in [lo, 2·lo)
    q = torch.where(a - lo <= 2.0 * lo - a, lo, 2.0 * lo).clamp(max=1.0)
    q = torch.where(q >= smallest, q, torch.where(a >= smallest / 2, smallest, 0.0))
    return torch.sign(x.to(torch.float64)) * q * s


def pow2_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per output channel, the candidate scale whose rounding of ``w`` has the least squared error."""
    flat = w.detach().to(torch.float64).reshape(w.shape[0], -1)
    amax = flat.abs().amax(dim=1).clamp(min=1e-12)
    best_scale = amax.clone()
    best_err = torch.full_like(amax, float("inf"))
    for t in range(SCALE_STEPS * _OCTAVES + 1):
        scale = amax * 2.0 ** (-t / SCALE_STEPS)
        err = ((pow2_round(flat, scale, bits) - flat) ** 2).sum(dim=1)
        better = err < best_err  # strict: ties keep the larger scale
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


def pow2_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``w`` on its power-of-two grid (per-channel scale by :func:`pow2_scale`), in ``w``'s dtype.

    Zeros stay zero, so masks survive it.
    """
    return pow2_round(w.detach(), pow2_scale(w, bits), bits).to(w.dtype)
