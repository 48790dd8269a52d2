"""DDPG over the layer-walking environment (AMC): warm-up, decaying noise, replay, target nets.

One asked policy is one episode. Its transitions wait until the policy's score is told;
then every step of the episode gets the episode's reward minus a moving-average baseline
(AMC's variance reduction, with discount 1) and the networks take one update per layer.

Three departures from AMC, for searches of a few hundred candidates rather than AMC's 400
episodes of one budget (see :class:`DDPGConfig`): the actor starts at a near-dense prior
(exploration begins around the trained model, not at uniform noise); without a constraint
each episode draws its own budget, which is part of the state (one actor for the whole
front); and the actor also imitates the best episodes so far (self-imitation).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agents._serial import decode, encode
from agents.actions import ACTION_DIM
from agents.base import Agent
from agents.cost import MacsEstimator
from agents.ddpg.buffer import ReplayBuffer
from agents.ddpg.env import DYNAMIC_DIM, ActionWall, CompressionEnv, CostFn
from agents.ddpg.networks import Actor, Critic, FeatureEncoder
from agents.ddpg.noise import TruncatedNormalNoise
from agents.objective import Objective, Score
from compression.policy import Policy
from compression.space import SearchSpace

EncoderFactory = Callable[[SearchSpace, torch.Tensor, int], nn.Module]
"""(space, normalised features, dynamic dim) -> a fresh state encoder."""

Step = tuple[int, np.ndarray, np.ndarray, int, np.ndarray, bool]
"""(layer, dynamic state, executed action, next layer, next dynamic state, done)."""


@dataclass(frozen=True, eq=False)
class Elite:
    """A told episode worth imitating: its accuracy, cost, reward and steps."""

    accuracy: float
    cost: float
    reward: float
    steps: list[Step]


@dataclass(frozen=True)
class DDPGConfig:
    """Hyper-parameters (AMC's, scaled down to searches of a few hundred candidates).

    Attributes:
        hidden: width of the actor's and critic's hidden layers.
        actor_lr / critic_lr: Adam learning rates.
        tau: soft-update rate of the target networks.
        discount: AMC uses 1 (the reward arrives only at the end of the episode).
        warmup_episodes: episodes before the networks start learning (their actions are the
            initial actor's plus noise, i.e. explorations around ``prior``).
        batch_size: transitions per update.
        buffer_episodes: replay capacity, in episodes.
        noise_sigma / noise_decay / noise_min: initial spread of the exploration noise, its
            decay per episode and its floor.
        baseline_momentum: of the moving-average reward subtracted from each reward.
        prior: the action (keep_width, keep_weights, bits, skip) the untrained actor takes at
            every layer: keep nearly all weights and bits, as AMC starts from the dense model,
            and the width at the budget's uniform level (0.5 with an action wall, see
            ``CompressionEnv``; dense without one), so early episodes are sensible
            compressions rather than uniform noise (which destroys a trained network).
        budget_range: without a resource constraint, each episode draws a budget (fraction of
            the dense cost) from this range, the action wall enforces it and the reward is the
            accuracy (AMC's resource-constrained reward), with the budget part of the state:
            one actor learns the whole accuracy / cost trade-off instead of one point.
            None: AMC's single accuracy-guaranteed reward, -error * log(resource).
        imitation: weight of self-imitation in the actor's loss: the actor is also pulled
            towards the actions of the best episodes so far (the Pareto front of accuracy and
            cost, or the top rewards under a constraint), which a critic trained on a few
            hundred episodes cannot yet point to reliably.
        elites: how many best episodes are imitated at most.
        updates_per_episode: network updates after each told episode (AMC: one per layer).
    """

    hidden: int = 64
    actor_lr: float = 1e-3
    critic_lr: float = 2e-3
    tau: float = 0.01
    discount: float = 1.0
    warmup_episodes: int = 8
    batch_size: int = 64
    buffer_episodes: int = 500
    noise_sigma: float = 0.3
    noise_decay: float = 0.985
    noise_min: float = 0.05
    baseline_momentum: float = 0.95
    prior: tuple[float, float, float, float] = (0.5, 0.97, 0.97, 0.03)
    budget_range: tuple[float, float] | None = (0.3, 1.0)
    imitation: float = 1.0
    elites: int = 16
    updates_per_episode: int = 8


def feature_encoder(space: SearchSpace, features: torch.Tensor, dynamic_dim: int) -> nn.Module:
    """AMC's encoder: static features looked up by layer index."""
    return FeatureEncoder(features, dynamic_dim)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run tiny networks on one thread: on a busy CPU, more threads make them many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class DDPGAgent(Agent):
    """AMC: DDPG whose episodes decide every layer's action in turn.

    Args:
        cost_fn / budget: if given, an action wall keeps ``cost_fn(policy) <= budget``.
        encoder: builds the state encoder of the actor and of the critic (AGMC passes a GNN).
    """

    name = "ddpg"

    def __init__(
        self,
        space: SearchSpace,
        objective: Objective,
        seed: int = 0,
        *,
        config: DDPGConfig | None = None,
        cost_fn: CostFn | None = None,
        budget: float | None = None,
        encoder: EncoderFactory = feature_encoder,
    ) -> None:
        super().__init__(space, objective, seed)
        self.config = cfg = config or DDPGConfig()
        if (cost_fn is None) != (budget is None):
            raise ValueError("give both cost_fn and budget, or neither")
        constrained = objective.max_latency_ms is not None or objective.max_size_bytes is not None
        # Unconstrained: one budget per episode, enforced by a MACs wall (see DDPGConfig.budget_range).
        self.conditioned = cost_fn is None and cfg.budget_range is not None and not constrained
        if self.conditioned:
            cost_fn, budget = MacsEstimator(space).fraction, 1.0
        wall = ActionWall(space, cost_fn, budget) if cost_fn is not None and budget is not None else None
        self.env = CompressionEnv(space, wall=wall, centred_width=wall is not None)
        features = torch.from_numpy(self.env.features)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor = Actor(encoder(space, features, DYNAMIC_DIM), ACTION_DIM, cfg.hidden)
            self.critic = Critic(encoder(space, features, DYNAMIC_DIM), ACTION_DIM, cfg.hidden)
        # Without a wall there is no uniform level to centre on: start near dense instead.
        self.actor.start_at(cfg.prior if self.env.centred_width else (cfg.prior[1], *cfg.prior[1:]))
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.buffer = ReplayBuffer(cfg.buffer_episodes * len(space.layers), DYNAMIC_DIM, ACTION_DIM)
        self.noise = TruncatedNormalNoise(cfg.noise_sigma, cfg.noise_decay, cfg.noise_min)
        self.rng = np.random.default_rng(seed)
        self.episodes_asked = 0
        self.episodes_told = 0
        self.baseline: float | None = None
        self.pending: list[tuple[str, list[Step]]] = []
        self.elites: list[Elite] = []
        self._elite_arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------ ask / tell

    def ask(self, n: int = 1) -> list[Policy]:
        self._check_n(n)
        out = []
        for _ in range(n):
            with single_thread():
                policy, steps = self._episode()
            self.pending.append((policy.hash, steps))
            out.append(policy)
        return out

    def _episode(self) -> tuple[Policy, list[Step]]:
        options = None
        if self.conditioned:
            lo, hi = self.config.budget_range or (1.0, 1.0)
            options = {"budget": float(self.rng.uniform(lo, hi))}
        _, info = self.env.reset(options=options)
        state = info["state"]
        steps: list[Step] = []
        done = False
        while not done:
            # The actor starts at the prior, so warm-up episodes explore around it.
            with torch.no_grad():
                mean = self.actor(
                    torch.tensor([state.layer_index]), torch.from_numpy(state.dynamic_vector())[None]
                )[0].numpy()
            action = self.noise.sample(mean.astype(np.float64), self.rng)
            _, _, done, _, info = self.env.step(action)
            nxt = info["state"]
            steps.append(
                (
                    state.layer_index,
                    state.dynamic_vector(),
                    info["raw_action"],
                    min(nxt.layer_index, len(self.space.layers) - 1),
                    nxt.dynamic_vector(),
                    done,
                )
            )
            state = nxt
        self.episodes_asked += 1
        self.noise.step()
        return info["policy"], steps

    def _reward(self, score: Score) -> float:
        if self.conditioned and self.objective.feasible(score):
            return score.accuracy  # the episode's own budget was met by the wall
        return self.objective.reward(score)

    def tell(self, policies: Sequence[Policy], scores: Sequence[Score]) -> None:
        self._check_tell(policies, scores)
        for policy, score in zip(policies, scores, strict=True):
            steps = self._pop_pending(policy.hash)
            if steps is None:
                continue  # not one of ours (e.g. a warm-start policy): no transitions to learn from
            reward = self._reward(score)
            m = self.config.baseline_momentum
            self.baseline = reward if self.baseline is None else m * self.baseline + (1 - m) * reward
            for layer, dyn, action, next_layer, next_dyn, done in steps:
                self.buffer.add(layer, dyn, action, reward - self.baseline, next_layer, next_dyn, done)
            self._add_elite(score, reward, steps)
            self.episodes_told += 1
            if self.episodes_told > self.config.warmup_episodes:
                with single_thread():
                    for _ in range(self.config.updates_per_episode):
                        self._update()

    def _add_elite(self, score: Score, reward: float, steps: list[Step]) -> None:
        """Keep the episodes worth imitating: the (accuracy, cost) front, or the best rewards."""
        if self.config.imitation <= 0.0 or not self.objective.feasible(score):
            return
        cost = score.latency_ms if self.objective.resource is None else score.get(self.objective.resource)
        pool = [*self.elites, Elite(score.accuracy, cost, reward, steps)]
        if self.conditioned:
            pool = [
                e
                for e in pool
                if not any(
                    o.accuracy >= e.accuracy
                    and o.cost <= e.cost
                    and (o.accuracy, o.cost) != (e.accuracy, e.cost)
                    for o in pool
                )
            ]
            pool.sort(key=lambda e: -e.accuracy)
        else:
            pool.sort(key=lambda e: -e.reward)
        kept = pool[: self.config.elites]
        if [id(e) for e in kept] != [id(e) for e in self.elites]:
            self.elites = kept
            self._elite_arrays = None

    def _elite_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if not self.elites:
            return None
        if self._elite_arrays is None:
            rows = [s for e in self.elites for s in e.steps]
            self._elite_arrays = (
                np.asarray([r[0] for r in rows], dtype=np.int64),
                np.stack([r[1] for r in rows]).astype(np.float32),
                np.stack([r[2] for r in rows]).astype(np.float32),
            )
        layer, dyn, action = self._elite_arrays
        idx = self.rng.integers(0, len(layer), n)
        return torch.from_numpy(layer[idx]), torch.from_numpy(dyn[idx]), torch.from_numpy(action[idx])

    def _pop_pending(self, policy_hash: str) -> list[Step] | None:
        for i, (h, steps) in enumerate(self.pending):
            if h == policy_hash:
                del self.pending[i]
                return steps
        return None

    def _update(self) -> None:
        cfg = self.config
        b = self.buffer.sample(cfg.batch_size, self.rng)
        layer, dyn, action = (
            torch.from_numpy(b.layer),
            torch.from_numpy(b.dynamic),
            torch.from_numpy(b.action),
        )
        next_layer, next_dyn = torch.from_numpy(b.next_layer), torch.from_numpy(b.next_dynamic)
        reward, done = torch.from_numpy(b.reward), torch.from_numpy(b.done)
        with torch.no_grad():
            next_q = self.critic_target(next_layer, next_dyn, self.actor_target(next_layer, next_dyn))
            target = reward + cfg.discount * (1.0 - done) * next_q
        critic_loss = F.mse_loss(self.critic(layer, dyn, action), target)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        actor_loss = -self.critic(layer, dyn, self.actor(layer, dyn)).mean()
        elite = self._elite_batch(cfg.batch_size) if cfg.imitation > 0.0 else None
        if elite is not None:
            e_layer, e_dyn, e_action = elite
            actor_loss = actor_loss + cfg.imitation * F.mse_loss(self.actor(e_layer, e_dyn), e_action)
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        with torch.no_grad():
            for net, target_net in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                for p, tp in zip(net.parameters(), target_net.parameters(), strict=True):
                    tp.mul_(1.0 - cfg.tau).add_(p, alpha=cfg.tau)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "agent": self.name,
            "config": asdict(self.config),
            "actor": encode(self.actor.state_dict()),
            "critic": encode(self.critic.state_dict()),
            "actor_target": encode(self.actor_target.state_dict()),
            "critic_target": encode(self.critic_target.state_dict()),
            "actor_opt": encode(self.actor_opt.state_dict()),
            "critic_opt": encode(self.critic_opt.state_dict()),
            "buffer": self.buffer.state_dict(),
            "rng": self.rng.bit_generator.state,
            "sigma": self.noise.sigma,
            "episodes_asked": self.episodes_asked,
            "episodes_told": self.episodes_told,
            "baseline": self.baseline,
            "pending": encode(self.pending),
            "elites": encode([(e.accuracy, e.cost, e.reward, e.steps) for e in self.elites]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("agent") != self.name:
            raise ValueError(f"state of agent {state.get('agent')!r} cannot restore a {self.name!r} agent")
        self.actor.load_state_dict(decode(state["actor"]))
        self.critic.load_state_dict(decode(state["critic"]))
        self.actor_target.load_state_dict(decode(state["actor_target"]))
        self.critic_target.load_state_dict(decode(state["critic_target"]))
        self.actor_opt.load_state_dict(decode(state["actor_opt"]))
        self.critic_opt.load_state_dict(decode(state["critic_opt"]))
        self.buffer.load_state_dict(state["buffer"])
        self.rng.bit_generator.state = state["rng"]
        self.noise.sigma = float(state["sigma"])
        self.episodes_asked = int(state["episodes_asked"])
        self.episodes_told = int(state["episodes_told"])
        self.baseline = state["baseline"]
        self.pending = [(h, [tuple(s) for s in steps]) for h, steps in decode(state["pending"])]  # type: ignore[misc]
        self.elites = [
            Elite(float(a), float(c), float(r), [tuple(s) for s in steps])  # type: ignore[misc]
            for a, c, r, steps in decode(state["elites"])
        ]
        self._elite_arrays = None
