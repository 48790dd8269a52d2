"""Sensitivity moves: one decision changed at a time, its measured effect, greedy chains.

The rule agent uses this after its sweep, as per-layer sensitivity analysis
does in NNCF or Distiller, but with latency measured by the device's own predictor:

1. **Anchor**: the cheapest scored policy that keeps the best accuracy seen (within
   ``ANCHOR_TOLERANCE``), typically "everything int8" from the sweep.
2. **Probes**: each single move from the anchor is scored once: skip one residual block,
   halve one channel group, switch one layer between int8 and float, sparsify one layer.
   Moves are probed kind by kind in turn, the largest layers (by MACs) first, and a kind whose
   first probes save nothing on this device is dropped (unstructured sparsity on a CPU
   runtime that ignores it, int8 where the runtime is slower in int8).
3. **Chains**: effects are taken as additive; anchor + the k moves with the best accuracy
   per resource saved, k = 1, 2, ..., trace a front down to ``CHAIN_MAX_DROP``.
4. **Local moves**: then each member of the current front in turn takes the next most
   efficient move it has not tried, so the front keeps sharpening where the chains were wrong.

A move is a patch, JSON-able for ``state_dict``: ``["skip", block]``, ``["bits", layer, b]``,
``["width", layer, factor]`` (relative: a member already narrowed is narrowed further),
``["sparse", layer, {scheme fields}]``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from agents.actions import fine_scheme
from agents.objective import Objective, Score, with_nondominated
from compression import schemes
from compression.policy import LayerPolicy, Policy, PolicyError
from compression.space import LayerSpace, SearchSpace

Move = list[Any]
ANCHOR_TOLERANCE = 0.002  # accuracy within 0.2 points of the best counts as "keeps it"
CHAIN_MAX_DROP = 0.2  # chains stop once the predicted accuracy falls this far below the anchor
PROBES_BEFORE_DROP = 3  # a kind of move is dropped if its first probes never save resource
MIN_SAVING = 0.005  # a probe "saves" if the resource falls by at least this fraction
WIDTH_FACTOR = 0.5
SPARSITY = 0.5


def saves(d_resource: float, anchor_resource: float) -> bool:
    """A move "saves" when it cuts the anchor's resource by at least ``MIN_SAVING`` of it."""
    return d_resource <= -MIN_SAVING * max(anchor_resource, 1e-12)


def move_key(move: Move) -> str:
    return json.dumps(move, sort_keys=True)


def kind_of(move: Move, space: SearchSpace) -> str:
    """Moves are dropped per kind: the move type and, for layer moves, the layer's op and kernel."""
    if move[0] == "skip":
        return "skip"
    f = space.layer(move[1]).features
    return f"{move[0]}:{f.op}:{f.kernel}"


def candidate_moves(space: SearchSpace, anchor: Policy) -> list[tuple[float, Move]]:
    """Every single move open from ``anchor``, with the MACs it touches (its probe priority)."""
    o = space.options
    out: list[tuple[float, Move]] = []
    group_macs: dict[str, float] = {}
    for ls in space.layers:
        if ls.width_leader is not None:
            group_macs[ls.width_leader] = group_macs.get(ls.width_leader, 0.0) + ls.features.macs
    skipped = {name for b in space.blocks if b.name in anchor.skip for name in b.layers}
    if o.depth:
        macs = {ls.name: ls.features.macs for ls in space.layers}
        out += [
            (float(sum(macs.get(n, 0) for n in b.layers)), ["skip", b.name])
            for b in space.blocks
            if b.name not in anchor.skip
        ]
    for ls in space.layers:
        if ls.name in skipped:
            continue
        cur = anchor.for_layer(ls.name)
        other = 8 if cur.bits is None else None
        if other in ls.bits_choices:
            out.append((float(ls.features.macs), ["bits", ls.name, other]))
        if o.width and ls.decides_width and _narrowed(space, ls, cur, WIDTH_FACTOR) is not None:
            out.append((group_macs.get(ls.name, 0.0), ["width", ls.name, WIDTH_FACTOR]))
        if cur.scheme == schemes.DENSE and (patch := _sparse_patch(ls)) is not None:
            out.append((float(ls.features.macs), ["sparse", ls.name, patch]))
    return out


def _narrowed(space: SearchSpace, ls: LayerSpace, cur: LayerPolicy, factor: float) -> float | None:
    o = space.options
    width = o.snap_width(ls, round(cur.width * factor, 4))
    return width if o.min_width - 1e-9 <= width < cur.width else None


