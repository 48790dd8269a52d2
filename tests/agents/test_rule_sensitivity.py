"""The rule agent's Pareto mode: single moves probed from an anchor, then chained and spread."""

from __future__ import annotations

from agents import Objective
from agents.objective import Score, hypervolume_2d
from agents.rule import RuleAgent
from agents.sensitivity import PROBES_BEFORE_DROP, apply_move, candidate_moves
from agents.testing import SyntheticProblem
from compression.policy import Policy
from compression.space import SearchSpace


def differences(space: SearchSpace, a: Policy, b: Policy) -> int:
    """How many decisions (skipped blocks, layer policies) differ between two policies."""
    return len(a.skip ^ b.skip) + sum(a.for_layer(n) != b.for_layer(n) for n in space.layer_names)


def test_moves_change_one_decision_and_respect_the_space(resnet_space: SearchSpace) -> None:
    dense = Policy.dense()
    moves = [m for _, m in candidate_moves(resnet_space, dense)]
    kinds = {m[0] for m in moves}
    assert {"skip", "width", "bits"} <= kinds
    assert len([m for m in moves if m[0] == "skip"]) == len(resnet_space.blocks)
    for move in moves:
        moved = apply_move(resnet_space, dense, move)
        assert moved is not None, move
        if move[0] == "width":
            # A channel-group leader narrowed: its followers change with it, nothing else does.
            width = moved.for_layer(move[1]).width
            assert resnet_space.options.min_width - 1e-9 <= width < 1.0
        else:
            assert differences(resnet_space, dense, moved) == 1, move
    block = resnet_space.blocks[0]
    skipped = apply_move(resnet_space, dense, ["skip", block.name])
    assert skipped is not None and skipped.skip == {block.name}
    assert apply_move(resnet_space, skipped, ["skip", block.name]) is None
    assert apply_move(resnet_space, skipped, ["bits", block.layers[0], 8]) is None, (
        "moot inside a skipped block"
    )


def run(agent: RuleAgent, problem: SyntheticProblem, budget: int) -> list[tuple[Policy, Score]]:
    out: list[tuple[Policy, Score]] = []
    while len(out) < budget:
        policies = agent.ask(4)
        scores = [problem.score(p) for p in policies]
        agent.tell(policies, scores)
        out += list(zip(policies, scores, strict=True))
    return out


def test_probes_from_the_anchor_then_chains_and_drops_what_saves_nothing(
    resnet_space: SearchSpace,
) -> None:
    problem = SyntheticProblem(resnet_space)
    objective = Objective().with_dense(problem.dense_score())
    agent = RuleAgent(resnet_space, objective, seed=0)
    history = run(agent, problem, 160)
    sens = agent.sensitivity
    assert sens is not None and sens.anchor is not None
    anchor = sens.anchor[0]
    probed = [p for p, _ in history if differences(resnet_space, anchor, p) == 1]
    assert len(probed) >= len(resnet_space.blocks), "every block skip is probed from the anchor"
    # SyntheticProblem's latency ignores fine-grained sparsity: that kind is dropped, untried
    # beyond its first probes, on every kind of layer.
    sparse_kinds = {k: v for k, v in sens.kind_probes.items() if k.startswith("sparse")}
    assert sparse_kinds and all(len(v) <= PROBES_BEFORE_DROP and not any(v) for v in sparse_kinds.values())
    # Chains: policies several moves away from the anchor, each move one that saved latency.
    assert sens.chained
    assert any(differences(resnet_space, anchor, p) >= 3 for p, _ in history)


def test_sensitivity_sharpens_the_front(resnet_space: SearchSpace) -> None:
    problem = SyntheticProblem(resnet_space)
    dense = problem.dense_score()
    objective = Objective().with_dense(dense)
    reference = (dense.accuracy - 0.1, dense.latency_ms)

    def hv(agent: RuleAgent) -> float:
        return hypervolume_2d([(s.accuracy, s.latency_ms) for _, s in run(agent, problem, 200)], reference)

    with_probes = hv(RuleAgent(resnet_space, objective, seed=0))
    groups_only = hv(RuleAgent(resnet_space, objective, seed=0, sensitivity=False))
    assert with_probes > groups_only * 1.02, (with_probes, groups_only)


def test_restored_agent_continues_the_same_schedule(resnet_space: SearchSpace) -> None:
    problem = SyntheticProblem(resnet_space)
    objective = Objective().with_dense(problem.dense_score())
    agent = RuleAgent(resnet_space, objective, seed=1)
    run(agent, problem, 60)  # mid-probes
    clone = RuleAgent(resnet_space, objective, seed=1)
    clone.load_state_dict(agent.state_dict())
    for _ in range(25):  # through the chains
        a, b = agent.ask(2), clone.ask(2)
        assert [p.hash for p in a] == [p.hash for p in b]
        scores = [problem.score(p) for p in a]
        agent.tell(a, scores)
        clone.tell(b, scores)


def test_under_a_latency_limit_the_two_searches_take_turns_and_do_better(resnet_space: SearchSpace) -> None:
    problem = SyntheticProblem(resnet_space)
    dense = problem.dense_score()
    gains = []
    for fraction in (0.3, 0.5):
        objective = Objective(max_latency_ms=fraction * dense.latency_ms).with_dense(dense)

        def best(agent: RuleAgent, objective: Objective = objective) -> float:
            return max(
                (s.accuracy for _, s in run(agent, problem, 200) if objective.feasible(s)), default=0.0
            )

        both = best(RuleAgent(resnet_space, objective, seed=0))
        groups_only = best(RuleAgent(resnet_space, objective, seed=0, sensitivity=False))
        assert both >= groups_only, (fraction, both, groups_only)
        gains.append(both - groups_only)
    assert max(gains) > 0.01, gains
