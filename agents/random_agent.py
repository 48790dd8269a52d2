"""The baseline: policies drawn uniformly from the space, ignoring every score."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from agents.base import Agent
from agents.objective import Objective, Score
from compression.policy import Policy
from compression.space import SearchSpace


class RandomAgent(Agent):
    """Uniform sampling (``SearchSpace.sample``); the bar every learning agent must clear."""

    name = "random"

    def __init__(self, space: SearchSpace, objective: Objective, seed: int = 0) -> None:
        super().__init__(space, objective, seed)
        self.rng = random.Random(seed)

    def ask(self, n: int = 1) -> list[Policy]:
        self._check_n(n)
        return [self.space.sample(self.rng) for _ in range(n)]

    def tell(self, policies: Sequence[Policy], scores: Sequence[Score]) -> None:
        self._check_tell(policies, scores)

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"agent": self.name, "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