def _sparse_patch(ls: LayerSpace) -> dict[str, Any] | None:
    """The layer's preferred scheme at about ``SPARSITY`` zeros, JSON-able (None: dense-only)."""
    scheme = fine_scheme(ls)
    if scheme is None:
        return None
    own = schemes.get(scheme).probe(ls, SPARSITY)
    return None if own is None else {"scheme": scheme, **own}


def apply_move(space: SearchSpace, policy: Policy, move: Move) -> Policy | None:
    """``policy`` with ``move`` applied; None if it changes nothing or is not allowed there."""
    if move[0] == "skip":
        if move[1] in policy.skip or not space.options.depth:
            return None
        return replace(policy, skip=policy.skip | {move[1]})
    name = move[1]
    if any(name in b.layers for b in space.blocks if b.name in policy.skip):
        return None
    ls = space.layer(name)
    cur = policy.for_layer(name)
    new: LayerPolicy | None = None
    try:
        if move[0] == "bits":
            new = replace(cur, bits=move[2]) if cur.bits != move[2] and move[2] in ls.bits_choices else None
        elif move[0] == "width":
            width = _narrowed(space, ls, cur, float(move[2]))
            new = replace(cur, width=width) if width is not None else None
        elif move[0] == "sparse" and cur.scheme == schemes.DENSE:
            # JSON lists (an N:M pattern) back to the tuples LayerPolicy holds
            patch: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in move[2].items()}
            new = replace(cur, **patch)
    except PolicyError:
        return None
    if new is None:
        return None
    return replace(policy, layers={**policy.layers, name: new})


