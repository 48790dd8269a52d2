"""The reward surrogates the model-based agents learn in, and the actions that reach the good region."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agents import Objective
from agents.agmc import NODE_KINDS, compute_graph
from agents.ddpg.dyna import A_DIM, MODEL_BITS, SCHEME, SKIP, ActionCodec, DynaConfig, DynaDDPGAgent
from agents.ddpg.env import normalised_features
from agents.surrogate import AccuracySurrogate, LatencyModel
from agents.testing import SyntheticProblem, check_policy_in_space, synthetic_objective
from compression import SearchSpace
from compression.policy import Policy


def _policies(space: SearchSpace, n: int, seed: int) -> list[Policy]:
    """Policies spread from near dense to heavily compressed, as a search would score them."""
    codec = ActionCodec(space)
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a = 1.0 - rng.uniform(0.0, 0.3 + 0.7 * k / n, (len(space.layers), A_DIM))
        a[:, SKIP] = rng.uniform(0.0, 0.8, len(space.layers))
        a[:, SCHEME] = rng.uniform(0.0, 1.0, len(space.layers))
        a[:, MODEL_BITS] = rng.uniform()
        out.append(codec.policy(a))
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_accuracy_surrogate_ranks_unseen_policies_and_knows_what_it_has_not_seen(
    resnet_space: SearchSpace,
) -> None:
    problem = SyntheticProblem(resnet_space)
    train, test = _policies(resnet_space, 60, 0), _policies(resnet_space, 60, 1)
    sur = AccuracySurrogate(resnet_space, problem.dense_accuracy)
    sur.add(train, [problem.score(p).accuracy for p in train])
    mean, std = sur.fit().predict(test)
    truth = np.asarray([problem.score(p).accuracy for p in test])
    assert _spearman(mean, truth) > 0.8
    assert float(np.mean(np.abs(mean - truth))) < 0.05
    # Uncertainty: a kind of move never scored (all blocks skipped) is less certain than the data.
    _, seen_std = sur.predict(train)
    skip_all = Policy(skip=frozenset(b.name for b in resnet_space.blocks))
    _, far_std = sur.predict([skip_all])
    assert far_std[0] > 2 * float(np.median(seen_std))
    # Its state is its data: restored from JSON it predicts the same numbers.
    clone = AccuracySurrogate(resnet_space)
    clone.load_state_dict(json.loads(json.dumps(sur.state_dict())))
    m2, s2 = clone.predict(test)
    np.testing.assert_array_equal(m2, mean)
    np.testing.assert_array_equal(s2, std)


def test_surrogates_refuse_to_predict_before_any_data(resnet_space: SearchSpace) -> None:
    with pytest.raises(ValueError, match="no scored policies yet"):
        AccuracySurrogate(resnet_space).fit()
    with pytest.raises(ValueError, match="not fitted"):
        LatencyModel(resnet_space).predict([Policy.dense()])


def test_latency_model_fits_the_device_latency_not_macs(resnet_space: SearchSpace) -> None:
    # The synthetic device runs 8-bit layers faster or slower by size and has a per-layer
    # overhead: MACs alone miss both, the latency model fitted to it should not.
    problem = SyntheticProblem(resnet_space)
    train, test = _policies(resnet_space, 120, 2), _policies(resnet_space, 40, 3)
    model = LatencyModel(resnet_space).fit(train, [problem.score(p).latency_ms for p in train])
    pred = model.predict(test)
    truth = np.asarray([problem.score(p).latency_ms for p in test])
    assert float(np.max(np.abs(pred - truth) / truth)) < 0.05
    assert model.dense_latency == pytest.approx(problem.dense_score().latency_ms, rel=0.02)


def test_actions_reach_int8_everywhere_dense_schemes_and_stay_in_the_space(resnet_space: SearchSpace) -> None:
    codec = ActionCodec(resnet_space)
    n = len(resnet_space.layers)
    a = np.ones((n, A_DIM))
    a[:, SKIP] = 0.0
    a[:, SCHEME] = 0.0  # the first allowed scheme is dense
    a[:, MODEL_BITS] = 0.0  # one action: the whole model to its fewest bits
    a[:, 2] = 0.6
    p = codec.policy(a)
    lps = [p.for_layer(ls.name) for ls in resnet_space.layers]
    assert all(lp.bits == 8 and lp.scheme == "dense" and lp.width == 1.0 for lp in lps)
    a[3, 2] = 1.0  # ...and one layer back to float against it
    lp3 = codec.policy(a).for_layer(resnet_space.layers[3].name)
    assert lp3.bits is None
    # A policy read back into actions gives the same policy (warm-start episodes).
    assert codec.policy(codec.actions_of(p)) == p
    rng = np.random.default_rng(0)
    for _ in range(20):
        check_policy_in_space(resnet_space, codec.policy(rng.uniform(0, 1, (n, A_DIM))))


def test_action_wall_limits_the_devices_latency(resnet_space: SearchSpace) -> None:
    """Under a latency limit every proposal's device latency (not MACs) stays about within it."""
    problem = SyntheticProblem(resnet_space)
    objective = synthetic_objective(resnet_space, 0.5)
    assert objective.max_latency_ms is not None
    cfg = DynaConfig(
        warm_start=False, candidates=8, imagined_episodes=4, updates_per_tell=2, latency_samples=64
    )
    agent = DynaDDPGAgent(
        resnet_space,
        objective,
        0,
        config=cfg,
        latency_fn=lambda ps: [problem.score(p).latency_ms for p in ps],
    )
    for _ in range(3):
        policies = agent.ask(4)
        scores = [problem.score(p) for p in policies]
        agent.tell(policies, scores)
        for s in scores:
            assert s.latency_ms <= objective.max_latency_ms * 1.05


def test_agmc_graph_holds_the_ops_that_join_branches(
    fancy_space: SearchSpace, resnet_space: SearchSpace
) -> None:
    import torch

    for space, kinds in ((fancy_space, ("concat", "add")), (resnet_space, ("add", "block"))):
        features = torch.from_numpy(normalised_features(space))
        x, edges = compute_graph(space, features)
        n = len(space.layers)
        assert x.shape[0] > n
        kind = x[:, features.shape[1] :].argmax(dim=1)
        for k in kinds:
            assert (kind == NODE_KINDS.index(k)).any(), f"no {k} node in {space.layers[0].name}..."
        assert int(edges.max()) < x.shape[0]


def test_model_based_agent_beats_the_rule_sweep_it_starts_from(resnet_space: SearchSpace) -> None:
    """Warm-started from the rule sweep, 48 candidates improve the front beyond the sweep's."""
    from agents.objective import hypervolume_2d
    from agents.rule import rule_sweep

    problem = SyntheticProblem(resnet_space)
    dense = problem.dense_score()
    objective = Objective().with_dense(dense)
    ref = (dense.accuracy - 0.1, dense.latency_ms)
    sweep = [problem.score(p) for p in rule_sweep(resnet_space, objective)]
    cfg = DynaConfig(candidates=24, imagined_episodes=16, updates_per_tell=6)
    agent = DynaDDPGAgent(
        resnet_space,
        objective,
        0,
        config=cfg,
        latency_fn=lambda ps: [problem.score(p).latency_ms for p in ps],
    )
    found = []
    for _ in range(12):
        policies = agent.ask(4)
        scores = [problem.score(p) for p in policies]
        agent.tell(policies, scores)
        found += [(s.accuracy, s.latency_ms) for s in scores]
    before = hypervolume_2d([(s.accuracy, s.latency_ms) for s in sweep], ref)
    assert hypervolume_2d(found, ref) > 1.2 * before
