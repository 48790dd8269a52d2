"""A real search spends no candidate on a policy that rounds to a model already scored."""

from __future__ import annotations

import itertools

from compression import CompressibleModel, SpaceOptions
from compression.apply import CompressedModel
from compression.data import Dataset
from compression.policy_identity import kept_channels, resolved_key
from compression.space_builder import space_for
from engine.device_latency import macs_proxy
from engine.search import run_search


def test_widths_that_round_alike_are_scored_once(tiny_model: CompressibleModel, digits: Dataset) -> None:
    # Only widths, drawn to three decimals in [0.7, 1]: about 300 values per group, but a
    # 16- and a 32-channel group keep only a few distinct channel counts in that range.
    options = SpaceOptions(schemes=("dense",), bits=(None,), depth=False, min_width=0.7, round_to=1)
    space = space_for(tiny_model, options)
    sizes = [ls.features.out_channels for ls in space.width_leaders]
    counts = [{kept_channels(w / 1000, n, 1) for w in range(700, 1001)} for n in sizes]
    distinct_models = len(list(itertools.product(*counts)))
    timed: list[CompressedModel] = []

    def latency(cm: CompressedModel) -> float:
        timed.append(cm)
        return macs_proxy(cm)

    budget = distinct_models + 20
    result = run_search(
        tiny_model,
        digits,
        device_latency=latency,
        algorithm="random",
        budget_candidates=budget,
        space_options=options,
        seed=4,
        batch_size=8,
    )
    keys = [resolved_key(tiny_model.graph, c.policy) for c in result.candidates]
    assert len(set(keys)) == len(keys), "two candidates build the same model"
    assert len(result.candidates) <= distinct_models < budget
    assert len(timed) == len(result.candidates) + 1  # dense + each distinct model once
    assert result.stopped_because == "converged"
    kept = {tuple(sorted(len(k) for k in cm.keep.values())) for cm in timed[1:]}
    assert len(kept) == len(timed) - 1  # every scored model keeps different channel counts
