"""The one protocol every search agent follows: ask, tell, and a JSON state for resuming.

Modelled on Optuna's ask/tell: the caller owns the loop and the evaluation, the agent only
proposes and learns. ``state_dict`` is plain JSON (it is stored in a SQL JSON column), and an
agent restored from it after any ``tell`` proposes exactly what it would have proposed had it
never stopped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from agents.objective import Objective, Score
from compression.policy import Policy
from compression.space import SearchSpace


class Agent(ABC):
    """A search algorithm over one :class:`SearchSpace` for one :class:`Objective`.

    Attributes:
        space: the decision points and their allowed choices.
        objective: how candidates are judged.
        seed: everything random in the agent derives from it.
    """

    name: str = "agent"

    def __init__(self, space: SearchSpace, objective: Objective, seed: int = 0) -> None:
        self.space = space
        self.objective = objective
        self.seed = seed

    @abstractmethod
    def ask(self, n: int = 1) -> list[Policy]:
        """Propose ``n`` policies to evaluate (valid for ``space``; may repeat earlier ones)."""

    @abstractmethod
    def tell(self, policies: Sequence[Policy], scores: Sequence[Score]) -> None:
        """Report the scores of ``policies`` (usually the ones just asked, in any order)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: JSON-serialisable (tensors as base64)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (of an agent built with the same space, objective, seed)."""

    def set_objective(self, objective: Objective) -> None:
        """Replace the objective (the search loop fills in the dense reference after start-up)."""
        self.objective = objective

    @staticmethod
    def _check_tell(policies: Sequence[Policy], scores: Sequence[Score]) -> None:
        if len(policies) != len(scores):
            raise ValueError(f"tell got {len(policies)} policies but {len(scores)} scores")

    @staticmethod
    def _check_n(n: int) -> None:
        if n < 1:
            raise ValueError(f"ask(n) needs n >= 1, got {n}")