class Sensitivity:
    """The probe -> chain -> local-move schedule; the rule agent asks it for policies.

    ``next()`` returns the next policy to propose, or None while it waits for scores it needs
    (the caller proposes something else meanwhile). ``tell`` takes every scored policy the
    agent sees, its own or not, to keep the front.
    """

    def __init__(self, space: SearchSpace, objective: Objective) -> None:
        self.space = space
        self.objective = objective
        self.seen: list[tuple[Policy, Score]] = []  # scored policies, until the anchor is set
        self.front: list[tuple[Policy, Score]] = []
        self.anchor: tuple[Policy, Score] | None = None
        self.probes: list[Move] = []  # still to propose, in order
        self.outstanding: dict[str, Move] = {}  # proposed probe hash -> move
        self.effects: dict[str, tuple[float, float]] = {}  # move key -> (d accuracy, d resource)
        self.kind_probes: dict[str, list[bool]] = {}  # kind -> did each probe save resource
        self.chained = False
        self.queue: list[Policy] = []
        self.tried: set[str] = set()  # "member hash|move key"
        self.proposed: set[str] = set()
        self.member = 0

    # ---------------------------------------------------------------- bookkeeping

    @property
    def constrained(self) -> bool:
        return self.objective.max_latency_ms is not None or self.objective.max_size_bytes is not None

    def tell(self, policy: Policy, score: Score) -> None:
        self.proposed.add(policy.hash)
        if score.ok and self.anchor is None:
            self.seen.append((policy, score))
        # Under a resource limit the front keeps infeasible points too: moves start from them.
        if self.objective.feasible(score) or (score.ok and self.constrained):
            self.front = with_nondominated(self.front, policy, score, self.objective)
        move = self.outstanding.pop(policy.hash, None)
        if move is not None and self.anchor is not None and score.ok:
            a = self.anchor[1]
            d_res = self.objective.resource_of(score) - self.objective.resource_of(a)
            self.effects[move_key(move)] = (score.accuracy - a.accuracy, d_res)
            saved = saves(d_res, self.objective.resource_of(a))
            self.kind_probes.setdefault(kind_of(move, self.space), []).append(saved)

    def _kind_alive(self, move: Move) -> bool:
        history = self.kind_probes.get(kind_of(move, self.space), [])
        return len(history) < PROBES_BEFORE_DROP or any(history)

    # ---------------------------------------------------------------- schedule

    def start(self) -> None:
        """Pick the anchor from everything scored so far and line up its probes."""
        if not self.seen:
            return
        best = max(s.accuracy for _, s in self.seen)
        keeps = [(p, s) for p, s in self.seen if s.accuracy >= best - ANCHOR_TOLERANCE]
        self.anchor = min(keeps, key=lambda ps: self.objective.resource_of(ps[1]))
        self.seen = []  # only the anchor needed them (and the saved state stays small)
        by_kind: dict[str, list[tuple[float, Move]]] = {}
        for macs, move in candidate_moves(self.space, self.anchor[0]):
            by_kind.setdefault(kind_of(move, self.space), []).append((macs, move))
        lanes = [[m for _, m in sorted(v, key=lambda mm: -mm[0])] for v in by_kind.values()]
        lanes.sort(key=len)
        # Round robin over kinds: every kind has its first probes early, so dead kinds drop early.
        depth = max(map(len, lanes), default=0)
        self.probes = [lane[i] for i in range(depth) for lane in lanes if i < len(lane)]

    @property
    def started(self) -> bool:
        return self.anchor is not None

    def next(self) -> Policy | None:
        if self.anchor is None:
            return None
        while self.probes:
            move = self.probes.pop(0)
            if not self._kind_alive(move):
                continue
            policy = apply_move(self.space, self.anchor[0], move)
            if policy is None or policy.hash in self.proposed:
                continue
            self.outstanding[policy.hash] = move
            return self._propose(policy)
        if self.outstanding:
            return None  # the chains need every probe's effect
        if not self.chained:
            self.chained = True
            self.queue = self._chains()
        while self.queue:
            policy = self.queue.pop(0)
            if policy.hash not in self.proposed:
                return self._propose(policy)
        return self._local_move()

    def _propose(self, policy: Policy) -> Policy:
        self.proposed.add(policy.hash)
        return policy

    def _ranked(self) -> list[Move]:
        """Probed moves that save resource, the least accuracy lost per resource saved first."""
        saving = [(k, da, dr) for k, (da, dr) in self.effects.items() if dr < 0]
        saving.sort(key=lambda t: t[1] / -t[2], reverse=True)
        return [json.loads(k) for k, _, _ in saving]

    def _chains(self) -> list[Policy]:
        assert self.anchor is not None
        policy, score = self.anchor
        acc = score.accuracy
        out: list[Policy] = []
        for move in self._ranked():
            nxt = apply_move(self.space, policy, move)
            if nxt is None:
                continue
            acc += self.effects[move_key(move)][0]
            if acc < score.accuracy - CHAIN_MAX_DROP:
                break
            policy = nxt
            out.append(policy)
        return out

    def _local_move(self) -> Policy | None:
        """The next front member (cheapest first, in turn) with its best untried move.

        Under a resource limit only members over it: a move makes one feasible at a higher
        accuracy than the feasible ones have, while a move from a feasible one only loses.
        """
        members = sorted(self.front, key=lambda ps: self.objective.resource_of(ps[1]))
        if self.constrained:
            members = [ps for ps in members if not self.objective.feasible(ps[1])]
        if not members:
            return None
        ranked = self._ranked()
        for _ in range(len(members)):
            policy, _score = members[self.member % len(members)]
            self.member += 1
            for move in ranked:
                key = f"{policy.hash}|{move_key(move)}"
                if key in self.tried:
                    continue
                self.tried.add(key)
                nxt = apply_move(self.space, policy, move)
                if nxt is not None and nxt.hash not in self.proposed:
                    return self._propose(nxt)
        return None

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        def pair(ps: tuple[Policy, Score]) -> dict[str, Any]:
            return {"policy": ps[0].to_dict(), "score": ps[1].to_dict()}

        return {
            "seen": [pair(ps) for ps in self.seen],
            "front": [pair(ps) for ps in self.front],
            "anchor": pair(self.anchor) if self.anchor is not None else None,
            "probes": self.probes,
            "outstanding": self.outstanding,
            "effects": {k: list(v) for k, v in self.effects.items()},
            "kind_probes": self.kind_probes,
            "chained": self.chained,
            "queue": [p.to_dict() for p in self.queue],
            "tried": sorted(self.tried),
            "proposed": sorted(self.proposed),
            "member": self.member,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def pair(raw: dict[str, Any]) -> tuple[Policy, Score]:
            return Policy.from_dict(raw["policy"]), Score.from_dict(raw["score"])

        self.seen = [pair(r) for r in state["seen"]]
        self.front = [pair(r) for r in state["front"]]
        self.anchor = pair(state["anchor"]) if state["anchor"] is not None else None
        self.probes = [list(m) for m in state["probes"]]
        self.outstanding = {h: list(m) for h, m in state["outstanding"].items()}
        self.effects = {k: (float(v[0]), float(v[1])) for k, v in state["effects"].items()}
        self.kind_probes = {k: [bool(x) for x in v] for k, v in state["kind_probes"].items()}
        self.chained = bool(state["chained"])
        self.queue = [Policy.from_dict(p) for p in state["queue"]]
        self.tried = set(state["tried"])
        self.proposed = set(state["proposed"])
        self.member = int(state["member"])
