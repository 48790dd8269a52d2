"""Cheap models of a policy's reward, fitted online on the candidates already scored.

A search of 60-200 real evaluations is far too short for an actor-critic that needs
hundreds of episodes. A surrogate turns every real evaluation into many cheap imagined
ones (Dyna): the agent trains inside it and spends real evaluations on the policies it
rates best or knows least. Two models, both reusable by any agent:

- :class:`AccuracySurrogate`: Bayesian linear regression of the accuracy lost, on per-layer
  damage features (narrowed channels, zeroed weights, fewer bits, skipped blocks) plus
  their model-wide sums, so a few points teach the average sensitivity and more points the
  per-layer one. Accuracy is modelled as a retention ``dense * exp(-sum of damages)``, and
  the posterior gives an uncertainty for every prediction.
- :class:`LatencyModel`: least squares of the device's latency on per-layer compute terms,
  fitted to the device's latency predictor (or to scored latencies), including the
  model-wide precision switch (a runtime that runs int8 only when most MACs are quantized).

Both read a policy through :func:`layer_quantities`, which an agent can also compute from
its own actions without building a policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from agents._serial import decode, encode
from compression import schemes as _schemes
from compression.policy import Policy
from compression.space import SearchSpace

#: Per-layer quantities, in this order: kept output fraction, kept input fraction, zeroed
#: fraction of the weight, structured pattern (a fine scheme other than unstructured), quantized,
#: bit loss ((8 - bits) / 6)^2, alive (0 inside a skipped block).
QUANTITIES = ("out_keep", "in_keep", "sparsity", "pattern", "quant", "bit_loss", "alive")
N_QUANT = len(QUANTITIES)
MAX_RETENTION_LOSS = 4.6  # -log(0.01): accuracies below 1 % of dense all look alike


class SpaceIndex:
    """What the quantities need from a space, precomputed once (leaders, producers, blocks)."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        n = len(space.layers)
        index = {ls.name: i for i, ls in enumerate(space.layers)}
        self.n = n
        self.leader = np.asarray(
            [
                index[ls.width_leader] if ls.width_prunable and ls.width_leader in index else -1
                for ls in space.layers
            ]
        )
        self.producers: list[list[int]] = [[] for _ in range(n)]
        for src, dst in space.edges:
            if 0 <= src < n and 0 <= dst < n:
                self.producers[dst].append(src)
        # in_keep = out_keep @ mix: the mean of a layer's producers, 1 for layers fed by none.
        self.mix = np.zeros((n, n))
        self.fed = np.zeros(n, dtype=bool)
        for i, prods in enumerate(self.producers):
            for j in prods:
                self.mix[j, i] += 1.0 / len(prods)
            self.fed[i] = bool(prods)
        self.block_layers = {b.name: [index[m] for m in b.layers if m in index] for b in space.blocks}
        self.macs = np.asarray([float(ls.features.macs) for ls in space.layers])
        self.macs_share = self.macs / (self.macs.sum() or 1.0)

    def from_parts(
        self,
        out_own: np.ndarray,
        sparsity: np.ndarray,
        pattern: np.ndarray,
        bits: np.ndarray,
        alive: np.ndarray,
    ) -> np.ndarray:
        """Quantities ``[..., n_layers, N_QUANT]`` from per-layer parts with any leading batch shape.

        ``out_own``: the width each layer would keep if it led its group (read at leaders only);
        ``bits``: 0 for float, else the bit-width.
        """
        shape = out_own.shape
        out = np.ones(shape)
        has = self.leader >= 0
        out[..., has] = out_own[..., self.leader[has]]
        inp = np.where(self.fed, out @ self.mix, 1.0)
        quant = (bits > 0).astype(float)
        loss = np.where(bits > 0, ((8.0 - np.where(bits > 0, bits, 8.0)) / 6.0) ** 2, 0.0)
        return np.stack([out, inp, sparsity, pattern, quant, loss, alive], axis=-1)


def layer_quantities(index: SpaceIndex, policies: Sequence[Policy]) -> np.ndarray:
    """``[len(policies), n_layers, N_QUANT]`` quantities of each policy (see ``QUANTITIES``)."""
    space = index.space
    m, n = len(policies), index.n
    out_own, sparsity, pattern = np.ones((m, n)), np.zeros((m, n)), np.zeros((m, n))
    bits, alive = np.zeros((m, n)), np.ones((m, n))
    for k, policy in enumerate(policies):
        for i, ls in enumerate(space.layers):
            lp = policy.for_layer(ls.name)
            out_own[k, i] = lp.width
            sparsity[k, i] = lp.target_sparsity
            pattern[k, i] = float(lp.scheme not in (_schemes.DENSE, "unstructured") and sparsity[k, i] > 0)
            bits[k, i] = 0.0 if lp.bits is None else float(lp.bits)
        for name in policy.skip:
            alive[k, index.block_layers.get(name, [])] = 0.0
    return index.from_parts(out_own, sparsity, pattern, bits, alive)


