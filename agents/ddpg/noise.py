"""AMC's exploration: a truncated normal around the actor's action whose spread decays."""

from __future__ import annotations

import numpy as np


class TruncatedNormalNoise:
    """Samples in [0, 1] around a mean; ``sigma`` shrinks by ``decay`` after every episode.

    Truncation is by rejection (redrawing the out-of-range entries), so the spread stays
    honest near the bounds instead of piling up on them as clipping would.
    """

    def __init__(self, sigma: float, decay: float, min_sigma: float = 0.02) -> None:
        self.sigma = sigma
        self.decay = decay
        self.min_sigma = min_sigma

    def sample(self, mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = rng.normal(mean, self.sigma)
        for _ in range(32):
            bad = (out < 0.0) | (out > 1.0)
            if not bad.any():
                break
            out[bad] = rng.normal(mean[bad], self.sigma)
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    def step(self) -> None:
        """Decay after an episode."""
        self.sigma = max(self.min_sigma, self.sigma * self.decay)
