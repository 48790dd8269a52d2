"""Search agents behind one ask/tell protocol; they see only the space, policies, objective and scores.

Implementation lives in the submodules; public names are re-exported here.
"""

from agents.base import Agent
from agents.objective import Goal, Objective, Score, hypervolume_2d, pareto_front
from agents.registry import AGENTS, make

__all__ = ["AGENTS", "Agent", "Goal", "Objective", "Score", "hypervolume_2d", "make", "pareto_front"]
