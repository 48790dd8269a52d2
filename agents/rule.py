"""Rule-based compression: each kind of layer gets its rule, each rule group one searched ratio.

The rules encode what tends to hold across CNNs and transformers: the first and last layers
are fragile (only bits, never pruned); depthwise convs have too few weights to sparsify
(bits, width follows their producer); 1x1 and 3x3 convs and linear / attention projections
lose channels (width) where they lead a channel group and otherwise take the fine-grained
pattern that suits them (N:M for convs, 1xN blocks for linear layers). One "keep ratio" per
group is then chosen by a short 1-D search over asks: a uniform sweep first, then
coordinate steps per group that halve after each round. Cheap, strong, and a warm start
for the other agents.

With a latency or size limit the search climbs one reward (accuracy under the limit). Without
one the user wants the whole accuracy/latency front, so the coordinate steps start from every
member of the current Pareto front in turn (a Pareto local search): a step that lands on the
front joins it, one that is dominated is dropped, and the front spreads and sharpens at every
latency instead of converging on a single trade-off.

After the sweep, per-decision sensitivity analysis (``agents.sensitivity``) joins in: single
moves from the best cheap policy (skip one block, halve one channel group, one layer int8 or
float, one layer sparse) are probed, chained greedily by accuracy lost per latency saved,
then applied from front members, most efficient first. Without a limit it leads and the
per-group search only fills in while it waits for scores; under a limit the two take turns
(each wins at some limits), and its moves start from the front points still over the limit.
``sensitivity=False`` turns it off.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from agents.actions import LayerAction, layer_policy
from agents.base import Agent
from agents.objective import Objective, Score, with_nondominated
from agents.sensitivity import Sensitivity
from compression.policy import LayerPolicy, Policy, SchemeName
from compression.space import LayerSpace, SearchSpace

Group = Literal["first", "last", "pointwise", "depthwise", "linear", "conv", "blocks"]
SWEEP = (0.85, 0.7, 0.55, 0.4, 0.25)
FIRST_STEP = 0.15
MIN_STEP = 0.02
MAX_REPEATS = 100  # then a repeated policy is asked anyway (the search loop stops on idle rounds)
Config = dict[str, float]


@dataclass(frozen=True)
class Rule:
    """How a group turns its keep ratio into layer choices.

    Attributes:
        width: narrow layers that lead a channel group.
        prefer: fine-grained schemes in order of preference (first allowed one is used).
        swept: follows the uniform sweep (first and last layers stay at 1 until searched).
    """

    width: bool
    prefer: tuple[SchemeName, ...]
    swept: bool = True


RULES: dict[Group, Rule] = {
    "first": Rule(width=False, prefer=(), swept=False),
    "last": Rule(width=False, prefer=(), swept=False),
    "depthwise": Rule(width=False, prefer=()),
    "pointwise": Rule(width=True, prefer=("nm", "block", "unstructured")),
    "conv": Rule(width=True, prefer=("nm", "unstructured", "block")),
    "linear": Rule(width=True, prefer=("block", "nm", "unstructured")),
    "blocks": Rule(width=False, prefer=()),
}


def group_of(ls: LayerSpace, n_layers: int) -> Group:
    """The rule group of one layer."""
    f = ls.features
    if f.index == 0:
        return "first"
    if f.index == n_layers - 1:
        return "last"
    if f.op == "dwconv":
        return "depthwise"
    if f.op == "linear":
        return "linear"
    return "pointwise" if f.kernel == 1 else "conv"


class RuleAgent(Agent):
    """Per-group rules with a coordinate search over one keep ratio per group."""

    name = "rule"

    def __init__(
        self, space: SearchSpace, objective: Objective, seed: int = 0, *, sensitivity: bool = True
    ) -> None:
        """``sensitivity``: probe single moves after the sweep (see above)."""
        super().__init__(space, objective, seed)
        n = len(space.layers)
        self.layer_groups: list[Group] = [group_of(ls, n) for ls in space.layers]
        present = set(self.layer_groups) | ({"blocks"} if space.options.depth and space.blocks else set())
        self.groups: list[str] = [g for g in RULES if g in present]
        self.min_ratio = space.options.min_width if space.options.width else 0.05
        self.rng = random.Random(seed)
        self.best: Config = {g: 1.0 for g in self.groups}
        self.best_reward = float("-inf")
        self.queue: list[Config] = [self._uniform(r) for r in SWEEP]
        self.proposed: set[str] = set()
        self.pending: dict[str, Config] = {}
        self.cursor = 0  # next group of the coordinate search
        self.step = FIRST_STEP
        # Pareto mode (no resource limit): the non-dominated configs found so far, with scores.
        self.multi = objective.max_latency_ms is None and objective.max_size_bytes is None
        self.front: list[tuple[Config, Score]] = []
        self.member = 0  # next front member to step from
        self.asked = 0
        self.asked_policies: set[str] = set()
        self.repeats = 0  # configs in a row that gave a policy already asked
        self.sensitivity = Sensitivity(space, objective) if sensitivity else None
        if self.multi or self.sensitivity is not None:
            # Everything kept, the cheap end of bits only: the front's high-accuracy end, and
            # the usual anchor of the sensitivity analysis.
            self.queue.insert(0, self._uniform(1.0))

    # ------------------------------------------------------------------ mapping

    def _uniform(self, ratio: float) -> Config:
        return {g: (ratio if RULES[g].swept else 1.0) for g in self.groups}  # type: ignore[index]

    def _layer(self, ls: LayerSpace, group: Group, ratio: float) -> LayerPolicy:
        o = self.space.options
        rule = RULES[group]
        uses_width = rule.width and o.width and ls.decides_width
        scheme = next((s for s in rule.prefer if s in ls.schemes), None)
        bits_sorted = sorted(ls.bits_choices, key=lambda b: 99 if b is None else b)
        if uses_width or scheme is not None:
            # Compressed by structure or pattern: bits stay at 8 where allowed (else the most precise).
            bits_level = (bits_sorted.index(8) + 0.5) / len(bits_sorted) if 8 in bits_sorted else 1.0
        else:
            bits_level = ratio  # nothing else to turn: the ratio picks the bit-width
        keep_width = (ratio - o.min_width) / (1.0 - o.min_width) if uses_width else 1.0
        keep_weights = 1.0 if uses_width or scheme is None else ratio
        action = LayerAction(max(0.0, keep_width), keep_weights, bits_level)
        return layer_policy(ls, o, action, scheme)

    def policy(self, config: Config) -> Policy:
        """The policy of one ratio per group."""
        layers = {
            ls.name: self._layer(ls, g, config.get(g, 1.0))
            for ls, g in zip(self.space.layers, self.layer_groups, strict=True)
        }
        skip: frozenset[str] = frozenset()
        if "blocks" in config:
            # Later blocks first: in residual stages the last blocks are the most redundant.
            n_skip = round((1.0 - config["blocks"]) * len(self.space.blocks))
            skip = (
                frozenset(b.name for b in self.space.blocks[len(self.space.blocks) - n_skip :])
                if n_skip
                else skip
            )
        return Policy(layers=layers, skip=skip)

    def set_objective(self, objective: Objective) -> None:
        super().set_objective(objective)
        if self.sensitivity is not None:
            self.sensitivity.objective = objective

    # ------------------------------------------------------------------ search

    def _refill(self) -> None:
        """Next coordinate step: the current group at best ± step; halve the step after a round."""
        if self.multi and self.front:
            self._refill_front()
            return
        for _ in range(4 * max(1, len(self.groups))):
            g = self.groups[self.cursor]
            self.cursor += 1
            if self.cursor == len(self.groups):
                self.cursor = 0
                self.step = max(MIN_STEP, self.step / 2)
            for delta in (-self.step, self.step):
                r = round(min(1.0, max(self.min_ratio, self.best[g] + delta)), 4)
                cand = {**self.best, g: r}
                if self._key(cand) not in self.proposed:
                    self.queue.append(cand)
            if self.queue:
                return
        # Every coordinate step was tried: perturb all groups at once.
        self.queue.append(self._jitter(self.best))

    def _refill_front(self) -> None:
        """Pareto mode: step each front member along the current group (± step), member by member;
        after every member had its turn move to the next group, and after all groups halve the step."""
        members = sorted(self.front, key=lambda cs: self.objective.resource_of(cs[1]))
        for _ in range(4 * max(1, len(self.groups)) * max(1, len(members))):
            if self.member >= len(members):
                self.member = 0
                self.cursor += 1
                if self.cursor >= len(self.groups):
                    self.cursor = 0
                    self.step = max(MIN_STEP, self.step / 2)
            config = members[self.member][0]
            self.member += 1
            g = self.groups[self.cursor % len(self.groups)]
            for delta in (-self.step, self.step):
                r = round(min(1.0, max(self.min_ratio, config.get(g, 1.0) + delta)), 4)
                cand = {**config, g: r}
                if self._key(cand) not in self.proposed:
                    self.queue.append(cand)
            if self.queue:
                return
        self.queue.append(self._jitter(members[self.rng.randrange(len(members))][0]))

    def _jitter(self, config: Config) -> Config:
        """Every group moved at once by a normal step (when no coordinate step is left)."""
        return {
            g: round(
                min(1.0, max(self.min_ratio, r + self.rng.gauss(0.0, self.step * (1 + self.repeats)))), 4
            )
            for g, r in config.items()
        }

    def _add_to_front(self, config: Config, score: Score) -> None:
        if self.objective.feasible(score):
            self.front = with_nondominated(self.front, dict(config), score, self.objective)

    @staticmethod
    def _key(config: Config) -> str:
        return ",".join(f"{k}={v:.4f}" for k, v in sorted(config.items()))

    def ask(self, n: int = 1) -> list[Policy]:
        self._check_n(n)
        out: list[Policy] = []
        while len(out) < n:
            sens = self.sensitivity
            # Under a limit the two searches take turns: sensitivity wins at some limits, the
            # coordinate climb at others (bench/RESULTS.md), so each gets half the candidates.
            turn = not self.multi and sens is not None and sens.started and self.asked % 2 == 1
            self.asked += 1
            if not self.queue and sens is not None and not turn:
                if not sens.started:
                    sens.start()
                found = sens.next()
                if found is not None:
                    out.append(found)
                    continue
            if not self.queue:
                self._refill()
            config = self.queue.pop(0)
            self.proposed.add(self._key(config))
            policy = self.policy(config)
            if not self.multi and policy.hash in self.asked_policies and self.repeats < MAX_REPEATS:
                # Under a limit the climb converges on one config, and its steps and small
                # jitter round to policies already asked: skip those, and widen the jitter
                # until something new comes out. (Pareto mode moves on to other members.)
                self.repeats += 1
                continue
            self.repeats = 0
            self.asked_policies.add(policy.hash)
            self.pending[policy.hash] = config
            if sens is not None:
                sens.proposed.add(policy.hash)
            out.append(policy)
        return out

    def tell(self, policies: Sequence[Policy], scores: Sequence[Score]) -> None:
        self._check_tell(policies, scores)
        for policy, score in zip(policies, scores, strict=True):
            if self.sensitivity is not None:
                self.sensitivity.tell(policy, score)
            config = self.pending.pop(policy.hash, None)
            if config is None:
                continue
            reward = self.objective.reward(score)
            if reward > self.best_reward:
                self.best_reward, self.best = reward, dict(config)
            if self.multi:
                self._add_to_front(config, score)

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {
            "agent": self.name,
            "best": self.best,
            "best_reward": self.best_reward if self.best_reward > float("-inf") else None,
            "queue": self.queue,
            "proposed": sorted(self.proposed),
            "pending": self.pending,
            "cursor": self.cursor,
            "step": self.step,
            "front": [{"config": c, "score": sc.to_dict()} for c, sc in self.front],
            "member": self.member,
            "asked": self.asked,
            "asked_policies": sorted(self.asked_policies),
            "repeats": self.repeats,
            "rng": [version, list(internal), gauss],
            "sensitivity": self.sensitivity.state_dict() if self.sensitivity is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = dict(state["best"])
        self.best_reward = float("-inf") if state["best_reward"] is None else float(state["best_reward"])
        self.queue = [dict(c) for c in state["queue"]]
        self.proposed = set(state["proposed"])
        self.pending = {h: dict(c) for h, c in state["pending"].items()}
        self.cursor, self.step = int(state["cursor"]), float(state["step"])
        self.front = [(dict(m["config"]), Score.from_dict(m["score"])) for m in state.get("front", [])]
        self.member = int(state.get("member", 0))
        self.asked = int(state.get("asked", 0))
        self.asked_policies = set(state.get("asked_policies", []))
        self.repeats = int(state.get("repeats", 0))
        if self.sensitivity is not None and state.get("sensitivity") is not None:
            self.sensitivity.load_state_dict(state["sensitivity"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))


def rule_sweep(space: SearchSpace, objective: Objective, seed: int = 0) -> list[Policy]:
    """The rule agent's first proposals, its uniform sweep: the other agents' warm start."""
    rule = RuleAgent(space, objective, seed)
    return rule.ask(len(rule.queue))
