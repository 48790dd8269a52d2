"""DDPG over the layer-walking environment (AMC): warm-up, decaying noise, replay, target nets.

One asked policy is one episode. Its transitions wait until the policy's score is told;
then every step of the episode gets the episode's reward minus a moving-average baseline
(AMC's variance reduction, with discount 1) and the networks take one update per layer.
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


@dataclass(frozen=True)
class DDPGConfig:
    """Hyper-parameters (AMC's, scaled down to searches of a few hundred candidates).

    Attributes:
        hidden: width of the actor's and critic's hidden layers.
        actor_lr / critic_lr: Adam learning rates.
        tau: soft-update rate of the target networks.
        discount: AMC uses 1 (the reward arrives only at the end of the episode).
        warmup_episodes: episodes with uniform random actions before the actor acts.
        batch_size: transitions per update.
        buffer_episodes: replay capacity, in episodes.
        noise_sigma / noise_decay: initial spread of the exploration noise and its decay per episode.
        baseline_momentum: of the moving-average reward subtracted from each reward.
    """

    hidden: int = 64
    actor_lr: float = 1e-3
    critic_lr: float = 2e-3
    tau: float = 0.01
    discount: float = 1.0
    warmup_episodes: int = 20
    batch_size: int = 64
    buffer_episodes: int = 500
    noise_sigma: float = 0.5
    noise_decay: float = 0.95
    baseline_momentum: float = 0.95


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
        wall = ActionWall(space, cost_fn, budget) if cost_fn is not None and budget is not None else None
        self.env = CompressionEnv(space, wall=wall)
        features = torch.from_numpy(self.env.features)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor = Actor(encoder(space, features, DYNAMIC_DIM), ACTION_DIM, cfg.hidden)
            self.critic = Critic(encoder(space, features, DYNAMIC_DIM), ACTION_DIM, cfg.hidden)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.buffer = ReplayBuffer(cfg.buffer_episodes * len(space.layers), DYNAMIC_DIM, ACTION_DIM)
        self.noise = TruncatedNormalNoise(cfg.noise_sigma, cfg.noise_decay)
        self.rng = np.random.default_rng(seed)
        self.episodes_asked = 0
        self.episodes_told = 0
        self.baseline: float | None = None
        self.pending: list[tuple[str, list[Step]]] = []

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
        _, info = self.env.reset()
        state = info["state"]
        explore = self.episodes_asked < self.config.warmup_episodes
        steps: list[Step] = []
        done = False
        while not done:
            if explore:
                action = self.rng.uniform(0.0, 1.0, ACTION_DIM).astype(np.float32)
            else:
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
                    info["action"].as_array(),
                    min(nxt.layer_index, len(self.space.layers) - 1),
                    nxt.dynamic_vector(),
                    done,
                )
            )
            state = nxt
        self.episodes_asked += 1
        if not explore:
            self.noise.step()
        return info["policy"], steps

    def tell(self, policies: Sequence[Policy], scores: Sequence[Score]) -> None:
        self._check_tell(policies, scores)
        for policy, score in zip(policies, scores, strict=True):
            steps = self._pop_pending(policy.hash)
            if steps is None:
                continue  # not one of ours (e.g. a warm-start policy): no transitions to learn from
            reward = self.objective.reward(score)
            m = self.config.baseline_momentum
            self.baseline = reward if self.baseline is None else m * self.baseline + (1 - m) * reward
            for layer, dyn, action, next_layer, next_dyn, done in steps:
                self.buffer.add(layer, dyn, action, reward - self.baseline, next_layer, next_dyn, done)
            self.episodes_told += 1
            if self.episodes_told > self.config.warmup_episodes:
                with single_thread():
                    for _ in range(len(steps)):
                        self._update()

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
