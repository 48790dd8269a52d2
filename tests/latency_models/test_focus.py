"""A focused calibration plan always holds other architectures besides the model's own."""

from __future__ import annotations

import warnings

import pytest

from compression.model_io import CompressibleModel
from compression.policy import Policy
from compression.zoo import build_model
from latency_models.focus import RANDOM_MACS_FLOOR, dense_macs, focused_plan
from latency_models.sampling import _export


@pytest.fixture(scope="module")
def small_lenet() -> CompressibleModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _export(
            build_model("lenet5", in_channels=1, image_size=8, num_classes=10), (1, 8, 8), "lenet5"
        )


# 74 and 85: seeds whose first few random architectures are all over the MACs cap; a 16-sample
# plan of those once held LeNet-5 alone, and the calibration failed ("fewer than two architectures").
@pytest.mark.parametrize("seed", [0, 74, 85])
def test_plan_mixes_the_model_with_small_random_architectures(
    small_lenet: CompressibleModel, seed: int
) -> None:
    plan = list(focused_plan(small_lenet, "lenet5", "lenet5@1x8x8", 16, seed=seed))
    assert len(plan) == 16
    own = [s for s in plan if s.arch_id == "lenet5"]
    others = [s for s in plan if s.arch_id != "lenet5"]
    assert len(own) >= 8, "most samples are the model's own policies"
    assert len(others) == 4, "the random share (25 %) is kept"
    assert len({s.arch_id for s in others}) >= 2
    for s in others:
        assert dense_macs(s.space, Policy.dense()) <= RANDOM_MACS_FLOOR


def test_a_focused_calibration_chooses_its_default_on_the_models_own_policies() -> None:
    """The architecture split of a focused calibration holds a handful of measurements; the
    default kind is chosen on held-out policies of the focus model instead, and says so."""
    from collections import Counter

    from latency_models.calibrate import fit_predictors
    from latency_models.testing import synthetic_records

    records = synthetic_records(n_arch=5, per_arch=12)
    focus = Counter(r.space_id for r in records).most_common(1)[0][0]
    kinds = ("macs", "lookup")
    _, doc, _ = fit_predictors(records, kinds=kinds, focus=focus)
    assert doc["default_chosen_by"] == "focus" and set(doc["focus_by_kind"]) == set(kinds)

    def score(m: dict[str, float]) -> float:
        return m.get("ratio_within_10pct", 0.0) + m.get("speedup_within_10pct", 0.0)

    best = max(score(m) for m in doc["focus_by_kind"].values())
    assert score(doc["focus_by_kind"][doc["default"]]) == best
    # without a focus the architecture split decides, as before
    _, plain, _ = fit_predictors(records, kinds=kinds)
    assert plain["default_chosen_by"] == "architectures" and "focus_by_kind" not in plain
