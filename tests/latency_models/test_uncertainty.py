"""A predictor knows when it does not know: a std per prediction, larger far from its training set.

Trained on the synthetic device's records (``latency_models.testing``: small conv chains, a few
dozen policies each), asked about a policy of an architecture it was trained on and about the
ViT of the zoo (attention and token MLPs, none of which the training chains have).
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from compression import from_module, space_for
from compression.space import SearchSpace
from compression.zoo import build_model
from latency_models.predictors import GraphGNN, KernelGBDT, MacsLinear, Predictor, ShapeLookup
from latency_models.predictors.base import LatencyRecord
from latency_models.sampling import SPACE_OPTIONS, random_policy
from latency_models.testing import synthetic_records

ENSEMBLES: dict[str, Callable[[], Predictor]] = {
    "kernel_gbdt": functools.partial(KernelGBDT, target="ratio", n_estimators=120),
    "gnn": functools.partial(GraphGNN, target="ratio", epochs=150, hidden=32),
}


@pytest.fixture(scope="module")
def records() -> list[LatencyRecord]:
    return synthetic_records(n_arch=14, per_arch=10, seed=7)


@pytest.fixture(scope="module")
def vit() -> SearchSpace:
    module = build_model("vit", in_channels=3, image_size=16, num_classes=10)
    return space_for(from_module(module, torch.randn(2, 3, 16, 16), "vit"), SPACE_OPTIONS)


@functools.cache
def _fitted(kind: str, seed: int) -> Predictor:
    return ENSEMBLES[kind]().fit(synthetic_records(n_arch=14, per_arch=10, seed=seed))


def _relative_std(p: Predictor, space: SearchSpace, policies: list) -> np.ndarray:
    ms, std = p.predict_uncertainty(space, policies)
    assert np.all(np.isfinite(std)) and np.all(std > 0), std
    assert np.allclose(ms, p.predict(space, policies), rtol=1e-12)
    return std / ms


@pytest.mark.parametrize("kind", sorted(ENSEMBLES))
def test_std_is_larger_on_a_far_architecture_than_on_a_trained_one(
    kind: str, records: list[LatencyRecord], vit: SearchSpace
) -> None:
    p = _fitted(kind, 7)
    assert p.uncertainty_source == "ensemble"
    trained = records[0].space
    own = [r.policy for r in records if r.space is trained]
    rng = random.Random(0)
    far = [random_policy(vit, rng) for _ in range(24)]
    near_rel = float(np.median(_relative_std(p, trained, own)))
    far_rel = float(np.median(_relative_std(p, vit, far)))
    # relative, so that a bigger model's bigger latency alone cannot pass the test
    assert far_rel > 1.5 * near_rel, (near_rel, far_rel)


@pytest.mark.parametrize("kind", sorted(ENSEMBLES))
def test_ensemble_survives_save_and_load(kind: str, records: list[LatencyRecord], tmp_path: Path) -> None:
    p = _fitted(kind, 7)
    space = records[0].space
    pols = [r.policy for r in records if r.space is space]
    ms, std = p.predict_uncertainty(space, pols)
    loaded = Predictor.load(p.save(tmp_path / kind))
    assert loaded.uncertainty_source == "ensemble"
    ms2, std2 = loaded.predict_uncertainty(space, pols)
    assert np.allclose(ms2, ms, rtol=1e-6) and np.allclose(std2, std, rtol=1e-5)


def _as_older_save(folder: Path) -> None:
    """Rewrite a saved predictor as the format before ensembles: no members, no training error."""
    meta = json.loads((folder / "predictor.json").read_text())
    meta.pop("fit_log_rmse")
    for key in ("members", "ensemble"):
        meta["state"].pop(key, None)
    (folder / "predictor.json").write_text(json.dumps(meta))
    for extra in [*folder.glob("kernel_gbdt_member*.txt"), *folder.glob("gnn_heads.safetensors")]:
        extra.unlink()


@pytest.mark.parametrize("kind", sorted(ENSEMBLES))
def test_an_older_save_loads_and_uses_its_held_out_error(
    kind: str, records: list[LatencyRecord], tmp_path: Path
) -> None:
    p = ENSEMBLES[kind]()
    p.fit(records)
    p.metrics = {"mape": 30.0, "ratio_mape": 12.0}  # what a calibration's fit stores
    folder = p.save(tmp_path / kind)
    _as_older_save(folder)
    old = Predictor.load(folder)
    assert old.uncertainty_source == "held-out"
    space = records[0].space
    pols = [r.policy for r in records if r.space is space]
    ms, std = old.predict_uncertainty(space, pols)
    assert np.allclose(ms, p.predict(space, pols), rtol=1e-6), "the latency itself is unchanged"
    # a ratio-target predictor's own held-out error, as a normal error's std
    assert np.allclose(std, ms * 0.12 * math.sqrt(math.pi / 2))
    old.metrics = {}
    assert old.uncertainty_source == "unknown"
    assert np.allclose(old.predict_uncertainty(space, pols)[1], ms * 0.25)


@pytest.mark.parametrize("cls", [MacsLinear, ShapeLookup])
def test_kinds_without_an_ensemble_use_their_errors(
    cls: type[Predictor], records: list[LatencyRecord]
) -> None:
    p = cls(target="ratio").fit(records)
    assert p.uncertainty_source == "training"  # fitted outside a calibration: no held-out figures
    space = records[0].space
    pols = [r.policy for r in records if r.space is space]
    ms, std = p.predict_uncertainty(space, pols)
    assert p.fit_log_rmse is not None and p.fit_log_rmse > 0
    assert np.allclose(std, ms * max(p.fit_log_rmse, 0.01))
    p.metrics = {"ratio_mape": 20.0, "mape": 25.0}
    assert p.uncertainty_source == "held-out"
    assert np.allclose(p.predict_uncertainty(space, pols)[1], ms * 0.20 * math.sqrt(math.pi / 2))


def test_std_follows_the_error_on_unseen_architectures() -> None:
    """Among held-out architectures, the ones the ensemble doubts most are the ones it gets
    most wrong (rank correlation of std and error over held-out policies)."""
    from scipy.stats import spearmanr

    from latency_models.predictors.base import by_space

    all_records = synthetic_records(n_arch=20, per_arch=10, seed=11)
    arches = sorted({r.arch_id for r in all_records})
    held = set(arches[:8])
    p = KernelGBDT(target="ratio", n_estimators=120).fit([r for r in all_records if r.arch_id not in held])
    test = [r for r in all_records if r.arch_id in held]
    rel, err = np.zeros(len(test)), np.zeros(len(test))
    for space, ix in by_space(test):
        ms, std = p.predict_uncertainty(space, [test[i].policy for i in ix])
        rel[ix] = std / ms
        err[ix] = np.abs(np.log(ms / np.array([test[i].latency_ms for i in ix])))
    rho = spearmanr(rel, err)[0]
    assert rho > 0.2, rho
