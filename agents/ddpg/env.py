"""The AMC environment: one episode walks the layers in order and decides each one.

The state of a step is a named :class:`StepState` (never a list with magic indices); the
action is a :class:`~agents.actions.LayerAction` as a vector in [0, 1]^4. An optional
:class:`ActionWall` clips each action so a resource budget stays reachable, as in AMC:
whatever the actor does, the finished policy meets the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import gymnasium as gym
import numpy as np

from agents.actions import ACTION_DIM, MOST_COMPRESSED, LayerAction, policy_from_actions
from agents.cost import MacsEstimator
from compression.policy import Policy
from compression.space import LayerFeatures, SearchSpace

CostFn = Callable[[Policy], float]
WALL_STEPS = 8  # bisection steps: the kept fraction is exact to 1/256


def normalised_features(space: SearchSpace) -> np.ndarray:
    """Layer features scaled to [0, 1] per column (log for counts), rows in layer order."""
    x = space.feature_matrix().astype(np.float64)
    names = LayerFeatures.vector_names()
    for j, name in enumerate(names):
        if not name.startswith("op_") and name != "position":
            x[:, j] = np.log1p(np.maximum(x[:, j], 0.0))
    lo, hi = x.min(axis=0), x.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return ((x - lo) / span).astype(np.float32)


@dataclass(frozen=True)
class StepState:
    """What the agent sees before deciding one layer.

    Attributes:
        layer_index: which layer is being decided (position in ``space.layers``).
        features: the layer's normalised static features.
        reduced_so_far: fraction of the dense MACs removed by the layers already decided.
        remaining: fraction of the dense MACs in this and the later layers.
        previous_action: the action taken at the previous layer (zeros at the first).
        budget: the episode's resource budget as a fraction of dense (1 when there is none);
            an agent that draws a budget per episode learns one policy per trade-off.
    """

    layer_index: int
    features: np.ndarray
    reduced_so_far: float
    remaining: float
    previous_action: np.ndarray
    budget: float = 1.0

    def dynamic_vector(self) -> np.ndarray:
        """The part that changes within an episode (the static part is looked up by index)."""
        head = np.asarray([self.reduced_so_far, self.remaining, self.budget], dtype=np.float32)
        return np.concatenate([head, self.previous_action]).astype(np.float32)

    def as_vector(self) -> np.ndarray:
        return np.concatenate([self.features, self.dynamic_vector()]).astype(np.float32)


DYNAMIC_DIM = 3 + ACTION_DIM


class ActionWall:
    """Clips actions so that ``cost_fn(policy) <= budget`` stays reachable (AMC's action space limit).

    At each layer it assumes every later layer will be compressed as much as allowed; if even
    then the budget would be exceeded with the proposed action, the action is shrunk towards
    full compression by bisection until it fits. ``cost_fn`` must not increase when an action
    is shrunk (fewer channels, fewer weights, fewer bits, more skips).
    """

    def __init__(self, space: SearchSpace, cost_fn: CostFn, budget: float) -> None:
        self.space = space
        self.cost_fn = cost_fn
        self.budget = budget

    def _fits(self, decided: dict[int, LayerAction], rest: LayerAction) -> bool:
        return self.cost_fn(policy_from_actions(self.space, decided, rest=rest)) <= self.budget

    def _largest(self, fits: Callable[[float], bool]) -> float | None:
        """Largest s in [0, 1] (to 1/256) with fits(s), None if not even s = 0 fits."""
        if not fits(0.0):
            return None
        lo, hi = 0.0, 1.0
        for _ in range(WALL_STEPS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def clip(self, decided: dict[int, LayerAction], index: int, action: LayerAction) -> LayerAction:
        """``action`` for layer ``index``, shrunk just enough to keep the budget reachable.

        Later layers are assumed fully compressed but not skipped (skipping is the last
        resort), and the width is shrunk before weights and bits, which cost accuracy without
        saving compute on dense runtimes.
        """
        rest = replace(MOST_COMPRESSED, skip=0.0)
        if self._fits({**decided, index: action}, rest):
            return action
        s = self._largest(
            lambda s: self._fits({**decided, index: replace(action, keep_width=action.keep_width * s)}, rest)
        )
        if s is not None:
            return replace(action, keep_width=action.keep_width * s)
        s = self._largest(lambda s: self._fits({**decided, index: action.shrunk(s)}, rest))
        if s is not None:
            return action.shrunk(s)
        # Not reachable without skipping: skip here if this layer opens a block, and let later layers skip.
        skipping = replace(action.shrunk(0.0), skip=1.0)
        s = self._largest(
            lambda s: self._fits({**decided, index: replace(action.shrunk(s), skip=1.0)}, MOST_COMPRESSED)
        )
        return replace(action.shrunk(s), skip=1.0) if s is not None else skipping


class CompressionEnv(gym.Env[np.ndarray, np.ndarray]):
    """Gymnasium environment: ``len(space.layers)`` steps, one layer each, policy at the end.

    ``reset(options={"budget": b})`` sets the wall's budget for one episode. With
    ``centred_width``, the width action is an offset from the episode's *uniform level*: the
    one width which, kept at every layer, just meets the budget (the rule agent's uniform
    policy); 0.5 means that level, 0 and 1 half the range narrower or wider. An actor that
    outputs 0.5 everywhere then starts from a policy that meets the budget with the
    compression spread evenly, rather than the wall's greedy one (early layers kept,
    late ones crushed). ``info["raw_action"]`` is the executed action in the actor's terms.
    The reward is 0
    until the last step, then ``reward_fn(policy)`` if one was given (agents
    that evaluate outside the environment, as in ask/tell, leave it None and read
    ``info["policy"]``).
    """

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012

    def __init__(
        self,
        space: SearchSpace,
        *,
        wall: ActionWall | None = None,
        reward_fn: Callable[[Policy], float] | None = None,
        centred_width: bool = False,
    ) -> None:
        if not space.layers:
            raise ValueError("the search space has no layers to decide")
        self.space = space
        self.wall = wall
        self.reward_fn = reward_fn
        self.features = normalised_features(space)
        self.estimator = MacsEstimator(space)
        self._dense_share = self.estimator.dense / self.estimator.total
        dim = self.features.shape[1] + DYNAMIC_DIM
        self.observation_space = gym.spaces.Box(-1.0, 2.0, shape=(dim,), dtype=np.float32)
        self.action_space = gym.spaces.Box(0.0, 1.0, shape=(ACTION_DIM,), dtype=np.float32)
        self._decided: dict[int, LayerAction] = {}
        self._index = 0
        self._previous = np.zeros(ACTION_DIM, dtype=np.float32)
        self.centred_width = centred_width
        self.width_centre = 1.0

    def uniform_level(self) -> float:
        """The largest keep_width which, at every layer (all else kept), fits the wall's budget."""
        if self.wall is None:
            return 1.0
        wall = self.wall

        def fits(w: float) -> bool:
            uniform = policy_from_actions(self.space, {}, rest=LayerAction(keep_width=w))
            return wall.cost_fn(uniform) <= wall.budget

        if fits(1.0):
            return 1.0
        lo, hi = 0.0, 1.0
        for _ in range(WALL_STEPS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    @property
    def state(self) -> StepState:
        """The state before deciding the current layer."""
        i = self._index
        policy = policy_from_actions(self.space, self._decided)
        reduced = 1.0 - self.estimator.fraction(policy)
        return StepState(
            layer_index=i,
            features=self.features[min(i, len(self.space.layers) - 1)],
            reduced_so_far=float(reduced),
            remaining=float(self._dense_share[i:].sum()),
            previous_action=self._previous.copy(),
            budget=float(self.wall.budget) if self.wall is not None else 1.0,
        )

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if options and "budget" in options:
            if self.wall is None:
                raise ValueError("a per-episode budget needs an action wall")
            self.wall.budget = float(options["budget"])
        self._decided = {}
        self._index = 0
        self._previous = np.zeros(ACTION_DIM, dtype=np.float32)
        self.width_centre = self.uniform_level() if self.centred_width else 1.0
        state = self.state
        return state.as_vector(), {"state": state}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        raw = np.asarray(action, dtype=np.float64).ravel().copy()
        if self.centred_width:
            raw[0] = raw[0] + self.width_centre - 0.5
        act = LayerAction.from_array(raw)
        if self.wall is not None:
            act = self.wall.clip(self._decided, self._index, act)
        executed = act.as_array()
        if self.centred_width:
            executed[0] = min(1.0, max(0.0, executed[0] - self.width_centre + 0.5))
        self._decided[self._index] = act
        self._previous = act.as_array()
        self._index += 1
        done = self._index >= len(self.space.layers)
        info: dict[str, Any] = {"action": act, "raw_action": executed}
        reward = 0.0
        if done:
            policy = policy_from_actions(self.space, self._decided)
            info["policy"] = policy
            if self.reward_fn is not None:
                reward = float(self.reward_fn(policy))
        state = self.state
        info["state"] = state
        return state.as_vector(), reward, done, False, info
