"""Fine-tuning the front after a search: a real job stores both accuracies and a coherent front;
the CLI does the same offline; an export replays the job's fine-tuning to the same weights.

LeNet-5 on digits (trained in seconds), a few candidates, a few distillation steps.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LiveServer
from typer.testing import CliRunner

from compression.data import Dataset, load_builtin
from compression.evaluate import accuracy
from compression.model_io import CompressibleModel
from compression.policy import Policy
from compression.resolve import resolve_model
from engine.finetune_front import FrontFinetuner, replay, select
from engine.search import run_search
from engine.spec import FinetuneSpec, JobSpec
from modeltailor.client import Client
from service.front import front_order, signed_points

SPACE = {"schemes": ["unstructured", "nm"], "bits": [None, 8], "width": True, "depth": False}


@functools.cache
def _lenet5(cache: str) -> tuple[CompressibleModel, Dataset]:
    data = load_builtin("digits")
    return resolve_model("lenet5", data, seed=0, cache_dir=Path(cache)), data


def test_a_job_fine_tunes_its_fastest_front_point_and_keeps_both_accuracies(real_live: LiveServer) -> None:
    client = Client(real_live.url, real_live.key)
    data = client.builtin_dataset("digits")
    model = client.zoo_model("lenet5", data["id"])
    job = client.submit_job(
        model["id"], data["id"], "cpu-ort-1t", algorithm="random", space=SPACE,
        budget={"candidates": 5}, seed=2, remeasure_top_k=0, calibration_samples=8,
        calibrate="auto", active_measurement={"share": 0.0},  # not what it tests
        finetune={"top_k": 1, "steps": 8},
    )  # fmt: skip
    info = job.wait(timeout=600, poll_s=0.5, progress=False)
    assert info["status"] == "succeeded", info.get("error")
    assert info["spec"]["finetune"] == {"top_k": 1, "epochs": 2.0, "steps": 8}
    cands = job.candidates()
    tuned = [c for c in cands if c.get("one_shot_accuracy") is not None]
    assert len(tuned) == 1, [c.data for c in cands]
    c = tuned[0]
    one_shot, fine = c["one_shot_accuracy"], c["finetuned_accuracy"]
    assert 0.0 <= one_shot <= 1.0 and fine is not None and 0.0 <= fine <= 1.0
    assert c["accuracy"] == max(one_shot, fine)  # the better one is the candidate's accuracy
    # The stored front is the front of the stored (re-scored) accuracies.
    feasible = [x for x in cands if x["feasible"]]
    points = signed_points(
        [np.array([x["accuracy"] for x in feasible]), np.array([x["latency_ms"] for x in feasible])],
        [{"direction": "max"}, {"direction": "min"}],
    )
    expected = {feasible[i]["id"] for i in front_order(points, np.array([x["id"] for x in feasible]))}
    assert {x["id"] for x in job.pareto()} == expected
    events = list(job.events())
    phases = [d.get("phase", "") for k, d in events if k == "phase"]
    assert any(p.startswith("finetune 1/1: step 8/8") for p in phases), phases
    done = [d for k, d in events if k == "finetuned"]
    assert len(done) == 1 and done[0]["policy_hash"] == c["policy_hash"] and done[0]["finetune"]["steps"] == 8


def test_finetune_spec_bounds_are_checked_before_the_job_is_stored() -> None:
    base = {"model_id": 1, "dataset_id": 1, "device_id": 1, "algorithm": "random"}
    assert JobSpec.model_validate(base).finetune == FinetuneSpec(top_k=5, epochs=2.0, steps=None)
    for bad in ({"top_k": -1}, {"epochs": 0}, {"steps": 0}, {"top_k": 51}, {"lr": 0.1}):
        with pytest.raises(ValueError, match="finetune"):
            JobSpec.model_validate({**base, "finetune": bad})


def test_an_export_replays_the_jobs_fine_tuning_to_the_same_accuracy(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model, data = _lenet5(str(tmp_path))
    spec = FinetuneSpec(top_k=1, steps=15)
    tuner = FrontFinetuner(model, data, spec, seed=4, reconstruct=True)
    policy = Policy.from_dict({"default": {"width": 0.5, "scheme": "nm", "nm": [2, 4], "bits": 8}})
    point = tuner.run(policy)
    assert point is not None and point.finetuned_accuracy is not None and point.steps == 15
    extra = {**point.extra(), "finetune": {**point.extra()["finetune"], "applied": True}}
    cm = replay(model, data, policy, extra, seed=4, reconstruct=True)
    assert cm is not None
    ev = tuner.evaluator
    assert accuracy(cm.gm, ev.x_val, ev.y_val) == pytest.approx(
        point.finetuned_accuracy, abs=2 / len(ev.y_val)
    )
    # Not fine-tuned in the job and no epochs asked: the export builds the one-shot model.
    assert replay(model, data, policy, {}, seed=4, reconstruct=True) is None


def test_select_spreads_over_the_front_from_the_fastest(tmp_path: Path) -> None:
    model, data = _lenet5(str(tmp_path))
    result = run_search(
        model, data, device_latency=lambda cm: 1.0, algorithm="random", budget_candidates=6, seed=1,
        val_images=100,
    )  # fmt: skip
    front = sorted(result.pareto, key=lambda c: c.score.latency_ms)
    assert [c.index for c in select(result.pareto, 1)] == [front[0].index]
    assert len(select(result.pareto, 50)) == len(front) and select(result.pareto, 0) == []


def test_cli_search_fine_tunes_the_front_and_writes_both_accuracies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import modeltailor.cli.search  # noqa: F401  (registers the command)
    from modeltailor.cli import _register, app

    _register()
    monkeypatch.setenv("MODELTAILOR_DATA_DIR", str(tmp_path / "home"))
    out = tmp_path / "front.json"
    args = ["search", "lenet5", "--data", "digits", "--latency", "macs-proxy", "--algorithm", "random"]
    args += ["--budget", "4", "--finetune-top-k", "2", "--finetune-epochs", "0.2", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["finetune"] == {"top_k": 2, "epochs": 0.2}
    tuned = [c for c in doc["candidates"] if "finetuned_accuracy" in c]
    assert 1 <= len(tuned) <= 2
    for c in tuned:
        assert c["accuracy"] == max(c["one_shot_accuracy"], c["finetuned_accuracy"])
        assert c["finetune"]["steps"] == 9  # 0.2 of 41 steps an epoch (1,257 images, batches of 31)
    assert "one-shot" in result.output
