"""Kernel-level predictor (nn-Meter style): one gradient-boosted model of every kernel's cost.

A compressed model is a set of rows (``latency_models.rows``): one per kernel (conv+bn+relu
fused, as ONNX Runtime fuses it, with the weight-free ops that serve it) and one for the model
itself (session overhead, input copy, per-op costs). Each row has a nominal ``work`` (MACs
plus memory traffic plus a fixed per-op cost); a LightGBM model ``f`` of the row's features
predicts its log *inverse efficiency*, so the row costs ``exp(f(x)) · work`` and the model's
latency is the sum over its rows. Trees cannot extrapolate, but an efficiency is bounded where
a latency is not, so kernels larger than any seen in training still get sensible costs.
A first stage (``base_stage``) fits a non-negative roofline per row type and int8 flag - cost
per MAC, per element moved, per op - on the model totals by least squares on relative errors;
the trees then learn each row's deviation from it (on this machine's data it raised held-out
speedups within ±10 % from ~36 % to ~44 % in a grouped cross-validation of the training set).

Fitting: the booster is trained with a custom objective on two things at once.

* The model totals: the squared log error of each model's summed prediction (relative error,
  what MAPE and "within ±10 %" measure). Its gradient with respect to a row's score is the
  model's log error times the row's share of the model (a majorizing hessian, the share,
  keeps the Newton steps stable). Each compressed record also brings the dense model timed
  interleaved in the same run as a second target, so each speedup is a pair of targets from
  one stretch of the machine.
* The split: when a measurement carries ONNX Runtime's per-node profile
  (``latency_models.profiling``), each row's profiled share of the model's time, times the
  measured total, is a target for that row (weighted by the share). Timing whole models
  gives one number per measurement, which a few hundred measurements cannot split over the
  kernels of unseen architectures; the profile gives nn-Meter's per-kernel supervision from
  the same measurements. Without profiles (a remote device agent), only the totals are fitted.

Nothing assumes that sparsity or int8 helps: the int8 flag is a plain feature (in ONNX Runtime
int8 helps wide kernels and hurts narrow ones), and the per-layer policy fields that leave the
shape unchanged (scheme, sparsity, N:M, block, bits) are kept as features only when a grouped
cross-validation on the training data says they improve the error (``policy_features="auto"``):
a runtime whose masks change nothing gets a predictor that cannot move with them.

Uncertainty (``predict_uncertainty``): ``ensemble`` more boosters (4 by default), each fitted
like the main one (same policy-feature choice, no second cross-validation) on a bootstrap
resample of the training targets and its own seed. Their spread is the predictor's doubt: on
this project's synthetic device (``latency_models.testing``) a resample of records rather than
of whole architectures gave the spread that best follows the real error (rank correlation
0.68 against 0.65 for architectures and 0.43 for seeds alone, on held-out architectures and
zoo models), and it stays small on the policies of a training architecture (every member has
seen most of them). Cost: each member is one more fit without the cross-validation: on 288
records (idle 2-core machine) the fit took 4.2 s instead of 2.1 s, and ``predict_uncertainty``
of 500 ResNet-20 policies 0.25 s; ``predict`` alone does not touch the members.

Prediction is batched: static row facts are computed once per space, per-policy facts are
numpy arrays, rows are de-duplicated (a kernel's row depends on its layer, kept channels, the
int8 flag and its neighbours' layouts), and one booster call scores all unique rows of the
batch; scored rows are memoised per space, so a search that revisits shapes pays once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
from scipy.optimize import nnls

from compression.policy import Policy
from compression.space import SearchSpace
from latency_models.predictors.base import LatencyRecord, Predictor, register
from latency_models.profiling import row_shares
from latency_models.rows import N_GROUPS, POLICY_FEATURES, ROW_FEATURES, base_design, row_index, unique_rows

__all__ = ["KernelGBDT"]

_FORMAT = 2
_MEMO_LIMIT = 2_000_000
#: Seed offset of the ensemble members (member k trains with ``seed + _MEMBER_SEED + k``).
_MEMBER_SEED = 1000


@dataclass(frozen=True)
class _Item:
    """One training target: a model (space, policy), its architecture, and its row shares."""

    space: SearchSpace
    policy: Policy
    arch: str
    shares: np.ndarray | None  # per row (``RowIndex.keys`` order), from the profiler; or None


def _training_targets(
    records: Sequence[LatencyRecord], y: np.ndarray, target: str
) -> tuple[list[_Item], np.ndarray]:
    """Items and targets: each record, plus the dense model timed in the same run.

    Row shares come from the profiles stored with the measurements (``profile`` for the
    record's model, ``dense_profile`` or the dense record's ``profile`` for the dense one).
    """
    dense = Policy.dense()
    dense_profiles: dict[str, Any] = {}
    for r in records:
        meas = r.measurement or {}
        prof = meas.get("dense_profile") or (meas.get("profile") if r.policy == dense else None)
        if prof:
            dense_profiles.setdefault(r.space_id, prof)
    dense_shares: dict[str, np.ndarray | None] = {}

    def shares_of_dense(r: LatencyRecord) -> np.ndarray | None:
        if r.space_id not in dense_shares:
            prof = dense_profiles.get(r.space_id)
            dense_shares[r.space_id] = row_shares(r.space, dense, prof) if prof else None
        return dense_shares[r.space_id]

    items: list[_Item] = []
    ys: list[float] = []
    for r, t in zip(records, y, strict=True):
        prof = (r.measurement or {}).get("profile")
        is_dense = r.policy == dense
        shares = shares_of_dense(r) if is_dense else (row_shares(r.space, r.policy, prof) if prof else None)
        items.append(_Item(r.space, r.policy, r.arch_id, shares))
        ys.append(float(t))
        d = r.dense_ratio if target == "ratio" else r.dense_latency_ms
        if d is not None and d > 0 and not is_dense:
            items.append(_Item(r.space, dense, r.arch_id, shares_of_dense(r)))
            ys.append(float(d))
    return items, np.asarray(ys, dtype=np.float64)


@dataclass
class _Fit:
    """A fitted cost model: first-stage rates ``theta`` (per row group), then the trees."""

    booster: lgb.Booster | None
    f0: float
    theta: np.ndarray
    work_rate: float

    def base(self, x: np.ndarray, work: np.ndarray) -> np.ndarray:
        """First-stage cost of each row; rows of groups the fit never saw scale ``work``."""
        design, group = base_design(x)
        base = (design * self.theta[group]).sum(axis=1)
        fallback = work * self.work_rate
        return np.where(base > 1e-6 * fallback, base, fallback)

    def cost(self, x: np.ndarray, work: np.ndarray) -> np.ndarray:
        """Predicted cost of each row (target units)."""
        assert self.booster is not None
        score = np.asarray(self.booster.predict(x, raw_score=True, num_threads=1), dtype=np.float64)
        return np.exp(score + self.f0) * self.base(x, work)


@register
class KernelGBDT(Predictor):
    """Sum over a model's rows of ``exp(f(row)) · work``, ``f`` one LightGBM model."""

    kind = "kernel_gbdt"

    def __init__(
        self,
        target: Any = "ms",
        seed: int = 0,
        n_estimators: int = 300,
        learning_rate: float = 0.08,
        num_leaves: int = 15,
        min_data_in_leaf: int = 10,
        policy_features: bool | str = "auto",
        base_stage: bool = True,
        profile_weight: float = 3.0,
        rounds: int | None = None,  # accepted for compatibility with format 1; unused
        ensemble: int = 4,
    ) -> None:
        super().__init__(target, seed)
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_data_in_leaf = min_data_in_leaf
        if policy_features not in (True, False, "auto"):
            raise ValueError(f"policy_features must be True, False or 'auto', got {policy_features!r}")
        self.policy_features: bool | str = policy_features
        self.uses_policy_features = policy_features is True
        self.base_stage = base_stage
        self.profile_weight = profile_weight
        if ensemble < 0:
            raise ValueError(f"ensemble must be >= 0 (members besides the main model), got {ensemble}")
        self.ensemble = ensemble
        self.model = _Fit(None, 0.0, np.zeros((N_GROUPS, 3)), 1.0)
        #: the bootstrap members (``predict_uncertainty``); empty when loaded from an older save
        self.members: list[_Fit] = []
        self.selection: dict[str, float] = {}
        self._memo: dict[int, tuple[SearchSpace, np.ndarray, np.ndarray]] = {}

    # -- fitting
    def _params(self, seed: int | None = None) -> dict[str, Any]:
        return {
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf,
            "min_sum_hessian_in_leaf": 1e-6,
            "feature_fraction": 0.9,
            "bagging_fraction": 0.9,
            "bagging_freq": 1,
            "lambda_l2": 1.0,
            "num_threads": 1,
            "seed": self.seed if seed is None else seed,
            "deterministic": True,
            "force_col_wise": True,
            "verbose": -1,
        }

    @staticmethod
    def _rows(items: list[_Item], fields: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Rows of the items: features, work, owner (index into ``items``), profiled share (or NaN)."""
        groups: dict[int, tuple[SearchSpace, list[int]]] = {}
        for i, it in enumerate(items):
            groups.setdefault(id(it.space), (it.space, []))[1].append(i)
        xs, ws, owners, shares = [], [], [], []
        for space, ix in groups.values():
            rs = row_index(space).rows([items[i].policy for i in ix], fields)
            xs.append(rs.x)
            ws.append(rs.work)
            own = np.asarray(ix, dtype=np.int64)[rs.owner]
            owners.append(own)
            # rows come kernels first (policy-major, layers in order), then one model row each
            sh = np.full(len(rs.owner), np.nan)
            for j, i in enumerate(ix):
                s_i = items[i].shares
                mine = np.flatnonzero(rs.owner == j)
                if s_i is not None and len(s_i) == len(mine):
                    sh[mine] = s_i
            shares.append(sh)
        return np.concatenate(xs), np.concatenate(ws), np.concatenate(owners), np.concatenate(shares)

    @staticmethod
    def _fit_base(x: np.ndarray, owner: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Non-negative cost per (MAC, element of traffic, op) and row group, on model totals.

        Least squares on relative errors (rows scaled by 1/y), with a little ridge.
        """
        design, group = base_design(x)
        n_models = len(y)
        cols = np.zeros((len(x), N_GROUPS * 3))
        for j in range(3):
            cols[np.arange(len(x)), group * 3 + j] = design[:, j]
        a = np.zeros((n_models, N_GROUPS * 3))
        np.add.at(a, owner, cols)
        a /= y[:, None]
        used = np.flatnonzero(np.abs(a).sum(axis=0) > 0)
        scale = np.maximum(np.abs(a[:, used]).max(axis=0), 1e-12)
        ridge = 1e-3 * np.sqrt(n_models)
        a_used = np.vstack([a[:, used] / scale, ridge * np.eye(len(used))])
        b = np.concatenate([np.ones(n_models), np.zeros(len(used))])
        theta_used, _ = nnls(a_used, b, maxiter=50 * max(1, len(used)))
        theta = np.zeros(N_GROUPS * 3)
        theta[used] = theta_used / scale
        return theta.reshape(N_GROUPS, 3)

    def _train(
        self,
        x: np.ndarray,
        work: np.ndarray,
        owner: np.ndarray,
        share: np.ndarray,
        y: np.ndarray,
        seed: int | None = None,
    ) -> _Fit:
        """Boost ``f`` on the model totals, and on the profiled split where there is one."""
        n_models = len(y)
        logy = np.log(y)
        work_rate = float(np.median(y / np.bincount(owner, weights=work, minlength=n_models)))
        theta = self._fit_base(x, owner, y) if self.base_stage else np.zeros((N_GROUPS, 3))
        fit = _Fit(None, 0.0, theta, work_rate)
        base = fit.base(x, work)
        per_model = np.bincount(owner, weights=base, minlength=n_models)
        fit.f0 = float(np.median(logy - np.log(per_model)))
        scale = len(x) / n_models
        # Row targets: the profiled share of the model's measured time, in score units.
        known = np.isfinite(share) & (share > 0)
        tau = np.zeros(len(x))
        tau[known] = np.log(share[known] * y[owner[known]] / base[known])
        w_row = np.where(known, np.nan_to_num(share), 0.0) * self.profile_weight

        def objective(preds: np.ndarray, _: lgb.Dataset) -> tuple[np.ndarray, np.ndarray]:
            c = np.exp(preds) * base
            tot = np.bincount(owner, weights=c, minlength=n_models)
            r = np.log(tot) - logy
            s = c / tot[owner]
            grad = r[owner] * s + w_row * (preds - tau)
            hess = s + w_row
            return scale * grad, scale * hess

        names = list(ROW_FEATURES) + (list(POLICY_FEATURES) if x.shape[1] > len(ROW_FEATURES) else [])
        data = lgb.Dataset(
            x,
            np.zeros(len(x)),
            init_score=np.full(len(x), fit.f0),
            feature_name=names,
            categorical_feature=["type"],
            free_raw_data=False,
        )
        params = {**self._params(seed), "objective": objective}
        fit.booster = lgb.train(params, data, num_boost_round=self.n_estimators)
        return fit

    def _fit_items(self, items: list[_Item], y: np.ndarray, fields: bool, seed: int | None = None) -> _Fit:
        x, work, owner, share = self._rows(items, fields)
        return self._train(x, work, owner, share, y, seed)

    def _fit_members(self, items: list[_Item], y: np.ndarray, fields: bool) -> list[_Fit]:
        """``ensemble`` boosters, each on a bootstrap resample of the targets with its own seed."""
        members = []
        for k in range(self.ensemble):
            seed = self.seed + _MEMBER_SEED + k
            pick = np.random.default_rng(seed).integers(0, len(items), len(items))
            members.append(self._fit_items([items[i] for i in pick], y[pick], fields, seed))
        return members

    def _cv_error(self, items: list, y: np.ndarray, fields: bool, folds: int = 3) -> float:
        """Mean |log error| over a grouped (by architecture) cross-validation of the training data."""
        arches = sorted({it.arch for it in items})
        order = np.random.default_rng(self.seed).permutation(len(arches))
        fold_of = {arches[j]: k % folds for k, j in enumerate(order)}
        errs = []
        for k in range(folds):
            tr = [i for i, it in enumerate(items) if fold_of[it.arch] != k]
            te = [i for i, it in enumerate(items) if fold_of[it.arch] == k]
            if not tr or not te:
                continue
            fit = self._fit_items([items[i] for i in tr], y[tr], fields)
            x, work, owner, _ = self._rows([items[i] for i in te], fields)
            pred = np.bincount(owner, weights=fit.cost(x, work), minlength=len(te))
            errs.append(np.abs(np.log(pred) - np.log(y[te])))
        return float(np.mean(np.concatenate(errs))) if errs else float("inf")

    def _fit(self, records: Sequence[LatencyRecord], y: np.ndarray) -> None:
        items, ys = _training_targets(records, y, self.target)
        fields = self.policy_features
        self.selection = {}
        if fields == "auto":
            if len({it.arch for it in items}) >= 6:
                without = self._cv_error(items, ys, False)
                with_ = self._cv_error(items, ys, True)
                self.selection = {"cv_log_error_without": without, "cv_log_error_with": with_}
                fields = with_ < 0.97 * without  # keep them only for a clear gain
            else:
                fields = False
        self.uses_policy_features = bool(fields)
        self.model = self._fit_items(items, ys, bool(fields))
        self.members = self._fit_members(items, ys, bool(fields))
        self._memo = {}

    # -- prediction
    def row_costs(self, space: SearchSpace, keys: np.ndarray, packed: np.ndarray | None) -> np.ndarray:
        """Cost (target units) of unique key rows of ``space``, from the memo where possible."""
        idx = row_index(space)
        if packed is None:
            return self.model.cost(*idx.features(keys))
        memo = self._memo.get(id(space))
        if memo is None or memo[0] is not space:
            memo = (space, np.zeros(0, dtype=np.int64), np.zeros(0))
        _, known, values = memo
        pos = np.searchsorted(known, packed)
        hit = pos < len(known)
        hit[hit] = known[pos[hit]] == packed[hit]
        out = np.empty(len(packed))
        out[hit] = values[pos[hit]]
        miss = ~hit
        if miss.any():
            out[miss] = self.model.cost(*idx.features(keys[miss]))
            if len(known) + int(miss.sum()) <= _MEMO_LIMIT:
                allk = np.concatenate([known, packed[miss]])
                allv = np.concatenate([values, out[miss]])
                order = np.argsort(allk, kind="stable")
                if len(self._memo) > 64:
                    self._memo.clear()
                self._memo[id(space)] = (space, allk[order], allv[order])
        return out

    def _predict(self, space: SearchSpace, policies: Sequence[Policy]) -> np.ndarray:
        idx = row_index(space)
        keys, owner, _ = idx.keys(idx.arrays(policies, self.uses_policy_features))
        ukeys, inv, packed = unique_rows(idx, keys)
        cost = self.row_costs(space, ukeys, packed)
        return np.bincount(owner, weights=cost[inv], minlength=len(policies))

    def _predict_members(self, space: SearchSpace, policies: Sequence[Policy]) -> np.ndarray | None:
        if not self.members:
            return None
        idx = row_index(space)
        keys, owner, _ = idx.keys(idx.arrays(policies, self.uses_policy_features))
        ukeys, inv, _ = unique_rows(idx, keys)
        x, work = idx.features(ukeys)
        return np.stack(
            [np.bincount(owner, weights=m.cost(x, work)[inv], minlength=len(policies)) for m in self.members]
        )

    def _has_members(self) -> bool:
        return bool(self.members)

    def kernel_costs(self, space: SearchSpace, policy: Policy) -> dict[str, float]:
        """Predicted cost (ms) of each row of one policy: its present layers, then ``model``."""
        idx = row_index(space)
        keys, _, kind = idx.keys(idx.arrays([policy], self.uses_policy_features))
        cost = self.model.cost(*idx.features(keys))
        out: dict[str, float] = {}
        for key, k, c in zip(keys, kind, cost, strict=True):
            name = idx.names[key[1]] if k == 0 else "model"
            out[name] = float(c) * self.reference_ms
        return out

    # -- persistence
    def _state(self, directory: Path) -> dict[str, Any]:
        assert self.model.booster is not None
        self.model.booster.save_model(str(directory / "kernel_gbdt.txt"))
        members = []
        for k, m in enumerate(self.members):
            assert m.booster is not None
            m.booster.save_model(str(directory / f"kernel_gbdt_member{k}.txt"))
            members.append({"f0": m.f0, "theta": m.theta.tolist(), "work_rate": m.work_rate})
        return {
            "format": _FORMAT,
            "f0": self.model.f0,
            "theta": self.model.theta.tolist(),
            "work_rate": self.model.work_rate,
            "base_stage": self.base_stage,
            "profile_weight": self.profile_weight,
            "n_estimators": self.n_estimators,
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf,
            "policy_features": self.policy_features,
            "uses_policy_features": self.uses_policy_features,
            "selection": self.selection,
            "ensemble": self.ensemble,
            # optional in format 2: a save without it loads with no members
            "members": members,
        }

    def _restore(self, state: dict[str, Any], directory: Path) -> None:
        if int(state.get("format", 1)) != _FORMAT:
            raise ValueError(
                f"{directory}: kernel_gbdt format {state.get('format', 1)} is no longer supported; "
                "refit with `modeltailor calibrate` (the measurements are kept)"
            )
        self.model = _Fit(
            lgb.Booster(model_file=str(directory / "kernel_gbdt.txt")),
            float(state["f0"]),
            np.asarray(state["theta"], dtype=np.float64).reshape(N_GROUPS, 3),
            float(state["work_rate"]),
        )
        self.base_stage = bool(state["base_stage"])
        self.profile_weight = float(state.get("profile_weight", 1.0))
        self.n_estimators = int(state["n_estimators"])
        self.learning_rate = float(state["learning_rate"])
        self.num_leaves = int(state["num_leaves"])
        self.min_data_in_leaf = int(state["min_data_in_leaf"])
        self.policy_features = state["policy_features"]
        self.uses_policy_features = bool(state["uses_policy_features"])
        self.selection = dict(state.get("selection") or {})
        self.ensemble = int(state.get("ensemble", 0))
        self.members = [
            _Fit(
                lgb.Booster(model_file=str(directory / f"kernel_gbdt_member{k}.txt")),
                float(m["f0"]),
                np.asarray(m["theta"], dtype=np.float64).reshape(N_GROUPS, 3),
                float(m["work_rate"]),
            )
            for k, m in enumerate(state.get("members") or [])
        ]
        self._memo = {}
