"""Kernel features (fast path vs the real compressed model), predictor contract, store, CLI."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from compression import apply_policy, from_module, save_pt2, space_for
from compression.apply import get_tensor
from compression.policy import Policy
from compression.zoo import build_model
from latency_models.features import KERNEL_FEATURES, kernel_features, space_from_dict
from latency_models.predictors import GraphGNN, KernelGBDT, MacsLinear, ShapeLookup, group_split
from latency_models.sampling import SPACE_OPTIONS, random_architecture, random_policy
from latency_models.store import DeviceStore
from latency_models.testing import check_predictor, synthetic_records, uniform_policy

K = {n: i for i, n in enumerate(KERNEL_FEATURES)}


@pytest.fixture(scope="module")
def records() -> list:
    return synthetic_records(n_arch=20, per_arch=12, seed=3)


def _models() -> list:
    out = []
    for arch in ("resnet20", "mobilenetv2", "vit"):
        m = build_model(arch, in_channels=3, image_size=16, num_classes=10)
        out.append(from_module(m, torch.randn(2, 3, 16, 16), arch))
    for seed in (1, 5):
        module, shape = random_architecture(random.Random(seed))
        out.append(from_module(module, torch.randn(2, *shape), f"random-{seed}"))
    return out


def test_fast_path_channels_match_the_compressed_model() -> None:
    rng = random.Random(0)
    for cm in _models():
        space = space_for(cm, SPACE_OPTIONS)
        pols = [random_policy(space, rng) for _ in range(3)]
        kb = kernel_features(space, pols)
        dense = kernel_features(space, [Policy.dense()])
        assert [dense.x[0, i, K["macs"]] for i in range(len(space.layers))] == [
            ls.features.macs for ls in space.layers
        ]
        for p, pol in enumerate(pols):
            c = apply_policy(cm, pol)
            for i, name in enumerate(space.layer_names):
                assert kb.present[p, i] == (name in c.layer_weights), (cm.name, name)
                if name not in c.layer_weights:
                    continue
                w = get_tensor(c.gm, c.layer_weights[name]).shape
                row = kb.x[p, i]
                expected = (row[K["out_channels"]], row[K["in_channels"]] / row[K["groups"]])
                assert (w[0], w[1]) == expected, (cm.name, name, tuple(w))


def test_space_round_trips_through_json() -> None:
    cm = _models()[1]
    space = space_for(cm, SPACE_OPTIONS)
    again = space_from_dict(json.loads(json.dumps(space.to_dict())))
    assert again == space


@pytest.mark.parametrize(
    "factory",
    [
        functools.partial(KernelGBDT, n_estimators=120),
        functools.partial(GraphGNN, epochs=30),
        MacsLinear,
        ShapeLookup,
        functools.partial(KernelGBDT, target="ratio", n_estimators=60),
    ],
    ids=["kernel_gbdt", "gnn", "macs", "lookup", "kernel_gbdt_ratio"],
)
def test_contract(factory, records) -> None:
    check_predictor(factory, records)


@pytest.mark.parametrize(
    "factory",
    [functools.partial(GraphGNN, epochs=10), functools.partial(KernelGBDT, n_estimators=30), MacsLinear],
    ids=["gnn", "kernel_gbdt", "macs"],
)
def test_refit_inside_a_no_grad_search_fits_the_same_predictor(factory, records) -> None:
    # A job's active measurement refits while the search scores under torch.no_grad().
    from latency_models.incremental import refit

    base = factory().fit(records[:60])
    free = refit(records[:60], base, seed=4)
    with torch.no_grad():
        inside = refit(records[:60], base, seed=4)
    space = records[0].space
    pols = [Policy.dense(), uniform_policy(space, bits=8)]
    assert np.allclose(inside.predict(space, pols), free.predict(space, pols), rtol=1e-5)


def test_kernel_gbdt_learns_what_the_device_does(records) -> None:
    model = KernelGBDT(n_estimators=200).fit(records)
    space = records[0].space
    dense = model.predict(space, [Policy.dense()])[0]
    sparse = model.predict(space, [uniform_policy(space, scheme="unstructured", sparsity=0.5)])[0]
    assert abs(sparse / dense - 1) < 0.05  # masks give no speedup on this device
    # int8 helps a wide model and hurts a narrow one (synthetic device: narrow = < 32 channels)
    wide = [r.space for r in records if min(ls.features.out_channels for ls in r.space.layers[1:-1]) >= 48]
    if wide:
        s = wide[0]
        assert model.predict(s, [uniform_policy(s, bits=8)])[0] < 0.9 * model.predict(s, [Policy.dense()])[0]
    narrow = next(r.space for r in records if max(ls.features.out_channels for ls in r.space.layers) < 32)
    assert (
        model.predict(narrow, [uniform_policy(narrow, bits=8)])[0]
        > model.predict(narrow, [Policy.dense()])[0]
    )


def test_kernel_gbdt_beats_macs_on_unseen_architectures(records) -> None:
    from latency_models.predictors import holdout_metrics

    gbdt = holdout_metrics(functools.partial(KernelGBDT, n_estimators=200), records)
    macs = holdout_metrics(MacsLinear, records)
    assert gbdt["mape"] < macs["mape"]


def test_group_split_holds_out_whole_architectures(records) -> None:
    train, test = group_split(records, 0.25, seed=1)
    assert train and test
    assert not {records[i].arch_id for i in train} & {records[i].arch_id for i in test}


def test_store_versions_and_loads(tmp_path: Path, records) -> None:
    store = DeviceStore("fake-dev", tmp_path)
    store.append(records[:30])
    again = store.records()
    assert len(again) == 30 and again[0].policy == records[0].policy
    assert again[0].space == records[0].space
    p = MacsLinear().fit(records)
    assert store.save_version({"macs": p}, {"predictors": {"macs": {"within_10pct": 1.0}}}, "macs") == 1
    assert store.save_version({"macs": p}, {"predictors": {"macs": {"within_10pct": 2.0}}}, "macs") == 2
    assert store.versions() == [1, 2]
    loaded, version, kind = store.load()
    assert (version, kind) == (2, "macs")
    sp = records[0].space
    assert np.allclose(loaded.predict(sp, [records[0].policy]), p.predict(sp, [records[0].policy]))
    assert store.metrics(1)["predictors"]["macs"]["within_10pct"] == 1.0


def test_cli_predict_prints_one_json_line(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from latency_models.predictors.base import LatencyRecord
    from modeltailor.cli import app

    monkeypatch.setenv("MODELTAILOR_DATA_DIR", str(tmp_path))
    import modeltailor.cli.latency  # noqa: F401  (registers the commands)

    module, shape = random_architecture(random.Random(2))
    path = save_pt2(module, torch.randn(2, *shape), tmp_path / "m.pt2")
    cm = from_module(module, torch.randn(2, *shape), "m")
    space = space_for(cm, SPACE_OPTIONS)
    rng = random.Random(0)
    recs = [
        LatencyRecord("m", "m", space, random_policy(space, rng), latency_ms=1.0 + i / 10) for i in range(8)
    ]
    p = MacsLinear().fit(recs)
    p.metrics = {"within_10pct": 55.0}
    DeviceStore("cpu-ort-1t").save_version({"macs": p}, {"predictors": {}}, "macs")
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"default": {"width": 0.5}}))
    result = CliRunner().invoke(
        app, ["predict", str(path), "--policy", str(policy), "--device", "cpu-ort-1t"]
    )
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["predictor_version"] == 1 and line["holdout_within_10pct"] == 55.0
    expected = p.predict(space, [Policy.from_json(policy.read_text())])[0]
    assert line["latency_ms"] == pytest.approx(expected, rel=1e-5)
