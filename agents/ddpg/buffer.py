"""Replay buffer of layer steps, in fixed numpy arrays so it serialises exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from agents._serial import decode, encode


@dataclass(frozen=True)
class Batch:
    """Sampled transitions (arrays with a leading batch axis)."""

    layer: np.ndarray
    dynamic: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    next_layer: np.ndarray
    next_dynamic: np.ndarray
    done: np.ndarray


class ReplayBuffer:
    """Ring buffer of (layer, dynamic, action, reward, next layer, next dynamic, done)."""

    def __init__(self, capacity: int, dynamic_dim: int, action_dim: int) -> None:
        self.capacity = capacity
        self.layer = np.zeros(capacity, dtype=np.int64)
        self.dynamic = np.zeros((capacity, dynamic_dim), dtype=np.float32)
        self.action = np.zeros((capacity, action_dim), dtype=np.float32)
        self.reward = np.zeros(capacity, dtype=np.float32)
        self.next_layer = np.zeros(capacity, dtype=np.int64)
        self.next_dynamic = np.zeros((capacity, dynamic_dim), dtype=np.float32)
        self.done = np.zeros(capacity, dtype=np.float32)
        self.size = 0
        self.cursor = 0

    def add(
        self,
        layer: int,
        dynamic: np.ndarray,
        action: np.ndarray,
        reward: float,
        next_layer: int,
        next_dynamic: np.ndarray,
        done: bool,
    ) -> None:
        i = self.cursor
        self.layer[i], self.dynamic[i], self.action[i] = layer, dynamic, action
        self.reward[i], self.next_layer[i], self.next_dynamic[i] = reward, next_layer, next_dynamic
        self.done[i] = float(done)
        self.cursor = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        idx = rng.integers(0, self.size, size=min(batch_size, self.size))
        return Batch(
            self.layer[idx],
            self.dynamic[idx],
            self.action[idx],
            self.reward[idx],
            self.next_layer[idx],
            self.next_dynamic[idx],
            self.done[idx],
        )

    _ARRAYS = ("layer", "dynamic", "action", "reward", "next_layer", "next_dynamic", "done")

    def state_dict(self) -> dict[str, Any]:
        # Only the filled part is stored; the ring position is enough to restore the rest.
        arrays = {k: encode(getattr(self, k)[: self.size]) for k in self._ARRAYS}
        return {"size": self.size, "cursor": self.cursor, **arrays}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size, self.cursor = int(state["size"]), int(state["cursor"])
        for k in self._ARRAYS:
            getattr(self, k)[: self.size] = decode(state[k])
