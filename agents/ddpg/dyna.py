"""Model-based DDPG (Dyna): many imagined episodes per real evaluation.

With 60-200 real evaluations an actor-critic that needs hundreds of episodes cannot learn
from real rewards alone. This agent keeps AMC's layer-walking actor and critic but trains
them mostly inside a surrogate of the reward (``agents.surrogate``): an accuracy model
fitted online on every scored candidate (with its uncertainty) and a latency model fitted
to the device's latency predictor. Real evaluations go to the actor's proposals that the
surrogate rates best or knows least (optimistic hypervolume gain, or optimistic accuracy
under a limit).

Differences from :class:`agents.ddpg.agent.DDPGAgent`, each aimed at a failure seen with
60-200 candidates:

- warm start: the rule agent's sweep and single-block-skip probes are asked first; the
  surrogate, the replay buffer and self-imitation all start from their scores;
- six actions per layer: width, kept weights, bits, skip, *scheme* (which allowed scheme,
  dense included) and *model bits*, read at the first layer, which moves every layer's
  precision at once, so one action can cross a runtime's whole-model int8 threshold;
- the action wall limits the device's *predicted latency* (``LatencyModel``), not MACs;
- the critic regresses the episode's reward from each step (discount 0), with the budget in
  the state, so one actor learns the whole front.

Episodes are run in batches (numpy over episodes), so an imagined episode costs about as
much as one real policy decode.
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
from agents.actions import SKIP_THRESHOLD, preferred_schemes
from agents.base import Agent
from agents.cost import MacsEstimator
from agents.ddpg.agent import single_thread as _torch_single_thread
from agents.ddpg.buffer import ReplayBuffer
from agents.ddpg.env import normalised_features
from agents.ddpg.networks import Actor, Critic, FeatureEncoder
from agents.objective import Objective, Score, hypervolume_2d
from agents.surrogate import AccuracySurrogate, LatencyModel, SpaceIndex, layer_quantities
from compression import schemes as _schemes
from compression.policy import LayerPolicy, Policy, SchemeName
from compression.space import SearchSpace

LatencyFn = Callable[[Sequence[Policy]], Sequence[float]]
"""A batch of policies -> their latencies on the device (e.g. its latency predictor)."""
EncoderFactory = Callable[[SearchSpace, torch.Tensor, int], nn.Module]

ACTIONS = ("keep_width", "keep_weights", "bits", "skip", "scheme", "model_bits")
A_DIM = len(ACTIONS)
KW, KWT, BITS, SKIP, SCHEME, MODEL_BITS = range(A_DIM)
DYN_DIM = 4 + A_DIM  # saved so far, remaining share, budget, model bits, previous action
WALL_STEPS = 7
REF_DROP = 0.2  # the agent's own hypervolume reference: dense accuracy - 20 points


@dataclass(frozen=True)
class DynaConfig:
    """Hyper-parameters.

    Attributes:
        hidden / actor_lr / critic_lr / tau / batch_size: the networks and their training.
        buffer_episodes: replay capacity in episodes (real and imagined).
        noise_sigma / noise_decay / noise_min: exploration noise, decayed per told candidate.
        prior: the untrained actor's action at every layer (``ACTIONS`` order): width at the
            budget's uniform level, nearly all weights, dense scheme, float bits, no skip.
        budget_range: latency budgets (fractions of dense) drawn per episode without a limit.
        imagined_episodes: surrogate episodes added to the replay after every tell.
        updates_per_tell: network updates after every tell.
        candidates: actor proposals the surrogate ranks for every real evaluation asked.
        kappa: optimism: the acquisition adds ``kappa`` standard deviations to the accuracy.
        warm_start: ask the rule sweep and block-skip probes first.
        max_probes: block-skip probes in the warm start.
        latency_samples: policies the latency model is fitted on when a latency function is given.
        imitation / elites: self-imitation of the best real episodes (weight, how many).
    """

    hidden: int = 64
    actor_lr: float = 1e-3
    critic_lr: float = 2e-3
    tau: float = 0.05
    batch_size: int = 64
    buffer_episodes: int = 300
    noise_sigma: float = 0.25
    noise_decay: float = 0.98
    noise_min: float = 0.06
    prior: tuple[float, ...] = (0.5, 0.97, 0.9, 0.03, 0.05, 0.75)
    budget_range: tuple[float, float] = (0.25, 1.0)
    imagined_episodes: int = 32
    updates_per_tell: int = 12
    candidates: int = 48
    kappa: float = 1.0
    warm_start: bool = True
    max_probes: int = 8
    latency_samples: int = 160
    imitation: float = 1.0
    elites: int = 16


def feature_encoder(space: SearchSpace, features: torch.Tensor, dynamic_dim: int) -> nn.Module:
    """AMC's state: the layer's static features next to the dynamic state."""
    return FeatureEncoder(features, dynamic_dim)


@contextmanager
def single_thread() -> Iterator[None]:
    """Torch and BLAS on one thread: these matrices are small, and on a busy CPU extra threads
    spin instead of helping (a 160 x 160 eigendecomposition took 0.6 s with two)."""
    with _torch_single_thread():
        try:
            from threadpoolctl import threadpool_limits  # scikit-learn's dependency
        except ImportError:  # pragma: no cover
            yield
            return
        with threadpool_limits(limits=1):
            yield


# --------------------------------------------------------------------------- actions <-> policies


class ActionCodec:
    """Per-layer action vectors (``ACTIONS``) to policies, exactly, and to quantities, fast."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.index = SpaceIndex(space)
        o = space.options
        order = [_schemes.DENSE, *preferred_schemes()]
        self.schemes: list[list[SchemeName]] = [
            [s for s in order if s in ls.schemes] or [_schemes.DENSE] for ls in space.layers
        ]
        self.bits: list[list[int | None]] = [
            sorted(ls.bits_choices, key=lambda b: 99 if b is None else b) for ls in space.layers
        ]
        self.width = np.asarray([bool(o.width and ls.decides_width) for ls in space.layers])
        self.openers: dict[int, str] = {}
        names = {ls.name: i for i, ls in enumerate(space.layers)}
        if o.depth:
            for b in space.blocks:
                idx = [names[n] for n in b.layers if n in names]
                if idx:
                    self.openers[min(idx)] = b.name
        n = len(space.layers)
        # Fast approximations for the wall: per layer and scheme slot, sparsity of a keep value.
        self.n_schemes = np.asarray([len(s) for s in self.schemes])
        self.n_bits = np.asarray([len(b) for b in self.bits])
        kmax = int(self.n_schemes.max())
        bmax = int(self.n_bits.max())
        self.scheme_kind = np.zeros((n, kmax))  # 0 dense, 1 unstructured-like, 2 patterned
        self.bits_value = np.zeros((n, bmax))
        for i in range(n):
            for j, s in enumerate(self.schemes[i]):
                self.scheme_kind[i, j] = 0 if s == _schemes.DENSE else (1 if s == "unstructured" else 2)
            for j, bw in enumerate(self.bits[i]):
                self.bits_value[i, j] = 0.0 if bw is None else float(bw)
        self.opener_rows = np.asarray(sorted(self.openers), dtype=np.int64)
        self.opener_blocks = [self.index.block_layers[self.openers[i]] for i in self.opener_rows]

    def policy(self, a: np.ndarray) -> Policy:
        """The exact policy of one ``[n_layers, A_DIM]`` action matrix."""
        o = self.space.options
        g = float(a[0, MODEL_BITS])
        layers: dict[str, LayerPolicy] = {}
        skip: set[str] = set()
        for i, ls in enumerate(self.space.layers):
            act = a[i]
            width = 1.0
            if self.width[i]:
                width = o.snap_width(ls, round(o.min_width + float(act[KW]) * (1.0 - o.min_width), 3))
            bits = self.bits[i][self._bits_slot(i, float(act[BITS]), g)]
            k = len(self.schemes[i])
            scheme = self.schemes[i][min(int(float(act[SCHEME]) * k), k - 1)]
            lp = LayerPolicy(width=width, bits=bits)
            if scheme != _schemes.DENSE:
                own = _schemes.get(scheme).from_keep(float(act[KWT]), ls, o)
                if own is not None:
                    lp = LayerPolicy(width=width, scheme=scheme, bits=bits, **own)
            layers[ls.name] = lp
            if i in self.openers and act[SKIP] > SKIP_THRESHOLD:
                skip.add(self.openers[i])
        return Policy(layers=layers, skip=frozenset(skip))

    def _bits_slot(self, i: int, b: float, g: float) -> int:
        nb = len(self.bits[i])
        return min(int(0.5 * (b + g) * nb), nb - 1)

    def quantities(self, a: np.ndarray) -> np.ndarray:
        """``[..., n_layers, A_DIM]`` actions -> approximate quantities (widths not snapped)."""
        o = self.space.options
        lead = a[..., KW]
        out_own = np.where(self.width, o.min_width + lead * (1.0 - o.min_width), 1.0)
        slot = np.minimum((a[..., SCHEME] * self.n_schemes).astype(np.int64), self.n_schemes - 1)
        kind = np.take_along_axis(
            np.broadcast_to(self.scheme_kind, (*a.shape[:-2], *self.scheme_kind.shape)),
            slot[..., None],
            axis=-1,
        )[..., 0]
        sparsity = np.where(kind > 0, (1.0 - a[..., KWT]) * o.max_sparsity, 0.0)
        pattern = (kind == 2).astype(float)
        g = a[..., 0:1, MODEL_BITS]
        bslot = np.minimum((0.5 * (a[..., BITS] + g) * self.n_bits).astype(np.int64), self.n_bits - 1)
        bits = np.take_along_axis(
            np.broadcast_to(self.bits_value, (*a.shape[:-2], *self.bits_value.shape)),
            bslot[..., None],
            axis=-1,
        )[..., 0]
        alive = np.ones(a.shape[:-1])
        if len(self.opener_rows):
            skipped = a[..., self.opener_rows, SKIP] > SKIP_THRESHOLD
            for j, rows in enumerate(self.opener_blocks):
                alive[..., rows] = np.where(skipped[..., j : j + 1], 0.0, alive[..., rows])
        return self.index.from_parts(out_own, sparsity, pattern, bits, alive)

    def actions_of(self, policy: Policy) -> np.ndarray:
        """An action matrix whose policy is close to ``policy`` (warm-start episodes)."""
        o = self.space.options
        n = len(self.space.layers)
        a = np.zeros((n, A_DIM))
        quant = [policy.for_layer(ls.name).bits is not None for ls in self.space.layers]
        share = self.index.macs_share
        g = 0.0 if float(share[np.asarray(quant, dtype=bool)].sum()) >= 0.5 else 1.0
        for i, ls in enumerate(self.space.layers):
            lp = policy.for_layer(ls.name)
            span = 1.0 - o.min_width
            a[i, KW] = float(np.clip((lp.width - o.min_width) / span, 0.0, 1.0)) if span > 0 else 1.0
            sch = self.schemes[i]
            slot = sch.index(lp.scheme) if lp.scheme in sch else 0
            a[i, SCHEME] = (slot + 0.5) / len(sch)
            a[i, KWT] = 1.0 - min(1.0, lp.target_sparsity / max(o.max_sparsity, 1e-9))
            nb = len(self.bits[i])
            bslot = self.bits[i].index(lp.bits) if lp.bits in self.bits[i] else nb - 1
            a[i, BITS] = float(np.clip(2.0 * (bslot + 0.5) / nb - g, 0.0, 1.0))
            a[i, SKIP] = 1.0 if self.openers.get(i) in policy.skip else 0.0
        a[:, MODEL_BITS] = g
        return a