# --------------------------------------------------------------------------- regression


class BayesianRidge:
    """Linear regression with a Gaussian prior, its two precisions set by evidence maximisation.

    Deterministic (no sampling), so an agent refitted from the same data after a resume
    predicts bit-identically. No intercept: all-zero features mean "nothing changed".
    """

    def __init__(self, iterations: int = 40) -> None:
        self.iterations = iterations
        self.mean = np.zeros(0)
        self.cov = np.zeros((0, 0))
        self.noise_var = 1.0
        self.prior_var = 1.0

    def fit(self, x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> BayesianRidge:
        n = x.shape[0]
        w = np.ones(n) if weights is None else weights
        xw = x * w[:, None]
        # In the eigenbasis of X'X every iteration is O(d): one decomposition per fit.
        eig, vec = np.linalg.eigh(x.T @ xw)
        eig = eig.clip(min=0.0)
        proj = vec.T @ (xw.T @ y)
        alpha, beta = 1.0, 1.0 / max(float(np.var(y)) if n > 1 else 1.0, 1e-4)
        for _ in range(self.iterations):
            coef = beta * proj / (alpha + beta * eig)  # the posterior mean, in the eigenbasis
            gamma = float(np.sum(beta * eig / (alpha + beta * eig)))
            alpha = max(gamma, 1e-3) / max(float(coef @ coef), 1e-8)
            resid = float(np.sum(w * (y - x @ (vec @ coef)) ** 2))
            beta = max(float(w.sum()) - gamma, 1.0) / max(resid, 1e-8)
            alpha, beta = min(alpha, 1e8), min(beta, 1e6)
        inv = 1.0 / (alpha + beta * eig)
        self.cov = (vec * inv) @ vec.T
        self.mean = vec @ (beta * proj * inv)
        self.noise_var, self.prior_var = 1.0 / beta, 1.0 / alpha
        return self

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and predictive standard deviation (noise included) of each row."""
        mean = x @ self.mean
        var = self.noise_var + np.einsum("ij,jk,ik->i", x, self.cov, x)
        return mean, np.sqrt(np.maximum(var, 0.0))


def damage_features(q: np.ndarray) -> np.ndarray:
    """``[..., n_layers, N_QUANT]`` -> ``[..., 7 * n_layers + 7]``: per-layer damages, then their sums."""
    out, sp, pat, quant, loss, alive = q[..., 0], q[..., 2], q[..., 3], q[..., 4], q[..., 5], q[..., 6]
    cut = 1.0 - out
    per = np.stack(
        [
            alive * cut,
            alive * cut**2,
            alive * sp**2,
            alive * sp**3 * (1.0 + pat),
            alive * quant,
            alive * loss,
            1.0 - alive,
        ],
        axis=-1,
    )
    flat = per.reshape(*per.shape[:-2], -1)
    return np.concatenate([flat, per.sum(axis=-2)], axis=-1)


class AccuracySurrogate:
    """Accuracy of a policy from the scored ones: mean and uncertainty (see the module doc).

    ``add`` the scored candidates (warm start: the rule sweep, sensitivity probes), ``fit``,
    then ``predict`` any number of policies (or quantities) in one call.
    """

    def __init__(self, space: SearchSpace, dense_accuracy: float | None = None) -> None:
        self.index = SpaceIndex(space)
        self.dense_accuracy = dense_accuracy
        self.q: list[np.ndarray] = []
        self.accuracy: list[float] = []
        self.model: BayesianRidge | None = None

    def __len__(self) -> int:
        return len(self.accuracy)

    def add(self, policies: Sequence[Policy], accuracies: Sequence[float]) -> None:
        """Record scored policies (failed ones should be left out: their accuracy means nothing)."""
        if not policies:
            return
        self.add_quantities(layer_quantities(self.index, policies), accuracies)

    def add_quantities(self, q: np.ndarray, accuracies: Sequence[float]) -> None:
        for row, acc in zip(q, accuracies, strict=True):
            self.q.append(np.asarray(row, dtype=np.float64))
            self.accuracy.append(float(acc))
        self.model = None

    def _dense(self) -> float:
        if self.dense_accuracy is not None:
            return self.dense_accuracy
        return max(self.accuracy) if self.accuracy else 1.0

    def fit(self) -> AccuracySurrogate:
        if not self.accuracy:
            raise ValueError("the accuracy surrogate has no scored policies yet: add some first")
        dense = self._dense()
        x = damage_features(np.stack(self.q))
        retained = np.clip(np.asarray(self.accuracy) / max(dense, 1e-9), np.exp(-MAX_RETENTION_LOSS), None)
        y = np.minimum(-np.log(retained), MAX_RETENTION_LOSS)
        self.model = BayesianRidge().fit(x, y)
        return self

    def predict_quantities(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Accuracy mean and standard deviation for ``[m, n_layers, N_QUANT]`` quantities."""
        if self.model is None:
            self.fit()
        assert self.model is not None
        loss, std = self.model.predict(damage_features(q))
        loss = np.clip(loss, 0.0, MAX_RETENTION_LOSS)
        acc = self._dense() * np.exp(-loss)
        return acc, acc * std  # delta method: d acc = acc * d loss

    def predict(self, policies: Sequence[Policy]) -> tuple[np.ndarray, np.ndarray]:
        return self.predict_quantities(layer_quantities(self.index, policies))

    def state_dict(self) -> dict[str, Any]:
        """The data only: the fit is deterministic, so a restored surrogate predicts identically."""
        q = np.stack(self.q) if self.q else np.zeros((0, self.index.n, N_QUANT))
        return {"q": encode(q), "accuracy": list(self.accuracy), "dense": self.dense_accuracy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        q = decode(state["q"])
        self.q = [row for row in q]
        self.accuracy = [float(a) for a in state["accuracy"]]
        self.dense_accuracy = state["dense"]
        self.model = None


def latency_features(q: np.ndarray, macs_share: np.ndarray) -> np.ndarray:
    """``[..., n_layers, N_QUANT]`` -> per-layer compute terms, the model-wide int8 switch and a constant.

    Per layer: kept compute (out x in channels), the same when quantized, when quantized with
    most of the model quantized (runtimes switch whole graphs to int8 kernels), the zeroed
    fraction of it (sparse kernels), and the layer being present (per-op overhead).
    """
    out, inp, sp, quant, alive = q[..., 0], q[..., 1], q[..., 2], q[..., 4], q[..., 6]
    compute = alive * out * inp
    qshare = (compute * quant * macs_share).sum(axis=-1) / np.maximum(
        (compute * macs_share).sum(axis=-1), 1e-9
    )
    switch = (qshare >= 0.5).astype(float)
    per = np.stack(
        [compute, compute * quant, compute * quant * switch[..., None], compute * sp, alive], axis=-1
    )
    flat = per.reshape(*per.shape[:-2], -1)
    ones = np.ones((*flat.shape[:-1], 1))
    return np.concatenate([flat, switch[..., None], qshare[..., None], ones], axis=-1)


class LatencyModel:
    """Latency from per-layer compute terms, fitted by ridge least squares (see :func:`latency_features`).

    Cheap enough to call inside every step of every imagined episode (the action wall), and
    fitted to what the user constrains: the device's latency, not MACs.
    """

    def __init__(self, space: SearchSpace, ridge: float = 1e-4) -> None:
        self.index = SpaceIndex(space)
        self.ridge = ridge
        self.coef: np.ndarray | None = None
        self.dense_latency = 1.0

    def fit_quantities(
        self, q: np.ndarray, latency: np.ndarray, weights: np.ndarray | None = None
    ) -> LatencyModel:
        """Fit on ``[m, n_layers, N_QUANT]`` quantities and their latencies (any unit)."""
        if len(latency) == 0:
            raise ValueError("the latency model needs at least one scored policy")
        x = latency_features(q, self.index.macs_share)
        w = np.ones(len(latency)) if weights is None else weights
        scale = max(float(np.max(np.abs(latency))), 1e-12)
        y = np.asarray(latency, dtype=np.float64) / scale
        xw = x * w[:, None]
        a = x.T @ xw + self.ridge * np.eye(x.shape[1])
        self.coef = np.linalg.solve(a, xw.T @ y) * scale
        dense_q = self.index.from_parts(*_dense_parts(self.index.n))
        self.dense_latency = max(float(self.predict_quantities(dense_q[None])[0]), 1e-12)
        return self

    def fit(self, policies: Sequence[Policy], latency: Sequence[float]) -> LatencyModel:
        return self.fit_quantities(layer_quantities(self.index, policies), np.asarray(latency))

    def predict_quantities(self, q: np.ndarray) -> np.ndarray:
        if self.coef is None:
            raise ValueError("the latency model is not fitted: call fit first")
        return latency_features(q, self.index.macs_share) @ self.coef

    def predict(self, policies: Sequence[Policy]) -> np.ndarray:
        return self.predict_quantities(layer_quantities(self.index, policies))

    def fraction_quantities(self, q: np.ndarray) -> np.ndarray:
        """Predicted latency as a fraction of the dense model's."""
        return self.predict_quantities(q) / self.dense_latency


def _dense_parts(n: int) -> tuple[np.ndarray, ...]:
    return np.ones(n), np.zeros(n), np.zeros(n), np.zeros(n), np.ones(n)