# --------------------------------------------------------------------------- the agent


@dataclass
class Episode:
    """One episode's steps (arrays over layers) and the budget it ran under."""

    layer: np.ndarray  # [L]
    dyn: np.ndarray  # [L, DYN_DIM]
    action: np.ndarray  # [L, A_DIM], in the actor's terms
    budget: float


class DynaDDPGAgent(Agent):
    """DDPG trained in a learned model of the reward (see the module doc).

    Args:
        latency_fn: the device's latency for a batch of policies (its predictor); without
            one the latency model starts from MACs and is refitted on the scored latencies.
        encoder: the state encoder of the actor and critic (AGMC passes a graph network).
    """

    name = "ddpg"

    def __init__(
        self,
        space: SearchSpace,
        objective: Objective,
        seed: int = 0,
        *,
        config: DynaConfig | None = None,
        latency_fn: LatencyFn | None = None,
        encoder: EncoderFactory = feature_encoder,
    ) -> None:
        super().__init__(space, objective, seed)
        with single_thread():
            self._init(space, objective, seed, config, latency_fn, encoder)

    def _init(
        self,
        space: SearchSpace,
        objective: Objective,
        seed: int,
        config: DynaConfig | None,
        latency_fn: LatencyFn | None,
        encoder: EncoderFactory,
    ) -> None:
        if not space.layers:
            raise ValueError("the search space has no layers to decide")
        self.config = cfg = config or DynaConfig()
        self.codec = ActionCodec(space)
        self.latency_fn = latency_fn
        self.features = normalised_features(space)
        self.n = len(space.layers)
        features = torch.from_numpy(self.features)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor = Actor(encoder(space, features, DYN_DIM), A_DIM, cfg.hidden)
            self.critic = Critic(encoder(space, features, DYN_DIM), A_DIM, cfg.hidden)
        self.actor.start_at(cfg.prior)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.buffer = ReplayBuffer(cfg.buffer_episodes * self.n, DYN_DIM, A_DIM)
        self.rng = np.random.default_rng(seed)
        self.sigma = cfg.noise_sigma
        self.surrogate = AccuracySurrogate(space, objective.dense.accuracy if objective.dense else None)
        self.latency = LatencyModel(space)
        self.lat_q: list[np.ndarray] = []  # scored latencies (quantities, latency)
        self.lat_y: list[float] = []
        self._prior_q, self._prior_y, self._prior_w = self._latency_prior()
        self._fit_latency()
        self.remaining = np.cumsum(self.codec.index.macs_share[::-1])[::-1].copy()
        self.pending: dict[str, Episode] = {}
        self.asked: set[str] = set()
        self.told: list[tuple[float, float]] = []  # (accuracy, latency) of every ok real score
        self.elites: list[tuple[float, float, float, Episode]] = []  # (accuracy, latency, reward, ep)
        self.warm: list[Policy] = self._warm_start() if cfg.warm_start else []
        self.episodes_told = 0

    # ------------------------------------------------------------------ latency

    def _latency_prior(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Samples the latency model starts from: the device's latency function, else MACs."""
        cfg = self.config
        rng = np.random.default_rng(self.seed + 7919)
        acts = rng.uniform(0.0, 1.0, (cfg.latency_samples, self.n, A_DIM))
        acts[: cfg.latency_samples // 4, :, SKIP] = 0.0  # a quarter without skips
        acts[::3, :, KW] = 1.0  # and a third at full width (bits alone)
        acts[1::3, :, SCHEME] = 0.0
        policies = [Policy.dense(), *(self.codec.policy(a) for a in acts)]
        uniq = list({p.hash: p for p in policies}.values())
        q = layer_quantities(self.codec.index, uniq)
        if self.latency_fn is not None:
            with single_thread():
                y = np.asarray(self.latency_fn(uniq), dtype=np.float64)
            return q, y, np.ones(len(y))
        macs = MacsEstimator(self.space)
        y = np.asarray([macs.fraction(p) for p in uniq])
        return q, y, np.full(len(y), 0.05)

    def _fit_latency(self) -> None:
        q, y, w = self._prior_q, self._prior_y, self._prior_w
        if self.lat_y and self.latency_fn is None:
            # Scored latencies are in the device's unit, the MACs prior in fractions: rescale the prior.
            dense = self.objective.dense.latency_ms if self.objective.dense is not None else None
            scale = dense if dense else float(np.median(self.lat_y)) / max(float(np.median(y)), 1e-9)
            q = np.concatenate([q, np.stack(self.lat_q)])
            y = np.concatenate([y * scale, np.asarray(self.lat_y)])
            w = np.concatenate([w, np.ones(len(self.lat_y))])
        self.latency.fit_quantities(q, y, w)

    # ------------------------------------------------------------------ warm start

    def _warm_start(self) -> list[Policy]:
        """The rule sweep, then single block skips from "int8 everywhere" (sensitivity probes)."""
        from agents.rule import rule_sweep
        from agents.sensitivity import apply_move, candidate_moves

        sweep = rule_sweep(self.space, self.objective, self.seed)
        out = {p.hash: p for p in sweep}
        anchor = next(
            (
                p
                for p in sweep
                if p.skip == frozenset()
                and all(
                    lp.bits is not None and lp.width == 1.0
                    for lp in (p.for_layer(ls.name) for ls in self.space.layers)
                )
            ),
            None,
        )
        if anchor is not None:
            moves = sorted(
                (m for m in candidate_moves(self.space, anchor) if m[1][0] == "skip"), key=lambda m: m[0]
            )
            for _, move in moves[: self.config.max_probes]:
                p = apply_move(self.space, anchor, move)
                if p is not None:
                    out.setdefault(p.hash, p)
        return list(out.values())

    # ------------------------------------------------------------------ episodes

    def _dense_budget(self) -> float | None:
        """The constrained run's latency budget as a fraction of dense (None without a limit)."""
        lim = self.objective.max_latency_ms
        if lim is None:
            return None
        dense = self.objective.dense.latency_ms if self.objective.dense is not None else None
        if not dense:
            dense = self.latency.dense_latency
        return float(lim / dense)

    def _budgets(self, m: int) -> np.ndarray:
        fixed = self._dense_budget()
        if fixed is not None:
            return np.full(m, fixed)
        lo, hi = self.config.budget_range
        return self.rng.uniform(lo, hi, m)

    def _frac(self, a: np.ndarray) -> np.ndarray:
        return self.latency.fraction_quantities(self.codec.quantities(a))

    def _fits(self, a: np.ndarray, budgets: np.ndarray) -> np.ndarray:
        return self._frac(a) <= budgets

    def _largest(self, trial: Callable[[np.ndarray], np.ndarray], budgets: np.ndarray) -> np.ndarray:
        """Per episode, the largest s in [0, 1] with trial(s) within budget (-1 where not even 0 fits)."""
        m = len(budgets)
        ok0 = self._fits(trial(np.zeros(m)), budgets)
        lo, hi = np.zeros(m), np.ones(m)
        for _ in range(WALL_STEPS):
            mid = (lo + hi) / 2
            f = self._fits(trial(mid), budgets)
            lo, hi = np.where(f, mid, lo), np.where(f, hi, mid)
        return np.where(ok0, lo, -1.0)

    def _wall(self, a: np.ndarray, i: int, proposed: np.ndarray, budgets: np.ndarray) -> np.ndarray:
        """Layer ``i``'s actions shrunk just enough that the budget stays reachable (AMC's wall),
        later layers assumed fully compressed but not skipped: width first, then everything."""
        rest = a.copy()
        rest[:, i + 1 :, [KW, KWT, BITS]] = 0.0
        rest[:, i + 1 :, SKIP] = 0.0
        rest[:, i + 1 :, SCHEME] = 1.0

        def with_action(act: np.ndarray) -> np.ndarray:
            t = rest.copy()
            t[:, i] = act
            return t

        out = proposed.copy()
        fits = self._fits(with_action(out), budgets)
        if fits.all():
            return out
        todo = ~fits

        def shrink_width(s: np.ndarray) -> np.ndarray:
            act = proposed.copy()
            act[:, KW] *= s
            return with_action(act)

        s = self._largest(shrink_width, budgets)
        use = todo & (s >= 0)
        out[use, KW] = proposed[use, KW] * s[use]
        todo &= s < 0
        if not todo.any():
            return out

        def shrink_all(s: np.ndarray) -> np.ndarray:
            act = proposed.copy()
            for k in (KW, KWT, BITS, MODEL_BITS):
                act[:, k] *= s
            return with_action(act)

        s = self._largest(shrink_all, budgets)
        use = todo & (s >= 0)
        for k in (KW, KWT, BITS, MODEL_BITS):
            out[use, k] = proposed[use, k] * s[use]
        todo &= s < 0
        for k in (KW, KWT, BITS, MODEL_BITS):
            out[todo, k] = 0.0
        out[todo, SKIP] = 1.0  # unreachable without skipping: skip here if this layer opens a block
        return out

    def _rollout(
        self, budgets: np.ndarray, *, noise: float, forced: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[Episode]]:
        """Run ``len(budgets)`` episodes at once; returns their action matrices and steps."""
        m, n = len(budgets), self.n
        a = np.zeros((m, n, A_DIM))
        a[:, :, [KW, KWT, BITS]] = 1.0  # undecided layers read as dense in the state
        dyn = np.zeros((m, n, DYN_DIM), dtype=np.float32)
        raw_out = np.zeros((m, n, A_DIM), dtype=np.float32)
        prev = np.zeros((m, A_DIM))
        g = np.full(m, 0.5)
        centre = np.ones(m)
        for i in range(n):
            saved = 1.0 - self._frac(a)
            d = np.concatenate(
                [saved[:, None], np.full((m, 1), self.remaining[i]), budgets[:, None], g[:, None], prev],
                axis=1,
            ).astype(np.float32)
            dyn[:, i] = d
            if forced is not None:
                raw = forced[:, i].copy()
            else:
                with torch.no_grad():
                    mean = self.actor(torch.full((m,), i, dtype=torch.long), torch.from_numpy(d)).numpy()
                raw = self._noisy(mean.astype(np.float64), noise)
            if i == 0:
                g = raw[:, MODEL_BITS].copy()
                a[:, :, MODEL_BITS] = g[:, None]
                if forced is None:
                    centre = self._centre(a, budgets)
            act = raw.copy()
            if forced is None:
                act[:, KW] = np.clip(raw[:, KW] + centre - 0.5, 0.0, 1.0)
            act[:, MODEL_BITS] = g
            act = self._wall(a, i, act, budgets)
            if i == 0:
                g = act[:, MODEL_BITS].copy()
                a[:, :, MODEL_BITS] = g[:, None]
            a[:, i] = act
            executed = act.copy()
            if forced is None:
                executed[:, KW] = np.clip(act[:, KW] - centre + 0.5, 0.0, 1.0)
            raw_out[:, i] = executed
            prev = act
        layers = np.arange(n)
        eps = [Episode(layers, dyn[k], raw_out[k], float(budgets[k])) for k in range(m)]
        return a, eps

    def _noisy(self, mean: np.ndarray, sigma: float) -> np.ndarray:
        if sigma <= 0:
            return mean
        out = self.rng.normal(mean, sigma)
        for _ in range(16):
            bad = (out < 0.0) | (out > 1.0)
            if not bad.any():
                break
            out[bad] = self.rng.normal(mean[bad], sigma)
        return np.clip(out, 0.0, 1.0)

    def _centre(self, a: np.ndarray, budgets: np.ndarray) -> np.ndarray:
        """The uniform width that, with everything else dense at this precision, meets each budget."""

        def uniform(s: np.ndarray) -> np.ndarray:
            t = a.copy()
            t[:, :, KW] = s[:, None]
            return t

        full = self._fits(uniform(np.ones(len(budgets))), budgets)
        s = self._largest(uniform, budgets)
        return np.where(full, 1.0, np.maximum(s, 0.0))

    # ------------------------------------------------------------------ rewards

    def _reward(self, accuracy: np.ndarray, frac: np.ndarray, budgets: np.ndarray) -> np.ndarray:
        """Accuracy, less a penalty for latency over the episode's budget or a too-large drop."""
        r = accuracy - 2.0 * np.maximum(0.0, frac - budgets)
        o = self.objective
        if o.max_accuracy_drop is not None and o.dense is not None:
            r = r - 2.0 * np.maximum(0.0, (o.dense.accuracy - accuracy) - o.max_accuracy_drop)
        return r

    # ------------------------------------------------------------------ ask / tell

    def ask(self, n: int = 1) -> list[Policy]:
        self._check_n(n)
        out: list[Policy] = []
        while self.warm and len(out) < n:
            p = self.warm.pop(0)
            if p.hash in self.asked:
                continue
            budget = float(
                np.clip(self.latency.predict([p])[0] / self.latency.dense_latency * 1.01, 0.0, 1.0)
            )
            with single_thread():
                _, eps = self._rollout(np.asarray([budget]), noise=0.0, forced=self.codec.actions_of(p)[None])
            self._remember(p, eps[0])
            out.append(p)
        if len(out) < n:
            with single_thread():
                out += self._propose(n - len(out))
        return out

    def _remember(self, p: Policy, ep: Episode) -> None:
        self.pending[p.hash] = ep
        self.asked.add(p.hash)

    def _propose(self, n: int) -> list[Policy]:
        cfg = self.config
        m = max(cfg.candidates, n)
        budgets = self._budgets(m)
        acts, eps = self._rollout(budgets, noise=self.sigma)
        pool: dict[str, tuple[Policy, Episode]] = {}
        for k in range(m):
            p = self.codec.policy(acts[k])
            if p.hash not in self.asked:
                pool.setdefault(p.hash, (p, eps[k]))
        if not pool:  # every proposal already asked: explore harder
            acts, eps = self._rollout(self._budgets(m), noise=max(self.sigma, 0.3) * 2)
            pool = {self.codec.policy(acts[k]).hash: (self.codec.policy(acts[k]), eps[k]) for k in range(m)}
        items = list(pool.values())
        chosen = self._acquire([p for p, _ in items], n)
        out = []
        for k in chosen:
            p, ep = items[k]
            self._remember(p, ep)
            out.append(p)
        while len(out) < n:  # fewer distinct candidates than asked: repeat the best (allowed)
            out.append(out[-1] if out else items[0][0])
        return out

    def _acquire(self, policies: list[Policy], n: int) -> list[int]:
        """Indices of the ``n`` candidates to evaluate: greatest optimistic gain, fantasised in turn."""
        if len(self.surrogate) < 2:
            return list(range(min(n, len(policies))))
        mean, std = self.surrogate.predict(policies)
        if self.latency_fn is not None:
            lat = np.asarray(self.latency_fn(policies), dtype=np.float64)
            dense_lat = self.objective.dense.latency_ms if self.objective.dense is not None else None
            frac = lat / (dense_lat or self.latency.dense_latency)
        else:
            frac = self.latency.predict(policies) / self.latency.dense_latency
        opt = mean + self.config.kappa * std
        chosen: list[int] = []
        fixed = self._dense_budget()
        if fixed is not None:
            # Under a limit: optimistic accuracy among those predicted within it.
            score = np.where(frac <= fixed, opt, opt - 10.0)
            o = self.objective
            if o.max_accuracy_drop is not None and o.dense is not None:
                score = score - 2.0 * np.maximum(0.0, (o.dense.accuracy - mean) - o.max_accuracy_drop)
            return [int(k) for k in np.argsort(-score, kind="stable")[:n]]
        dense_acc = self.surrogate._dense()
        ref = (dense_acc - REF_DROP, 1.0)
        front = self._front_fracs()
        for _ in range(min(n, len(policies))):
            base = hypervolume_2d(front, ref)
            gains = np.asarray(
                [
                    -1.0
                    if k in chosen
                    else hypervolume_2d([*front, (float(opt[k]), float(frac[k]))], ref) - base
                    for k in range(len(policies))
                ]
            )
            best = int(np.argmax(gains))
            if gains[best] <= 1e-12:  # nothing promises a gain: the one known least
                free = [k for k in range(len(policies)) if k not in chosen]
                best = max(free, key=lambda k: float(std[k]))
            chosen.append(best)
            front = [*front, (float(mean[best]), float(frac[best]))]  # believe the mean
        return chosen

    def _front_fracs(self) -> list[tuple[float, float]]:
        dense = self.objective.dense.latency_ms if self.objective.dense is not None else None
        scale = dense or (self.latency.dense_latency if self.latency_fn is not None else None)
        if not scale:
            return []
        return [(a, lat / scale) for a, lat in self.told]

    def tell(self, policies: Sequence[Policy], scores: Sequence[Score]) -> None:
        self._check_tell(policies, scores)
        with single_thread():
            self._tell(policies, scores)

    def _tell(self, policies: Sequence[Policy], scores: Sequence[Score]) -> None:
        good = [(p, s) for p, s in zip(policies, scores, strict=True) if s.ok]
        if good:
            self.surrogate.add([p for p, _ in good], [s.accuracy for _, s in good])
            q = layer_quantities(self.codec.index, [p for p, _ in good])
            self.lat_q += list(q)
            self.lat_y += [s.latency_ms for _, s in good]
            self.told += [(s.accuracy, s.latency_ms) for _, s in good]
        if self.latency_fn is None and good:
            self._fit_latency()
        dense_lat = self.objective.dense.latency_ms if self.objective.dense is not None else None
        dense_lat = dense_lat or (self.latency.dense_latency if self.latency_fn is not None else None)
        for p, s in zip(policies, scores, strict=True):
            ep = self.pending.pop(p.hash, None)
            if ep is None:
                continue
            if s.ok and dense_lat:
                frac = s.latency_ms / dense_lat
                r = float(
                    self._reward(np.asarray([s.accuracy]), np.asarray([frac]), np.asarray([ep.budget]))[0]
                )
                r = min(r, self.objective.reward(s)) if not self.objective.feasible(s) else r
            else:
                r, frac = self.objective.reward(s), 1.0
            self._add(ep, r)
            if s.ok and self.objective.feasible(s):
                self._add_elite(s.accuracy, frac, r, ep)
            self.episodes_told += 1
            self.sigma = max(self.config.noise_min, self.sigma * self.config.noise_decay)
        if len(self.surrogate) >= 2:
            self.surrogate.fit()
            self._imagine()
            for _ in range(self.config.updates_per_tell):
                self._update()

    def _add(self, ep: Episode, reward: float) -> None:
        for i in range(self.n):
            nxt = min(i + 1, self.n - 1)
            self.buffer.add(
                int(ep.layer[i]), ep.dyn[i], ep.action[i], reward, nxt, ep.dyn[nxt], i == self.n - 1
            )

    def _imagine(self) -> None:
        """Episodes scored by the surrogate (mean accuracy, predicted latency) into the replay."""
        m = self.config.imagined_episodes
        if m <= 0:
            return
        budgets = self._budgets(m)
        acts, eps = self._rollout(budgets, noise=self.sigma)
        q = self.codec.quantities(acts)
        acc, _ = self.surrogate.predict_quantities(q)
        frac = self.latency.fraction_quantities(q)
        rewards = self._reward(acc, frac, budgets)
        for ep, r in zip(eps, rewards, strict=True):
            self._add(ep, float(r))

    def _add_elite(self, accuracy: float, frac: float, reward: float, ep: Episode) -> None:
        if self.config.imitation <= 0:
            return
        pool = [*self.elites, (accuracy, frac, reward, ep)]
        if self._dense_budget() is None:
            pool = [
                e
                for e in pool
                if not any(o[0] >= e[0] and o[1] <= e[1] and (o[0], o[1]) != (e[0], e[1]) for o in pool)
            ]
            pool.sort(key=lambda e: -e[0])
        else:
            pool.sort(key=lambda e: -e[2])
        self.elites = pool[: self.config.elites]

    def _update(self) -> None:
        cfg = self.config
        if self.buffer.size == 0:
            return
        b = self.buffer.sample(cfg.batch_size, self.rng)
        layer, dyn, action = (
            torch.from_numpy(b.layer),
            torch.from_numpy(b.dynamic),
            torch.from_numpy(b.action),
        )
        reward = torch.from_numpy(b.reward)
        critic_loss = F.mse_loss(self.critic(layer, dyn, action), reward)  # discount 0: Q = episode reward
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        actor_loss = -self.critic(layer, dyn, self.actor(layer, dyn)).mean()
        if self.elites and cfg.imitation > 0:
            rows_l = np.concatenate([e[3].layer for e in self.elites])
            rows_d = np.concatenate([e[3].dyn for e in self.elites])
            rows_a = np.concatenate([e[3].action for e in self.elites]).astype(np.float32)
            idx = self.rng.integers(0, len(rows_l), cfg.batch_size)
            pred = self.actor(torch.from_numpy(rows_l[idx]), torch.from_numpy(rows_d[idx]))
            actor_loss = actor_loss + cfg.imitation * F.mse_loss(pred, torch.from_numpy(rows_a[idx]))
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        with torch.no_grad():
            for net, tgt in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                for p, tp in zip(net.parameters(), tgt.parameters(), strict=True):
                    tp.mul_(1.0 - cfg.tau).add_(p, alpha=cfg.tau)

    # ------------------------------------------------------------------ state

    def set_objective(self, objective: Objective) -> None:
        super().set_objective(objective)
        if objective.dense is not None:
            self.surrogate.dense_accuracy = objective.dense.accuracy
            self.surrogate.model = None

    @staticmethod
    def _ep(ep: Episode) -> dict[str, Any]:
        return {
            "layer": encode(ep.layer),
            "dyn": encode(ep.dyn),
            "action": encode(ep.action),
            "budget": ep.budget,
        }

    @staticmethod
    def _unep(raw: dict[str, Any]) -> Episode:
        return Episode(decode(raw["layer"]), decode(raw["dyn"]), decode(raw["action"]), float(raw["budget"]))

    def state_dict(self) -> dict[str, Any]:
        return {
            "agent": self.name,
            "config": asdict(self.config),
            "nets": {
                k: encode(getattr(self, k).state_dict())
                for k in ("actor", "critic", "actor_target", "critic_target", "actor_opt", "critic_opt")
            },
            "buffer": self.buffer.state_dict(),
            "rng": self.rng.bit_generator.state,
            "sigma": self.sigma,
            "surrogate": self.surrogate.state_dict(),
            "lat_q": encode(np.stack(self.lat_q) if self.lat_q else np.zeros((0, self.n, 7))),
            "lat_y": encode(np.asarray(self.lat_y, dtype=np.float64)),
            "pending": {h: self._ep(e) for h, e in self.pending.items()},
            "asked": sorted(self.asked),
            "told": encode(np.asarray(self.told, dtype=np.float64).reshape(-1, 2)),
            "elites": [[a, f, r, self._ep(e)] for a, f, r, e in self.elites],
            "warm": [p.to_dict() for p in self.warm],
            "episodes_told": self.episodes_told,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("agent") != self.name:
            raise ValueError(f"state of agent {state.get('agent')!r} cannot restore a {self.name!r} agent")
        for k, v in state["nets"].items():
            getattr(self, k).load_state_dict(decode(v))
        self.buffer.load_state_dict(state["buffer"])
        self.rng.bit_generator.state = state["rng"]
        self.sigma = float(state["sigma"])
        self.surrogate.load_state_dict(state["surrogate"])
        self.lat_q = list(decode(state["lat_q"]))
        self.lat_y = [float(v) for v in decode(state["lat_y"])]
        if self.latency_fn is None and self.lat_y:
            with single_thread():
                self._fit_latency()
        self.pending = {h: self._unep(e) for h, e in state["pending"].items()}
        self.asked = set(state["asked"])
        self.told = [(float(a), float(b)) for a, b in decode(state["told"])]
        self.elites = [(float(a), float(f), float(r), self._unep(e)) for a, f, r, e in state["elites"]]
        self.warm = [Policy.from_dict(p) for p in state["warm"]]
        self.episodes_told = int(state["episodes_told"])
        if len(self.surrogate) >= 2:
            with single_thread():
                self.surrogate.fit()
